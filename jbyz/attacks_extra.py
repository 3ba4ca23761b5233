r"""More attacks: rule-aware (optimal ALIE / IPM, a gradient attack) and rule-specific ones.

The same kernel contract as :mod:`jbyz.attacks` (read its module docstring first): every factory
returns a :class:`jbyz.types.Attack` whose ``apply`` is
``(x [n, d], honest [n], byz [n], key, state, ctx) -> (x_out [n, d], state)``; rows where ``byz``
is False come back unchanged; rows that are neither honest nor Byzantine (padding,
non-participants) never enter a statistic nor an evaluation; shapes never depend on the counts;
numeric hyper-parameters may be traced; iteration counts are fixed (static), so every kernel
runs inside the compiled step. The attacks are registered in :data:`jbyz.attacks.ATTACKS`
(``jbyz list`` shows them), which imports this module on first use of one of their names; this
module imports :mod:`jbyz.attacks`, never the reverse.

**Rule-aware attacks** (``optimal_alie``, ``optimal_ipm``, ``gradient_ascent``;
``attack.uses_rule``) evaluate the aggregation of a candidate attack. Which aggregation:

1. the attack's own ``aggregator`` / ``preaggregators`` / ``f`` hyper-parameters when given (an
   attacker who assumes a rule, as ByzFL's ``Optimal_*(agg, pre_agg_list, f)``; the stages'
   initial states, a key derived from the attack's key);
2. otherwise the run's own stages: :func:`jbyz.byzantine` given ``aggregator=``,
   ``preaggregators=`` and ``f=`` (``jbyz run`` passes the run's:
   :func:`jbyz.chain.optimizer_chain`) puts the closure ``ctx["agg_fn"]: (x [n, d], valid [n])
   -> [d]`` in the context, with the stages' current states (stateful rules are mirrored), a
   key independent of the server's and, for a rule that takes the server's reference (FLTrust,
   dSTAR), the ``reference`` extra-arg;
3. otherwise (a direct call ``attack(x, honest, byz, key)``, as in ByzFL's standalone use)
   ByzFL's defaults ``agg=Average()``, ``pre_agg_list=[Clipping(c=2.0)]``: the mean after
   clipping every row to norm 2.

The Byzantine rows of the evaluated stack are the candidate (``f_real = |byz|`` copies, or
per-row vectors for the gradient attack with ``shared=False``; ByzFL appends its declared ``f``
copies, here the rule is told the declared ``f`` and sees the Byzantine slots the run has),
the honest rows as submitted;
invalid rows are zeroed before the evaluation (the stages ignore them; zeros keep NaN out of
the gradients).

**Objective.** As ByzFL: :math:`\phi(\text{cand}) = \|\mathrm{Agg}(\mathrm{Pre}(X_{\text{cand}}))
- \mu\|_2`, with :math:`\mu` the honest mean.

Semantics follow the peers' code: ByzFL (LPD-EPFL/byzfl at 69bd1ac) for the optimal attacks;
Blades (lishenghui/blades at 711e8df) for the SignGuard and clipped-clustering attacks and for
Fang et al.'s attack on the trimmed mean / median (Blades' ``AdaptiveAdversary``); Fang et al.'s
paper for the Krum attack (no released peer implements it as published). Every difference is
stated in the attack's docstring. ``tests/data/make_peer_reference_attacks.py`` regenerates the
peers' outputs that ``tests/test_attacks_extra.py`` compares against.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jbyz import _sorting as S
from jbyz.attacks import ATTACKS, _check_choice, _replace_byz, honest_mean_std
from jbyz.registry import ConfigError, concrete_number
from jbyz.types import Array, Attack

__all__ = [
    "TIE",
    "byzfl_line_search",
    "clipped_clustering_attack",
    "fang_krum",
    "fang_trim",
    "fang_trim_values",
    "gradient_ascent",
    "optimal_alie",
    "optimal_ipm",
    "signguard_attack",
    "signguard_values",
]

_SALT_OWN_RULE = 0x5EED_B1
_HI = lax.Precision.HIGHEST

TIE = 1e-6
"""Relative margin below which a new score does not beat the best one (the searches' ties).

Where the rule's output stops moving with the factor (a Byzantine row clipped to a fixed norm, an
order statistic held by an honest value) the scores of a plateau differ by float32 rounding
only, which differs between eager and compiled execution; without a margin that noise would
decide which point of the plateau is sent. :math:`10^{-6}` is about 8 float32 ulps.
"""


def _beats(y, best):
    """``y`` beats ``best`` by more than the :data:`TIE` margin (NaN never beats, nor is beaten
    by a number: a NaN best stays)."""
    return y > best + TIE * jnp.abs(best)


# --------------------------------------------------------------------------------------------
# Helpers


def _check_number(attack: str, name: str, value, *, low=None, high=None, open_=False,
                  integer=False):
    v = concrete_number(value)
    if v is None:
        return
    if integer and int(v) != v:
        raise ConfigError(f"{attack}: {name} must be an integer; got {name}={value!r}.")
    if low is not None and (v <= low if open_ else v < low):
        raise ConfigError(f"{attack}: {name} must be {'>' if open_ else '>='} {low}; got "
                          f"{name}={value!r}.")
    if high is not None and (v >= high if open_ else v > high):
        raise ConfigError(f"{attack}: {name} must be {'<' if open_ else '<='} {high}; got "
                          f"{name}={value!r}.")


def _static_count(attack: str, name: str, value, low: int = 1) -> int:
    v = concrete_number(value)
    if v is None or int(v) != v or int(v) < low:
        raise ConfigError(f"{attack}: {name} must be an integer >= {low} (it fixes the number of "
                          f"iterations of the compiled step); got {name}={value!r}.")
    return int(v)


def _own_rule(attack: str, aggregator, preaggregators, f):
    """The attack's own assumed stages, or ``None`` (use the run's / ByzFL's default)."""
    if aggregator is None:
        if preaggregators:
            raise ConfigError(f"{attack}: preaggregators= needs aggregator= as well")
        return None
    from jbyz.transforms import _component

    example = f"jbyz.attacks_extra.{attack}(aggregator={{}})"
    agg = _component(aggregator, "aggregator", attack, example)
    pres = tuple(_component(p, "preaggregator", attack, example)
                 for p in ((preaggregators,) if isinstance(preaggregators, (str, dict))
                           else preaggregators))
    return agg, pres, f


