"""jbyz: Byzantine-robust distributed learning in JAX.

Workers are a vectorised batch axis; aggregation, attacks, momentum and pre-aggregation are
jitted pure kernels composed as optax transforms; a run is one ``lax.scan``.

Submodules (each with a registry listed by ``jbyz list``):
  :mod:`jbyz.aggregators`     robust aggregation rules ``[n, d] -> [d]``
  :mod:`jbyz.preaggregators`  bucketing, nearest-neighbour mixing, clipping, ARC
  :mod:`jbyz.attacks`         Byzantine attacks
  :mod:`jbyz.models`          Flax NNX models and their functional adapter
  :mod:`jbyz.data`            datasets, worker splits, on-device sampling
  :mod:`jbyz.transforms`      the optax drop-in (also re-exported here)
  :mod:`jbyz.simulate`        one training run (``jbyz.run(cfg)``)
  :mod:`jbyz.results`, :mod:`jbyz.plots`  tables and figures
"""

from jbyz._version import __version__  # noqa: E402, F401

import importlib as _importlib

_SUBMODULES = ("aggregators", "attacks", "data", "models", "preaggregators", "simulate",
               "results", "plots", "transforms", "config", "validation", "schedules", "chain", "grid")


def __getattr__(name):  # lazy submodules: `import jbyz` stays cheap
    if name in _SUBMODULES:
        return _importlib.import_module(f"jbyz.{name}")
    if name in ("run", "Simulation", "RunResult"):  # one training run (jbyz.simulate)
        return getattr(_importlib.import_module("jbyz.simulate"), name)
    if name == "Aggregator":  # renamed: optax.experimental.aggregating.Aggregator is another type
        from jbyz import types as _types

        return _types.__getattr__(name)
    raise AttributeError(f"module 'jbyz' has no attribute {name!r}")


from jbyz.config import Experiment, RunConfig, load_experiment  # noqa: E402
from jbyz.registry import ConfigError  # noqa: E402
from jbyz.transforms import (  # noqa: E402
    MultiSteps,
    byzantine,
    clip_per_worker,
    normalize,
    per_worker,
    robust_aggregate,
    worker_momentum,
)
from jbyz.types import AggregationRule, Attack, PreAggregator  # noqa: E402

__all__ = [
    "AggregationRule",
    "Attack",
    "ConfigError",
    "Experiment",
    "MultiSteps",
    "PreAggregator",
    "RunConfig",
    "RunResult",
    "Simulation",
    "aggregators",
    "attacks",
    "byzantine",
    "clip_per_worker",
    "data",
    "load_experiment",
    "models",
    "normalize",
    "per_worker",
    "preaggregators",
    "robust_aggregate",
    "run",
    "worker_momentum",
]
