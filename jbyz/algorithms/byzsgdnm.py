r"""ByzSGDnm and ByzSGDm, the theory's optimal batch size, and the paper's learning-rate selection.

Yang, Shi, Li, "On the Effect of Batch Size in Byzantine-Robust Distributed Learning", ICLR 2024
(arXiv v1: "On the Optimal Batch Size for Byzantine-Robust Distributed Learning",
arXiv:2305.13856).

With ``m`` workers (the first ``f_real`` Byzantine), batch ``B`` per worker, momentum ``beta``:

* worker ``k`` (honest): :math:`u^{(k)}_0 = g^{(k)}_0`,
  :math:`u^{(k)}_t = \beta u^{(k)}_{t-1} + (1-\beta) g^{(k)}_t` (EMA, initialised with the first
  gradient), and sends :math:`u^{(k)}_t`;
* server: :math:`u_t = \mathrm{Agg}(u^{(1)}_t, \dots, u^{(m)}_t)` (optionally after nearest-neighbour
  mixing), then

  - ByzSGDnm: :math:`w_{t+1} = w_t - \eta_t\, u_t / \max(\|u_t\|, \epsilon)` (whole-vector L2 norm);
  - ByzSGDm (the baseline, Karimireddy et al. 2021's worker momentum):
    :math:`w_{t+1} = w_t - \eta_t u_t`.

:func:`byzsgdnm` and :func:`byzsgdm` return these as optax chains for a user's own loop (the
updates passed to ``update`` carry a leading worker axis, e.g. from
``jax.vmap(jax.grad(loss))``). In a configuration file the same methods are ``momentum_at =
"worker"``, ``momentum_form = "ema"``, ``normalize = true`` (ByzSGDnm) or ``false`` (ByzSGDm),
and fixed-compute runs use ``compute_budget`` (:func:`jbyz.config.budget_steps`).

:func:`optimal_batch_size` is Proposition 1's :math:`B^*` and :func:`select_lr` reports, from a
results table, the best learning rate per cell (the paper's way) and the robust choice (the best
worst case over attacks).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import optax

from jbyz import transforms
# The paper's per-epoch cosine schedule lives with the other schedules; re-exported here.
from jbyz.schedules import epoch_cosine_schedule
from jbyz.types import AggregationRule, Attack, PreAggregator

__all__ = [
    "LrChoice",
    "byzsgdm",
    "byzsgdm_bound",
    "byzsgdnm",
    "epoch_cosine_schedule",
    "optimal_batch_size",
    "optimal_batch_size_nm",
    "select_lr",
]


# ----------------------------------------------------------------------------- the optax chains


def _build(kind, obj, **kw):
    """A kernel from an object, a registry name, or a ``{name = ..., **kwargs}`` table."""
    if isinstance(obj, str):
        from jbyz import aggregators, attacks, preaggregators  # noqa: F401  (registries)

        reg = {"aggregator": aggregators.AGGREGATORS, "attack": attacks.ATTACKS,
               "preaggregator": preaggregators.PREAGGREGATORS}[kind]
        return reg.build(obj, **kw)
    if isinstance(obj, dict):
        obj = dict(obj)
        return _build(kind, obj.pop("name"), **obj)
    return obj


def _chain(learning_rate, *, num_workers, aggregator, f, momentum, preaggregators, attack,
           f_real, normalize, eps, seed):
    agg = _build("aggregator", aggregator)
    pre = tuple(_build("preaggregator", p) for p in preaggregators)
    stages = [transforms.worker_momentum(momentum, num_workers, form="ema", first="gradient")]
    if attack is not None:
        if f_real is None:
            raise ValueError("attack given without f_real (how many workers are Byzantine)")
        stages.append(transforms.byzantine(_build("attack", attack), f_real, num_workers,
                                           key=seed))
    stages.append(transforms.robust_aggregate(agg, f, num_workers, preaggregators=pre, key=seed))
    if normalize:
        stages.append(transforms.normalize(eps))
    stages.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*stages)


def byzsgdnm(
    learning_rate: float | optax.Schedule,
    *,
    num_workers: int,
    aggregator: AggregationRule | str | dict,
    f,
    momentum: float = 0.9,
    preaggregators: Sequence[PreAggregator | str | dict] = (),
    attack: Attack | str | dict | None = None,
    f_real=None,
    eps: float = 1e-12,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""ByzSGDnm: worker EMA momentum (:math:`u_0 = g_0`), robust aggregation, normalised step.

    The chain ``worker_momentum(beta, form="ema", first="gradient") -> [byzantine(attack)] ->
    robust_aggregate(Agg, f, preaggregators) -> normalize(eps) -> scale_by_learning_rate``::

        tx = byzsgdnm(epoch_cosine_schedule(1.0, 160, 6250 / 512), num_workers=8,
                      aggregator=jbyz.aggregators.centered_clip(tau=0.1), f=3,
                      preaggregators=["nnm"])
        state = tx.init(params)
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xs, ys)   # [8, ...]
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

    Args:
      learning_rate: :math:`\eta` or a schedule :math:`t \mapsto \eta_t` (e.g.
        :func:`epoch_cosine_schedule`); may be traced (``optax.inject_hyperparams``).
      num_workers: ``m``, the leading axis of the updates given to ``update``.
      aggregator: an :class:`~jbyz.types.AggregationRule`, a registry name, or ``{name=..., ...}``
        (the paper: ``krum``, ``geometric_median``, ``median``, ``centered_clip`` with ``tau=0.1``).
      f: the number of Byzantine workers the aggregator assumes (may be traced).
      momentum: :math:`\beta` (0.9 in the paper).
      preaggregators: e.g. ``["nnm"]`` (nearest-neighbour mixing before ``aggregator``).
      attack: simulation only: replace the first ``f_real`` rows (after momentum) by this attack.
      f_real: how many workers really are Byzantine (needed with ``attack``).
      eps: floor of the norm: :math:`u / \max(\|u\|, \epsilon)` (our assumption: the paper
        divides by the norm and leaves ``u = 0`` open).
      seed: seeds key-driven stages when no ``key=`` extra argument is given.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra args ``valid``, ``f``, ``key``).
    """
    return _chain(learning_rate, num_workers=num_workers, aggregator=aggregator, f=f,
                  momentum=momentum, preaggregators=preaggregators, attack=attack, f_real=f_real,
                  normalize=True, eps=eps, seed=seed)


