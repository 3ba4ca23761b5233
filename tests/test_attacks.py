"""Tests for jbyz.attacks: brute-force numpy references, registry conformance, properties."""

from __future__ import annotations

import doctest
import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jbyz.attacks as A
from jbyz.attacks import ATTACKS
from jbyz.registry import ConfigError
from jbyz.types import Attack

N, D = 7, 5  # small static shapes used almost everywhere (few compilations)
KEY = jax.random.key(42)

PROPS = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------------------------------------
# Helpers and independent numpy references (float64, explicit loops / differences)
# ------------------------------------------------------------------------------------------------


def jit(f):
    """``jax.jit`` at XLA backend optimisation level 0: the same program, compiled ~3x faster.

    The suite tests semantics, and almost all of its time is compilation of tiny programs.
    """
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def masks(n, n_valid, f_real):
    valid = np.arange(n) < n_valid
    byz = (np.arange(n) < f_real) & valid
    honest = valid & ~byz
    return honest, byz


def data(seed, n=N, d=D, scale=1.0, offset=0.5):
    rng = np.random.default_rng(seed)
    return (scale * (rng.normal(size=(n, d)) + offset)).astype(np.float32)


def run(attack, x, honest, byz, key=KEY, state=None):
    if state is None:
        state = attack.init(x.shape[0], x.shape[1])
    out, new_state = attack(jnp.asarray(x), jnp.asarray(honest), jnp.asarray(byz), key, state)
    return np.asarray(out), new_state


def np_stats(x, honest):
    h = x[honest].astype(np.float64)
    mu = h.mean(axis=0)
    sigma = h.std(axis=0, ddof=1) if len(h) > 1 else np.zeros(x.shape[1])
    return mu, sigma


def np_alie_z(n, f):
    s = math.floor(n / 2 + 1) - f
    return statistics.NormalDist().inv_cdf((n - f - s) / (n - f))  # independent of jax's ndtri


def np_replace(x, byz, mal):
    out = x.astype(np.float64).copy()
    for i in range(len(x)):
        if byz[i]:
            out[i] = mal if np.ndim(mal) == 1 else mal[i]
    return out


def np_perturbation(kind, mu, sigma):
    if kind == "std":
        return -sigma
    if kind == "unit":
        return -mu / np.linalg.norm(mu)
    return -np.sign(mu)


def np_minmax_ok(mal, H, objective, slack=0.0):
    """The Shejwalkar constraint with explicit differences (H: honest rows, float64)."""
    if objective == "max":
        bound = max(np.linalg.norm(a - b) for a in H for b in H)
        val = max(np.linalg.norm(mal - h) for h in H)
    else:
        bound = max(sum(np.sum((a - b) ** 2) for b in H) for a in H)
        val = sum(np.sum((mal - h) ** 2) for h in H)
    return val <= bound * (1.0 + slack) + 1e-12, val, bound


def np_min_gamma(H, p, objective, iters=80):
    """Independent search: double an upper bracket until infeasible, then bisect."""
    mu = H.mean(axis=0)
    ok = lambda g: np_minmax_ok(mu + g * p, H, objective)[0]  # noqa: E731
    hi = 1e-3
    for _ in range(200):
        if not ok(hi):
            break
        hi *= 2.0
    else:
        raise AssertionError("no infeasible gamma found")
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def np_mimic_eigen(xs, honests, z0, warmup):
    """The Karimireddy et al. (2022) mimic variant, step by step, with |<x_i, z>| selection."""
    m, z, tgt = None, z0.astype(np.float64), None
    picks, zs, ms = [], [], []
    for t, (x, honest) in enumerate(zip(xs, honests)):
        x = x.astype(np.float64)
        H = [i for i in range(len(x)) if honest[i]]
        if t < warmup:
            avg = x[H].mean(axis=0)
            m = avg if t == 0 else t / (t + 1) * m + avg / (t + 1)
            u = np.zeros_like(z)
            for i in H:
                u += np.dot(x[i] - m, z) * (x[i] - m)
            z = t / (t + 1) * z + u / np.linalg.norm(u) / (t + 1)
            z = z / np.linalg.norm(z)
            tgt = max(H, key=lambda i: abs(np.dot(x[i], z)))
        picks.append(tgt)
        zs.append(z)
        ms.append(m)
    return picks, zs, ms