def _byzfl_default_rule():
    from jbyz import aggregators, preaggregators

    return aggregators.AGGREGATORS.build("mean"), (preaggregators.PREAGGREGATORS.build(
        "clip", tau=2.0),)


def _agg_fn(own, ctx, key, x, byz) -> Callable[[Array, Array], Array]:
    """``agg_fn(x, valid) -> [d]``: the aggregation a rule-aware attack evaluates (see the module
    docstring for the order: own stages, the run's ``ctx["agg_fn"]``, ByzFL's default)."""
    if own is None and ctx.get("agg_fn") is not None:
        return ctx["agg_fn"]
    from jbyz.transforms import _rule_closure, _stage_states

    if own is None:
        agg, pres = _byzfl_default_rule()
        f = None
    else:
        agg, pres, f = own
    if f is None:
        f = ctx.get("f")
    if f is None:
        f = jnp.sum(byz, dtype=jnp.int32)
    n, d = x.shape
    run = _rule_closure(agg, pres, f, jax.random.fold_in(key, _SALT_OWN_RULE),
                        *_stage_states(agg, pres, n, d))
    return lambda xx, vv: run(xx, vv)[0]


def _rule_options(attack, aggregator, preaggregators, f):
    own = _own_rule(attack, aggregator, preaggregators, f)
    # An attack with its own stages does not need the run's: byzantine() accepts it alone.
    return own, own is None


def byzfl_line_search(score: Callable[[Array], Array], evals: int, start, delta, ratio) -> Array:
    r"""ByzFL's expansion / contraction search for the factor maximising ``score`` (in-graph).

    Exactly ``evals`` evaluations. ``x = start`` is evaluated first; then, in the *expansion*
    phase, ``x + delta`` is tried: if it scores strictly higher it becomes the best and ``delta``
    doubles, otherwise ``delta`` is multiplied by ``ratio`` and the *contraction* phase begins:
    ``best + delta`` is tried, kept if strictly higher, and ``delta *= ratio`` after every try.
    The search only moves in the direction of ``delta`` (as ByzFL's). "Higher" is by more than
    the relative margin :data:`TIE` (ByzFL compares float64 scores strictly; in float32 a
    plateau's scores differ by rounding only, see :data:`TIE`). A NaN score never wins.

    Args:
      score: ``factor [] -> []`` (float32, traceable).
      evals: static number of evaluations (>= 1).
      start, delta, ratio: floats or traced scalars.

    Returns:
      The best factor found (float32 scalar).

    References:
      ByzFL (EPFL DCL), ``Optimal_ALittleIsEnough._expansion_phase`` /
      ``_contraction_phase`` (LPD-EPFL/byzfl at 69bd1ac).
    """
    start = jnp.asarray(start, jnp.float32)
    y0 = score(start)

    def body(_, carry):
        bx, by, dl, expanding = carry
        px = bx + dl
        py = score(px)
        better = _beats(py, by)
        return (jnp.where(better, px, bx), jnp.where(better, py, by),
                jnp.where(expanding & better, 2.0 * dl, dl * ratio), expanding & better)

    init = (start, y0, jnp.asarray(delta, jnp.float32), jnp.asarray(True))
    best, _, _, _ = lax.fori_loop(0, int(evals) - 1, body, init)
    return best


def _eval_stack(x, honest, byz):
    """The stack a rule-aware attack evaluates: honest rows as submitted, invalid rows zeroed."""
    valid = honest | byz
    return jnp.where(valid[:, None], x.astype(jnp.float32), 0.0), valid


def _distance(agg_fn, xe, valid, byz, mu, mal):
    out = agg_fn(_replace_byz(xe, byz, mal), valid)
    return jnp.sqrt(jnp.sum(jnp.square(out - mu)))


def _search_options(name, evals, start, delta, ratio):
    evals = _static_count(name, "evals", evals)
    _check_number(name, "ratio", ratio, low=0.5, high=1.0, open_=True)
    d = concrete_number(delta)
    if d is not None and d == 0:
        raise ConfigError(f"{name}: delta must be non-zero; got delta={delta!r}.")
    return evals


# --------------------------------------------------------------------------------------------
# Optimal IPM / optimal ALIE (ByzFL)


