r"""Asynchronous SGD as a vectorised event simulation inside ``lax.scan``: ASGD, naive ASGDm,
OrMo, OrMo-DA, SMEGA², and the synchronous momentum SGD baseline (SSGDm).

**The simulation.** ``K`` workers and one parameter server (the setting of Shi, Yang, Li,
NeurIPS 2024, arXiv:2407.19234, §1). Each scan step is *one
arrival*: the next event is the argmin of the workers' finish times (ties by worker index, as a
priority queue keyed by ``(time, worker)``); that worker's mini-batch gradient is computed at
*its own copy* of the parameters (the model it was last sent, possibly stale), the server
updates, and sends the worker a model tagged with the server's iteration index; the worker's next
finish time is ``now + L[j, i]`` with ``L[j, i]`` the latency of worker ``i``'s ``j``-th job
(:func:`jbyz.protocols.job_latency`). Everything is arrays (per-worker parameter copies
``[K, d]``, tags ``[K]``, finish times ``[K]``, job counters ``[K]``, the clock), so a run is a
pure function of its key and numeric hyper-parameters and vmaps over seeds, learning rates and
momenta like a synchronous run. Computing a gradient at arrival instead of at dispatch changes
nothing: it depends only on the worker's parameter copy and its mini-batch.

One arrival consumes one mini-batch of ``B`` samples (shared i.i.d. data), so an epoch is
``N_train / B`` arrivals *in total* (the protocol of the SMEGA² code, Cohen et al. 2022;
ASSUMPTION for OrMo, whose protocol we could not read).
Simulated wall-clock time is the clock of the latest arrival (time units of the latency model).

**Dispatch.** ``dispatch="async"`` (default): the arriving worker gets a model at once.
``dispatch="barrier"``: the arriving worker waits until ``K`` arrivals since the last broadcast
have come in; then every worker gets the same model and starts its next job (a synchronous
protocol with the same event machinery; SSGDm always uses it).

**Server rules** (flat vectors; ``g`` arrives with tag ``j``, server iteration ``t``, group
staleness ``s = t - j``, arrival staleness ``τ`` = number of server updates since the worker's
model was sent; ``η`` is the learning rate *per gradient*, see below):

* ``asgd``: :math:`w \leftarrow w - \eta g`.
* ``asgdm`` (naive ASGD with momentum, OrMo's baseline): :math:`u \leftarrow \beta u + \eta g,\;
  w \leftarrow w - u` on every arrival, whatever the staleness.
* ``ssgdm`` (OrMo's synchronous reference, as in its Fig. 1): barrier dispatch; the ``K``
  gradients of iteration ``t`` are computed at :math:`w_t`; :math:`u_{t+1} = \beta u_t + \eta \sum_k g^k_t,\; w_{t+1} = w_t - u_{t+1}`.
  (Per-gradient ``η`` with a sum, as each block of the paper's Fig. 1 is "ηg": an effective step
  ``ηK`` per iteration -- ASSUMPTION; pass ``lr / K`` for the mean form.)
* ``ormo`` (**ASSUMPTION -- a reconstruction** from the paper's abstract and Fig. 1; its
  Algorithm 1 could not be read). Momentum in iteration order:

  1. :math:`u \leftarrow u + \beta^{s}\,\eta\,g` (the weight ``g`` would have in its own group
     ``j`` after ``s`` momentum steps);
  2. :math:`w \leftarrow w - \eta\,g\,(1-\beta^{s+1})/(1-\beta)` (``param_step="ordered"``), or
     :math:`w \leftarrow w - \eta g` (``param_step="vanilla"``: the paper's ablation "OrMo
     (vanilla SGD step)");
  3. close an iteration -- if ``j == t`` (``advance_rule="fresh_gradient"``, default) or after
     every ``K`` arrivals (``advance_rule="every_K"``): :math:`t \leftarrow t+1,\;
     w \leftarrow w - \beta u,\; u \leftarrow \beta u`;
  4. send ``w`` tagged ``t`` to the worker; with ``send_before_momentum_step=True`` (default) a
     worker whose arrival closed an iteration gets ``w`` from *before* the ``-βu`` step of 3.

  Property (checked in the tests): for any arrival schedule, steps 1-3 leave ``(w, u)`` equal to
  replaying the same gradients group by group in iteration order with the one-at-a-time SSGDm
  form of ``ssgdm`` (the paper's Fig. 1).
* ``ormo_da`` (OrMo with a delay-adaptive learning rate; **ASSUMPTION**, the exact rule was not
  found): ``η_δ = η`` if ``δ <= θ`` else ``η θ / δ`` applied in steps 1-2, with the delay ``δ``
  counted in arrivals (``da_delay_unit="arrivals"``, default: ``δ = τ``) or in groups
  (``"groups"``: ``δ = s``) and the threshold ``θ = da_threshold`` (default ``K``).
* ``smega2`` (Cohen, Hakimi, Schuster, ICPP 2022; from its code, ``smega2.py``): arrival counter
  ``c ← (c+1) mod K``, accumulator ``b ← b + g``, direction ``d = g + β m``; if ``c = 0``:
  ``m ← β m + b/K``, ``b ← 0``; ``w ← w - η d``. The worker is sent the look-ahead estimate
  ``ŵ = w - ηβ[(K + c(β-1)) m + (c/K) b]`` (``smega2_estimate="advanced"``) or ``w - ηβKm``
  (``"naive"``).

``η`` may follow a schedule in arrivals: a linear warm-up from ``η/K`` to ``η`` over
``warmup_epochs`` and a step decay by ``lr_decay`` at ``lr_milestones`` (epochs), as in the SMEGA²
code. Weight decay is an L2 term in the loss. Models with BatchNorm keep one set of running
statistics at the server, replaced by the arriving worker's (ASSUMPTION).

Not covered: Byzantine workers in the asynchronous protocol (the first-k synchronous protocol
in :mod:`jbyz.protocols` has them), and the "shifted momentum" baseline (its definition was not
retrieved).

Example::

    >>> from jbyz.algorithms.async_sgd import AsyncConfig, AsyncSimulation
    >>> cfg = AsyncConfig(method="ormo", n_workers=8, dataset="digits", model="mlp",
    ...                   batch_size=16, epochs=1.0, eval_every=50, lr=0.02)
    >>> df = AsyncSimulation(cfg).run()                                # doctest: +SKIP
    >>> df[["arrivals", "epoch", "wall_clock", "test_accuracy"]]        # doctest: +SKIP

References:
  Shi, Yang, Li. Ordered Momentum for Asynchronous SGD. NeurIPS 2024 (arXiv:2407.19234).
  Cohen, Hakimi, Schuster. SMEGA2: distributed asynchronous deep neural network training with a
  single momentum buffer. ICPP 2022.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jbyz import data as data_lib
from jbyz import models
from jbyz.protocols import LATENCIES, next_arrival
from jbyz.registry import ConfigError

METHODS = ("asgd", "asgdm", "ormo", "ormo_da", "ssgdm", "smega2")
METHOD_LABELS = {
    "asgd": "ASGD",
    "asgdm": "naive ASGDm",
    "ormo": "OrMo",
    "ormo_da": "OrMo-DA",
    "ssgdm": "SSGDm",
    "smega2": "SMEGA2",
}


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class AsyncConfig:
    """Static configuration of an asynchronous run (numeric ``lr``, ``momentum``, ``seed`` may be
    overridden per run of a grid, see :meth:`AsyncSimulation.run`).

    Attributes:
      method: one of :data:`METHODS`.
      n_workers: ``K``.
      dataset, dataset_kwargs: a :data:`jbyz.data.DATASETS` entry (``limit_train=`` subsets it).
      model, model_kwargs: a :data:`jbyz.models.MODELS` entry.
      batch_size: ``B``, samples per gradient (per arrival).
      epochs: training length: ``ceil(epochs * N_train / B)`` arrivals rounded up to a multiple of
        ``eval_every`` (one compiled chunk length), unless ``arrivals`` is set.
      arrivals: total arrivals (overrides ``epochs``).
      eval_every: arrivals between evaluations (also the length of one compiled scan chunk).
      lr: ``η`` per gradient. momentum: ``β``. weight_decay: L2 coefficient (loss ``+ wd/2 ||w||²``).
      warmup_epochs: linear warm-up from ``lr / K`` to ``lr`` (0: none).
      lr_milestones, lr_decay: multiply ``lr`` by ``lr_decay`` at these epochs.
      latency, latency_kwargs: a :data:`jbyz.protocols.LATENCIES` entry.
      dispatch: ``"async"`` or ``"barrier"`` (forced for ``ssgdm``).
      advance_rule: OrMo: ``"fresh_gradient"`` (default) or ``"every_K"``  [ASSUMPTION].
      send_before_momentum_step: OrMo: see the module docstring  [ASSUMPTION].
      param_step: OrMo: ``"ordered"`` or ``"vanilla"`` (ablation)  [ASSUMPTION].
      da_delay_unit: OrMo-DA: ``"arrivals"`` or ``"groups"``  [ASSUMPTION].
      da_threshold: OrMo-DA: ``θ`` (default ``None`` = ``K``)  [ASSUMPTION].
      smega2_estimate: ``"advanced"`` or ``"naive"``.
      seed: run seed (initial parameters, mini-batches, latencies).
      record_events: keep every arrival's worker and time in :attr:`AsyncResult.events`.
    """

    method: str = "ormo"
    n_workers: int = 16
    dataset: str = "fashion_mnist"
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)
    model: str = "lenet"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 32
    epochs: float = 1.0
    arrivals: int | None = None
    eval_every: int = 200
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    lr_milestones: tuple = ()
    lr_decay: float = 0.1
    latency: str = "gamma"
    latency_kwargs: dict = dataclasses.field(default_factory=dict)
    dispatch: str = "async"
    advance_rule: str = "fresh_gradient"
    send_before_momentum_step: bool = True
    param_step: str = "ordered"
    da_delay_unit: str = "arrivals"
    da_threshold: float | None = None
    smega2_estimate: str = "advanced"
    seed: int = 0
    record_events: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    def replace(self, **kw) -> "AsyncConfig":
        return dataclasses.replace(self, **kw)

    def label(self) -> str:
        return f"{METHOD_LABELS.get(self.method, self.method)} K={self.n_workers}"


def _choice(name, value, options):
    if value not in options:
        raise ConfigError(
            f"async: {name}={value!r} is not valid; valid: {', '.join(repr(o) for o in options)}."
        )


def check(cfg: AsyncConfig) -> AsyncConfig:
    """Validates ``cfg`` (raises :class:`~jbyz.registry.ConfigError`)."""
    _choice("method", cfg.method, METHODS)
    _choice("dispatch", cfg.dispatch, ("async", "barrier"))
    _choice("advance_rule", cfg.advance_rule, ("fresh_gradient", "every_K"))
    _choice("param_step", cfg.param_step, ("ordered", "vanilla"))
    _choice("da_delay_unit", cfg.da_delay_unit, ("arrivals", "groups"))
    _choice("smega2_estimate", cfg.smega2_estimate, ("advanced", "naive"))
    if cfg.n_workers < 1:
        raise ConfigError(f"async: n_workers must be >= 1; got {cfg.n_workers}.")
    if cfg.batch_size < 1 or cfg.eval_every < 1:
        raise ConfigError("async: batch_size and eval_every must be >= 1.")
    if not (0.0 <= cfg.momentum < 1.0) and cfg.method != "asgd":
        raise ConfigError(f"async: momentum must be in [0, 1); got {cfg.momentum}.")
    if cfg.da_threshold is not None and cfg.da_threshold <= 0:
        raise ConfigError(f"async: da_threshold must be > 0; got {cfg.da_threshold}.")
    LATENCIES.build(cfg.latency, **dict(cfg.latency_kwargs))
    return cfg


# --------------------------------------------------------------------------------------------
# The server: pure per-arrival updates on flat vectors


class ServerState(NamedTuple):
    """Server state: parameters ``w [d]``, momentum ``u [d]`` (SMEGA²: ``m``), accumulator
    ``b [d]`` (SSGDm: ``Σ ηg`` of the open iteration; SMEGA²: ``Σ g``), iteration ``t``, arrivals
    ``count`` and arrivals in the open group ``group``."""

    w: jax.Array
    u: jax.Array
    b: jax.Array
    t: jax.Array
    count: jax.Array
    group: jax.Array


def server_init(w) -> ServerState:
    w = jnp.array(w, jnp.float32)  # a copy: the carry is donated
    z = lambda: jnp.zeros((), jnp.int32)
    return ServerState(w, jnp.zeros_like(w), jnp.zeros_like(w), z(), z(), z())


@dataclasses.dataclass(frozen=True)
class ServerRule:
    """The static choices of a server rule (see the module docstring)."""

    method: str = "ormo"
    advance_rule: str = "fresh_gradient"
    send_before_momentum_step: bool = True
    param_step: str = "ordered"
    da_delay_unit: str = "arrivals"
    da_threshold: float | None = None
    smega2_estimate: str = "advanced"

    @classmethod
    def from_config(cls, cfg: AsyncConfig) -> "ServerRule":
        return cls(cfg.method, cfg.advance_rule, cfg.send_before_momentum_step, cfg.param_step,
                   cfg.da_delay_unit, cfg.da_threshold, cfg.smega2_estimate)


def _geometric(beta, s):
    """``(1 - β^{s+1}) / (1 - β) = Σ_{i=0}^{s} β^i`` (``s + 1`` at ``β = 1``)."""
    sf = s.astype(jnp.float32)
    safe = jnp.where(beta == 1.0, 0.5, beta)
    return jnp.where(beta == 1.0, sf + 1.0, (1.0 - safe ** (sf + 1.0)) / (1.0 - safe))


def da_learning_rate(lr, delay, threshold):
    """OrMo-DA's learning rate [ASSUMPTION]: ``lr`` if ``delay <= θ`` else ``lr * θ / delay``."""
    delay = jnp.asarray(delay, jnp.float32)
    threshold = jnp.asarray(threshold, jnp.float32)
    return jnp.where(delay <= threshold, lr, lr * threshold / jnp.maximum(delay, 1e-30))


