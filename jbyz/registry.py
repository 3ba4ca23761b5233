"""Name -> factory registries with descriptions, references and helpful errors.

Every family of components (aggregators, pre-aggregators, attacks, models, datasets) keeps one
:class:`Registry`. ``jbyz list`` prints them all; configuration files refer to entries by name;
an unknown name fails with the closest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Iterator


class ConfigError(ValueError):
    """An invalid configuration: the message says what is wrong and what would be valid."""


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str
    reference: str

    def hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments of the factory with their defaults."""
        sig = inspect.signature(self.factory)
        return {
            k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }


class Registry:
    """A named collection of factories.

    Example:
      >>> AGGREGATORS = Registry("aggregator")
      >>> @AGGREGATORS.register("mean", "Arithmetic mean (not robust).", "-")
      ... def mean(): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._lazy: dict[str, str] = {}  # name -> module that registers it when imported

    def register(self, name: str, description: str, reference: str):
        def deco(factory):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, factory, description, reference)
            self._lazy.pop(name, None)
            return factory

        return deco

    def provided_by(self, name: str, module: str) -> None:
        """Declares that importing ``module`` registers ``name``; it is imported on first use.

        This keeps dependencies pointing one way: a kernel that lives above the registry's own
        module (e.g. dSTAR in :mod:`jbyz.algorithms.dstar`, which imports the aggregators'
        helpers) is still listed and built by name, without the registry's module importing it.
        """
        if name not in self._entries:
            self._lazy[name] = module

    def _load(self, names) -> None:
        import importlib

        for name in list(names):
            module = self._lazy.pop(name, None)
            if module is not None:
                importlib.import_module(module)
                if name not in self._entries:
                    raise RuntimeError(f"importing {module} did not register {self.kind} {name!r}")

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries) + len(self._lazy)

    def names(self) -> list[str]:
        return sorted({*self._entries, *self._lazy})

    def entry(self, name: str) -> Entry:
        self._load([name] if name in self._lazy else [])
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(self.names())}."
            )
        return self._entries[name]

    def build(self, name: str, **hyperparameters):
        """Calls the factory registered under ``name`` with ``hyperparameters``.

        Unknown hyper-parameter names fail with the valid ones listed.
        """
        entry = self.entry(name)
        valid = entry.hyperparameters()
        sig = inspect.signature(entry.factory)
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in hyperparameters if k not in valid]
        if unknown and not takes_kwargs:
            raise ConfigError(
                f"{self.kind} {name!r} has no hyper-parameter(s) {', '.join(map(repr, unknown))}. "
                f"Valid: {', '.join(f'{k}={v!r}' for k, v in valid.items()) or '(none)'}."
            )
        return entry.factory(**hyperparameters)

    def describe(self) -> list[tuple[str, str, str]]:
        self._load(self._lazy)
        return [(e.name, e.description, e.reference) for _, e in sorted(self._entries.items())]


def concrete_number(v):
    """``v`` as a Python number when it is concrete, else ``None`` (tracers, arrays in a vmap,
    bools). Validation of factory arguments uses it: traced values are checked only when known."""
    import numbers

    import numpy as np

    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Number):
        return v
    try:
        a = np.asarray(v)
    except Exception:  # a tracer
        return None
    return a.item() if a.shape == () else None
