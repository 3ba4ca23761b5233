"""Latency models (distribution checks) and first-k selection (against a numpy argsort)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jbyz.protocols import (
    LATENCIES,
    arrival_ranks,
    first_k,
    initial_finish_times,
    job_latency,
    latency_table,
    next_arrival,
)
from jbyz.registry import ConfigError

N_DRAWS = 4000  # rounds; with n = 8 workers -> 32,000 samples per model


def _draws(model, n=8, rounds=N_DRAWS, seed=0):
    state = model.init(jax.random.key(seed), n)
    keys = jax.random.split(jax.random.key(seed + 1), rounds)
    return np.asarray(jax.jit(jax.vmap(lambda k: model.sample(k, state, n)))(keys)), state


def test_registry_names_and_descriptions():
    assert set(LATENCIES.names()) == {
        "constant", "shifted_exponential", "gamma", "slow_subset", "heterogeneous"}
    for name, desc, ref in LATENCIES.describe():
        assert desc and ref
        m = LATENCIES.build(name)
        assert m.name == name


def test_constant():
    x, _ = _draws(LATENCIES.build("constant", value=2.5), rounds=10)
    assert np.all(x == 2.5) and x.dtype == np.float32


def test_shifted_exponential_distribution():
    shift, scale = 0.5, 2.0
    x, _ = _draws(LATENCIES.build("shifted_exponential", shift=shift, scale=scale))
    assert x.min() >= shift
    # Kolmogorov-Smirnov against the exact law; at alpha = 1e-3 a correct sampler fails 0.1% of
    # the time (fixed seed: deterministic), a wrong shift/scale by 5% fails surely at 32k samples.
    p = stats.kstest(x.ravel(), stats.expon(loc=shift, scale=scale).cdf).pvalue
    assert p > 1e-3
    p_wrong = stats.kstest(x.ravel(), stats.expon(loc=shift, scale=scale * 1.05).cdf).pvalue
    assert p_wrong < 1e-3
    # Workers are i.i.d.: per-worker means agree within 5 standard errors.
    se = scale / np.sqrt(N_DRAWS)
    assert np.all(np.abs(x.mean(0) - (shift + scale)) < 5 * se)


def test_gamma_distribution():
    # Two shapes in one compiled program (the shape is a traced, vmapped hyper-parameter).
    shapes, means = jnp.array([100.0, 2.0]), jnp.array([3.0, 1.0])
    keys = jax.random.split(jax.random.key(1), N_DRAWS)

    def draw(a, mu):
        m = LATENCIES.build("gamma", shape=a, mean=mu)
        return jax.vmap(lambda k: m.sample(k, (), 8))(keys)

    xs = np.asarray(jax.jit(jax.vmap(draw))(shapes, means))
    for x, a, mu in zip(xs, [100.0, 2.0], [3.0, 1.0]):
        assert x.min() > 0
        p = stats.kstest(x.ravel(), stats.gamma(a=a, scale=mu / a).cdf).pvalue
        assert p > 1e-3
        assert abs(x.std() / x.mean() - 1 / np.sqrt(a)) < 0.05 / np.sqrt(a)
    p_wrong = stats.kstest(xs[0].ravel(), stats.gamma(a=100.0, scale=3.0 * 1.02 / 100).cdf).pvalue
    assert p_wrong < 1e-3


def test_slow_subset():
    n = 8
    m = LATENCIES.build("slow_subset", base="constant", slow_fraction=0.25, slow_factor=7.0)
    x, factors = _draws(m, n=n, rounds=5)
    np.testing.assert_array_equal(np.asarray(factors), [1, 1, 1, 1, 1, 1, 7, 7])
    np.testing.assert_array_equal(x, np.tile([1, 1, 1, 1, 1, 1, 7, 7], (5, 1)))
    m = LATENCIES.build("slow_subset", which="first", slow_fraction=0.5, slow_factor=5.0,
                        base="shifted_exponential", base_kwargs={"shift": 1.0, "scale": 1.0})
    x, factors = _draws(m, n=n)
    np.testing.assert_array_equal(np.asarray(factors), [5, 5, 5, 5, 1, 1, 1, 1])
    ratio = x[:, :4].mean() / x[:, 4:].mean()
    assert abs(ratio - 5.0) < 0.25
    np.testing.assert_allclose(np.asarray(m.mean(factors, n)), [10] * 4 + [2] * 4)
    # A random subset: the right count, drawn once per run (depends on the init key only).
    m = LATENCIES.build("slow_subset", which="random", slow_fraction=0.375, slow_factor=3.0)
    subsets = set()
    for seed in range(12):
        f = np.asarray(m.init(jax.random.key(seed), n))
        assert np.sum(f == 3.0) == 3 and np.sum(f == 1.0) == 5
        subsets.add(tuple(f))
    assert len(subsets) > 3
    # Traced hyper-parameters (a grid vmaps over them).
    fr = jnp.array([0.0, 0.5, 1.0])
    fs = jax.vmap(lambda a: LATENCIES.build("slow_subset", slow_fraction=a).init(
        jax.random.key(0), 4))(fr)
    np.testing.assert_array_equal(np.asarray(fs), [[1, 1, 1, 1], [1, 1, 5, 5], [5, 5, 5, 5]])


def test_heterogeneous_speeds_drawn_once_per_run():
    n = 16
    m = LATENCIES.build("heterogeneous", base="constant", low=1.0, high=4.0)
    x, factors = _draws(m, n=n, rounds=3)
    f = np.asarray(factors)
    assert np.all((f >= 1.0) & (f <= 4.0))
    np.testing.assert_array_equal(x, np.tile(f, (3, 1)))  # fixed for the run
    f2 = np.asarray(m.init(jax.random.key(1), n))
    assert not np.allclose(f, f2)  # another run, other speeds
    # Uniform law of the factors across many runs.
    many = np.asarray(jax.vmap(lambda k: m.init(k, n))(jax.random.split(jax.random.key(2), 500)))
    assert stats.kstest(many.ravel(), stats.uniform(loc=1.0, scale=3.0).cdf).pvalue > 1e-3
    m = LATENCIES.build("heterogeneous", base="constant", distribution="lognormal", sigma=0.7)
    many = np.asarray(jax.vmap(lambda k: m.init(k, n))(jax.random.split(jax.random.key(3), 500)))
    assert stats.kstest(np.log(many.ravel()), stats.norm(scale=0.7).cdf).pvalue > 1e-3


def test_config_errors():
    with pytest.raises(ConfigError, match="Did you mean"):
        LATENCIES.build("gama")
    with pytest.raises(ConfigError, match="no hyper-parameter"):
        LATENCIES.build("gamma", rate=2.0)
    with pytest.raises(ConfigError, match="scale"):
        LATENCIES.build("shifted_exponential", scale=0.0)
    with pytest.raises(ConfigError, match="slow_fraction"):
        LATENCIES.build("slow_subset", slow_fraction=1.5)
    with pytest.raises(ConfigError, match="base"):
        LATENCIES.build("slow_subset", base="slow_subset")
    with pytest.raises(ConfigError, match="low <= high"):
        LATENCIES.build("heterogeneous", low=3.0, high=2.0)
    with pytest.raises(ConfigError, match="byzantine_arrival"):
        first_k(jnp.ones(3), 1, jnp.ones(3, bool), jnp.zeros(3, bool), "last")


def _first_k_numpy(lat, k, valid, byz, mode):
    t = np.where(byz, 0.0, lat) if mode == "first" else lat.copy()
    t = np.where(valid, t, np.inf)
    order = np.argsort(t, kind="stable")  # ties by index; invalid last
    keep = [i for i in order[: max(k, 0)] if valid[i]]
    mask = np.zeros(len(lat), bool)
    mask[keep] = True
    rt = float(max((t[i] for i in keep), default=0.0))
    return mask, rt


@pytest.mark.parametrize("mode", ["honest", "first"])
def test_first_k_matches_numpy_argsort(mode):
    rng = np.random.default_rng(0)
    n = 9
    fn = jax.jit(lambda lat, k, valid, byz: first_k(lat, k, valid, byz, mode))
    for trial in range(150):
        # Values on a coarse grid so that ties happen often.
        lat = rng.integers(1, 6, n).astype(np.float32) * 0.5
        valid = rng.random(n) < 0.8
        byz = rng.random(n) < 0.3
        k = int(rng.integers(-1, n + 2))
        mask, rt = fn(lat, k, valid, byz)
        ref_mask, ref_rt = _first_k_numpy(lat, k, valid, byz, mode)
        np.testing.assert_array_equal(np.asarray(mask), ref_mask, err_msg=f"trial {trial}")
        assert float(rt) == pytest.approx(ref_rt)


def test_first_k_traced_k_under_vmap():
    lat = jnp.array([3.0, 1.0, 2.0, 1.0, 5.0, 0.5, 4.0, 2.0])
    valid = jnp.arange(8) < 7
    byz = jnp.arange(8) < 2
    ks = jnp.arange(9)
    masks, times = jax.jit(jax.vmap(lambda k: first_k(lat, k, valid, byz)))(ks)
    for k in range(9):
        ref_mask, ref_rt = _first_k_numpy(np.asarray(lat), k, np.asarray(valid), np.asarray(byz), "honest")
        np.testing.assert_array_equal(np.asarray(masks[k]), ref_mask)
        assert float(times[k]) == ref_rt
    # Byzantine workers first: with k = 2 exactly the two Byzantine workers are kept, at time 0.
    m, t = first_k(lat, 2, valid, byz, "first")
    np.testing.assert_array_equal(np.asarray(m), np.asarray(byz))
    assert float(t) == 0.0


def test_arrival_ranks_is_a_permutation():
    rng = np.random.default_rng(1)
    for _ in range(20):
        t = rng.integers(0, 3, 12).astype(np.float32)
        valid = rng.random(12) < 0.7
        r = np.asarray(arrival_ranks(t, valid))
        assert sorted(r) == list(range(12))
        order = np.argsort(np.where(valid, t, np.inf), kind="stable")
        np.testing.assert_array_equal(r[order], np.arange(12))


def test_async_primitives():
    m = LATENCIES.build("shifted_exponential")
    key = jax.random.key(5)
    state = m.init(key, 6)
    table = np.asarray(latency_table(m, key, state, 6, 4))
    jj, ii = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    got = jax.jit(jax.vmap(lambda i, j: job_latency(m, key, state, 6, i, j)))(ii.ravel(), jj.ravel())
    np.testing.assert_array_equal(np.asarray(got).reshape(4, 6), table)
    fin = np.asarray(initial_finish_times(m, key, state, 6, valid=jnp.arange(6) < 4))
    np.testing.assert_array_equal(fin[:4], table[0, :4])
    assert np.all(np.isinf(fin[4:]))
    w, t = next_arrival(jnp.array([2.0, 1.0, 1.0, jnp.inf]))
    assert int(w) == 1 and float(t) == 1.0