@ATTACKS.register(
    "optimal_ipm",
    "IPM -tau*mu with tau maximising ||Agg(Pre(honest + f copies)) - mu|| through the run's own "
    "rule (ByzFL's line search: 20 evaluations from 0, step 10, ratio 0.8).",
    "ByzFL Optimal_InnerProductManipulation (Gonzalez et al., arXiv:2505.24802, 2025); Xie, "
    "Koyejo, Gupta, UAI 2019; Allouah et al., AISTATS 2023",
)
def optimal_ipm(evals: int = 20, start: float = 0.0, delta: float = 10.0, ratio: float = 0.8,
                aggregator=None, preaggregators: Sequence = (), f=None) -> Attack:
    r"""Optimal inner-product manipulation: IPM with the factor chosen against the rule.

    .. math::
       x^{\text{out}} = -\tau^\star \mu, \qquad
       \tau^\star \approx \arg\max_\tau\;
       \big\|\mathrm{Agg}\big(\mathrm{Pre}(X_{H} \cup \{-\tau\mu\}^{f_{\text{real}}})\big) - \mu\big\|_2

    searched by :func:`byzfl_line_search` (``evals`` evaluations from ``start`` with step
    ``delta`` and contraction ``ratio``; ByzFL's benchmark defaults 20, 0, 10, 0.8), each
    evaluation one application of the pre-aggregators and rule inside the compiled step.

    Semantics as ByzFL's ``Optimal_InnerProductManipulation``; differences: the aggregation is
    the run's own (with its declared ``f`` and current states; see the module docstring) unless
    ``aggregator`` is given, and random stages (bucketing) draw from the attack's own key, fixed
    within a step (common random numbers across the evaluations). ByzFL concatenates the
    Byzantine rows after the honest ones; here they stay in their slots (the first ones): equal
    for permutation-invariant stages.

    Args:
      evals: static number of evaluations (>= 1).
      start, delta, ratio: the search's start, first step (non-zero) and contraction ratio in
        (0.5, 1) (floats or traced scalars).
      aggregator, preaggregators, f: the stages the attacker assumes (names, dicts or objects);
        default: the run's own (ByzFL's ``Average`` after ``Clipping(2.0)`` in a direct call).

    Returns:
      An :class:`~jbyz.types.Attack` (``uses_rule`` unless ``aggregator`` is given).

    References:
      Xie, Koyejo, Gupta. Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
      Manipulation. UAI 2019. Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan. Fixing by
      Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity. AISTATS 2023. ByzFL
      (LPD-EPFL/byzfl), ``Optimal_InnerProductManipulation``.
    """
    evals = _search_options("optimal_ipm", evals, start, delta, ratio)
    own, uses_rule = _rule_options("optimal_ipm", aggregator, preaggregators, f)

    def apply(x, honest, byz, key, state, ctx):
        mu, _ = honest_mean_std(x, honest, with_std=False)
        xe, valid = _eval_stack(x, honest, byz)
        agg_fn = _agg_fn(own, ctx, key, xe, byz)
        tau = byzfl_line_search(lambda t: _distance(agg_fn, xe, valid, byz, mu, -t * mu),
                                evals, start, delta, ratio)
        return _replace_byz(x, byz, -tau * mu), state

    return Attack(name="optimal_ipm", apply=apply, uses_rule=uses_rule)


@ATTACKS.register(
    "optimal_alie",
    "ALIE mu + tau*sigma with tau maximising ||Agg(Pre(honest + f copies)) - mu|| through the "
    "run's own rule (ByzFL's line search: 20 evaluations from 0, step 10, ratio 0.8).",
    "ByzFL Optimal_ALittleIsEnough (Gonzalez et al., arXiv:2505.24802, 2025); Baruch, Baruch, "
    "Goldberg, NeurIPS 2019; Allouah et al., AISTATS 2023",
)
def optimal_alie(evals: int = 20, start: float = 0.0, delta: float = 10.0, ratio: float = 0.8,
                 sign: str = "plus", aggregator=None, preaggregators: Sequence = (),
                 f=None) -> Attack:
    r"""Optimal ALIE: ALIE with the factor chosen against the rule.

    .. math::
       x^{\text{out}} = \mu \pm \tau^\star \sigma, \qquad
       \tau^\star \approx \arg\max_\tau\;
       \big\|\mathrm{Agg}\big(\mathrm{Pre}(X_{H} \cup \{\mu \pm \tau\sigma\}^{f_{\text{real}}})\big)
       - \mu\big\|_2

    with ``mu``, ``sigma`` the honest mean and unbiased coordinate-wise std (as ByzFL's
    ``ALittleIsEnough``), searched by :func:`byzfl_line_search` (defaults: ByzFL's 20
    evaluations from 0, step 10, ratio 0.8). ``sign="plus"`` is ByzFL's (``mu + tau sigma``);
    ``"minus"`` the paper's direction. Other semantics and differences as :func:`optimal_ipm`.

    Args:
      evals, start, delta, ratio: as :func:`optimal_ipm`.
      sign: static, ``"plus"`` (ByzFL, default) or ``"minus"``.
      aggregator, preaggregators, f: as :func:`optimal_ipm`.

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Baruch, Baruch, Goldberg. A Little Is Enough: Circumventing Defenses For Distributed
      Learning. NeurIPS 2019. Allouah et al. AISTATS 2023. ByzFL, ``Optimal_ALittleIsEnough``.
    """
    evals = _search_options("optimal_alie", evals, start, delta, ratio)
    _check_choice("sign", sign, ("plus", "minus"))
    direction = 1.0 if sign == "plus" else -1.0
    own, uses_rule = _rule_options("optimal_alie", aggregator, preaggregators, f)

    def apply(x, honest, byz, key, state, ctx):
        mu, sigma = honest_mean_std(x, honest)
        p = direction * sigma
        xe, valid = _eval_stack(x, honest, byz)
        agg_fn = _agg_fn(own, ctx, key, xe, byz)
        tau = byzfl_line_search(lambda t: _distance(agg_fn, xe, valid, byz, mu, mu + t * p),
                                evals, start, delta, ratio)
        return _replace_byz(x, byz, mu + tau * p), state

    return Attack(name="optimal_alie", apply=apply, uses_rule=uses_rule)


# --------------------------------------------------------------------------------------------
# Gradient attack


