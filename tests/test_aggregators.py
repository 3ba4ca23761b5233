"""Every aggregator and pre-aggregator against an independent brute-force numpy implementation.

The references below are written from the papers' definitions (and, for the ``multikrum``
variants, El Mhamdi et al.'s code) with plain loops, ``itertools.combinations`` and float64, and
share no code with the kernels. Each kernel is
jitted once per configuration and then called for many ``(valid mask, f)`` pairs (both traced).
Invalid rows are filled with garbage (huge values and NaN) to check that they are ignored.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbyz.aggregators import AGGREGATORS
from jbyz.preaggregators import PREAGGREGATORS
from jbyz.registry import ConfigError
from jbyz.types import AggregationRule, PreAggregator

N, D = 11, 4  # the same shapes in all three aggregator test files share compiled programs
KEY = jax.random.key(0)


# ------------------------------------------------------------------------------------------
# Brute-force references (float64, loops)


def _col_sorted(x):
    """Columns sorted, NaN counted as +inf (the documented policy)."""
    x = np.where(np.isnan(x), np.inf, x)
    return np.sort(x, axis=0)


def ref_mean(x, f):
    return x.mean(axis=0)


def ref_median(x, f, even="mean"):
    s = _col_sorted(x)
    n = len(x)
    lo = s[(n - 1) // 2]
    if even == "lower" or n % 2 == 1:
        return lo
    return (lo + s[n // 2]) / 2


def ref_trimmed_mean(x, f, b=None):
    b = f if b is None else b
    s = _col_sorted(x)
    return s[b : len(x) - b].mean(axis=0)


def _closest_mean(x, k, centre):
    x = np.where(np.isnan(x), np.inf, x)
    out = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        col = x[:, c]
        dist = np.abs(col - centre[c])
        idx = np.argsort(dist, kind="stable")[:k]
        out[c] = col[idx].mean()
    return out


def ref_meamed(x, f, even="mean"):
    return _closest_mean(x, len(x) - f, ref_median(x, f, even))


def ref_phocas(x, f):
    return _closest_mean(x, len(x) - f, ref_trimmed_mean(x, f))


def _dist(a, b, distance="squared"):
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    d2 = float(np.sum((a - b) ** 2))
    return d2 if distance == "squared" else math.sqrt(d2)


def ref_krum_scores(x, f, distance="squared", neighbours="paper", pool=None):
    """Krum scores as sort keys ``(score, tie-break, index)``.

    Exact score ties (e.g. both ends of the closest pair when one neighbour counts) are broken by
    the sum of the finite distances to the rest of the pool, then by index (documented in the
    kernels; it keeps the rule permutation invariant).
    """
    pool = list(range(len(x))) if pool is None else pool
    k = max(len(pool) - f - (2 if neighbours == "paper" else 1), 0)
    keys = {}
    for i in pool:
        ds = sorted(_dist(x[i], x[j], distance) for j in pool if j != i)
        tie = sum(d for d in ds if math.isfinite(d))
        score = sum(ds[:k]) if np.all(np.isfinite(x[i])) else math.inf
        keys[i] = (score, tie, i)
    return keys


def ref_krum(x, f, distance="squared", neighbours="paper"):
    s = ref_krum_scores(x, f, distance, neighbours)
    return x[min(s, key=s.get)]


def ref_multi_krum(x, f, m=None, distance="squared", neighbours="paper"):
    m = len(x) - f - 2 if m is None else m
    s = ref_krum_scores(x, f, distance, neighbours)
    chosen = sorted(s, key=s.get)[:m]
    return x[chosen].mean(axis=0)


def ref_bulyan(x, f, variant="classic"):
    n = len(x)
    if variant == "classic":
        remaining, chosen = list(range(n)), []
        for _ in range(n - 2 * f):
            # Krum on the remaining set, with at least one neighbour.
            k = max(len(remaining) - f - 2, 1)
            keys = ref_krum_scores(x, len(remaining) - k - 2, pool=remaining)
            best = min(keys, key=keys.get)
            chosen.append(best)
            remaining.remove(best)
        sel = x[chosen]
        even = "mean"
    else:
        s = ref_krum_scores(x, f, "euclidean", "paper")
        order = sorted(s, key=s.get)
        m_max = n - f - 2
        sel = np.stack([x[order[i:m_max]].mean(axis=0) for i in range(n - 2 * f - 2)])
        even = "lower"
    theta = len(sel)
    return _closest_mean(sel, theta - 2 * f, ref_median(sel, f, even))


def ref_geometric_median(x, f, iters=8, nu=0.1, start="median"):
    ok = np.all(np.isfinite(x), axis=1)
    if start == "median":
        z = ref_median(x, f)
    elif start == "mean":
        z = x[ok].mean(axis=0)
    else:
        z = np.zeros(x.shape[1])
    xs = x[ok]
    for _ in range(iters):
        beta = np.array([(1 / len(x)) / max(nu, np.linalg.norm(z - xi)) for xi in xs])
        z = (beta[:, None] * xs).sum(axis=0) / beta.sum()
    return z


def ref_centered_clip(x, f, tau=0.1, iters=1, v0=None):
    v = np.zeros(x.shape[1]) if v0 is None else np.array(v0, np.float64)
    n = len(x)
    for _ in range(iters):
        step = np.zeros_like(v)
        for xi in x:
            if not np.all(np.isfinite(xi)):
                continue  # unusable row: clipped difference counts as 0
            y = xi - v
            norm = np.linalg.norm(y)
            step += y * (min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + step / n
    return v


def ref_mda(x, f):
    """Exact ties of the diameter go to the subset whose largest index is smallest, then whose
    second largest is, ... (colexicographic order: the kernel's documented tie-break)."""
    n = len(x)
    best, best_key = None, None
    for sub in itertools.combinations(range(n), n - f):
        diam = max((_dist(x[i], x[j]) for i, j in itertools.combinations(sub, 2)), default=0.0)
        key = (diam, sorted(sub, reverse=True))
        if best_key is None or key < best_key:
            best, best_key = sub, key
    return x[list(best)].mean(axis=0)


def ref_nnm(x, f):
    n = len(x)
    out = np.empty_like(x)
    for i in range(n):
        if not np.all(np.isfinite(x[i])):
            out[i] = x[i]
            continue
        ds = [(_dist(x[i], x[j]), j) for j in range(n)]
        near = [j for _, j in sorted(ds)[: n - f]]
        out[i] = x[near].mean(axis=0)
    return out


def ref_clip(x, f, tau=1.0):
    out = x.copy()
    for i in range(len(x)):
        norm = np.linalg.norm(x[i])
        if np.isfinite(norm) and norm > tau:
            out[i] = x[i] * tau / norm
    return out


def ref_arc(x, f):
    n = len(x)
    k = math.floor(2 * (f / n) * (n - f))
    norms = [np.linalg.norm(r) if np.all(np.isfinite(r)) else math.inf for r in x]
    threshold = sorted(norms, reverse=True)[k]
    out = x.copy()
    for i in range(n):
        if np.isfinite(norms[i]) and norms[i] > threshold:
            out[i] = x[i] * threshold / norms[i]
    return out


# ------------------------------------------------------------------------------------------
# Harness


@functools.lru_cache(maxsize=None)
def _jitted(registry: str, name: str, hp: tuple):
    reg = AGGREGATORS if registry == "agg" else PREAGGREGATORS
    obj = reg.build(name, **dict(hp))
    return obj, jax.jit(obj.apply)


def run_agg(name, x, valid, f, state=None, **hp):
    agg, fn = _jitted("agg", name, tuple(sorted(hp.items())))
    if state is None:
        state = agg.init(x.shape[0], x.shape[1])
    out, new_state = fn(jnp.asarray(x), jnp.asarray(valid), jnp.int32(f), KEY, state)
    return np.asarray(out), new_state


def embed(x_valid, rng, n=N, garbage=True):
    """Scatters the rows of ``x_valid`` into random slots of an ``[n, d]`` stack."""
    m, d = x_valid.shape
    slots = np.sort(rng.choice(n, size=m, replace=False))
    x = np.full((n, d), 1e30, np.float32)
    if garbage:
        x[::2] = np.nan
    x[slots] = x_valid
    valid = np.zeros(n, bool)
    valid[slots] = True
    return x, valid


def cases(ok, ms=(11, 10, 8, 7, 5), fs=(0, 1, 2, 3, 4)):
    return [(m, f) for m in ms for f in fs if ok(m, f)]


def normal(rng, m, d=D):
    return rng.normal(size=(m, d)).astype(np.float32)


RULES = [
    # (registry name, hyper-parameters, reference, requirement predicate)
    ("mean", {}, ref_mean, lambda m, f: True),
    ("median", {}, ref_median, lambda m, f: True),
    ("median", {"even": "lower"}, functools.partial(ref_median, even="lower"), lambda m, f: True),
    ("median", {"sort": "bitonic"}, ref_median, lambda m, f: True),
    ("median", {"sort": "sort"}, ref_median, lambda m, f: True),
    ("trimmed_mean", {}, ref_trimmed_mean, lambda m, f: m > 2 * f),
    ("trimmed_mean", {"sort": "bitonic"}, ref_trimmed_mean, lambda m, f: m > 2 * f),
    ("trimmed_mean", {"b": 2}, functools.partial(ref_trimmed_mean, b=2), lambda m, f: m > 4),
    ("meamed", {}, ref_meamed, lambda m, f: m > 2 * f),
    (
        "meamed",
        {"even": "lower"},
        functools.partial(ref_meamed, even="lower"),
        lambda m, f: m > 2 * f,
    ),
    ("phocas", {}, ref_phocas, lambda m, f: m > 2 * f),
    ("krum", {}, ref_krum, lambda m, f: m >= 2 * f + 3),
    (
        "krum",
        {"distance": "euclidean", "neighbours": "code"},
        functools.partial(ref_krum, distance="euclidean", neighbours="code"),
        lambda m, f: m >= 2 * f + 3,
    ),
    ("multi_krum", {}, ref_multi_krum, lambda m, f: m >= 2 * f + 3),
    ("multi_krum", {"m": 3}, functools.partial(ref_multi_krum, m=3), lambda m, f: m >= 2 * f + 3),
    (
        "multi_krum",
        {"distance": "euclidean", "neighbours": "code"},
        functools.partial(ref_multi_krum, distance="euclidean", neighbours="code"),
        lambda m, f: m >= 2 * f + 3,
    ),
    ("bulyan", {}, ref_bulyan, lambda m, f: m >= 4 * f + 3),
    (
        "bulyan",
        {"variant": "multikrum"},
        functools.partial(ref_bulyan, variant="multikrum"),
        lambda m, f: m >= 4 * f + 3,
    ),
    ("geometric_median", {}, ref_geometric_median, lambda m, f: True),
    (
        "geometric_median",
        {"iters": 3, "nu": 1.0, "start": "zero"},
        functools.partial(ref_geometric_median, iters=3, nu=1.0, start="zero"),
        lambda m, f: True,
    ),
    (
        "geometric_median",
        {"iters": 20, "nu": 0.01, "start": "mean"},
        functools.partial(ref_geometric_median, iters=20, nu=0.01, start="mean"),
        lambda m, f: True,
    ),
    # The initial state is zero, as the reference code's centre.
    ("centered_clip", {}, ref_centered_clip, lambda m, f: True),
    (
        "centered_clip",
        {"tau": 1.0, "iters": 3},
        functools.partial(ref_centered_clip, tau=1.0, iters=3),
        lambda m, f: True,
    ),
    ("mda", {}, ref_mda, lambda m, f: m > 2 * f),
]


def _rule_id(rule):
    name, hp = rule[0], rule[1]
    return name + "".join(f"-{k}={v}" for k, v in hp.items())


@pytest.mark.parametrize("rule", RULES, ids=_rule_id)
def test_matches_brute_force(rule):
    name, hp, ref, ok = rule
    rng = np.random.default_rng(zlib.crc32(_rule_id(rule).encode()))  # fixed per rule
    tested = 0
    for m, f in cases(ok):
        xv = normal(rng, m)
        x, valid = embed(xv, rng)
        got, _ = run_agg(name, x, valid, f, **hp)
        want = ref(xv.astype(np.float64), f)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"{name} m={m} f={f}")
        tested += 1
    assert tested >= 3


