"""Validation of run configurations against the registries, before any compute.

:mod:`jbyz.config` holds configurations as plain data; this module checks one against what the
registries know (names, hyper-parameters, each rule's and pre-aggregator's requirement on ``n``
and ``f``) and against the constraints between fields. Every problem is reported at once, each
saying what would be valid. ``jbyz check FILE`` runs it over a whole grid.
"""

from __future__ import annotations

import difflib

# The registries: importing these modules fills them (dSTAR is imported on first use of its name).
from jbyz import aggregators, attacks, data, models, preaggregators, protocols, schedules
from jbyz.config import CHOICES, RunConfig, _norm_pre, clients_per_round
from jbyz.registry import ConfigError

__all__ = ["check", "validate"]


def validate(cfg: RunConfig) -> list[str]:
    """Returns every problem with ``cfg`` (empty when it is runnable). Builds no data or model."""
    errors: list[str] = []
    for field, choices in CHOICES.items():
        v = getattr(cfg, field)
        if v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1)
            errors.append(
                f"{field}={v!r} is not valid" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; choose one of {', '.join(choices)}"
            )
    ints = {"n_workers": 1, "batch_size": 1, "steps": 1, "eval_every": 1, "f_real": 0}
    for k, lo in ints.items():
        v = getattr(cfg, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            errors.append(f"{k} must be an integer >= {lo}, got {v!r}")
    if isinstance(cfg.f_real, int) and isinstance(cfg.n_workers, int) and cfg.f_real >= cfg.n_workers:
        errors.append(
            f"f_real={cfg.f_real} Byzantine workers leaves no honest worker among n_workers={cfg.n_workers}; "
            f"use f_real <= {cfg.n_workers - 1}"
        )
    if cfg.f is not None and (not isinstance(cfg.f, int) or cfg.f < 0):
        errors.append(f"f (declared) must be an integer >= 0 or omitted, got {cfg.f!r}")
    allowed = {"constant": set(), "cosine": {"every"}, "inverse_time": {"decay", "every"},
               "step": {"milestones", "factor"}}.get(cfg.lr_schedule, set())
    bad = sorted(set(cfg.lr_schedule_kwargs) - allowed)
    if bad:
        errors.append(f"lr_schedule_kwargs {bad} not understood by lr_schedule={cfg.lr_schedule!r}; "
                      f"valid: {sorted(allowed) or 'none'}")
    every = dict(cfg.lr_schedule_kwargs).get("every", 1)
    ok_every = (every == "epoch" and cfg.lr_schedule == "cosine") or (
        isinstance(every, int) and not isinstance(every, bool) and every >= 1)
    if "every" in allowed and not ok_every:
        errors.append(f"lr_schedule_kwargs every={every!r} must be an integer >= 1"
                      + (" or 'epoch'" if cfg.lr_schedule == "cosine" else ""))
    if cfg.lr_schedule == "step":
        errors.extend(schedules.step_decay_problems(**{k: v for k, v in cfg.lr_schedule_kwargs.items()
                                                       if k in allowed}))
    if cfg.momentum_first == "zero" and not (cfg.momentum_at == "worker" and cfg.momentum_form == "ema"):
        errors.append(f"momentum_first='zero' applies to EMA momentum at the workers only (got "
                      f"momentum_at={cfg.momentum_at!r}, momentum_form={cfg.momentum_form!r}); the "
                      f"server's EMA always starts from zero and the 'sum' form has no start to choose")
    cw = cfg.curvature_window
    if cw is not None and (not isinstance(cw, int) or isinstance(cw, bool) or cw < 1):
        errors.append(f"curvature_window must be an integer >= 1 (steps of gradient history, e.g. "
                      f"150 as El Mhamdi et al. on MNIST) or omitted, got {cw!r}")
    if cfg.sampling == "epoch_stream" and cfg.split != "shared":
        errors.append(f"sampling='epoch_stream' (one shuffled stream shared by all workers) needs "
                      f"split='shared', got split={cfg.split!r}; use sampling='replacement'")
    if cfg.clip_form != "radius" and cfg.clip_per_worker is None:
        errors.append(f"clip_form={cfg.clip_form!r} needs clip_per_worker (the clipping threshold c)")
    if cfg.nesterov_form != "pytorch" and cfg.nesterov and not (
            cfg.momentum_at in ("worker", "server") and cfg.momentum > 0):
        errors.append(f"nesterov_form={cfg.nesterov_form!r} with nesterov=true needs momentum > 0 "
                      f"at the workers or the server (got momentum_at={cfg.momentum_at!r}, "
                      f"momentum={cfg.momentum})")
    if cfg.nesterov_form == "lookahead" and cfg.normalize:
        errors.append("nesterov_form='lookahead' with normalize=true is not defined (the look-ahead "
                      "point uses the un-normalised server momentum); use nesterov_form='pytorch'")
    errors.extend(_federated_problems(cfg))
    if not (cfg.lr > 0):
        errors.append(f"lr must be > 0, got {cfg.lr}")
    if not (0.0 <= cfg.momentum < 1.0):
        errors.append(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.weight_decay < 0:
        errors.append(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.clip_per_worker is not None and not cfg.clip_per_worker > 0:
        errors.append(f"clip_per_worker must be > 0 or omitted, got {cfg.clip_per_worker}")
    if cfg.split == "dirichlet" and not cfg.dirichlet_alpha > 0:
        errors.append(f"dirichlet_alpha must be > 0, got {cfg.dirichlet_alpha}")
    g = cfg.gamma
    if cfg.split == "gamma_similarity" and (
            isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1):
        errors.append(f"gamma must be in [0, 1] (the fraction of the samples dealt iid by "
                      f"split='gamma_similarity'), got {g!r}")
    k = cfg.shards_per_worker
    if cfg.split == "shards" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        errors.append(f"shards_per_worker must be an integer >= 1 (e.g. 2, McMahan et al.'s "
                      f"pathological split), got {k!r}")
    ss = cfg.split_seed
    if ss is not None and (not isinstance(ss, int) or isinstance(ss, bool) or ss < 0):
        errors.append(f"split_seed must be an integer >= 0 or omitted (then the split follows "
                      f"seed), got {ss!r}")
    vs = cfg.validation_size
    if not isinstance(vs, int) or isinstance(vs, bool) or vs < 0:
        errors.append(f"validation_size must be an integer >= 0 (training samples held out for "
                      f"val_loss / val_accuracy), got {vs!r}")
    elif vs and cfg.sampling == "epoch_stream":
        errors.append("validation_size with sampling='epoch_stream' is not supported (the stream "
                      "runs over the whole training set); use sampling='replacement'")

    def _build(registry, name, kwargs):
        try:
            return registry.build(name, **dict(kwargs))
        except ConfigError as e:
            errors.append(str(e))
        except (TypeError, ValueError) as e:
            errors.append(f"{registry.kind} {name!r}: {e}")
        return None

    for registry, name in ((data.DATASETS, cfg.dataset), (models.MODELS, cfg.model)):
        try:
            registry.entry(name)
        except ConfigError as e:
            errors.append(str(e))
    _build(attacks.ATTACKS, cfg.attack, cfg.attack_kwargs)
    agg = _build(aggregators.AGGREGATORS, cfg.aggregator, cfg.aggregator_kwargs)
    if errors:
        return errors
    rows, f = cfg.n_workers, cfg.f_declared
    for name, kw in _norm_pre(cfg.preaggregators):
        pre = _build(preaggregators.PREAGGREGATORS, name, kw)
        if pre is None:
            continue
        msg = pre.requirement(rows, f)
        if msg:
            errors.append(msg)
        rows = pre.out_rows(rows)
    if cfg.first_k is not None:
        if not isinstance(cfg.first_k, int) or isinstance(cfg.first_k, bool) or not 1 <= cfg.first_k <= cfg.n_workers:
            errors.append(f"first_k must be an integer in [1, n_workers={cfg.n_workers}] or omitted, "
                          f"got {cfg.first_k!r}")
        else:
            rows = min(rows, cfg.first_k) if not cfg.preaggregators else rows
        if cfg.latency == "none":
            errors.append("first_k needs a latency model (latency = \"shifted_exponential\", "
                          "\"gamma\", \"slow_subset\", ...) to decide who arrives first")
    if cfg.latency != "none":
        _build(protocols.LATENCIES, cfg.latency, cfg.latency_kwargs)
    if not isinstance(cfg.server_validation, int) or cfg.server_validation < 0:
        errors.append(f"server_validation must be an integer >= 0, got {cfg.server_validation!r}")
    if agg is not None and getattr(agg, "needs_reference", False) and not cfg.server_validation:
        errors.append(f"aggregator {cfg.aggregator!r} needs a server reference gradient: set "
                      "server_validation to the number of training samples the server holds (e.g. 500)")
    if agg is not None and f < cfg.n_workers:
        msg = agg.requirement(rows, f)
        if msg:
            errors.append(msg)
    if isinstance(cfg.f, int) and cfg.f >= cfg.n_workers:
        errors.append(f"declared f={cfg.f} must be < n_workers={cfg.n_workers}")
    return errors


def check(cfg: RunConfig) -> RunConfig:
    """Raises :class:`ConfigError` listing every problem of ``cfg``; returns it otherwise."""
    errors = validate(cfg)
    if errors:
        raise ConfigError("invalid run configuration:\n  - " + "\n  - ".join(errors))
    return cfg


def _federated_problems(cfg: RunConfig) -> list[str]:
    """Local steps, what workers send, and client sampling (RunConfig's federated fields)."""
    errors = []
    ks = cfg.local_steps
    if not isinstance(ks, int) or isinstance(ks, bool) or ks < 1:
        errors.append(f"local_steps must be an integer >= 1, got {ks!r}")
        return errors
    if cfg.local_lr is not None and not (isinstance(cfg.local_lr, (int, float)) and cfg.local_lr > 0):
        errors.append(f"local_lr must be > 0 or omitted, got {cfg.local_lr!r}")
    local = cfg.local_lr is not None
    if not local and ks > 1:
        errors.append(f"local_steps={ks} needs local_lr, the workers' rate in their local SGD steps "
                      "(e.g. local_lr = 0.05); without it workers send one gradient per round")
    if not local and cfg.fed_send == "weights":
        errors.append("fed_send='weights' needs local_lr (the workers train locally, then send "
                      "their weights)")
    if cfg.fed_send == "weights":
        if cfg.clip_per_worker is not None:
            errors.append("fed_send='weights': clip_per_worker clips gradients, not weights; "
                          "omit it or use fed_send='pseudo_gradient'")
        if cfg.momentum_at == "worker" and cfg.momentum > 0:
            errors.append("fed_send='weights': worker momentum would average weights over rounds; "
                          "use momentum_at='server' or 'none', or fed_send='pseudo_gradient'")
        if cfg.normalize:
            errors.append("fed_send='weights' with normalize=true is not defined; use "
                          "fed_send='pseudo_gradient'")
        if cfg.server_validation:
            errors.append("fed_send='weights' with server_validation: the server's reference "
                          "(FLTrust, dSTAR) is an update, not weights; use "
                          "fed_send='pseudo_gradient'")
    if local and cfg.sampling == "epoch_stream":
        errors.append("local steps (local_lr) with sampling='epoch_stream' are not supported; use "
                      "sampling='replacement'")
    if local and cfg.nesterov and cfg.nesterov_form == "lookahead":
        errors.append("local steps (local_lr) with nesterov_form='lookahead' are not supported")
    p = cfg.client_fraction
    if p is not None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            errors.append(f"client_fraction must be in (0, 1] or omitted, got {p!r}")
        elif isinstance(cfg.n_workers, int) and isinstance(cfg.f_real, int) and clients_per_round(cfg) < 1:
            base = cfg.n_workers - (cfg.f_real if cfg.client_fraction_of == "honest" else 0)
            errors.append(f"client_fraction={p} samples floor({p} x {base}) = 0 workers per round; "
                          f"use client_fraction >= {1 / max(1, base):.3g}")
    return errors
