"""Byz-VR-MARINA-PP against an independent numpy loop fed with the same random draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbyz.aggregators import AGGREGATORS
from jbyz.algorithms import marina as M
from jbyz.attacks import ATTACKS
from jbyz.compression import randk
from jbyz.registry import ConfigError

N, MS, D, B, BBIG = 6, 5, 3, 2, 3  # clients, samples per client, dimension, b, b'


def _problem():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N * MS, D)).astype(np.float32)
    y = (a @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=N * MS) * 0.3).astype(np.float32)
    y += np.repeat(np.arange(N), MS).astype(np.float32) * 0.2  # heterogeneous clients
    idx = np.arange(N * MS, dtype=np.int32).reshape(N, MS)
    return a, y, idx


def _loss(w, xb, yb):
    return 0.5 * jnp.mean(jnp.square(xb @ w - yb))


def _np_grad(w, a, y):
    return a.T @ (a @ w - y) / len(y)


def _reference(cfg, params, key, a, y, idx, k_randk=None):
    """Algorithm 1 of Malinovsky et al. in numpy (float64), with the draws of ``round_keys``."""
    a = a.astype(np.float64)
    y = y.astype(np.float64)
    lr, p, alpha, f_real = params.lr, params.p, params.alpha, params.f_real
    c, ch = cfg.sizes
    mult = 2.0

    def local(i, w, pos=None):
        rows = idx[i] if pos is None else idx[i][pos]
        return _np_grad(w, a[rows], y[rows])

    def draw(k, i, size):
        return np.asarray(jax.random.randint(jax.random.fold_in(k, i), (size,), 0, MS))

    def full_msgs(w, clients, kgrad):
        if cfg.full_gradients:
            return np.stack([local(i, w) for i in clients])
        return np.stack([local(i, w, draw(kgrad, i, BBIG)) for i in clients])

    def attack(msgs, clients, w, x0, ref):
        byz = clients < f_real
        if not byz.any():
            return msgs
        if byz.sum() > (~byz).sum():
            mal = mult / lr * (w - x0) - ref
        else:
            mal = msgs[~byz].mean(0)
        out = msgs.copy()
        out[byz] = mal
        return out

    def agg(v):
        return np.median(v, axis=0) if cfg.aggregator.name == "median" else v.mean(0)

    x0 = np.zeros(D)
    rk = M.round_keys(key, M.INIT_ROUND)
    allc = np.arange(N)
    g = agg(attack(full_msgs(x0, allc, rk.grad), allc, x0, x0, 0.0))
    x = x0
    xs, gs, fulls, majs = [], [], [], []
    for k in range(cfg.num_steps):
        rk = M.round_keys(key, k)
        full = bool(jax.random.bernoulli(rk.coin, p)) and not cfg.force_p_zero
        x_new = x - lr * g
        lam = alpha * (np.linalg.norm(x_new - x) if cfg.threshold == "step" else np.linalg.norm(g))
        perm = np.argsort(np.asarray(jax.random.uniform(rk.sample, (N,))), kind="stable")
        if full:
            clients = perm[:ch]
            msgs = attack(full_msgs(x_new, clients, rk.grad), clients, x_new, x0, 0.0)
            g_new = agg(msgs)
        else:
            clients = perm[:c]
            delta = np.stack([
                local(i, x_new, draw(rk.grad, i, B)) - local(i, x, draw(rk.grad, i, B))
                for i in clients
            ])
            if k_randk is not None:
                for s in range(len(clients)):
                    u = np.asarray(jax.random.uniform(jax.random.fold_in(rk.compress, s), (D,)))
                    keep = np.zeros(D, bool)
                    keep[np.argsort(-u, kind="stable")[:k_randk]] = True
                    delta[s] = np.where(keep, delta[s] * D / k_randk, 0.0)
            msgs = attack(delta, clients, x_new, x0, g)
            if cfg.clips:
                norms = np.linalg.norm(msgs, axis=1)
                msgs = msgs * np.minimum(1.0, lam / np.where(norms > 0, norms, 1.0))[:, None]
            g_new = g + (msgs.mean(0) if cfg.variant == "pp_plus" else agg(msgs))
        majs.append(2 * (clients < f_real).sum() > len(clients))
        fulls.append(full)
        x, g = x_new, g_new
        xs.append(x)
        gs.append(g)
    return np.array(xs), np.array(gs), np.array(fulls), np.array(majs)


CASES = {
    "pp_median_randk": dict(cfg=dict(clients_per_round=2, clients_full_round=4), agg="median",
                            k_randk=2, p=0.3, alpha=1.0),
    "pp_plus_mean_big_batch": dict(cfg=dict(clients_per_round=3, clients_full_round=5,
                                            variant="pp_plus", full_gradients=False),
                                   agg="mean", k_randk=None, p=0.3, alpha=0.5),
    "quirks_noclip_median": dict(cfg=dict(clients_per_round=2, threshold="aggregate",
                                          force_p_zero=True, clip=True),
                                 agg="median", k_randk=None, p=0.5, alpha=0.05),
    "marina_mean": dict(cfg=dict(variant="marina"), agg="mean", k_randk=None, p=0.2, alpha=1.0),
}


@pytest.mark.parametrize(
    "case",
    [c if c in ("pp_median_randk", "quirks_noclip_median") else pytest.param(c, marks=pytest.mark.slow)
     for c in CASES],
)
def test_matches_numpy_reference(case):
    spec = CASES[case]
    a, y, idx = _problem()
    oracle = M.finite_sum_oracle(_loss, a, y, idx, B, big_batch_size=BBIG, num_classes=1)
    comp = randk(k=spec["k_randk"]) if spec["k_randk"] else M.identity()
    cfg = M.MarinaConfig(num_clients=N, num_steps=25, aggregator=AGGREGATORS.build(spec["agg"]),
                         attack=M.shift_back(2.0), compressor=comp, **spec["cfg"])
    params = M.MarinaParams(lr=0.1, p=spec["p"], alpha=spec["alpha"], f_real=2, f=0)
    key = jax.random.key(3)
    run = jax.jit(M.build_run(cfg, oracle, lambda x: {"x": x}))
    state, tr = run(jnp.zeros(D), params, key)
    xs, gs, fulls, majs = _reference(cfg, params, key, a, y, idx, spec["k_randk"])
    np.testing.assert_array_equal(np.asarray(tr["full"]), fulls)
    np.testing.assert_array_equal(np.asarray(tr["byz_majority"]), majs)
    scale = 1.0 + np.abs(xs).max()
    np.testing.assert_allclose(np.asarray(tr["x"]), xs, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(state.g), gs[-1], rtol=1e-4,
                               atol=1e-4 * (1 + np.abs(gs).max()))
    if cfg.force_p_zero:
        assert not fulls.any()
    elif cfg.variant != "marina":
        assert fulls.any() and not fulls.all()


def test_sampling_byzantine_majority_rounds():
    """C of n clients without replacement: hypergeometric Byzantine counts, majority rounds occur."""
    n, f, c, reps = 20, 5, 4, 20000
    keys = jax.random.split(jax.random.key(0), reps)
    s = np.asarray(jax.vmap(lambda k: M.sample_clients(k, n, c))(keys))
    assert all(len(set(r)) == c for r in s[:500])
    incl = np.bincount(s.ravel(), minlength=n) / reps
    assert np.all(np.abs(incl - c / n) < 5 * np.sqrt(c / n * (1 - c / n) / reps))
    nb = (s < f).sum(1)
    pmf = [math.comb(f, j) * math.comb(n - f, c - j) / math.comb(n, c) for j in range(c + 1)]
    for j in range(c + 1):
        assert abs((nb == j).mean() - pmf[j]) < 5 * np.sqrt(pmf[j] * (1 - pmf[j]) / reps) + 1e-4
    p_major = pmf[3] + pmf[4]  # 155 / 4845
    assert abs((2 * nb > c).mean() - p_major) < 5 * np.sqrt(p_major / reps)


def test_shift_back_attack():
    att = M.shift_back(2.0)
    x = jnp.array([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    ctx = {"params": jnp.array([2.0, 0.0]), "x0": jnp.array([1.0, 1.0]), "lr": 0.5,
           "reference": jnp.array([1.0, 0.0])}
    byz = jnp.array([True, True, False])
    out, _ = att(x, ~byz, byz, jax.random.key(0), ctx=ctx)  # majority: 4 (x - x0) - ref
    np.testing.assert_allclose(out, [[3.0, -4.0], [3.0, -4.0], [5.0, 5.0]])
    byz = jnp.array([True, False, False])
    out, _ = att(x, ~byz, byz, jax.random.key(0), ctx=ctx)  # minority: mean of honest rows
    np.testing.assert_allclose(out, [[4.0, 4.0], [3.0, 3.0], [5.0, 5.0]])
    with pytest.raises(ConfigError):
        att(x, ~byz, byz, jax.random.key(0), ctx={})


def _logreg_setup(steps):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 4)).astype(np.float32)
    y = (a @ np.array([1.0, -1.0, 2.0, 0.0]) + 0.5 * rng.normal(size=40) > 0).astype(np.int32)
    idx = np.tile(np.arange(40, dtype=np.int32), (10, 1))  # every client holds the full data

    def loss(w, xb, yb):
        s = 2.0 * yb - 1.0
        return jnp.mean(jnp.logaddexp(0.0, -s * (xb @ w))) + 0.05 * jnp.sum(w * w)

    oracle = M.finite_sum_oracle(loss, a, y, idx, 8)
    aj, yj = jnp.asarray(a), jnp.asarray(y)
    return oracle, (lambda w: {"loss": loss(w, aj, yj)}), steps


@pytest.mark.slow
def test_clipping_survives_shift_back_and_no_clipping_does_not():
    """10 clients (3 Byzantine), 3 sampled per round: the paper's §5 claim on a small problem."""
    oracle, metric, steps = _logreg_setup(300)
    runs = {}
    for clip in (True, False):
        cfg = M.MarinaConfig(num_clients=10, num_steps=steps, aggregator=AGGREGATORS.build("median"),
                             attack=M.shift_back(), clients_per_round=3, clip=clip)
        runs[clip] = jax.jit(M.build_run(cfg, oracle, metric))
    key = jax.random.key(0)
    _, ref = runs[True](jnp.zeros(4), M.MarinaParams(0.5, 0.2, 1.0, 0, 0), key)  # no Byzantines
    _, tr = runs[True](jnp.zeros(4), M.MarinaParams(0.5, 0.2, 1.0, 3, 0), key)
    _, bad = runs[False](jnp.zeros(4), M.MarinaParams(0.5, 0.2, 1.0, 3, 0), key)
    best, init = float(ref["loss"][-1]), float(ref["init"]["loss"])
    assert not np.asarray(ref["byz_majority"]).any()
    assert np.asarray(tr["byz_majority"]).sum() >= 3  # attack rounds happened
    assert float(tr["loss"][-1]) - best < 1e-3 * (init - best)
    tail = np.asarray(bad["loss"][-50:])
    assert not np.all(np.isfinite(tail)) or np.median(tail) - best > 0.3 * (init - best)


