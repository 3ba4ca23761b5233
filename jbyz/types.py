"""Shared aliases and the kernel protocols.

Conventions (see ``design.md`` §2):

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


@dataclasses.dataclass(frozen=True)
class Aggregator:
    """A robust aggregation rule ``[n, d] -> [d]``.

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
    """

    name: str
    apply: Callable[..., tuple[Array, State]]
    init: Callable[[int, int], State] = _no_state
    requirement: Callable[[int, int], str | None] = _no_requirement
    needs_reference: bool = False

    def __call__(self, x, valid, f, key, state=(), **kw):
        return self.apply(x, valid, jnp.asarray(f, jnp.int32), key, state, **kw)


@dataclasses.dataclass(frozen=True)
class PreAggregator:
    """A pre-aggregation stage ``[n, d] -> [n_out, d]`` applied before an :class:`Aggregator`.

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

    def __call__(self, x, valid, f, key, state=()):
        return self.apply(x, valid, jnp.asarray(f, jnp.int32), key, state)


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
    """

    name: str
    apply: Callable[..., tuple[Array, State]]
    init: Callable[[int, int], State] = _no_state
    flips_labels: bool = False
    needs_own_vector: bool = False

    def __call__(self, x, honest, byz, key, state=(), ctx=None):
        return self.apply(x, honest, byz, key, state, ctx or {})


def byzantine_mask(n: int, f_real) -> Array:
    """``[n]`` bool: the first ``f_real`` worker slots are Byzantine."""
    return jnp.arange(n) < f_real


def valid_mask(n: int, n_valid) -> Array:
    """``[n]`` bool: the first ``n_valid`` worker slots are real (the rest is padding)."""
    return jnp.arange(n) < n_valid