def server_update(rule: ServerRule, st: ServerState, g, tag, tau, lr, beta, n_workers: int):
    """One arrival at the server.

    Args:
      rule: the static :class:`ServerRule`.
      st: the :class:`ServerState`.
      g: ``[d]`` the gradient (computed at the model tagged ``tag``).
      tag: int32, the iteration index of the worker's model.
      tau: int32, server updates since that model was sent (arrival staleness).
      lr: ``η`` for this arrival (scalar, may be traced). beta: ``β``.
      n_workers: ``K`` (static).

    Returns:
      ``(new_state, w_send [d], tag_send int32, closed bool)``: the server state, the model and
      tag to send back to the worker, and whether an iteration was closed by this arrival.
    """
    m = rule.method
    K = n_workers
    g = jnp.asarray(g, jnp.float32)
    lr = jnp.asarray(lr, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    tag = jnp.asarray(tag, jnp.int32)
    count = st.count + 1
    false = jnp.bool_(False)
    if m == "asgd":
        w = st.w - lr * g
        return st._replace(w=w, t=count, count=count), w, count, false
    if m == "asgdm":
        u = beta * st.u + lr * g
        w = st.w - u
        return st._replace(w=w, u=u, t=count, count=count), w, count, false
    if m == "ssgdm":
        b = st.b + lr * g
        group = st.group + 1
        closed = group >= K
        u_new = beta * st.u + b
        w_new = st.w - u_new
        u = jnp.where(closed, u_new, st.u)
        w = jnp.where(closed, w_new, st.w)
        b = jnp.where(closed, 0.0, b)
        t = st.t + closed.astype(jnp.int32)
        group = jnp.where(closed, 0, group)
        return ServerState(w, u, b, t, count, group), w, t, closed
    if m == "smega2":
        c = count % K
        b = st.b + g
        d = g + beta * st.u
        closed = c == 0
        u = jnp.where(closed, beta * st.u + b / K, st.u)
        b = jnp.where(closed, 0.0, b)
        w = st.w - lr * d
        cf = c.astype(jnp.float32)
        if rule.smega2_estimate == "advanced":
            w_send = w - lr * beta * ((K + cf * (beta - 1.0)) * u + (cf / K) * b)
        else:
            w_send = w - lr * beta * K * u
        return ServerState(w, u, b, count, count, c), w_send, count, closed
    if m not in ("ormo", "ormo_da"):
        raise ConfigError(f"unknown async method {m!r}; valid: {', '.join(METHODS)}")
    s = jnp.maximum(st.t - tag, 0)
    eta = lr
    if m == "ormo_da":
        delay = tau if rule.da_delay_unit == "arrivals" else s
        eta = da_learning_rate(lr, delay, K if rule.da_threshold is None else rule.da_threshold)
    u = st.u + (beta ** s.astype(jnp.float32)) * eta * g
    if rule.param_step == "ordered":
        w = st.w - eta * _geometric(beta, s) * g
    else:
        w = st.w - eta * g
    group = st.group + 1
    if rule.advance_rule == "fresh_gradient":
        closed = tag >= st.t
    else:
        closed = group >= K
    w_before = w
    w = jnp.where(closed, w - beta * u, w)
    u = jnp.where(closed, beta * u, u)
    t = st.t + closed.astype(jnp.int32)
    group = jnp.where(closed, 0, group)
    w_send = jnp.where(closed, w_before, w) if rule.send_before_momentum_step else w
    return ServerState(w, u, st.b, t, count, group), w_send, t, closed


# --------------------------------------------------------------------------------------------
# The simulation


class Carry(NamedTuple):
    server: ServerState
    model_state: Any
    worker_params: jax.Array  # [K, d] (async) or [1, d] (barrier: the broadcast model)
    worker_tag: jax.Array  # [K] int32
    worker_count: jax.Array  # [K] int32: server arrivals when the worker's model was sent
    jobs: jax.Array  # [K] int32: jobs started by each worker (the current one included)
    finish: jax.Array  # [K] float32: finish time of the current job (+inf: waiting)
    clock: jax.Array  # float32: time of the latest arrival
    wave: jax.Array  # int32: arrivals since the last broadcast (barrier)
    latency_state: Any


class TrainData(NamedTuple):
    x: jax.Array
    y: jax.Array


@dataclasses.dataclass
class AsyncResult:
    """What :meth:`AsyncSimulation.run` returns for one run."""

    config: AsyncConfig
    history: list[dict]
    events: dict | None
    params: np.ndarray  # final server parameters, flat [d]
    wall_time_s: float
    compile_time_s: float

    def to_frame(self):
        import pandas as pd

        df = pd.DataFrame(self.history)
        for k, v in self.config.to_dict().items():
            if k in df.columns:  # measured columns (arrivals, seed, lr, momentum) win
                continue
            df[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
        df["method_label"] = METHOD_LABELS[self.config.method]
        return df


_PROGRAMS: dict = {}


@functools.lru_cache(maxsize=4)
def _load(name: str, items: tuple):
    return data_lib.load_dataset(name, **dict(items))


class AsyncSimulation:
    """The compiled pieces of one static asynchronous configuration.

    Runs that differ only in ``seed``, ``lr`` and ``momentum`` share one compiled program and can
    be vmapped together (:meth:`run` with several points).
    """

    def __init__(self, cfg: AsyncConfig, dataset: data_lib.Dataset | None = None):
        self.cfg = cfg = check(cfg)
        self.K = K = cfg.n_workers
        self.ds = ds = dataset if dataset is not None else _load(
            cfg.dataset, tuple(sorted(cfg.dataset_kwargs.items())))
        self.dispatch = "barrier" if cfg.method == "ssgdm" else cfg.dispatch
        self.rule = ServerRule.from_config(cfg)
        self.latency = LATENCIES.build(cfg.latency, **dict(cfg.latency_kwargs))
        self.n_train = int(len(ds.y_train))
        if cfg.arrivals is not None:
            self.total = int(cfg.arrivals)
        else:  # rounded up to whole chunks: one compiled chunk length
            chunks = math.ceil(cfg.epochs * self.n_train / cfg.batch_size / cfg.eval_every)
            self.total = int(max(chunks, 1) * cfg.eval_every)
        self.model = self._build_model(cfg.seed)
        self.flat0, self.unravel = ravel_pytree(self.model.params)
        self.d = int(self.flat0.size)
        self.train = TrainData(jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
        self.test = (jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
        self.arrivals_per_epoch = self.n_train / cfg.batch_size
        static = {**cfg.to_dict(), "seed": None, "lr": None, "momentum": None, "record_events": None}
        self._sig = (json.dumps(static, sort_keys=True, default=str), id(ds))

    def _build_model(self, seed: int):
        cfg = self.cfg
        return models.build_model(cfg.model, self.ds.input_shape, max(self.ds.num_classes, 1),
                                  key=jax.random.key(seed), **dict(cfg.model_kwargs))

    # ------------------------------------------------------------------ state
    def init(self, seed: int) -> Carry:
        """The initial carry of run ``seed`` (host-side: parameters from the seed)."""
        cfg, K = self.cfg, self.K
        flat = ravel_pytree(self._build_model(seed).params)[0] if seed != cfg.seed else self.flat0
        lat_key = self._latency_key(jax.random.key(seed))
        lat_state = self.latency.init(jax.random.fold_in(lat_key, 1 << 30), K)
        finish = self.latency.sample(jax.random.fold_in(lat_key, 0), lat_state, K)
        rows = 1 if self.dispatch == "barrier" else K
        z = lambda: jnp.zeros((K,), jnp.int32)
        return Carry(
            server=server_init(flat),
            model_state=jax.tree.map(jnp.copy, self.model.state),
            worker_params=jnp.tile(jnp.asarray(flat, jnp.float32)[None], (rows, 1)),
            worker_tag=z(), worker_count=z(), jobs=z(),
            finish=jnp.array(finish, jnp.float32), clock=jnp.zeros((), jnp.float32),
            wave=jnp.zeros((), jnp.int32),
            latency_state=jax.tree.map(jnp.array, lat_state),
        )

    @staticmethod
    def _latency_key(run_key):
        return jax.random.fold_in(run_key, 0x1A7E)

    # ------------------------------------------------------------------ one arrival
    def _loss(self, flat, mstate, x, y, key):
        cfg = self.cfg
        params = self.unravel(flat)
        out, new_state = self.model.apply(params, mstate, x, train=True, key=key)
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        if cfg.weight_decay > 0:
            loss = loss + 0.5 * cfg.weight_decay * jnp.sum(jnp.square(flat))
        return loss, new_state

    def lr_at(self, lr, count):
        """``η`` for arrival number ``count`` (0-based): warm-up and step decays (in epochs)."""
        cfg = self.cfg
        epoch = count.astype(jnp.float32) / self.arrivals_per_epoch
        eta = jnp.asarray(lr, jnp.float32)
        if cfg.warmup_epochs > 0:
            frac = jnp.minimum(epoch / cfg.warmup_epochs, 1.0)
            eta = eta * (1.0 / self.K + (1.0 - 1.0 / self.K) * frac)
        for ms in cfg.lr_milestones:
            eta = jnp.where(epoch >= ms, eta * cfg.lr_decay, eta)
        return eta

    def _step(self, c: Carry, train: TrainData, run_key, dyn):
        cfg, K = self.cfg, self.K
        lr, beta = dyn["lr"], dyn["momentum"]
        srv = c.server
        wk, now = next_arrival(c.finish)
        step_key = jax.random.fold_in(run_key, srv.count)
        # The gradient of the arriving worker, at its own (possibly stale) copy.
        params = c.worker_params[0] if self.dispatch == "barrier" else c.worker_params[wk]
        idx = jax.random.randint(jax.random.fold_in(step_key, 0), (cfg.batch_size,), 0, self.n_train)
        (loss, new_mstate), g = jax.value_and_grad(self._loss, has_aux=True)(
            params, c.model_state, train.x[idx], train.y[idx], jax.random.fold_in(step_key, 1))
        tag = c.worker_tag[wk]
        tau = srv.count - c.worker_count[wk]
        s = srv.t - tag
        eta = self.lr_at(lr, srv.count)
        new_srv, w_send, tag_send, closed = server_update(
            self.rule, srv, g, tag, tau, eta, beta, K)
        # The next job of the arriving worker (async) or of everyone (barrier).
        lat_key = self._latency_key(run_key)
        jobs_next = c.jobs[wk] + 1
        lat = self.latency.sample(jax.random.fold_in(lat_key, jobs_next), c.latency_state, K)
        if self.dispatch == "async":
            worker_params = c.worker_params.at[wk].set(w_send)
            worker_tag = c.worker_tag.at[wk].set(tag_send)
            worker_count = c.worker_count.at[wk].set(new_srv.count)
            jobs = c.jobs.at[wk].set(jobs_next)
            finish = c.finish.at[wk].set(now + lat[wk])
            wave = c.wave
        else:
            wave = c.wave + 1
            release = wave >= K
            # Between broadcasts, the arrived worker waits (+inf); at a broadcast everyone starts
            # job number jobs_next (all workers have done the same number of jobs).
            wait = c.finish.at[wk].set(jnp.inf)
            finish = jnp.where(release, now + lat, wait)
            # The model of a broadcast: the server's w, or w before OrMo's -βu step when this
            # arrival closed an iteration and send_before_momentum_step is set (w_send).
            worker_params = jnp.where(release, w_send[None], c.worker_params)
            worker_tag = jnp.where(release, tag_send, c.worker_tag)
            worker_count = jnp.where(release, new_srv.count, c.worker_count)
            jobs = jnp.where(release, jobs_next, c.jobs)
            wave = jnp.where(release, 0, wave)
        new = Carry(new_srv, new_mstate, worker_params, worker_tag, worker_count, jobs, finish,
                    now, wave, c.latency_state)
        ys = {"train_loss": loss, "staleness": s.astype(jnp.float32),
              "staleness_arrivals": tau.astype(jnp.float32), "worker": wk, "time": now}
        return new, ys

    def _chunk_impl(self, carry, length, train, run_key, dyn):
        def body(c, _):
            return self._step(c, train, run_key, dyn)

        return jax.lax.scan(body, carry, None, length=length)

    def _eval_impl(self, w, mstate, x, y):
        from jbyz.simulate import evaluate_flat

        return evaluate_flat(self.model, self.unravel, "classification", w, mstate, x, y)

    def _programs(self, vmapped: bool, ndev: int = 1):
        key = (self._sig, vmapped, ndev)
        if key not in _PROGRAMS:
            chunk = self._chunk_impl
            if vmapped:
                chunk = jax.vmap(chunk, in_axes=(0, None, None, 0, 0))
            if vmapped and ndev > 1:
                # The runs axis sharded over a device mesh, as a synchronous grid (jbyz.grid).
                from jax.sharding import PartitionSpec as P

                mesh = jax.sharding.Mesh(np.array(jax.devices()[:ndev]), ("runs",))
                vchunk = chunk

                def chunk(carry, length, train, run_key, dyn):
                    f = lambda c, tr, k, d: vchunk(c, length, tr, k, d)
                    return jax.shard_map(
                        f, mesh=mesh, in_specs=(P("runs"), P(), P("runs"), P("runs")),
                        out_specs=(P("runs"), P("runs")), check_vma=False)(carry, train, run_key, dyn)
            _PROGRAMS[key] = jax.jit(chunk, static_argnums=(1,), donate_argnums=(0,))
        # Evaluation depends only on the model and the data: shared across methods.
        cfg = self.cfg
        ekey = ("eval", cfg.model, json.dumps(cfg.model_kwargs, sort_keys=True, default=str),
                id(self.ds), vmapped)
        if ekey not in _PROGRAMS:
            ev = self._eval_impl
            if vmapped:
                ev = jax.vmap(ev, in_axes=(0, 0, None, None))
            _PROGRAMS[ekey] = jax.jit(ev)
        return _PROGRAMS[key], _PROGRAMS[ekey]

    # ------------------------------------------------------------------ host loop
    def run(self, points: list[dict] | None = None, *, progress: bool = False,
            vmap: bool | None = None, devices: int | None = None) -> list[AsyncResult]:
        """Runs one or several points ``{"seed", "lr", "momentum"}`` (missing keys: the config's).

        Several points are vmapped into one program (``vmap=False`` runs them one after another);
        the vmapped runs axis is sharded over ``devices`` devices (default: all of them) with
        :func:`jax.shard_map`, padding the points to a multiple of the device count.
        Returns one :class:`AsyncResult` per point; ``AsyncResult.history`` has a row per
        evaluation with ``arrivals, epoch, wall_clock, iteration, test_loss, test_accuracy,
        train_loss, staleness, staleness_arrivals`` (the last three averaged over the chunk).
        """
        cfg = self.cfg
        points = [dict(p) for p in (points or [{}])]
        for p in points:
            p.setdefault("seed", cfg.seed)
            p.setdefault("lr", cfg.lr)
            p.setdefault("momentum", cfg.momentum)
        if vmap is None:
            vmap = len(points) > 1
        if not vmap:
            out = []
            for p in points:
                out.extend(self._run_group([p], vmapped=False, progress=progress))
            return out
        ndev = min(devices or jax.device_count(), jax.device_count())
        n_real = len(points)
        if ndev > 1:
            points = points + [points[-1]] * ((-len(points)) % ndev)  # padding runs, discarded
        return self._run_group(points, vmapped=True, progress=progress, ndev=ndev)[:n_real]

    def _run_group(self, points, *, vmapped: bool, progress: bool, ndev: int = 1):
        from jbyz._progress import tqdm_class

        tqdm = tqdm_class()

        cfg = self.cfg
        chunk_fn, eval_fn = self._programs(vmapped, ndev if vmapped else 1)
        carries = [self.init(int(p["seed"])) for p in points]
        keys = [jax.random.key(int(p["seed"])) for p in points]
        dyns = [{"lr": jnp.float32(p["lr"]), "momentum": jnp.float32(p["momentum"])} for p in points]
        if vmapped:
            stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
            carry, run_key, dyn = stack(carries), jnp.stack(keys), stack(dyns)
        else:
            carry, run_key, dyn = carries[0], keys[0], dyns[0]
        R = len(points)

        def evaluate(carry):
            out = eval_fn(carry.server.w, carry.model_state, *self.test)
            return {k: np.atleast_1d(np.asarray(v)) for k, v in out.items()}

        def row_values(carry):
            return {"arrivals": np.atleast_1d(np.asarray(carry.server.count)),
                    "wall_clock": np.atleast_1d(np.asarray(carry.clock)),
                    "iteration": np.atleast_1d(np.asarray(carry.server.t))}

        histories = [[] for _ in range(R)]
        events = [{"worker": [], "time": []} for _ in range(R)]

        def record(carry, ms):
            ev = evaluate(carry)
            rv = row_values(carry)
            for r in range(R):
                row = {k: float(v[r]) for k, v in {**rv, **ev}.items()}
                row["arrivals"] = int(row["arrivals"])
                row["iteration"] = int(row["iteration"])
                row["epoch"] = row["arrivals"] / self.arrivals_per_epoch
                for k in ("train_loss", "staleness", "staleness_arrivals"):
                    row[k] = float(np.asarray(ms[k]).reshape(R, -1)[r].mean()) if ms else float("nan")
                row.update(seed=int(points[r]["seed"]), lr=float(points[r]["lr"]),
                           momentum=float(points[r]["momentum"]))
                histories[r].append(row)
                if ms and cfg.record_events:
                    events[r]["worker"].append(np.asarray(ms["worker"]).reshape(R, -1)[r])
                    events[r]["time"].append(np.asarray(ms["time"]).reshape(R, -1)[r])

        record(carry, None)
        bar = tqdm(total=self.total, disable=not progress, leave=False, desc=cfg.label())
        t0 = time.perf_counter()
        compile_s = 0.0
        done = 0
        while done < self.total:
            length = min(cfg.eval_every, self.total - done)
            tc = time.perf_counter()
            carry, ms = chunk_fn(carry, length, self.train, run_key, dyn)
            jax.block_until_ready(carry)
            if done == 0:
                compile_s = time.perf_counter() - tc
            done += length
            record(carry, ms)
            bar.update(length)
        bar.close()
        wall = time.perf_counter() - t0
        results = []
        for r in range(R):
            cfg_r = cfg.replace(seed=int(points[r]["seed"]), lr=float(points[r]["lr"]),
                                momentum=float(points[r]["momentum"]))
            ev = None
            if cfg.record_events:
                ev = {k: np.concatenate(v) if v else np.zeros(0) for k, v in events[r].items()}
            w_final = np.asarray(carry.server.w)
            w_final = w_final[r] if vmapped else w_final
            results.append(AsyncResult(cfg_r, histories[r], ev, w_final, wall, compile_s))
        return results


def run_async(cfg: AsyncConfig, *, progress: bool = False, dataset=None) -> AsyncResult:
    """Runs one asynchronous configuration end to end."""
    return AsyncSimulation(cfg, dataset).run(progress=progress)[0]


__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "AsyncConfig",
    "AsyncSimulation",
    "AsyncResult",
    "ServerRule",
    "ServerState",
    "server_init",
    "server_update",
    "da_learning_rate",
    "check",
    "run_async",
]