def test_mda_exact_tie_goes_to_the_colexicographically_first_subset():
    # Integer points: squared distances are exact in float32. With f = 2 the subsets {0, 3, 4}
    # and {1, 2, 3} both have the smallest diameter (squared 13); the documented tie-break takes
    # {1, 2, 3} (largest index 3 < 4), where the lexicographic first would be {0, 3, 4}.
    pts = np.array([[1, 3], [-3, -3], [-1, -2], [-1, 0], [-1, 2]], np.float32)
    xv = np.zeros((5, D), np.float32)
    xv[:, :2] = pts
    d2 = lambda s: max(float(np.sum((xv[i] - xv[j]) ** 2)) for i, j in itertools.combinations(s, 2))
    assert d2((0, 3, 4)) == d2((1, 2, 3)) == 13.0
    assert min(d2(s) for s in itertools.combinations(range(5), 3)) == 13.0
    want = xv[[1, 2, 3]].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(ref_mda(xv.astype(np.float64), 2), want, rtol=0, atol=1e-12)
    assert not np.allclose(want, xv[[0, 3, 4]].mean(axis=0))
    for seed in range(3):  # the same choice whatever the padding slots
        x, valid = embed(xv, np.random.default_rng(seed))
        got, _ = run_agg("mda", x, valid, 2)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"embedding {seed}")


