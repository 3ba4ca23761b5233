"""The options that follow El Mhamdi, Guerraoui, Rouault's code (ICLR 2021, distributed momentum):
look-ahead Nesterov, PyTorch initialisation, the shared epoch stream, un-normalised IDX data,
test-time flips, eval-mode training forward, the unit-norm clip, the authors' Krum and Bulyan,
and their two variance-norm ratios."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data import write_idx_set

import jbyz.data as D
from jbyz import models, simulate
from jbyz.aggregators import AGGREGATORS, variance_norm_bound
from jbyz.config import RunConfig
from jbyz.validation import validate
from jbyz.registry import ConfigError
from jbyz.transforms import clip_per_worker

# ---------------------------------------------------------------------------------- init


@pytest.mark.parametrize("model,shape,layer,fan_in", [
    ("mlp", (28, 28, 1), "hidden0", 784),
    ("mlp", (28, 28, 1), "out", 100),
    ("dm_cnn", (8, 8, 3), "conv0", 27),
    ("dm_cnn", (8, 8, 3), "fc2", 128),
])
def test_torch_init_is_pytorch_default_uniform(model, shape, layer, fan_in):
    m = models.build_model(model, shape, 10, key=jax.random.key(0), init="torch")
    p = m.params[layer]
    bound = 1 / math.sqrt(fan_in)
    for name in ("kernel", "bias"):
        v = np.asarray(p[name]).ravel()
        assert np.all(np.abs(v) <= bound)
        if v.size >= 1000:  # statistics of U(-b, b): mean 0, std b / sqrt(3)
            assert abs(v.mean()) < 0.05 * bound
            assert v.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert np.count_nonzero(np.asarray(p["bias"])) == p["bias"].size  # biases are not zero
    lecun = models.build_model(model, shape, 10, key=jax.random.key(0))
    assert not np.any(np.asarray(lecun.params[layer]["bias"]))
    if layer == "hidden0":  # LeCun normal is sqrt(3) ~ 1.73x larger than PyTorch's default
        ratio = np.std(lecun.params[layer]["kernel"]) / np.std(p["kernel"])
        assert ratio == pytest.approx(math.sqrt(3), rel=0.03)


def test_unknown_init_is_a_config_error():
    with pytest.raises(ConfigError, match="mlp init must be one of 'lecun', 'torch', got 'xavier'"):
        models.build_model("mlp", (4,), 2, key=0, init="xavier")


# ---------------------------------------------------------------------------------- data


def test_idx_loader_without_normalisation(tmp_path):
    arrays = write_idx_set(tmp_path / "fashion-mnist")
    raw = arrays["train-images-idx3-ubyte"].astype(np.float32)[..., None] / 255
    plain = D.fashion_mnist(data_dir=str(tmp_path), normalize=False)
    np.testing.assert_array_equal(plain.x_train, raw)
    norm = D.fashion_mnist(data_dir=str(tmp_path))
    np.testing.assert_allclose(norm.x_train, (raw - 0.2860) / 0.3530, rtol=1e-6)
    mn = D.mnist(data_dir=str(tmp_path / "fashion-mnist"), normalize=False)
    np.testing.assert_array_equal(mn.x_test, arrays["t10k-images-idx3-ubyte"][..., None] / np.float32(255))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 65, 1437, 60000])
def test_permute_index_is_a_permutation(n):
    idx = np.asarray(D.permute_index(jax.random.key(7), jnp.arange(n), n))
    np.testing.assert_array_equal(np.sort(idx), np.arange(n))
    if n >= 64:  # a shuffle, not the identity, and another key gives another order
        assert np.mean(idx == np.arange(n)) < 0.1
        other = np.asarray(D.permute_index(jax.random.key(8), jnp.arange(n), n))
        assert np.mean(other == idx) < 0.1


def test_epoch_stream_covers_each_example_once_per_epoch():
    n, B = 1000, 83  # 13 batches per epoch, the last with 1000 - 12 * 83 = 4 examples
    key = jax.random.key(3)
    for epoch in range(3):
        got, sizes = [], []
        for b in range(13 * epoch, 13 * (epoch + 1)):
            idx, mask = D.stream_batch(key, b, n, B)
            got.append(np.asarray(idx)[np.asarray(mask)])
            sizes.append(int(np.sum(mask)))
        np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(n))
        assert sizes == [83] * 12 + [4]
    first = [np.asarray(D.stream_batch(key, b, n, B)[0]) for b in (0, 13)]
    assert not np.array_equal(first[0], first[1])  # a new permutation each epoch


def _tiny(**kw):
    base = dict(dataset="digits", model="mlp", model_kwargs={"hidden": [8]}, n_workers=5, f_real=1,
                batch_size=16, steps=4, eval_every=2, lr=0.1, momentum=0.9, momentum_form="sum",
                aggregator="median", attack="alie", attack_kwargs={"z": 1.5}, seed=3)
    return RunConfig(**{**base, **kw})


def test_epoch_stream_through_the_simulator_uses_every_example_once():
    """With h honest workers and N / (h B) steps, the honest batches are exactly one epoch."""
    n_train = 1437  # digits' training split
    cfg = _tiny(sampling="epoch_stream", n_workers=4, f_real=1, batch_size=479, steps=1)
    prog = simulate.Program(cfg)
    inp = jax.tree.map(jnp.asarray, prog.inputs(cfg))
    seen = []
    orig = D.stream_batch

    def spy(key, b, n, bs):
        out = orig(key, b, n, bs)
        seen.append((out, b))
        return out

    D.stream_batch = spy
    try:
        jax.jit(lambda c: prog.step(c, jnp.int32(0), inp, prog.train))(prog.init(inp))
    finally:
        D.stream_batch = orig
    assert seen and 3 * 479 == n_train
    skey = jax.random.fold_in(jax.random.key(cfg.seed), simulate._SALT_STREAM)
    idx = np.concatenate([np.asarray(orig(skey, b, n_train, 479)[0]) for b in range(3)])
    np.testing.assert_array_equal(np.sort(idx), np.arange(n_train))


def test_option_errors_name_what_is_valid():
    errs = validate(_tiny(sampling="epoch_stream", split="iid"))
    assert any("sampling='epoch_stream' (one shuffled stream shared by all workers) needs "
               "split='shared', got split='iid'" in e for e in errs)
    assert validate(_tiny(nesterov_form="lookahead")) == []  # ignored without Nesterov
    errs = validate(_tiny(nesterov_form="lookahead", nesterov=True, momentum_at="none"))
    assert any("nesterov_form='lookahead' with nesterov=true needs momentum > 0 at the workers or "
               "the server (got momentum_at='none', momentum=0.9)" in e for e in errs)
    errs = validate(_tiny(clip_form="unit"))
    assert any("clip_form='unit' needs clip_per_worker" in e for e in errs)
    errs = validate(_tiny(sampling="stream"))
    assert any("sampling='stream' is not valid" in e and "epoch_stream" in e for e in errs)


def test_new_fields_keep_old_run_ids_at_their_defaults():
    cfg = _tiny()
    assert cfg.replace(nesterov_form="pytorch", sampling="replacement", train_forward="train",
                       clip_form="radius", augment_test="none").config_hash() == cfg.config_hash()
    assert cfg.replace(sampling="epoch_stream").config_hash() != cfg.config_hash()


# ---------------------------------------------------------------------------------- Nesterov


def _linear_problem():
    """Full-batch least squares: every worker's batch is the whole data set, so gradients are
    deterministic whatever the sampling order."""
    cfg = RunConfig(dataset="synthetic_regression",
                    dataset_kwargs={"n_samples": 64, "n_test": 16, "dim": 3, "seed": 2},
                    model="logreg", n_workers=3, f_real=0, batch_size=64, steps=2, eval_every=2,
                    lr=0.05, momentum=0.9, momentum_form="sum", aggregator="mean", attack="none",
                    sampling="epoch_stream", nesterov=True, diagnostics=False, seed=0)
    ds = simulate.load_data(cfg)
    x = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float64)
    y = ds.y_train.astype(np.float64)
    m = models.build_model("logreg", ds.input_shape, 1, key=jax.random.key(cfg.seed))
    w0 = np.asarray(m.params["linear"]["kernel"], np.float64)[:, 0]
    b0 = float(np.asarray(m.params["linear"]["bias"])[0])

    def grad(w, b):
        r = x @ w + b - y
        return 2 * x.T @ r / len(y), 2 * r.mean()

    return cfg, w0, b0, grad


@pytest.mark.parametrize("at", ["worker", "server"])
@pytest.mark.parametrize("form", ["lookahead", "pytorch"])
def test_nesterov_two_steps_by_hand(at, form):
    cfg, w, b, grad = _linear_problem()
    lr, mu = cfg.lr, cfg.momentum
    mw, mb = np.zeros_like(w), 0.0
    for _ in range(2):
        if form == "lookahead":  # gradient at theta - lr mu m; step along the new m
            gw, gb = grad(w - lr * mu * mw, b - lr * mu * mb)
            mw, mb = mu * mw + gw, mu * mb + gb
            w, b = w - lr * mw, b - lr * mb
        else:  # gradient at theta; step along g + mu m_new
            gw, gb = grad(w, b)
            mw, mb = mu * mw + gw, mu * mb + gb
            w, b = w - lr * (gw + mu * mw), b - lr * (gb + mu * mb)
    res = simulate.run(cfg.replace(momentum_at=at, nesterov_form=form), progress=False)
    np.testing.assert_allclose(np.asarray(res.params["linear"]["kernel"])[:, 0], w, rtol=2e-5,
                               atol=1e-6)
    np.testing.assert_allclose(float(res.params["linear"]["bias"][0]), b, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- clip


def test_unit_clip_rescales_long_gradients_to_norm_one():
    g = jnp.array([[3.0, 4.0], [0.6, 0.8], [0.0, 1.5]])  # norms 5, 1, 1.5; c = 2
    radius, _ = clip_per_worker(2.0, 3).update(g, ())
    unit, _ = clip_per_worker(2.0, 3, form="unit").update(g, ())
    np.testing.assert_allclose(radius, [[1.2, 1.6], [0.6, 0.8], [0.0, 1.5]], rtol=1e-6)
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.6, 0.8], [0.0, 1.5]], rtol=1e-6)
    with pytest.raises(ValueError, match="form must be 'radius' or 'unit', got 'norm'"):
        clip_per_worker(2.0, 3, form="norm")


# ---------------------------------------------------------------------------------- GARs


def _authors_krum(x, f):
    """The authors' Krum, written from the description of their loop: Euclidean distances, each
    vector scored by its n - f - 1 smallest distances to the others, stable sort by score, the
    mean of the m = n - f - 2 best."""
    n = len(x)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    scores = [(np.sort(np.delete(d[i], i))[: n - f - 1].sum(), i) for i in range(n)]
    scores.sort(key=lambda s: s[0])
    return x[[i for _, i in scores[: n - f - 2]]].mean(0)


def _authors_bulyan(x, f):
    """The authors' Bulyan, written from the description of their loop: scores (n - f - 2
    smallest Euclidean distances, self excluded) computed once; theta = n - 2f - 2 rounds, round
    i averages the min(m, n - f - 2 - i) best remaining and removes the best (the score update
    never runs); then per coordinate the mean of the beta = theta - 2f values closest to the lower
    median of the selection."""
    n = len(x)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    m_max = n - f - 2
    scores = sorted(((np.sort(d[i])[:m_max].sum(), i) for i in range(n)), key=lambda s: s[0])
    theta, m, sel = n - 2 * f - 2, m_max, []
    for i in range(theta):
        m = min(m, m_max - i)
        sel.append(x[[j for _, j in scores[:m]]].mean(0))
        scores = scores[1:]
    sel = np.stack(sel)
    med = np.sort(sel, axis=0)[(theta - 1) // 2]  # torch.median: the lower middle value
    beta = theta - 2 * f
    close = np.argsort(np.abs(sel - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(sel, close, 0).mean(0)


@pytest.mark.parametrize("n,f,seed", [(11, 2, 0), (11, 4, 1), (15, 3, 2), (19, 4, 3)])
def test_authors_krum_and_bulyan_equal_brute_force(n, f, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    x[:f] = rng.normal(3.0, 0.1, size=(f, 6))  # a Byzantine cluster
    valid = jnp.ones(n, bool)
    krum = AGGREGATORS.build("multi_krum", distance="euclidean", neighbours="code")
    out = krum(jnp.asarray(x, jnp.float32), valid, f, jax.random.key(0))[0]
    np.testing.assert_allclose(out, _authors_krum(x, f), rtol=1e-5, atol=1e-6)
    if n >= 4 * f + 3:
        bul = AGGREGATORS.build("bulyan", variant="multikrum")
        out = bul(jnp.asarray(x, jnp.float32), valid, f, jax.random.key(0))[0]
        np.testing.assert_allclose(out, _authors_bulyan(x, f), rtol=1e-5, atol=1e-6)


def test_variance_norm_bounds_of_the_authors_code():
    assert variance_norm_bound("multi_krum", 51, 24) == pytest.approx(0.005661, rel=1e-3)
    assert variance_norm_bound("bulyan", 51, 12) == pytest.approx(0.04259, rel=1e-3)
    assert variance_norm_bound("median", 51, 24) == pytest.approx(1 / math.sqrt(27))
    assert variance_norm_bound("trimmed_mean", 51, 24) is None


# ---------------------------------------------------------------------------------- VNR


def test_variance_norm_ratio_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, size=(9, 20)).astype(np.float32)
    rows = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0], bool)
    h = x[rows].astype(np.float64)
    mean = h.mean(0)
    want = (((h - mean) ** 2).sum() / (len(h) - 1)) / (mean @ mean)
    got = float(simulate.variance_norm_ratio(jnp.asarray(x), jnp.asarray(rows)))
    assert got == pytest.approx(want, rel=1e-5)
    assert math.isnan(float(simulate.variance_norm_ratio(jnp.asarray(x), jnp.arange(9) == 0)))


def test_sampled_and_submitted_ratios_logged_per_step():
    worker = simulate.run(_tiny(momentum_at="worker", clip_per_worker=1.0), progress=False)
    server = simulate.run(_tiny(momentum_at="server", clip_per_worker=1.0), progress=False)
    for res in (worker, server):
        for row in res.history[1:]:  # (the first row is the evaluation before training)
            for k in ("vnr_sampled", "vnr_submitted", "train_loss"):
                steps = row[f"{k}_steps"]
                assert len(steps) == 2 and np.mean(steps) == pytest.approx(row[k], rel=1e-5)
    # at the server the workers submit their clipped gradients: both ratios are the same
    s = server.history[-1]
    assert s["vnr_sampled_steps"] == pytest.approx(s["vnr_submitted_steps"], rel=1e-6)
    # at the workers the momenta are submitted: from step 2 on they average out the noise
    w = worker.history[-1]
    assert all(a < b for a, b in zip(w["vnr_submitted_steps"], w["vnr_sampled_steps"]))


def test_vnr_parts_multiply_back_to_the_ratio():
    """dev_* and norm_* are the ratio's factors: ratio = (dev / norm)^2, for numpy's vectors and
    in every evaluation row of a run (chunk means of one step each: eval_every = 1)."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.2, 1.0, size=(7, 30)).astype(np.float32)
    rows = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    h = x[rows].astype(np.float64)
    parts = simulate.vnr_parts(jnp.asarray(x), jnp.asarray(rows), "sent")
    assert float(parts["norm_sent"]) == pytest.approx(np.linalg.norm(h.mean(0)), rel=1e-5)
    assert float(parts["dev_sent"]) == pytest.approx(
        np.sqrt(((h - h.mean(0)) ** 2).sum() / (len(h) - 1)), rel=1e-5)
    res = simulate.run(_tiny(momentum_at="worker", clip_per_worker=1.0, eval_every=1), progress=False)
    for row in res.history[1:]:
        for k in ("sampled", "submitted"):
            assert row[f"vnr_{k}"] == pytest.approx((row[f"dev_{k}"] / row[f"norm_{k}"]) ** 2, rel=1e-4)
    # momentum at the workers: the submitted mean is longer than the sampled one from step 2 on
    assert all(r["norm_submitted"] > r["norm_sampled"] for r in res.history[2:])


