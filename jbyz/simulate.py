"""One training run: a configuration -> a pure, jitted ``lax.scan`` over steps -> metrics.

The pipeline of one step::

    keys -> per-worker batches (sampled on device) -> per-worker gradients (vmap)
         -> clip / worker momentum -> attack -> [diagnostics] -> pre-aggregation + aggregation
         -> normalise / server momentum / learning rate -> parameter update

It is built from the same optax transforms a user chains by hand (:mod:`jbyz.transforms`).

A configuration splits into a **static** part (shapes, kinds, model, the number of worker slots,
step counts: :func:`static_key`) and a **dynamic** part (:class:`Dyn`: the seed's key, lr,
momentum, weight decay, real and declared f, clipping radius, the number of real workers, the
attack's numeric hyper-parameters such as ALIE's z: :func:`jbyz.chain.traced_attack_kwargs`). A
:class:`Program` is compiled once per static part and takes the dynamic part as array
arguments, so one compiled program serves every seed, lr, f ... of a grid (:mod:`jbyz.grid`
vmaps it over runs). Different numbers of workers share a program by padding to ``n_max`` worker
slots: slots ``>= n_workers`` are invalid rows that every kernel ignores.

Keys are derived by position: ``run = key(seed)``, ``step = fold_in(run, t)``,
``worker = fold_in(step, i)``, so a run's randomness does not depend on anything around it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jbyz import attacks, chain, data, models, schedules
from jbyz.config import RunConfig, clients_per_round
from jbyz.schedules import per_epoch_schedule
from jbyz.validation import check
from jbyz.registry import ConfigError
from jbyz.types import byzantine_mask

# Salts of the per-step key streams (attack, aggregation, dropout, protocol).
_SALT_DROPOUT = 1
_SALT_TX = 2
_SALT_PROTOCOL = 3
_SALT_AUGMENT = 4
_SALT_STREAM = 5
_SALT_EVAL = 6
_SALT_SAMPLE = 7  # client sampling (client_fraction)
_SALT_LOCAL = 8  # the batches of local steps 2..K (local_steps)

# Diagnostics also recorded step by step (a list per evaluation row, ``<name>_steps``).
PER_STEP_METRICS = ("train_loss", "vnr_sampled", "vnr_submitted")

# Fields a compiled program takes as array arguments (vary freely inside one group of a grid).
DYNAMIC_FIELDS = ("seed", "lr", "momentum", "weight_decay", "f_real", "f", "clip_per_worker",
                  "n_workers", "dirichlet_alpha", "first_k", "local_lr", "client_fraction",
                  "client_fraction_of")

# The data-split values only change a run's index table, an array argument too.
DYNAMIC_FIELDS += ("gamma", "shards_per_worker", "split_seed")


class Carry(NamedTuple):
    params: Any
    model_state: Any
    worker_state: Any
    byz_state: Any
    agg_state: Any
    server_state: Any
    proto_state: Any  # the latency model's per-run state (per-worker speeds)
    clock: jax.Array  # simulated wall-clock time
    curvature: Any = ()  # CurvatureState when cfg.curvature_window is set
    eval_key: Any = ()  # key of the next evaluation's random test flips (augment_test)


class Dyn(NamedTuple):
    """The dynamic (array) part of a run configuration. A grid stacks these along a runs axis."""

    seed: jax.Array  # int32; the run key is ``jax.random.key(seed)``
    lr: jax.Array
    momentum: jax.Array
    weight_decay: jax.Array
    f_real: jax.Array  # int32
    f: jax.Array  # int32, declared
    clip: jax.Array  # clipping radius (unused when the static config does not clip)
    n_valid: jax.Array  # int32, real worker slots (the rest is padding)
    k: jax.Array  # int32, first-k: arrivals kept per round (n_workers when waiting for all)
    local_lr: jax.Array  # float32, the workers' local SGD rate (unused without local steps)
    m_sample: jax.Array  # int32, workers sampled per round (n_workers without client sampling)
    attack_kwargs: Any = ()  # {name: float32} the traced attack hyper-parameters (chain.traced_attack_kwargs)


class RunInputs(NamedTuple):
    """Everything a run needs besides the shared dataset: dynamic values, initial model, split."""

    dyn: Dyn
    params0: jax.Array  # [d] flat initial parameters
    model_state0: Any
    indices: jax.Array  # [n_max, m] int32, worker data split (padded)
    sizes: jax.Array  # [n_max] int32
    val_indices: Any = ()  # [validation_size] int32, the held-out training samples (or ())


@dataclasses.dataclass
class RunResult:
    """What :func:`run` returns: the config, one history row per evaluation, final parameters."""

    config: RunConfig
    history: list[dict]
    params: Any
    wall_time_s: float
    compile_time_s: float

    def to_frame(self):
        import pandas as pd

        df = pd.DataFrame(self.history)
        for k, v in self.config.to_dict().items():
            df[k] = [v] * len(df) if isinstance(v, (dict, list)) else v
        c = self.config
        for k, v in attacks.resolved_columns(c.attack, c.attack_kwargs, c.n_workers, c.f_real).items():
            df[k] = v  # what the attack resolved from the setting (ALIE's z: column attack.z)
        return df

    @property
    def final_accuracy(self) -> float:
        return float(self.history[-1]["test_accuracy"])

    @property
    def best_accuracy(self) -> float:
        return float(max(h["test_accuracy"] for h in self.history))


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, kwargs_items: tuple) -> data.Dataset:
    return data.load_dataset(name, **dict(kwargs_items))


def load_data(cfg: RunConfig) -> data.Dataset:
    return _load_cached(cfg.dataset, tuple(sorted(cfg.dataset_kwargs.items())))


_DEVICE_DATA: dict = {}


def _device_data(ds: data.Dataset):
    """``((x_train, y_train), (x_test, y_test))`` on the device, one copy per dataset object
    (every program of a grid shares it)."""
    key = id(ds)
    if key not in _DEVICE_DATA or _DEVICE_DATA[key][0] is not ds:
        if len(_DEVICE_DATA) >= 4:
            _DEVICE_DATA.pop(next(iter(_DEVICE_DATA)))
        _DEVICE_DATA[key] = (ds, ((jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)),
                                  (jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))))
    return _DEVICE_DATA[key][1]


def static_key(cfg: RunConfig, *, pad_workers: bool = False) -> str:
    """The part of ``cfg`` that decides the compiled program (JSON). Runs with equal keys share one.

    Dynamic fields are replaced by what they decide structurally: whether momentum, weight decay
    and clipping are on at all. With ``pad_workers`` the number of workers is dynamic too (the
    program is compiled for the group's largest ``n``).
    """
    d = cfg.to_dict()
    for k in DYNAMIC_FIELDS:
        d[k] = None
    d["momentum"] = cfg.momentum_at != "none" and cfg.momentum > 0
    d["weight_decay"] = cfg.weight_decay > 0
    d["clip_per_worker"] = cfg.clip_per_worker is not None
    d["first_k"] = cfg.first_k is not None
    d["local_lr"] = cfg.local_lr is not None
    d["client_fraction"] = cfg.client_fraction is not None
    d["compute_budget"] = None  # it only decides `steps`, which is in the key
    traced = chain.traced_attack_kwargs(cfg)  # passed as arguments: only their names decide
    d["attack_kwargs"] = {k: ("traced" if k in traced else v) for k, v in d["attack_kwargs"].items()}
    if not pad_workers or per_epoch_schedule(cfg):
        d["n_workers"] = cfg.n_workers  # (a per-epoch schedule's epoch length depends on it)
    if cfg.split == "dirichlet":
        d["dirichlet_alpha"] = "dynamic"
    return json.dumps(d, sort_keys=True, default=str)


def computes_byzantine_gradients(cfg: RunConfig) -> bool:
    """Whether Byzantine slots need their honest gradient (label flipping, own-vector attacks)."""
    atk = attacks.ATTACKS.build(cfg.attack, **dict(cfg.attack_kwargs))
    return atk.flips_labels or atk.needs_own_vector


def gradient_rows(cfg: RunConfig, n: int | None = None) -> int:
    """Worker slots of ``n`` (default ``cfg.n_workers``) that compute a gradient each step in a
    run of ``cfg`` alone: all of them without attack or when the attack needs the Byzantine
    workers' own gradients, else the ``n - f_real`` honest ones."""
    n = int(n or cfg.n_workers)
    return n if cfg.attack == "none" or computes_byzantine_gradients(cfg) else n - cfg.f_real


class Program:
    """The compiled pieces shared by every run with the same :func:`static_key`.

    Args:
      cfg: a representative configuration of the group (its dynamic fields are ignored).
      n_max: worker slots compiled for (``>= cfg.n_workers``; larger pads).
      grad_rows: how many worker slots (the last ones) compute gradients; the first
        ``n_max - grad_rows`` slots are Byzantine in every run of the group and skip it.
      dataset: the loaded dataset (default: loaded from ``cfg``).
    """

    def __init__(self, cfg: RunConfig, n_max: int | None = None, grad_rows: int | None = None,
                 dataset: data.Dataset | None = None):
        self.cfg = cfg
        self.dataset = ds = dataset if dataset is not None else load_data(cfg)
        self.n = n = int(n_max or cfg.n_workers)
        self.components = comp = chain.components(cfg)
        self.attack, self.aggregator, self.pre, self.latency = comp
        self.grad_rows = int(gradient_rows(cfg, n) if grad_rows is None else grad_rows)
        if cfg.augment != "none" and len(ds.input_shape) != 3:
            raise ConfigError(
                f"augment={cfg.augment!r} needs image inputs [H, W, C]; dataset {cfg.dataset!r} has "
                f"input_shape {ds.input_shape}. Use augment='none'.")
        self.model = self.build_model(0)
        self.grad_method = models.resolve_grad_method(self.model, cfg.grad_method)
        flat, self.unravel = ravel_pytree(self.model.params)
        self.d = int(flat.shape[0])
        self.momentum_on = chain.momentum_on(cfg)
        self.train, self.test = _device_data(ds)
        # The server's validation samples: the last `server_validation` training samples,
        # removed from the workers' data.
        self.n_server = int(cfg.server_validation)
        self.n_worker_samples = len(ds.y_train) - self.n_server
        # validation_size held-out samples: a random subset of the others (the run's split
        # seed), never the server's; the workers train on the remaining ones.
        self.n_val = int(cfg.validation_size)
        self._compiled: dict = {}

    # ------------------------------------------------------------------ host-side inputs
    def build_model(self, seed: int) -> models.FunctionalModel:
        ds = self.dataset
        return models.build_model(self.cfg.model, ds.input_shape, max(ds.num_classes, 1),
                                  key=jax.random.key(seed), **dict(self.cfg.model_kwargs))

    def inputs(self, cfg: RunConfig, width: int | None = None) -> RunInputs:
        """The :class:`RunInputs` of one configuration of this program's group (numpy arrays)."""
        n = self.n
        model = self.build_model(cfg.seed)
        flat, _ = ravel_pytree(model.params)
        split, val = self._split(cfg)
        idx, sizes = split.indices, split.sizes
        m = max(idx.shape[1], width or 0)
        idx = np.pad(idx, ((0, n - idx.shape[0]), (0, m - idx.shape[1])), mode="edge")
        sizes = np.pad(sizes, (0, n - sizes.shape[0]), constant_values=1)
        dyn = Dyn(
            seed=np.int32(cfg.seed),
            lr=np.float32(cfg.lr),
            momentum=np.float32(cfg.momentum),
            weight_decay=np.float32(cfg.weight_decay),
            f_real=np.int32(cfg.f_real),
            f=np.int32(cfg.f_declared),
            clip=np.float32(cfg.clip_per_worker or 0.0),
            n_valid=np.int32(cfg.n_workers),
            k=np.int32(cfg.first_k if cfg.first_k is not None else cfg.n_workers),
            local_lr=np.float32(cfg.local_lr or 0.0),
            m_sample=np.int32(clients_per_round(cfg)),
            attack_kwargs={k: np.float32(v) for k, v in chain.traced_attack_kwargs(cfg).items()},
        )
        return RunInputs(dyn, np.asarray(flat), jax.tree.map(np.asarray, model.state),
                         idx.astype(np.int32), sizes.astype(np.int32), val if self.n_val else ())

    def split_width(self, cfg: RunConfig) -> int:
        """Width of the padded index table of ``cfg``'s data split (to stack runs of a group)."""
        if cfg.split == "shared":
            return self.n_worker_samples - self.n_val
        return int(self._split(cfg)[0].indices.shape[1])

    def _split(self, cfg: RunConfig) -> tuple[data.WorkerSplit, np.ndarray]:
        """``cfg``'s worker split and held-out validation samples (both dataset indices) of the
        training samples before the server's (:func:`jbyz.data.split_training_set`)."""
        return data.split_training_set(
            self.dataset.y_train[:self.n_worker_samples], cfg.n_workers, cfg.split,
            validation_size=self.n_val, seed=cfg.data_seed, alpha=cfg.dirichlet_alpha,
            gamma=cfg.gamma, shards_per_worker=cfg.shards_per_worker)

    # ------------------------------------------------------------------ optimiser pieces
    def worker_stages(self, dyn: Dyn):
        """The honest workers' stages ``(clip, momentum)`` (:func:`jbyz.chain.worker_stages`).

        They act on the gradient rows only: the first ``n - grad_rows`` slots are Byzantine in
        every run of the group, and the attack overwrites them anyway.
        """
        return chain.worker_stages(self.cfg, dyn, self.grad_rows)

    def transforms(self, dyn: Dyn):
        """The four optax stages of a run (:func:`jbyz.chain.optimizer_chain`), closed over its
        dynamic values (traced or concrete)."""
        comp = self.components
        if dyn.attack_kwargs:  # the attack rebuilt with the run's own (traced) hyper-parameters
            comp = comp._replace(attack=attacks.ATTACKS.build(
                self.cfg.attack, **{**dict(self.cfg.attack_kwargs), **dyn.attack_kwargs}))
        return chain.optimizer_chain(self.cfg, comp, dyn, n=self.n,
                                     rows=self.grad_rows,
                                     samples_per_run=self.n_worker_samples - self.n_val)

    def lr_schedule(self, lr):
        """The learning-rate schedule ``t -> lr_t`` of this group (``lr`` may be traced)."""
        return schedules.lr_schedule(self.cfg, lr,
                                     samples_per_run=self.n_worker_samples - self.n_val)

    def init(self, inp: RunInputs) -> Carry:
        """The initial carry of one run (traceable; vmap it over runs)."""
        p = jnp.asarray(inp.params0)
        txs = self.transforms(inp.dyn)
        proto = ()
        if self.latency is not None:
            key = jax.random.fold_in(jax.random.key(inp.dyn.seed), 0x5EED_1A7)
            proto = self.latency.init(key, self.n)
        curv = () if self.cfg.curvature_window is None else curvature_init(self.cfg.curvature_window, p)
        return Carry(p, jax.tree.map(jnp.asarray, inp.model_state0), *(tx.init(p) for tx in txs),
                     proto, jnp.zeros([], jnp.float32), curv, self._eval_key(inp.dyn, 0))

    def _eval_key(self, dyn: Dyn, t):
        """The key of the random test flips of the evaluation after ``t`` steps (or ``()``)."""
        if self.cfg.augment_test == "none":
            return ()
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(dyn.seed), _SALT_EVAL), t)

    # ------------------------------------------------------------------ the step
    def _loss(self, flat, mstate, x, y, key, wd, mask=None):
        cfg = self.cfg
        params = self.unravel(flat)
        train = cfg.train_forward == "train"
        out, new_state = self.model.apply(params, mstate, x, train=train, key=key)
        if not train:  # eval-mode forward: the running statistics are not updated
            new_state = mstate
        if self.dataset.task == "regression":
            per = jnp.square(out.reshape(y.shape) - y)
        else:
            per = optax.softmax_cross_entropy_with_integer_labels(out, y)
        if mask is None:
            loss = per.mean()
        else:  # a short last batch of an epoch (sampling="epoch_stream")
            loss = jnp.sum(jnp.where(mask, per, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
        if cfg.weight_decay > 0:
            sq = jnp.sum(jnp.square(flat))
            loss = loss + (0.5 * wd * sq if cfg.l2_form == "squared" else wd * jnp.sqrt(sq))
        return loss, new_state

    def _batches(self, wkeys, inp: RunInputs, dyn: Dyn, t, train, byz, *, stream: bool = True):
        """The gradient rows' mini-batches ``(x, y, mask)``, drawn with the per-row ``wkeys``
        (``mask``: ``None``, or the valid samples of a short last batch of an epoch stream)."""
        cfg, n = self.cfg, self.n
        first = n - self.grad_rows
        x_all, y_all = train
        idx = jax.vmap(data.sample_indices, in_axes=(0, 0, 0, None))(
            wkeys, inp.indices[first:], inp.sizes[first:], cfg.batch_size)
        bmask = None
        if stream and cfg.sampling == "epoch_stream":
            # One shuffled stream of epochs shared by the workers: at step t the h honest
            # workers (slots f_real .. n_valid - 1, in order) take batches t h .. t h + h - 1.
            # Other slots that compute a gradient (Byzantine label flippers) keep their own
            # with-replacement draws.
            worker_ids = jnp.arange(first, n)
            h = dyn.n_valid - dyn.f_real
            j = worker_ids - dyn.f_real
            use = (j >= 0) & (j < h)
            skey = jax.random.fold_in(jax.random.key(dyn.seed), _SALT_STREAM)
            sidx, smask = jax.vmap(lambda b: data.stream_batch(
                skey, b, self.n_worker_samples, cfg.batch_size))(t * h + jnp.clip(j, 0, None))
            idx = jnp.where(use[:, None], sidx, idx)
            bmask = jnp.where(use[:, None], smask, True)
        xb, yb = x_all[idx], y_all[idx]
        if cfg.augment != "none":
            akeys = jax.vmap(lambda k: jax.random.fold_in(k, _SALT_AUGMENT))(wkeys)
            xb = jax.vmap(lambda k, xw: data.augment_images(k, xw, cfg.augment))(akeys, xb)
        if self.attack.flips_labels:
            yb = jnp.where(byz[first:, None], data.flip_labels(yb, self.dataset.num_classes), yb)
        return xb, yb, bmask

    def _grad_fn(self, wd, params_axis=None):
        """``(params, state, x, (y, mask), keys) -> ((loss, state), grad)`` per gradient row."""
        loss = functools.partial(self._loss, wd=wd)
        return models.map_workers(
            lambda p, s, x, y, k: jax.value_and_grad(loss, has_aux=True)(
                p, s, x, y[0], k, mask=y[1]),
            self.grad_method, params_axis=params_axis)

    def _local_rounds(self, carry: Carry, first_grads, first_losses, first_states, wkeys,
                      inp: RunInputs, dyn: Dyn, t, train, byz):
        """FedAvg's local training (``local_lr`` set): every gradient row starts at the server's
        ``theta``; its first SGD step uses the gradient already taken there, steps 2..K draw
        fresh batches (keys ``fold_in(fold_in(worker key, _SALT_LOCAL), k)``) at the row's own
        parameters, the model state fixed at the round's global one.

        Returns what the rows send (``theta - theta_K`` or ``theta_K``, per ``fed_send``), each
        row's loss averaged over its K steps, and its model state after the last step.
        """
        cfg = self.cfg
        theta = carry.params
        w = theta[None, :] - dyn.local_lr * first_grads
        loss_sum, states = first_losses, first_states
        if cfg.local_steps > 1:
            grad_fn = self._grad_fn(dyn.weight_decay, params_axis=0)

            def body(c, k):
                w, loss_sum, _ = c
                keys = jax.vmap(lambda kk: jax.random.fold_in(
                    jax.random.fold_in(kk, _SALT_LOCAL), k))(wkeys)
                xb, yb, _ = self._batches(keys, inp, dyn, t, train, byz, stream=False)
                dkeys = jax.vmap(lambda kk: jax.random.fold_in(kk, _SALT_DROPOUT))(keys)
                (losses, st), g = grad_fn(w, carry.model_state, xb, (yb, None), dkeys)
                return (w - dyn.local_lr * g, loss_sum + losses, st), None

            (w, loss_sum, states), _ = jax.lax.scan(
                body, (w, loss_sum, states), jnp.arange(1, cfg.local_steps))
        sent = w if cfg.fed_send == "weights" else theta[None, :] - w
        return sent, loss_sum / cfg.local_steps, states

    def step(self, carry: Carry, t, inp: RunInputs, train):
        cfg, n, rows = self.cfg, self.n, self.grad_rows
        dyn = inp.dyn
        step_key = jax.random.fold_in(jax.random.key(dyn.seed), t)
        first = n - rows  # slots [first, n) compute gradients
        worker_ids = jnp.arange(first, n)
        wkeys = jax.vmap(lambda w: jax.random.fold_in(step_key, w))(worker_ids)
        valid = jnp.arange(n) < dyn.n_valid
        if cfg.client_fraction is not None:  # this round's participants
            skey = jax.random.fold_in(jax.random.fold_in(jax.random.key(dyn.seed), _SALT_SAMPLE), t)
            valid = valid & sample_clients(skey, valid, dyn.m_sample)
        byz = byzantine_mask(n, dyn.f_real) & valid
        xb, yb, bmask = self._batches(wkeys, inp, dyn, t, train, byz)
        dkeys = jax.vmap(lambda k: jax.random.fold_in(k, _SALT_DROPOUT))(wkeys)
        tx_clip, tx_mom = self.worker_stages(dyn)
        # Where the gradients are taken: theta, or (nesterov_form="lookahead") the look-ahead
        # point theta - lr_t mu m of each worker's momentum (at the workers) or of the server's.
        at, params_axis = carry.params, None
        if cfg.nesterov and cfg.nesterov_form == "lookahead":
            step_len = self.lr_schedule(dyn.lr)(t) * dyn.momentum
            if cfg.momentum_at == "worker":
                at = carry.params[None, :] - step_len * carry.worker_state[1].momentum
                params_axis = 0
            else:
                at = carry.params - step_len * _server_momentum(carry.server_state)
        grad_fn = self._grad_fn(dyn.weight_decay, params_axis)
        (losses, new_mstates), grads = grad_fn(at, carry.model_state, xb, (yb, bmask), dkeys)
        if cfg.local_lr is not None:  # FedAvg: the rows send the result of local training
            grads, losses, new_mstates = self._local_rounds(
                carry, grads, losses, new_mstates, wkeys, inp, dyn, t, train, byz)
        metrics = {}
        clock = carry.clock
        if self.latency is not None:
            from jbyz import protocols

            lat = self.latency.sample(jax.random.fold_in(step_key, n + _SALT_PROTOCOL),
                                      carry.proto_state, n)
            if cfg.first_k is not None:
                valid, round_time = protocols.first_k(lat, dyn.k, valid, byz, cfg.byzantine_arrival)
                byz = byz & valid
            else:
                round_time = protocols.synchronous_round_time(lat, valid)
            clock = clock + round_time
            metrics.update(round_time=round_time, sim_time=clock)
        honest = valid & ~byz
        w_h = honest[first:].astype(jnp.float32) / jnp.sum(honest[first:])
        model_state = jax.tree.map(lambda s: jnp.tensordot(w_h, s, axes=1).astype(s.dtype), new_mstates)

        _, tx_byz, tx_agg, tx_server = self.transforms(dyn)
        tx_key = jax.random.fold_in(step_key, n + _SALT_TX)
        extra = dict(valid=valid, key=tx_key)
        g_clip, clip_state = tx_clip.update(grads, carry.worker_state[0], carry.params,
                                            valid=valid[first:])
        sent, mom_state = tx_mom.update(g_clip, carry.worker_state[1], carry.params,
                                        valid=valid[first:])
        worker_state = (clip_state, mom_state)
        if first:  # the always-Byzantine slots, overwritten by the attack
            sent = jnp.concatenate([jnp.zeros((first,) + sent.shape[1:], sent.dtype), sent])
        if self.n_server:  # before the attack: a rule-aware attack evaluates FLTrust/dSTAR with it
            extra["reference"] = self._server_gradient(carry, step_key, train, dyn)
        sent, byz_state = tx_byz.update(sent, carry.byz_state, carry.params, **extra)
        agg, agg_state = tx_agg.update(sent, carry.agg_state, carry.params, **extra)
        if cfg.fed_send == "weights":  # the aggregate of the models: step towards it
            agg = carry.params - agg
        upd, server_state = tx_server.update(agg, carry.server_state, carry.params)
        params = optax.apply_updates(carry.params, upd)
        metrics["train_loss"] = jnp.sum(w_h * losses)
        if cfg.diagnostics:
            metrics.update(_diagnostics(sent, agg, honest))
            metrics["vnr_sampled"] = variance_norm_ratio(g_clip, honest[first:])
            metrics["vnr_submitted"] = variance_norm_ratio(sent, honest)
            metrics.update(vnr_parts(g_clip, honest[first:], "sampled"))
            metrics.update(vnr_parts(sent, honest, "submitted"))
        curv = carry.curvature
        if cfg.curvature_window is not None:
            # the gradients as they enter the momentum: after honest clipping
            g_bar = jnp.tensordot(w_h, g_clip, axes=1)
            mu = dyn.momentum if self.momentum_on else jnp.zeros([], jnp.float32)
            curv, metrics["composite_curvature"] = curvature_update(curv, g_bar, t, mu)
        new = Carry(params, model_state, worker_state, byz_state, agg_state, server_state,
                    carry.proto_state, clock, curv, self._eval_key(dyn, t + 1))
        return new, metrics

    def _server_gradient(self, carry, step_key, train, dyn):
        """The server's gradient on a batch of its validation samples (dSTAR's and FLTrust's
        reference); with local steps, its pseudo-gradient ``theta - theta_K`` after the same
        ``local_steps`` SGD steps of rate ``local_lr`` as the workers (FLTrust's server update,
        Cao et al., NDSS 2021, Alg. 1), each on a fresh batch of its samples."""
        key = jax.random.fold_in(step_key, self.n + _SALT_PROTOCOL + 1)
        grad = jax.grad(lambda p, x, y, k: self._loss(p, carry.model_state, x, y, k,
                                                      dyn.weight_decay)[0])

        def batch_grad(params, key):
            pos = jax.random.randint(key, (self.cfg.batch_size,), self.n_worker_samples,
                                     self.n_worker_samples + self.n_server)
            return grad(params, train[0][pos], train[1][pos], jax.random.fold_in(key, 1))

        g = batch_grad(carry.params, key)
        if self.cfg.local_lr is None:
            return g
        w = carry.params - dyn.local_lr * g
        if self.cfg.local_steps > 1:
            w = jax.lax.fori_loop(1, self.cfg.local_steps, lambda k, w: w - dyn.local_lr * batch_grad(
                w, jax.random.fold_in(jax.random.fold_in(key, _SALT_LOCAL), k)), w)
        return carry.params - w

    def chunk(self, carry, t0, length: int, inp: RunInputs, train):
        """``length`` steps from step ``t0`` as one ``lax.scan``; returns the mean metrics."""
        def body(c, t):
            return self.step(c, t, inp, train)

        carry, ms = jax.lax.scan(body, carry, t0 + jnp.arange(length))
        # Means over the chunk; the simulated clock is reported at the chunk's end. With
        # diagnostics, PER_STEP_METRICS are also returned step by step (``<name>_steps``).
        out = {k: (v[-1] if k == "sim_time" else jnp.mean(v)) for k, v in ms.items()}
        if self.cfg.diagnostics:
            out.update({f"{k}_steps": ms[k] for k in PER_STEP_METRICS if k in ms})
        return carry, out

    def evaluate(self, params, mstate, test, key=()):
        """Test loss and accuracy of one run's parameters (chunks of 1000 images); ``key``: the
        random horizontal flips of the test images when ``augment_test="flip"``."""
        x, y = test
        if self.cfg.augment_test != "none":
            x = data.augment_images(key, x, self.cfg.augment_test)
        return evaluate_flat(self.model, self.unravel, self.dataset.task, params, mstate, x, y)

    def evaluate_run(self, carry: Carry, train, test, val_indices=()):
        """One evaluation row's metrics: :meth:`evaluate` on the test set and, with
        ``validation_size``, ``val_loss`` / ``val_accuracy`` on the run's held-out training
        samples ``val_indices`` (:attr:`RunInputs.val_indices`; no ``augment_test`` flips).
        Traceable; vmap it over runs."""
        out = self.evaluate(carry.params, carry.model_state, test, carry.eval_key)
        if self.n_val:
            vi = jnp.asarray(val_indices)
            val = evaluate_flat(self.model, self.unravel, self.dataset.task, carry.params,
                                carry.model_state, train[0][vi], train[1][vi])
            out.update({"val_" + k.removeprefix("test_"): v for k, v in val.items()})
        return out

    def flops(self, cfg: RunConfig | None = None) -> dict[str, float]:
        """Floating-point operations of one training step and of one evaluation of ``cfg`` (this
        program's configuration by default), from XLA's cost analysis; compiled, not run.

        XLA's cost analysis counts the body of a loop once, whatever its trip count (a chunk of
        ``k`` steps reports about what one step does). So the step is compiled alone, outside
        the chunk's ``lax.scan``, and the evaluation on one 1,000-image chunk of the test set,
        then scaled by the test set's size. Loops *inside* a step (GM's Weiszfeld iterations,
        local steps, ``grad_method="map"``) are still counted once: the result is a lower bound
        there.

        Returns:
          ``{"step": FLOP of one training step, "eval": FLOP of one evaluation}`` (NaN where
          the backend reports none).
        """
        cfg = cfg or self.cfg

        def count(compiled) -> float:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return float((cost or {}).get("flops", float("nan")))

        inp = jax.tree.map(jnp.asarray, self.inputs(cfg))
        carry = jax.eval_shape(self.init, inp)
        step = jax.jit(self.step).lower(carry, jnp.asarray(0, jnp.int32), inp, self.train)
        x, y = self.test
        n_test, chunk = int(x.shape[0]), min(1000, int(x.shape[0]))
        ev = jax.jit(lambda c, t: self.evaluate(c.params, c.model_state, t, c.eval_key)).lower(
            carry, (x[:chunk], y[:chunk]))
        return {"step": count(step.compile()), "eval": count(ev.compile()) * n_test / chunk}

    def timings(self, cfg: RunConfig | None = None, steps: int = 10) -> dict[str, float]:
        """Wall-clock seconds of one training step and of one evaluation of ``cfg`` here.

        Compiles one chunk of ``steps`` steps and the evaluation, runs each once to warm up,
        then times one more call of each. For projections (what a grid would cost on this
        machine), beside :meth:`flops`; not a benchmark with repeats (see ``benchmarks/``).

        Returns:
          ``{"step": s per step, "eval": s per evaluation, "compile": s to compile the chunk}``.
        """
        import time

        cfg = cfg or self.cfg
        inp = jax.tree.map(jnp.asarray, self.inputs(cfg))
        carry = jax.jit(self.init)(inp)
        t0 = jnp.asarray(0, jnp.int32)
        tc = time.perf_counter()
        chunk = jax.jit(self.chunk, static_argnums=(2,)).lower(carry, t0, steps, inp, self.train).compile()
        compile_s = time.perf_counter() - tc
        ev = jax.jit(lambda c, t: self.evaluate(c.params, c.model_state, t, c.eval_key)).lower(
            carry, self.test).compile()

        def seconds(f, *args) -> float:
            jax.block_until_ready(f(*args))  # warm
            tc = time.perf_counter()
            jax.block_until_ready(f(*args))
            return time.perf_counter() - tc

        return {"step": seconds(chunk, carry, t0, inp, self.train) / steps,
                "eval": seconds(ev, carry, self.test), "compile": compile_s}

    # ------------------------------------------------------------------ compiled entry points
    def compiled_single(self):
        """``(init, chunk, eval)`` jitted for one run (no runs axis)."""
        if "single" not in self._compiled:
            init = jax.jit(self.init)
            chunk = jax.jit(self.chunk, static_argnums=(2,), donate_argnums=(0,))
            ev = jax.jit(self.evaluate_run)
            self._compiled["single"] = (init, chunk, ev)
        return self._compiled["single"]


# Compiled programs keyed by (static key, n_max, grad_rows, dataset). Bounded: XLA:CPU maps every
# compiled kernel into its own memory sections, ~400-1,700 memory maps per program here, and a
# Linux process may hold 65,530 (``vm.max_map_count``); past that, compilation aborts the process
# ("LLVM ERROR: Unable to allocate section memory"), measured on the distributed-momentum grid at
# its 62nd program. 16 programs stay well inside it.
_PROGRAMS: dict = {}
_MAX_PROGRAMS = 16


def get_program(cfg: RunConfig, n_max: int | None = None, grad_rows: int | None = None,
                dataset: data.Dataset | None = None) -> Program:
    """The (cached) :class:`Program` for ``cfg``'s static part."""
    ds = dataset if dataset is not None else load_data(cfg)
    key = (static_key(cfg, pad_workers=True), n_max or cfg.n_workers, grad_rows, id(ds))
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= _MAX_PROGRAMS:
            release_program(next(iter(_PROGRAMS.values())))
        _PROGRAMS[key] = Program(cfg, n_max, grad_rows, ds)
    return _PROGRAMS[key]


def release_program(prog: Program) -> None:
    """Drops ``prog`` from the program cache and frees its compiled code now.

    :func:`get_program` calls it on the oldest program when the cache is full (see
    ``_MAX_PROGRAMS`` on why the bound matters on CPU). An object that still holds ``prog`` (a
    :class:`Simulation`) can use it again: its pieces are compiled again on first use (or loaded
    from the persistent compilation cache).
    """
    import gc

    for k in [k for k, v in _PROGRAMS.items() if v is prog]:
        del _PROGRAMS[k]
    prog._compiled.clear()  # the batch runners hold the compiled chunks (and point back: a cycle)
    gc.collect()


class Simulation:
    """One run configuration, ready to run (its compiled program is shared across seeds)."""

    def __init__(self, cfg: RunConfig, dataset: data.Dataset | None = None):
        self.cfg = cfg = check(cfg)
        self.program = get_program(cfg, dataset=dataset)
        self.dataset = self.program.dataset
        self.n = self.program.n

    def run(self, *, progress: bool | Any = True, desc: str | None = None) -> RunResult:
        from jbyz._progress import tqdm_class

        tqdm = tqdm_class()
        cfg, prog = self.cfg, self.program
        init, chunk, ev = prog.compiled_single()
        inp = jax.device_put(prog.inputs(cfg))
        carry = init(inp)
        evaluate = lambda c: {k: float(v) for k, v in ev(
            c, prog.train, prog.test, inp.val_indices).items()}
        history = [{"step": 0, **evaluate(carry)}]
        bar = progress if not isinstance(progress, bool) else tqdm(
            total=cfg.steps, desc=desc or cfg.label(), disable=not progress, leave=False, unit="step")
        t_start = time.perf_counter()
        compile_s = 0.0
        t = 0
        while t < cfg.steps:
            length = min(cfg.eval_every, cfg.steps - t)
            tc = time.perf_counter()
            carry, ms = chunk(carry, jnp.asarray(t, jnp.int32), length, inp, prog.train)
            ms = {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in ms.items()}
            if t == 0:
                compile_s = time.perf_counter() - tc  # first call includes compilation
            t += length
            history.append({"step": t, **evaluate(carry), **ms})
            bar.update(length)
            bar.set_postfix(acc=f"{history[-1]['test_accuracy']:.3f}")
        if isinstance(progress, bool):
            bar.close()
        wall = time.perf_counter() - t_start
        return RunResult(cfg, history, prog.unravel(carry.params), wall, compile_s)


def evaluate_flat(model, unravel, task: str, params, mstate, x, y, chunk: int = 1000):
    """Test loss and accuracy of a flat parameter vector, in chunks of ``chunk`` inputs (bounds
    the memory of convolutions); the last chunk is padded and masked. Traceable and vmappable.

    Returns ``{"test_loss", "test_accuracy"}`` (accuracy 0 for ``task == "regression"``, whose
    loss is the squared error).
    """
    chunk = min(chunk, x.shape[0])
    N = x.shape[0]
    pad = (-N) % chunk
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    yp = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    m = jnp.arange(N + pad) < N

    def one(args):
        xc, yc, mc = args
        out, _ = model.apply(unravel(params), mstate, xc, train=False)
        if task == "regression":
            loss = jnp.square(out.reshape(yc.shape) - yc)
            correct = jnp.zeros_like(loss)
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(out, yc)
            correct = (jnp.argmax(out, -1) == yc).astype(jnp.float32)
        return jnp.sum(loss * mc), jnp.sum(correct * mc)

    shape = lambda a: a.reshape((-1, chunk) + a.shape[1:])
    losses, corrects = jax.lax.map(one, (shape(xp), shape(yp), shape(m)))
    return {"test_loss": jnp.sum(losses) / N, "test_accuracy": jnp.sum(corrects) / N}


class CurvatureState(NamedTuple):
    history: jax.Array  # [K, d]: slot t mod K holds the mean gradient of step t


def sample_clients(key, valid, m) -> jax.Array:
    """``[n]`` bool: ``m`` of the ``valid`` slots drawn uniformly without replacement (all of
    them when ``m`` is at least their number). ``m`` may be traced.

    Ranks i.i.d. uniform scores by pairwise comparison (no sort: ``n`` is small, and sorts are
    slow on XLA:CPU); ties have probability zero and are broken by slot index.
    """
    n = valid.shape[0]
    u = jnp.where(valid, jax.random.uniform(key, (n,)), 2.0)
    i = jnp.arange(n)
    before = (u[None, :] < u[:, None]) | ((u[None, :] == u[:, None]) & (i[None, :] < i[:, None]))
    return valid & (jnp.sum(before, axis=1) < m)


def curvature_init(window: int, params) -> CurvatureState:
    return CurvatureState(jnp.zeros((int(window),) + jnp.shape(params), jnp.float32))


def curvature_update(state: CurvatureState, g_bar, t, mu) -> tuple[CurvatureState, jax.Array]:
    r"""El Mhamdi et al.'s composite curvature of step ``t`` and the updated gradient history.

    .. math:: s_t = \mu \sum_{i=0}^{K-1} \mu^i \langle \bar g_t, \bar g_{t-1-i} \rangle

    over the ``K`` previous steps that exist (fewer for ``t < K``; 0 at ``t = 0``), ``\bar g``
    being the honest workers' mean gradient as it enters their momentum (after
    ``clip_per_worker`` when set: the :math:`g_t` of the update rules) and ``\mu`` the
    momentum: the inner product of the new gradient with the momentum the past gradients built
    up, i.e. how much the momentum's direction agrees with the current gradient (ICLR 2021, §4,
    from their code's diagnostic). Exact: one ``[K, d] @ [d]`` product a step, no running sum to
    drift.

    Args:
      state: the last ``K`` mean gradients.
      g_bar: ``[d]``, this step's mean honest gradient.
      t: the step (traced int).
      mu: the momentum coefficient (traced).

    Returns:
      ``(new state, s_t)``.
    """
    hist = state.history
    K = hist.shape[0]
    g = g_bar.astype(jnp.float32).reshape(-1)
    slots = jnp.arange(K)
    lag = (t - slots - 1) % K + 1  # slot j holds step t - lag_j ...
    filled = lag <= t  # ... if that step exists
    coef = jnp.where(filled, mu ** lag.astype(jnp.float32), 0.0)  # mu * mu^(lag - 1)
    dots = jnp.matmul(hist.reshape(K, -1), g, precision=jax.lax.Precision.HIGHEST)
    s = jnp.sum(coef * dots)
    new = hist.at[t % K].set(g.reshape(hist.shape[1:]))
    return CurvatureState(new), s


def _server_momentum(server_state):
    """The momentum buffer inside the server chain's state (``optax.trace`` or ``optax.ema``)."""
    for s in jax.tree.leaves(server_state, is_leaf=lambda s: isinstance(
            s, (optax.TraceState, optax.EmaState))):
        if isinstance(s, optax.TraceState):
            return s.trace
        if isinstance(s, optax.EmaState):
            return s.ema
    raise ValueError("no server momentum in the server state")  # pragma: no cover (validated)


def variance_norm_ratio(x, rows) -> jax.Array:
    r"""El Mhamdi et al.'s variance-norm ratio of the vectors ``x[rows]`` (``h`` of them):

    .. math:: r = \frac{\frac{1}{h-1}\sum_{i}\|x_i - \bar x\|^2}{\|\bar x\|^2}

    (the unbiased variance of the vectors over their mean's squared norm; ``(dev / norm)^2`` in
    the authors' code, ``tools/pytorch.py`` and ``study.py``). Their Krum/Bulyan and Median
    guarantees hold while :math:`\sqrt r` stays below the rule's bound
    (:func:`jbyz.aggregators.variance_norm_bound`). NaN when ``h < 2``.
    """
    var, msq, h = _variance_and_mean_sq(x, rows)
    return jnp.where(h >= 2, var / jnp.maximum(msq, 1e-30), jnp.nan)


def _variance_and_mean_sq(x, rows):
    r"""The unbiased variance :math:`\frac{1}{h-1}\sum_i\|x_i-\bar x\|^2` of ``x[rows]``, the
    squared norm of their mean :math:`\|\bar x\|^2`, and their number ``h``."""
    w = rows.astype(jnp.float32)
    h = jnp.sum(w)
    xs = jnp.where(rows[:, None], x.astype(jnp.float32), 0.0)
    mu = (w @ xs) / h
    var = jnp.sum(w * jnp.sum(jnp.square(xs - mu), axis=1)) / (h - 1.0)
    return var, jnp.sum(mu * mu), h


def vnr_parts(x, rows, name: str) -> dict[str, jax.Array]:
    r"""The two factors of :func:`variance_norm_ratio` of ``x[rows]``: ``dev_<name>`` =
    :math:`\sqrt{\frac{1}{h-1}\sum_i\|x_i-\bar x\|^2}` and ``norm_<name>`` = :math:`\|\bar x\|`
    (the authors' ``compute_avg_dev_max``), so that a change of the ratio can be told apart as a
    change of the spread or of the mean's length."""
    var, msq, h = _variance_and_mean_sq(x, rows)
    return {f"dev_{name}": jnp.where(h >= 2, jnp.sqrt(var), jnp.nan),
            f"norm_{name}": jnp.sqrt(msq)}


def _diagnostics(sent, agg, honest) -> dict[str, jax.Array]:
    r"""Cheap robustness diagnostics of one step.

    ``variance_norm_ratio`` = :math:`\sqrt{\frac{1}{|H|}\sum_{i\in H}\|x_i-\bar x_H\|^2}/\|\bar x_H\|`
    over the vectors honest workers submitted (El Mhamdi et al. 2021 study its relation to the
    GAR's bound); ``agg_distance`` = :math:`\|\hat g-\bar x_H\|`; ``agg_cosine`` = cosine between
    the aggregate and the honest mean.
    """
    w = honest.astype(jnp.float32)
    nh = jnp.sum(w)
    s = jnp.where(honest[:, None], sent.astype(jnp.float32), 0.0)
    a = agg.astype(jnp.float32)
    mu = (w @ s) / nh
    sq_dev = jnp.sum(w * jnp.sum(jnp.square(s - mu), axis=1)) / nh
    mean_norm = jnp.sqrt(jnp.sum(mu * mu))
    return {
        "variance_norm_ratio": jnp.sqrt(sq_dev) / jnp.maximum(mean_norm, 1e-30),
        "agg_distance": jnp.sqrt(jnp.sum(jnp.square(a - mu))),
        "agg_cosine": jnp.sum(a * mu) / jnp.maximum(jnp.sqrt(jnp.sum(a * a)) * mean_norm, 1e-30),
    }


def run(cfg: RunConfig, *, progress: bool | Any = True, dataset: data.Dataset | None = None) -> RunResult:
    """Runs one configuration end to end and returns its history (one row per evaluation)."""
    return Simulation(cfg, dataset).run(progress=progress)
