"""Tests for jbyz.models: every registered model, the functional adapter, BN / GN / dropout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jbyz.models import MODELS, build_model, num_params, per_worker_grads
from jbyz.registry import ConfigError

SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "cifar": (32, 32, 3)}
VARIANTS = [(name, {}) for name in MODELS.names()] + [("resnet20", {"norm": "group"})]


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# Tests run tiny inputs: compile time dominates, so skip XLA's backend optimisations.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

_japply = _jit(
    lambda m, p, s, x, k, train: m.apply(p, s, x, train=train, key=k), static_argnums=(0, 5)
)


def japply(m, params, state, x, *, train, key=None):
    """Compiled ``m.apply`` (eager NNX execution is slow: one dispatch per op)."""
    return _japply(m, params, state, x, key, train)


def _normal(shape, seed=0):
    """Test inputs from numpy (eager jax.random compiles one program per shape: slow)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _ints(shape, seed=0, high=10):
    return jnp.asarray(np.random.default_rng(seed + 1000).integers(0, high, shape), jnp.int32)


def _batch(shape, b=3, seed=0):
    return _normal((b, *shape), seed), _ints((b,), seed)


@pytest.mark.parametrize("name,kw", VARIANTS, ids=lambda v: str(v))
def test_builds_for_every_input_shape(name, kw):
    """Every model builds and traces (train and eval) for digits-, MNIST- and CIFAR-shaped
    inputs. (Tracing checks every shape; compiled runs are in the tests below.)"""
    for shape in SHAPES.values():
        m = build_model(name, shape, 10, key=jax.random.key(0), **kw)
        x, _ = _batch(shape, b=2)

        def both(p, s, x, key, m=m):
            lt, st = m.apply(p, s, x, train=True, key=key)
            le, se = m.apply(p, s, x, train=False)
            return lt, st, le, se

        lt, st, le, se = jax.eval_shape(both, m.params, m.state, x, jax.random.key(1))
        for logits in (lt, le):
            assert logits.shape == (2, 10) and logits.dtype == jnp.float32
        for s in (st, se):
            assert jax.tree.structure(s) == jax.tree.structure(m.state)
        assert m.num_params == num_params(m.params) > 0
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((m.params, m.state)))
        # ravel_pytree round trip (traced only: eager unravel compiles a large split)
        flat, back = jax.eval_shape(
            lambda p: (ravel_pytree(p)[0], ravel_pytree(p)[1](ravel_pytree(p)[0])), m.params
        )
        assert flat.shape == (m.num_params,) and flat.dtype == jnp.float32
        assert jax.tree.structure(back) == jax.tree.structure(m.params)