def _tie_tolerant_closest_means(col, k, c):
    """All means of k values of ``col`` that are k closest to ``c`` (ties broken every way)."""
    dist = np.abs(col - c)
    dk = np.sort(dist)[k - 1]
    inner = col[dist < dk]
    boundary = col[dist == dk]
    need = k - len(inner)
    options = set()
    for g in itertools.combinations(range(len(boundary)), need):
        options.add(round((inner.sum() + boundary[list(g)].sum()) / k, 9))
    return options


@pytest.mark.parametrize("name", ["median", "meamed", "phocas", "trimmed_mean"])
def test_coordinatewise_even_and_odd_counts_with_ties(name):
    # Integer-valued data: many ties. Median and trimmed mean are tie-free; for MeaMed/Phocas
    # any way of breaking ties among equidistant values is a correct "n - f closest" set.
    rng = np.random.default_rng(3)
    f = 1
    for m in (4, 5, 6, 9):
        xv = rng.integers(-3, 4, size=(m, D)).astype(np.float32)
        x, valid = embed(xv, rng)
        got, _ = run_agg(name, x, valid, f)
        x64 = xv.astype(np.float64)
        if name in ("median", "trimmed_mean"):
            ref = ref_median if name == "median" else ref_trimmed_mean
            np.testing.assert_allclose(got, ref(x64, f), rtol=1e-6, atol=1e-6)
            continue
        centre = ref_median(x64, f) if name == "meamed" else ref_trimmed_mean(x64, f)
        for c in range(x64.shape[1]):
            options = _tie_tolerant_closest_means(x64[:, c], m - f, centre[c])
            assert any(abs(got[c] - o) < 1e-5 for o in options), (m, c, got[c], options)


