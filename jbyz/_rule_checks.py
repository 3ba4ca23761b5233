"""Helpers shared by the aggregation-rule modules (:mod:`jbyz.aggregators` and
:mod:`jbyz.aggregators_extra`): input conversion, hyper-parameter checks, the wording of a rule's
``requirement(n, f)``, and the subset enumeration of the rules that search all ``2**n`` subsets
of the worker slots (MDA, SMEA). A module of its own so that neither rule module imports the
other's private names."""

from __future__ import annotations

import itertools
from typing import Callable

import jax.numpy as jnp
import numpy as np
from jax import lax

from jbyz.registry import ConfigError
from jbyz.registry import concrete_number as _concrete


def inputs(x, valid, f):
    """``(x float32 [n, d], valid bool [n], f int32, m = number of valid rows)``."""
    x = jnp.asarray(x).astype(jnp.float32)
    valid = jnp.asarray(valid, bool)
    f = jnp.asarray(f, jnp.int32)
    return x, valid, f, jnp.sum(valid.astype(jnp.int32))


def choice(rule: str, name: str, value, options) -> None:
    """Refuses a static option outside ``options``, listing them."""
    if value not in options:
        raise ConfigError(
            f"{rule}: {name}={value!r} is not valid; valid: {', '.join(repr(o) for o in options)}."
        )


def check_number(rule: str, name: str, value, *, low=None, low_open=False, integer=False) -> None:
    """Refuses a concrete hyper-parameter below ``low`` (or not an integer); traced values pass."""
    v = _concrete(value)
    if v is None:
        return
    if integer and int(v) != v:
        raise ConfigError(f"{rule}: {name} must be an integer; got {name}={value!r}.")
    if low is not None and (v <= low if low_open else v < low):
        op = ">" if low_open else ">="
        raise ConfigError(f"{rule}: {name} must be {op} {low}; got {name}={value!r}.")


def requirement(rule: str, text: str, ok: Callable[[int, int], bool]):
    """``requirement(n, f)`` from a predicate ``ok(n, f)`` and its text (e.g. ``"n >= 2f + 3"``):
    ``None`` when ``(n, f)`` is valid, else what is wrong and the largest valid ``f``."""

    def req(n: int, f: int) -> str | None:
        if f < 0:
            return f"{rule} needs f >= 0; got n={n}, f={f}."
        if n < 1:
            return f"{rule} needs at least one valid input; got n={n}, f={f}."
        if ok(n, f):
            return None
        good = [g for g in range(n + 1) if ok(n, g)]
        hint = f"largest valid f is {max(good)}" if good else f"no f is valid with n={n}"
        return f"{rule} needs {text} valid inputs; got n={n}, f={f} ({hint})"

    return req


class SubsetEnumeration:
    """The subsets of ``n`` worker slots, for a rule that searches them all (MDA, SMEA).

    ``requirement(n, f)`` adds to ``base`` the bound ``2**n <= max_subsets`` (checked again when
    the rule runs, since ``n`` is the input's row count). :meth:`choose` searches the subsets of
    one traced size ``k`` only: a ``lax.switch`` on ``k`` runs the branch that enumerates the
    ``C(n, k)`` subsets of that size, as host constants (XLA would otherwise constant-fold the
    enumeration slowly at compile time). Under ``vmap`` the switch becomes a select that runs
    every branch, i.e. all ``2**n`` subsets.
    """

    def __init__(self, rule: str, max_subsets, base, growth: str):
        check_number(rule, "max_subsets", max_subsets, low=1, integer=True)
        self.rule, self.max_subsets, self.base, self.growth = rule, int(max_subsets), base, growth

    def too_many(self, n: int) -> str:
        return (
            f"{self.rule} enumerates all 2**n subsets of the n worker slots; n={n} gives 2**{n} > "
            f"max_subsets={self.max_subsets}. Valid: n <= {self.max_subsets.bit_length() - 1} "
            f"slots, or raise max_subsets ({self.growth})."
        )

    def requirement(self, n: int, f: int) -> str | None:
        if n >= 1 and 2**n > self.max_subsets:
            return self.too_many(n)
        return self.base(n, f)

    @staticmethod
    def of_size(n: int, size: int) -> np.ndarray:
        """``[C(n, size), size]`` slot indices: the subsets of ``size`` slots in increasing
        bitmask order (``sum_i 2**i``: the subset whose largest slot is smallest comes first)."""
        idx = np.array(list(itertools.combinations(range(n), size)), np.int32).reshape(-1, size)
        return idx[np.argsort((np.int64(1) << idx.astype(np.int64)).sum(axis=1), kind="stable")]

    def choose(self, n: int, k, pick, *operands):
        """``keep [n]``: the subset of the traced size ``k`` that ``pick`` prefers.

        ``pick(idx, *operands)`` gets the ``[C, size]`` subsets of one size (:meth:`of_size`,
        ``size >= 1``) and returns ``(position, found)``: the row of ``idx`` it chooses and
        whether any row was eligible. ``keep`` is all ``False`` when ``k`` is not in
        ``[0, n]``, when ``k = 0``, or when nothing was eligible.
        """
        if 2**n > self.max_subsets:
            raise ConfigError(self.too_many(n))

        def branch(size):
            if size == 0:
                return lambda *ops: jnp.zeros(n, bool)
            idx = self.of_size(n, size)

            def run(*ops):
                position, found = pick(idx, *ops)
                return jnp.zeros(n, bool).at[jnp.asarray(idx)[position]].set(True) & found

            return run

        keep = lax.switch(jnp.clip(k, 0, n), [branch(s) for s in range(n + 1)], *operands)
        return keep & (k >= 0) & (k <= n)