_shej = {
    (obj, pert): jit(
        lambda x, h, b, obj=obj, pert=pert: (A.min_max if obj == "max" else A.min_sum)(
            perturbation=pert
        )(x, h, b, KEY)[0]
    )
    for obj in ("max", "sum")
    for pert in ("std", "unit", "sign")
}


# ------------------------------------------------------------------------------------------------
# Brute-force comparisons, attack by attack
# ------------------------------------------------------------------------------------------------

CASES = [(7, 2), (7, 0), (6, 3), (5, 1), (4, 2)]  # (n_valid, f_real) inside N = 7 slots


@pytest.mark.parametrize("n_valid,f_real", CASES)
def test_none_and_label_flip_are_identity(n_valid, f_real):
    x = data(1)
    honest, byz = masks(N, n_valid, f_real)
    for name in ("none", "label_flip"):
        out, _ = run(ATTACKS.build(name), x, honest, byz)
        np.testing.assert_array_equal(out, x)
    assert ATTACKS.build("label_flip").flips_labels
    assert not any(ATTACKS.build(n).flips_labels for n in ATTACKS if n != "label_flip")


@pytest.mark.parametrize("n_valid,f_real", CASES)
@pytest.mark.parametrize("scale", [-1.0, -10.0, 3.0])
def test_sign_flip_matches_numpy(n_valid, f_real, scale):
    x = data(2)
    honest, byz = masks(N, n_valid, f_real)
    out, _ = run(A.sign_flip(scale=scale), x, honest, byz)
    ref = np_replace(x, byz, np.stack([scale * x[i].astype(np.float64) for i in range(N)]))
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    out2, _ = run(ATTACKS.build("bit_flip", scale=scale), x, honest, byz)
    np.testing.assert_array_equal(out, out2)


def test_sign_flip_default_scale_is_minus_one():
    assert ATTACKS.entry("sign_flip").hyperparameters() == {"scale": -1.0}


@pytest.mark.parametrize("n_valid,f_real", CASES)
@pytest.mark.parametrize(
    "z,sign", [("baruch", "minus"), (1.5, "minus"), (1.5, "plus"), (-0.4, "minus")]
)
def test_alie_matches_numpy(n_valid, f_real, z, sign):
    x = data(3)
    honest, byz = masks(N, n_valid, f_real)
    out, _ = run(A.alie(z=z, sign=sign), x, honest, byz)
    mu, sigma = np_stats(x, honest)
    zz = np_alie_z(n_valid, f_real) if z == "baruch" else z
    mal = mu - zz * sigma if sign == "minus" else mu + zz * sigma
    np.testing.assert_allclose(out, np_replace(x, byz, mal), rtol=1e-5, atol=1e-5)


def test_alie_z_spec_values_host_and_traced():
    spec = {(8, 3): 0.2533, (20, 5): 0.2533, (25, 5): 0.2533, (25, 11): 1.0676,
            (51, 12): 0.3612, (51, 24): 1.4461, (8, 1): -0.18}
    for (n, f), v in spec.items():
        assert A.alie_z(n, f) == pytest.approx(v, abs=1e-4 if v != -0.18 else 5e-3)
        assert A.alie_z(n, f) == pytest.approx(np_alie_z(n, f), abs=1e-9)
    # In-graph from the masks, padded to 51 slots, one compiled program for every (n, f).
    n_max, d = 51, 3
    x = data(4, n=n_max, d=d)

    @jit
    def traced(n_valid, f_real):
        valid = jnp.arange(n_max) < n_valid
        byz = (jnp.arange(n_max) < f_real) & valid
        return A.alie(z="baruch")(jnp.asarray(x), valid & ~byz, byz, KEY)[0]

    for (n, f), v in spec.items():
        out = np.asarray(traced(n, f))
        mu, sigma = np_stats(x, masks(n_max, n, f)[0])
        z_rec = (mu - out[0]) / sigma
        np.testing.assert_allclose(z_rec, np_alie_z(n, f), rtol=1e-4, atol=1e-4)