@pytest.mark.parametrize("name", ["logreg", "mlp", "lenet"])
def test_small_models_run_on_every_input_shape(name):
    for shape in SHAPES.values():
        m = build_model(name, shape, 10, key=jax.random.key(0))
        x, _ = _batch(shape, b=2)
        logits, _ = japply(m, m.params, m.state, x, train=True)
        assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_parameter_counts():
    # 784-100-10 MLP and logistic regression of the papers; LeNet with VALID convs on 28x28.
    assert build_model("mlp", (28, 28, 1), 10, key=jax.random.key(0)).num_params == 79_510
    assert build_model("logreg", (28, 28, 1), 10, key=jax.random.key(0)).num_params == 7_850
    lenet = build_model("lenet", (28, 28, 1), 10, key=jax.random.key(0))
    assert lenet.num_params == (25 * 32 + 32) + (25 * 32 * 64 + 64) + (4 * 4 * 64 * 10 + 10)
    # dm_cnn on CIFAR-10: FC 8192 -> 128 as in the paper; BN scale+bias per channel.
    convs = (3 * 64 * 9 + 64) + (64 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + (128 * 128 * 9 + 128)
    bns = 2 * (64 + 64 + 128 + 128)
    fcs = 8192 * 128 + 128 + 128 * 10 + 10
    assert build_model("dm_cnn", (32, 32, 3), 10, key=jax.random.key(0)).num_params == (
        convs + bns + fcs
    )
    assert build_model("dm_cnn", (32, 32, 3), 100, key=jax.random.key(0)).params["fc1"][
        "kernel"
    ].shape == (8192, 256)
    # ResNet-20, option-A shortcuts: ~0.27M parameters (He et al. 2016, Table 6).
    r = build_model("resnet20", (32, 32, 3), 10, key=jax.random.key(0))
    assert 268_000 < r.num_params < 273_000
    rg = build_model("resnet20", (32, 32, 3), 10, key=jax.random.key(0), norm="group")
    assert rg.num_params == r.num_params  # GN has the same affine parameters as BN
    rb = build_model("resnet20", (32, 32, 3), 10, key=jax.random.key(0), shortcut="B")
    assert rb.num_params > r.num_params


def test_regression_output_is_flat():
    m = build_model("mlp", (5,), 1, key=jax.random.key(0), hidden=(8, 8))
    out, _ = m.apply(m.params, m.state, jnp.ones((4, 5)), train=False)
    assert out.shape == (4,)


def test_config_errors():
    with pytest.raises(ConfigError, match="mlp"):
        build_model("mpl", (8, 8, 1), 10, key=jax.random.key(0))
    with pytest.raises(ConfigError, match="hidden"):
        build_model("lenet", (8, 8, 1), 10, key=jax.random.key(0), hidden=(3,))
    with pytest.raises(ConfigError, match="H, W, C"):
        build_model("lenet", (20,), 10, key=jax.random.key(0))
    with pytest.raises(ConfigError, match="norm"):
        build_model("resnet20", (8, 8, 1), 10, key=jax.random.key(0), norm="layer")
    with pytest.raises(ConfigError, match="vanishes"):
        build_model("lenet", (8, 8, 1), 10, key=jax.random.key(0), padding="VALID")


def test_apply_is_pure_and_jittable():
    m = build_model("mlp", (8, 8, 1), 10, key=jax.random.key(0))
    before = jax.tree.map(np.array, m.params)
    x, _ = _batch((8, 8, 1), b=4)
    eager, _ = m.apply(m.params, m.state, x, train=False)
    jitted, _ = japply(m, m.params, m.state, x, train=False)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(eager, m.apply(m.params, m.state, x, train=False)[0])
    jax.tree.map(np.testing.assert_array_equal, before, m.params)


def test_vmap_grad_over_workers_matches_loop():
    """jax.vmap(jax.grad(loss)) over a worker axis (BatchNorm + dropout model) == one grad per
    worker computed sequentially (lax.map)."""
    m = build_model("dm_cnn", (8, 8, 1), 10, key=jax.random.key(0))
    n, b = 2, 4
    x, y = _normal((n, b, 8, 8, 1), 1), _ints((n, b), 1)
    keys = jax.random.split(jax.random.key(2), n)

    def loss(p, x, y, k):
        logits, new_state = m.apply(p, m.state, x, train=True, key=k)
        return _xent(logits, y), new_state

    g1 = jax.grad(loss, has_aux=True)

    @_jit
    def both(p, x, y, keys):
        vm = jax.vmap(g1, in_axes=(None, 0, 0, 0))(p, x, y, keys)
        seq = jax.lax.map(lambda a: g1(p, *a), (x, y, keys))
        return vm, seq

    vm, seq = both(m.params, x, y, keys)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=2e-4, atol=2e-5), vm, seq)
    # gradients are non-trivial and differ between workers; BN state is per worker
    flat = jax.vmap(lambda g: ravel_pytree(g)[0])(vm[0])
    assert float(jnp.linalg.norm(flat[0])) > 1e-3
    assert float(jnp.linalg.norm(flat[0] - flat[1])) > 1e-4
    assert all(leaf.shape[0] == n for leaf in jax.tree.leaves(vm[1]))