@pytest.mark.slow
def test_large_n_code_paths(monkeypatch):
    # Beyond NETWORK_MAX_N worker slots the kernels switch to the bitonic sort (and Bulyan's
    # Multi-Krum variant to a cumulative sum); from TILE_MIN_N slots on, coordinate-wise stages
    # run tile by tile over the columns (the last tile overlapping the previous one). Force both
    # at n = 11, d = 10 with 3-column tiles; unmemoised factories give fresh functions, so no
    # cached trace of the default path is reused.
    from jbyz import _sorting
    from jbyz import aggregators as agg_mod

    monkeypatch.setattr(_sorting, "NETWORK_MAX_N", 4)
    monkeypatch.setattr(_sorting, "column_tile", lambda n, d: 3)
    rng = np.random.default_rng(17)
    for factory, hp, ref, f in [
        (agg_mod.median, {}, ref_median, 2),
        # Multi-Krum Bulyan: cumulative sums, bitonic sort, tiles and the window stage at once.
        (
            agg_mod.bulyan,
            {"variant": "multikrum"},
            functools.partial(ref_bulyan, variant="multikrum"),
            2,
        ),
    ]:
        agg = factory.__wrapped__(**hp)
        xv = normal(rng, 11, d=10)
        x, valid = embed(xv, rng)
        out, _ = jax.jit(agg.apply)(jnp.asarray(x), jnp.asarray(valid), jnp.int32(f), KEY, ())
        want = ref(xv.astype(np.float64), f)
        np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("tile,d", [(4, 10), (4, 40), (3, 200), (2048, 40_000)],
                         ids=["one-matmul", "static-tiles", "grouped-loop", "real-tile"])
