"""Shared aliases and the kernel protocols.

Conventions:

* Worker vectors are stacked as ``x: [n, d]`` float32 arrays (one row per worker slot).
* ``valid: [n]`` bool marks the rows that take part this step (padding, non-participants and
  stragglers are ``False``). Kernels must give the same result for ``x`` and for ``x`` padded
  with invalid rows.
* ``f`` is the *declared* number of Byzantine workers (what the aggregator assumes). It is a traced
  int32 scalar, never a Python int, so one compiled program serves every ``f`` of a grid.
* Byzantine workers are the first ``f_real`` worker slots (``byz = arange(n) < f_real``);
  ``honest = valid & ~byz``. The real and declared counts may differ.
* Everything a grid may vary is an array argument; shapes depend only on static settings.
* Kernels are pure: randomness comes from an explicit typed key, state is passed in and out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
PRNGKey = jax.Array
State = Any


def _no_state(*_shape_args) -> State:
    return ()


def _no_requirement(n: int, f: int) -> str | None:
    return None


def _nothing_resolved(n: int, f_real: int) -> dict:
    return {}


def _default_f(requirement, n: int) -> int:
    """The ``f`` a kernel called without one assumes: the largest ``f <= (n - 1) // 2`` (a
    Byzantine minority) that its ``requirement`` accepts with ``n`` inputs."""
    for f in range((n - 1) // 2, -1, -1):
        if requirement(n, f) is None:
            return f
    from jbyz.registry import ConfigError

    raise ConfigError(requirement(n, 0) or f"no f is valid with n={n} inputs")


def _call_defaults(kernel, x, valid, f, key, state):
    """Fills the defaults of a direct call ``kernel(x)``: every row valid, ``f`` from
    :func:`_default_f`, ``jax.random.key(0)``, and the kernel's initial state."""
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{kernel.name} takes the stacked worker vectors x: [n, d]; got shape "
                         f"{x.shape}. Ravel each worker's pytree into a row (jbyz.transforms."
                         f"stack_to_matrix), or use jbyz.robust_aggregate on pytrees.")
    n, d = x.shape
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    f = _default_f(kernel.requirement, n) if f is None else f
    key = jax.random.key(0) if key is None else key
    state = kernel.init(n, d) if state is None else state
    return x, valid, jnp.asarray(f, jnp.int32), key, state


