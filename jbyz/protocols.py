"""Who contributes this step: worker latency models, first-k selection, asynchronous arrivals.

The synchronous step is the special case of a mask ``[n]`` (who takes part). This
module provides the pieces a simulator needs to decide *who arrives when*:

* :data:`LATENCIES`, a :class:`~jbyz.registry.Registry` of worker latency models. A model is a
  :class:`LatencyModel` with two pure functions:

  - ``init(key, n) -> state``: per-run, per-worker quantities drawn once (e.g. speed factors
    ``[n]``); ``()`` when there are none;
  - ``sample(key, state, n) -> float32 [n]``: one positive latency per worker for one round (a
    synchronous round, or one job of each worker in an asynchronous run).

  Both are jittable and vmappable; numeric hyper-parameters may be JAX arrays (a grid may vmap
  over them), options that change code are Python values.

* :func:`first_k`: keep the ``k`` earliest valid arrivals of a round (``k`` may be traced; ranks,
  never shapes, depend on it) and return the simulated wall-clock time of the round.

* :func:`job_latency` / :func:`next_arrival`: the two primitives of the vectorised asynchronous
  event simulation (:mod:`jbyz.algorithms.async_sgd`): the latency of worker ``i``'s ``j``-th job
  is entry ``i`` of ``sample(fold_in(key, j), state, n)``, so the whole latency table is a pure
  function of the run key and the per-worker job counters; the next event is the argmin of the
  finish times (ties by worker index).

The latency models are assumptions (neither dSTAR nor OrMo could be read in full): the shifted
exponential is the standard straggler model; the gamma model with shape 100 (coefficient of
variation 0.1) follows the SMEGA² simulation code (Cohen et al. 2022); the slow-subset and
heterogeneous-speed models are our proposals for the "heterogeneous" settings of OrMo and dSTAR.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from jbyz.protocols import LATENCIES, first_k
    >>> lat = LATENCIES.build("slow_subset", slow_fraction=0.5, slow_factor=5.0)
    >>> state = lat.init(jax.random.key(0), 8)
    >>> tau = lat.sample(jax.random.key(1), state, 8)            # [8] latencies of one round
    >>> mask, t = first_k(tau, 4, jnp.ones(8, bool), jnp.zeros(8, bool))
    >>> int(mask.sum())
    4
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jbyz.registry import ConfigError, Registry
from jbyz.registry import concrete_number as _concrete

Array = jax.Array

LATENCIES = Registry("latency model")

BYZANTINE_ARRIVALS = ("honest", "first")


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """A worker latency model.

    Attributes:
      name: registry name.
      init: ``(key, n) -> state``: per-run per-worker quantities (e.g. speed factors ``[n]``),
        drawn once per run; ``()`` if the model has none. ``n`` is a Python int.
      sample: ``(key, state, n) -> float32 [n]``: positive latencies of one round, i.i.d. across
        rounds given ``state``. Pure, jittable, vmappable.
      mean: ``(state, n) -> float32 [n]``: the expected latency of each worker given ``state``
        (used for documentation, tests and to convert time units); may be approximate for none.
    """

    name: str
    init: Callable[[Any, int], Any]
    sample: Callable[[Any, Any, int], Array]
    mean: Callable[[Any, int], Array]


# --------------------------------------------------------------------------------------------
# Validation helpers (values may be arrays / tracers: checked only when concrete)




def _check(model: str, name: str, value, *, low=None, low_open=False, high=None, high_open=False):
    v = _concrete(value)
    if v is None:
        return
    if low is not None and (v <= low if low_open else v < low):
        raise ConfigError(f"{model}: {name} must be {'>' if low_open else '>='} {low}; got {name}={value!r}.")
    if high is not None and (v >= high if high_open else v > high):
        raise ConfigError(f"{model}: {name} must be {'<' if high_open else '<='} {high}; got {name}={value!r}.")


def _choice(model: str, name: str, value, options) -> None:
    if value not in options:
        raise ConfigError(
            f"{model}: {name}={value!r} is not valid; valid: {', '.join(repr(o) for o in options)}."
        )


def _f32(v):
    return jnp.asarray(v, jnp.float32)


# --------------------------------------------------------------------------------------------
# Base (homogeneous, stateless) models

_BASES = ("constant", "shifted_exponential", "gamma")


@LATENCIES.register(
    "constant",
    "Every worker takes the same fixed time per round (no stragglers).",
    "-",
)
def constant(value: float = 1.0) -> LatencyModel:
    r"""Constant latency :math:`\tau_i = c` for every worker and round.

    With equal latencies :func:`first_k` keeps the ``k`` lowest worker indices (ties by index), and
    the asynchronous simulation serves workers round-robin.

    Args:
      value: the latency ``c > 0``.
    """
    _check("constant", "value", value, low=0.0, low_open=True)

    def sample(key, state, n):
        del key, state
        return jnp.full((n,), _f32(value))

    return LatencyModel(
        "constant", lambda key, n: (), sample, lambda state, n: jnp.full((n,), _f32(value))
    )


@LATENCIES.register(
    "shifted_exponential",
    "tau = shift + scale * Exp(1): the standard straggler model (ASSUMPTION for dSTAR).",
    "Lee et al., IEEE Trans. Inf. Theory 2018 (coded computation)",
)
def shifted_exponential(shift: float = 1.0, scale: float = 1.0) -> LatencyModel:
    r"""Shifted exponential latency :math:`\tau = a + b\,E`, :math:`E \sim \mathrm{Exp}(1)`.

    Mean :math:`a + b`, standard deviation :math:`b`. (The rate of the exponential part is
    :math:`\mu = 1/b`.)

    Args:
      shift: the minimum time ``a >= 0``.
      scale: the mean ``b > 0`` of the exponential part.
    """
    _check("shifted_exponential", "shift", shift, low=0.0)
    _check("shifted_exponential", "scale", scale, low=0.0, low_open=True)

    def sample(key, state, n):
        del state
        e = jax.random.exponential(key, (n,), jnp.float32)
        return _f32(shift) + _f32(scale) * e

    return LatencyModel(
        "shifted_exponential", lambda key, n: (), sample,
        lambda state, n: jnp.full((n,), _f32(shift) + _f32(scale)),
    )


@LATENCIES.register(
    "gamma",
    "tau ~ Gamma(shape, scale); default shape 100 (CV 0.1, homogeneous) as in the SMEGA2 code.",
    "Cohen, Hakimi, Schuster, ICPP 2022 (SMEGA2 code, main.py)",
)
def gamma(shape: float = 100.0, mean: float = 1.0) -> LatencyModel:
    r"""Gamma latency :math:`\tau \sim \Gamma(k, \theta)` with :math:`k\theta` = ``mean``.

    Coefficient of variation :math:`1/\sqrt{k}`. The SMEGA² simulator draws each worker's time per
    gradient from Gamma(shape 100, scale B/100), i.e. mean B (the batch size) and CV 0.1; here the
    mean is a free unit (default 1).

    Args:
      shape: the shape ``k > 0``.
      mean: the mean ``k θ > 0``.
    """
    _check("gamma", "shape", shape, low=0.0, low_open=True)
    _check("gamma", "mean", mean, low=0.0, low_open=True)

    def sample(key, state, n):
        del state
        k = _f32(shape)
        g = jax.random.gamma(key, k, (n,), jnp.float32)
        # A Gamma draw can underflow to 0 for tiny shapes; latencies must stay positive.
        return jnp.maximum(g * (_f32(mean) / k), jnp.finfo(jnp.float32).tiny)

    return LatencyModel("gamma", lambda key, n: (), sample, lambda state, n: jnp.full((n,), _f32(mean)))


def _base(name: str, kwargs: dict | None) -> LatencyModel:
    _choice("latency base", "base", name, _BASES)
    return LATENCIES.build(name, **dict(kwargs or {}))


def _scaled(name: str, base: LatencyModel, init) -> LatencyModel:
    """A model whose latencies are ``factor_i * base`` with per-run factors from ``init``."""

    def sample(key, factors, n):
        return factors * base.sample(key, (), n)

    def mean(factors, n):
        return factors * base.mean((), n)

    return LatencyModel(name, init, sample, mean)


@LATENCIES.register(
    "slow_subset",
    "A fixed subset of workers (default: the last half) is slow_factor times slower than the base model.",
    "ASSUMPTION: the heterogeneous setting of OrMo (Shi et al. 2024) and dSTAR (Yan et al. 2024)",
)
def slow_subset(
    base: str = "gamma",
    base_kwargs: dict | None = None,
    slow_fraction: float = 0.5,
    slow_factor: float = 5.0,
    which: str = "last",
) -> LatencyModel:
    r"""A fixed subset of slow workers: :math:`\tau_i = s_i\,\tau^{\text{base}}_i`.

    :math:`s_i` = ``slow_factor`` for the ``round(slow_fraction * n)`` slow workers and 1 otherwise.
    The slow subset is fixed for the run: the *last* slots by default (Byzantine workers occupy
    the first slots, so by default stragglers and Byzantine workers are disjoint), the *first*
    slots, or a uniformly random subset drawn once per run from the init key.

    The heterogeneous setting of OrMo is not specified in the parts of the paper we could read;
    the default, half of the workers five times slower, is our ASSUMPTION.

    Args:
      base: the per-round model ``"constant"``, ``"shifted_exponential"`` or ``"gamma"``.
      base_kwargs: its hyper-parameters.
      slow_fraction: fraction of slow workers in ``[0, 1]`` (may be traced).
      slow_factor: the slow-down factor ``> 0``, typically 5-10 (may be traced).
      which: ``"last"``, ``"first"`` or ``"random"``.
    """
    _choice("slow_subset", "which", which, ("last", "first", "random"))
    _check("slow_subset", "slow_fraction", slow_fraction, low=0.0, high=1.0)
    _check("slow_subset", "slow_factor", slow_factor, low=0.0, low_open=True)
    b = _base(base, base_kwargs)

    def init(key, n):
        count = jnp.round(_f32(slow_fraction) * n).astype(jnp.int32)
        idx = jnp.arange(n)
        if which == "last":
            slow = idx >= n - count
        elif which == "first":
            slow = idx < count
        else:
            perm_rank = jnp.argsort(jax.random.uniform(key, (n,)))
            slow = jnp.zeros((n,), bool).at[perm_rank].set(idx < count)
        return jnp.where(slow, _f32(slow_factor), jnp.float32(1.0))

    return _scaled("slow_subset", b, init)


@LATENCIES.register(
    "heterogeneous",
    "Per-worker speed factors drawn once per run (uniform or log-normal) times a base model.",
    "ASSUMPTION: the heterogeneous setting of OrMo (Shi et al. 2024)",
)
def heterogeneous(
    base: str = "gamma",
    base_kwargs: dict | None = None,
    distribution: str = "uniform",
    low: float = 1.0,
    high: float = 5.0,
    sigma: float = 0.5,
) -> LatencyModel:
    r"""Heterogeneous speeds: :math:`\tau_i = s_i\,\tau^{\text{base}}_i`, :math:`s_i` drawn once per run.

    * ``distribution="uniform"``: :math:`s_i \sim U[\text{low}, \text{high}]`;
    * ``distribution="lognormal"``: :math:`s_i = \exp(\sigma Z_i)`, :math:`Z_i \sim N(0, 1)`
      (median factor 1).

    Args:
      base: the per-round model ``"constant"``, ``"shifted_exponential"`` or ``"gamma"``.
      base_kwargs: its hyper-parameters.
      distribution: ``"uniform"`` or ``"lognormal"``.
      low, high: the uniform range, ``0 < low <= high`` (may be traced).
      sigma: the log-normal spread ``>= 0`` (may be traced).
    """
    _choice("heterogeneous", "distribution", distribution, ("uniform", "lognormal"))
    _check("heterogeneous", "low", low, low=0.0, low_open=True)
    _check("heterogeneous", "sigma", sigma, low=0.0)
    lo, hi = _concrete(low), _concrete(high)
    if lo is not None and hi is not None and hi < lo:
        raise ConfigError(f"heterogeneous: need low <= high; got low={low!r}, high={high!r}.")
    b = _base(base, base_kwargs)

    def init(key, n):
        if distribution == "uniform":
            u = jax.random.uniform(key, (n,), jnp.float32)
            return _f32(low) + (_f32(high) - _f32(low)) * u
        return jnp.exp(_f32(sigma) * jax.random.normal(key, (n,), jnp.float32))

    return _scaled("heterogeneous", b, init)


# --------------------------------------------------------------------------------------------
# First-k selection


def arrival_ranks(times: Array, valid: Array | None = None) -> Array:
    """Rank of each worker's arrival: 0 for the earliest; ties broken by worker index.

    Invalid workers rank after every valid one (in index order). O(n²) comparisons, no sort:
    exact, vmappable, cheap for n ≤ a few hundred.

    Args:
      times: ``[n]`` arrival times (``+inf`` allowed).
      valid: ``[n]`` bool, or ``None`` for all valid.

    Returns:
      ``[n]`` int32, a permutation of ``0..n-1``.
    """
    times = jnp.asarray(times, jnp.float32)
    n = times.shape[0]
    if valid is None:
        valid = jnp.ones((n,), bool)
    idx = jnp.arange(n)
    # key_i = (invalid_i, t_i, i) compared lexicographically; j precedes i when key_j < key_i.
    inv = ~jnp.asarray(valid, bool)
    t = jnp.where(inv, 0.0, times)
    before = (
        (inv[None, :] < inv[:, None])
        | ((inv[None, :] == inv[:, None]) & (t[None, :] < t[:, None]))
        | ((inv[None, :] == inv[:, None]) & (t[None, :] == t[:, None]) & (idx[None, :] < idx[:, None]))
    )
    return jnp.sum(before, axis=1).astype(jnp.int32)


def arrival_times(latencies: Array, byz: Array, byzantine_arrival: str = "honest") -> Array:
    """Effective arrival times: Byzantine workers at 0 when ``byzantine_arrival="first"``."""
    _choice("first_k", "byzantine_arrival", byzantine_arrival, BYZANTINE_ARRIVALS)
    latencies = jnp.asarray(latencies, jnp.float32)
    if byzantine_arrival == "first":
        return jnp.where(jnp.asarray(byz, bool), 0.0, latencies)
    return latencies


def first_k(
    latencies: Array,
    k,
    valid: Array,
    byz: Array,
    byzantine_arrival: str = "honest",
) -> tuple[Array, Array]:
    r"""Keeps the ``k`` earliest valid arrivals of a synchronous round.

    Workers are ranked by arrival time (ties by worker index); the valid workers of rank ``< k``
    are kept. With ``byzantine_arrival="first"`` Byzantine workers arrive at time 0, before every
    honest worker (the worst case of dSTAR's first-k protocol); with ``"honest"`` they
    draw latencies like everyone else. ``k`` may be a traced integer: only ranks depend on it.

    .. math:: \text{mask}_i = \text{valid}_i \wedge \operatorname{rank}_i < k, \qquad
              \text{round\_time} = \max_{i : \text{mask}_i} t_i

    Args:
      latencies: ``[n]`` positive per-worker latencies of this round.
      k: number of arrivals to wait for (int or traced int32 scalar). ``k >= #valid`` waits for
        every valid worker; ``k <= 0`` keeps none (round time 0).
      valid: ``[n]`` bool, the worker slots taking part (padding and non-participants False).
      byz: ``[n]`` bool, the Byzantine workers.
      byzantine_arrival: ``"honest"`` or ``"first"`` (static).

    Returns:
      ``(mask [n] bool, round_time float32 scalar)``: the kept workers, and the arrival time of
      the last kept worker (the round's simulated wall-clock duration).
    """
    valid = jnp.asarray(valid, bool)
    t = arrival_times(latencies, byz, byzantine_arrival)
    rank = arrival_ranks(t, valid)
    mask = valid & (rank < jnp.asarray(k, jnp.int32))
    round_time = jnp.max(jnp.where(mask, t, 0.0))
    return mask, round_time


def synchronous_round_time(latencies: Array, valid: Array) -> Array:
    """Wall-clock of a fully synchronous round: the slowest valid worker's latency."""
    return jnp.max(jnp.where(jnp.asarray(valid, bool), jnp.asarray(latencies, jnp.float32), 0.0))


# --------------------------------------------------------------------------------------------
# Asynchronous arrivals


def job_latency(model: LatencyModel, key, state, n: int, worker, job) -> Array:
    """Latency of ``worker``'s ``job``-th job: entry ``worker`` of ``sample(fold_in(key, job))``.

    Defining job ``j`` of every worker through one draw of the round-``j`` latency vector makes the
    whole latency table ``L[j, i]`` a pure function of ``key`` (and of the per-run ``state``), so
    a host-side priority-queue simulation can reproduce the event order exactly
    (:func:`latency_table`). Works on traced ``worker`` / ``job`` (int32 scalars) and under vmap.
    """
    lat = model.sample(jax.random.fold_in(key, job), state, n)
    return lat[worker]


def latency_table(model: LatencyModel, key, state, n: int, jobs: int) -> Array:
    """``[jobs, n]``: ``L[j, i]`` = latency of worker ``i``'s ``j``-th job (see :func:`job_latency`)."""
    return jax.vmap(lambda j: model.sample(jax.random.fold_in(key, j), state, n))(jnp.arange(jobs))


def initial_finish_times(model: LatencyModel, key, state, n: int, valid: Array | None = None) -> Array:
    """``[n]`` finish times of every worker's first job (job 0) started at time 0; invalid: ``+inf``."""
    t = model.sample(jax.random.fold_in(key, 0), state, n)
    if valid is not None:
        t = jnp.where(jnp.asarray(valid, bool), t, jnp.inf)
    return t


def next_arrival(finish: Array) -> tuple[Array, Array]:
    """The next event of an asynchronous run: ``(worker int32, time float32)``.

    ``worker = argmin(finish)`` with ties broken by the lowest index (as a priority queue keyed by
    ``(time, worker)``). Invalid workers should carry ``+inf``.
    """
    w = jnp.argmin(finish).astype(jnp.int32)
    return w, finish[w]


__all__ = [
    "LATENCIES",
    "LatencyModel",
    "BYZANTINE_ARRIVALS",
    "constant",
    "shifted_exponential",
    "gamma",
    "slow_subset",
    "heterogeneous",
    "arrival_ranks",
    "arrival_times",
    "first_k",
    "synchronous_round_time",
    "job_latency",
    "latency_table",
    "initial_finish_times",
    "next_arrival",
]