@ATTACKS.register(
    "gradient_ascent",
    "Projected gradient ascent (jax.grad through the run's pre-aggregators and rule) on "
    "||Agg - mu|| (or the first-order honest loss) within a norm ball around mu, from the best "
    "of the optimal ALIE / IPM line searches inside the ball.",
    "jbyz (this library); objective as ByzFL's optimal attacks; adaptive attacks: Shejwalkar & "
    "Houmansadr, NDSS 2021",
)
def gradient_ascent(steps: int = 10, budget: float = 10.0, lr: float = 0.5,
                    objective: Any = "distance", shared: bool = True, evals: int = 20,
                    aggregator=None, preaggregators: Sequence = (), f=None) -> Attack:
    r"""Gradient attack: a few projected (normalised) gradient-ascent steps through the rule.

    The Byzantine vectors ``v`` (one shared vector, or one per Byzantine row with
    ``shared=False``) maximise an objective of the aggregate
    :math:`a(v) = \mathrm{Agg}(\mathrm{Pre}(X_H \cup v))`, differentiated by ``jax.grad``
    through the pre-aggregators and the rule, within the ball

    .. math:: \mathcal B = \{v : \|v_i - \mu\|_2 \le r\}, \qquad r = \text{budget}\cdot\|\sigma\|_2

    (``budget`` in units of the honest spread: ALIE with factor ``z`` lies at radius
    ``z ||sigma||``). Objectives: ``"distance"`` :math:`\|a - \mu\|_2` (ByzFL's, as the optimal
    attacks), ``"loss"`` :math:`-\langle a, \mu\rangle / \|\mu\|_2` (the first-order increase of
    the honest loss after the step :math:`\theta - \eta a`, whose gradient is about ``mu``), or
    a callable ``(a [d], mu [d], x [n, d], honest [n]) -> []`` (the drop-in; e.g. a loss closed
    over held-out data).

    Start: the best of three line searches on the same objective, each ByzFL's
    (:func:`byzfl_line_search`, ``evals`` evaluations from 0 with step 10 and ratio 0.8) along
    the optimal attacks' lines projected onto the ball: :math:`\Pi_{\mathcal B}(\mu + \tau
    \sigma)`, :math:`\Pi_{\mathcal B}(\mu - \tau\sigma)` (optimal ALIE, both signs) and
    :math:`\Pi_{\mathcal B}(-\tau\mu)` (optimal IPM). Then ``steps`` times:

    .. math:: v \leftarrow \Pi_{\mathcal B}\big(v + \text{lr}\cdot r\cdot g / \|g\|_2\big),
              \qquad g = \nabla_v \phi(a(v))

    (a non-finite gradient entry counts as 0; ``g = 0`` leaves ``v`` in place). The attack sends
    the best iterate seen, the start included, so on its own evaluation it never does worse than
    the optimal ALIE (either sign) or the optimal IPM restricted to the ball (the same search
    on the same points). Where the rule's output is locally constant in ``v`` the gradient is 0
    and the ascent cannot leave the start: Krum selecting an honest row, and the coordinate-wise
    order statistics (median, trimmed mean) once the Byzantine values lie beyond the selected
    honest ones, which is where the line searches end; there it is the line search. The ascent
    gains where the output moves smoothly with ``v`` and the best line is not already the best
    direction: the geometric median (+8% over the start in the tests). Against clipping rules
    (centered clipping, the mean after clipping) the clipped Byzantine rows act through their
    direction only, and the IPM direction :math:`-\mu` is already close to the best one: the
    ascent adds well under 1% there.

    Args:
      steps: static number of ascent steps (>= 0).
      budget: radius in units of ``||sigma||_2`` (float or traced, >= 0).
      lr: step length as a fraction of the radius (float or traced, > 0).
      objective: ``"distance"``, ``"loss"`` or a callable (static).
      shared: static; one vector for every Byzantine row (default) or one per row.
      evals: static number of evaluations of the start's line search (>= 1).
      aggregator, preaggregators, f: as :func:`optimal_ipm`.

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      The objective is ByzFL's (``Optimal_ALittleIsEnough``). Adaptive, rule-aware poisoning by
      optimisation: Shejwalkar, Houmansadr. Manipulating the Byzantine: Optimizing Model
      Poisoning Attacks and Defenses for Federated Learning. NDSS 2021 (their attacks optimise a
      scalar factor; this one optimises the vectors by gradient).
    """
    steps = _static_count("gradient_ascent", "steps", steps, low=0)
    evals = _static_count("gradient_ascent", "evals", evals)
    _check_number("gradient_ascent", "budget", budget, low=0)
    _check_number("gradient_ascent", "lr", lr, low=0, open_=True)
    if isinstance(objective, str):
        _check_choice("objective", objective, ("distance", "loss"))
    elif not callable(objective):
        raise ConfigError(f"gradient_ascent: objective must be 'distance', 'loss' or a callable; "
                          f"got {objective!r}")
    own, uses_rule = _rule_options("gradient_ascent", aggregator, preaggregators, f)

    def phi(a, mu, x, honest):
        if objective == "distance":
            return jnp.sqrt(jnp.sum(jnp.square(a - mu)) + 1e-30)
        if objective == "loss":
            nrm = jnp.sqrt(jnp.sum(jnp.square(mu)))
            return -jnp.vdot(a, mu) / jnp.maximum(nrm, 1e-30)
        return jnp.asarray(objective(a, mu, x, honest), jnp.float32)

    def apply(x, honest, byz, key, state, ctx):
        n, d = x.shape
        mu, sigma = honest_mean_std(x, honest)
        xe, valid = _eval_stack(x, honest, byz)
        agg_fn = _agg_fn(own, ctx, key, xe, byz)
        b = jnp.asarray(budget, jnp.float32)
        r = b * jnp.sqrt(jnp.sum(jnp.square(sigma)))

        def value(v):
            mal = v if not shared else jnp.broadcast_to(v, (n, d))
            return phi(agg_fn(jnp.where(byz[:, None], mal, xe), valid), mu, xe, honest)

        def project(v):
            dev = v - mu
            nrm = jnp.sqrt(jnp.sum(jnp.square(dev), axis=-1, keepdims=True))
            return mu + dev * jnp.minimum(1.0, r / jnp.maximum(nrm, 1e-30))

        def full(v):
            return v if shared else jnp.broadcast_to(v, (n, d))

        # Three capped line searches (ALIE +, ALIE -, IPM directions); the best point starts.
        cands = []
        for line in (lambda t: mu + t * sigma, lambda t: mu - t * sigma, lambda t: -t * mu):
            tau = byzfl_line_search(lambda t, line=line: value(full(project(line(t)))), evals,
                                    0.0, 10.0, 0.8)
            v = full(project(line(tau)))
            cands.append((value(v), v))
        y0, v0 = cands[0]
        for y, v in cands[1:]:
            v0 = jnp.where(_beats(y, y0), v, v0)
            y0 = jnp.where(_beats(y, y0), y, y0)

        grad_fn = jax.value_and_grad(value)

        def body(_, carry):
            v, best_v, best_y = carry
            y, g = grad_fn(v)
            if not shared:
                g = jnp.where(byz[:, None], g, 0.0)
            g = jnp.where(jnp.isfinite(g), g, 0.0)
            better = _beats(y, best_y)
            best_v, best_y = jnp.where(better, v, best_v), jnp.where(better, y, best_y)
            gn = jnp.sqrt(jnp.sum(jnp.square(g)))
            step = jnp.where(gn > 0, g / jnp.where(gn > 0, gn, 1.0), 0.0)
            return project(v + jnp.asarray(lr, jnp.float32) * r * step), best_v, best_y

        v, best_v, best_y = lax.fori_loop(0, steps, body, (v0, v0, y0))
        y_last = value(v)
        best_v = jnp.where(_beats(y_last, best_y), v, best_v)
        return _replace_byz(x, byz, best_v), state

    return Attack(name="gradient_ascent", apply=apply, uses_rule=uses_rule)