# ---------------------------------------------------------------------------------- forward / test


def test_eval_mode_training_forward_freezes_batchnorm():
    cfg = _tiny(model="dm_cnn", model_kwargs={"hidden": 8}, steps=2, eval_every=2, n_workers=3,
                f_real=0, attack="none", attack_kwargs={}, batch_size=4,
                train_forward="eval")
    res = simulate.Simulation(cfg)
    prog = res.program
    inp = jax.tree.map(jnp.asarray, prog.inputs(cfg))
    c0 = prog.init(inp)
    c1, _ = jax.jit(lambda c: prog.step(c, jnp.int32(0), inp, prog.train))(c0)
    jax.tree.map(np.testing.assert_array_equal, c1.model_state, c0.model_state)
    train_cfg = cfg.replace(train_forward="train")
    p2 = simulate.Program(train_cfg)
    c1t, _ = jax.jit(lambda c: p2.step(c, jnp.int32(0), inp, p2.train))(p2.init(inp))
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         c1t.model_state, c0.model_state)
    assert any(jax.tree.leaves(moved))  # in train mode the running statistics move


def test_test_time_flips_are_fresh_and_seeded():
    a = simulate.run(_tiny(augment_test="flip", steps=4, eval_every=1), progress=False)
    b = simulate.run(_tiny(augment_test="flip", steps=4, eval_every=1), progress=False)
    c = simulate.run(_tiny(steps=4, eval_every=1), progress=False)
    la = [h["test_loss"] for h in a.history]
    assert la == [h["test_loss"] for h in b.history]  # the same seed gives the same flips
    assert la != [h["test_loss"] for h in c.history]
    np.testing.assert_array_equal(jax.tree.leaves(a.params)[0], jax.tree.leaves(c.params)[0])
