"""Helpers shared by the aggregation-rule modules (:mod:`jbyz.aggregators` and
:mod:`jbyz.aggregators_extra`): input conversion, hyper-parameter checks, the wording of a rule's
``requirement(n, f)``, and the subset enumeration of the rules that search all ``2**n`` subsets
of the worker slots (MDA, SMEA). A module of its own so that neither rule module imports the
other's private names."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

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
    """The ``2**n`` subsets of ``n`` worker slots, for a rule that searches them all.

    ``requirement(n, f)`` adds to ``base`` the bound ``2**n <= max_subsets`` (checked again when
    the rule runs, since ``n`` is the input's row count), and :meth:`bits` gives the subsets as a
    host constant (XLA would otherwise constant-fold the enumeration slowly at compile time).
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

    def bits(self, n: int) -> np.ndarray:
        """``[2**n, n]`` booleans: row ``b`` is the subset whose bitmask is ``b``."""
        if 2**n > self.max_subsets:
            raise ConfigError(self.too_many(n))
        return ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