def test_gram_by_column_tiles(monkeypatch, tile, d):
    # The three code paths of _sorting.gram (one matmul below GRAM_MIN_TILES * GRAM_TILE
    # columns, unrolled tiles, a fori_loop over groups plus unrolled leftovers) against float64 numpy, with and
    # without a centre; a NaN row stays NaN on the diagonal (the rules' "unusable" test).
    from jbyz import _sorting

    monkeypatch.setattr(_sorting, "GRAM_TILE", tile)
    rng = np.random.default_rng(d)
    x = rng.normal(size=(6, d)).astype(np.float32)
    c = rng.normal(size=d).astype(np.float32)
    for centre in (None, c):
        y = x.astype(np.float64) - (0.0 if centre is None else centre.astype(np.float64))
        got = jax.jit(_sorting.gram)(jnp.asarray(x), None if centre is None else jnp.asarray(centre))
        np.testing.assert_allclose(np.asarray(got), y @ y.T, rtol=2e-5, atol=1e-3 * np.sqrt(d))
    xn = x.copy()
    xn[2, d // 2] = np.nan
    g = np.asarray(_sorting.gram(jnp.asarray(xn)))
    assert np.isnan(g[2, 2]) and np.isfinite(g[0, 0])


@pytest.mark.parametrize("tile", [3, 4])
def test_gram_rules_with_tiles(monkeypatch, tile):
    # Krum, Multi-Krum, GM and CC (3 iterations) through the tiled Gram (static tiles at
    # tile=4 and d=40, the grouped loop at tile=3), against the brute-force references.
    from jbyz import _sorting
    from jbyz import aggregators as agg_mod

    monkeypatch.setattr(_sorting, "GRAM_TILE", tile)
    rng = np.random.default_rng(tile)
    d = 40 if tile == 4 else 220
    for factory, hp, ref, f in [
        (agg_mod.krum, {}, ref_krum, 1),
        (agg_mod.multi_krum, {}, ref_multi_krum, 1),
        (agg_mod.geometric_median, {}, ref_geometric_median, 1),
        (agg_mod.centered_clip, {"tau": 1.0, "iters": 3},
         functools.partial(ref_centered_clip, tau=1.0, iters=3), 1),
    ]:
        agg = factory.__wrapped__(**hp)
        xv = normal(rng, 7, d=d)
        x, valid = embed(xv, rng)
        out, _ = jax.jit(agg.apply)(jnp.asarray(x), jnp.asarray(valid), jnp.int32(f), KEY,
                                    agg.init(x.shape[0], d))
        want = ref(xv.astype(np.float64), f)
        np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5,
                                   err_msg=factory.__name__)


def test_centered_clip_uses_and_returns_state():
    rng = np.random.default_rng(5)
    xv = normal(rng, 9)
    x, valid = embed(xv, rng)
    v0 = rng.normal(size=D).astype(np.float32)
    for hp in ({}, {"tau": 1.0, "iters": 3}):
        got, state = run_agg("centered_clip", x, valid, 2, state=jnp.asarray(v0), **hp)
        want = ref_centered_clip(xv.astype(np.float64), 2, v0=v0, **hp)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        chex.assert_trees_all_close(state, jnp.asarray(got))
    # A fresh state starts from zero (as the reference code); "zero" ignores the state.
    agg = AGGREGATORS.build("centered_clip")
    chex.assert_trees_all_close(agg.init(N, D), jnp.zeros(D))
    got0, _ = run_agg("centered_clip", x, valid, 2, state=jnp.zeros(D))
    gotz, sz = run_agg("centered_clip", x, valid, 2, state=(), start="zero")
    np.testing.assert_allclose(got0, gotz, rtol=1e-6, atol=1e-6)
    assert sz == ()


