"""MoNNA, SMEA, CAF, DnC, FLTrust (jbyz/aggregators_extra.py).

* Deterministic rules equal the peers' own outputs on fixed inputs
  (tests/data/peer_reference_aggregators.json, made by tests/data/make_peer_reference.py).
* SMEA and CAF, which ByzFL randomises (one power-method step from a random start), equal exact
  numpy versions written here (all subsets / a while loop, ``d x d`` covariance eigen-solves).
* Requirements, the reference plumbing, the optax drop-in and the TOML runner.

The conformance and property suites cover every registered rule as well.
"""

from __future__ import annotations

import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbyz
from jbyz.aggregators import AGGREGATORS
from jbyz.registry import ConfigError

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "peer_reference_aggregators.json")
                  .read_text())
KEY = jax.random.key(0)
NEW = ("monna", "smea", "caf", "dnc", "fltrust", "signguard", "clipped_clustering")


def call(name, x, f, valid=None, reference=None, key=KEY, **hp):
    agg = AGGREGATORS.build(name, **hp)
    x = jnp.asarray(x, jnp.float32)
    valid = jnp.ones(x.shape[0], bool) if valid is None else jnp.asarray(valid)
    kw = {} if reference is None else {"reference": jnp.asarray(reference, jnp.float32)}
    out, _ = jax.jit(agg.apply)(x, valid, jnp.int32(f), key, agg.init(*x.shape), **kw)
    return np.asarray(out, np.float64)


def pad(x, slots, n, fill=np.nan):
    """``x`` placed in ``slots`` of an ``[n, d]`` stack of garbage, and the valid mask."""
    out = np.full((n, x.shape[1]), fill, np.float32)
    out[slots] = x
    valid = np.zeros(n, bool)
    valid[slots] = True
    return out, valid


# ------------------------------------------------------------------------------------------
# Peers' outputs


@pytest.mark.parametrize("i", range(len(DATA["cases"])),
                         ids=[f"{c['rule']}-{c['call']}" for c in DATA["cases"]])
def test_equals_peer_output(i):
    case = DATA["cases"][i]
    if "xs" in case:  # a stateful rule: a sequence of steps
        agg = AGGREGATORS.build(case["rule"], **case["params"])
        fn = jax.jit(agg.apply)
        n, d = np.shape(case["xs"][0])
        state = agg.init(n, d)
        for x, want in zip(case["xs"], case["outs"]):
            out, state = fn(jnp.asarray(x, jnp.float32), jnp.ones(n, bool), jnp.int32(case["f"]),
                            KEY, state)
            np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
        return
    x = np.asarray(case["x"], np.float32)
    out = call(case["rule"], x, case["f"], reference=case.get("reference"), **case["params"])
    np.testing.assert_allclose(out, case["out"], rtol=2e-5, atol=2e-5)


def test_peer_cases_cover_each_deterministic_rule():
    assert {c["rule"] for c in DATA["cases"]} == {
        "monna", "dnc", "fltrust", "signguard", "clipped_clustering"}
    assert set(DATA["peers"]) == {"byzfl", "fedlib", "blades"}


# ------------------------------------------------------------------------------------------
# Exact numpy versions of ByzFL's randomised rules


def np_top_eig(cov):
    return np.linalg.eigh(cov)[0][-1]


def np_smea(x, f):
    n = len(x)
    best, best_s = np.inf, None
    for s in itertools.combinations(range(n), n - f):
        y = x[list(s)] - x[list(s)].mean(0)
        lam = np_top_eig(y.T @ y / len(s))
        if lam < best:
            best, best_s = lam, s
    return x[list(best_s)].mean(0), best_s


def np_caf(x, f, tau_max="active", max_iters=10_000):
    n = len(x)
    c = np.ones(n)
    best_lam, best_mu, it = np.inf, x.mean(0), 0
    while c.sum() > n - 2 * f:
        assert it < max_iters, "numpy CAF did not stop"
        mu = c @ x / c.sum()
        y = x - mu
        lam, vecs = np.linalg.eigh((y.T * c) @ y / c.sum())
        if lam[-1] < best_lam:
            best_lam, best_mu = lam[-1], mu
        tau = (y @ vecs[:, -1]) ** 2
        tmax = tau[c > 0].max() if tau_max == "active" else tau.max()
        c = np.maximum(c * (1 - tau / tmax), 0.0)
        it += 1
    return best_mu, it