# --------------------------------------------------------------------------------------------
# Fang et al.: trimmed mean / median


def fang_trim_values(mu: Array, vmax: Array, vmin: Array, u: Array, b=2.0) -> Array:
    r"""Fang et al.'s full-knowledge values against trimmed mean / median, from uniforms ``u``.

    Per coordinate ``j``, with ``s_j = sign(mu_j)`` and the honest extremes ``vmax``, ``vmin``:

    =================  ================  ===========================================
    ``s_j``            condition         value (``u`` uniform in [0, 1))
    =================  ================  ===========================================
    ``-1``             ``vmax > 0``      ``vmax + u (b - 1) vmax``   in ``[vmax, b vmax]``
    ``-1``             ``vmax < 0``      ``vmax + u (1/b - 1) vmax`` in ``[vmax, vmax / b]``
    ``+1``             ``vmin > 0``      ``vmin / b + u (1 - 1/b) vmin`` in ``[vmin / b, vmin]``
    ``+1``             ``vmin < 0``      ``b vmin + u (1 - b) vmin`` in ``[b vmin, vmin]``
    ``0``              --                ``mu_j``
    =================  ================  ===========================================

    and 0 in the remaining cases (``vmax = 0`` or ``vmin = 0``), as Blades'
    ``AdaptiveAdversary._attack_median_and_trimmedmean`` (whose arithmetic this follows).
    ``u`` broadcasts against ``mu`` (``[d]`` or ``[k, d]``).
    """
    s = jnp.sign(mu)
    b = jnp.asarray(b, jnp.float32)
    neg_pos = u * ((b - 1.0) * vmax) + vmax
    neg_neg = u * ((1.0 / b - 1.0) * vmax) + vmax
    pos_pos = u * ((1.0 - 1.0 / b) * vmin) + vmin / b
    pos_neg = u * ((1.0 - b) * vmin) + vmin * b
    out = jnp.where((s == -1) & (vmax > 0), neg_pos, 0.0)
    out = jnp.where((s == -1) & (vmax < 0), neg_neg, out)
    out = jnp.where((s == 1) & (vmin > 0), pos_pos, out)
    out = jnp.where((s == 1) & (vmin < 0), pos_neg, out)
    return jnp.where(s == 0, mu, out)


