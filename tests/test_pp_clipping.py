"""The partial-participation clipping heuristic over the whole aggregator registry."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbyz.aggregators import AGGREGATORS
from jbyz.algorithms.pp_clipping import clip_deviations, clip_rows, pp_clipping, with_preaggregation
from jbyz.preaggregators import bucketing

N, D, F = 8, 5, 1
_COMPILE = {"bulyan", "dstar", "mda", "geometric_median", "centered_clip", "krum"}


def _np_clip(y, radius):
    norms = np.linalg.norm(y, axis=1)
    return y * np.minimum(1.0, radius / np.where(norms > 0, norms, 1.0))[:, None]


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[:3] *= 50.0  # three far-away rows: a "Byzantine majority" of a small sample would be these
    ref = rng.normal(size=D).astype(np.float32)
    return x, ref


# FLTrust cannot run without the server's reference update (tested below).
@pytest.mark.parametrize("name", [n for n in AGGREGATORS.names() if n != "fltrust"])
def test_equals_aggregator_of_clipped_deviations_plus_reference(name):
    """out = ref + Agg(clip_lambda(x_i - ref)) for every registry rule, same key and state."""
    agg = AGGREGATORS.build(name)
    assert agg.requirement(N, F) is None
    x, ref = _inputs()
    valid = jnp.ones(N, bool)
    key = jax.random.key(4)
    radius = 0.7
    wrapped = clip_deviations(agg)
    y = _np_clip(x.astype(np.float64) - ref, radius).astype(np.float32)

    def both(x, y):
        out, new_state = wrapped(x, valid, F, key, wrapped.init(N, D), center=ref,
                                 radius=radius)
        want, _ = agg(y, valid, F, key, agg.init(N, D))
        return out, new_state, want

    if name in _COMPILE:  # faster compiled than op by op
        both = jax.jit(both)

    out, new_state, want = both(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(out, ref + np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state.reference, out)
    assert bool(new_state.started)
    # Bounded influence: every input is within `radius` of ref after clipping, so the output is
    # within sqrt(n) * radius (coordinate-wise rules) and within radius (convex combinations).
    assert np.linalg.norm(np.asarray(out) - ref) <= np.sqrt(N) * radius + 1e-5
    # Without clipping the far rows move at least the mean and a coordinate-wise rule far away.
    if name == "mean":
        assert np.linalg.norm(x.mean(0) - ref) > 10 * radius


def test_byzantine_majority_is_bounded_by_radius():
    """5 of 8 inputs at 1e6: the clipped aggregate stays within sqrt(n) * radius of the reference."""
    x, ref = _inputs(1)
    x[:5] = 1e6
    for name in ("median", "krum"):
        agg = AGGREGATORS.build(name)
        wrapped = clip_deviations(agg)
        out, _ = wrapped(x, jnp.ones(N, bool), F, jax.random.key(0), center=ref, radius=0.5)
        assert np.all(np.isfinite(out))
        assert np.linalg.norm(np.asarray(out) - ref) <= np.sqrt(N) * 0.5 + 1e-4
        plain, _ = agg(jnp.asarray(x), jnp.ones(N, bool), F, jax.random.key(0))
        assert np.linalg.norm(np.asarray(plain) - ref) > 1e3  # the unclipped rule is taken over


def test_state_driven_reference_and_radius_and_first_call():
    agg = AGGREGATORS.build("median")
    x, _ = _inputs(2)
    valid = jnp.ones(N, bool)
    wrapped = clip_deviations(agg, clip_mult=0.3)
    st = wrapped.init(N, D)
    out1, st = wrapped(x, valid, F, jax.random.key(0), st)  # first call: no clipping
    np.testing.assert_allclose(out1, np.median(x, axis=0), rtol=1e-6)
    x2 = x + 1.0
    out2, st2 = wrapped(x2, valid, F, jax.random.key(1), st)
    r = 0.3 * np.linalg.norm(out1)
    want = np.asarray(out1) + np.median(_np_clip(x2 - np.asarray(out1), r), axis=0)
    np.testing.assert_allclose(out2, want, rtol=1e-5, atol=1e-6)
    out3, _ = wrapped(x2, valid, F, jax.random.key(1), st, clip=False)
    np.testing.assert_allclose(out3, np.median(x2, axis=0), rtol=1e-6)


def test_with_bucketing_and_padding_invariance():
    agg = AGGREGATORS.build("median")
    pre = (bucketing(2),)
    x, ref = _inputs(3)
    key = jax.random.key(5)
    wrapped = clip_deviations(agg, pre)
    inner = with_preaggregation(agg, pre)
    y = _np_clip(x.astype(np.float64) - ref, 1.0).astype(np.float32)
    xp = np.concatenate([x, np.full((3, D), 1e9, np.float32)])
    vp = jnp.arange(N + 3) < N
    ones = jnp.ones(N, bool)

    @jax.jit
    def all_of_it(x, y, xp):
        out, _ = wrapped(x, ones, F, key, center=ref, radius=1.0)
        want, _ = inner(y, ones, F, key)
        k0, k1 = jax.random.split(key)  # manual composition with the same key split
        yb, vb, fb, _ = pre[0](y, ones, F, k0)
        manual, _ = agg(yb, vb, fb, k1)
        outp, _ = wrapped(xp, vp, F, key, center=ref, radius=1.0)  # padded with junk rows
        return out, want, manual, outp

    out, want, manual, outp = all_of_it(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xp))
    np.testing.assert_allclose(out, ref + np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(want, manual, rtol=1e-6)
    np.testing.assert_allclose(outp, out, rtol=1e-6)
    assert wrapped.requirement(N, F) is None
    assert "krum" in clip_deviations(AGGREGATORS.build("krum"), pre).requirement(8, 1)


def test_clip_rows_passes_nonfinite_and_respects_valid():
    x = jnp.array([[3.0, 4.0], [jnp.nan, 1.0], [0.0, 0.0], [30.0, 40.0]])
    out = np.asarray(clip_rows(x, 1.0, jnp.array([True, True, True, False])))
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    assert np.isnan(out[1, 0])
    np.testing.assert_array_equal(out[2], [0.0, 0.0])
    np.testing.assert_array_equal(out[3], [30.0, 40.0])  # invalid row untouched


def test_optax_transform_matches_wrapper_and_vmaps():
    agg = AGGREGATORS.build("geometric_median")
    n = 6
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
    rng = np.random.default_rng(0)
    ups = [{"w": jnp.asarray(rng.normal(size=(n, 2, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)} for _ in range(3)]
    valid = jnp.array([True, True, False, True, False, True])

    def run(mult):
        tx = pp_clipping(agg, 1, n, clip_mult=mult)
        st = tx.init(params)
        outs = []
        for t, u in enumerate(ups):
            o, st = tx.update(u, st, params, valid=valid, key=jax.random.key(t))
            outs.append(jnp.concatenate([o["b"], o["w"].ravel()]))
        return jnp.stack(outs)

    vm = jax.jit(jax.vmap(run))(jnp.array([0.5, 2.0]))
    wrapped = clip_deviations(agg, clip_mult=0.5)
    one = jax.jit(lambda x, key, st: wrapped(x, valid, 1, key, st))
    st = wrapped.init(n, 7)
    for t, u in enumerate(ups):
        x = jnp.concatenate([u["b"], u["w"].reshape(n, 4)], axis=1)  # ravel order: b then w
        key = jax.random.fold_in(jax.random.key(t), 0x5EED_CC)
        o, st = one(x, key, st)
        np.testing.assert_allclose(vm[0, t], o, rtol=1e-5, atol=1e-6)
    assert not np.allclose(vm[1], vm[0])


def test_optax_step_radius_uses_parameter_change():
    agg = AGGREGATORS.build("mean")
    n = 4
    tx = pp_clipping(agg, 0, n, clip_mult=2.0, radius="step")
    p0 = {"w": jnp.zeros(2)}
    st = tx.init(p0)
    u1 = {"w": jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])}
    g1, st = tx.update(u1, st, p0)
    np.testing.assert_allclose(g1["w"], [1.0, 0.0])
    p1 = optax.apply_updates(p0, {"w": -0.1 * g1["w"]})  # |x1 - x0| = 0.1 -> radius 0.2
    u2 = {"w": jnp.array([[1.0, 10.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])}
    g2, st = tx.update(u2, st, p1)
    np.testing.assert_allclose(g2["w"], [1.0, 0.2 / 4], rtol=1e-5)


def test_client_momentum_sampled_and_all_clients_by_hand():
    """m_i <- beta m_i + g_i: only the sampled clients' buffers, or every client's (the authors'
    code computes every worker's gradient each round); the messages are the sampled buffers."""
    from jbyz.algorithms.pp_clipping import client_momentum

    mom = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    clients = jnp.array([2, 0])
    new, msgs = client_momentum(mom, jnp.array([[10.0, 0.0], [0.0, 10.0]]), clients, 0.5)
    np.testing.assert_allclose(new, [[0.5, 10.5], [2.0, 2.0], [11.5, 1.5], [4.0, 4.0]])
    np.testing.assert_allclose(msgs, [[11.5, 1.5], [0.5, 10.5]])
    grads = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, -1.0]])
    new, msgs = client_momentum(mom, grads, clients, 0.5, all_clients=True)
    # clients 1 and 3 were not sampled and still moved
    np.testing.assert_allclose(new, [[1.5, 0.5], [1.0, 2.0], [3.5, 3.5], [1.0, 1.0]])
    np.testing.assert_allclose(msgs, [[3.5, 3.5], [1.5, 0.5]])
    # zero buffers: the first update is the gradient (PyTorch's first momentum_buffer)
    new, msgs = client_momentum(jnp.zeros((4, 2)), grads, clients, 0.9, all_clients=True)
    np.testing.assert_allclose(new, grads)
    with pytest.raises(ValueError, match=r"all_clients=True needs grads of shape \(4, 2\)"):
        client_momentum(mom, grads[:2], clients, 0.5, all_clients=True)
    with pytest.raises(ValueError, match=r"all_clients=False needs grads of shape \(2, 2\)"):
        client_momentum(mom, grads, clients, 0.5)


def test_server_reference_reaches_the_wrapped_rule_and_is_not_the_centre():
    """A rule that needs the server's reference (FLTrust) gets it through the wrapper; the
    clipping centre is ``center=``; ``reference=`` for a rule without one is an error."""
    x, ref = _inputs()
    valid = jnp.ones(N, bool)
    key = jax.random.key(0)
    g0 = jnp.asarray(np.linspace(-1.0, 1.0, D), jnp.float32)
    inner = AGGREGATORS.build("fltrust")
    wrapped = clip_deviations(inner)
    out, _ = wrapped(x, valid, F, key, wrapped.init(N, D), center=ref, radius=0.7, reference=g0)
    y = _np_clip(x.astype(np.float64) - ref, 0.7).astype(np.float32)
    want, _ = inner(y, valid, F, key, inner.init(N, D), reference=g0)
    np.testing.assert_allclose(out, ref + np.asarray(want), rtol=1e-5, atol=1e-6)
    med = clip_deviations(AGGREGATORS.build("median"))
    with pytest.raises(TypeError, match="reference= is the server reference of rules that need "
                                        "one, and median does not; the clipping centre is center="):
        med(x, valid, F, key, med.init(N, D), reference=g0)
