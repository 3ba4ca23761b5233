"""End to end: training on digits learns, attacks that should hurt do hurt, robust rules hold."""

import numpy as np
import pytest

from jbyz.config import RunConfig
from jbyz.validation import check
from jbyz.simulate import Simulation, run

BASE = RunConfig(dataset="digits", model="mlp", n_workers=10, f_real=3, batch_size=32,
                 steps=300, lr=0.1, momentum=0.9, eval_every=100, seed=0)


def test_no_attack_mean_learns_well_above_chance():
    res = run(BASE.replace(f_real=0, aggregator="mean"), progress=False)
    assert res.history[0]["test_accuracy"] < 0.3  # untrained
    assert res.final_accuracy > 0.85, res.history


def test_sign_flip_breaks_mean_but_not_median():
    atk = dict(attack="sign_flip", attack_kwargs={"scale": -10.0})
    mean = run(BASE.replace(aggregator="mean", **atk), progress=False)
    med = run(BASE.replace(aggregator="median", **atk), progress=False)
    assert mean.final_accuracy < 0.3, mean.history
    assert med.final_accuracy > 0.8, med.history


def test_alie_hurts_mean_more_than_trimmed_mean_with_strong_z():
    # With worker momentum on digits, ALIE needs a large z to move the mean (z=4 and 10 did not
    # measurably hurt it at n=10, f=3); trimmed mean discards the shifted rows.
    atk = dict(attack="alie", attack_kwargs={"z": 30.0})
    mean = run(BASE.replace(aggregator="mean", **atk), progress=False)
    tm = run(BASE.replace(aggregator="trimmed_mean", **atk), progress=False)
    assert tm.final_accuracy > 0.8
    assert mean.final_accuracy < tm.final_accuracy - 0.2, (mean.history[-1], tm.history[-1])


def test_runs_are_deterministic_and_seed_dependent():
    cfg = BASE.replace(steps=50, eval_every=25, aggregator="krum", attack="alie")
    a = run(cfg, progress=False).history
    b = run(cfg, progress=False).history
    c = run(cfg.replace(seed=1), progress=False).history
    assert a == b
    assert a != c


def test_simulation_reusable_and_metrics_present():
    sim = Simulation(BASE.replace(steps=20, eval_every=10, aggregator="geometric_median",
                                  attack="gaussian", preaggregators=("nnm",)))
    r1 = sim.run(progress=False)
    r2 = sim.run(progress=False)
    assert r1.history == r2.history
    last = r1.history[-1]
    for k in ("test_accuracy", "test_loss", "train_loss", "variance_norm_ratio", "agg_distance", "agg_cosine"):
        assert np.isfinite(last[k]), k
    assert [h["step"] for h in r1.history] == [0, 10, 20]


@pytest.mark.parametrize(
    "changes",
    [
        dict(attack="label_flip", split="dirichlet", dirichlet_alpha=0.5),
        dict(momentum_at="server", momentum_form="sum", nesterov=True, attack="foe"),
        dict(normalize=True, aggregator="centered_clip", attack="nan", clip_per_worker=2.0),
        dict(weight_decay=1e-3, l2_form="norm", lr_schedule="cosine", split="iid", attack="inf",
             aggregator="trimmed_mean"),
    ],
)
def test_pipeline_variants_stay_finite_and_learn(changes):
    cfg = BASE.replace(steps=150, eval_every=75, **changes)
    res = run(cfg, progress=False)
    assert np.isfinite(res.history[-1]["test_loss"])
    assert res.final_accuracy > 0.5, (changes, res.history[-1])


def test_first_k_rounds_latency_clock_and_server_reference():
    cfg = BASE.replace(n_workers=12, f_real=2, steps=20, eval_every=10, attack="alie",
                       latency="shifted_exponential", latency_kwargs={"shift": 1.0, "scale": 2.0})
    full = run(cfg, progress=False).history
    all_k = run(cfg.replace(first_k=12), progress=False).history
    # waiting for all 12 arrivals is the synchronous round: same training, same clock
    for a, b in zip(full, all_k):
        for k in ("test_accuracy", "train_loss", "sim_time"):
            assert abs(a.get(k, 0) - b.get(k, 0)) < 1e-5 * max(1, abs(a.get(k, 0))), (k, a, b)
    fast = run(cfg.replace(first_k=6), progress=False).history
    assert fast[-1]["sim_time"] < 0.8 * full[-1]["sim_time"]
    assert fast[-1]["round_time"] < full[-1]["round_time"]
    assert abs(full[-1]["sim_time"] - full[1]["sim_time"] - 10 * full[-1]["round_time"]) < 1e-3 * full[-1]["sim_time"]
    assert np.isfinite(fast[-1]["test_loss"]) and fast[-1]["test_accuracy"] > 0.5


