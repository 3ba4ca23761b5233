"""Run configurations as plain data: a dataclass, TOML files, and how a grid executes.

This module sits at the bottom of jbyz (it imports only :mod:`jbyz.registry` and
:mod:`jbyz.plugins`); checking a configuration against the registries is
:func:`jbyz.validation.validate`.

A configuration file is TOML with a ``[run]`` table (fields of :class:`RunConfig`, and
``plugins``: modules imported first, which register components of one's own, see
:mod:`jbyz.plugins`), an optional ``[sweep]`` table (field -> list of values; the product is run), optional ``[[grid]]`` blocks
(explicit parts of the grid where a single product is wrong: each block is a table of field ->
value or list; the grid is the union over blocks of the product of ``[sweep]`` and the block,
the block's fields overriding the sweep's), an optional ``[execution]`` table (how the grid runs:
:class:`GridOptions`) and an optional ``[output]`` table (``dir``)::

    [run]
    dataset = "digits"
    model = "mlp"
    n_workers = 10
    f_real = 3
    steps = 300

    [sweep]
    aggregator = ["mean", "median", {name = "centered_clip", tau = 1.0}]
    attack = ["alie", "foe"]
    seed = [1, 2, 3]

    [[grid]]            # the attacked runs: the product above
    [[grid]]            # plus unattacked references, with the mean only
    attack = "none"
    aggregator = "mean"

A file may start with ``extends = "other.toml"`` (a path relative to the file's folder): it is then
``other.toml`` with this file's tables on top: ``[run]``, ``[sweep]``, ``[execution]`` and
``[output]`` keys replace the other file's (a component named anew drops the other file's
``<component>_kwargs`` unless it gives its own); ``plugins`` are both files'; this file's
``[[grid]]`` blocks come after the other file's. A variant of a study (another model, another
dataset) then stays in step with the study as blocks are added to it::

    extends = "study.toml"
    [run]
    model = "lenet"
    model_kwargs = {channels = [8, 16]}
    [output]
    dir = "experiments/byzsgdnm/results/study_cnn"

A component field (``dataset``, ``model``, ``aggregator``, ``attack``) takes a name, or a table
``{name = ..., <hyper-parameters>}``. ``preaggregators`` is a list of names or such tables.
Every problem found is reported at once, with what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

from jbyz.registry import ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "split": ("shared", "iid", "dirichlet", "extreme", "gamma_similarity", "shards"),
    "lr_schedule": ("constant", "cosine", "inverse_time", "step"),
    "momentum_at": ("worker", "server", "none"),
    "momentum_form": ("ema", "sum"),
    "momentum_first": ("gradient", "zero"),
    "l2_form": ("squared", "norm"),
    "grad_method": ("auto", "vmap", "unroll", "map"),
    "byzantine_arrival": ("honest", "first"),
    "augment": ("none", "flip", "crop_flip"),
    "augment_test": ("none", "flip"),
    "nesterov_form": ("pytorch", "lookahead"),
    "sampling": ("replacement", "epoch_stream"),
    "train_forward": ("train", "eval"),
    "clip_form": ("radius", "unit"),
    "fed_send": ("pseudo_gradient", "weights"),
    "client_fraction_of": ("all", "honest"),
}

# Fields added after results were first published, with a default that reproduces the earlier
# behaviour: left out of the config hash (a run's id) while at that default, so results computed
# before a field existed keep their ids and a grid still resumes.
_HASH_OMIT_AT_DEFAULT = {"augment": "none", "curvature_window": None, "momentum_first": "gradient",
                         "augment_test": "none", "nesterov_form": "pytorch",
                         "sampling": "replacement", "train_forward": "train", "clip_form": "radius",
                         "local_steps": 1, "local_lr": None, "fed_send": "pseudo_gradient",
                         "client_fraction": None, "client_fraction_of": "all"}

_HASH_OMIT_AT_DEFAULT.update({"gamma": 0.5, "shards_per_worker": 2, "split_seed": None,
                              "validation_size": 0})  # the data-split fields


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. Defaults: the quickstart (digits, MLP, n=10 of which 3 Byzantine).

    Attributes:
      dataset, dataset_kwargs: a ``jbyz.data.DATASETS`` entry and its arguments.
      model, model_kwargs: a ``jbyz.models.MODELS`` entry and its arguments.
      split: how training data is assigned to workers: ``shared`` (every worker samples the
        whole training set), ``iid`` (equal random shards), ``dirichlet`` (label skew with
        ``dirichlet_alpha``), ``extreme`` (label-sorted shards), ``gamma_similarity`` (ByzFL's:
        a fraction ``gamma`` of the samples dealt iid, the rest label-sorted), ``shards``
        (McMahan et al.'s pathological split, as Blades: label-sorted shards,
        ``shards_per_worker`` of them each); see :func:`jbyz.data.split_workers`. Byzantine
        workers get their share too (label flippers train on it).
      gamma: the iid fraction of ``split="gamma_similarity"``, in ``[0, 1]`` (1: ``iid``, 0:
        ``extreme``).
      shards_per_worker: the shards each worker holds with ``split="shards"`` (integer >= 1).
      split_seed: seeds the data split and the validation hold-out; ``None`` (default): the
        run's ``seed``. With it set, runs of different ``seed`` share one split and runs of
        different ``split_seed`` differ in their split only (initialisation and every draw of
        the training follow ``seed``).
      validation_size: training samples held out of the workers' data, a uniform random subset
        drawn with the split seed (before the split; never one of the server's
        ``server_validation`` samples, which are the last ones of the training set). Each
        evaluation reports ``val_loss`` and ``val_accuracy`` on them beside ``test_loss`` and
        ``test_accuracy`` (without ``augment_test`` flips). Not with ``sampling="epoch_stream"``.
      n_workers: number of workers ``n`` (Byzantine included).
      f_real: how many workers are Byzantine (the first ``f_real`` slots).
      f: how many Byzantine workers the aggregator assumes (default ``f_real``).
      batch_size: mini-batch size per worker.
      steps, lr, lr_schedule, lr_schedule_kwargs: number of steps, learning rate and its schedule:
        ``constant``; ``cosine`` (decay to 0 over ``steps``; kwarg ``every``: a staircase that
        changes the lr every ``every`` steps, or ``"epoch"`` for Yang et al.'s per-epoch cosine
        :math:`\\eta_i = \\frac{\\eta_0}{2}(1 + \\cos(i\\pi/E))` in epoch ``i``, an epoch being
        ``N / (n_workers * batch_size)`` steps: each worker passes once over an equal share of the
        ``N`` training samples); ``inverse_time`` (El Mhamdi et al.'s
        code: :math:`\\eta_t = \\eta_0 / (1 + t'/\\text{decay})` with :math:`t'` = ``t`` rounded down
        to a multiple of ``every``; kwargs ``decay``, ``every``).
      momentum, momentum_at, momentum_form, nesterov: momentum coefficient; where it lives
        (``worker``: each worker sends its momentum; ``server``: on the aggregate; ``none``);
        ``ema`` or ``sum`` (heavy-ball) form; Nesterov variant.
      momentum_first: how the workers' EMA momentum starts: ``gradient`` (``u_1 = g_1``, the
        papers' choice, default) or ``zero`` (``u_0 = 0``, so ``u_1 = (1 - mu) g_1``, as ByzFL).
        Only for ``momentum_at="worker"`` with ``momentum_form="ema"``; the server's EMA is
        ``optax.ema(debias=False)``, which always starts from zero.
      nesterov_form: what ``nesterov=True`` means. ``pytorch`` (default): gradients at
        :math:`\\theta_t`, the worker sends :math:`g_t + \\mu m_t` (at the server: the update is
        :math:`G_t + \\mu M_t`), PyTorch's and optax's reformulation. ``lookahead`` (El Mhamdi et
        al.'s code): the gradient is taken at the look-ahead point, each worker's own
        :math:`\\theta_t - \\eta_t \\mu m^{(i)}_{t-1}` when momentum is at the workers (which
        then send :math:`m^{(i)}_t`), or :math:`\\theta_t - \\eta_t \\mu M_{t-1}` for every
        worker when it is at the server (update :math:`\\theta_{t+1} = \\theta_t - \\eta_t M_t`).
        Ignored when ``nesterov=false``.
      clip_per_worker: honest workers clip their gradient to this L2 norm before momentum.
      clip_form: ``radius`` (default): :math:`g \\min(1, c/\\|g\\|)`; ``unit``: a gradient longer
        than ``c`` is rescaled to norm 1 (El Mhamdi et al.'s ICLR 2021 code snapshot, corrected
        in their repository in May 2021).
      weight_decay, l2_form: L2 regularisation added to the loss, ``squared`` (wd/2 ||w||^2) or
        ``norm`` (wd ||w||, as El Mhamdi et al.'s code).
      normalize: step along the normalised aggregate (ByzSGDnm).
      aggregator, aggregator_kwargs, preaggregators: the robust rule and its pre-aggregators.
      attack, attack_kwargs: the Byzantine attack.
      eval_every: evaluate on the test set every this many steps.
      diagnostics: record the per-step robustness diagnostics (variance-norm ratio of honest
        vectors, distance and cosine between the aggregate and the honest mean).
      curvature_window: ``K``: also record El Mhamdi et al.'s "composite curvature"
        :math:`s_t = \\mu \\sum_{i=0}^{K-1} \\mu^i \\langle \\bar g_t, \\bar g_{t-1-i} \\rangle`
        per step (metric ``composite_curvature``), with :math:`\\bar g_t` the mean of the
        honest workers' gradients as they enter the momentum (after ``clip_per_worker``) and
        :math:`\\mu` the momentum; their code uses K = 150 (MNIST) and 25 (CIFAR). Keeps the
        last ``K`` mean gradients (``K x d`` floats per run). ``None``: off.
      grad_method: how per-worker gradients are formed: ``vmap``, ``unroll`` (a loop over the
        static worker count; fastest for CNNs on XLA:CPU), ``map`` (``lax.map``), or ``auto``
        (``unroll`` for conv models on CPU, ``vmap`` otherwise); see ``benchmarks/NOTES_cnn.md``.
      latency, latency_kwargs: a ``jbyz.protocols.LATENCIES`` model of per-round worker
        latencies (``none``: no simulated clock). Adds the metrics ``round_time`` (mean simulated
        duration of a round) and ``sim_time`` (simulated wall-clock since the start).
      first_k: synchronous rounds keep only the ``k`` earliest arrivals (stragglers' vectors are
        dropped; needs a latency model). ``None``: wait for everyone.
      byzantine_arrival: ``honest`` (Byzantine workers draw latencies like everyone) or
        ``first`` (they always arrive first: the worst case for first-k).
      augment: data augmentation of the training batches, drawn per sample inside the step:
        ``none``, ``flip`` (random horizontal flip, p = 1/2; El Mhamdi et al. on Fashion-MNIST
        and CIFAR) or ``crop_flip`` (zero-pad 4 pixels, random crop back to size, then flip: the
        standard CIFAR augmentation). Images only.
      server_validation: the server holds this many training samples (removed from the workers'
        data) and computes a gradient on a batch of them each step: the reference of rules that
        need one (dSTAR, ``needs_reference``).
      compute_budget: fixed-compute runs (Yang et al. 2024): the budget ``C`` of honest
        per-sample gradient computations; the number of steps follows from the batch size and the
        Byzantine fraction, :math:`T = \\lceil C / (B\\, m\\, (1 - \\delta)) \\rceil` with ``m`` =
        ``n_workers`` and :math:`\\delta` = ``f_real / n_workers`` (``steps`` is then derived and
        any value given for it is replaced).
      augment_test: ``none`` or ``flip``: a fresh random horizontal flip of every test image
        at each evaluation (El Mhamdi et al.'s code applies its training transforms to the test
        set too, on Fashion-MNIST and CIFAR).
      sampling: how workers draw their mini-batches. ``replacement`` (default): each worker
        draws ``batch_size`` indices uniformly with replacement from its share. ``epoch_stream``
        (El Mhamdi et al.'s code, a shuffled PyTorch ``DataLoader``): one random permutation of
        the training set per epoch, shared by all workers; at step ``t`` the ``h`` honest workers
        take the next ``h`` consecutive batches of the stream, so every example is used once
        per epoch; the last batch of an epoch holds the ``N mod B`` remaining examples (the
        loss averages over them only). Needs ``split="shared"``.
      train_forward: ``train`` (default) or ``eval``: the mode of the training forward pass.
        ``eval`` runs it as at test time (dropout off, BatchNorm on its running statistics,
        which then never change from their initial values): what El Mhamdi et al.'s code does,
        by accident, for its CIFAR CNN.
      local_steps, local_lr, fed_send: federated rounds (FedAvg, McMahan et al., AISTATS 2017;
        with a server optimiser, Reddi et al., ICLR 2021). With ``local_lr`` set, every sampled
        worker starts the round from the server's :math:`\\theta` and takes ``local_steps``
        SGD steps of rate ``local_lr`` on fresh mini-batches of its data, reaching
        :math:`\\theta_i^K`; it sends the pseudo-gradient :math:`\\theta - \\theta_i^K`
        (``fed_send="pseudo_gradient"``, default) or its weights :math:`\\theta_i^K`
        (``"weights"``, ByzFL's FedAvg: the attack and the rule then act on weights, and the
        server steps along :math:`\\theta - \\mathrm{Agg}(\\theta_i^K)`, so ``lr = 1`` without
        server momentum sets :math:`\\theta \\leftarrow \\mathrm{Agg}`). The server applies its
        usual stages to the aggregate (``lr``, its schedule, ``momentum_at="server"``:
        FedAvgM). ``local_lr`` unset: workers send their gradient (distributed SGD).
        BatchNorm statistics: each local step starts from the round's global statistics; the
        honest workers' statistics after their last step are averaged.
      client_fraction, client_fraction_of: client sampling: each round a fresh uniform sample
        without replacement of :math:`m = \\lfloor p\\,N \\rfloor` of the workers takes part
        (the others are invalid rows: they send nothing and keep their state), with ``p`` =
        ``client_fraction`` and ``N`` = ``n_workers`` (``client_fraction_of="all"``) or
        ``n_workers - f_real`` (``"honest"``, ByzFL's count). Byzantine workers are sampled
        like the others, so how many take part varies by round; the rule keeps its declared
        ``f``. ``None``: everyone, every round.
      seed: seeds data split, model initialisation and every random draw of the run.
    """

    dataset: str = "digits"
    dataset_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model: str = "mlp"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    split: str = "shared"
    dirichlet_alpha: float = 1.0
    gamma: float = 0.5
    shards_per_worker: int = 2
    split_seed: int | None = None
    validation_size: int = 0
    n_workers: int = 10
    f_real: int = 3
    f: int | None = None
    batch_size: int = 32
    steps: int = 300
    lr: float = 0.1
    lr_schedule: str = "constant"
    lr_schedule_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    momentum: float = 0.9
    momentum_at: str = "worker"
    momentum_form: str = "ema"
    momentum_first: str = "gradient"
    nesterov: bool = False
    clip_per_worker: float | None = None
    weight_decay: float = 0.0
    l2_form: str = "squared"
    normalize: bool = False
    aggregator: str = "median"
    aggregator_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    preaggregators: tuple = ()
    attack: str = "none"
    attack_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_every: int = 25
    diagnostics: bool = True
    grad_method: str = "auto"
    latency: str = "none"
    latency_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    first_k: int | None = None
    byzantine_arrival: str = "honest"
    server_validation: int = 0
    compute_budget: int | None = None
    augment: str = "none"
    curvature_window: int | None = None
    nesterov_form: str = "pytorch"
    clip_form: str = "radius"
    augment_test: str = "none"
    sampling: str = "replacement"
    train_forward: str = "train"
    local_steps: int = 1
    local_lr: float | None = None
    fed_send: str = "pseudo_gradient"
    client_fraction: float | None = None
    client_fraction_of: str = "all"
    seed: int = 0

    @property
    def f_declared(self) -> int:
        return self.f_real if self.f is None else self.f

    def replace(self, **changes) -> "RunConfig":
        """A copy with ``changes`` applied (validated as :func:`from_dict`).

        As in configuration files, a component given anew (``attack="alie"``, or a table
        ``attack={"name": "alie", "z": 1.5}``) starts from its own defaults: the previous
        component's hyper-parameters are dropped unless ``<component>_kwargs`` is given too. The
        same name as before keeps them.
        """
        d = self.to_dict()
        for c in _COMPONENTS:
            if c in changes and f"{c}_kwargs" not in changes:
                v = changes[c]
                if isinstance(v, Mapping) or v != getattr(self, c):
                    d[f"{c}_kwargs"] = {}
        return from_dict({**d, **changes})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preaggregators"] = [list(p) if isinstance(p, tuple) else p for p in self.preaggregators]
        return d

    def label(self) -> str:
        """A short human-readable label (aggregator / attack)."""
        agg = self.aggregator + "".join(f"+{p[0]}" for p in _norm_pre(self.preaggregators))
        return f"{agg} / {self.attack}"

    @property
    def data_seed(self) -> int:
        """The seed of the data split and validation hold-out: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def config_hash(self) -> str:
        d = self.to_dict()
        for k, default in _HASH_OMIT_AT_DEFAULT.items():
            if d.get(k) == default:
                del d[k]
        if d.get("attack") == "alie":
            d["attack_kwargs"] = _alie_hash_kwargs(d.get("attack_kwargs") or {})
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}

# ALIE's default z was Baruch et al.'s formula until jbyz 0.1 and is 1.5 since (the value of
# jbyz.attacks.ALIE_DEFAULT_Z; config sits below the attacks and cannot import it). The z a run
# uses enters its id: a config leaving z unset hashes as z = 1.5 (so results stored for the
# former default are never reused for it), one asking for the formula (z = "baruch") hashes as z
# left unset did before, and configs giving z keep their ids.
_ALIE_DEFAULT_Z = 1.5


def _alie_hash_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    if "z" not in kw:
        kw["z"] = _ALIE_DEFAULT_Z
    elif kw["z"] == "baruch":
        del kw["z"]
    return kw
_COMPONENTS = ("dataset", "model", "aggregator", "attack", "latency")


def _norm_pre(pre) -> tuple[tuple[str, dict], ...]:
    if isinstance(pre, (str, Mapping)):  # one pre-aggregator given on its own
        pre = (pre,)
    out = []
    for p in pre:
        if isinstance(p, str):
            out.append((p, {}))
        elif isinstance(p, Mapping):
            p = dict(p)
            out.append((p.pop("name"), p))
        else:
            name, kw = p
            out.append((name, dict(kw)))
    return tuple(out)


def _expand_component(d: dict, field: str) -> None:
    v = d.get(field)
    if isinstance(v, Mapping):
        v = dict(v)
        if "name" not in v:
            raise ConfigError(f"{field} table needs a 'name' key, got {sorted(v)}")
        d[field] = v.pop("name")
        d[f"{field}_kwargs"] = {**d.get(f"{field}_kwargs", {}), **v}


def from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Builds a :class:`RunConfig`, reporting unknown fields with suggestions."""
    d = dict(d)
    for c in _COMPONENTS:
        _expand_component(d, c)
    unknown = [k for k in d if k not in FIELDS]
    if unknown:
        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(k, FIELDS, n=2)
            msgs.append(f"unknown field {k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise ConfigError("; ".join(msgs) + f". Valid fields: {', '.join(sorted(FIELDS))}.")
    if "preaggregators" in d:
        d["preaggregators"] = _norm_pre(d["preaggregators"])
    for k in ("dataset_kwargs", "model_kwargs", "aggregator_kwargs", "attack_kwargs", "latency_kwargs",
              "lr_schedule_kwargs"):
        if k in d:
            d[k] = dict(d[k])
    cfg = RunConfig(**d)
    if cfg.compute_budget is not None:
        cfg = dataclasses.replace(cfg, steps=budget_steps(cfg))
    return cfg


def clients_per_round(cfg: RunConfig) -> int:
    """How many workers take part in each round: ``floor(client_fraction * N)`` (``N`` per
    ``client_fraction_of``), or ``n_workers`` without client sampling."""
    if cfg.client_fraction is None:
        return cfg.n_workers
    base = cfg.n_workers - (cfg.f_real if cfg.client_fraction_of == "honest" else 0)
    return int(cfg.client_fraction * base + 1e-9)


def budget_steps(cfg: RunConfig) -> int:
    """Steps of a fixed-compute run: ``ceil(C / (B * (n - f_real)))`` (at least 1)."""
    honest = max(1, cfg.n_workers - cfg.f_real)
    return max(1, -(-int(cfg.compute_budget) // (cfg.batch_size * honest)))


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A configuration file: a base run, the sweep product and blocks, execution options, output."""

    base: RunConfig
    sweep: Mapping[str, list]
    output_dir: Path
    source: Path | None = None
    blocks: tuple = ()
    execution: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    plugins: tuple = ()  # modules imported before the runs were built ([run] plugins)

    def runs(self) -> list[RunConfig]:
        """Every grid point, in a deterministic order (duplicates removed)."""
        out, seen = [], set()
        for block in self.blocks or ({},):
            axes = {**self.sweep, **{k: (v if isinstance(v, list) else [v]) for k, v in block.items()}}
            keys = list(axes)
            for values in itertools.product(*(axes[k] for k in keys)):
                d = self.base.to_dict()
                for k, v in zip(keys, values):
                    if k in _COMPONENTS and isinstance(v, Mapping):
                        d[f"{k}_kwargs"] = {}
                    elif k in _COMPONENTS and isinstance(v, str) and v != getattr(self.base, k):
                        d[f"{k}_kwargs"] = {}
                    d[k] = v
                cfg = from_dict(d)
                h = cfg.config_hash()
                if h not in seen:
                    seen.add(h)
                    out.append(cfg)
        return out


_TABLES = ("run", "sweep", "grid", "execution", "output")


def _merge_extended(parent: dict, child: dict) -> dict:
    """``child`` on top of ``parent`` (see ``extends`` in the module docstring)."""
    out = {}
    run = dict(parent.get("run", {}))
    for k, v in child.get("run", {}).items():
        if (k in _COMPONENTS and f"{k}_kwargs" not in child.get("run", {})
                and (isinstance(v, Mapping) or v != run.get(k))):
            run.pop(f"{k}_kwargs", None)  # a new component does not inherit the old one's kwargs
        run[k] = v
    if "plugins" in parent.get("run", {}) or "plugins" in child.get("run", {}):
        as_list = lambda p: [p] if isinstance(p, str) else list(p)  # noqa: E731
        plugins = as_list(parent.get("run", {}).get("plugins", []))
        run["plugins"] = plugins + [p for p in as_list(child.get("run", {}).get("plugins", []))
                                    if p not in plugins]
    out["run"] = run
    for table in ("sweep", "execution", "output"):
        out[table] = {**parent.get(table, {}), **child.get(table, {})}

    def blocks(raw):
        b = raw.get("grid", [])
        return [b] if isinstance(b, Mapping) else list(b)

    out["grid"] = blocks(parent) + blocks(child)
    return out


def _read_raw(path: Path | None, text: str, chain: tuple = ()) -> dict:
    """The TOML tables of a configuration, with ``extends`` resolved (recursively)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    extends = raw.pop("extends", None)
    extra = set(raw) - set(_TABLES)
    if extra:
        raise ConfigError(f"{path}: unknown table(s) {sorted(extra)}; valid: extends = \"file.toml\", "
                          "[run], [sweep], [[grid]], [execution], [output]")
    if extends is None:
        return raw
    if not isinstance(extends, str):
        raise ConfigError(f"{path}: extends must be the path of one configuration file, got {extends!r}")
    parent = Path(extends)
    if not parent.is_absolute() and path is not None:
        parent = path.parent / parent
    if not parent.exists():
        raise ConfigError(f"{path}: extends {extends!r}, but {str(parent)!r} does not exist "
                          "(a relative path is taken from the extending file's folder)")
    key = parent.resolve()
    if key in chain:
        cycle = " -> ".join(str(c) for c in chain + (key,))
        raise ConfigError(f"{path}: extends forms a cycle: {cycle}")
    base = _read_raw(parent, parent.read_text(), chain + (key,))
    plugins = base.get("run", {}).get("plugins")
    if plugins:  # the other file's .py plugin paths stay relative to its own folder
        plugins = [plugins] if isinstance(plugins, str) else plugins
        base["run"]["plugins"] = [str(parent.parent / p) if p.endswith(".py") and not Path(p).is_absolute()
                                  else p for p in plugins]
    return _merge_extended(base, raw)


def load_experiment(path: str | Path | None = None, *, text: str | None = None) -> Experiment:
    """Reads a TOML configuration file (or ``text``) into an :class:`Experiment`."""
    if text is None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"configuration file {str(path)!r} does not exist")
        text = path.read_text()
    elif path is not None:
        path = Path(path)
    raw = _read_raw(path, text, (path.resolve(),) if path is not None else ())
    run = dict(raw.get("run", {}))
    plugins = run.pop("plugins", [])
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"{path}: [run] plugins must be a list of module names or .py paths, "
                          f"got {plugins!r}")
    from jbyz.plugins import load_plugins

    # Before the runs are built: the plugins register the components the file names.
    load_plugins(plugins, base_dir=Path(path).parent if path else None)
    base = from_dict(run)
    sweep = dict(raw.get("sweep", {}))
    blocks = raw.get("grid", [])
    if isinstance(blocks, Mapping):
        blocks = [blocks]
    for where, table in [("[sweep]", sweep)] + [(f"[[grid]] block {i + 1}", b) for i, b in enumerate(blocks)]:
        bad = [k for k in table if k not in FIELDS]
        if bad:
            sugg = {k: difflib.get_close_matches(k, FIELDS, n=1) for k in bad}
            hint = ", ".join(f"{k!r} (did you mean {v[0]!r}?)" if v else repr(k) for k, v in sugg.items())
            raise ConfigError(f"{where} has unknown field(s) {hint}; valid fields: {', '.join(sorted(FIELDS))}")
    for k, v in sweep.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"[sweep] {k} must be a non-empty list, got {v!r}")
    for i, b in enumerate(blocks):
        for k, v in b.items():
            if isinstance(v, list) and not v:
                raise ConfigError(f"[[grid]] block {i + 1}: {k} is an empty list")
    execution = dict(raw.get("execution", {}))
    GridOptions.from_dict(execution)  # reports unknown / invalid options now
    default_dir = Path("runs") / (Path(path).stem if path else "experiment")
    out = Path(raw.get("output", {}).get("dir", default_dir))
    return Experiment(base, sweep, out, Path(path) if path else None, tuple(blocks), execution,
                      tuple(plugins))


