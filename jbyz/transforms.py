"""optax gradient transformations built from the jbyz kernels: the drop-in.

Stages before :func:`robust_aggregate` see updates with a leading worker axis ``[n, ...]``
(one row per worker slot, e.g. from ``jax.vmap(jax.grad(loss))``); :func:`robust_aggregate`
maps them to a single update; stages after it are ordinary optax transforms::

    tx = optax.chain(
        jbyz.clip_per_worker(2.0, num_workers=10),       # optional, honest-side clipping
        jbyz.worker_momentum(0.9, num_workers=10),        # per-worker state [n, ...]
        jbyz.byzantine(jbyz.attacks.alie(), f_real=3, num_workers=10),   # simulation only
        jbyz.robust_aggregate(jbyz.aggregators.trimmed_mean(), f=3, num_workers=10),
        jbyz.normalize(),                                 # ByzSGDnm
        optax.sgd(0.1),
    )

Per-step inputs travel as keyword ``extra_args`` (optax's ``GradientTransformationExtraArgs``):

* ``valid``: ``[n]`` bool, the worker slots taking part this step (default: all);
* ``f``: the declared number of Byzantine workers (overrides the factory's ``f``);
* ``key``: a typed PRNG key for this step (default: a key kept in the transform state);
* ``reference``: a server-side reference update (same structure as one worker's update) for
  rules with ``needs_reference`` (dSTAR's validation gradient).

Every numeric factory argument may be a traced array, so the transforms work under ``jit``,
``vmap`` over runs, and ``optax.inject_hyperparams``. :func:`robust_aggregate` returns an
:class:`optax.experimental.aggregating.Aggregator`, optax's own contract for per-element
aggregation, so it also composes with ``optax.experimental.aggregating.process``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from jbyz.types import Aggregator, Attack, PreAggregator, byzantine_mask

# Salts so that stages drawing from one per-step key use independent streams.
_SALT_ATTACK = 0x5EED_A7
_SALT_AGGREGATE = 0x5EED_A6


# ----------------------------------------------------------------------------- helpers


def stack_to_matrix(updates) -> tuple[jax.Array, Any]:
    """Ravels a pytree with a leading worker axis into ``[n, d]`` float32 plus an unravel function.

    Returns:
      ``(x, unravel)`` where ``x`` is ``[n, d]`` and ``unravel(v [d])`` rebuilds one worker's
      pytree (in the original dtypes) and ``unravel_stack(x [n, d])`` is ``jax.vmap(unravel)``.
    """
    leaves, treedef = jax.tree.flatten(updates)
    n = leaves[0].shape[0]
    shapes = [leaf.shape[1:] for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [math.prod(s) for s in shapes]
    x = jnp.concatenate([leaf.reshape(n, -1).astype(jnp.float32) for leaf in leaves], axis=1)

    def unravel(v):
        out, start = [], 0
        for shape, dtype, size in zip(shapes, dtypes, sizes):
            out.append(v[..., start : start + size].reshape(v.shape[:-1] + shape).astype(dtype))
            start += size
        return jax.tree.unflatten(treedef, out)

    return x, unravel


def _num_params(params) -> int:
    return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params))


def _step_key(state_key, extra_key, salt):
    """The key for this step: the caller's ``key`` extra-arg if given, else the state's key."""
    if extra_key is not None:
        return jax.random.fold_in(extra_key, salt), state_key
    new_state_key, sub = jax.random.split(state_key)
    return sub, new_state_key


def _valid_or_all(valid, n):
    return jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)


def _stack_zeros(params, n):
    return jax.tree.map(lambda p: jnp.zeros((n,) + jnp.shape(p), jnp.asarray(p).dtype), params)


# ----------------------------------------------------------------------------- worker side


class WorkerMomentumState(NamedTuple):
    count: jax.Array  # int32 [], steps taken
    momentum: Any  # pytree, leaves [n, ...]


def worker_momentum(
    beta: float,
    num_workers: int,
    *,
    form: str = "ema",
    nesterov: bool = False,
    first: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum kept at each worker, applied before the (simulated) sending.

    EMA form (ByzSGDnm, Karimireddy et al. 2021):
    :math:`u^{(i)}_t = \beta u^{(i)}_{t-1} + (1-\beta) g^{(i)}_t`, with :math:`u^{(i)}_0 = g^{(i)}_0`
    when ``first="gradient"`` (the papers' choice) or :math:`u_{-1}=0` when ``first="zero"``.
    Sum form (heavy ball, El Mhamdi et al. 2021 code, PyTorch):
    :math:`m^{(i)}_t = \beta m^{(i)}_{t-1} + g^{(i)}_t`, :math:`m_{-1} = 0`.
    With ``nesterov=True`` the worker sends :math:`g_t + \beta m_t` (sum) or
    :math:`(1-\beta) g_t + \beta u_t` (EMA), optax's reformulation of Nesterov momentum.
    Workers with ``valid=False`` this step keep their momentum unchanged.

    Args:
      beta: momentum coefficient in [0, 1) (may be traced).
      num_workers: ``n``, the size of the leading worker axis.
      form: ``"ema"`` or ``"sum"``.
      nesterov: send the Nesterov look-ahead combination.
      first: EMA initialisation, ``"gradient"`` or ``"zero"``.

    Returns:
      A transform mapping per-worker updates ``[n, ...]`` to per-worker momenta ``[n, ...]``.

    References:
      El Mhamdi, Guerraoui, Rouault, "Distributed Momentum for Byzantine-resilient Stochastic
      Gradient Descent", ICLR 2021; Karimireddy, He, Jaggi, "Learning from History for
      Byzantine Robust Optimization", ICML 2021.
    """
    if form not in ("ema", "sum"):
        raise ValueError(f"worker_momentum form must be 'ema' or 'sum', got {form!r}")
    if first not in ("gradient", "zero"):
        raise ValueError(f"worker_momentum first must be 'gradient' or 'zero', got {first!r}")

    def init_fn(params):
        return WorkerMomentumState(jnp.zeros([], jnp.int32), _stack_zeros(params, num_workers))

    def update_fn(updates, state, params=None, *, valid=None, **extra):
        del params, extra
        valid_ = _valid_or_all(valid, num_workers)

        def one(g, m):
            if form == "sum":
                new = beta * m + g
                out = g + beta * new if nesterov else new
            else:
                ema = beta * m + (1.0 - beta) * g
                new = jnp.where(state.count == 0, g, ema) if first == "gradient" else ema
                out = (1.0 - beta) * g + beta * new if nesterov else new
            keep = valid_.reshape((-1,) + (1,) * (g.ndim - 1))
            return jnp.where(keep, out, m).astype(g.dtype), jnp.where(keep, new, m).astype(m.dtype)

        pairs = jax.tree.map(one, updates, state.momentum)
        outs = jax.tree.map(lambda _, p: p[0], updates, pairs)
        moms = jax.tree.map(lambda _, p: p[1], updates, pairs)
        return outs, WorkerMomentumState(state.count + 1, moms)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_per_worker(max_norm: float, num_workers: int) -> optax.GradientTransformationExtraArgs:
    r"""Clips each worker's update to L2 norm ``max_norm``: :math:`g \min(1, c/\|g\|)`.

    Used by honest workers before momentum in El Mhamdi et al. (ICLR 2021), c = 2 (MNIST)
    or 5 (CIFAR). The norm is over the worker's whole pytree.
    """
    del num_workers

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32)).reshape(u.shape[0], -1), axis=1)
                 for u in jax.tree.leaves(updates))
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-30))
        return jax.tree.map(
            lambda u: (u * scale.reshape((-1,) + (1,) * (u.ndim - 1))).astype(u.dtype), updates
        ), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