def test_label_flip_uses_flipped_labels_for_byzantine_clients():
    a, y, idx = _problem()
    yb = (y > np.median(y)).astype(np.int32)

    def loss(w, xb, ybb):
        return jnp.mean(jnp.square(xb @ w - ybb))

    oracle = M.finite_sum_oracle(loss, a, yb, idx, B, num_classes=2)
    x = jnp.ones(D)
    g_honest = oracle.full_grad(x, jnp.int32(1), jnp.bool_(False))
    g_flip = oracle.full_grad(x, jnp.int32(1), jnp.bool_(True))
    ref = 2 * a[idx[1]].T @ (a[idx[1]] @ np.ones(D) - (1 - yb[idx[1]])) / MS
    np.testing.assert_allclose(g_flip, ref, rtol=1e-5)
    assert not np.allclose(g_honest, g_flip)
    cfg = M.MarinaConfig(num_clients=N, num_steps=3, aggregator=AGGREGATORS.build("mean"),
                         attack=ATTACKS.build("label_flip"), clients_per_round=2)
    state, _ = jax.jit(M.build_run(cfg, oracle))(jnp.zeros(D), M.MarinaParams(0.1, 0.5, 1.0, 2, 0),
                                                 jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(state.x)))


def test_config_validation():
    agg = AGGREGATORS.build("mean")
    with pytest.raises(ConfigError):
        M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, variant="nope")
    with pytest.raises(ConfigError):
        M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, clients_per_round=6)
    with pytest.raises(ConfigError):
        M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, threshold="x")
    cfg = M.MarinaConfig(num_clients=5, num_steps=1, aggregator=agg, variant="marina",
                         clients_per_round=2)
    assert cfg.sizes == (5, 5) and not cfg.clips
