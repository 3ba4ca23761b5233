"""RandK / identity compressors: exact structure, unbiasedness and variance against the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbyz.compression import COMPRESSORS, identity, randk, randk_mask, resolve_k
from jbyz.registry import ConfigError


def test_registry_and_identity():
    assert set(COMPRESSORS.names()) >= {"identity", "randk"}
    x = jnp.arange(12.0).reshape(3, 4)
    q = identity()
    np.testing.assert_array_equal(q(x, jax.random.key(0)), x)
    assert q.omega(4) == 0.0 and q.bound(4) == 1.0 and q.zeta(4) == 4.0


@pytest.mark.parametrize("d,k", [(10, 3), (7, 1), (5, 5)])
def test_randk_structure(d, k):
    """Exactly K non-zeros per row, each equal to (d/K) x_j, rows with distinct masks."""
    n = 64
    x = jax.random.normal(jax.random.key(1), (n, d)) + 3.0  # no zero entries
    y = np.asarray(randk(k=k)(x, jax.random.key(2)))
    nz = y != 0
    np.testing.assert_array_equal(nz.sum(axis=1), np.full(n, k))
    np.testing.assert_allclose(y[nz], (d / k) * np.asarray(x)[nz], rtol=1e-6)
    if k < d:
        assert len({tuple(r) for r in nz}) > 1  # independent masks per row


def test_randk_parameters():
    q = randk(k=25)
    assert q.omega(100) == pytest.approx(3.0)
    assert q.zeta(100) == 25 and q.bound(100) == pytest.approx(4.0)
    assert resolve_k(1000, ratio=0.01) == 10
    assert resolve_k(50, ratio=0.001) == 1
    assert resolve_k(5, k=9) == 5
    with pytest.raises(ConfigError):
        resolve_k(10, k=0)
    with pytest.raises(ConfigError):
        resolve_k(10, ratio=1.5)


def test_randk_unbiased_and_variance():
    """E[Q(x)] = x and E||Q(x) - x||^2 = (d/K - 1)||x||^2, within 5 standard errors.

    The standard errors are computed from the exact per-coordinate variance x_j^2 (d/K - 1), so a
    compressor scaled by d/(K+1) (bias 25% here) or one keeping K-1 coordinates fails.
    """
    d, k, n = 8, 2, 40000
    x = jnp.array([1.0, -2.0, 0.5, 3.0, 0.0, -1.0, 2.5, 1.5])
    xs = jnp.broadcast_to(x, (n, d))
    y = np.asarray(randk(k=k)(xs, jax.random.key(7)), np.float64)
    xn = np.asarray(x, np.float64)
    omega = d / k - 1
    se = np.sqrt(omega) * np.abs(xn) / np.sqrt(n)
    assert np.all(np.abs(y.mean(0) - xn) <= 5 * se + 1e-12)
    err2 = ((y - xn) ** 2).sum(1)
    assert abs(err2.mean() - omega * (xn @ xn)) <= 5 * err2.std() / np.sqrt(n)
    # inclusion probability K/d for every coordinate, pairwise inclusion K(K-1)/(d(d-1))
    kept = y != 0
    freq = kept[:, xn != 0].mean(0)
    assert np.all(np.abs(freq - k / d) <= 5 * np.sqrt(k / d * (1 - k / d) / n))
    both = (kept[:, 0] & kept[:, 1]).mean()
    pij = k * (k - 1) / (d * (d - 1))
    assert abs(both - pij) <= 5 * np.sqrt(pij * (1 - pij) / n)


def test_randk_rows_independent_of_stack_and_keys():
    x = jax.random.normal(jax.random.key(3), (6, 20))
    q = randk(k=4)
    key = jax.random.key(11)
    a = q(x, key)
    b = q(jnp.concatenate([x, jnp.ones((3, 20))]), key)[:6]
    np.testing.assert_array_equal(a, b)  # a row's mask depends on (key, row) only
    c = q(x, jax.random.fold_in(key, 1))  # another round
    assert not np.array_equal(np.asarray(a) != 0, np.asarray(c) != 0)
    # the masks of two rows are independent: P(coordinate j kept by both) = (K/d)^2
    keys = jax.random.split(jax.random.key(5), 20000)
    m = jax.vmap(lambda kk: q(jnp.ones((2, 20)), kk) != 0)(keys)
    both = np.asarray(m[:, 0] & m[:, 1]).mean()
    assert abs(both - 0.04) < 5 * np.sqrt(0.04 * 0.96 / (20000 * 20))


def test_randk_jit_vmap_and_mask():
    q = randk(ratio=0.25)
    x = jnp.ones((3, 16))
    keys = jax.random.split(jax.random.key(0), 4)
    out = jax.jit(jax.vmap(q.apply, in_axes=(None, 0)))(x, keys)
    assert out.shape == (4, 3, 16)
    np.testing.assert_array_equal((out != 0).sum(-1), np.full((4, 3), 4))
    m = randk_mask(jax.random.key(9), 10, 3)
    assert m.dtype == bool and int(m.sum()) == 3
