r"""dSTAR's filter: the first-k responders, filtered by their deviation from an ensemble median.

dSTAR (Yan, Chaudhari, Kleinrock, "Straggler-tolerant and Byzantine-resilient distributed SGD",
AdvML-Frontiers @ NeurIPS 2024, arXiv:2412.07151) waits for the first ``k`` of ``N`` workers and
filters the ``k`` received gradients by their deviation from an "ensemble median", optionally
against a gradient the server computes on data it holds. Neither the full text nor code could be
read (only the abstract and summaries of it), so **everything here is a reconstruction
(ASSUMPTION)** consistent with the abstract: each step of :func:`dstar` (ensemble, score, keep
rule) is a flag, with the most standard choice as default. There are no published numbers to
reproduce.

The first-k part is the simulator's business (:mod:`jbyz.protocols`): the workers that did not
arrive are invalid rows of the stack, exactly like padding, and the rule below only sees the
``k = m`` valid rows. This module is the server-side filter, an ordinary
:class:`~jbyz.types.AggregationRule` registered as ``"dstar"`` in
:data:`jbyz.aggregators.AGGREGATORS` (``needs_reference=True``: its ``apply`` takes the server's
validation gradient as the keyword ``reference``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The aggregators' registry imports this module on first use of the name "dstar"
# (``AGGREGATORS.provided_by``); this module imports the aggregators, never the reverse.
import jbyz.aggregators as A
from jbyz import _sorting as S
from jbyz.registry import ConfigError

Array = jax.Array

ENSEMBLES = ("median_with_reference", "subset_medians", "median")
SCORES = ("median", "reference")
KEEPS = ("k_minus_f", "threshold", "absolute")
COMBINES = ("mean", "median")
MISSING = ("fallback", "error")


def subset_masks(key, valid: Array, subsets: int, size: Array) -> Array:
    """``[R, n]`` bool: ``R`` random subsets of ``size`` valid rows each (E2's ensemble members).

    The ``j``-th valid row (in slot order) gets the priority ``u[r, j]``, drawn from
    ``fold_in(key, j)``; subset ``r`` holds the ``size`` valid rows of smallest priority,
    i.e. a uniformly random ``size``-subset of the valid rows. Because priorities are indexed by
    the rank among the valid rows, not by the slot, inserting invalid rows anywhere leaves the
    subsets unchanged (padding / first-k invariance). The subsets are key-driven, so the rule is
    permutation invariant in distribution only (as bucketing).

    Args:
      key: typed PRNG key.
      valid: ``[n]`` bool.
      subsets: ``R`` (static).
      size: traced subset size, ``1 <= size <= sum(valid)``.
    """
    n = valid.shape[0]
    # Column j drawn from fold_in(key, j): the same numbers whatever n is (padding invariance).
    u = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j), (subsets,)))(
        jnp.arange(n)
    ).T
    pos = jnp.cumsum(valid.astype(jnp.int32)) - 1
    pri = jnp.take(u, jnp.clip(pos, 0, n - 1), axis=1)
    rank = jax.vmap(lambda p: S.ranks(p, valid))(pri)
    return valid[None, :] & (rank < size)


def _median(x, valid, count, even, sort):
    """Coordinate-wise median ``[d]`` of the ``count`` valid rows of ``x`` (NaN as ``+inf``)."""
    return S.columnwise(
        lambda xb: S.median_of_sorted(S.sorted_rows(S.prepare(xb, valid), sort), count, even), x
    )


@A.memoize
def dstar(
    ensemble: str = "median_with_reference",
    score: str = "median",
    normalize_score: bool = False,
    keep: str = "k_minus_f",
    rho=1.5,
    subsets: int = 8,
    subset_size=None,
    combine: str = "mean",
    even: str = "mean",
    missing_reference: str = "fallback",
    sort: str | None = None,
):
    r"""dSTAR's server-side filter (a reconstruction): ensemble median, score, keep, mean.

    The ``m`` valid rows ``g_1..g_m`` of ``x`` are the first-k responders (``m = k``); ``v`` is
    the server's validation gradient (``reference``); ``f`` the declared number of Byzantine
    responders. Every choice below is an ASSUMPTION of the reconstruction; the defaults are E1, D1
    and ``q = k - f``.

    1. Ensemble median ``c`` (``ensemble``):

       * ``"median_with_reference"`` (E1, default): coordinate-wise median of the ``m + 1``
         vectors ``{g_i} ∪ {v}``;
       * ``"subset_medians"`` (E2): draw ``R`` uniformly random subsets of ``s`` valid rows
         (``s = ⌈m/2⌉`` by default), take each subset's coordinate-wise median, combine the ``R``
         medians by their mean (or coordinate-wise median); key-driven (see
         :func:`subset_masks`);
       * ``"median"`` (E3): coordinate-wise median of ``{g_i}`` only (``v`` used at most as
         the score's reference point).

    2. Deviation score (``score``): ``d_i = ‖g_i − c‖₂`` (D1, ``"median"``, default) or
       ``d_i = ‖g_i − v‖₂`` (D2, ``"reference"``); with ``normalize_score`` divided by ``‖c‖``
       (D1) or ``‖v‖`` (D2). A row with a NaN/inf entry, or whose score overflows, scores
       ``+inf`` and is never kept. With D2 the ensemble median only serves as the fallback
       below (the scores do not depend on it).

    3. Keep (``keep``):

       * ``"k_minus_f"`` (default): the ``q = m − f`` lowest scores (ties by slot);
       * ``"threshold"``: ``d_i ≤ ρ · median_j d_j`` (median over the valid rows, non-finite
         scores as ``+inf``);
       * ``"absolute"`` (added because normalisation changes nothing in the two rules above,
         which are invariant to scaling the scores): ``d_i ≤ ρ``, i.e. with
         ``normalize_score`` a relative deviation ``‖g_i − c‖ ≤ ρ ‖c‖``.

    4. Output: the mean of the kept rows,
       :math:`\mathrm{out} = \frac{1}{|K|}\sum_{i\in K} g_i`; if no row is kept (every valid
       row non-finite, or an empty threshold set) the ensemble median ``c`` is returned.

    Cost: ``O(k d)`` per call for E1/E3 (one sorting network over the worker axis, one pass for
    the ``k`` distances to ``c``; no pairwise distances), ``O(R k d)`` for E2. ``f`` and ``k`` are
    traced; shapes depend only on the number of worker slots.

    Without a reference (``reference=None``, e.g. a registry-wide test or a simulator that does
    not compute one): with ``missing_reference="fallback"`` (default) E1 becomes E3 (median of the
    received rows only) and D2 becomes D1; with ``"error"`` a :class:`~jbyz.registry.ConfigError`
    is raised when the rule is traced. Set ``"error"`` in experiments to be sure the validation
    gradient is really used.

    Args:
      ensemble: ``"median_with_reference"`` (E1), ``"subset_medians"`` (E2) or ``"median"`` (E3).
      score: ``"median"`` (D1: distance to the ensemble median) or ``"reference"`` (D2: distance
        to the validation gradient).
      normalize_score: divide the scores by the norm of their reference point.
      keep: ``"k_minus_f"``, ``"threshold"`` or ``"absolute"``.
      rho: threshold factor ``ρ > 0`` for ``keep="threshold"`` (1.5-2 is typical) or the absolute
        threshold for ``keep="absolute"``; float or array (a grid may vmap over it).
      subsets: ``R``, number of random subsets of E2 (static; default 8, an ASSUMPTION).
      subset_size: ``s`` of E2: ``None`` for ``⌈m/2⌉`` (traced), or an int (capped at ``m``).
      combine: E2's combination of the ``R`` subset medians, ``"mean"`` or ``"median"``.
      even: median convention for an even count, ``"mean"`` (average of the two middle values)
        or ``"lower"``; used by every median above (the threshold's median of scores included).
      missing_reference: ``"fallback"`` or ``"error"`` (see above).
      sort: sorting method for the worker axis (``None``: chosen by ``n``; see ``_sorting``).

    Returns:
      An :class:`~jbyz.types.AggregationRule` with ``needs_reference=True`` whose
      ``apply(x [n, d], valid [n], f, key, state, reference=None [d])`` returns ``([d], state)``
      (stateless). ``key`` is only used by E2. Requirement: ``n >= 2f`` valid inputs for E1 (the
      ``m + 1`` medianed vectors hold at most ``f`` Byzantine ones), ``n >= 2f + 1`` for E2/E3.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> agg = dstar()
      >>> x = jnp.array([[1.0, 1.0], [1.2, 0.8], [0.9, 1.1], [50.0, -50.0]])
      >>> out, _ = agg(x, jnp.ones(4, bool), f=1, key=None, reference=jnp.array([1.0, 1.0]))
      >>> [round(v, 4) for v in out.tolist()]  # the far row is dropped, the rest averaged
      [1.0333, 0.9667]

    References:
      Yan, Chaudhari, Kleinrock. dSTAR: Straggler tolerant and Byzantine resilient distributed
      SGD. AdvML-Frontiers workshop @ NeurIPS 2024, arXiv:2412.07151 (reconstruction).
    """
    A._choice("dstar", "ensemble", ensemble, ENSEMBLES)
    A._choice("dstar", "score", score, SCORES)
    A._choice("dstar", "keep", keep, KEEPS)
    A._choice("dstar", "combine", combine, COMBINES)
    A._choice("dstar", "even", even, ("mean", "lower"))
    A._choice("dstar", "missing_reference", missing_reference, MISSING)
    A._choice("dstar", "normalize_score", normalize_score, (False, True))
    A._check_sort("dstar", sort)
    A._check_number("dstar", "rho", rho, low=0, low_open=True)
    A._check_number("dstar", "subsets", subsets, low=1, integer=True)
    subsets = int(subsets)
    if subset_size is not None:
        A._check_number("dstar", "subset_size", subset_size, low=1, integer=True)

    def apply(x, valid, f, key, state, reference=None):
        x, valid, f, m = A._inputs(x, valid, f)
        n, d = x.shape
        if reference is None and missing_reference == "error" and (
            ensemble == "median_with_reference" or score == "reference"
        ):
            raise ConfigError(
                f"dstar(ensemble={ensemble!r}, score={score!r}) needs the server's validation "
                "gradient: call apply(..., reference=v [d]) (the simulator computes it when "
                "RunConfig.server_validation > 0), or use missing_reference='fallback'."
            )
        if reference is not None:
            reference = jnp.asarray(reference, jnp.float32).reshape(d)

        # 1. Ensemble median c.
        if ensemble == "median_with_reference" and reference is not None:
            xr = jnp.concatenate([x, reference[None, :]], axis=0)
            vr = jnp.concatenate([valid, jnp.ones((1,), bool)])
            centre = _median(xr, vr, m + 1, even, sort)
        elif ensemble == "subset_medians":
            if key is None:
                raise ConfigError("dstar(ensemble='subset_medians') draws subsets: pass a key.")
            s = (m + 1) // 2 if subset_size is None else jnp.asarray(subset_size, jnp.int32)
            s = jnp.clip(s, 1, jnp.maximum(m, 1))
            masks = subset_masks(key, valid, subsets, s)
            meds = [_median(x, masks[r], s, even, sort) for r in range(subsets)]
            if combine == "mean":
                centre = S.tree_sum(meds) / float(subsets)
            else:
                centre = S.median_of_sorted(S.sorted_rows(meds, sort), subsets, even)
        else:
            centre = _median(x, valid, m, even, sort)
        centre = S.materialize(centre)

        # 2. Deviation scores, O(m d).
        point = reference if (score == "reference" and reference is not None) else centre
        diff = x - point[None, :]
        sq = jnp.einsum("id,id->i", diff, diff, precision=lax.Precision.HIGHEST)
        usable = valid & jnp.isfinite(sq)
        dist = jnp.where(usable, jnp.sqrt(jnp.where(usable, sq, 0.0)), jnp.inf)
        if normalize_score:
            norm = jnp.sqrt(jnp.sum(point * point))
            dist = dist / jnp.where(norm > 0, norm, 1.0)

        # 3. Keep.
        if keep == "k_minus_f":
            rank = S.ranks(dist, usable)
            kept = usable & (rank < m - f)
        else:
            limit = jnp.asarray(rho, jnp.float32)
            if keep == "threshold":
                med = S.median_of_sorted(S.sorted_rows(S.prepare(dist[:, None], valid), sort), m, even)
                limit = limit * med[0]
            kept = usable & (dist <= limit)

        # 4. Mean of the kept rows (zero weights mask non-finite rows exactly).
        count = jnp.sum(kept.astype(jnp.int32))
        w = kept.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)
        out = jnp.where(count > 0, S.weighted_row_sum(w, x), centre)
        return out, state

    if ensemble == "median_with_reference":
        req = A._requirement("dstar", "n >= 2f", lambda n, f: n >= 2 * f)
    else:
        req = A._requirement("dstar", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1)
    if subset_size is not None and ensemble == "subset_medians":
        sv = A._concrete(subset_size)
        base = req

        def req(n, f):
            if sv is not None and n >= 1 and sv > n:
                return f"dstar subset_size={sv} exceeds the n={n} valid inputs"
            return base(n, f)

    return A.AggregationRule(name="dstar", apply=apply, requirement=req, needs_reference=True)


A.AGGREGATORS.register(
    "dstar",
    "dSTAR filter (reconstruction): mean of the k - f first-k responders closest to an ensemble "
    "median of the responders and the server's validation gradient.",
    "Yan, Chaudhari, Kleinrock, arXiv:2412.07151, 2024 (reconstruction from the abstract)",
)(dstar)

__all__ = ["dstar", "subset_masks"]
