"""FedAvg rounds: local steps, pseudo-gradients or weights, per-round client sampling, inside the
compiled (and vmapped) run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jbyz import grid, simulate
from jbyz.config import RunConfig, clients_per_round
from jbyz.registry import ConfigError
from jbyz.validation import validate

BASE = RunConfig(dataset="digits", model="mlp", n_workers=8, f_real=0, attack="none",
                 aggregator="mean", batch_size=16, steps=6, eval_every=3, momentum=0.0)


def _flat(result):
    return np.asarray(ravel_pytree(result.params)[0])


@pytest.mark.slow
def test_one_local_step_is_distributed_sgd_with_the_product_of_the_rates():
    """K = 1: the pseudo-gradient is local_lr * g on the same batch, so the server's step
    lr * local_lr * Agg(g) is DSGD's at rate lr * local_lr (ALIE and the median are equivariant
    to scaling, so this holds under attack too)."""
    for kw in ({}, dict(f_real=2, attack="alie", aggregator="median", momentum=0.9)):
        dsgd = simulate.run(BASE.replace(lr=0.05, **kw), progress=False)
        fed = simulate.run(BASE.replace(lr=0.5, local_lr=0.1, **kw), progress=False)
        np.testing.assert_allclose(_flat(fed), _flat(dsgd), rtol=2e-4, atol=2e-6)
        assert fed.history[-1]["train_loss"] == pytest.approx(dsgd.history[-1]["train_loss"],
                                                              rel=1e-4)


@pytest.mark.slow
def test_local_steps_are_sgd_steps_from_the_server_model():
    """One round of K local steps with one training sample (every batch is that sample) equals K
    steps of single-worker SGD at local_lr, for both what the workers send."""
    one = dict(dataset="synthetic_classification",
               dataset_kwargs={"n_samples": 1, "n_test": 8, "dim": 5, "classes": 3},
               n_workers=2, split="shared", batch_size=1, eval_every=1)
    k = 4
    sgd = simulate.run(BASE.replace(**one, steps=k, lr=0.1), progress=False)
    for send in ("pseudo_gradient", "weights"):
        fed = simulate.run(BASE.replace(**one, steps=1, lr=1.0, local_lr=0.1, local_steps=k,
                                        fed_send=send), progress=False)
        np.testing.assert_allclose(_flat(fed), _flat(sgd), rtol=1e-5, atol=1e-6)
        # the reported training loss is the mean over the local steps
        assert fed.history[-1]["train_loss"] == pytest.approx(
            np.mean([h["train_loss"] for h in sgd.history if "train_loss" in h]), rel=1e-4)


@pytest.mark.slow
def test_more_local_steps_train_further_per_round():
    short = simulate.run(BASE.replace(lr=1.0, local_lr=0.05, steps=10, eval_every=10), progress=False)
    long = simulate.run(BASE.replace(lr=1.0, local_lr=0.05, local_steps=5, steps=10, eval_every=10),
                        progress=False)
    assert long.history[-1]["test_loss"] < 0.8 * short.history[-1]["test_loss"]


@pytest.mark.slow
def test_weights_and_pseudo_gradients_agree_for_translation_equivariant_rules_only():
    """theta - Agg(theta - theta_i) = Agg(theta_i) for the mean and the coordinate-wise median;
    an attack that acts on what is sent (sign flip) differs between the two."""
    fed = BASE.replace(lr=1.0, local_lr=0.05, local_steps=3, n_workers=7, steps=4)
    for agg in ("mean", "median"):
        a = simulate.run(fed.replace(aggregator=agg), progress=False)
        b = simulate.run(fed.replace(aggregator=agg, fed_send="weights"), progress=False)
        np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-4, atol=1e-5)
    attacked = fed.replace(f_real=2, attack="sign_flip", aggregator="mean")
    a = simulate.run(attacked, progress=False)
    b = simulate.run(attacked.replace(fed_send="weights"), progress=False)
    assert np.abs(_flat(a) - _flat(b)).max() > 1e-2


def test_sample_clients_draws_m_valid_slots_uniformly():
    valid = jnp.arange(10) < 8  # two padding slots
    draws = np.stack([np.asarray(simulate.sample_clients(jax.random.key(i), valid, 3))
                      for i in range(400)])
    assert (draws.sum(1) == 3).all() and not draws[:, 8:].any()
    freq = draws[:, :8].mean(0)
    np.testing.assert_allclose(freq, 3 / 8, atol=0.08)  # 400 draws: SE ~0.024
    assert simulate.sample_clients(jax.random.key(0), valid, 20).sum() == 8
    # each pair is drawn together about as often as independence without replacement says
    both = (draws[:, 0] & draws[:, 1]).mean()
    assert both == pytest.approx(3 / 8 * 2 / 7, abs=0.05)


def test_clients_per_round_counts_as_configured():
    cfg = RunConfig(n_workers=10, f_real=3)
    assert clients_per_round(cfg) == 10
    assert clients_per_round(cfg.replace(client_fraction=0.5)) == 5
    assert clients_per_round(cfg.replace(client_fraction=0.5, client_fraction_of="honest")) == 3
    assert clients_per_round(cfg.replace(client_fraction=0.3)) == 3  # floor(3.0), not 2


@pytest.mark.slow
def test_client_sampling_varies_byzantine_participants_and_changes_the_run():
    """With sampling, how many Byzantine workers take part varies by round (seen through the
    attack: with all 3 Byzantine workers out of a round, the mean is unharmed)."""
    cfg = BASE.replace(n_workers=10, f_real=3, attack="alie", aggregator="mean", lr=1.0,
                       local_lr=0.05, client_fraction=0.5, steps=8, eval_every=4)
    prog = simulate.get_program(cfg)
    inp = jax.tree.map(jnp.asarray, prog.inputs(cfg))
    counts = []
    for t in range(40):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed),
                                                    simulate._SALT_SAMPLE), t)
        s = np.asarray(simulate.sample_clients(key, jnp.arange(10) < 10, inp.dyn.m_sample))
        assert s.sum() == 5
        counts.append(int(s[:3].sum()))
    assert len(set(counts)) >= 3 and min(counts) == 0
    full = simulate.run(cfg.replace(client_fraction=None), progress=False)
    sampled = simulate.run(cfg, progress=False)
    assert np.abs(_flat(full) - _flat(sampled)).max() > 1e-3


@pytest.mark.slow
def test_fedavg_runs_vmapped_in_a_grid_like_single_runs(tmp_path):
    base = BASE.replace(n_workers=10, f_real=2, attack="alie", aggregator="median", steps=6,
                        eval_every=3, lr=1.0, local_lr=0.05, local_steps=2, client_fraction=0.6)
    cfgs = [base, base.replace(local_lr=0.1, seed=1), base.replace(client_fraction=0.8, f_real=3),
            base.replace(client_fraction=0.5, client_fraction_of="honest")]
    plan = grid.plan(cfgs)
    assert len(plan.batches) == 1  # one compiled program: local_lr and the fraction are dynamic
    table = grid.run_grid(cfgs, tmp_path, progress=False, log=None)
    for cfg in cfgs:
        alone = simulate.run(cfg, progress=False).to_frame()
        inside = table[table["run_id"] == cfg.config_hash()].sort_values("step")
        np.testing.assert_allclose(inside["test_accuracy"].to_numpy(),
                                   alone["test_accuracy"].to_numpy(), atol=1e-6)
        np.testing.assert_allclose(inside["train_loss"].to_numpy(),
                                   alone["train_loss"].to_numpy(), rtol=1e-4)


@pytest.mark.slow
def test_fltrust_reference_is_the_servers_pseudo_gradient():
    """With local steps, FLTrust's reference comes from the same K local steps on the server's
    samples: the run trains (a one-gradient reference would be K x local_lr off in scale)."""
    cfg = BASE.replace(n_workers=8, f_real=2, attack="sign_flip", aggregator="fltrust",
                       server_validation=100, lr=1.0, local_lr=0.05, local_steps=3, steps=20,
                       eval_every=20)
    r = simulate.run(cfg, progress=False)
    assert r.history[-1]["test_accuracy"] > 0.6


def test_defaults_keep_run_ids():
    """The federated fields at their defaults leave run ids as they were before the fields
    existed (stored grids still resume)."""
    assert RunConfig().config_hash() == "b67e3f940a67cae4"
    assert RunConfig(local_steps=1, fed_send="pseudo_gradient", client_fraction_of="all",
                     local_lr=None, client_fraction=None).config_hash() == "b67e3f940a67cae4"
    assert RunConfig(local_lr=0.1).config_hash() != RunConfig().config_hash()


@pytest.mark.parametrize("kw, message", [
    (dict(local_steps=3), "local_steps=3 needs local_lr"),
    (dict(local_steps=0, local_lr=0.1), "local_steps must be an integer >= 1, got 0"),
    (dict(local_lr=-1.0), "local_lr must be > 0 or omitted, got -1.0"),
    (dict(fed_send="weights"), "fed_send='weights' needs local_lr"),
    (dict(fed_send="weights", local_lr=0.1), "worker momentum would average weights"),
    (dict(fed_send="weights", local_lr=0.1, momentum=0.0, clip_per_worker=1.0),
     "clip_per_worker clips gradients, not weights"),
    (dict(fed_send="weights", local_lr=0.1, momentum=0.0, server_validation=50),
     "the server's reference (FLTrust, dSTAR) is an update, not weights"),
    (dict(fed_send="model"), "fed_send"),
    (dict(local_lr=0.1, sampling="epoch_stream"), "sampling='epoch_stream' are not supported"),
    (dict(client_fraction=1.5), "client_fraction must be in (0, 1] or omitted, got 1.5"),
    (dict(client_fraction=0.05), "samples floor(0.05 x 10) = 0 workers per round; use "
                                 "client_fraction >= 0.1"),
    (dict(client_fraction=0.1, client_fraction_of="honest"), "floor(0.1 x 7) = 0 workers"),
])
def test_federated_configuration_errors(kw, message):
    errors = validate(RunConfig(**kw))
    assert any(message in e for e in errors), errors
    with pytest.raises(ConfigError, match="invalid run configuration"):
        simulate.run(RunConfig(**kw, steps=1), progress=False)
