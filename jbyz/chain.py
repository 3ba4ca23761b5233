r"""A run's optax chain, built from its configuration.

One training step of :mod:`jbyz.simulate` passes the workers' gradients through four optax
stages, each a :mod:`jbyz.transforms` drop-in closed over the run's dynamic values (traced
inside a grid, so one compiled program serves every learning rate, momentum, ``f``, ...):

1. the honest workers' stages: clipping (``clip_per_worker``) then momentum (``momentum_at =
   "worker"``), on the rows that compute gradients;
2. the Byzantine attack (``attack``), which overwrites the first ``f_real`` rows; a rule-aware
   attack (``attack.uses_rule``: optimal ALIE / IPM, the gradient attack) is given the same
   pre-aggregator and rule objects as stage 3 and evaluates them (with the server's reference,
   for rules that take one, when the step passes ``reference``); every attack sees the
   declared ``f`` (``ctx["f"]``);
3. pre-aggregation and robust aggregation (``preaggregators``, ``aggregator``, declared ``f``);
4. the server's stages: normalisation, momentum (``momentum_at = "server"``) and the learning
   rate schedule (:mod:`jbyz.schedules`).

:func:`components` builds the named kernels from the registries once per compiled program;
:func:`optimizer_chain` closes them over one run's values.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import optax

from jbyz import aggregators, attacks, preaggregators, protocols, schedules, transforms
from jbyz.config import RunConfig, _norm_pre
from jbyz.types import AggregationRule, Attack, PreAggregator

__all__ = ["Components", "components", "optimizer_chain", "traceable_attack_params",
           "traced_attack_kwargs", "worker_stages"]


class Components(NamedTuple):
    """The kernels a configuration names, built from the registries."""

    attack: Attack
    aggregator: AggregationRule
    preaggregators: tuple[PreAggregator, ...]
    latency: Any  # a protocols latency model, or None when every worker arrives each step


def traced_attack_kwargs(cfg: RunConfig) -> dict[str, float]:
    """The attack hyper-parameters of ``cfg`` that a compiled program takes as arguments.

    A hyper-parameter is passed as a traced ``float32`` scalar, rather than compiled in, when the
    attack's factory declares it a ``float`` (its annotation starts with ``float``: ALIE's ``z``,
    FoE's ``eps``, Gaussian's ``std``, sign flip's ``scale``, the line searches' ``start`` /
    ``delta`` / ``ratio`` ...) and ``cfg`` gives it a number. Runs that differ only in these
    values then share one compiled program (a sweep over ALIE's ``z`` compiles once instead of
    once per value). Strings, booleans and integers (iteration counts, subset sizes) stay
    static. Every such hyper-parameter of every registered attack is checked to give the same
    result traced as compiled in (``tests/test_traced_hyperparameters.py``). The environment
    variable ``JBYZ_TRACED_ATTACK_KWARGS=0`` compiles them in again (one program per value; the
    benchmark ``benchmarks/compile_sharing.py`` compares the two).

    Returns:
      ``{name: value}``, sorted by name; empty when nothing is traced.
    """
    import numbers
    import os

    if os.environ.get("JBYZ_TRACED_ATTACK_KWARGS", "1") == "0":
        return {}
    names = traceable_attack_params(cfg.attack)
    return {k: float(v) for k, v in sorted(dict(cfg.attack_kwargs).items())
            if k in names and not isinstance(v, bool) and isinstance(v, numbers.Real)}


@functools.lru_cache(maxsize=None)
def traceable_attack_params(name: str) -> frozenset[str]:
    """The hyper-parameters the factory of attack ``name`` declares ``float`` (its annotation
    starts with ``float``): the ones :func:`traced_attack_kwargs` may pass traced."""
    import inspect

    params = inspect.signature(attacks.ATTACKS.entry(name).factory).parameters
    return frozenset(k for k, p in params.items()
                     if str(p.annotation).replace(" ", "").startswith("float"))


def components(cfg: RunConfig) -> Components:
    """Builds the attack, the rule, the pre-aggregators and the latency model of ``cfg``."""
    latency = None
    if cfg.latency != "none":
        latency = protocols.LATENCIES.build(cfg.latency, **dict(cfg.latency_kwargs))
    return Components(
        attacks.ATTACKS.build(cfg.attack, **dict(cfg.attack_kwargs)),
        aggregators.AGGREGATORS.build(cfg.aggregator, **dict(cfg.aggregator_kwargs)),
        tuple(preaggregators.PREAGGREGATORS.build(name, **kw)
              for name, kw in _norm_pre(cfg.preaggregators)),
        latency,
    )


def momentum_on(cfg: RunConfig) -> bool:
    """Whether ``cfg`` has momentum anywhere (its value may still be traced)."""
    return cfg.momentum_at != "none" and cfg.momentum > 0


def worker_stages(cfg: RunConfig, dyn, rows: int):
    """The honest workers' two stages ``(clip, momentum)`` (identity where off).

    Args:
      cfg: the configuration (static choices: forms, Nesterov, first momentum).
      dyn: the run's dynamic values (``dyn.clip``, ``dyn.momentum``; traced or concrete).
      rows: how many worker rows compute gradients (the stages keep a state per row).
    """
    ident = optax.with_extra_args_support(optax.identity())
    clip = mom = ident
    if cfg.clip_per_worker is not None:
        clip = transforms.clip_per_worker(dyn.clip, rows, form=cfg.clip_form)
    if momentum_on(cfg) and cfg.momentum_at == "worker":
        mom = transforms.worker_momentum(
            dyn.momentum, rows, form=cfg.momentum_form,
            nesterov=cfg.nesterov and cfg.nesterov_form == "pytorch",
            first=cfg.momentum_first)
    return clip, mom


def optimizer_chain(cfg: RunConfig, comp: Components, dyn, *, n: int, rows: int,
                    samples_per_run: int):
    """The four optax stages ``(worker, byzantine, aggregate, server)`` of one run.

    Args:
      cfg: the configuration.
      comp: its :func:`components`.
      dyn: the run's dynamic values (``clip``, ``momentum``, ``f_real``, ``f``, ``lr``).
      n: worker slots of the compiled program (``>= cfg.n_workers``; the rest are padding).
      rows: worker rows computing gradients (the last ``rows`` slots).
      samples_per_run: training samples the workers draw from (epoch-based schedules).
    """
    tx_worker = optax.chain(*worker_stages(cfg, dyn, rows))
    rule = {}
    if comp.attack.uses_rule:  # it simulates this run's own stages
        rule = dict(aggregator=comp.aggregator, preaggregators=comp.preaggregators)
    tx_byz = transforms.byzantine(comp.attack, dyn.f_real, n, f=dyn.f,
                                  labels_flipped=comp.attack.flips_labels, **rule)
    tx_agg = transforms.robust_aggregate(comp.aggregator, dyn.f, n,
                                         preaggregators=comp.preaggregators)
    server = []
    if cfg.normalize:
        server.append(transforms.normalize())
    if momentum_on(cfg) and cfg.momentum_at == "server":
        if cfg.momentum_form == "ema":
            server.append(optax.ema(dyn.momentum, debias=False))
        else:
            server.append(optax.trace(
                dyn.momentum, nesterov=cfg.nesterov and cfg.nesterov_form == "pytorch"))
    sched = schedules.lr_schedule(cfg, dyn.lr, samples_per_run=samples_per_run)
    server.append(optax.scale_by_learning_rate(sched))
    return tx_worker, tx_byz, tx_agg, optax.chain(*server)
