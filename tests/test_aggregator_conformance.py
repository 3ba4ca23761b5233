"""One conformance suite over the whole AGGREGATORS registry (and PREAGGREGATORS where it applies).

For every registered rule, with its default hyper-parameters:

* permutation invariance of the worker axis;
* padding / mask invariance: ``agg(pad(x), valid) == agg(x)`` with garbage (NaN, 1e30) rows;
* ``f = 0`` behaviour: the rules that reduce to the mean do; every rule is unanimous;
* ``jit`` equals eager (op-by-op dispatch);
* ``jax.vmap`` over a batch of configurations (inputs, valid masks, ``f``, hyper-parameters
  passed as arrays, state) equals a Python loop;
* robust rules stay finite when Byzantine rows are NaN or +/-inf. ``mean`` is exempt: it is not
  robust and is *meant* to be poisoned; the test checks that it is;
* reverse-mode differentiability (adaptive attacks differentiate through the rule), for one
  rule of each kind of machinery.

``f`` (and, for the vmap test, the numeric hyper-parameter) is traced, so each rule compiles a
handful of programs; factories are memoised, so ``jax.jit(agg.apply)`` shares compiled programs
with the other aggregator test files (same shapes).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbyz.aggregators import AGGREGATORS
from jbyz.preaggregators import PREAGGREGATORS

N, D = 11, 4  # the same shapes as the other aggregator test files (shared compiles)
KEY = jax.random.key(0)
NAMES = AGGREGATORS.names()

# Hyper-parameters that may be arrays (a grid vmaps over them): name -> (kwarg, values).
ARRAY_HP = {
    "trimmed_mean": ("b", [1, 0, 2]),
    "multi_krum": ("m", [2, 1, 4]),
    "geometric_median": ("nu", [0.1, 0.5, 0.01]),
    "centered_clip": ("tau", [0.1, 1.0, 0.3]),
    "dnc": ("filter_frac", [1.0, 0.5, 0.0]),
    "monna": ("idx", [-1, 0, 2]),
}
# Rules that equal the mean of the valid rows when f = 0.
MEAN_AT_F0 = {
    "mean", "trimmed_mean", "meamed", "phocas", "bulyan", "mda", "dstar",
    "monna", "smea", "caf", "dnc",
}
# Rules that trust one input (MoNNA: the last valid row by default): invariant under the
# permutations that keep that row in place, not under all.
TRUSTED_LAST_ROW = {"monna"}
# Rules that rescale every input to the server reference's norm (FLTrust): identical inputs v
# give v * |reference| / |v| (or 0 when v points away from it), not v; the output need not lie in
# the honest inputs' box.
RESCALED_TO_REFERENCE = {"fltrust"}
# The server-side reference vector (e.g. dSTAR's validation gradient) passed to the rules with
# ``needs_reference``: a fixed vector, so every invariance below must hold with it.
REFERENCE = np.random.default_rng(99).normal(size=D).astype(np.float32)


def reference_kw(agg):
    return {"reference": jnp.asarray(REFERENCE)} if agg.needs_reference else {}


def test_registry_is_covered():
    # The suite below is parametrised over the registry itself: a new rule is tested
    # automatically; this guards against an accidentally empty registry.
    assert len(NAMES) >= 11


def largest_f(name, m, cap=2):
    agg = AGGREGATORS.build(name)
    return max(f for f in range(cap + 1) if agg.requirement(m, f) is None)


@functools.lru_cache(maxsize=None)
def compiled(name, array_hp=False):
    """``jit`` of ``(x, valid, f, hp, state) -> out``.

    With ``array_hp`` the rule's numeric hyper-parameter (``ARRAY_HP``) is the traced ``hp``;
    otherwise the factory defaults are used and ``hp`` is ignored.
    """
    kw = ARRAY_HP[name][0] if array_hp else None

    def fn(x, valid, f, hp, state):
        agg = AGGREGATORS.build(name, **({kw: hp} if kw else {}))
        return agg.apply(x, valid, f, KEY, state, **reference_kw(agg))

    return jax.jit(fn)


def call(name, x, valid=None, f=1, hp=None, state=None):
    """Runs ``name`` jitted; ``hp`` given: through the array hyper-parameter, else defaults."""
    x = jnp.asarray(x, jnp.float32)
    n, d = x.shape
    valid = jnp.ones(n, bool) if valid is None else jnp.asarray(valid)
    agg = AGGREGATORS.build(name)
    if state is None:
        state = agg.init(n, d)
    if hp is None or name not in ARRAY_HP:
        # Factories are memoised, so this jit shares its compiled programs with the other files.
        return jax.jit(agg.apply)(x, valid, jnp.int32(f), KEY, state, **reference_kw(agg))
    return compiled(name, array_hp=True)(x, valid, jnp.int32(f), hp, state)


def sample(seed, n=N, d=D):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariance(name):
    x = sample(1)
    f = largest_f(name, N, cap=1)
    out, _ = call(name, x, f=f)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(N)
        if name in TRUSTED_LAST_ROW:
            perm = np.append(np.random.default_rng(seed).permutation(N - 1), N - 1)
        out_p, _ = call(name, x[perm], f=f)
        chex.assert_trees_all_close(out_p, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_padding_and_mask_invariance(name):
    m = 7
    xv = sample(2, n=m)
    f = largest_f(name, m, cap=1)
    ref, _ = call(name, xv, f=f)  # no padding at all: an [m, d] stack
    rng = np.random.default_rng(0)
    for trial in range(3):
        slots = np.sort(rng.choice(N, size=m, replace=False))
        x = np.full((N, D), np.nan if trial % 2 else 1e30, np.float32)
        x[slots] = xv
        valid = np.zeros(N, bool)
        valid[slots] = True
        out, _ = call(name, x, valid, f=f)
        chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_f_zero(name):
    x = sample(3)
    out, _ = call(name, x, f=0)
    assert np.all(np.isfinite(np.asarray(out)))
    if name in MEAN_AT_F0:
        chex.assert_trees_all_close(out, x.mean(axis=0), rtol=1e-5, atol=1e-6)
    # Unanimity: identical inputs give that input (CC's centre starts at it).
    v = np.random.default_rng(4).normal(size=D).astype(np.float32)
    same = np.tile(v, (N, 1))
    state = jnp.asarray(v) if name == "centered_clip" else None
    if name in RESCALED_TO_REFERENCE:
        v = v * (np.linalg.norm(REFERENCE) / np.linalg.norm(v)) * (np.dot(v, REFERENCE) > 0)
    for f in (0, largest_f(name, N)):
        out, _ = call(name, same, f=f, state=state)
        chex.assert_trees_all_close(out, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name):
    x = sample(5)
    valid = np.arange(N) != 3
    f = largest_f(name, N - 1, cap=1)
    jitted, st_j = call(name, x, valid, f=f)
    agg = AGGREGATORS.build(name)
    # Eager = op-by-op dispatch (no outer jit; fori_loop bodies and jax.random stay compiled).
    eager, st_e = agg.apply(
        jnp.asarray(x), jnp.asarray(valid), jnp.int32(f), KEY, agg.init(N, D), **reference_kw(agg)
    )
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(st_j, st_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_configs_equals_loop(name):
    b = 3
    xs = np.stack([sample(10 + i) for i in range(b)])
    valids = np.stack([np.arange(N) < N - i for i in range(b)])  # 9, 8 and 7 valid rows
    fs = np.array([0, largest_f(name, N - 1, cap=1), largest_f(name, N - 2)], np.int32)
    hps = jnp.asarray(ARRAY_HP[name][1]) if name in ARRAY_HP else jnp.zeros((b,))
    agg = AGGREGATORS.build(name)
    init = agg.init(N, D)
    states = jax.tree.map(lambda s: jnp.stack([s + 0.1 * i for i in range(b)]), init)
    batched, new_states = jax.jit(jax.vmap(compiled(name, name in ARRAY_HP).__wrapped__))(
        jnp.asarray(xs), jnp.asarray(valids), jnp.asarray(fs), hps, states
    )
    for i in range(b):
        st = jax.tree.map(lambda s: s[i], states)
        out, new_st = call(name, xs[i], valids[i], f=int(fs[i]), hp=hps[i], state=st)
        chex.assert_trees_all_close(batched[i], out, rtol=1e-5, atol=1e-6)
        st_i = jax.tree.map(lambda s: s[i], new_states)
        chex.assert_trees_all_close(st_i, new_st, rtol=1e-5, atol=1e-6)
    # The configurations really differ (the test would not notice a broadcast bug otherwise).
    assert not np.allclose(np.asarray(batched[0]), np.asarray(batched[1]))


@pytest.mark.parametrize("name", ["median", "meamed", "krum", "geometric_median", "centered_clip"])
def test_reverse_mode_differentiable(name):
    # Adaptive attacks differentiate through the aggregator: jax.grad must trace (no
    # while_loop) and give finite gradients that actually depend on the inputs. One rule per
    # kind of machinery (sorting network, window selection, Gram + argmin, fixed-count
    # fori_loop, clipping weights) keeps the compile time down.
    n = 5  # small: differentiating a sorting network is costly to compile
    x = jnp.asarray(sample(9, n=n))
    valid = jnp.ones(n, bool)
    agg = AGGREGATORS.build(name)
    f = largest_f(name, n, cap=1)

    def loss(x):
        out, _ = agg.apply(x, valid, jnp.int32(f), KEY, agg.init(n, D))
        return jnp.sum(out * jnp.arange(1.0, D + 1))

    g = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.all(np.isfinite(g)) and np.any(g != 0)


PATTERNS = {
    "nan": lambda r: np.full_like(r, np.nan),
    "+inf": lambda r: np.full_like(r, np.inf),
    "-inf": lambda r: np.full_like(r, -np.inf),
    "mixed": lambda r: np.array([np.nan, np.inf, -np.inf] * r.size, r.dtype)[: r.size],
    "one_nan": lambda r: np.where(np.arange(r.size) == 0, np.nan, r).astype(r.dtype),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_byzantine_rows(name, pattern):
    x = sample(6)
    f = largest_f(name, N)
    for i in range(f):  # the first f slots are Byzantine
        x[i] = PATTERNS[pattern](x[i])
    out, _ = call(name, x, f=f)
    finite = np.all(np.isfinite(np.asarray(out)))
    if name == "mean":
        # Not robust: the mean is poisoned by a non-finite row, by definition.
        assert not finite
    else:
        assert finite, f"{name} output not finite with {pattern} Byzantine rows (f={f})"
        # ...and it lies within the honest values' range per coordinate (slack for CC/GM, whose
        # centre need not sit inside the box).
        honest = x[f:]
        lo, hi = honest.min(axis=0), honest.max(axis=0)
        if name in RESCALED_TO_REFERENCE:
            return
        slack = 0.5 if name in ("centered_clip",) else 1e-5
        assert np.all(np.asarray(out) >= lo - slack) and np.all(np.asarray(out) <= hi + slack)


# ------------------------------------------------------------------------------------------
# Pre-aggregators (equivariant stages; bucketing is key-driven, see below)

PRE_NAMES = PREAGGREGATORS.names()
PRE_ARRAY_HP = {"clip": ("tau", [1.0, 0.5, 2.0])}


@functools.lru_cache(maxsize=None)
def pre_compiled(name, s=None):
    kw = PRE_ARRAY_HP.get(name, (None, None))[0]

    def fn(x, valid, f, hp, key):
        extra = {kw: hp} if kw else {}
        if s is not None:
            extra["s"] = s
        pre = PREAGGREGATORS.build(name, **extra)
        return pre.apply(x, valid, f, key, ())

    return jax.jit(fn)


def pre_call(name, x, valid=None, f=1, hp=None, key=KEY, s=None):
    x = jnp.asarray(x, jnp.float32)
    valid = jnp.ones(x.shape[0], bool) if valid is None else jnp.asarray(valid)
    if hp is None or name not in PRE_ARRAY_HP:
        pre = PREAGGREGATORS.build(name, **({} if s is None else {"s": s}))
        return jax.jit(pre.apply)(x, valid, jnp.int32(f), key, ())
    return pre_compiled(name, s)(x, valid, jnp.int32(f), hp, key)


def scaled_sample(seed, n=N):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, D)) * rng.uniform(0.3, 3.0, size=(n, 1))).astype(np.float32)


@pytest.mark.parametrize("name", [n for n in PRE_NAMES if n != "bucketing"])
def test_pre_permutation_equivariance(name):
    x = scaled_sample(1)
    out, v, fo, _ = pre_call(name, x, f=2)
    for seed in range(2):
        perm = np.random.default_rng(seed).permutation(N)
        out_p, _, _, _ = pre_call(name, x[perm], f=2)
        chex.assert_trees_all_close(out_p, np.asarray(out)[perm], rtol=1e-5, atol=1e-6)
    assert int(fo) == 2 and np.all(np.asarray(v))


def test_bucketing_permutation_invariance_at_s1():
    # Bucketing is key-driven: with s >= 2 a permutation of the inputs changes the buckets. At
    # s = 1 it only permutes the rows, so bucketing followed by a symmetric rule is invariant.
    x = sample(7)
    med = AGGREGATORS.build("median")
    ref = np.median(x, axis=0)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(N)
        out, v, _, _ = pre_call("bucketing", x[perm], s=1, key=jax.random.key(seed))
        agg, _ = med(out, v, 1, KEY)
        chex.assert_trees_all_close(agg, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PRE_NAMES)
def test_pre_padding_invariance(name):
    m = 7
    xv = scaled_sample(2, n=m)
    ref, vref, _, _ = pre_call(name, xv, f=2)
    if name == "bucketing":
        # Buckets come from per-slot keys: appending padding leaves the buckets unchanged.
        x = np.concatenate([xv, np.full((N - m, D), np.nan, np.float32)])
        valid = np.arange(N) < m
        out, v, _, _ = pre_call(name, x, valid, f=2)
        k = int(np.sum(vref))
        np.testing.assert_array_equal(np.asarray(v)[:k], True)
        assert not np.any(np.asarray(v)[k:])
        chex.assert_trees_all_close(np.asarray(out)[:k], np.asarray(ref)[:k], rtol=1e-6, atol=1e-6)
        return
    rng = np.random.default_rng(0)
    for trial in range(2):
        slots = np.sort(rng.choice(N, size=m, replace=False))
        x = np.full((N, D), np.nan if trial else 1e30, np.float32)
        x[slots] = xv
        valid = np.zeros(N, bool)
        valid[slots] = True
        out, v, _, _ = pre_call(name, x, valid, f=2)
        np.testing.assert_array_equal(np.asarray(v), valid)
        chex.assert_trees_all_close(np.asarray(out)[slots], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PRE_NAMES)
def test_pre_jit_equals_eager_and_vmap_equals_loop(name):
    x = scaled_sample(3)
    valid = np.arange(N) != 4
    jitted = pre_call(name, x, valid, f=2)
    pre = PREAGGREGATORS.build(name)
    eager = pre.apply(jnp.asarray(x), jnp.asarray(valid), jnp.int32(2), KEY, ())
    chex.assert_trees_all_close(jitted[:3], eager[:3], rtol=1e-5, atol=1e-6)

    b = 3
    xs = jnp.asarray(np.stack([scaled_sample(20 + i) for i in range(b)]))
    valids = jnp.asarray(np.stack([np.arange(N) < N - i for i in range(b)]))
    fs = jnp.asarray([0, 1, 3], jnp.int32)
    hps = jnp.asarray(PRE_ARRAY_HP[name][1]) if name in PRE_ARRAY_HP else jnp.zeros((b,))
    keys = jax.random.split(KEY, b)
    batched = jax.jit(jax.vmap(pre_compiled(name).__wrapped__))(xs, valids, fs, hps, keys)
    for i in range(b):
        single = pre_call(name, xs[i], valids[i], f=int(fs[i]), hp=hps[i], key=keys[i])
        got = jax.tree.map(lambda a: a[i], batched[:3])
        chex.assert_trees_all_close(got, single[:3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", ["nan", "mixed"])
@pytest.mark.parametrize("name", PRE_NAMES)
def test_pre_then_robust_rule_stays_finite(name, pattern):
    x = scaled_sample(8)
    f = 2
    for i in range(f):
        x[i] = PATTERNS[pattern](x[i])
    out, v, fo, _ = pre_call(name, x, f=f)
    agg, _ = AGGREGATORS.build("trimmed_mean")(out, v, fo, KEY)
    assert np.all(np.isfinite(np.asarray(agg)))