def test_nonfinite_byzantine_rows_follow_the_policy():
    # Two Byzantine rows: one NaN everywhere, one +inf/-inf. Reference implementations apply the
    # documented policy (NaN = +inf per coordinate; non-finite rows at infinite distance).
    rng = np.random.default_rng(7)
    xv = normal(rng, 11)
    xv[0] = np.nan
    xv[1, ::2], xv[1, 1::2] = np.inf, -np.inf
    x, valid = embed(xv, rng, garbage=False)
    f = 2
    x64 = xv.astype(np.float64)
    for name, hp, ref, _ in RULES:
        if name == "mean":
            continue
        got, _ = run_agg(name, x, valid, f, **hp)
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, ref(x64, f), rtol=2e-5, atol=2e-5, err_msg=name)


# ------------------------------------------------------------------------------------------
# Pre-aggregators


def run_pre(name, x, valid, f, key=KEY, **hp):
    pre, fn = _jitted("pre", name, tuple(sorted(hp.items())))
    out, v, fo, _ = fn(jnp.asarray(x), jnp.asarray(valid), jnp.int32(f), key, pre.init(*x.shape))
    return np.asarray(out), np.asarray(v), int(fo)


PRE_RULES = [
    ("nnm", {}, ref_nnm, lambda m, f: m > f),
    ("clip", {}, ref_clip, lambda m, f: True),
    ("arc", {}, ref_arc, lambda m, f: m >= f),
]


@pytest.mark.parametrize("rule", PRE_RULES, ids=_rule_id)
def test_preaggregator_matches_brute_force(rule):
    name, hp, ref, ok = rule
    rng = np.random.default_rng(11)
    for m, f in cases(ok, fs=(0, 1, 2, 4)):
        xv = normal(rng, m) * rng.uniform(0.2, 3.0, size=(m, 1)).astype(np.float32)
        x, valid = embed(xv, rng)
        out, v, fo = run_pre(name, x, valid, f, **hp)
        np.testing.assert_array_equal(v, valid)
        assert fo == f
        np.testing.assert_allclose(out[valid], ref(xv.astype(np.float64), f), rtol=2e-5, atol=2e-5)


def test_preaggregators_pass_nonfinite_rows_through():
    rng = np.random.default_rng(12)
    xv = normal(rng, 9)
    xv[2] = np.nan
    xv[4, 0] = np.inf
    x, valid = embed(xv, rng, garbage=False)
    for name, hp, ref, _ in PRE_RULES:
        out, _, _ = run_pre(name, x, valid, 2, **hp)
        want = ref(xv.astype(np.float64), 2)
        np.testing.assert_allclose(out[valid], want, rtol=2e-5, atol=2e-5, err_msg=name)


def _bucket_partition(xv, out, s):
    """Finds, for each output row, a group of <= s input rows with that mean; returns the groups."""
    m = len(xv)
    groups = []
    for y in out:
        found = None
        for size in range(1, s + 1):
            for g in itertools.combinations(range(m), size):
                if np.allclose(xv[list(g)].mean(axis=0), y, rtol=1e-5, atol=1e-5):
                    found = g
                    break
            if found:
                break
        assert found is not None, "output row is not the mean of any bucket of inputs"
        groups.append(found)
    return groups


