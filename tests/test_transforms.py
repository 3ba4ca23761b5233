"""The optax drop-in: momentum, attack stage, robust aggregation, normalisation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

import jbyz
from jbyz import aggregators, attacks, preaggregators
from jbyz.transforms import stack_to_matrix

N = 6


def _tree(key, n=N):
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (n, 3, 2)), "b": jax.random.normal(k2, (n, 4))}


def test_stack_to_matrix_roundtrip_keeps_structure_and_dtype():
    t = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((3, 2, 2), jnp.bfloat16)}
    x, unravel = stack_to_matrix(t)
    assert x.shape == (3, 8) and x.dtype == jnp.float32
    back = jax.vmap(unravel)(x)
    chex.assert_trees_all_equal(back, t)
    assert back["b"].dtype == jnp.bfloat16


@pytest.mark.parametrize("first", ["gradient", "zero"])
def test_worker_momentum_ema(first):
    tx = jbyz.worker_momentum(0.9, N, form="ema", first=first)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
    st = tx.init(params)
    g0, g1 = _tree(jax.random.key(0)), _tree(jax.random.key(1))
    u0, st = tx.update(g0, st)
    u1, st = tx.update(g1, st)
    m0 = g0["w"] if first == "gradient" else 0.1 * g0["w"]
    np.testing.assert_allclose(u0["w"], m0, rtol=1e-6)
    np.testing.assert_allclose(u1["w"], 0.9 * m0 + 0.1 * g1["w"], rtol=1e-5)


def test_worker_momentum_sum_nesterov_and_valid_mask():
    tx = jbyz.worker_momentum(0.5, N, form="sum", nesterov=True)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
    st = tx.init(params)
    g0, g1 = _tree(jax.random.key(0)), _tree(jax.random.key(1))
    _, st = tx.update(g0, st)
    valid = jnp.arange(N) < 4
    out, st2 = tx.update(g1, st, valid=valid)
    m1 = 0.5 * g0["b"] + g1["b"]
    np.testing.assert_allclose(out["b"][:4], g1["b"][:4] + 0.5 * m1[:4], rtol=1e-5)
    # invalid workers keep their momentum
    np.testing.assert_allclose(st2.momentum["b"][4:], g0["b"][4:], rtol=1e-6)
    np.testing.assert_allclose(st2.momentum["b"][:4], m1[:4], rtol=1e-6)


def test_byzantine_stage_replaces_only_byzantine_rows():
    f = 2
    tx = jbyz.byzantine(attacks.sign_flip(scale=-10.0), f, N)
    g = _tree(jax.random.key(3))
    st = tx.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)})
    out, _ = jax.jit(tx.update)(g, st)
    np.testing.assert_allclose(out["w"][f:], g["w"][f:])
    np.testing.assert_allclose(out["w"][:f], -10.0 * g["w"][:f], rtol=1e-6)


def test_robust_aggregate_median_matches_numpy_and_is_optax_aggregator():
    tx = jbyz.robust_aggregate(aggregators.median(), f=2, num_workers=N)
    assert isinstance(tx, aggregating.Aggregator)
    g = _tree(jax.random.key(4))
    st = tx.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)})
    out, _ = jax.jit(tx.update)(g, st)
    np.testing.assert_allclose(out["w"], np.median(np.asarray(g["w"]), axis=0), rtol=1e-6)
    np.testing.assert_allclose(out["b"], np.median(np.asarray(g["b"]), axis=0), rtol=1e-6)


def test_robust_aggregate_f_extra_arg_and_valid_mask():
    tx = jbyz.robust_aggregate(aggregators.trimmed_mean(), f=0, num_workers=N)
    g = _tree(jax.random.key(5))
    st = tx.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)})
    out0, _ = tx.update(g, st)
    np.testing.assert_allclose(out0["b"], np.mean(np.asarray(g["b"]), 0), rtol=1e-5)
    out1, _ = tx.update(g, st, f=1)
    s = np.sort(np.asarray(g["b"]), 0)[1:-1].mean(0)
    np.testing.assert_allclose(out1["b"], s, rtol=1e-5)
    valid = jnp.arange(N) < 4
    out2, _ = tx.update(g, st, valid=valid, f=0)
    np.testing.assert_allclose(out2["b"], np.mean(np.asarray(g["b"])[:4], 0), rtol=1e-5)


def test_inject_hyperparams_changes_declared_f():
    make = optax.inject_hyperparams(
        jbyz.robust_aggregate, static_args=("aggregator", "num_workers", "preaggregators", "seed")
    )
    tx = make(aggregator=aggregators.trimmed_mean(), f=0, num_workers=N)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
    st = tx.init(params)
    g = _tree(jax.random.key(6))
    out0, st = jax.jit(tx.update)(g, st)
    st.hyperparams["f"] = jnp.asarray(2)
    out2, _ = jax.jit(tx.update)(g, st)
    np.testing.assert_allclose(out0["b"], np.mean(np.asarray(g["b"]), 0), rtol=1e-5)
    np.testing.assert_allclose(out2["b"], np.sort(np.asarray(g["b"]), 0)[2:-2].mean(0), rtol=1e-5)


def test_chain_vmaps_over_runs_like_a_loop():
    """A batch of runs with different momentum and f equals running them one by one."""
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)}

    def run(beta, f, key):
        tx = optax.chain(
            jbyz.worker_momentum(beta, N),
            jbyz.byzantine(attacks.alie(), f, N),
            jbyz.robust_aggregate(aggregators.trimmed_mean(), f, N,
                                  preaggregators=(preaggregators.bucketing(s=2),)),
            jbyz.normalize(),
            optax.sgd(0.1),
        )
        st = tx.init(params)
        p = params
        for t in range(3):
            g = _tree(jax.random.fold_in(key, t))
            u, st = tx.update(g, st, p, key=jax.random.fold_in(key, 100 + t))
            p = optax.apply_updates(p, u)
        return p

    betas = jnp.array([0.0, 0.5, 0.9])
    fs = jnp.array([0, 1, 1])  # bucketing s=2 leaves 3 rows: trimmed mean needs f <= 1
    keys = jax.random.split(jax.random.key(7), 3)
    batched = jax.jit(jax.vmap(run))(betas, fs, keys)
    for i in range(3):
        one = run(betas[i], fs[i], keys[i])
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], batched), one, rtol=1e-5, atol=1e-6)


def test_normalize_unit_norm_and_zero_safe():
    tx = jbyz.normalize()
    u = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    out, _ = tx.update(u, tx.init(u))
    np.testing.assert_allclose(optax.tree.norm(out), 1.0, rtol=1e-6)
    z, _ = tx.update(jax.tree.map(jnp.zeros_like, u), tx.init(u))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(z))


def test_clip_per_worker():
    tx = jbyz.clip_per_worker(1.0, N)
    g = _tree(jax.random.key(8))
    out, _ = tx.update(g, tx.init(None))
    x, _ = stack_to_matrix(out)
    x0, _ = stack_to_matrix(g)
    norms, norms0 = np.linalg.norm(x, axis=1), np.linalg.norm(x0, axis=1)
    np.testing.assert_allclose(norms, np.minimum(norms0, 1.0), rtol=1e-5)


def test_compatible_with_optax_experimental_process():
    n = 5
    agg = jbyz.robust_aggregate(aggregators.median(), f=1, num_workers=n)
    opt = aggregating.process(optax.identity(), agg, optax.sgd(1.0))
    params = jnp.zeros(3)
    st = opt.init(params)
    g = jnp.array([[1.0, 2, 3], [1, 2, 3], [1, 2, 3], [100, -100, 100], [1.5, 2, 3]])
    upd, _ = opt.update(g, st, params)
    np.testing.assert_allclose(upd, -np.array([1.0, 2, 3]), rtol=1e-6)