def outlier_sample(seed, n, d, b, scale=6.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if b:
        direction = rng.normal(size=d)
        x[:b] = x[:b] * 0.5 + scale * direction / np.linalg.norm(direction)
    return x.astype(np.float32).astype(np.float64)


# (seed, n, f, b): n valid rows of dimension D_EXACT, b of them far away, always placed in 12
# slots (one compiled program for every case; the unpadded stack is checked once).
EXACT_CASES = [(0, 7, 2, 2), (1, 8, 3, 1), (2, 9, 4, 4), (3, 6, 1, 0), (4, 10, 3, 3),
               (5, 11, 5, 5), (6, 12, 2, 2)]
D_EXACT, SLOTS = 6, 12


def padded_case(seed, n, b, fill=np.nan):
    x = outlier_sample(seed, n, D_EXACT, b)
    slots = np.sort(np.random.default_rng(seed).choice(SLOTS, size=n, replace=False))
    return x, *pad(x, slots, SLOTS, fill)


@pytest.mark.parametrize("seed,n,f,b", EXACT_CASES)
def test_smea_equals_exact_numpy(seed, n, f, b):
    x, xp, valid = padded_case(seed, n, b)
    want, _ = np_smea(x, f)
    np.testing.assert_allclose(call("smea", xp, f, valid), want, rtol=1e-5, atol=1e-5)
    if seed == 0:
        np.testing.assert_allclose(call("smea", x, f), want, rtol=1e-5, atol=1e-5)


def test_smea_exact_ties_go_to_the_smallest_bitmask():
    """Integer rows make exact ties common; the float32 eigen-solves of tied subsets differ by
    rounding, which must not pick the subset. The winner is checked against exact rational
    arithmetic (the variance of each 5-subset of 1-D values) and its tie rule."""
    from fractions import Fraction

    x = np.array([[1.0], [2.0], [-1.0], [0.0], [0.0], [1.0]], np.float32)
    f, k = 1, 5
    exact = {s: sum((Fraction(float(x[i, 0])) - sum(Fraction(float(x[j, 0])) for j in s) / k) ** 2
                    for i in s) for s in itertools.combinations(range(6), k)}
    low = min(exact.values())
    tied = sorted((s for s, v in exact.items() if v == low), key=lambda s: sum(1 << i for i in s))
    assert len(tied) == 2  # (0, 1, 3, 4, 5) and (0, 2, 3, 4, 5) (means 0.8 and 0.2)
    want = x[list(tied[0])].mean(0)
    np.testing.assert_allclose(call("smea", x, f), want, rtol=1e-6)
    # padded with invalid slots between the rows: the same choice (valid rows keep their order)
    xp, valid = pad(x.astype(np.float64), np.array([0, 2, 3, 5, 6, 8]), 9, np.nan)
    np.testing.assert_allclose(call("smea", xp, f, valid), want, rtol=1e-6)


def test_smea_limit_and_requirement():
    agg = AGGREGATORS.build("smea")
    msg = agg.requirement(13, 2)
    assert "2**13" in msg and "n <= 12" in msg and "max_subsets" in msg
    assert agg.requirement(12, 5) is None
    assert "largest valid f is 5" in agg.requirement(12, 6)
    assert AGGREGATORS.build("smea", max_subsets=2**13).requirement(13, 2) is None
    with pytest.raises(ConfigError, match="max_subsets"):
        call("smea", np.zeros((13, 2)), 1)


@pytest.mark.parametrize("seed,n,f,b", EXACT_CASES)
def test_caf_equals_exact_numpy(seed, n, f, b):
    x, xp, valid = padded_case(seed, n, b, fill=1e30)
    want, it = np_caf(x, f)
    assert it <= 2 * f  # the "active" scope zeroes a remaining row per iteration
    np.testing.assert_allclose(call("caf", xp, f, valid), want, rtol=1e-4, atol=1e-4)
    if seed == 0:
        np.testing.assert_allclose(call("caf", x, f), want, rtol=1e-4, atol=1e-4)


def test_caf_byzfl_scope_equals_numpy_when_its_loop_ends_within_iters():
    checked = 0
    for seed in range(12):
        x = outlier_sample(100 + seed, 8, 4, 2, scale=3.0)
        want, it = np_caf(x, 3, tau_max="all", max_iters=10_000)
        if it > 16:
            continue
        got = call("caf", x, 3, tau_max="all", iters=16)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 5


def test_caf_removes_far_outliers_and_is_the_mean_at_f0():
    x = outlier_sample(7, 10, 6, 3, scale=100.0)
    out = call("caf", x, 3)
    assert np.linalg.norm(out - x[3:].mean(0)) < 1.0
    np.testing.assert_allclose(call("caf", x, 0), x.mean(0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# MoNNA, DnC, FLTrust specifics


def test_monna_trusted_index_counts_valid_rows():
    x = outlier_sample(8, 7, 3, 2)
    slots = np.array([0, 2, 3, 5, 6, 9, 10])
    xp, valid = pad(x, slots, 12)
    for idx in (0, 3, -1, -7):
        want = call("monna", x, 2, idx=idx)
        np.testing.assert_allclose(call("monna", xp, 2, valid, idx=idx), want, rtol=1e-6)
    # The default trusts the last valid row (honest in jbyz's layout): far rows are left out.
    out = call("monna", x, 2)
    d = np.linalg.norm(x - x[-1], axis=1)
    np.testing.assert_allclose(out, x[np.argsort(d)[:5]].mean(0), rtol=1e-6)
    agg = AGGREGATORS.build("monna", idx=7)
    assert "idx=7" in agg.requirement(7, 1) and agg.requirement(8, 1) is None
    assert "largest valid f is 3" in AGGREGATORS.build("monna").requirement(7, 4)


def test_dnc_subsampled_coordinates_are_key_driven_and_union_keeps_more():
    x = outlier_sample(9, 10, 40, 0)
    x[:2] += 5.0  # far in every coordinate, so every coordinate subset sees it
    a = call("dnc", x, 2, sub_dim=10, key=jax.random.key(1))
    b = call("dnc", x, 2, sub_dim=10, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    # far rows are found in every coordinate subset
    np.testing.assert_allclose(a, x[2:].mean(0), rtol=1e-5, atol=1e-5)
    full = call("dnc", x, 2)
    np.testing.assert_allclose(full, x[2:].mean(0), rtol=1e-5, atol=1e-5)
    union = call("dnc", x, 2, sub_dim=10, combine="union")
    assert np.all(np.isfinite(union))


def test_fltrust_needs_its_reference_and_zero_trust_gives_zero():
    x = outlier_sample(10, 6, 4, 0)
    with pytest.raises(ConfigError, match="reference"):
        call("fltrust", x, 0)
    ref = x.mean(0)
    assert np.allclose(call("fltrust", -np.abs(x) * np.sign(ref), 0, reference=ref), 0.0)
    # Output norm is the reference's when every input points the same way.
    out = call("fltrust", np.tile(ref, (6, 1)) * np.arange(1, 7)[:, None], 0, reference=2 * ref)
    np.testing.assert_allclose(out, 2 * ref, rtol=1e-5)


def test_signguard_filters_flipped_and_tiny_rows_and_clips_large_ones():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(11, 30)) + 1.0
    x[:3] = -x[:3]  # sign statistics of the minority
    x[3] *= 0.01  # norm below 0.1 x the median
    x[4] *= 40.0  # clipped to the median norm
    norms = np.linalg.norm(x, axis=1)
    med = np.median(norms)
    clipped = x * np.where(norms > med, med / (norms + 1e-6), 1.0)[:, None]
    want = clipped[4:].mean(0)
    np.testing.assert_allclose(call("signguard", x, 0), want, rtol=1e-5, atol=1e-6)
    perm = np.random.default_rng(0).permutation(11)
    np.testing.assert_allclose(call("signguard", x[perm], 0), want, rtol=1e-5, atol=1e-6)


def test_registered_with_references_and_listed():
    for name in NEW:
        entry = AGGREGATORS.entry(name)
        assert entry.reference and entry.description
        assert getattr(jbyz.aggregators, name) is entry.factory
    assert AGGREGATORS.build("fltrust").needs_reference
    assert AGGREGATORS.build("caf") is AGGREGATORS.build("caf")  # memoised


@pytest.mark.parametrize("name", ["caf", "dnc", "monna", "smea", "signguard", "clipped_clustering"])
def test_reverse_mode_gradient_is_finite(name):
    x = jnp.asarray(outlier_sample(11, 6, 3, 1))
    agg = AGGREGATORS.build(name)
    valid = jnp.ones(6, bool)

    def loss(x):
        return jnp.sum(agg.apply(x, valid, jnp.int32(1), KEY, ())[0] * jnp.arange(1.0, 4.0))

    g = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_clipped_clustering_history_window():
    rng = np.random.default_rng(14)
    agg = AGGREGATORS.build("clipped_clustering", history=1)
    state = agg.init(5, 3)
    assert state.shape == (1, 5) and np.all(np.isnan(state))
    big = rng.normal(size=(5, 3)) * 100.0 + 300.0
    small = rng.normal(size=(5, 3)) * 0.1 + 1.0
    fn = jax.jit(agg.apply)
    args = (jnp.ones(5, bool), jnp.int32(0), KEY)
    _, state = fn(jnp.asarray(big, jnp.float32), *args, state)
    np.testing.assert_allclose(state[0], np.linalg.norm(big, axis=1), rtol=1e-5)
    # The threshold is the median of this step's and the last step's norms (10 values): the
    # large norms of the previous step lift it above every small norm, so nothing is clipped.
    out, state = fn(jnp.asarray(small, jnp.float32), *args, state)
    assert is_majority_mean(out, small)
    np.testing.assert_allclose(state[0], np.linalg.norm(small, axis=1), rtol=1e-5)
    # Stateless (history=0): the median of this step's norms only.
    out0, st0 = jax.jit(AGGREGATORS.build("clipped_clustering", history=0).apply)(
        jnp.asarray(small, jnp.float32), *args, ())
    norms = np.linalg.norm(small, axis=1)
    med = np.median(norms)
    clipped = small * np.where(norms > med, med / (norms + 1e-6), 1.0)[:, None]
    assert is_majority_mean(out0, clipped) and not is_majority_mean(out0, small)
    assert st0 == ()


def is_majority_mean(out, rows):
    """``out`` is the mean of some subset of at least half of ``rows``."""
    n = len(rows)
    return any(np.allclose(out, rows[list(s)].mean(0), rtol=1e-5, atol=1e-6)
               for k in range((n + 1) // 2, n + 1) for s in itertools.combinations(range(n), k))


# ------------------------------------------------------------------------------------------
# Drop-ins: optax and the TOML runner


def test_robust_aggregate_optax_drop_in():
    n = 7
    rng = np.random.default_rng(12)
    g = {"w": jnp.asarray(rng.normal(size=(n, 3, 2)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)}
    rows = np.concatenate([np.asarray(g["b"]), np.asarray(g["w"]).reshape(n, -1)], axis=1)
    for name in ("monna", "caf"):  # (every rule shares the transform's code path)
        tx = jbyz.robust_aggregate(AGGREGATORS.build(name), f=2, num_workers=n)
        st = tx.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)})
        out, _ = jax.jit(tx.update)(g, st)
        want = call(name, rows, 2)  # ravel order: leaves sorted by key ("b" then "w")
        np.testing.assert_allclose(out["b"], want[:4], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out["w"]).ravel(), want[4:], rtol=1e-5, atol=1e-6)
    tx = jbyz.robust_aggregate(AGGREGATORS.build("fltrust"), f=2, num_workers=n)
    st = tx.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)})
    ref = {"w": g["w"][3], "b": g["b"][3]}
    out, _ = tx.update(g, st, reference=ref)
    want = call("fltrust", rows, 2, reference=rows[3])
    np.testing.assert_allclose(out["b"], want[:4], rtol=1e-5, atol=1e-6)


TOML = """
[run]
dataset = "digits"
model = "mlp"
n_workers = 8
f_real = 2
attack = "sign_flip"
attack_kwargs = {scale = -10.0}
batch_size = 32
steps = 40
eval_every = 40
lr = 0.1
momentum = 0.9
server_validation = 200

[sweep]
aggregator = ["monna", "fltrust"]
"""


def test_toml_runner_end_to_end():
    from jbyz.config import load_experiment
    from jbyz.simulate import run

    runs = load_experiment(text=TOML).runs()
    assert [r.aggregator for r in runs] == ["monna", "fltrust"]
    for cfg in runs:
        res = run(cfg, progress=False)
        assert np.isfinite(res.history[-1]["test_loss"])
        assert res.final_accuracy > 0.5, (cfg.aggregator, res.history)
