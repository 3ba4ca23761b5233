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
``vmap`` over runs, and ``optax.inject_hyperparams`` (``num_workers`` must be concrete when
``init`` runs). Any other optax transform runs per worker through :func:`per_worker`; gradient
accumulation over ``k`` calls is :class:`MultiSteps`. Rules, pre-aggregators and attacks may be
given as objects, registry names or ``{"name": ..., **hyper-parameters}`` dicts. What ``jbyz
run`` rejects (a rule's requirement, ``f >= n``, a data-level attack) is rejected here with the
same text, and every stage checks that its input has one row per worker. :func:`robust_aggregate` returns an
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

from jbyz.registry import ConfigError, concrete_number
from jbyz.types import AggregationRule, Attack, PreAggregator, byzantine_mask

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


def flat_vector(tree) -> jax.Array:
    """Ravels one pytree (no worker axis) into a ``[d]`` float32 vector, in the leaf order of
    :func:`stack_to_matrix` (e.g. a server reference vector beside the workers' rows)."""
    return stack_to_matrix(jax.tree.map(lambda r: jnp.asarray(r)[None], tree))[0][0]


# ----------------------------------------------------------------------------- argument checks


def _static_int(v) -> int | None:
    """``v`` as a Python int when it is concrete (an int or a concrete 0-d array), else ``None``
    (a tracer: ``optax.inject_hyperparams`` turns numbers into arrays, traced under ``jit``)."""
    c = concrete_number(v)
    return None if c is None else int(c)


def _init_n(num_workers, stage: str) -> int:
    """The worker count at ``init`` (it sets state shapes, so it must be concrete there)."""
    n = _static_int(num_workers)
    if n is None:
        raise TypeError(
            f"{stage}: num_workers must be a concrete integer when the state is built (init), got "
            f"{num_workers!r}. Call tx.init(params) outside jax.jit; with optax.inject_hyperparams "
            f"pass static_args=('num_workers',) to keep it a Python int.")
    if n < 1:
        raise ConfigError(f"{stage}: num_workers must be an integer >= 1, got {n}")
    return n


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "(the single leaf)"


def _worker_rows(updates, params, num_workers, stage: str) -> int:
    """Checks that every leaf of ``updates`` is ``(num_workers,) + param.shape``; returns ``n``.

    One check with one message for every stage that takes per-worker updates: leaves shaped like
    the parameters (gradients of the mean loss instead of one gradient per worker) and a
    ``num_workers`` differing from the gradients' worker axis (or from another stage's) are both
    reported here, at trace time, instead of as a broadcasting error or a silent wrong result.
    """
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    if not flat:
        raise ValueError(f"{stage}: got updates without leaves")
    n = _static_int(num_workers)
    how = ("per-worker gradients stacked on a leading worker axis, e.g. "
           "jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xs, ys) with xs, ys of shape "
           "[num_workers, batch, ...]")
    p_leaves = None
    if params is not None:
        p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
        if len(p_flat) == len(flat):
            p_leaves = [jnp.shape(p) for _, p in p_flat]
    rows = n if n is not None else (jnp.shape(flat[0][1])[0] if jnp.ndim(flat[0][1]) else None)
    for i, (path, u) in enumerate(flat):
        shape = tuple(jnp.shape(u))
        want_tail = p_leaves[i] if p_leaves is not None else shape[1:]
        if rows is not None and shape == (rows,) + tuple(want_tail):
            continue
        if p_leaves is not None and shape == tuple(p_leaves[i]):
            raise ValueError(
                f"{stage}: update leaf {_path_str(path)} has shape {shape}, the shape of the "
                f"parameter itself; expected {(n if n is not None else 'num_workers',) + shape}: "
                f"{how}. Use jax.vmap(jax.grad(...)), not jax.grad(...). (Inside optax.MultiSteps, "
                f"whose accumulator is shaped like the parameters, use jbyz.MultiSteps.)")
        raise ValueError(
            f"{stage}: update leaf {_path_str(path)} has shape {shape}; expected "
            f"{(rows if rows is not None else 'num_workers',) + tuple(want_tail)} "
            f"(num_workers={rows} rows, then the parameter's shape). Every stage before "
            f"robust_aggregate must be given the same num_workers, the size of the leading worker "
            f"axis of the updates: {how}.")
    return int(rows)


def _component(component, kind: str, caller: str, example: str):
    """A kernel from an object, a registry name, a ``{"name": ..., **hyper-parameters}`` dict, or
    (a mistake) an uncalled factory, which raises a ``TypeError`` showing the right call."""
    from jbyz import aggregators, attacks, preaggregators

    registry, typ = {
        "aggregator": (aggregators.AGGREGATORS, AggregationRule),
        "preaggregator": (preaggregators.PREAGGREGATORS, PreAggregator),
        "attack": (attacks.ATTACKS, Attack),
    }[kind]
    if isinstance(component, typ):
        return component
    if isinstance(component, str):
        return registry.build(component)
    if isinstance(component, dict):
        spec = dict(component)
        if "name" not in spec:
            raise ConfigError(f"{caller}: a {kind} given as a dict needs a 'name' key, got "
                              f"{sorted(spec)}; e.g. {{'name': 'trimmed_mean', 'b': 2}}")
        return registry.build(spec.pop("name"), **spec)
    if callable(component):
        names = [n for n in registry.names() if registry.entry(n).factory is component]
        name = names[0] if names else getattr(component, "__name__", repr(component))
        module = getattr(component, "__module__", "jbyz")
        raise TypeError(
            f"{caller} got the {kind} factory {module}.{name} itself, not "
            f"{'an' if kind[0] in 'ap' and kind != 'preaggregator' else 'a'} {kind}: call it, "
            f"e.g. {example.format(f'{module}.{name}()')}, or give its name: "
            f"{example.format(repr(name))}")
    raise TypeError(f"{caller}: expected a {typ.__name__} (e.g. {example.format('...')}), a "
                    f"registry name or a {{'name': ..., **hyper-parameters}} dict; got "
                    f"{type(component).__name__} {component!r}")


def _resolve_key(key, seed, stage: str):
    """The state's key from ``key`` (a typed key, a raw ``uint32[2]`` key or an int) or the
    deprecated ``seed``."""
    if seed is not None:
        import warnings

        if key is not None:
            raise TypeError(f"{stage}: give key= (a jax.random.key or an int), not both key and seed")
        warnings.warn(f"{stage}(seed=...) is deprecated: pass key=jax.random.key(seed) or key=seed "
                      "(optax's convention)", DeprecationWarning, stacklevel=3)
        key = seed
    if key is None:
        key = 0
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if jnp.ndim(key) == 1 and jnp.shape(key) == (2,):  # a raw jax.random.PRNGKey
        return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    return jax.random.key(key)


def requirement_errors(aggregator: AggregationRule, preaggregators: Sequence[PreAggregator],
                       n: int, f: int) -> list[str]:
    """The runner's checks of a rule with its pre-aggregators for ``n`` workers and a declared
    ``f`` (``jbyz run`` reports the same text): each stage's requirement on the rows it
    receives, ``0 <= f < n``."""
    errors = []
    if f < 0:
        errors.append(f"f (declared) must be an integer >= 0 or omitted, got {f!r}")
        return errors
    rows = n
    for pre in preaggregators:
        msg = pre.requirement(rows, f)
        if msg:
            errors.append(msg)
        rows = pre.out_rows(rows)
    if f < n:
        msg = aggregator.requirement(rows, f)
        if msg:
            errors.append(msg)
    else:
        errors.append(f"declared f={f} must be < n_workers={n}")
    return errors


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

    Without the ``valid`` handling and with ``first="zero"`` this is
    ``jbyz.per_worker(optax.ema(beta, debias=False), n)`` (EMA) or
    ``jbyz.per_worker(optax.trace(beta, nesterov), n)`` (sum); :func:`per_worker` runs any other
    optax transform per worker.

    Args:
      beta: momentum coefficient in [0, 1) (may be traced, e.g. by ``optax.inject_hyperparams``).
      num_workers: ``n``, the size of the leading worker axis (concrete when ``init`` runs).
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
    b = concrete_number(beta)
    if b is not None and not 0.0 <= b < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {b}")

    def init_fn(params):
        n = _init_n(num_workers, "worker_momentum")
        return WorkerMomentumState(jnp.zeros([], jnp.int32), _stack_zeros(params, n))

    def update_fn(updates, state, params=None, *, valid=None, **extra):
        del extra
        n = _worker_rows(updates, params, num_workers, "worker_momentum")
        valid_ = _valid_or_all(valid, n)

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


def clip_per_worker(max_norm: float, num_workers: int, *, form: str = "radius"
                    ) -> optax.GradientTransformationExtraArgs:
    r"""Clips each worker's update to L2 norm ``max_norm``: :math:`g \min(1, c/\|g\|)`.

    Used by honest workers before momentum in El Mhamdi et al. (ICLR 2021), c = 2 (MNIST)
    or 5 (CIFAR). The norm is over the worker's whole pytree: with ``form="radius"`` this is
    ``jbyz.per_worker(optax.clip_by_global_norm(max_norm), num_workers)``. ``num_workers`` is
    checked against the updates' worker axis.

    ``form="unit"`` is the clipping of the authors' ICLR 2021 code snapshot (corrected in their
    repository in May 2021): a gradient with :math:`\|g\| > c` is rescaled to norm 1, not c,
    i.e. :math:`g / \|g\|`; a gradient with :math:`\|g\| \le c` is kept.
    """
    if form not in ("radius", "unit"):
        raise ValueError(f"clip_per_worker form must be 'radius' or 'unit', got {form!r}")
    c = concrete_number(max_norm)
    if c is not None and not c > 0:
        raise ConfigError(f"clip_per_worker must be > 0 or omitted, got {c}")

    def update_fn(updates, state, params=None, **extra):
        del extra
        _worker_rows(updates, params, num_workers, "clip_per_worker")
        sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32)).reshape(u.shape[0], -1), axis=1)
                 for u in jax.tree.leaves(updates))
        norm = jnp.maximum(jnp.sqrt(sq), 1e-30)
        if form == "unit":
            scale = jnp.where(norm > max_norm, 1.0 / norm, 1.0)
        else:
            scale = jnp.minimum(1.0, max_norm / norm)
        return jax.tree.map(
            lambda u: (u * scale.reshape((-1,) + (1,) * (u.ndim - 1))).astype(u.dtype), updates
        ), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