@ATTACKS.register(
    "fang_trim",
    "Fang et al.'s full-knowledge attack on trimmed mean / median: per coordinate, values beyond "
    "the honest extreme opposite to the mean's sign (within a factor b = 2).",
    "Fang, Cao, Jia, Gong, USENIX Security 2020 (arXiv:1911.11815), Sec. 4.3; Blades "
    "AdaptiveAdversary",
)
def fang_trim(b: float = 2.0, shared: bool = False) -> Attack:
    r"""Fang et al.'s full-knowledge attack on trimmed mean and median.

    Every Byzantine coordinate is pushed against the sign ``s_j`` of the honest mean, beyond the
    honest extreme on that side: uniform in ``[vmax_j, b vmax_j]`` (or ``[vmax_j, vmax_j / b]``
    when ``vmax_j < 0``) where ``s_j < 0``, in ``[vmin_j / b, vmin_j]`` (or
    ``[b vmin_j, vmin_j]``) where ``s_j > 0``; see :func:`fang_trim_values` for the table.

    ``shared=False`` (default): each Byzantine row draws its own uniforms (Fang et al.: every
    compromised worker samples its values; row ``i`` from ``fold_in(key, i)``).
    ``shared=True``: one draw for every Byzantine row (Blades' ``AdaptiveAdversary``, which
    sends one vector). Coordinates where ``mu_j = 0`` get ``mu_j`` (Blades; the paper leaves
    this case open).

    Args:
      b: the factor ``b > 1`` (float or traced; Fang et al. and Blades use 2).
      shared: static, see above.

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Fang, Cao, Jia, Gong. Local Model Poisoning Attacks to Byzantine-Robust Federated
      Learning. USENIX Security 2020, Sec. 4.3 (full knowledge, trimmed mean; the same attack is
      used against median). Blades (lishenghui/blades), ``AdaptiveAdversary``.
    """
    _check_number("fang_trim", "b", b, low=1.0, open_=True)

    def apply(x, honest, byz, key, state, ctx):
        del ctx
        n, d = x.shape
        xf = x.astype(jnp.float32)
        mu, _ = honest_mean_std(xf, honest, with_std=False)
        vmax = jnp.max(jnp.where(honest[:, None], xf, -jnp.inf), axis=0)
        vmin = jnp.min(jnp.where(honest[:, None], xf, jnp.inf), axis=0)
        any_h = jnp.any(honest)
        vmax, vmin = jnp.where(any_h, vmax, 0.0), jnp.where(any_h, vmin, 0.0)
        if shared:
            u = jax.random.uniform(key, (d,), jnp.float32)
        else:
            keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(n))
            u = jax.vmap(lambda k: jax.random.uniform(k, (d,), jnp.float32))(keys)
        return _replace_byz(x, byz, fang_trim_values(mu, vmax, vmin, u, b)), state

    return Attack(name="fang_trim", apply=apply)


# --------------------------------------------------------------------------------------------
# Fang et al.: Krum


def _krum_picks_byzantine(xe, valid, byz, f):
    """Whether Krum (squared distances to the ``n_valid - f - 2`` nearest other valid rows)
    selects a Byzantine row (the lowest index among tied minimal scores, as jbyz's Krum)."""
    n = xe.shape[0]
    d2, _ = S.pairwise_sq_distances(xe, valid)
    m = jnp.sum(valid, dtype=jnp.int32)
    k = jnp.maximum(m - jnp.asarray(f, jnp.int32) - 2, 1)
    other = valid[None, :] & ~jnp.eye(n, dtype=bool)
    srt = jnp.sort(jnp.where(other, d2, jnp.inf), axis=1)
    score = jnp.sum(jnp.where(jnp.arange(n)[None, :] < k, srt, 0.0), axis=1)
    score = jnp.where(valid, score, jnp.inf)
    return byz[jnp.argmin(score)]


@ATTACKS.register(
    "fang_krum",
    "Fang et al.'s full-knowledge attack on Krum: send -lambda*sign(mu), lambda from the paper's "
    "bound halved until Krum selects a Byzantine row.",
    "Fang, Cao, Jia, Gong, USENIX Security 2020 (arXiv:1911.11815), Sec. 4.2",
)
def fang_krum(threshold: float = 1e-5, max_halvings: int = 64, center: str = "zero") -> Attack:
    r"""Fang et al.'s full-knowledge attack on Krum, in update space.

    Fang et al. craft the model :math:`w_1 = w_{Re} - \lambda s` (``s`` the sign of the change
    of the global model without attack) and copy it to the other Byzantine workers; with updates
    :math:`g_i` (:math:`w_i = w_{Re} - \eta g_i`) this is :math:`g_1 = c - \lambda\,
    \mathrm{sign}(\mu)` with ``c = 0`` (``center="zero"``). ``center="mean"`` is the
    gradient-space variant of Shejwalkar & Houmansadr's reimplementation, :math:`c = \mu`.
    :math:`\lambda` starts at the paper's bound (Sec. 4.2), over the honest rows ``H`` (``m``
    valid rows, ``c_b = |byz|``)

    .. math::
       \lambda_0 = \frac{1}{(m - 2c_b - 1)\sqrt d}\,\min_{i \in H}
                   \sum_{l \in \tilde\Gamma_i} \|g_l - g_i\|_2
                 + \frac{1}{\sqrt d}\max_{i\in H} \|g_i - c\|_2,

    :math:`\tilde\Gamma_i` the :math:`m - c_b - 2` honest rows nearest to :math:`g_i`, and is
    halved until Krum (with the declared ``f`` from ``ctx["f"]``, else ``c_b``) selects a
    Byzantine row or :math:`\lambda \le` ``threshold`` (at most ``max_halvings`` halvings); the
    last :math:`\lambda` tried is used. The other Byzantine rows are exact copies (the paper
    samples them within a small ball ``epsilon`` of :math:`w_1`; ``epsilon = 0`` here).

    Args:
      threshold: stop halving below this ``lambda`` (Fang et al.: 1e-5; float or traced).
      max_halvings: static cap on the halvings.
      center: static, ``"zero"`` (Fang et al.) or ``"mean"``.

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Fang, Cao, Jia, Gong. Local Model Poisoning Attacks to Byzantine-Robust Federated
      Learning. USENIX Security 2020, Sec. 4.2. Shejwalkar, Houmansadr. Manipulating the
      Byzantine. NDSS 2021 (their reimplementation).
    """
    _check_choice("center", center, ("zero", "mean"))
    max_halvings = _static_count("fang_krum", "max_halvings", max_halvings, low=0)

    def apply(x, honest, byz, key, state, ctx):
        del key
        n, d = x.shape
        xe, valid = _eval_stack(x, honest, byz)
        mu, _ = honest_mean_std(xe, honest, with_std=False)
        s = jnp.sign(mu)
        c = mu if center == "mean" else jnp.zeros_like(mu)
        c_b = jnp.sum(byz, dtype=jnp.int32)
        m = jnp.sum(valid, dtype=jnp.int32)
        f = ctx.get("f")
        f = c_b if f is None else jnp.asarray(f, jnp.int32)
        d2, _ = S.pairwise_sq_distances(xe, honest)
        dist = jnp.sqrt(jnp.maximum(d2, 0.0))
        other = honest[None, :] & ~jnp.eye(n, dtype=bool)
        srt = jnp.sort(jnp.where(other, dist, jnp.inf), axis=1)
        k = jnp.maximum(m - c_b - 2, 0)
        sums = jnp.sum(jnp.where(jnp.arange(n)[None, :] < k, srt, 0.0), axis=1)
        term1 = jnp.min(jnp.where(honest, sums, jnp.inf))
        denom = jnp.maximum(m - 2 * c_b - 1, 1).astype(jnp.float32) * math.sqrt(d)
        dev = jnp.sqrt(jnp.sum(jnp.square(xe - c), axis=1))
        term2 = jnp.max(jnp.where(honest, dev, -jnp.inf)) / math.sqrt(d)
        lam0 = jnp.where(jnp.any(honest), term1 / denom + term2, 0.0)
        lam0 = jnp.where(jnp.isfinite(lam0), lam0, 0.0)
        thr = jnp.asarray(threshold, jnp.float32)

        def picked(lam):
            return _krum_picks_byzantine(_replace_byz(xe, byz, c - lam * s), valid, byz, f)

        def cond(carry):
            lam, t, done = carry
            return (~done) & (lam > thr) & (t < max_halvings)

        def body(carry):
            lam, t, _ = carry
            lam = 0.5 * lam
            return lam, t + 1, picked(lam)

        lam, _, _ = lax.while_loop(cond, body, (lam0, jnp.zeros([], jnp.int32), picked(lam0)))
        return _replace_byz(x, byz, c - lam * s), state

    return Attack(name="fang_krum", apply=apply)