@pytest.mark.parametrize("s", [1, 2, 3])
def test_bucketing_is_a_random_partition_into_buckets(s):
    rng = np.random.default_rng(13)
    outs = []
    for m in (11, 8, 7):
        xv = normal(rng, m)
        x, valid = embed(xv, rng)
        for k in range(3):
            out, v, fo = run_pre("bucketing", x, valid, 2, key=jax.random.key(k), s=s)
            assert out.shape == (-(-N // s), D) and fo == 2
            nvalid = -(-m // s)
            np.testing.assert_array_equal(v, np.arange(len(v)) < nvalid)
            groups = _bucket_partition(xv, out[:nvalid], s)
            members = sorted(i for g in groups for i in g)
            assert members == list(range(m))  # every valid row in exactly one bucket
            assert sum(len(g) < s for g in groups) <= 1  # only the last bucket may be short
            if m == 11:
                outs.append(out)
    if s > 1:  # different keys give different buckets
        assert not all(np.allclose(outs[0], o) for o in outs[1:])


# ------------------------------------------------------------------------------------------
# Registry, requirements, configuration errors


def test_registries_describe_every_rule():
    assert set(AGGREGATORS.names()) >= {
        "mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "bulyan",
        "centered_clip", "meamed", "phocas", "mda",
    }
    assert set(PREAGGREGATORS.names()) >= {"bucketing", "nnm", "clip", "arc"}
    for reg, typ in ((AGGREGATORS, AggregationRule), (PREAGGREGATORS, PreAggregator)):
        for name, desc, ref in reg.describe():
            assert desc and ref, name
            assert isinstance(reg.build(name), typ)
            assert reg.build(name).name == name


def test_requirement_messages():
    krum = AGGREGATORS.build("krum")
    assert krum.requirement(7, 2) is None
    assert krum.requirement(7, 3) == (
        "krum needs n >= 2f + 3 valid inputs; got n=7, f=3 (largest valid f is 2)"
    )
    assert "no f is valid" in krum.requirement(2, 0)
    bul = AGGREGATORS.build("bulyan")
    assert bul.requirement(11, 2) is None
    assert "largest valid f is 1" in bul.requirement(10, 2)
    assert AGGREGATORS.build("trimmed_mean").requirement(5, 3) is not None
    assert AGGREGATORS.build("trimmed_mean", b=2).requirement(5, 3) is None
    assert "largest valid b is 2" in AGGREGATORS.build("trimmed_mean", b=3).requirement(5, 0)
    assert AGGREGATORS.build("multi_krum", m=7).requirement(9, 3) is not None
    assert AGGREGATORS.build("multi_krum", m=6).requirement(9, 3) is None
    assert AGGREGATORS.build("median").requirement(4, 3) is None
    assert "f >= 0" in AGGREGATORS.build("median").requirement(4, -1)


def test_mda_subset_limit():
    agg = AGGREGATORS.build("mda")
    assert agg.requirement(16, 3) is None
    msg = agg.requirement(17, 3)
    assert "n=17" in msg and "max_subsets=65536" in msg and "n <= 16" in msg
    small = AGGREGATORS.build("mda", max_subsets=2**8)
    assert "n <= 8" in small.requirement(9, 1)
    x = jnp.zeros((9, 3))
    with pytest.raises(ConfigError, match="n=9"):
        small(x, jnp.ones(9, bool), 1, KEY)


@pytest.mark.parametrize(
    "name,hp",
    [
        ("median", {"even": "upper"}),
        ("krum", {"distance": "manhattan"}),
        ("krum", {"neighbours": "n-f"}),
        ("bulyan", {"variant": "fast"}),
        ("geometric_median", {"start": "one"}),
        ("geometric_median", {"nu": 0.0}),
        ("centered_clip", {"tau": -1.0}),
        ("centered_clip", {"iters": 0}),
        ("trimmed_mean", {"b": -1}),
        ("multi_krum", {"m": 0}),
        ("median", {"sort": "quick"}),
    ],
)
def test_bad_hyperparameters_raise_config_error(name, hp):
    with pytest.raises(ConfigError):
        AGGREGATORS.build(name, **hp)


def test_bad_preaggregator_hyperparameters():
    with pytest.raises(ConfigError):
        PREAGGREGATORS.build("bucketing", s=0)
    with pytest.raises(ConfigError):
        PREAGGREGATORS.build("clip", tau=0.0)