def _is_step_count(x) -> bool:
    """A 0-d integer: what optax passes to a schedule (``optax.inject_hyperparams`` takes every
    callable argument of a factory for a schedule and calls it with the step count)."""
    return getattr(x, "ndim", None) == 0 or isinstance(x, int)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AggregationRule:
    """A robust aggregation rule ``[n, d] -> [d]`` (the kernel; not to be confused with
    ``optax.experimental.aggregating.Aggregator``, the transform that
    :func:`jbyz.robust_aggregate` builds from a rule).

    Attributes:
      name: registry name.
      apply: ``(x [n, d], valid [n], f int32[], key, state) -> (out [d], new_state)``.
      init: ``(n, d) -> state`` (``()`` for stateless rules). ``n`` and ``d`` are Python ints.
      requirement: ``(n, f) -> None | str``: a message when the rule cannot run with ``n`` valid
        inputs and ``f`` declared Byzantine ones (e.g. Krum needs ``n >= 2f + 3``). Checked on the
        host before any compute.
      needs_reference: the rule also takes a server-side reference vector ``reference: [d]``
        (e.g. dSTAR's validation gradient), passed as a keyword to ``apply``; the simulator
        computes it and :func:`jbyz.transforms.robust_aggregate` forwards it from ``extra_args``.

    Calling a rule: ``out, new_state = rule(x)`` on a plain ``[n, d]`` array, the way one calls
    ByzFL's ``TrMean(f)(x)``. The other arguments default to: ``valid`` every row; ``f`` the
    largest Byzantine minority the rule accepts, i.e. the largest ``f <= (n - 1) // 2`` with
    ``requirement(n, f)`` satisfied (trimmed mean at n = 10: f = 4; Krum: f = 3), so that a call
    without ``f`` is as robust as the rule can be; ``key`` ``jax.random.key(0)``; ``state``
    ``init(n, d)``. Pass ``f`` explicitly whenever you know it.

    A rule is a static pytree (no leaves) and, called with a 0-d step count, returns itself (a
    constant schedule): so ``optax.inject_hyperparams(jbyz.robust_aggregate)(rule, f=..., ...)``,
    which takes every callable argument for a schedule, keeps the rule as it is.
    """

    name: str
    apply: Callable[..., tuple[Array, State]]
    init: Callable[[int, int], State] = _no_state
    requirement: Callable[[int, int], str | None] = _no_requirement
    needs_reference: bool = False

    def __call__(self, x, valid=None, f=None, key=None, state=None, **kw):
        if _is_step_count(x) and valid is None:
            return self
        x, valid, f, key, state = _call_defaults(self, x, valid, f, key, state)
        return self.apply(x, valid, f, key, state, **kw)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PreAggregator:
    """A pre-aggregation stage ``[n, d] -> [n_out, d]`` applied before an :class:`AggregationRule`.

    Called directly, ``pre(x)`` takes the same defaults as :class:`AggregationRule` and returns
    ``(x_out, valid_out, f_out, new_state)``.

    Attributes:
      name: registry name.
      apply: ``(x [n, d], valid [n], f, key, state) -> (x_out [n_out, d], valid_out [n_out], f_out,
        new_state)``.
      out_rows: ``n -> n_out`` (static).
      init: ``(n, d) -> state``.
      requirement: ``(n, f) -> None | str``.
    """

    name: str
    apply: Callable[..., tuple[Array, Array, Array, State]]
    out_rows: Callable[[int], int] = lambda n: n
    init: Callable[[int, int], State] = _no_state
    requirement: Callable[[int, int], str | None] = _no_requirement

    def __call__(self, x, valid=None, f=None, key=None, state=None):
        if _is_step_count(x) and valid is None:
            return self
        x, valid, f, key, state = _call_defaults(self, x, valid, f, key, state)
        return self.apply(x, valid, f, key, state)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Attack:
    """A Byzantine attack: replaces the Byzantine rows of the submitted stack.

    Attributes:
      name: registry name.
      apply: ``(x [n, d], honest [n], byz [n], key, state, ctx) -> (x_out [n, d], new_state)``.
        ``x`` holds the vectors every worker would submit if honest (momenta when momentum is at
        the workers); rows where ``byz`` is False must come back unchanged. ``ctx`` is a dict of
        optional per-step context (``f``: declared f, ``step``, ``params``, ...).
      init: ``(n, d) -> state``.
      flips_labels: a data-level attack: Byzantine workers compute their gradient on flipped
        labels (``y -> C - 1 - y``) and submit it as an honest worker would.
      needs_own_vector: the Byzantine rows of ``x`` must hold what those workers would have
        computed honestly (e.g. sign flipping of the own vector); otherwise a simulator may skip
        computing Byzantine gradients.
      resolved: ``(n, f_real) -> dict``: hyper-parameters whose value is decided by the
        setting, as used with ``n`` workers of which ``f_real`` Byzantine (ALIE's ``z``); results
        tables record them as ``attack.<name>`` columns (host; ``{}`` by default).
      uses_rule: the attack simulates the run's own aggregation (rule-aware attacks of
        :mod:`jbyz.attacks_extra`): :func:`jbyz.byzantine` must be given the run's aggregator and
        pre-aggregators and passes ``ctx["agg_fn"]``, ``(x [n, d], valid [n]) -> [d]``.
    """

    name: str
    apply: Callable[..., tuple[Array, State]]
    init: Callable[[int, int], State] = _no_state
    flips_labels: bool = False
    needs_own_vector: bool = False
    resolved: Callable[[int, int], dict] = _nothing_resolved
    uses_rule: bool = False

    def __call__(self, x, honest=None, byz=None, key=None, state=None, ctx=None):
        if _is_step_count(x) and honest is None:
            return self  # a constant schedule, for optax.inject_hyperparams (see AggregationRule)
        if honest is None or byz is None:
            raise TypeError(f"attack {self.name!r} needs the masks: attack(x, honest, byz, key)")
        if state is None:
            state = self.init(*jnp.shape(x))
        key = jax.random.key(0) if key is None else key
        return self.apply(x, honest, byz, key, state, ctx or {})


def byzantine_mask(n: int, f_real) -> Array:
    """``[n]`` bool: the first ``f_real`` worker slots are Byzantine."""
    return jnp.arange(n) < f_real


def valid_mask(n: int, n_valid) -> Array:
    """``[n]`` bool: the first ``n_valid`` worker slots are real (the rest is padding)."""
    return jnp.arange(n) < n_valid


def __getattr__(name):
    if name == "Aggregator":  # the name until 0.1: too close to optax's own Aggregator
        import warnings

        warnings.warn("jbyz.types.Aggregator is now jbyz.types.AggregationRule (optax's "
                      "optax.experimental.aggregating.Aggregator is the transform that "
                      "jbyz.robust_aggregate returns)", DeprecationWarning, stacklevel=2)
        return AggregationRule
    raise AttributeError(f"module 'jbyz.types' has no attribute {name!r}")