class PerWorkerState(NamedTuple):
    inner: Any  # the inner transform's state, every leaf with a leading worker axis [n, ...]


def per_worker(
    inner: optax.GradientTransformation, num_workers: int
) -> optax.GradientTransformationExtraArgs:
    r"""Runs an optax transform separately on each worker's row: ``[n, ...] -> [n, ...]``.

    ``init`` and ``update`` of ``inner`` are ``jax.vmap``-ed over the worker axis, so every worker
    keeps its own state (``[n, ...]`` leaves): ``per_worker(optax.adam(1e-3), n)`` gives each
    worker its own Adam moments, ``per_worker(optax.clip_by_global_norm(1.0), n)`` clips each
    worker's whole update, ``per_worker(optax.trace(0.9), n)`` is heavy-ball momentum at the
    workers. Place it before :func:`robust_aggregate`; an optax transform placed there *without*
    ``per_worker`` would mix the workers (``optax.adam``'s moments would be taken over the
    stacked rows, ``clip_by_global_norm`` would clip all workers together).

    ``params`` are passed unbatched to every worker (e.g. ``optax.add_decayed_weights``). Workers
    with ``valid=False`` this step keep their state; their rows pass through unchanged.
    Other extra-args reach ``inner`` unchanged.

    Args:
      inner: any ``optax.GradientTransformation`` (stateless or stateful).
      num_workers: ``n``, the size of the leading worker axis (concrete when ``init`` runs).

    Returns:
      A ``GradientTransformationExtraArgs`` whose state is :class:`PerWorkerState`.

    Example::

        tx = optax.chain(
            jbyz.per_worker(optax.adam(1e-3), num_workers=8),   # Adam at each worker
            jbyz.robust_aggregate("median", f=2, num_workers=8),
        )
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        n = _init_n(num_workers, "per_worker")
        return PerWorkerState(jax.vmap(inner.init, in_axes=None, axis_size=n)(params))

    def update_fn(updates, state, params=None, *, valid=None, **extra):
        n = _worker_rows(updates, params, num_workers, "per_worker")
        new_u, new_s = jax.vmap(lambda u, s: inner.update(u, s, params, **extra))(
            updates, state.inner)
        if valid is not None:
            keep = jnp.asarray(valid, bool)

            def sel(new, old):
                return jnp.where(keep.reshape((n,) + (1,) * (jnp.ndim(new) - 1)), new, old)

            new_u = jax.tree.map(lambda a, b: sel(a, b).astype(b.dtype), new_u, updates)
            new_s = jax.tree.map(sel, new_s, state.inner)
        return new_u, PerWorkerState(new_s)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class MultiSteps(optax.MultiSteps):
    """``optax.MultiSteps`` for a chain that starts with per-worker updates ``[n, ...]``.

    Gradient accumulation happens at the workers: each worker averages its ``k`` micro-batch
    gradients, and the wrapped chain (momentum, attack, robust aggregation, ...) runs on those
    averages once every ``k`` calls, its state advancing only then, exactly as with a single
    step on ``k`` times larger per-worker batches. ``optax.MultiSteps`` itself keeps its
    accumulator shaped like the parameters and cannot hold one gradient per worker (it fails
    with a shape error); this subclass gives the accumulator the worker axis, nothing else.

    Args:
      opt: the chain (stages before :func:`robust_aggregate` see ``[n, ...]``).
      every_k_schedule: ``k`` or a schedule, as in ``optax.MultiSteps``.
      num_workers: ``n``.
      **kwargs: the other arguments of ``optax.MultiSteps``.
    """

    def __init__(self, opt, every_k_schedule, num_workers: int, **kwargs):
        super().__init__(opt, every_k_schedule, **kwargs)
        self._num_workers = num_workers

    def init(self, params):
        state = super().init(params)
        n = _init_n(self._num_workers, "MultiSteps")
        return state._replace(acc_grads=jax.tree.map(
            lambda a: jnp.zeros((n,) + a.shape, a.dtype), state.acc_grads))


# ----------------------------------------------------------------------------- attack


class ByzantineState(NamedTuple):
    attack_state: Any
    key: jax.Array
    count: jax.Array
    rule_state: Any = ()  # (pre-aggregator states, rule state) mirrored for rule-aware attacks


_SALT_RULE = 0x5EED_A8


def _stage_states(aggregator, preaggregators, n: int, d: int):
    """The initial ``(pre-aggregator states, rule state)`` of these stages on ``n`` rows of
    ``d`` coordinates (each pre-aggregator may change the row count of the next)."""
    rows, pre_states = n, []
    for pre in preaggregators:
        pre_states.append(pre.init(rows, d))
        rows = pre.out_rows(rows)
    return tuple(pre_states), aggregator.init(rows, d)


def _rule_closure(aggregator, preaggregators, f, key, pre_states, agg_state, reference=None):
    """``agg_fn(x [n, d], valid [n]) -> [d]``: the pre-aggregators and the rule applied with the
    declared ``f``, the given key and states (what a rule-aware attack evaluates)."""
    keys = jax.random.split(key, len(preaggregators) + 1)

    def run(x, valid):
        v, f_ = valid, jnp.asarray(f, jnp.int32)
        states = []
        for i, (pre, ps) in enumerate(zip(preaggregators, pre_states)):
            x, v, f_, ps = pre.apply(x, v, f_, keys[i], ps)
            states.append(ps)
        kw = {} if reference is None else {"reference": reference}
        out, st = aggregator.apply(x, v, f_, keys[-1], agg_state, **kw)
        return out, (tuple(states), st)

    return run


def byzantine(
    attack: Attack | str | dict, f_real, num_workers: int, *, key=None, seed: int | None = None,
    labels_flipped: bool = False, aggregator: AggregationRule | str | dict | None = None,
    preaggregators: Sequence[PreAggregator | str | dict] = (), f=None,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the rows of the Byzantine workers (the first ``f_real`` slots) by an attack.

    For simulation only. The attack sees what every honest worker submits at this point of the
    chain (momenta when placed after :func:`worker_momentum`), is omniscient about them, and the
    honest rows pass through unchanged. ``f_real`` (how many workers really are Byzantine) may
    differ from the ``f`` the aggregator is told.

    Data-level attacks (``label_flip``) cannot act on gradients and are refused: flip the labels
    of the Byzantine workers' batches (``jbyz.data.flip_labels``) before the gradients.

    Args:
      attack: a :class:`jbyz.types.Attack`, e.g. ``jbyz.attacks.alie()``, a registry name
        (``"alie"``) or a dict ``{"name": "alie", "z": 1.0}``.
      f_real: number of Byzantine workers (may be traced).
      num_workers: ``n``.
      key: the attack's randomness when no ``key`` extra-arg is given: a ``jax.random.key`` or an
        int (default 0). The state keeps a typed key (see :func:`robust_aggregate` on
        checkpointing).
      seed: deprecated alias of ``key``.
      labels_flipped: the caller computed the Byzantine workers' gradients on flipped labels,
        so a data-level attack (``label_flip``) is accepted and passes the rows through (the
        simulator sets it).
      aggregator, preaggregators, f: the run's rule, pre-aggregators and declared ``f`` (as
        given to :func:`robust_aggregate`), for rule-aware attacks (``attack.uses_rule``: the
        optimal ALIE / IPM and the gradient attack of :mod:`jbyz.attacks_extra`), which receive
        ``ctx["agg_fn"]``: ``(x [n, d], valid [n]) -> [d]``, these stages applied with ``f``
        (default ``f_real``), a key of their own (independent of the server's randomness) and
        the stages' states. Stateful stages (centered clipping's centre, clipped clustering's
        norm history) are mirrored here: after the attack, the stages run once on the submitted
        rows to advance the copy (a stage that is both stateful and random would draw other
        numbers than the server's). A rule that takes the server's reference (FLTrust, dSTAR)
        needs the ``reference`` extra-arg here as well. ``aggregator`` is required when
        ``attack.uses_rule`` and ignored otherwise; ``f`` (the ``f`` extra-arg overrides it)
        reaches every attack as ``ctx["f"]`` (Fang et al.'s Krum attack checks Krum's choice
        with it).

    Returns:
      A transform ``[n, ...] -> [n, ...]``.

    Attack strength (ALIE's ``z``, FoE's ``eps``) is a hyper-parameter of the attack; to inject or
    schedule it, wrap the chain in a factory: ``optax.inject_hyperparams(make_tx)(z=1.5, ...)``
    with ``make_tx(z, ...)`` building ``byzantine(jbyz.attacks.alie(z=z), ...)``.
    """
    attack = _component(attack, "attack", "byzantine",
                        "jbyz.byzantine({}, f_real=3, num_workers=10)")
    if attack.flips_labels and not labels_flipped:
        raise ConfigError(
            f"attack {attack.name!r} is a data-level attack: the Byzantine workers compute their "
            "gradients on flipped labels (y -> C - 1 - y) and send them as honest workers would, so "
            "there is nothing to replace in the gradients and byzantine() would leave them "
            "unchanged. In your own loop flip the labels of the first f_real workers' batches "
            "before jax.vmap(jax.grad(...)), e.g. ys = jnp.where(jnp.arange(n)[:, None] < f_real, "
            "jbyz.data.flip_labels(ys, num_classes), ys); `jbyz run` does this for "
            "attack = \"label_flip\".")
    n_static, f_static = _static_int(num_workers), _static_int(f_real)
    if n_static is not None and f_static is not None and not 0 <= f_static < n_static:
        raise ConfigError(
            f"f_real={f_static} Byzantine workers leaves no honest worker among "
            f"n_workers={n_static}; use f_real <= {n_static - 1}" if f_static >= n_static else
            f"f_real must be an integer >= 0, got {f_static}")
    if n_static is not None and f_static is not None:
        attack.resolved(n_static, f_static)  # warns when ALIE's formula gives a harmless z
    base_key = _resolve_key(key, seed, "byzantine")
    rule = None
    if getattr(attack, "uses_rule", False):
        if aggregator is None:
            raise ConfigError(
                f"attack {attack.name!r} simulates the run's aggregation: give byzantine() the "
                "run's rule, e.g. jbyz.byzantine(attack, f_real=3, num_workers=10, "
                "aggregator='median', preaggregators=['nnm'], f=3) with the same aggregator, "
                "preaggregators and f as jbyz.robust_aggregate (or give the attack its own "
                "aggregator= hyper-parameter)")
        example = "jbyz.byzantine(attack, 3, 10, aggregator={}, f=3)"
        rule = (_component(aggregator, "aggregator", "byzantine", example), tuple(
            _component(p, "preaggregator", "byzantine", example)
            for p in ((preaggregators,) if isinstance(preaggregators, (str, dict, PreAggregator))
                      else preaggregators)))
    f_rule = f

    def init_fn(params):
        n = _init_n(num_workers, "byzantine")
        d = _num_params(params)
        rule_state = () if rule is None else _stage_states(rule[0], rule[1], n, d)
        return ByzantineState(attack.init(n, d), base_key, jnp.zeros([], jnp.int32), rule_state)

    def update_fn(updates, state, params=None, *, valid=None, key=None, f=None, reference=None,
                  **extra):
        del extra
        n = _worker_rows(updates, params, num_workers, "byzantine")
        x, unravel = stack_to_matrix(updates)
        valid_ = _valid_or_all(valid, n)
        byz = byzantine_mask(n, f_real) & valid_
        honest = valid_ & ~byz
        step_key, state_key = _step_key(state.key, key, _SALT_ATTACK)
        f_decl = f if f is not None else (f_rule if f_rule is not None else f_real)
        ctx = {"step": state.count, "params": params, "f": f_decl}
        rule_state = state.rule_state
        if rule is not None:
            ref = None
            if getattr(rule[0], "needs_reference", False):
                if reference is None:
                    raise ValueError(
                        f"attack {attack.name!r} evaluates aggregator {rule[0].name!r}, which "
                        "needs the server's reference vector: pass the same reference=... "
                        "extra-arg to the byzantine() stage as to robust_aggregate() (in an "
                        "optax.chain, tx.update(updates, state, params, reference=g0) reaches "
                        "both)")
                ref = flat_vector(reference)
            run = _rule_closure(rule[0], rule[1], f_decl, jax.random.fold_in(step_key, _SALT_RULE),
                                *rule_state, reference=ref)
            ctx["agg_fn"] = lambda xx, vv: run(xx, vv)[0]
        x_out, attack_state = attack.apply(x, honest, byz, step_key, state.attack_state, ctx)
        if rule is not None and jax.tree.leaves(rule_state):
            rule_state = run(x_out.astype(jnp.float32), valid_)[1]  # advance the mirrored states
        return unravel(x_out), ByzantineState(attack_state, state_key, state.count + 1, rule_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- aggregation


class RobustAggregateState(NamedTuple):
    pre_states: tuple
    agg_state: Any
    key: jax.Array


def robust_aggregate(
    aggregator: AggregationRule | str | dict,
    f,
    num_workers: int,
    *,
    preaggregators: Sequence[PreAggregator | str | dict] = (),
    key=None,
    seed: int | None = None,
) -> aggregating.Aggregator:
    r"""Robustly aggregates per-worker updates ``[n, ...]`` into one update ``[...]``.

    Each worker's pytree is ravelled into a row of ``X in R^{n x d}`` (float32), passed through
    the pre-aggregators in order (bucketing, NNM, clipping, ARC ...) and the aggregator:
    :math:`\hat g = \mathrm{Agg}(\mathrm{Pre}_k(\cdots\mathrm{Pre}_1(X)))`, then unravelled into the
    parameter structure. Stateful rules (centered clipping's centre) keep their state here.

    Checks: when ``f`` and ``num_workers`` are known (Python ints or concrete arrays), the
    factory checks each stage's requirement on the rows it receives (e.g. trimmed mean needs
    ``n >= 2f + 1``, Krum ``n >= 2f + 3``, Bulyan ``n >= 4f + 3``, after bucketing's row count) and
    ``0 <= f < n``, and raises the :class:`jbyz.ConfigError` that ``jbyz run`` reports for the same
    configuration. When ``f`` is traced (under ``jit``, e.g. through
    ``optax.inject_hyperparams``) or arrives per step as the ``f`` extra-arg, it cannot be checked
    on the host: the update is then NaN in every coordinate for an ``f`` that fails a requirement
    at ``num_workers`` rows (which a requirement-free ``f = 0`` passes), so the first loss shows
    it instead of a plausible-looking wrong step. The check counts ``num_workers`` rows, as the
    runner does; with fewer ``valid`` rows in a step the rule runs on those.

    Every leaf of the updates must be ``(num_workers,) + param.shape``: one gradient per worker,
    from ``jax.vmap(jax.grad(loss))``; anything else raises a ``ValueError`` saying so.

    Checkpointing: the state holds a typed PRNG key (``RobustAggregateState.key``). Save
    ``jax.random.key_data(key)`` (a ``uint32`` array) and restore with
    ``jax.random.wrap_key_data(data)``, e.g. over the whole optimiser state::

        to_arrays = lambda s: jax.tree.map(
            lambda a: jax.random.key_data(a)
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, s)

    and ``jax.tree.map(jax.random.wrap_key_data, data)`` on the key leaves when restoring (or
    restore into ``jax.tree.map(..., tx.init(params))`` as a template).

    Args:
      aggregator: a :class:`jbyz.types.AggregationRule` (``jbyz.aggregators.median()``), a
        registry name (``"median"``) or a dict (``{"name": "trimmed_mean", "b": 2}``).
      f: declared number of Byzantine workers (may be traced; the ``f`` extra-arg overrides it).
      num_workers: ``n``.
      preaggregators: stages applied before ``aggregator``, each a
        :class:`jbyz.types.PreAggregator`, a name (``"nnm"``) or a dict
        (``{"name": "bucketing", "s": 2}``).
      key: seeds key-driven stages when no ``key`` extra-arg is given: a ``jax.random.key``
        or an int (default 0).
      seed: deprecated alias of ``key``.

    Returns:
      An :class:`optax.experimental.aggregating.Aggregator` (a ``GradientTransformationExtraArgs``).
    """
    example = "jbyz.robust_aggregate({}, f=3, num_workers=10)"
    aggregator = _component(aggregator, "aggregator", "robust_aggregate", example)
    preaggregators = tuple(
        _component(p, "preaggregator", "robust_aggregate",
                   "jbyz.robust_aggregate('median', f=3, num_workers=10, preaggregators=[{}])")
        for p in ((preaggregators,) if isinstance(preaggregators, (str, dict, PreAggregator))
                  else preaggregators))
    n_static, f_static = _static_int(num_workers), _static_int(f)
    if n_static is not None and f_static is not None:
        errors = requirement_errors(aggregator, preaggregators, n_static, f_static)
        if errors:
            raise ConfigError("invalid robust_aggregate configuration:\n  - "
                              + "\n  - ".join(errors))
    f_tables: dict[int, list[bool] | None] = {}

    def f_table(n: int) -> list[bool] | None:
        """``ok[f]`` for ``f < n`` at ``n`` rows, or ``None`` when no ``f`` fails a requirement
        that ``f = 0`` passes (rules whose other conditions fail at ``n`` are not poisoned)."""
        if n not in f_tables:
            ok = None
            if not requirement_errors(aggregator, preaggregators, n, 0):
                ok = [not requirement_errors(aggregator, preaggregators, n, k) for k in range(n)]
            f_tables[n] = None if ok is None or all(ok) else ok
        return f_tables[n]

    base_key = _resolve_key(key, seed, "robust_aggregate")

    def init_fn(params):
        d = _num_params(params)
        pre_states, agg_state = _stage_states(aggregator, preaggregators,
                                              _init_n(num_workers, "robust_aggregate"), d)
        return RobustAggregateState(pre_states, agg_state, base_key)

    def update_fn(updates, state, params=None, *, valid=None, key=None, f=None, reference=None,
                  **extra):
        del extra
        n = _worker_rows(updates, params, num_workers, "robust_aggregate")
        x, unravel = stack_to_matrix(updates)
        v = _valid_or_all(valid, n)
        f_ = jnp.asarray(f_default if f is None else f, jnp.int32)
        f_in = f_
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
            kw["reference"] = flat_vector(reference)
        out, agg_state = aggregator.apply(x, v, f_, keys[-1], state.agg_state, **kw)
        table = f_table(n)
        if table is not None or f is not None or f_static is None:
            # an f the host could not check (traced, or the f extra-arg): NaN when invalid
            ok = (f_in >= 0) & (f_in < n)
            if table is not None:
                ok = ok & jnp.asarray(table)[jnp.clip(f_in, 0, n - 1)]
            out = jnp.where(ok, out, jnp.nan)
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