def test_first_k_config_errors():
    from jbyz.validation import validate

    errs = validate(BASE.replace(first_k=5))
    assert any("latency model" in e for e in errs)
    errs = validate(BASE.replace(first_k=11, latency="gamma"))
    assert any("first_k must be" in e for e in errs)
    errs = validate(BASE.replace(latency="gama"))
    assert any("gamma" in e for e in errs)


def test_cosine_staircase_and_per_epoch_schedules():
    """lr_schedule="cosine" with every=K holds the lr for K steps; every="epoch" is Yang et al.'s
    (lr0/2)(1 + cos(i pi / E)) with an epoch = N / (n_workers * batch_size) steps."""
    import math

    from jbyz.registry import ConfigError
    from jbyz.simulate import get_program

    base = dict(dataset="synthetic_classification", model="logreg", n_workers=4, batch_size=10,
                steps=40, lr=0.5, lr_schedule="cosine")
    plain = get_program(RunConfig(**base)).lr_schedule(0.5)
    stair = get_program(RunConfig(**base, lr_schedule_kwargs={"every": 8})).lr_schedule(0.5)
    for t in range(40):
        assert float(stair(t)) == pytest.approx(float(plain(t // 8 * 8)), rel=1e-6)
    assert float(stair(9)) != pytest.approx(float(plain(9)), rel=1e-3)
    prog = get_program(RunConfig(**base, lr_schedule_kwargs={"every": "epoch"}))
    per_epoch = prog.n_worker_samples / (4 * 10)
    epochs = max(1, round(40 / per_epoch))
    ep = prog.lr_schedule(0.5)
    for t in range(40):
        i = min(math.floor(t / per_epoch), epochs - 1)
        assert float(ep(t)) == pytest.approx(0.25 * (1 + math.cos(math.pi * i / epochs)), rel=1e-6)
    with pytest.raises(ConfigError, match="every"):
        check(RunConfig(**base, lr_schedule_kwargs={"every": 0}))
    with pytest.raises(ConfigError, match="every"):
        check(RunConfig(**{**base, "lr_schedule": "inverse_time"}, lr_schedule_kwargs={"every": "epoch"}))


def test_augment_option_runs_and_keeps_old_run_ids():
    from jbyz.registry import ConfigError

    base = dict(dataset="digits", n_workers=4, f_real=1, attack="alie", steps=20, eval_every=20,
                diagnostics=False)
    cfg = RunConfig(**base)
    # a field added later is left out of the hash at its default: earlier run ids still hold
    import hashlib
    import json

    d = cfg.to_dict()
    from jbyz.config import _HASH_OMIT_AT_DEFAULT

    for k in _HASH_OMIT_AT_DEFAULT:  # augment, curvature_window, ...: all at their defaults here
        del d[k]
    d["attack_kwargs"] = {"z": 1.5}  # ALIE's z enters the id (its default changed in 0.1)
    assert cfg.config_hash() == hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert RunConfig(**base, augment="flip").config_hash() != cfg.config_hash()
    a = run(RunConfig(**base, augment="flip"), progress=False)
    b = run(cfg, progress=False)
    assert np.isfinite(a.final_accuracy) and a.final_accuracy > 0.3
    assert not np.allclose(np.asarray(a.history[-1]["test_loss"]), np.asarray(b.history[-1]["test_loss"]))
    with pytest.raises(ConfigError, match="image"):
        run(RunConfig(**{**base, "dataset": "synthetic_classification", "model": "logreg"}, augment="flip"),
            progress=False)
    with pytest.raises(ConfigError, match="augment"):
        check(RunConfig(**base, augment="mixup"))


def test_composite_curvature_matches_brute_force():
    import jax
    import jax.numpy as jnp

    from jbyz.simulate import curvature_init, curvature_update

    rng = np.random.default_rng(0)
    K, d, T, mu = 4, 7, 11, 0.8
    gs = rng.normal(size=(T, d)).astype(np.float32)
    upd = jax.jit(curvature_update)
    state = curvature_init(K, jnp.zeros(d))
    for t in range(T):
        state, s = upd(state, jnp.asarray(gs[t]), jnp.int32(t), jnp.float32(mu))
        # s_t = mu * sum_{i=0}^{K-1} mu^i <g_t, g_{t-1-i}> over the steps that exist
        want = mu * sum(mu ** i * float(gs[t] @ gs[t - 1 - i]) for i in range(K) if t - 1 - i >= 0)
        np.testing.assert_allclose(float(s), want, rtol=1e-5, atol=1e-5)
    _, s0 = upd(state, jnp.asarray(gs[0]), jnp.int32(T), jnp.float32(0.0))
    assert float(s0) == 0.0


def test_composite_curvature_in_a_run_and_config_checks():
    from jbyz.registry import ConfigError

    base = dict(dataset="digits", n_workers=5, f_real=1, attack="alie", steps=12, eval_every=4,
                momentum=0.9, diagnostics=False)
    cfg = RunConfig(**base, curvature_window=3)
    assert cfg.config_hash() != RunConfig(**base).config_hash()
    hist = run(cfg, progress=False).history
    vals = [h["composite_curvature"] for h in hist[1:]]
    assert all(np.isfinite(v) for v in vals) and any(v != 0 for v in vals), hist
    # without momentum the discount mu is 0, so the curvature is exactly 0
    flat = run(RunConfig(**{**base, "momentum": 0.0}, curvature_window=3), progress=False).history
    assert all(h["composite_curvature"] == 0.0 for h in flat[1:])
    assert "composite_curvature" not in run(RunConfig(**base), progress=False).history[-1]
    # g_bar is the mean of the *clipped* gradients: |s_t| <= mu c^2 sum_i mu^i < c^2 mu / (1 - mu)
    c = 1e-3
    clipped = run(RunConfig(**base, curvature_window=3, clip_per_worker=c), progress=False).history
    assert all(0 < abs(h["composite_curvature"]) <= c * c * 0.9 / 0.1 for h in clipped[1:]), clipped
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="curvature_window"):
            check(RunConfig(**base, curvature_window=bad))


def test_momentum_first_zero_starts_the_worker_ema_from_zero():
    # ByzFL's EMA start: u_0 = 0, so the first step moves (1 - mu) times as far as with the
    # papers' u_1 = g_1 (same batches: same keys). Mean rule, no attack: the step is exact.
    import jax

    from jbyz.registry import ConfigError
    from jbyz.simulate import get_program

    base = dict(dataset="digits", model="logreg", n_workers=4, f_real=0, attack="none",
                aggregator="mean", steps=1, eval_every=1, momentum=0.9, lr=0.5, diagnostics=False)
    moved = {}
    for first in ("gradient", "zero"):
        cfg = check(RunConfig(**base, momentum_first=first))
        prog = get_program(cfg)
        inp = prog.inputs(cfg)
        carry0 = prog.init(inp)
        carry, _ = jax.jit(prog.chunk, static_argnums=(2,))(carry0, 0, 1, inp, prog.train)
        moved[first] = np.asarray(carry.params) - np.asarray(carry0.params)
    assert np.abs(moved["gradient"]).max() > 1e-4
    np.testing.assert_allclose(moved["zero"], 0.1 * moved["gradient"], rtol=1e-4, atol=1e-7)
    assert RunConfig(**base).config_hash() == RunConfig(**base, momentum_first="gradient").config_hash()
    assert RunConfig(**base, momentum_first="zero").config_hash() != RunConfig(**base).config_hash()
    with pytest.raises(ConfigError, match="momentum_first"):
        check(RunConfig(**base, momentum_first="zero", momentum_at="server"))
    with pytest.raises(ConfigError, match="momentum_first"):
        check(RunConfig(**base, momentum_first="one"))


def test_program_flops_count_one_step_not_one_loop_body():
    """XLA's cost analysis counts a loop body once; Program.flops compiles the step alone and
    scales one evaluation chunk, so its counts match the analytic cost of an MLP: ~4.3 x params
    FLOP per training sample per gradient row, ~2 x params per test image."""
    from jbyz.simulate import Program

    cfg = BASE.replace(attack="alie", aggregator="median", steps=4, eval_every=4)
    prog = Program(cfg)
    p = prog.d
    assert prog.grad_rows == cfg.n_workers - cfg.f_real  # ALIE's attackers skip their gradients
    small, big = prog.flops(cfg), Program(cfg.replace(batch_size=64)).flops()
    # the 32 more samples per gradient row cost ~4.3 x params each (forward 2, weight gradients
    # 2, the hidden layer's input gradient 2 x 100 x 10; no gradient for the input layer's
    # inputs); the rest of the step (median, ALIE, momentum) does not grow with the batch
    per_sample = (big["step"] - small["step"]) / (32 * prog.grad_rows)
    assert 4.0 * p < per_sample < 4.6 * p, per_sample / p
    assert small["step"] > 32 * prog.grad_rows * per_sample  # plus the rest of the step
    n_test = prog.test[0].shape[0]
    assert 1.8 * p * n_test < small["eval"] < 2.6 * p * n_test, small["eval"] / (p * n_test)


def test_program_timings_are_per_step_and_per_evaluation():
    """Program.timings (used by the GPU projections) returns positive, finite seconds for a
    step, an evaluation and the chunk's compilation (no comparison of times: they depend on the
    machine's load)."""
    import math

    from jbyz.simulate import Program

    cfg = BASE.replace(steps=8, eval_every=8)
    prog = Program(cfg)
    t = prog.timings(cfg, steps=2)
    assert set(t) == {"step", "eval", "compile"}
    assert all(math.isfinite(v) and v > 0 for v in t.values()), t