# --------------------------------------------------------------------------------------------
# Blades: SignGuard


def signguard_values(mu: Array, u: Array, perm: Array) -> Array:
    """Blades' vector against SignGuard from uniforms ``u [d]`` and a permutation ``perm [d]``.

    With ``p``, ``q``, ``z`` the numbers of positive, negative and zero coordinates of ``mu``,
    the noise ``[u_0 .. u_{p-1}, -u_p .. -u_{p+q-1}, 0 .. 0]`` is permuted: ``out = noise[perm]``.
    """
    d = mu.shape[-1]
    pos = jnp.sum(mu > 0)
    neg = jnp.sum(mu < 0)
    k = jnp.arange(d)
    noise = jnp.where(k < pos, u, jnp.where(k < pos + neg, -u, 0.0))
    return noise[perm]


@ATTACKS.register(
    "signguard_attack",
    "Blades' attack on SignGuard: random magnitudes in [0, 1) with as many positive / negative / "
    "zero coordinates as the honest mean, at random positions.",
    "Blades (Li, Ngai, Ye, Ju, Zhang, Voigt, IoTDI 2024) SignGuardAdversary; against Xu et al., "
    "ICDCS 2022",
)
def signguard_attack() -> Attack:
    r"""Blades' attack on SignGuard: match the sign statistics of the honest mean, nothing else.

    SignGuard clusters the inputs on the fractions of positive, zero and negative coordinates.
    The attack sends one vector (to every Byzantine row) with exactly as many positive, negative
    and zero coordinates as the honest mean ``mu``, magnitudes uniform in ``[0, 1)``, at
    uniformly random positions (:func:`signguard_values`; the uniforms and the permutation come
    from the step's key). The magnitudes are not scaled to the gradients (as Blades).

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Blades (lishenghui/blades), ``SignGuardAdversary``. Li, Ngai, Ye, Ju, Zhang, Voigt.
      Blades: A Unified Benchmark Suite for Byzantine Attacks and Defenses in Federated Learning.
      IEEE/ACM IoTDI 2024. Xu, Huang,
      Song, Lan. SignGuard: Byzantine-robust Federated Learning through Collaborative Malicious
      Gradient Filtering. ICDCS 2022.
    """

    def apply(x, honest, byz, key, state, ctx):
        del ctx
        d = x.shape[1]
        mu, _ = honest_mean_std(x, honest, with_std=False)
        ku, kp = jax.random.split(key)
        u = jax.random.uniform(ku, (d,), jnp.float32)
        perm = jax.random.permutation(kp, d)
        return _replace_byz(x, byz, signguard_values(mu, u, perm)), state

    return Attack(name="signguard_attack", apply=apply)


# --------------------------------------------------------------------------------------------
# Blades: clipped clustering