def byzsgdm(
    learning_rate: float | optax.Schedule,
    *,
    num_workers: int,
    aggregator: AggregationRule | str | dict,
    f,
    momentum: float = 0.9,
    preaggregators: Sequence[PreAggregator | str | dict] = (),
    attack: Attack | str | dict | None = None,
    f_real=None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""ByzSGDm (the paper's baseline): :func:`byzsgdnm` without the normalisation,
    :math:`w_{t+1} = w_t - \eta_t\,\mathrm{Agg}(u^{(1)}_t,\dots,u^{(m)}_t)`. Same arguments."""
    return _chain(learning_rate, num_workers=num_workers, aggregator=aggregator, f=f,
                  momentum=momentum, preaggregators=preaggregators, attack=attack, f_real=f_real,
                  normalize=False, eps=0.0, seed=seed)


# ----------------------------------------------------------------------------- theory


def _bound_coefficients(delta, m, sigma, L, F0, C, c):
    """``(A2, A3)`` of the ByzSGDm bound ``U(B) = A1 + A2 B^{-1/2} + A3 B`` (Yang et al., Thm 1)."""
    A2 = 16.0 * math.sqrt(3.0 * c * delta * (1.0 + c * delta * m) * (1.0 - delta) * sigma**4 / C)
    A3 = 32.0 * L * F0 * m * (1.0 - delta) / C
    return A2, A3


def _check_theory_args(delta, m, sigma, L, F0, C, c):
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta (Byzantine fraction) must be in [0, 1), got {delta}")
    for name, v in (("m", m), ("sigma", sigma), ("L", L), ("F0", F0), ("C", C), ("c", c)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def byzsgdm_bound(B: float, delta: float, m: int, sigma: float, L: float, F0: float, C: float,
                  c: float) -> float:
    r"""The :math:`B`-dependent part :math:`A_2 B^{-1/2} + A_3 B` of ByzSGDm's bound at fixed ``C``
    (the constant :math:`A_1` does not depend on :math:`B`; see :func:`optimal_batch_size`)."""
    _check_theory_args(delta, m, sigma, L, F0, C, c)
    A2, A3 = _bound_coefficients(delta, m, sigma, L, F0, C, c)
    return A2 / math.sqrt(B) + A3 * B


def optimal_batch_size(delta: float, m: int, sigma: float, L: float, F0: float, C: float,
                       c: float, *, integer: bool = False) -> float:
    r"""The batch size minimising ByzSGDm's upper bound at a fixed compute budget (Prop. 1).

    Setting (Yang et al., Theorem 1 and Proposition 1): ``m`` workers of which a fraction :math:`\delta` is Byzantine, each
    honest worker computes ``B`` per-sample gradients per iteration, and the budget of honest
    gradient computations :math:`C = T B m (1-\delta)` is fixed, so :math:`T = C/(Bm(1-\delta))`.
    Assumptions of the bound (Karimireddy et al. 2021's Theorem for worker momentum, restated by
    Yang et al.): :math:`F` is :math:`L`-smooth, :math:`F(w_0) - F^* \le F_0`, per-sample
    stochastic gradients are unbiased with variance at most :math:`\sigma^2` (so a batch of ``B``
    has :math:`\sigma^2/B`), the data are i.i.d. across workers, and the aggregator is
    :math:`(\delta_{\max}, c)`-robust with :math:`\delta \le \delta_{\max}`. The bound on
    :math:`\frac1T\sum_t E\|\nabla F(w_t)\|^2`, written as a function of ``B``, is

    .. math::
        U(B) = A_1 + A_2 B^{-1/2} + A_3 B,\quad
        A_2 = 16\sqrt{\frac{3c\delta(1 + c\delta m)(1-\delta)\sigma^4}{C}},\quad
        A_3 = \frac{32 L F_0 m (1-\delta)}{C}.

    :math:`U` is strictly convex on :math:`B > 0` (for :math:`\delta > 0`) and
    :math:`U'(B) = -\tfrac12 A_2 B^{-3/2} + A_3 = 0` gives

    .. math::
        B^* = \Big(\frac{A_2}{2A_3}\Big)^{2/3}
            = \Big(\frac{3}{16 L^2 F_0^2 m}\Big)^{1/3}
              \Big(\frac{c\delta(1 + c\delta m)}{m(1-\delta)}\Big)^{1/3} \sigma^{4/3} C^{1/3}.

    :math:`c\delta(1+c\delta m)/(1-\delta)` is increasing in :math:`\delta`, so :math:`B^*` grows
    with the Byzantine fraction (the paper's main theoretical message) and with the budget as
    :math:`C^{1/3}`; :math:`B^* \to 0` as :math:`\delta \to 0` (without Byzantine workers the bound
    prefers the most iterations, ``B = 1``). The constants ``L, sigma, c, F0`` are unknown in
    practice; the paper did not use the formula to choose its batch sizes.

    Args:
      delta: Byzantine fraction :math:`\delta \in [0, 1)`.
      m: number of workers.
      sigma: per-sample gradient standard deviation :math:`\sigma`.
      L: smoothness constant.
      F0: initial sub-optimality bound :math:`F(w_0) - F^*`.
      C: compute budget (honest per-sample gradient computations).
      c: the aggregator's robustness constant.
      integer: return the better (smaller bound) of :math:`\lfloor B^*\rfloor` and
        :math:`\lfloor B^*\rfloor + 1` (at least 1) instead of the real minimiser.

    Returns:
      :math:`B^*` (float), or the optimal integer batch size when ``integer``.

    Example::

      >>> round(optimal_batch_size(3 / 8, 8, 1.0, 1.0, 1.0, 1e6, 1.0) ** 3, 6)   # 3/128 * 0.3 * 1e6
      7031.25
    """
    _check_theory_args(delta, m, sigma, L, F0, C, c)
    if delta == 0.0:
        return 1 if integer else 0.0
    A2, A3 = _bound_coefficients(delta, m, sigma, L, F0, C, c)
    b = (A2 / (2.0 * A3)) ** (2.0 / 3.0)
    if not integer:
        return b
    lo = max(1, math.floor(b))
    u = lambda x: A2 / math.sqrt(x) + A3 * x  # noqa: E731
    return lo if u(lo) <= u(lo + 1) else lo + 1


def optimal_batch_size_nm(delta: float, m: int, sigma: float, L: float, F0: float, c: float) -> float:
    r"""ByzSGDnm's bound-minimising batch size as Yang et al. state it (not re-derived here).

    .. math::
        \tilde B^* = \frac{9\,[\sqrt{2cm\delta(1-\delta)} + 1]^{3/2}\,\sigma^2}{80\, m(1-\delta) L F_0}

    increasing in :math:`\delta` on :math:`[0, 1/2]` (same assumptions as
    :func:`optimal_batch_size`, with Theorem 2's constant step and Proposition 2's
    :math:`\alpha, \eta`). Caveat: substituting Proposition 2's :math:`\alpha, \eta` into
    Theorem 2 as the paper states it, the leading :math:`T^{-1/4}` term does not depend on
    :math:`B` at fixed :math:`C`, and the remaining terms are minimised where the choice of
    :math:`\alpha` reaches 1, at :math:`B \approx 9[\sqrt{2cm\delta(1-\delta)}+1]\sigma\sqrt{C} /
    (\sqrt{80 L F_0}\, m(1-\delta))`; the two expressions agree in growing with :math:`\delta`
    but not in form. Check against the paper before relying on the constants.
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta (Byzantine fraction) must be in [0, 1), got {delta}")
    s = math.sqrt(2.0 * c * m * delta * (1.0 - delta)) + 1.0
    return 9.0 * s**1.5 * sigma**2 / (80.0 * m * (1.0 - delta) * L * F0)


# ----------------------------------------------------------------------------- lr selection


class LrChoice(NamedTuple):
    """What :func:`select_lr` returns.

    Attributes:
      per_attack: one row per (cell, attack): ``best_lr`` and ``value`` (the paper's reporting:
        the best learning rate of each table entry), plus ``n_lr`` (learning rates tried).
      robust: one row per cell: ``robust_lr`` (the learning rate maximising the worst case over
        the cell's attacks), ``worst`` (that worst case), ``worst_attack``, ``paper_worst`` (the
        worst case when every attack gets its own best lr: an upper bound on ``worst``) and one
        column per attack with its value at ``robust_lr``.
      table: the per-(cell, attack, lr) values (mean over seeds) both were computed from.
    """

    per_attack: Any
    robust: Any
    table: Any


_NOT_CELL = {"lr", "seed", "steps", "compute_budget", "eval_every", "lr_schedule_kwargs"}


def _run_values(df, metric: str, stat: str):
    """One value per run: the last (``final``) or highest (``best``) ``metric`` of each run."""
    import pandas as pd

    if stat not in ("final", "best"):
        raise ValueError(f"stat must be 'final' or 'best', got {stat!r}")
    if "step" not in df.columns:
        if metric not in df.columns:
            raise ValueError(f"per-run table needs a {metric!r} column")
        out = df.copy()
        out["_value"] = out[metric]
        return out
    from jbyz.config import FIELDS

    if "run_id" in df.columns:
        key = ["run_id"]
    else:
        key = [c for c in df.columns if c in FIELDS]
    d = df.sort_values("step", kind="stable")
    g = d.groupby(key, dropna=False, sort=False)
    vals = g[metric].last() if stat == "final" else g[metric].max()
    first = g.first()
    first["_value"] = vals
    return pd.DataFrame(first).reset_index()


def select_lr(
    df,
    cell: Sequence[str] | None = None,
    *,
    attack: Sequence[str] | str = ("attack", "attack_kwargs"),
    lr: str = "lr",
    metric: str = "test_accuracy",
    stat: str = "final",
) -> LrChoice:
    r"""The best learning rate per cell, the paper's way, and the robust choice over attacks.

    The paper tunes :math:`\eta_0` over a grid and reports, for every table entry (method,
    aggregator, batch size, Byzantine fraction, attack), the best *final* top-1 test accuracy over
    that grid: each attack gets its own learning rate, which a defender does not know in advance.
    The robust choice fixes one learning rate per cell (method, aggregator, batch size, fraction)
    for all attacks: the one whose worst case over the attacks is highest,
    :math:`\eta^\dagger = \arg\max_\eta \min_a \mathrm{acc}(\eta, a)`.

    Args:
      df: a results table (one row per run and evaluation, as ``results.parquet``; the value of a
        run is its last or highest ``metric``) or a per-run table (no ``step`` column; ``metric``
        is the value). Seeds are averaged before choosing.
      cell: the columns that define a cell (excluding the attack and ``lr``); default: every
        configuration column that varies in ``df`` except ``lr``, ``seed``, the attack columns
        and the derived ``steps``, ``compute_budget``, ``eval_every``.
      attack: the column(s) naming an attack (those present are used).
      lr: the learning-rate column.
      metric: the metric (default ``test_accuracy``).
      stat: ``"final"`` (the paper's) or ``"best"`` (highest observed).

    Returns:
      An :class:`LrChoice` of pandas DataFrames.
    """
    from jbyz.config import FIELDS

    runs = _run_values(df, metric, stat)
    attack_cols = [attack] if isinstance(attack, str) else list(attack)
    attack_cols = [a for a in attack_cols if a in runs.columns]
    if not attack_cols:
        raise ValueError(f"no attack column among {attack!r}")
    if cell is None:
        cell = [c for c in runs.columns if c in FIELDS and c not in _NOT_CELL
                and c not in attack_cols and runs[c].astype(str).nunique() > 1]
    cell = list(cell)
    for c in [*cell, *attack_cols, lr]:
        if c not in runs.columns:
            raise ValueError(f"column {c!r} not in the results table")
    runs = runs.copy()
    for c in attack_cols:  # dicts / lists (e.g. attack_kwargs) are not hashable group keys
        runs[c] = runs[c].map(lambda v: v if isinstance(v, (str, int, float, bool)) or v is None else str(v))
    keys = [*cell, *attack_cols]
    table = (runs.groupby([*keys, lr], dropna=False, sort=True)["_value"]
             .agg(value="mean", seeds="size").reset_index())

    # the paper's way: best lr per (cell, attack); ties go to the smaller lr
    idx = table.groupby(keys, dropna=False, sort=False)["value"].idxmax()
    per_attack = table.loc[idx.to_numpy(), [*keys, lr, "value"]].rename(columns={lr: "best_lr"})
    per_attack["n_lr"] = table.groupby(keys, dropna=False, sort=False)[lr].nunique().to_numpy()
    per_attack = per_attack.reset_index(drop=True)

    # the robust choice: argmax over lr of the min over attacks
    table["_attack"] = table[attack_cols].astype(str).agg(" ".join, axis=1) if len(attack_cols) > 1 \
        else table[attack_cols[0]].astype(str)
    rows = []
    for cell_vals, sub in (table.groupby(cell, dropna=False, sort=True) if cell
                           else [((), table)]):
        cell_vals = cell_vals if isinstance(cell_vals, tuple) else (cell_vals,)
        wide = sub.pivot_table(index=lr, columns="_attack", values="value", aggfunc="mean")
        complete = wide.dropna()  # only learning rates run under every attack of the cell
        if complete.empty:
            continue
        worst = complete.min(axis=1)
        best_lr = worst.idxmax()
        row = dict(zip(cell, cell_vals))
        row.update(robust_lr=best_lr, worst=float(worst.loc[best_lr]),
                   worst_attack=str(complete.loc[best_lr].idxmin()),
                   paper_worst=float(wide.max(axis=0).min()))
        row.update({f"at_{a}": float(v) for a, v in complete.loc[best_lr].items()})
        rows.append(row)
    import pandas as pd

    robust = pd.DataFrame(rows)
    return LrChoice(per_attack, robust, table.drop(columns="_attack"))