def test_per_worker_grads_methods_agree():
    m = build_model("lenet", (8, 8, 1), 10, key=jax.random.key(0))
    x, y = _normal((2, 4, 8, 8, 1), 1), _ints((2, 4), 2)
    keys = jax.random.split(jax.random.key(3), 2)
    fns = {k: per_worker_grads(m, _xent, method=k) for k in ("vmap", "unroll", "map", "auto")}

    @_jit
    def run(p, s, x, y, keys):
        return {k: f(p, s, x, y, keys)[0] for k, f in fns.items()}

    out = run(m.params, m.state, x, y, keys)
    for k in ("unroll", "map", "auto"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                     out["vmap"], out[k])
    assert fns["auto"].method == ("unroll" if jax.default_backend() == "cpu" else "vmap")
    mlp = build_model("mlp", (8, 8, 1), 10, key=jax.random.key(0))
    assert per_worker_grads(mlp, _xent).method == "vmap"
    with pytest.raises(ConfigError):
        per_worker_grads(m, _xent, method="nope")


def test_batchnorm_and_dropout():
    """BN state updates in train mode and is used (unchanged) in eval mode; dropout depends on
    the key in train mode only; nothing the caller holds is mutated."""
    m = build_model("dm_cnn", (8, 8, 1), 10, key=jax.random.key(0))
    before = jax.tree.map(np.array, (m.params, m.state))
    x = 3.0 + 2.0 * _normal((8, 8, 8, 1), 1)
    x2 = x.at[1:].set(-x[1:])  # same first row, different rest of the batch
    k1, k2 = jax.random.split(jax.random.key(2))

    @_jit
    def run(p, s, x, key):
        lt, st = m.apply(p, s, x, train=True, key=key)
        le, se = m.apply(p, s, x, train=False, key=key)
        return lt, st, le, se

    t1, s1, e0, se0 = run(m.params, m.state, x, k1)
    jax.tree.map(np.testing.assert_array_equal, se0, m.state)  # eval leaves stats alone
    assert float(jnp.abs(s1["bn0"]["mean"] - m.state["bn0"]["mean"]).max()) > 1e-3
    assert float(jnp.abs(s1["bn0"]["var"] - m.state["bn0"]["var"]).max()) > 1e-3
    jax.tree.map(np.testing.assert_array_equal, before, (m.params, m.state))

    t1b, s1b, _, _ = run(m.params, m.state, x, k1)  # same key: same output
    np.testing.assert_array_equal(t1, t1b)
    jax.tree.map(np.testing.assert_array_equal, s1, s1b)
    t2, _, e0k2, _ = run(m.params, m.state, x, k2)  # other key: other dropout mask
    assert float(jnp.abs(t1 - t2).max()) > 1e-4
    np.testing.assert_array_equal(e0, e0k2)  # eval ignores the key

    _, _, e1, _ = run(m.params, s1, x, k1)  # eval uses the running stats ...
    assert float(jnp.abs(e0 - e1).max()) > 1e-4
    t3, _, e3, _ = run(m.params, s1, x2, k1)  # ... and not the rest of the batch; train does
    np.testing.assert_allclose(e3[0], e1[0], rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(t3[0] - run(m.params, s1, x, k1)[0][0]).max()) > 1e-4

    with pytest.raises(ValueError, match="key"):
        jax.eval_shape(lambda p: m.apply(p, m.state, x, train=True), m.params)
    m0 = build_model("dm_cnn", (8, 8, 1), 10, key=jax.random.key(0), dropout=0.0)
    jax.eval_shape(lambda p: m0.apply(p, m0.state, x, train=True), m0.params)  # no key needed