@ATTACKS.register(
    "clipped_clustering_attack",
    "Blades' attack on clipped clustering: vectors rotated away from the honest mean by the "
    "smallest honest angle, chained from one Byzantine row to the next.",
    "Blades (Li, Ngai, Ye, Ju, Zhang, Voigt, IoTDI 2024) AttackclippedclusteringAdversary; against "
    "Li, Ngai, Voigt, IEEE Transactions on Big Data 2023",
)
def clipped_clustering_attack(scale: float = 10.0) -> Attack:
    r"""Blades' attack on clipped clustering (single-linkage chain attack).

    With the honest rows ``h_i``, their mean ``mu`` and cosine distances
    :math:`D_{ij} = 1 - \cos(h_i, h_j)`:

    1. two clusters by single-linkage agglomerative clustering on ``D``; ``G`` the larger one
       (equal sizes: scikit-learn's label 0, as :func:`jbyz.aggregators_extra.clipped_clustering`);
    2. :math:`\theta_c = \arccos(1 - \min_{i \ne j} D_{ij}) - 0.1` (the minimum over *all* honest
       pairs, as Blades);
    3. ``k`` the position in ``G`` (in slot order) of the member farthest in angle from ``mu``,
       :math:`\theta = \arccos(1 - D(h_{G_k}, \mu))`, and :math:`v = h_k / \|h_k\|` with
       :math:`h_k` the ``k``-th honest row (Blades indexes all honest rows with the position in
       ``G``; kept);
    4. for each Byzantine row in slot order (a chain): if :math:`\theta + \theta_c \ge \pi`,
       send :math:`-\text{scale}\,\mu`; else
       :math:`v \leftarrow \text{scale}\,(a\,\hat\mu + b\,v)` with
       :math:`a = \cos(\theta + \theta_c - \epsilon) - \sin(\theta + \theta_c - \epsilon) /
       \tan\theta`, :math:`b = \cos(\theta_c - \epsilon) + \sin(\theta_c - \epsilon)/\tan\theta`,
       :math:`\epsilon = 10^{-4}`, send ``v`` and set :math:`\theta \leftarrow \theta + \theta_c
       - \epsilon`.

    Semantics as Blades' ``AttackclippedclusteringAdversary`` (single linkage), including its
    absolute scale 10. Fewer than two honest rows: every Byzantine row sends
    :math:`-\text{scale}\,\mu`.

    Args:
      scale: the factor (Blades: 10; float or traced).

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Blades (lishenghui/blades), ``AttackclippedclusteringAdversary``; Li, Ngai, Ye, Ju,
      Zhang, Voigt. Blades: A Unified Benchmark Suite for Byzantine Attacks and Defenses in
      Federated Learning. IEEE/ACM IoTDI 2024. The defence: Li, Ngai, Voigt. An experimental
      study of Byzantine-robust aggregation schemes in federated learning. IEEE Transactions on
      Big Data, 2023.
    """
    from jbyz.aggregators_extra import _agglomerate_two

    def apply(x, honest, byz, key, state, ctx):
        del key, ctx
        n, d = x.shape
        xf = jnp.where(honest[:, None], x.astype(jnp.float32), 0.0)
        mu, _ = honest_mean_std(xf, honest, with_std=False)
        g = S.gram(xf)
        nrm = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
        cos = g / jnp.maximum(nrm[:, None] * nrm[None, :], 1e-8)
        eye = jnp.eye(n, dtype=bool)
        dist = jnp.where(eye, 0.0, 1.0 - cos)
        dist = jnp.where(jnp.isnan(dist), 2.0, dist)
        label, formed = _agglomerate_two(dist, honest, "single")
        rep = jnp.where(honest, label, n)
        a_ = jnp.min(rep)
        b_ = jnp.max(jnp.where(honest & (label != a_), label, -1))
        in_a, in_b = honest & (label == a_), honest & (label == b_)
        na, nb = jnp.sum(in_a), jnp.sum(in_b)
        fa, fb = formed[a_], jnp.where(b_ >= 0, formed[jnp.maximum(b_, 0)], -2)
        b_wins = (nb > na) | ((nb == na) & ((fb > fa) | ((fb == fa) & (b_ > a_))))
        group = jnp.where(b_wins, in_b, in_a)
        pair = honest[:, None] & honest[None, :] & ~eye
        dis_cross = jnp.min(jnp.where(pair, dist, jnp.inf))
        theta_c = jnp.arccos(jnp.clip(1.0 - dis_cross, -1.0, 1.0)) - 0.1
        mu_n = jnp.sqrt(jnp.sum(jnp.square(mu)))
        cos_mu = jnp.matmul(xf, mu, precision=_HI) / jnp.maximum(nrm * mu_n, 1e-8)
        dis2mean = 1.0 - cos_mu
        pos = jnp.argmax(jnp.where(group, dis2mean, -jnp.inf))  # slot of the farthest member
        k = jnp.sum((group & (jnp.arange(n) < pos)).astype(jnp.int32))  # its position in G
        rank = jnp.cumsum(honest.astype(jnp.int32)) - 1
        hk = jnp.argmax(honest & (rank == k))  # Blades: the k-th honest row
        theta0 = jnp.arccos(jnp.clip(1.0 - dis2mean[pos], -1.0, 1.0))
        v0 = xf[hk] / jnp.maximum(nrm[hk], 1e-30)
        mu_hat = mu / jnp.maximum(mu_n, 1e-30)
        sc = jnp.asarray(scale, jnp.float32)
        eps = 1e-4
        few = jnp.sum(honest) < 2

        def row(carry, i):
            v, theta = carry
            flat = few | (theta + theta_c >= math.pi)
            ca = jnp.cos(theta + theta_c - eps) - jnp.sin(theta + theta_c - eps) / jnp.tan(theta)
            cb = jnp.cos(theta_c - eps) + jnp.sin(theta_c - eps) / jnp.tan(theta)
            chained = sc * (ca * mu_hat + cb * v)
            new_v = jnp.where(flat, -sc * mu, chained)
            new_theta = jnp.where(flat, theta, theta + theta_c - eps)
            go = byz[i]
            return ((jnp.where(go, new_v, v), jnp.where(go, new_theta, theta)),
                    jnp.where(go, new_v, 0.0))

        _, mal = lax.scan(row, (v0, theta0), jnp.arange(n))
        return _replace_byz(x, byz, mal), state

    return Attack(name="clipped_clustering_attack", apply=apply)


NAMES = ("optimal_ipm", "optimal_alie", "gradient_ascent", "fang_trim", "fang_krum",
         "signguard_attack", "clipped_clustering_attack")
"""The registry names this module provides (:mod:`jbyz.attacks` declares them lazily)."""
