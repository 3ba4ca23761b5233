"""dSTAR's filter (jbyz/algorithms/dstar.py) against an independent numpy brute force.

Every ensemble (E1/E2/E3), score (D1/D2), keep rule and normalisation is compared with a float64
numpy implementation written from the reconstruction's definition on random stacks with random first-k masks
(non-arrivals hold garbage), random ``f`` and a server reference. ``f`` and the mask are traced,
so each option set compiles one program.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jbyz.aggregators import AGGREGATORS
from jbyz.algorithms.dstar import dstar, subset_masks
from jbyz.registry import ConfigError

N, D = 11, 4  # the conformance suite's shapes (shared compiles for the defaults)
KEY = jax.random.key(0)
masks_of = jax.jit(subset_masks, static_argnums=2)
E1, E2, E3 = "median_with_reference", "subset_medians", "median"


# ------------------------------------------------------------------------------------------
# numpy brute force (float64)


def np_median(v, even="mean"):
    """Median along axis 0 with NaN as +inf; ``even="lower"`` takes the lower middle."""
    v = np.sort(np.where(np.isnan(v), np.inf, v), axis=0)
    c = v.shape[0]
    lo = v[(c - 1) // 2]
    if even == "lower" or c % 2 == 1:
        return lo
    return 0.5 * (lo + v[c // 2])


def np_dstar(x, valid, f, ref, opts, masks=None):
    x = np.asarray(x, np.float64)
    ref = None if ref is None else np.asarray(ref, np.float64)
    g = x[valid]
    m = g.shape[0]
    ens = opts.get("ensemble", "median_with_reference")
    even = opts.get("even", "mean")
    if ens == "median_with_reference" and ref is not None:
        c = np_median(np.vstack([g, ref[None]]), even)
    elif ens == "subset_medians":
        meds = np.stack([np_median(x[mk], even) for mk in masks])
        c = meds.mean(axis=0) if opts.get("combine", "mean") == "mean" else np_median(meds, even)
    else:
        c = np_median(g, even)
    p = ref if (opts.get("score", "median") == "reference" and ref is not None) else c
    with np.errstate(invalid="ignore", over="ignore"):
        dist = np.sqrt(np.sum((g - p) ** 2, axis=1))
    dist = np.where(np.isfinite(dist), dist, np.inf)
    if opts.get("normalize_score", False):
        dist = dist / np.linalg.norm(p)
    keep = opts.get("keep", "k_minus_f")
    rho = opts.get("rho", 1.5)
    if keep == "k_minus_f":
        order = np.argsort(dist, kind="stable")
        kept = np.zeros(m, bool)
        kept[order[: max(m - f, 0)]] = True
    elif keep == "threshold":
        kept = dist <= rho * np_median(dist, even)
    else:
        kept = dist <= rho
    kept &= np.isfinite(dist)
    return g[kept].mean(axis=0) if kept.any() else c


# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def jitted(with_ref=True, **opts):
    agg = dstar(**opts)
    if with_ref:
        return jax.jit(lambda x, v, f, k, r: agg.apply(x, v, f, k, (), reference=r)[0])
    return jax.jit(lambda x, v, f, k: agg.apply(x, v, f, k, ())[0])


def run(x, valid, f, ref=None, key=KEY, **opts):
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(valid), jnp.int32(f), key)
    if ref is None:
        return np.asarray(jitted(False, **opts)(*args), np.float64)
    return np.asarray(jitted(True, **opts)(*args, jnp.asarray(ref, jnp.float32)), np.float64)


def case(seed, n=N, d=D):
    """A first-k round: ``m`` valid slots at random places (garbage elsewhere), a reference."""
    rng = np.random.default_rng(seed)
    m = int(rng.integers(5, n + 1))
    valid = np.zeros(n, bool)
    valid[rng.choice(n, size=m, replace=False)] = True
    scale = rng.uniform(0.3, 3.0, size=(n, 1))
    x = (rng.normal(size=(n, d)) * scale).astype(np.float32)
    x[~valid] = rng.choice([np.nan, 1e30, -np.inf])
    ref = rng.normal(size=d).astype(np.float32)
    f = int(rng.integers(0, (m - 1) // 2 + 1))
    return x, valid, f, ref


OPTION_SETS = [
    dict(),  # E1, D1, keep k - f
    dict(ensemble=E2, subsets=3),
    dict(ensemble=E3),
    dict(score="reference"),
    # (with D2 the ensemble only matters for the no-row-kept fallback)
    dict(ensemble=E3, keep="threshold", rho=1.2),
    dict(ensemble=E2, subsets=3, score="reference", keep="threshold"),
    dict(keep="threshold"),
    dict(ensemble=E3, keep="absolute"),
    dict(score="reference", keep="absolute"),
    # (normalisation changes nothing with keep "k_minus_f" / "threshold": scale-invariant rules)
    dict(normalize_score=True, keep="absolute", rho=0.8),
    dict(score="reference", normalize_score=True, keep="absolute", rho=0.9),
    dict(keep="threshold", rho=1.0, even="lower"),
    dict(ensemble=E2, combine="median", subsets=3, keep="threshold"),
    dict(ensemble=E2, subset_size=3, subsets=2, keep="absolute"),
]


SEEDS = 6


def _masks(opts, valid, m):
    if opts.get("ensemble") != "subset_medians":
        return None
    s = opts.get("subset_size") or (m + 1) // 2
    return np.asarray(masks_of(KEY, jnp.asarray(valid), opts.get("subsets", 8), jnp.int32(min(s, m))))


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_numpy_brute_force(opts):
    for seed in range(SEEDS):
        x, valid, f, ref = case(seed)
        got = run(x, valid, f, ref, **opts)
        m = int(valid.sum())
        want = np_dstar(x, valid, f, ref, opts, _masks(opts, valid, m))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")


def test_brute_force_can_tell_the_options_apart():
    # Guard against a vacuous comparison: on the cases of test_matches_numpy_brute_force, every
    # two option sets give different outputs for at least one seed, so a kernel that ignored
    # an option would fail there.
    outs = []
    for opts in OPTION_SETS:
        per_seed = []
        for seed in range(SEEDS):
            x, valid, f, ref = case(seed)
            per_seed.append(np_dstar(x, valid, f, ref, opts, _masks(opts, valid, int(valid.sum()))))
        outs.append(np.concatenate(per_seed))
    for (i, a), (j, b) in itertools.combinations(enumerate(outs), 2):
        assert not np.allclose(a, b, rtol=1e-4, atol=1e-4), (OPTION_SETS[i], OPTION_SETS[j])


def test_mask_invariance_and_padding():
    # First-k: the non-arrivals are invalid rows; where they sit and what they hold is ignored,
    # for every ensemble (E2's subsets are indexed by the rank among valid rows).
    rng = np.random.default_rng(3)
    m = 7
    xv = rng.normal(size=(m, D)).astype(np.float32)
    ref = rng.normal(size=D).astype(np.float32)
    # (The brute-force test already places the valid rows at random slots among garbage rows;
    # here E2 at [m, d] against E2 at [N, d]: the random subsets must not depend on padding.)
    for opts in [dict(ensemble=E2, subsets=3)]:
        want = run(xv, np.ones(m, bool), 2, ref, **opts)
        for trial in range(3):
            slots = np.sort(rng.choice(N, size=m, replace=False))
            x = np.full((N, D), [np.nan, 1e30, -np.inf][trial], np.float32)
            x[slots] = xv
            valid = np.zeros(N, bool)
            valid[slots] = True
            np.testing.assert_allclose(run(x, valid, 2, ref, **opts), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "opts",
    [{}, dict(ensemble=E3), dict(ensemble=E2, subsets=3), dict(score="reference"),
     dict(keep="threshold", rho=2.0)],
    ids=["E1", "E3", "E2", "D2", "threshold"],
)
def test_far_byzantine_rows_are_removed(opts):
    rng = np.random.default_rng(5)
    for b in (1, 2, 3):
        honest = rng.normal(size=(N - b, D)).astype(np.float32)
        byz = (100.0 + rng.normal(size=(b, D))).astype(np.float32)
        x = np.vstack([byz, honest])
        ref = honest.mean(axis=0) + 0.1 * rng.normal(size=D).astype(np.float32)
        valid = np.ones(N, bool)
        out = run(x, valid, b, ref, **opts)
        if opts.get("keep") == "threshold":
            # Keeps a subset of the honest rows: inside their box, far from the attackers.
            assert np.all(out >= honest.min(0) - 1e-5) and np.all(out <= honest.max(0) + 1e-5)
        else:
            np.testing.assert_allclose(out, honest.mean(axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["nan", "one_nan", "inf", "huge"])
def test_nonfinite_rows_are_removed(pattern):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(N, D)).astype(np.float32)
    f = 3
    for i in range(f):
        if pattern == "nan":
            x[i] = np.nan
        elif pattern == "one_nan":
            x[i, 1] = np.nan
        elif pattern == "inf":
            x[i] = [np.inf, -np.inf, np.inf, 1.0]
        else:
            x[i] = 3e19  # finite, but the squared distance overflows float32
    ref = rng.normal(size=D).astype(np.float32)
    valid = np.ones(N, bool)
    for opts in [{}, dict(score="reference"), dict(keep="threshold"), dict(ensemble="median")]:
        out = run(x, valid, f, ref, **opts)
        assert np.all(np.isfinite(out)), (pattern, opts)
        if opts.get("keep") != "threshold":
            np.testing.assert_allclose(out, x[f:].mean(axis=0), rtol=1e-5, atol=1e-5)


def test_f_zero_is_the_mean_and_unanimity():
    x, valid, _, ref = case(7)
    np.testing.assert_allclose(run(x, valid, 0, ref), x[valid].astype(np.float64).mean(0),
                               rtol=1e-5, atol=1e-6)
    v = np.arange(D, dtype=np.float32)
    same = np.tile(v, (N, 1))
    for opts in [{}, dict(keep="threshold"), dict(ensemble=E2, subsets=3)]:
        np.testing.assert_allclose(run(same, np.ones(N, bool), 2, ref, **opts), v, atol=1e-6)


def test_missing_reference_fallback_and_error():
    x, valid, f, ref = case(8)
    # Fallback: E1 without a reference is E3; D2 without one is D1.
    np.testing.assert_allclose(run(x, valid, f), run(x, valid, f, ref, ensemble="median"),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(x, valid, f, score="reference", ensemble="median"),
                               run(x, valid, f, ref, ensemble="median"), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="validation"):
        run(x, valid, f, missing_reference="error")
    # E3 + D1 never needs it, even in "error" mode.
    np.testing.assert_allclose(run(x, valid, f, ensemble="median", missing_reference="error"),
                               run(x, valid, f), rtol=1e-6, atol=1e-6)


def test_the_reference_matters_in_e1():
    # E1's median includes the reference: with 2 honest-looking rows and 2 colluders (f = 2 is
    # allowed for E1 at m = 4), a reference near the honest rows tips the median to their side.
    x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], np.float32)
    valid = np.ones(4, bool)
    out = run(x, valid, 2, np.array([0.05, 0.0], np.float32))
    np.testing.assert_allclose(out, [0.05, 0.0], atol=1e-6)
    out = run(x, valid, 2, np.array([5.05, 5.0], np.float32))
    np.testing.assert_allclose(out, [5.05, 5.0], atol=1e-6)


def test_subset_masks():
    valid = jnp.asarray(np.arange(N) % 3 != 0)  # 7 valid rows
    for size in (1, 4, 7):
        masks = np.asarray(masks_of(KEY, valid, 16, jnp.int32(size)))
        assert masks.shape == (16, N)
        assert not masks[:, ~np.asarray(valid)].any()
        np.testing.assert_array_equal(masks.sum(axis=1), size)
    masks = np.asarray(masks_of(KEY, valid, 16, jnp.int32(4)))
    assert len({tuple(r) for r in masks}) > 8  # distinct subsets
    # Uniform membership: each valid row is in a 4-subset with probability 4/7.
    many = np.asarray(masks_of(jax.random.key(1), valid, 800, jnp.int32(4)))
    freq = many[:, np.asarray(valid)].mean(axis=0)
    np.testing.assert_allclose(freq, 4 / 7, atol=0.06)


def test_registry_entry_and_requirements():
    agg = AGGREGATORS.build("dstar")
    assert agg.needs_reference and agg is dstar()
    assert agg.requirement(8, 4) is None and "n >= 2f" in agg.requirement(7, 4)
    assert dstar(ensemble="median").requirement(8, 4) is not None
    assert dstar(ensemble="median").requirement(9, 4) is None
    assert "subset_size" in dstar(ensemble="subset_medians", subset_size=9).requirement(8, 1)
    for bad in [dict(ensemble="mean"), dict(score="x"), dict(keep="top"), dict(rho=0.0),
                dict(subsets=0), dict(combine="max"), dict(missing_reference="ignore")]:
        with pytest.raises(ConfigError):
            dstar(**bad)


def test_vmap_over_rho_and_configs_equals_loop():
    agg = dstar(keep="threshold", rho=jnp.float32(1.0))  # array rho: not memoised

    def fn(x, valid, f, rho, ref):
        return dstar(keep="threshold", rho=rho).apply(x, valid, f, KEY, (), reference=ref)[0]

    cases = [case(20 + i) for i in range(3)]
    xs, vs, fs, refs = (jnp.asarray(np.stack(c)) for c in zip(*cases))
    rhos = jnp.asarray([0.8, 1.2, 2.0])
    batched = np.asarray(jax.jit(jax.vmap(fn))(xs, vs, fs, rhos, refs))
    for i, (x, valid, f, ref) in enumerate(cases):
        want = np_dstar(x, valid, f, ref, dict(keep="threshold", rho=float(rhos[i])))
        np.testing.assert_allclose(batched[i], want, rtol=2e-5, atol=2e-5)
    assert agg.needs_reference


def test_reverse_mode_differentiable():
    x, valid, f, ref = case(9, n=6)
    x = np.where(np.isfinite(x), x, 0.0)
    agg = dstar()
    g = jax.jit(jax.grad(lambda x: jnp.sum(agg.apply(x, jnp.asarray(valid), jnp.int32(f), KEY, (),
                                                     reference=jnp.asarray(ref))[0])))(
        jnp.asarray(x))
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.any(g != 0) and not np.any(g[~valid])


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(5, N), st.data())
def test_property_outliers_never_move_the_output_outside_the_honest_box(m, data):
    # b <= f arbitrary Byzantine rows far from the honest unit box (or non-finite) among the m
    # first arrivals: the default rule's output is the mean of m - f rows, all honest.
    f = data.draw(st.integers(0, m // 2))
    b = data.draw(st.integers(0, f))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(N, D)).astype(np.float32)
    slots = rng.permutation(N)[:m]
    valid = np.zeros(N, bool)
    valid[slots] = True
    x[~valid] = np.nan
    kinds = data.draw(st.lists(st.sampled_from(["far", "nan", "inf"]), min_size=b, max_size=b))
    for i, kind in zip(slots[:b], kinds):
        x[i] = {"far": 50.0 + 1e3 * rng.uniform(size=D), "nan": np.nan, "inf": -np.inf}[kind]
    ref = rng.uniform(-1, 1, size=D).astype(np.float32)
    out = run(x, valid, f, ref)
    honest = x[slots[b:]]
    assert np.all(out >= honest.min(0) - 1e-5) and np.all(out <= honest.max(0) + 1e-5)
    if b == f:  # exactly the f declared Byzantine rows are dropped
        np.testing.assert_allclose(out, honest.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