def test_resnet20_batchnorm_and_groupnorm():
    x = _normal((5, 8, 8, 1), 1)
    x2 = x.at[1:].set(0.0)
    gn = build_model("resnet20", (8, 8, 1), 10, key=jax.random.key(0), norm="group")
    assert gn.state == {} and not gn.has_state
    f = _jit(lambda p, x: gn.apply(p, gn.state, x, train=True))
    (full, state), (other, _) = f(gn.params, x), f(gn.params, x2)
    assert state == {}
    np.testing.assert_allclose(other[0], full[0], rtol=1e-4, atol=1e-5)  # per-sample normalisation
    assert bool(jnp.all(jnp.isfinite(full)))

    bn = build_model("resnet20", (8, 8, 1), 10, key=jax.random.key(0))
    assert bn.has_state and len(jax.tree.leaves(bn.state)) == 2 * (1 + 2 * 9)
    logits, new_state = japply(bn, bn.params, bn.state, x, train=True)
    assert logits.shape == (5, 10) and bool(jnp.all(jnp.isfinite(logits)))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state, bn.state)
    assert min(jax.tree.leaves(moved)) > 0


def test_init_depends_on_key():
    a = build_model("lenet", (8, 8, 1), 10, key=jax.random.key(0))
    b = build_model("lenet", (8, 8, 1), 10, key=jax.random.key(0))
    c = build_model("lenet", (8, 8, 1), 10, key=jax.random.key(1))
    np.testing.assert_array_equal(ravel_pytree(a.params)[0], ravel_pytree(b.params)[0])
    assert not np.allclose(ravel_pytree(a.params)[0], ravel_pytree(c.params)[0])


def test_predict_in_chunks_matches_apply():
    m = build_model("lenet", (8, 8, 1), 10, key=jax.random.key(0))
    x, _ = _batch((8, 8, 1), b=23)
    full, _ = japply(m, m.params, m.state, x, train=False)
    chunked = _jit(lambda p, x: m.predict(p, m.state, x, chunk_size=5))(m.params, x)
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5)


def test_tiny_model_overfits_tiny_batch():
    x, y = _batch((8, 8, 1), b=16, seed=3)
    m = build_model("mlp", (8, 8, 1), 10, key=jax.random.key(0), hidden=(32,))
    opt = optax.adam(1e-2)

    def loss(p):
        return _xent(m.apply(p, m.state, x, train=True)[0], y)

    @_jit
    def train(p):
        def step(carry, _):
            p, o = carry
            g = jax.grad(loss)(p)
            u, o = opt.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        return jax.lax.scan(step, (p, opt.init(p)), None, length=150)[0][0]

    p = train(m.params)
    logits, _ = japply(m, p, m.state, x, train=False)
    assert float(_jit(loss)(p)) < 0.05 < float(_jit(loss)(m.params))
    assert bool(jnp.all(jnp.argmax(logits, -1) == y))


@pytest.mark.parametrize(
    "kernel,strides,padding",
    [((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), "SAME"), ((1, 1), (2, 2), "SAME"),
     ((5, 5), (1, 1), "VALID"), ((3, 2), (2, 1), ((1, 2), (0, 1))),
     ((3, 2), (1, 1), ((1, 2), (0, 1))), ((1, 1), (1, 1), ((1, 1), (0, 2)))],
)
def test_loop_friendly_conv_gradient_matches_xla(kernel, strides, padding):
    """The custom kernel and input gradients (used by default, fast inside lax.scan on CPU) ==
    XLA's; stride 1 takes the explicit input-gradient convolution, padding wider than the
    kernel and other strides XLA's own transpose."""
    from jbyz.models import _loop_friendly_conv_general_dilated as fast_conv

    x, w = _normal((2, 7, 6, 3), 1), _normal((*kernel, 3, 4), 2)
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(conv, x, w):
        y = conv(x, w, strides, padding, dimension_numbers=dn)
        return jnp.sum(jnp.sin(y))

    @_jit
    def grads(x, w):
        ref = jax.grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(x, w)
        new = jax.grad(functools.partial(loss, fast_conv), (0, 1))(x, w)
        # and inside a loop body, where the fast formulation matters
        in_scan = jax.lax.scan(
            lambda c, _: (c, jax.grad(functools.partial(loss, fast_conv), (0, 1))(x, w)),
            0.0, None, length=2)[1]
        return ref, new, jax.tree.map(lambda a: a[1], in_scan)

    ref, new, in_scan = grads(x, w)
    for got in (new, in_scan):
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(ref[1]).max()) > 1e-3
