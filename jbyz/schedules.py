r"""Learning-rate schedules of a run: ``t -> lr_t``, traceable, with a traced base rate.

``RunConfig.lr_schedule`` names one, ``lr_schedule_kwargs`` gives its parameters:

=================  ===============================  =============================================
``lr_schedule``    ``lr_schedule_kwargs``            :math:`\eta_t`
=================  ===============================  =============================================
``constant``       (none)                            :math:`\eta_0`
``cosine``         ``every`` (steps, default 1)      :math:`\frac{\eta_0}{2}(1 + \cos(\pi s / T))`,
                                                     :math:`s = \lfloor t / e \rfloor e` (optax's
                                                     cosine decay over the ``T = steps``, in
                                                     stairs of ``every`` steps)
``cosine``         ``every = "epoch"``               :func:`epoch_cosine_schedule` (Yang et al.,
                                                     ICLR 2024: one value per epoch)
``inverse_time``   ``decay`` (5000), ``every`` (1)   :math:`\eta_0 / (1 + s / \mathrm{decay})`
``step``           ``milestones`` (steps),           :math:`\eta_0\,\gamma^{\#\{m \le t\}}`
                   ``factor`` :math:`\gamma` (0.1)   (PyTorch's ``MultiStepLR``, as ByzFL's
                                                     server uses it)
=================  ===============================  =============================================
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import optax

from jbyz.config import RunConfig

__all__ = ["epoch_cosine_schedule", "lr_schedule", "per_epoch_schedule", "step_decay_problems",
           "step_decay_schedule"]


def per_epoch_schedule(cfg: RunConfig) -> bool:
    """Whether the lr schedule counts epochs (``cosine`` with ``every = "epoch"``), so that its
    period depends on ``n_workers`` and the dataset size, not on ``steps`` alone."""
    return cfg.lr_schedule == "cosine" and dict(cfg.lr_schedule_kwargs).get("every") == "epoch"


def epoch_cosine_schedule(lr0: float, epochs: int, steps_per_epoch: float) -> optax.Schedule:
    r"""Cosine annealing *per epoch* (Yang, Shi, Li, ICLR 2024, Sec. 5):
    :math:`\eta = \frac{\eta_0}{2}(1 + \cos(i\pi/E))`.

    ``i = floor(t / steps_per_epoch)`` is the epoch of step ``t`` (``i = 0 .. E-1``, so the last
    epoch still has a positive rate, as the paper's ``i = 0..159`` for ``E = 160``). Under a fixed
    compute budget ``steps_per_epoch = N_k / B`` (``N_k`` samples per worker) need not be an
    integer; it may be a float.

    In a run configuration: ``lr_schedule = "cosine"`` with ``lr_schedule_kwargs = {every =
    "epoch"}`` (without it, ``"cosine"`` is optax's per-*step* decay to 0 over the run, the
    continuous version of this staircase).

    Example:
      >>> s = epoch_cosine_schedule(0.1, epochs=2, steps_per_epoch=10)
      >>> [round(float(s(t)), 4) for t in (0, 9, 10, 100)]
      [0.1, 0.1, 0.05, 0.05]
    """
    if epochs < 1 or not steps_per_epoch > 0:
        raise ValueError(f"epochs must be >= 1 and steps_per_epoch > 0, got {epochs}, {steps_per_epoch}")

    def schedule(count):
        i = jnp.minimum(jnp.floor(count / steps_per_epoch), epochs - 1)
        return 0.5 * lr0 * (1.0 + jnp.cos(jnp.pi * i / epochs))

    return schedule


def step_decay_problems(milestones: Any = (), factor: Any = 0.1) -> list[str]:
    """What is wrong with a step-decay schedule's parameters (empty when valid)."""
    errors = []
    ok = isinstance(milestones, (list, tuple)) and all(
        isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in milestones)
    if not ok:
        errors.append(f"lr_schedule='step': milestones must be a list of step counts >= 1 (e.g. "
                      f"[1000, 1500]), got {milestones!r}")
    elif list(milestones) != sorted(set(milestones)):
        errors.append(f"lr_schedule='step': milestones must be strictly increasing, got {list(milestones)}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        errors.append(f"lr_schedule='step': factor must be a number > 0 (the rate is multiplied by "
                      f"it at each milestone, e.g. 0.1), got {factor!r}")
    return errors


def step_decay_schedule(lr0, milestones: Sequence[int], factor: float = 0.1) -> optax.Schedule:
    r"""Step decay: :math:`\eta_t = \eta_0\,\gamma^{\#\{m \in \mathrm{milestones} : m \le t\}}`.

    The semantics of PyTorch's ``MultiStepLR(milestones, gamma)`` stepped once per training step,
    which is how ByzFL's benchmark decays its server's learning rate; ``lr0`` may be traced.

    Example:
      >>> s = step_decay_schedule(1.0, [2, 4], factor=0.5)
      >>> [float(s(t)) for t in range(6)]
      [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """
    errors = step_decay_problems(list(milestones), factor)
    if errors:
        raise ValueError("; ".join(errors))
    ms = jnp.asarray(list(milestones) or [0], jnp.int32)
    live = len(milestones) > 0

    def schedule(count):
        k = jnp.sum((jnp.asarray(count) >= ms) & live)
        return lr0 * jnp.asarray(factor, jnp.float32) ** k

    return schedule


def lr_schedule(cfg: RunConfig, lr, *, samples_per_run: int) -> optax.Schedule:
    """The schedule ``t -> lr_t`` of ``cfg`` with base rate ``lr`` (which may be traced).

    Args:
      cfg: the run configuration (``lr_schedule``, ``lr_schedule_kwargs``, ``steps``, and for a
        per-epoch schedule ``n_workers`` and ``batch_size``).
      lr: the base rate :math:`\\eta_0`.
      samples_per_run: training samples the workers draw from (for epoch lengths).
    """
    kw = dict(cfg.lr_schedule_kwargs)
    if cfg.lr_schedule == "cosine":
        if per_epoch_schedule(cfg):  # Yang et al.: (lr0 / 2)(1 + cos(i pi / E)) in epoch i
            per_epoch = samples_per_run / (cfg.n_workers * cfg.batch_size)
            return epoch_cosine_schedule(lr, max(1, round(cfg.steps / per_epoch)), per_epoch)
        sched = optax.cosine_decay_schedule(lr, cfg.steps)
        every = int(kw.get("every", 1))
        if every > 1:  # staircase: step t takes the lr of its period's first step
            base = sched
            return lambda t: base(t // every * every)
        return sched
    if cfg.lr_schedule == "inverse_time":
        decay, every = float(kw.get("decay", 5000.0)), int(kw.get("every", 1))
        return lambda t: lr / (1.0 + (t // every * every) / decay)
    if cfg.lr_schedule == "step":
        return step_decay_schedule(lr, kw.get("milestones", ()), kw.get("factor", 0.1))
    return optax.constant_schedule(lr)