def test_docstring_examples():
    """The module example and alie_z's spec values (doctest)."""
    res = doctest.testmod(A, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted >= 10


def test_alie_z_finite_when_byzantine_majority():
    x = data(5)
    honest, byz = masks(N, 7, 5)  # s = 4 - 5 < 0: the raw formula leaves (0, 1)
    out, _ = run(A.alie(z="baruch"), x, honest, byz)
    assert np.isfinite(out).all()
    assert np.isfinite(A.alie_z(7, 5))


@pytest.mark.parametrize("n_valid,f_real", CASES)
@pytest.mark.parametrize("eps", [0.1, 100.0])
def test_foe_matches_numpy(n_valid, f_real, eps):
    x = data(6)
    honest, byz = masks(N, n_valid, f_real)
    out, _ = run(A.foe(eps=eps), x, honest, byz)
    mu, _ = np_stats(x, honest)
    np.testing.assert_allclose(out, np_replace(x, byz, -eps * mu), rtol=1e-5, atol=1e-6)
    out2, _ = run(ATTACKS.build("ipm", eps=eps), x, honest, byz)
    np.testing.assert_array_equal(out, out2)


def test_inf_nan():
    x = data(7)
    honest, byz = masks(N, 6, 2)
    out, _ = run(A.inf(), x, honest, byz)
    assert np.all(np.isposinf(out[byz])) and np.array_equal(out[~byz], x[~byz])
    out, _ = run(A.nan(), x, honest, byz)
    assert np.all(np.isnan(out[byz])) and np.array_equal(out[~byz], x[~byz])


@pytest.mark.parametrize("centered", [False, True])
def test_gaussian_statistics_and_key_derivation(centered):
    n, d, std = 6, 20_000, 3.0
    x = data(8, n=n, d=d)
    honest, byz = masks(n, 6, 3)
    out, _ = run(A.gaussian(std=std, centered=centered), x, honest, byz)
    np.testing.assert_array_equal(out[~byz], x[~byz])
    mu, _ = np_stats(x, honest)
    noise = out[byz].astype(np.float64) - (mu if centered else 0.0)
    for row in noise:
        assert abs(row.std() / std - 1.0) < 0.03
        assert abs(row.mean()) < 5 * std / math.sqrt(d)
    # independent rows
    c = np.corrcoef(noise)
    assert np.all(np.abs(c[~np.eye(len(c), dtype=bool)]) < 0.05)
    # documented derivation: row r uses fold_in(key, r)
    for r in np.flatnonzero(byz):
        ref = std * np.asarray(jax.random.normal(jax.random.fold_in(KEY, r), (d,)))
        np.testing.assert_allclose(noise[list(np.flatnonzero(byz)).index(r)], ref, atol=1e-4)


def test_gaussian_default_variance_is_200():
    assert ATTACKS.entry("gaussian").hyperparameters()["std"] ** 2 == pytest.approx(200.0)


@pytest.mark.parametrize("n_valid,f_real", CASES)
@pytest.mark.parametrize("target", [0, 1, 99])
def test_mimic_first_matches_numpy(n_valid, f_real, target):
    x = data(9)
    honest, byz = masks(N, n_valid, f_real)
    out, _ = run(A.mimic(target=target), x, honest, byz)
    H = np.flatnonzero(honest)
    np.testing.assert_array_equal(out, np_replace(x, byz, x[H[min(target, len(H) - 1)]]))


def test_mimic_first_skips_nonparticipants():
    x = data(10)
    honest = np.array([False, False, False, True, True, False, True])
    byz = np.array([True, True, False, False, False, False, False])  # slot 2 does not take part
    out, _ = run(A.mimic(), x, honest, byz)
    np.testing.assert_array_equal(out[:2], np.stack([x[3], x[3]]))


_EIGEN_N, _EIGEN_D = 8, 6
# one compiled step for every warm-up length (warmup is traced)
_eigen_step = jit(
    lambda x, h, b, st, w: A.mimic(variant="eigen", warmup=w).apply(x, h, b, KEY, st, {})
)


def _eigen_data(seed, steps):
    rng = np.random.default_rng(seed)
    # heterogeneous honest workers: a worker-specific part of growing size plus noise
    base = rng.normal(size=(_EIGEN_N, _EIGEN_D)) * np.linspace(0.2, 3.0, _EIGEN_N)[:, None]
    return [(base + 0.3 * rng.normal(size=base.shape)).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("warmup", [1, 3])
def test_mimic_eigen_matches_numpy(warmup):
    steps = 5
    xs = _eigen_data(11, steps)
    honest, byz = masks(_EIGEN_N, _EIGEN_N, 2)
    state = A.mimic(variant="eigen", warmup=warmup).init(_EIGEN_N, _EIGEN_D)
    z0 = np.asarray(state[2])
    assert np.linalg.norm(z0) == pytest.approx(1.0, abs=1e-6)
    picks, zs, ms = np_mimic_eigen(xs, [honest] * steps, z0, warmup)
    for t in range(steps):
        out, state = _eigen_step(xs[t], honest, byz, state, warmup)
        np.testing.assert_array_equal(np.asarray(out), np_replace(xs[t], byz, xs[t][picks[t]]))
        assert int(state[3]) == picks[t]
        np.testing.assert_allclose(np.asarray(state[1]), ms[t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state[2]), zs[t], rtol=1e-4, atol=1e-5)
    assert int(state[0]) == warmup  # the counter stops after the warm-up


def test_mimic_eigen_falls_back_when_target_absent():
    x = _eigen_data(12, 1)[0]
    honest, byz = masks(_EIGEN_N, _EIGEN_N, 2)
    state = A.mimic(variant="eigen").init(_EIGEN_N, _EIGEN_D)
    _, state = _eigen_step(x, honest, byz, state, 1)
    tgt = int(state[3])
    honest2 = honest.copy()
    honest2[tgt] = False  # the target does not take part in this step
    out, state2 = _eigen_step(x, honest2, byz, state, 1)
    assert int(state2[3]) == tgt  # the target is kept
    z = np.asarray(state2[2], np.float64)
    H = np.flatnonzero(honest2)
    best = H[np.argmax(np.abs(x[H].astype(np.float64) @ z))]
    np.testing.assert_array_equal(np.asarray(out)[byz], np.stack([x[best]] * 2))


@pytest.mark.parametrize("objective", ["max", "sum"])
@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
@pytest.mark.parametrize("n_valid,f_real", [(7, 2), (6, 3), (5, 0), (7, 4)])
def test_min_max_min_sum_match_numpy(objective, perturbation, n_valid, f_real):
    x = data(13, scale=2.0, offset=0.3)
    honest, byz = masks(N, n_valid, f_real)
    out = np.asarray(_shej[(objective, perturbation)](x, honest, byz))
    H = x[honest].astype(np.float64)
    mu, sigma = np_stats(x, honest)
    p = np_perturbation(perturbation, mu, sigma)
    g_ref = np_min_gamma(H, p, objective)
    np.testing.assert_allclose(out, np_replace(x, byz, mu + g_ref * p), rtol=2e-4, atol=2e-4)
    if objective == "sum":  # closed form: gamma* = max_i ||h_i - mu|| / ||p||
        g_cf = max(np.linalg.norm(h - mu) for h in H) / np.linalg.norm(p)
        assert g_ref == pytest.approx(g_cf, rel=1e-6)


def test_min_max_degenerate_inputs_are_finite():
    x = np.tile(data(14)[:1], (N, 1))  # all honest equal: sigma = 0, D = 0
    honest, byz = masks(N, 7, 2)
    for fn in _shej.values():
        np.testing.assert_allclose(np.asarray(fn(x, honest, byz)), x, rtol=1e-6)
    honest, byz = masks(N, 3, 2)  # a single honest worker: gamma = 0, the honest vector itself
    x = data(15)
    for fn in _shej.values():
        np.testing.assert_allclose(np.asarray(fn(x, honest, byz))[:2], x[[2, 2]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Conformance over the whole registry
# ------------------------------------------------------------------------------------------------

# Every registry name with its defaults, plus the static variants.
CONFIGS = [(name, {}) for name in ATTACKS.names()] + [
    ("alie", {"z": 1.5, "sign": "plus"}),
    ("gaussian", {"centered": True}),
    ("mimic", {"variant": "eigen", "warmup": 2}),
    ("min_sum", {"perturbation": "unit"}),
    # jbyz/attacks_extra.py (registered lazily: ATTACKS.names() lists them before the import)
    ("optimal_alie", {"sign": "minus"}),
    ("gradient_ascent", {"shared": False, "objective": "loss", "steps": 2}),
    ("fang_trim", {"shared": True}),
    ("fang_krum", {"center": "mean"}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" if kw else n for n, kw in CONFIGS]

# Numeric hyper-parameters a grid may vmap over, per registry name.
GRID = {
    "sign_flip": {"scale": [-1.0, -10.0, 2.5]},
    "bit_flip": {"scale": [-1.0, -10.0, 2.5]},
    "alie": {"z": [0.25, 1.5, -0.7]},
    "foe": {"eps": [0.1, 1.0, 100.0]},
    "ipm": {"eps": [0.1, 1.0, 100.0]},
    "gaussian": {"std": [1.0, 14.0, 0.5]},
    "mimic": {"target": [0, 1, 3]},
    "optimal_alie": {"delta": [10.0, 3.0, 25.0], "ratio": [0.8, 0.6, 0.95]},
    "optimal_ipm": {"delta": [10.0, 3.0, 25.0], "ratio": [0.8, 0.6, 0.95]},
    "gradient_ascent": {"budget": [10.0, 2.0, 0.5], "lr": [0.5, 0.2, 1.0]},
    "fang_trim": {"b": [2.0, 1.5, 4.0]},
    "fang_krum": {"threshold": [1e-5, 1e-2, 1.0]},
    "clipped_clustering_attack": {"scale": [10.0, 1.0, 3.0]},
}


def _steps_run(name, kw, xs, valid, f_real, key, nums):
    """``T = xs.shape[0]`` consecutive steps of an attack, threading its state.

    Everything but ``name``/``kw`` (static options) may be traced, including the numeric
    hyper-parameters ``nums``. Returns the stacked outputs ``[T, n, d]`` and the final state.
    """
    att = ATTACKS.build(name, **kw, **nums)
    n, d = xs.shape[1:]
    byz = valid & (jnp.arange(n) < f_real)
    honest = valid & ~byz
    state = att.init(n, d)
    outs = []
    for t in range(xs.shape[0]):
        out, state = att.apply(xs[t], honest, byz, jax.random.fold_in(key, t), state, {})
        outs.append(out)
    return jnp.stack(outs), state


# Relative tolerance of jit = eager and vmap = loop, per registry name (default 1e-5). The gradient
# attack takes 10 normalised gradient steps (g / ||g||): float32 rounding that differs between
# eager and compiled execution moves its iterate by about 1e-5 relative (measured 1.1e-5).
RTOL = {"gradient_ascent": 1e-4}


def _close(a, b, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-6)


def _sig(state):
    return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), state)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_conformance(name, kw):
    """Honest rows unchanged, state as a scan carry, jit = eager, padding, vmap = loop."""
    entry = ATTACKS.entry(name)
    assert entry.description and entry.reference
    close = functools.partial(_close, rtol=RTOL.get(name, 1e-5))
    assert isinstance(ATTACKS.build(name, **kw), Attack)
    canonical = entry.factory.__name__
    if not kw and canonical != name:
        # An alias of an entry checked under its own name: the same factory (and output).
        assert ATTACKS.entry(canonical).factory is entry.factory
        x, (honest, byz) = data(3), masks(N, 6, 2)
        ref, _ = run(ATTACKS.build(canonical), x, honest, byz)
        np.testing.assert_array_equal(run(ATTACKS.build(name), x, honest, byz)[0], ref)
        return
    grid = dict(GRID.get(name, {}))
    if name == "mimic" and kw.get("variant") == "eigen":
        grid = {"warmup": [2, 0, 1]}
        kw = {k: v for k, v in kw.items() if k != "warmup"}
    grid = {k: v for k, v in grid.items() if k not in kw}
    f_reals = [2, 0, 3]
    keys = [KEY, jax.random.key(1), jax.random.key(2)]
    nums = [{k: jnp.asarray(v[b], jnp.asarray(v).dtype) for k, v in grid.items()} for b in range(3)]

    att = ATTACKS.build(name, **kw, **nums[0])
    state = att.init(N, D)
    steps_t = 2 if jax.tree.leaves(state) else 1  # stateful attacks: check the state threading
    xs = jnp.asarray(np.stack([data(20 + t) for t in range(steps_t)]))
    valid = jnp.arange(N) < 6
    nb = ~((np.arange(N) < f_reals[0]) & np.asarray(valid))

    # Eager: honest (and non-participating) rows come back unchanged and the state keeps its
    # structure, shapes and dtypes (it is a scan carry).
    byz = valid & (jnp.arange(N) < f_reals[0])
    outs, states = [], [state]
    for t in range(steps_t):
        out, state = att(xs[t], valid & ~byz, byz, jax.random.fold_in(KEY, t), state)
        np.testing.assert_array_equal(np.asarray(out)[nb], np.asarray(xs[t])[nb])
        assert out.shape == xs[t].shape and out.dtype == xs[t].dtype
        outs.append(out)
        states.append(state)
    assert all(_sig(s) == _sig(states[0]) for s in states)

    # jit equals eager, and is deterministic.
    steps = jit(lambda xs, valid, f, key, nums: _steps_run(name, kw, xs, valid, f, key, nums))
    jitted, st_j = steps(xs, valid, f_reals[0], KEY, nums[0])
    close(jitted, jnp.stack(outs))
    jax.tree.map(close, state, st_j)
    again, _ = steps(xs, valid, f_reals[0], KEY, nums[0])
    np.testing.assert_array_equal(np.asarray(again), np.asarray(jitted))

    # vmap over a batch of configurations (f_real, key, numeric hyper-parameters) equals a
    # Python loop, and padding invariance: the batched program runs on a stack padded with
    # invalid rows (garbage, NaN/Inf included) that must change no real row.
    loop = np.stack([steps(xs, valid, f_reals[b], keys[b], nums[b])[0] for b in range(3)])
    pad = data(99, n=3) * 1e3
    pad[1, 2] = np.nan
    pad[2, 0] = np.inf
    xs_pad = jnp.concatenate([xs, jnp.broadcast_to(jnp.asarray(pad), (steps_t, 3, D))], axis=1)
    valid_pad = jnp.arange(N + 3) < 6
    batched = jit(
        jax.vmap(lambda f, k, nm: _steps_run(name, kw, xs_pad, valid_pad, f, k, nm)[0])
    )(jnp.asarray(f_reals), jnp.stack(keys), jax.tree.map(lambda *a: jnp.stack(a), *nums))
    close(np.asarray(batched)[:, :, :N], loop)
    if name not in ("none", "label_flip"):  # the configurations really differ
        assert not np.allclose(loop[0], loop[2], equal_nan=True)


def test_registry_errors_and_aliases():
    assert {"none", "sign_flip", "bit_flip", "label_flip", "gaussian", "alie", "foe", "ipm",
            "mimic", "inf", "nan", "min_max", "min_sum"} <= set(ATTACKS.names())
    with pytest.raises(ConfigError, match="Valid"):
        ATTACKS.build("alie", zz=1.0)
    with pytest.raises(ConfigError, match="Did you mean"):
        ATTACKS.build("alei")
    with pytest.raises(ConfigError):
        A.alie(sign="up")
    with pytest.raises(ConfigError):
        A.mimic(variant="last")
    with pytest.raises(ConfigError):
        A.min_sum(perturbation="gauss")


# ------------------------------------------------------------------------------------------------
# Hypothesis properties (fixed shapes: one compilation per jitted function)
# ------------------------------------------------------------------------------------------------

_alie_minus = jit(lambda x, h, b, z: A.alie(z=z)(x, h, b, KEY)[0])
_alie_plus = jit(lambda x, h, b, z: A.alie(z=z, sign="plus")(x, h, b, KEY)[0])
_foe = jit(lambda x, h, b, e: A.foe(eps=e)(x, h, b, KEY)[0])
_flip = jit(lambda x, h, b: A.sign_flip()(x, h, b, KEY)[0])


@st.composite
def stacks(draw, min_honest=1):
    seed = draw(st.integers(0, 2**31 - 1))
    n_valid = draw(st.integers(min_honest + 1, N))
    f_real = draw(st.integers(1, n_valid - min_honest))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    offset = draw(st.floats(-2.0, 2.0))
    x = data(seed, scale=scale, offset=offset)
    honest, byz = masks(N, n_valid, f_real)
    return x, honest, byz


@PROPS
@given(stacks(min_honest=2), st.floats(-4.0, 4.0), st.booleans())
def test_prop_alie_within_band(xhb, z, plus):
    x, honest, byz = xhb
    out = np.asarray((_alie_plus if plus else _alie_minus)(x, honest, byz, np.float32(z)))
    mu, sigma = np_stats(x, honest)
    band = abs(z) * sigma + 1e-5 * (1.0 + np.abs(mu) + abs(z) * sigma)
    assert np.all(np.abs(out[byz] - mu) <= band)
    assert np.all((out[byz] == out[byz][0]))  # all Byzantine rows identical
    np.testing.assert_array_equal(out[~byz], x[~byz])


@PROPS
@given(
    stacks(min_honest=2), st.sampled_from(["max", "sum"]), st.sampled_from(["std", "unit", "sign"])
)
def test_prop_min_max_constraint_and_tight(xhb, objective, perturbation):
    x, honest, byz = xhb
    out = np.asarray(_shej[(objective, perturbation)](x, honest, byz))
    H = x[honest].astype(np.float64)
    mu, sigma = np_stats(x, honest)
    mal = out[byz][0].astype(np.float64)
    assert np.all(out[byz] == out[byz][0])
    ok, val, bound = np_minmax_ok(mal, H, objective, slack=1e-4)
    assert ok, (val, bound)
    p = np_perturbation(perturbation, mu, sigma)
    if np.linalg.norm(p) > 0 and bound > 0:
        gamma = np.dot(mal - mu, p) / np.dot(p, p)
        assert gamma > 0
        # our bracket (4 D/||p|| or 2 sqrt(bound/(n_h ||p||^2))) is never reached: always tight
        assert not np_minmax_ok(mu + 1.05 * gamma * p, H, objective)[0]


@PROPS
@given(stacks(), st.floats(0.0, 200.0))
def test_prop_foe_opposes_mean(xhb, eps):
    x, honest, byz = xhb
    out = np.asarray(_foe(x, honest, byz, np.float32(eps)))
    mu, _ = np_stats(x, honest)
    for row in out[byz]:
        assert np.dot(row.astype(np.float64), mu) <= 1e-6 * (1.0 + eps * np.dot(mu, mu))


@PROPS
@given(stacks())
def test_prop_sign_flip_cancels(xhb):
    x, honest, byz = xhb
    out = np.asarray(_flip(x, honest, byz))
    np.testing.assert_array_equal(out[byz] + x[byz], np.zeros_like(x[byz]))
    np.testing.assert_array_equal(out[~byz], x[~byz])