# ----------------------------------------------------------------------------- attack


class ByzantineState(NamedTuple):
    attack_state: Any
    key: jax.Array
    count: jax.Array


def byzantine(
    attack: Attack, f_real, num_workers: int, *, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the rows of the Byzantine workers (the first ``f_real`` slots) by an attack.

    For simulation only. The attack sees what every honest worker submits at this point of the
    chain (momenta when placed after :func:`worker_momentum`), is omniscient about them, and the
    honest rows pass through unchanged. ``f_real`` (how many workers really are Byzantine) may
    differ from the ``f`` the aggregator is told.

    Args:
      attack: a :class:`jbyz.types.Attack`, e.g. ``jbyz.attacks.alie()``.
      f_real: number of Byzantine workers (may be traced).
      num_workers: ``n``.
      seed: seeds the attack's randomness when no ``key`` extra-arg is given.

    Returns:
      A transform ``[n, ...] -> [n, ...]``.
    """

    def init_fn(params):
        d = _num_params(params)
        return ByzantineState(
            attack.init(num_workers, d), jax.random.key(seed), jnp.zeros([], jnp.int32)
        )

    def update_fn(updates, state, params=None, *, valid=None, key=None, f=None, **extra):
        del extra
        x, unravel = stack_to_matrix(updates)
        valid_ = _valid_or_all(valid, num_workers)
        byz = byzantine_mask(num_workers, f_real) & valid_
        honest = valid_ & ~byz
        step_key, state_key = _step_key(state.key, key, _SALT_ATTACK)
        ctx = {"step": state.count, "params": params, "f": f_real if f is None else f}
        x_out, attack_state = attack.apply(x, honest, byz, step_key, state.attack_state, ctx)
        return unravel(x_out), ByzantineState(attack_state, state_key, state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- aggregation


class RobustAggregateState(NamedTuple):
    pre_states: tuple
    agg_state: Any
    key: jax.Array


def robust_aggregate(
    aggregator: Aggregator,
    f,
    num_workers: int,
    *,
    preaggregators: Sequence[PreAggregator] = (),
    seed: int = 0,
) -> aggregating.Aggregator:
    r"""Robustly aggregates per-worker updates ``[n, ...]`` into one update ``[...]``.

    Each worker's pytree is ravelled into a row of ``X in R^{n x d}`` (float32), passed through
    the pre-aggregators in order (bucketing, NNM, clipping, ARC ...) and the aggregator:
    :math:`\hat g = \mathrm{Agg}(\mathrm{Pre}_k(\cdots\mathrm{Pre}_1(X)))`, then unravelled into the
    parameter structure. Stateful rules (centered clipping's centre) keep their state here.

    Args:
      aggregator: a :class:`jbyz.types.Aggregator`, e.g. ``jbyz.aggregators.median()``.
      f: declared number of Byzantine workers (may be traced; the ``f`` extra-arg overrides it).
      num_workers: ``n``.
      preaggregators: :class:`jbyz.types.PreAggregator` stages applied before ``aggregator``.
      seed: seeds key-driven stages when no ``key`` extra-arg is given.

    Returns:
      An :class:`optax.experimental.aggregating.Aggregator` (a ``GradientTransformationExtraArgs``).
    """

    def init_fn(params):
        d = _num_params(params)
        rows, pre_states = num_workers, []
        for pre in preaggregators:
            pre_states.append(pre.init(rows, d))
            rows = pre.out_rows(rows)
        return RobustAggregateState(
            tuple(pre_states), aggregator.init(rows, d), jax.random.key(seed)
        )

    def update_fn(updates, state, params=None, *, valid=None, key=None, f=None, reference=None,
                  **extra):
        del params, extra
        x, unravel = stack_to_matrix(updates)
        v = _valid_or_all(valid, num_workers)
        f_ = jnp.asarray(f_default if f is None else f, jnp.int32)
        step_key, state_key = _step_key(state.key, key, _SALT_AGGREGATE)
        keys = jax.random.split(step_key, len(preaggregators) + 1)
        new_pre = []
        for i, (pre, ps) in enumerate(zip(preaggregators, state.pre_states)):
            x, v, f_, ps = pre.apply(x, v, f_, keys[i], ps)
            new_pre.append(ps)
        kw = {}
        if getattr(aggregator, "needs_reference", False):
            if reference is None:
                raise ValueError(f"aggregator {aggregator.name!r} needs a server reference vector: "
                                 "pass reference=... as an extra argument")
            kw["reference"] = stack_to_matrix(jax.tree.map(lambda r: r[None], reference))[0][0]
        out, agg_state = aggregator.apply(x, v, f_, keys[-1], state.agg_state, **kw)
        return unravel(out), RobustAggregateState(tuple(new_pre), agg_state, state_key)

    f_default = f
    return aggregating.Aggregator(init_fn, update_fn)


# ----------------------------------------------------------------------------- server side


def normalize(eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
    r"""Normalises the aggregated update to unit global L2 norm: :math:`u / \max(\|u\|_2, \epsilon)`.

    The step of ByzSGDnm (Yang, Shi, Li, "On the Effect of Batch Size in Byzantine-Robust
    Distributed Learning", ICLR 2024): the norm is over the whole parameter vector, not per layer.
    Place it after :func:`robust_aggregate` and before the learning-rate step.
    """

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        norm = optax.tree.norm(updates)
        scale = 1.0 / jnp.maximum(norm, eps)
        return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
