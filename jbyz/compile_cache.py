"""JAX's persistent compilation cache for the grid runner: where it is, and turning it on or off.

A small grid is mostly compilation (the quickstart: about 3/4 of its cold wall time); with the
cache, a second run of the same (or an overlapping) grid loads its programs from disk instead.
:func:`jbyz.grid.run_grid` (hence ``jbyz run``) turns the cache on for the duration of the call,
with this precedence:

1. the option: ``GridOptions(compile_cache=...)``, ``[execution] compile_cache = ...`` in a
   configuration file, or ``jbyz run --compile-cache ...``;
2. the environment variable ``JBYZ_COMPILE_CACHE`` (an empty value counts as unset);
3. a directory the user already gave JAX itself (``jax_compilation_cache_dir``, e.g. through
   ``JAX_COMPILATION_CACHE_DIR``): used as is, thresholds untouched; likewise
   ``jax_enable_compilation_cache = False`` keeps the cache off;
4. the default, a per-user cache directory: :func:`default_dir`.

A value is ``"off"`` (no cache), ``"on"`` / ``"default"`` (the default directory), or a
directory (``~`` expanded, created if missing, with mode 0700). In a TOML file ``true`` / ``false``
also work. Every program is cached, however small or quick to compile (JAX's thresholds
``jax_persistent_cache_min_compile_time_secs`` and ``jax_persistent_cache_min_entry_size_bytes``
are lifted while the runner holds the cache).

``import jbyz`` changes nothing: the JAX configuration is set on entering :func:`enabled` and
restored on leaving it, so a library user's own JAX settings are theirs outside the runner.
Only use a directory that you alone can write to: JAX trusts what it loads from the cache.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator

from jbyz.registry import ConfigError

ENV = "JBYZ_COMPILE_CACHE"
_AMBIGUOUS = {"0", "1", "true", "false", "yes", "no", "none", "null", "enable", "enabled",
              "disable", "disabled"}
_SHORT = f"--compile-cache DIR|off or {ENV}=DIR|off"
HOW = f"--compile-cache DIR|off, [execution] compile_cache or {ENV}=DIR|off"


def default_dir() -> Path:
    """The per-user cache directory: platformdirs' user cache directory for ``jbyz`` when
    platformdirs is installed (on Linux the same as below), else ``$XDG_CACHE_HOME/jbyz/jax`` or
    ``~/.cache/jbyz/jax``."""
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME", "").strip()
        root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
        return root / "jbyz" / "jax"
    return Path(platformdirs.user_cache_dir("jbyz", appauthor=False)) / "jax"


def parse(value, where: str = "compile_cache") -> Path | str | None:
    """A setting's meaning: ``None`` (off), ``"default"``, or a directory (absolute ``Path``).

    Raises :class:`ConfigError` for anything else, naming ``where`` the value came from.
    """
    if value is True:
        return "default"
    if value is False:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}={value!r}: expected a directory, 'off' or 'on' "
                          f"(got {type(value).__name__})")
    v = value.strip()
    if not v:
        raise ConfigError(f"{where} is empty: give a directory for JAX's compilation cache, "
                          f"'off' to turn it off, or 'on' for the default ({default_dir()})")
    low = v.lower()
    if low == "off":
        return None
    if low in ("on", "default"):
        return "default"
    if low in _AMBIGUOUS:
        raise ConfigError(f"{where}={value!r} is ambiguous: write 'off' to turn the compilation "
                          f"cache off, 'on' for the default directory ({default_dir()}), or a "
                          f"path such as ./{v} for a directory of that name")
    path = Path(v).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}={value!r}: {path} exists and is not a directory; give a "
                          f"directory for JAX's compilation cache, or 'off'")
    return path


def resolve(option=None, environ=None) -> tuple[Path | None, str]:
    """The cache directory (``None``: off) and where that choice came from, in the order of the
    module's docstring. Only parses: creates nothing, changes no JAX setting."""
    import jax

    environ = os.environ if environ is None else environ
    if option is not None:
        source, value = "option", parse(option, "compile_cache")
    elif environ.get(ENV, "").strip():
        source, value = ENV, parse(environ[ENV], ENV)
    elif not jax.config.jax_enable_compilation_cache:
        return None, "jax_enable_compilation_cache=False"
    elif jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir), "jax_compilation_cache_dir"
    else:
        source, value = "default", "default"
    return (default_dir() if value == "default" else value), source


def entries(path: Path | None) -> int:
    """Number of programs stored in a cache directory (JAX writes one ``*-cache`` file each)."""
    if path is None or not Path(path).is_dir():
        return 0
    return sum(1 for _ in Path(path).glob("*-cache"))


_WHY = {"option": "from the compile_cache option", ENV: f"from ${ENV}",
        "default": "the default",
        "jax_compilation_cache_dir": "JAX's jax_compilation_cache_dir, set before jbyz",
        "jax_enable_compilation_cache=False": "JAX's jax_enable_compilation_cache is False",
        "default not writable": "the default directory is not writable"}

_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def enabled(option=None, log=None, environ=None) -> Iterator[Path | None]:
    """Holds JAX's persistent compilation cache as configured (see the module docstring) and
    restores the previous JAX settings on exit. Yields the directory (``None``: off) and logs
    one line saying where it is (``log``: a ``print``-like function, or ``None``)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    path, source = resolve(option, environ)
    ours = source in ("option", ENV, "default")
    if path is not None and ours:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(f"{path} is not writable")
        except OSError as e:
            if source != "default":
                raise ConfigError(f"compile cache ({source}): cannot use {path}: {e}. "
                                  f"Give another directory or 'off' ({HOW}).") from e
            warnings.warn(f"jbyz: the default compile cache {path} is not usable ({e}); running "
                          f"without it. Move it with {HOW}.", stacklevel=3)
            path, source = None, "default not writable"
    old = {k: getattr(jax.config, k) for k in _SETTINGS}
    if ours:
        new = {"jax_enable_compilation_cache": path is not None,
               "jax_compilation_cache_dir": str(path) if path is not None else None}
        if path is not None:  # cache every program, however small or quick to compile
            new["jax_persistent_cache_min_compile_time_secs"] = 0.0
            new["jax_persistent_cache_min_entry_size_bytes"] = -1
    else:
        new = {}
    changed = {k: v for k, v in new.items() if old[k] != v}
    if log is not None:
        why = _WHY.get(source, source)
        if path is None:
            log(f"compile cache: off ({why}; to turn on: {_SHORT})")
        else:
            log(f"compile cache: {path} ({why}; {entries(path)} programs stored; "
                f"to move or turn off: {_SHORT})")
    for k, v in changed.items():
        jax.config.update(k, v)
    if "jax_compilation_cache_dir" in changed or "jax_enable_compilation_cache" in changed:
        cc.reset_cache()  # JAX opens its cache once per process: reopen at the new place
    try:
        yield path
    finally:
        for k in changed:
            jax.config.update(k, old[k])
        if "jax_compilation_cache_dir" in changed or "jax_enable_compilation_cache" in changed:
            cc.reset_cache()
