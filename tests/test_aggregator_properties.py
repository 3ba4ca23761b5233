"""Property tests (hypothesis): the guarantees each rule claims, on random inputs and attacks.

Honest rows lie in the unit box ``[-1, 1]^d``; Byzantine rows (the first ``b <= f`` valid slots)
are either *arbitrary* (huge, +/-inf, NaN) or *far outliers* (a cluster at distance ``>= 50``).
One compiled program per rule serves every example (``f``, the valid mask and, where used, the
hyper-parameters are traced). Hypothesis runs derandomised, so the tests are deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jbyz.aggregators import AGGREGATORS
from jbyz.preaggregators import PREAGGREGATORS

N, D = 11, 4  # the same shapes as the other aggregator test files (shared compiles)
KEY = jax.random.key(0)
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def jitted(name, **hp):
    # Factories are memoised, so these jits share compiled programs with the other test files.
    agg = AGGREGATORS.build(name, **hp)
    return agg, jax.jit(agg.apply)


@functools.lru_cache(maxsize=None)
def cc_with_traced_tau(iters):
    def fn(x, valid, f, state, tau):
        agg = AGGREGATORS.build("centered_clip", tau=tau, iters=iters)
        return agg.apply(x, valid, f, KEY, state)

    return jax.jit(fn)


def run(name, x, valid, f, state=None, **hp):
    agg, fn = jitted(name, **hp)
    state = agg.init(N, D) if state is None else state
    out, new_state = fn(jnp.asarray(x, jnp.float32), jnp.asarray(valid), jnp.int32(f), KEY, state)
    return np.asarray(out, np.float64), new_state


@st.composite
def scenario(draw, need, far=False, arbitrary=False):
    """``(x [N, D], valid [N], f, byz [N])``: ``need(m, f)`` holds, ``b <= f`` Byzantine rows."""
    m = draw(st.integers(3, N))
    fs = [f for f in range(m) if need(m, f)]
    f = draw(st.sampled_from(fs or [0]))
    if not need(m, f):
        m, f = N, 0
    b = draw(st.integers(0, f))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = np.full((N, D), np.nan, np.float32)  # invalid slots hold garbage
    slots = np.sort(rng.choice(N, size=m, replace=False))
    honest = rng.uniform(-1, 1, size=(m, D))
    x[slots] = honest
    byz = np.zeros(N, bool)
    byz[slots[:b]] = True
    if b:
        if far:
            direction = rng.normal(size=D)
            direction /= np.linalg.norm(direction)
            centre = direction * draw(st.floats(50, 1e6))
            x[byz] = centre + rng.normal(size=(b, D)) * draw(st.sampled_from([0.0, 0.5]))
        elif arbitrary:
            choices = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 1e4, -3.0])
            x[byz] = rng.choice(choices, size=(b, D)) if draw(st.booleans()) else choices[
                draw(st.integers(0, len(choices) - 1))
            ]
        else:
            x[byz] = rng.uniform(-1, 1, size=(b, D))
    valid = np.zeros(N, bool)
    valid[slots] = True
    return x, valid, f, byz


def honest_box(x, valid, byz):
    h = x[valid & ~byz].astype(np.float64)
    return h.min(axis=0), h.max(axis=0)


def assert_in_box(out, lo, hi, slack=1e-5):
    assert np.all(np.isfinite(out)), out
    assert np.all(out >= lo - slack) and np.all(out <= hi + slack), (out, lo, hi)


# ------------------------------------------------------------------------------------------
# Coordinate-wise rules: within the honest range per coordinate, whatever the Byzantine values.


@SETTINGS
@given(scenario(lambda m, f: m >= 2 * f + 1, arbitrary=True), st.sampled_from(["mean", "lower"]))
def test_median_within_honest_range(case, even):
    x, valid, f, byz = case
    out, _ = run("median", x, valid, f, even=even)
    assert_in_box(out, *honest_box(x, valid, byz))


@SETTINGS
@given(scenario(lambda m, f: m >= 2 * f + 1, arbitrary=True))
def test_trimmed_mean_within_honest_range(case):
    x, valid, f, byz = case
    out, _ = run("trimmed_mean", x, valid, f)
    assert_in_box(out, *honest_box(x, valid, byz))


@pytest.mark.parametrize("name", ["meamed", "phocas"])
@SETTINGS
@given(scenario(lambda m, f: m >= 2 * f + 1, far=True))
def test_meamed_phocas_ignore_far_outliers(name, case):
    x, valid, f, byz = case
    out, _ = run(name, x, valid, f)
    assert_in_box(out, *honest_box(x, valid, byz))


# ------------------------------------------------------------------------------------------
# Distance-based rules with far outliers.


@SETTINGS
@given(scenario(lambda m, f: m >= 2 * f + 3, far=True), st.sampled_from(["squared", "euclidean"]))
def test_krum_selects_an_honest_input(case, distance):
    x, valid, f, byz = case
    hp = {"distance": "euclidean", "neighbours": "code"} if distance == "euclidean" else {}
    out, _ = run("krum", x, valid, f, **hp)
    honest = x[valid & ~byz].astype(np.float64)
    assert np.min(np.abs(honest - out).max(axis=1)) < 1e-6, "Krum output is not an honest input"


@pytest.mark.parametrize(
    "name", ["multi_krum", "mda", "bulyan", "bulyan-multikrum", "monna", "smea", "caf", "dnc"]
)
@SETTINGS
@given(scenario(lambda m, f: m >= 2 * f + 3, far=True))
def test_selection_rules_stay_in_the_honest_box(name, case):
    x, valid, f, byz = case
    agg = AGGREGATORS.build(name.split("-")[0])
    m = int(valid.sum())
    if agg.requirement(m, f) is not None:
        return  # e.g. Bulyan needs n >= 4f + 3
    hp = {"variant": "multikrum"} if name == "bulyan-multikrum" else {}
    out, _ = run(name.split("-")[0], x, valid, f, **hp)
    assert_in_box(out, *honest_box(x, valid, byz))


@SETTINGS
@given(scenario(lambda m, f: m >= 2 * f + 1, far=True))
def test_geometric_median_pull_is_bounded(case):
    # Each far outlier pulls a Weiszfeld step by at most ~1/sum(honest weights), however far it
    # is: the output stays within a few honest diameters of the honest points (the mean would
    # move by ~1e6 * b / m).
    x, valid, f, byz = case
    out, _ = run("geometric_median", x, valid, f)
    lo, hi = honest_box(x, valid, byz)
    diam = np.linalg.norm(hi - lo) + 1e-3
    assert np.all(np.isfinite(out))
    assert np.all(out >= lo - 2 * diam) and np.all(out <= hi + 2 * diam)


# ------------------------------------------------------------------------------------------
# Centered clipping


@SETTINGS
@given(
    scenario(lambda m, f: True, arbitrary=True),
    st.sampled_from([0.05, 0.5, 3.0]),
    st.sampled_from([1, 3]),
    st.integers(0, 2**31 - 1),
)
def test_centered_clip_moves_at_most_tau_per_iteration(case, tau, iters, seed):
    x, valid, f, byz = case
    v0 = np.random.default_rng(seed).normal(size=D).astype(np.float32)
    out, state = cc_with_traced_tau(iters)(
        jnp.asarray(x), jnp.asarray(valid), jnp.int32(f), jnp.asarray(v0), jnp.float32(tau)
    )
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - v0) <= iters * tau * (1 + 1e-5) + 1e-6
    np.testing.assert_allclose(np.asarray(state), out, rtol=1e-6)


@SETTINGS
@given(scenario(lambda m, f: True), st.integers(0, 2**31 - 1))
def test_centered_clip_is_the_mean_inside_the_radius(case, seed):
    # When every input is within tau of the centre nothing is clipped: one step gives the mean.
    x, valid, f, byz = case
    v0 = np.random.default_rng(seed).uniform(-1, 1, size=D).astype(np.float32)
    out, _ = cc_with_traced_tau(1)(
        jnp.asarray(x), jnp.asarray(valid), jnp.int32(f), jnp.asarray(v0), jnp.float32(10.0)
    )
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out, x[valid].astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Equivariance (all rules): translating every input translates the output.


# Left out: FLTrust (its trust scores are cosines with the server's reference update, which a
# translation of the inputs does not move; it needs that reference to run at all), SignGuard and
# clipped clustering (norms, sign statistics and cosines are not translation equivariant).
NOT_TRANSLATION_EQUIVARIANT = ("fltrust", "signguard", "clipped_clustering")


@pytest.mark.parametrize(
    "name", [n for n in AGGREGATORS.names() if n not in NOT_TRANSLATION_EQUIVARIANT]
)
@settings(SETTINGS, max_examples=10)
@given(scenario(lambda m, f: m >= 4 * f + 3), st.lists(st.floats(-5, 5), min_size=D, max_size=D))
def test_translation_equivariance(name, case, shift):
    x, valid, f, byz = case
    shift = np.asarray(shift, np.float32)
    state = jnp.zeros(D) if name == "centered_clip" else None
    out, _ = run(name, x, valid, f, state=state)
    state_s = jnp.asarray(shift) if name == "centered_clip" else None
    out_s, _ = run(name, x + shift, valid, f, state=state_s)
    np.testing.assert_allclose(out_s, out + shift, rtol=1e-4, atol=2e-4)


# ------------------------------------------------------------------------------------------
# Pre-aggregators


def pre_jitted(name, **hp):
    return jax.jit(PREAGGREGATORS.build(name, **hp).apply)


def run_pre(name, x, valid, f, key=KEY, **hp):
    out, v, fo, _ = pre_jitted(name, **hp)(
        jnp.asarray(x, jnp.float32), jnp.asarray(valid), jnp.int32(f), key, ()
    )
    return np.asarray(out, np.float64), np.asarray(v), int(fo)


@SETTINGS
@given(scenario(lambda m, f: True, arbitrary=True), st.sampled_from([0.1, 1.0, 10.0]))
def test_clip_bounds_every_finite_norm(case, scale):
    x, valid, f, byz = case
    tau = 1.0
    out, v, fo = run_pre("clip", x * scale, valid, f)
    norms = np.linalg.norm(out[valid], axis=1)
    finite = np.isfinite(norms)
    assert np.all(norms[finite] <= tau * (1 + 1e-5))
    assert fo == f and np.array_equal(v, valid)


@SETTINGS
@given(scenario(lambda m, f: m >= 2 * f + 1, far=True))
def test_arc_clips_at_most_k_rows_to_the_k_plus_1_th_norm(case):
    x, valid, f, byz = case
    out, _, _ = run_pre("arc", x, valid, f)
    m = int(valid.sum())
    k = (2 * f * (m - f)) // m
    norms = np.linalg.norm(x[valid].astype(np.float64), axis=1)
    threshold = np.sort(norms)[::-1][k]
    new = np.linalg.norm(out[valid], axis=1)
    assert np.all(new <= threshold * (1 + 1e-5))
    assert np.sum(~np.isclose(new, norms, rtol=1e-5)) <= k
    # With b <= f far outliers, k >= b, so every outlier is clipped to an honest-scale norm.
    assert np.all(new <= np.linalg.norm(np.ones(D)) * (1 + 1e-5) + 1e-6)


@SETTINGS
@given(scenario(lambda m, f: m >= 2 * f + 1, far=True))
def test_nnm_honest_rows_mix_only_honest_rows(case):
    x, valid, f, byz = case
    out, _, _ = run_pre("nnm", x, valid, f)
    lo, hi = honest_box(x, valid, byz)
    for i in np.flatnonzero(valid & ~byz):
        assert_in_box(out[i], lo, hi)


@SETTINGS
@given(scenario(lambda m, f: True, far=True), st.integers(0, 1000))
def test_bucketing_spoils_at_most_b_buckets(case, k):
    x, valid, f, byz = case
    out, v, fo = run_pre("bucketing", x, valid, f, key=jax.random.key(k))
    lo, hi = honest_box(x, valid, byz)
    spoiled = [not (np.all(o >= lo - 1e-5) and np.all(o <= hi + 1e-5)) for o in out[v]]
    assert sum(spoiled) <= int(byz.sum())
    assert fo == f and int(v.sum()) == -(-int(valid.sum()) // 2)


@pytest.mark.parametrize("bad", ["none", "nan_valid", "inf_padding", "huge"])
def test_nnm_mixing_with_and_without_non_finite_rows(bad):
    """NNM equals its definition on the usable rows, and a NaN / inf / overflowing row, valid or
    padding, never leaks into another row's mix (it is zeroed before the mixing matmul)."""
    import jax
    import jax.numpy as jnp

    from jbyz.preaggregators import PREAGGREGATORS

    rng = np.random.default_rng(5)
    n, d, f = 8, 6, 2
    x = rng.normal(size=(n, d)).astype(np.float32)
    valid = np.ones(n, bool)
    valid[-1] = False  # a padding slot
    if bad == "nan_valid":
        x[0] = np.nan
    elif bad == "inf_padding":
        x[-1] = np.inf
    elif bad == "huge":
        x[-1] = 1e30  # finite, but its squared norm overflows: unusable
    nnm = PREAGGREGATORS.build("nnm")
    out, _, _, _ = jax.jit(lambda x: nnm.apply(x, jnp.asarray(valid), f, jax.random.key(0), ()))(x)
    out = np.asarray(out)
    usable = valid & np.all(np.isfinite(x), axis=1) & (np.sum(x.astype(np.float64) ** 2, 1) < 3e38)
    m = int(valid.sum())
    idx = np.flatnonzero(usable)
    for i in idx:
        dist = np.sum((x[idx] - x[i]) ** 2, axis=1)
        near = idx[np.argsort(dist, kind="stable")[: m - f]]
        np.testing.assert_allclose(out[i], x[near].mean(axis=0), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(out[idx]))
    for i in np.flatnonzero(~usable):  # unusable rows pass through
        np.testing.assert_array_equal(out[i], x[i])