@dataclasses.dataclass(frozen=True)
class GridOptions:
    """How a grid executes (never what it computes).

    Attributes:
      invalid: ``"error"`` (refuse the grid if any point is invalid, listing all) or ``"skip"``
        (run the valid ones; the invalid ones and their reasons go to ``invalid.csv``).
      runs_per_call: runs per batch (the unit of writing and resuming). ``None``: the group's
        size, capped at ``64 x devices``.
      vmap_width: runs vectorised together inside a batch (``lax.map(batch_size=...)``); ``None``
        = ``"auto"``: on CPU ``1`` (the batch's runs one after another inside one program, which
        measured faster than vmapping runs on XLA:CPU), elsewhere the whole batch when it fits
        the memory budget, else the largest width that does (halving).
      pad_workers: let runs with different ``n_workers`` share a program by padding.
      devices: how many devices form the ``"runs"`` mesh axis (``None``: all, across processes).
      memory_budget_gb: memory a batch may use for its per-step work (default: 40% of RAM on
        CPU, 60% of device memory otherwise).
      group_by: extra fields that split groups although they could share a program, e.g.
        ``["f_real"]``: runs with more Byzantine workers then skip more gradient rows (a group
        computes gradients for ``n_max - min(f_real)`` slots), at the cost of more compilations.
      compile_cache: JAX's persistent compilation cache while :func:`jbyz.grid.run_grid` runs: a
        directory, ``"off"``, or ``"on"``; ``None``: ``$JBYZ_COMPILE_CACHE``, else the per-user
        default (:mod:`jbyz.compile_cache`).
    """

    invalid: str = "error"
    runs_per_call: int | None = None
    vmap_width: int | None = None
    pad_workers: bool = True
    devices: int | None = None
    memory_budget_gb: float | None = None
    group_by: tuple = ()
    compile_cache: str | bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "group_by", tuple(self.group_by))
        bad = [k for k in self.group_by if k not in FIELDS]
        if bad:
            raise ConfigError(f"group_by: unknown field(s) {bad}; valid: {', '.join(sorted(FIELDS))}")
        if self.invalid not in ("error", "skip"):
            raise ConfigError(f"invalid={self.invalid!r}: choose 'error' or 'skip'")
        for k in ("runs_per_call", "vmap_width", "devices"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{k} must be a positive integer or omitted, got {v!r}")
        if self.compile_cache is not None:
            from jbyz.compile_cache import parse

            parse(self.compile_cache, "compile_cache")  # a clear error now, not after compiling

    @classmethod
    def from_dict(cls, d: dict | None) -> "GridOptions":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ConfigError(f"[execution] has unknown option(s) {bad}; valid: {', '.join(sorted(names))}")
        if d.get("vmap_width") == "auto":
            d["vmap_width"] = None
        return cls(**d)
