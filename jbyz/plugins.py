"""Plugins: modules of your own that register components into jbyz's registries.

A plugin is an ordinary Python module that, when imported, registers aggregators, attacks,
models, datasets, ... with the registries' ``register`` decorators (e.g.
``@jbyz.aggregators.AGGREGATORS.register("my_rule", "description", "reference")``). Naming it
lets a configuration file use those components without editing jbyz:

* on the command line: ``jbyz run FILE --import mypkg`` (repeatable; also ``jbyz check``);
* in the file: ``plugins = ["mypkg", ...]`` in the ``[run]`` table.

Each entry is a module name (importable: installed, or on ``PYTHONPATH``) or the path of a
``.py`` file (relative paths in a configuration file resolve against the file's folder). The
plugins are imported before the file's runs are built and validated; importing one twice has no
further effect. ``examples/plugin_example/`` is a worked example.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

from jbyz.registry import ConfigError


def load_plugins(names: Iterable[str], base_dir: str | Path | None = None) -> list[ModuleType]:
    """Imports every plugin of ``names`` (module names or ``.py`` paths); returns the modules.

    Args:
      names: module names (``"mypkg"``, ``"mypkg.rules"``) or paths of ``.py`` files.
      base_dir: the folder relative ``.py`` paths are resolved against (default: the current
        directory).

    Raises:
      ConfigError: a plugin cannot be found or fails while importing (the message names the
        plugin and the underlying error).
    """
    return [load_plugin(n, base_dir) for n in names]


def load_plugin(name: str, base_dir: str | Path | None = None) -> ModuleType:
    """Imports one plugin (see :func:`load_plugins`)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"plugin names must be non-empty strings (module names or .py paths), "
                          f"got {name!r}")
    if name.endswith(".py"):
        return _load_file(name, base_dir)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(
                f"plugin {name!r} could not be imported: no module named {e.name!r}. Install it, "
                f"add its folder to PYTHONPATH, or give the path of a .py file instead"
            ) from None
        raise ConfigError(f"plugin {name!r} failed while importing: {type(e).__name__}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"plugin {name!r} failed while importing: {e}") from e
    except Exception as e:  # noqa: BLE001  (any error inside the user's module)
        raise ConfigError(f"plugin {name!r} failed while importing: {type(e).__name__}: {e}") from e


def _load_file(name: str, base_dir) -> ModuleType:
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"plugin {name!r} could not be imported: file {str(path)!r} does not exist")
    mod_name = path.stem
    loaded = sys.modules.get(mod_name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
            return loaded  # imported before: registering again would fail
        raise ConfigError(f"plugin {name!r}: a different module named {mod_name!r} is already "
                          f"imported ({getattr(loaded, '__file__', None)}); rename the file")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[mod_name]
        raise ConfigError(f"plugin {name!r} failed while importing: {type(e).__name__}: {e}") from e
    return module
