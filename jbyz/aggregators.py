"""Robust aggregation rules ``[n, d] -> [d]`` and their registry.

Every factory returns a :class:`jbyz.types.AggregationRule` whose ``apply`` is

``apply(x [n, d], valid [n] bool, f int32[], key, state) -> (out [d] float32, new_state)``.

Conventions shared by all rules:

* ``n`` (the number of worker slots) is static; the number of *valid* rows ``m = sum(valid)``
  and the declared number of Byzantine inputs ``f`` are traced, so one compiled program serves
  every ``f`` and every participation pattern. Invalid rows never influence the result (whatever
  they contain): ``agg(pad(x), valid) == agg(x)``. In formulas below ``n`` means ``m``.
* Hyper-parameters that are numbers (``tau``, ``nu``, ``b``, ``m``) may be JAX arrays, so a grid
  can ``vmap`` over them; hyper-parameters that change shapes or code (iteration counts,
  variants) are Python values.
* Aggregation happens in float32.
* Factories are memoised on hashable hyper-parameters: building the same configuration twice
  returns the same object, so ``jax.jit(agg.apply)`` hits the same compilation cache (no
  recompilation when a pipeline rebuilds its aggregator). Array hyper-parameters bypass the
  cache.
* ``requirement(n, f)`` returns ``None`` or a message such as
  ``"krum needs n >= 2f + 3 valid inputs; got n=7, f=3 (largest valid f is 2)"``; it is checked on
  the host. Inside a kernel, configurations that violate it give unspecified (possibly NaN)
  output.

Non-finite inputs (a Byzantine worker may send NaN or +/-inf). The policy:

* Coordinate-wise rules (``median``, ``trimmed_mean``, ``meamed``, ``phocas`` and the last stage
  of ``bulyan``) treat NaN as ``+inf`` in each coordinate; ``+/-inf`` are ordinary extreme
  values. A coordinate's output is finite as long as the rule discards every non-finite value,
  e.g. at most ``f`` non-finite values per coordinate for the trimmed mean with ``b = f``.
* Distance-based rules (``krum``, ``multi_krum``, ``bulyan``'s selection, ``mda``) call a row
  *unusable* if its squared norm is not finite (any NaN/inf, or overflow beyond ~1e19 per
  entry); an unusable row is at ``+inf`` distance from every row, so it gets an infinite score
  and is never selected while enough usable rows remain.
* Weighted rules (``geometric_median``, ``centered_clip``) give unusable rows zero weight:
  ``geometric_median`` runs on the usable rows only; in ``centered_clip`` an unusable row's
  clipped difference counts as 0 (as if it had sent the current centre), still divided by ``m``.
* ``mean`` is not robust and is poisoned by a non-finite valid row, by definition.

Speed notes (XLA:CPU, see ``jbyz/_sorting.py`` for the measurements): coordinate-wise rules sort
with an unrolled sorting network over the static worker axis (tile by tile over the columns from
24 workers on, a bitonic network beyond 128); sums over the worker axis are
unrolled, select-guarded row sums; the Krum family, Bulyan, MDA and the geometric median use one
Gram matmul; iterative rules run a static number of iterations (never a ``while_loop``), so every
rule is reverse-mode differentiable.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from jbyz.aggregators import AGGREGATORS
    >>> agg = AGGREGATORS.build("trimmed_mean")
    >>> x = jnp.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [1e9, -1e9]])
    >>> out, state = agg(x, jnp.ones(4, bool), f=1, key=jax.random.key(0))
    >>> out.tolist()
    [1.5, 1.5]
"""

from __future__ import annotations

import math

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax

from jbyz import _sorting as S
from jbyz._rule_checks import SubsetEnumeration
from jbyz._rule_checks import check_number as _check_number
from jbyz._rule_checks import choice as _choice
from jbyz._rule_checks import inputs as _inputs
from jbyz._rule_checks import requirement as _requirement
from jbyz.registry import Registry
from jbyz.registry import concrete_number as _concrete
from jbyz.types import AggregationRule

Array = jax.Array

AGGREGATORS = Registry("aggregator")


# --------------------------------------------------------------------------------------------
# Helpers


def memoize(factory):
    """Caches a factory's result per (normalised, hashable) arguments; see the module docstring."""
    cache: dict = {}
    sig = inspect.signature(factory)

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return factory(*args, **kwargs)  # let the factory raise its own error
        bound.apply_defaults()
        key = tuple((k, type(v), v) for k, v in bound.arguments.items())
        try:
            hash(key)
        except TypeError:  # arrays, tracers
            return factory(*args, **kwargs)
        if key not in cache:
            cache[key] = factory(*args, **kwargs)
        return cache[key]

    return wrapper


def _check_sort(rule: str, sort) -> None:
    _choice(rule, "sort", sort, (None, "network", "bitonic", "sort"))


def _make(name, apply, requirement, init=None) -> AggregationRule:
    kw = {} if init is None else {"init": init}
    return AggregationRule(name=name, apply=apply, requirement=requirement, **kw)


def _sorted(x, valid, method):
    return S.sorted_rows(S.prepare(x, valid), method)


# --------------------------------------------------------------------------------------------
# Mean


@AGGREGATORS.register("mean", "Arithmetic mean of the valid inputs (not robust).", "-")
@memoize
def mean() -> AggregationRule:
    r"""Arithmetic mean of the valid rows.

    .. math:: \mathrm{out} = \frac{1}{n} \sum_{i \text{ valid}} x_i

    Not robust: one input can move it arbitrarily, and a NaN/inf valid row poisons it.

    Returns:
      An :class:`~jbyz.types.AggregationRule`; ``apply(x [n, d], valid [n], f, key, state)`` returns
      ``([d], ())``.
    """

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        w = valid.astype(jnp.float32) / m.astype(jnp.float32)
        return S.weighted_row_sum(w, x), state

    return _make("mean", apply, _requirement("mean", "n >= 1", lambda n, f: n >= 1))


# --------------------------------------------------------------------------------------------
# Coordinate-wise rules


@AGGREGATORS.register(
    "median",
    "Coordinate-wise median (even count: mean of the two middles, or the lower as torch).",
    "Yin, Chen, Ramchandran, Bartlett, ICML 2018",
)
@memoize
def median(even: str = "mean", sort: str | None = None) -> AggregationRule:
    r"""Coordinate-wise median (CM).

    .. math:: \mathrm{out}_k = \mathrm{median}\{x_{1k}, \dots, x_{nk}\}

    For an even count the median is the average of the two middle values (``even="mean"``, as
    ``jnp.median``) or the lower middle value (``even="lower"``, as ``torch.median``, used by the
    ByzantineMomentum code). NaN counts as ``+inf``. Robust while fewer than half the inputs are
    Byzantine.

    Args:
      even: ``"mean"`` or ``"lower"``.
      sort: sorting method for the worker axis (``None``: chosen by ``n``; see ``_sorting``).

    Returns:
      An :class:`~jbyz.types.AggregationRule`.

    References:
      Yin, Chen, Ramchandran, Bartlett. Byzantine-robust distributed learning: towards optimal
      statistical rates. ICML 2018.
    """
    _choice("median", "even", even, ("mean", "lower"))
    _check_sort("median", sort)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        out = S.columnwise(lambda xb: S.median_of_sorted(_sorted(xb, valid, sort), m, even), x)
        return out, state

    return _make("median", apply, _requirement("median", "n >= 1", lambda n, f: n >= 1))


@AGGREGATORS.register(
    "trimmed_mean",
    "Coordinate-wise trimmed mean: drop the b smallest and b largest values (b = f).",
    "Yin, Chen, Ramchandran, Bartlett, ICML 2018",
)
@memoize
def trimmed_mean(b=None, sort: str | None = None) -> AggregationRule:
    r"""Coordinate-wise trimmed mean (TM).

    Per coordinate, sort the ``n`` values, drop the ``b`` smallest and the ``b`` largest and
    average the remaining ``n - 2b``:

    .. math:: \mathrm{out}_k = \frac{1}{n - 2b} \sum_{r=b}^{n-b-1} x_{(r)k}

    Args:
      b: number trimmed on each side; ``None`` means ``b = f`` (traced). An int or an int array
        (for a vmapped grid). Needs ``n > 2b``.
      sort: sorting method for the worker axis (``None``: chosen by ``n``).

    Returns:
      An :class:`~jbyz.types.AggregationRule`.

    References:
      Yin, Chen, Ramchandran, Bartlett. Byzantine-robust distributed learning: towards optimal
      statistical rates. ICML 2018.
    """
    _check_sort("trimmed_mean", sort)
    if b is not None:
        _check_number("trimmed_mean", "b", b, low=0, integer=True)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        bb = f if b is None else jnp.asarray(b, jnp.int32)
        out = S.columnwise(lambda xb: S.rank_range_mean(_sorted(xb, valid, sort), bb, m - bb), x)
        return out, state

    if b is None:
        req = _requirement("trimmed_mean", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1)
    else:
        bv = _concrete(b)

        def req(n, f):
            if bv is None or n > 2 * bv:
                return None
            return (
                f"trimmed_mean needs n > 2b valid inputs; got n={n}, b={bv} "
                f"(largest valid b is {(n - 1) // 2})"
            )

    return _make("trimmed_mean", apply, req)


def _closest_to_centre(centre_fn, sort):
    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)

        def columns(xb):
            rows = _sorted(xb, valid, sort)
            return S.window_mean(rows, m, m - f, centre_fn(rows, m, f))

        return S.columnwise(columns, x), state

    return apply


@AGGREGATORS.register(
    "meamed",
    "Mean-around-median: per coordinate, average the n - f values closest to the median.",
    "Xie, Koyejo, Gupta, arXiv:1802.10116, 2018",
)
@memoize
def meamed(even: str = "mean", sort: str | None = None) -> AggregationRule:
    r"""Mean around the median (MeaMed).

    Per coordinate, the average of the ``n - f`` values closest to the coordinate-wise median:

    .. math:: \mathrm{out}_k = \frac{1}{n-f} \sum_{i \in N_k} x_{ik},\quad
              N_k = \operatorname{arg\,min}_{|N| = n - f} \sum_{i\in N} |x_{ik} - \mathrm{med}_k|

    Args:
      even: median convention for an even count, ``"mean"`` or ``"lower"`` (``torch.median``, as
        the ByzantineMomentum code).
      sort: sorting method for the worker axis.

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 1``.

    References:
      Xie, Koyejo, Gupta. Generalized Byzantine-tolerant SGD. arXiv:1802.10116, 2018.
    """
    _choice("meamed", "even", even, ("mean", "lower"))
    _check_sort("meamed", sort)
    apply = _closest_to_centre(lambda rows, m, f: S.median_of_sorted(rows, m, even), sort)
    return _make(
        "meamed", apply, _requirement("meamed", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1)
    )


@AGGREGATORS.register(
    "phocas",
    "Phocas: per coordinate, average the n - f values closest to the trimmed mean (b = f).",
    "Xie, Koyejo, Gupta, arXiv:1805.09682, 2018",
)
@memoize
def phocas(sort: str | None = None) -> AggregationRule:
    r"""Phocas.

    Per coordinate, the average of the ``n - f`` values closest to the coordinate-wise trimmed
    mean with ``b = f``.

    Args:
      sort: sorting method for the worker axis.

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 1``.

    References:
      Xie, Koyejo, Gupta. Phocas: dimensional Byzantine-resilient stochastic gradient descent.
      arXiv:1805.09682, 2018.
    """
    _check_sort("phocas", sort)
    apply = _closest_to_centre(lambda rows, m, f: S.rank_range_mean(rows, f, m - f), sort)
    return _make(
        "phocas", apply, _requirement("phocas", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1)
    )


# --------------------------------------------------------------------------------------------
# Variance-norm bounds (El Mhamdi, Guerraoui, Rouault, ICLR 2021, Sec. 3 and App. A)


def variance_norm_bound(rule: str, n: int, f: int) -> float | None:
    r"""The largest variance-norm ratio :math:`\sqrt{r}` under which a rule's guarantee holds.

    For Krum, Multi-Krum and Bulyan (their Lemma / Blanchard et al.'s condition, as the
    authors' code ``aggregators/krum.py`` and ``bulyan.py`` compute it)

    .. math:: \kappa = \Big(2\big(n - f + \tfrac{f\,(n + f(n - f - 2) - 2)}{n - 2f - 2}\big)\Big)^{-1/2}

    and for the coordinate-wise median :math:`\kappa = 1/\sqrt{n - f}`; ``n`` counts every
    worker (Byzantine included) and ``f`` is the declared count. Other rules: ``None`` (no bound
    stated). A step "satisfies the bound" when :func:`jbyz.simulate.variance_norm_ratio`
    :math:`r < \kappa^2`.
    """
    n, f = int(n), int(f)
    if rule in ("krum", "multi_krum", "bulyan"):
        if n - 2 * f - 2 <= 0:
            return None
        return 1.0 / math.sqrt(2.0 * (n - f + f * (n + f * (n - f - 2) - 2) / (n - 2 * f - 2)))
    if rule == "median":
        return 1.0 / math.sqrt(n - f)
    return None


# --------------------------------------------------------------------------------------------
# Krum family


def _krum_scores(d2, usable, m, f, distance: str, neighbours: str, pool=None):
    """Krum scores ``[n]`` and their tie-break.

    ``score_i`` sums the distances to the ``k`` nearest other rows of ``pool`` (default: the
    usable rows); ``k = m - f - 2`` (paper) or ``m - f - 1`` (code). The tie-break is the sum of
    the finite distances to all other rows of the pool. Unusable rows score ``+inf``.
    """
    n = d2.shape[0]
    eye = jnp.eye(n, dtype=bool)
    dist = jnp.where(eye, jnp.inf, d2)
    if pool is not None:
        dist = jnp.where(pool[None, :], dist, jnp.inf)
    if distance == "euclidean":
        dist = jnp.sqrt(dist)
    k = m - f - (2 if neighbours == "paper" else 1)
    srt = jnp.sort(dist, axis=1)
    take = jnp.arange(n)[None, :] < k
    score = jnp.sum(jnp.where(take, srt, 0.0), axis=1)
    tiebreak = jnp.sum(jnp.where(jnp.isfinite(dist), dist, 0.0), axis=1)
    return jnp.where(usable, score, jnp.inf), tiebreak


def _krum_options(rule, distance, neighbours):
    _choice(rule, "distance", distance, ("squared", "euclidean"))
    _choice(rule, "neighbours", neighbours, ("paper", "code"))


def _krum_requirement(rule):
    return _requirement(rule, "n >= 2f + 3", lambda n, f: n >= 2 * f + 3)


@AGGREGATORS.register(
    "krum",
    "Krum: the input with the smallest sum of distances to its n - f - 2 nearest neighbours.",
    "Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017",
)
@memoize
def krum(distance: str = "squared", neighbours: str = "paper") -> AggregationRule:
    r"""Krum.

    .. math:: s_i = \sum_{j \in N_i} \|x_i - x_j\|^2,\qquad \mathrm{out} = x_{\arg\min_i s_i}

    where :math:`N_i` holds the ``n - f - 2`` nearest other inputs. Distances come from one Gram
    matmul (``precision="highest"``, clamped at 0).

    Args:
      distance: ``"squared"`` (paper) or ``"euclidean"`` (ByzantineMomentum code).
      neighbours: ``"paper"`` (``n - f - 2``) or ``"code"`` (``n - f - 1``, ByzantineMomentum).

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 3``. Exact score ties (e.g. both ends
      of the closest pair when one neighbour counts) go to the row with the smaller sum of
      distances to all others, then the lower index, so the rule is permutation invariant.

    Example::

      >>> agg = krum()
      >>> x = jnp.array([[0.0], [1.0], [1.5], [3.0], [50.0]])
      >>> agg(x, jnp.ones(5, bool), f=1, key=jax.random.key(0))[0].tolist()
      [1.0]

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer. Machine learning with adversaries: Byzantine
      tolerant gradient descent. NeurIPS 2017.
    """
    _krum_options("krum", distance, neighbours)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        d2, usable = S.pairwise_sq_distances(x, valid)
        score, tie = _krum_scores(d2, usable, m, f, distance, neighbours)
        i = S.argmin_preferring(score, valid, tie)
        return lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False), state

    return _make("krum", apply, _krum_requirement("krum"))


@AGGREGATORS.register(
    "multi_krum",
    "Multi-Krum: average of the m inputs with the best Krum scores (m = n - f - 2).",
    "Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017; "
    "El Mhamdi, Guerraoui, Rouault, ICLR 2021",
)
@memoize
def multi_krum(m=None, distance: str = "squared", neighbours: str = "paper") -> AggregationRule:
    r"""Multi-Krum.

    The average of the ``m`` inputs with the smallest Krum scores (see :func:`krum`).

    Args:
      m: number of inputs averaged; ``None`` means ``n - f - 2`` (traced, the ByzantineMomentum
        default); an int or int array otherwise (``m = 1`` is Krum).
      distance: ``"squared"`` (paper) or ``"euclidean"`` (ByzantineMomentum code).
      neighbours: ``"paper"`` (``n - f - 2``) or ``"code"`` (``n - f - 1``).

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 3`` and ``1 <= m <= n - f``.

    References:
      Blanchard et al. NeurIPS 2017; El Mhamdi, Guerraoui, Rouault. Distributed momentum for
      Byzantine-resilient stochastic gradient descent. ICLR 2021.
    """
    _krum_options("multi_krum", distance, neighbours)
    if m is not None:
        _check_number("multi_krum", "m", m, low=1, integer=True)

    def apply(x, valid, f, key, state):
        x, valid, f, nv = _inputs(x, valid, f)
        d2, usable = S.pairwise_sq_distances(x, valid)
        score, tie = _krum_scores(d2, usable, nv, f, distance, neighbours)
        count = nv - f - 2 if m is None else jnp.asarray(m, jnp.int32)
        sel = (S.ranks(score, valid, tie) < count) & usable
        w = sel.astype(jnp.float32) / jnp.sum(sel).astype(jnp.float32)
        return S.weighted_row_sum(w, x), state

    base = _krum_requirement("multi_krum")
    mv = None if m is None else _concrete(m)

    def req(n, f):
        msg = base(n, f)
        if msg is None and mv is not None and mv > n - f:
            return f"multi_krum needs m <= n - f; got m={mv}, n={n}, f={f}"
        return msg

    return _make("multi_krum", apply, req)


# --------------------------------------------------------------------------------------------
# Bulyan


def _bulyan_classic_selection(d2, usable, valid, m, f, distance):
    """Recursive Krum: ``theta = m - 2f`` picks, scores recomputed on the remaining set.

    Each row's neighbours are sorted once; an iteration ranks the still-remaining neighbours
    with a cumulative sum (``O(n^2)``; re-sorting every iteration was 8-10x slower at n = 51).
    """
    n = d2.shape[0]
    eye = jnp.eye(n, dtype=bool)
    dist = jnp.where(eye, jnp.inf, d2)
    if distance == "euclidean":
        dist = jnp.sqrt(dist)
    order = jnp.argsort(dist, axis=1, stable=True)
    srt = jnp.take_along_axis(dist, order, axis=1)
    finite = jnp.where(jnp.isfinite(dist), dist, 0.0)
    theta = m - 2 * f
    idx = jnp.arange(n)

    def body(t, carry):
        remaining, chosen = carry
        r = jnp.sum(remaining.astype(jnp.int32))
        k = jnp.maximum(r - f - 2, 1)
        in_r = remaining[order]  # [n, n]: is the j-th nearest neighbour of i still there
        rank = jnp.cumsum(in_r.astype(jnp.int32), axis=1)
        take = in_r & (rank <= k)
        score = jnp.where(usable, jnp.sum(jnp.where(take, srt, 0.0), axis=1), jnp.inf)
        tie = jnp.sum(jnp.where(remaining[None, :], finite, 0.0), axis=1)
        best = S.argmin_preferring(score, remaining, tie)
        hit = (idx == best) & (t < theta)
        return remaining & ~hit, chosen | hit

    _, chosen = lax.fori_loop(0, n, body, (valid, jnp.zeros((n,), bool)))
    return chosen, theta


def _bulyan_multikrum_rows(x, d2, usable, valid, m, f, distance):
    """ByzantineMomentum's Bulyan selection: suffix averages of the Multi-Krum ranking.

    Returns ``(z, suffix_means, theta)``: ``z [n, d]`` holds the inputs in ranking order and
    ``suffix_means(z_block)`` gives the ``n`` selected rows (``i < theta`` are used) for a block of
    its columns, so the coordinate-wise stage can run tile by tile.
    """
    n = x.shape[0]
    score, tie = _krum_scores(d2, usable, m, f, distance, "paper")
    rank = S.ranks(score, valid, tie)
    order = jnp.zeros((n,), jnp.int32).at[rank].set(jnp.arange(n, dtype=jnp.int32))
    m_max = m - f - 2
    theta = m - 2 * f - 2
    z = jnp.take(x, order, axis=0)
    count = jnp.maximum(m_max - jnp.arange(n), 1).astype(jnp.float32)

    def suffix_means(zb):
        if n <= S.NETWORK_MAX_N:
            # An unrolled chain of row sums: XLA fuses it with the sorting network (one pass).
            acc = jnp.zeros((zb.shape[1],), jnp.float32)
            out = [None] * n
            for r in reversed(range(n)):
                acc = acc + jnp.where(r < m_max, zb[r], 0.0)
                out[r] = acc / count[r]
            return out
        # Beyond the network's range the rows are stacked for the bitonic sort, and XLA would
        # recompute the chain for every row (n = 200: 128 s to compile); a cumulative sum
        # compiles in ~20 s and runs faster.
        zb = jnp.where((jnp.arange(n) < m_max)[:, None], zb, 0.0)
        suffix = jnp.cumsum(zb[::-1], axis=0)[::-1] / count[:, None]
        return [suffix[i] for i in range(n)]

    return z, suffix_means, theta


@AGGREGATORS.register(
    "bulyan",
    "Bulyan: n - 2f recursive Krum picks, then per coordinate the mean of the n - 4f closest "
    "to their median.",
    "El Mhamdi, Guerraoui, Rouault, ICML 2018",
)
@memoize
def bulyan(
    variant: str = "classic",
    distance: str | None = None,
    even: str | None = None,
    sort: str | None = None,
) -> AggregationRule:
    r"""Bulyan.

    ``variant="classic"`` (the paper): starting from all inputs ``R``, pick the Krum winner of
    ``R`` (scores recomputed on ``R`` with ``max(|R| - f - 2, 1)`` neighbours) and move it to the
    selection ``S``, ``theta = n - 2f`` times. Then per coordinate, average the
    ``beta = theta - 2f`` values of ``S`` closest to the coordinate-wise median of ``S``.

    ``variant="multikrum"`` (the ByzantineMomentum code of El Mhamdi et al.): rank the inputs once
    by Multi-Krum score (Euclidean distances, ``n - f - 2`` neighbours); the ``i``-th selected
    vector (``i < n - 2f - 2``) is the average of the inputs ranked ``i .. n - f - 3`` (the code's
    score update after each pick is a no-op); then per coordinate, average the ``n - 4f - 2``
    selected values closest to their lower median (``torch.median``).

    Args:
      variant: ``"classic"`` or ``"multikrum"``.
      distance: Krum distance, ``"squared"`` or ``"euclidean"``; ``None``: ``"squared"`` for
        ``classic``, ``"euclidean"`` for ``multikrum``.
      even: median convention, ``"mean"`` or ``"lower"``; ``None``: ``"mean"`` for ``classic``,
        ``"lower"`` for ``multikrum``.
      sort: sorting method for the worker axis.

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 4f + 3``.

    References:
      El Mhamdi, Guerraoui, Rouault. The hidden vulnerability of distributed learning in
      Byzantium. ICML 2018.
    """
    _choice("bulyan", "variant", variant, ("classic", "multikrum"))
    if distance is None:
        distance = "squared" if variant == "classic" else "euclidean"
    if even is None:
        even = "mean" if variant == "classic" else "lower"
    _choice("bulyan", "distance", distance, ("squared", "euclidean"))
    _choice("bulyan", "even", even, ("mean", "lower"))
    _check_sort("bulyan", sort)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        d2, usable = S.pairwise_sq_distances(x, valid)
        if variant == "classic":
            chosen, theta = _bulyan_classic_selection(d2, usable, valid, m, f, distance)
            get_rows = lambda xb: _sorted(xb, chosen, sort)  # noqa: E731
            source = x
        else:
            source, suffix_means, theta = _bulyan_multikrum_rows(
                x, d2, usable, valid, m, f, distance
            )
            keep = jnp.arange(x.shape[0]) < theta
            get_rows = lambda zb: S.sorted_rows(  # noqa: E731
                S.prepare_rows(suffix_means(zb), keep), sort
            )

        def columns(xb):
            rows = get_rows(xb)
            c = S.median_of_sorted(rows, theta, even)
            return S.window_mean(rows, theta, theta - 2 * f, c)

        return S.columnwise(columns, source), state

    return _make(
        "bulyan", apply, _requirement("bulyan", "n >= 4f + 3", lambda n, f: n >= 4 * f + 3)
    )


# --------------------------------------------------------------------------------------------
# Geometric median


@AGGREGATORS.register(
    "geometric_median",
    "Geometric median by smoothed Weiszfeld (RFA), fixed iterations.",
    "Pillutla, Kakade, Harchaoui, IEEE TSP 2022",
)
@memoize
def geometric_median(iters: int = 8, nu=0.1, start: str = "median") -> AggregationRule:
    r"""Geometric median (RFA) by the smoothed Weiszfeld algorithm.

    Approximates :math:`\arg\min_z \sum_i \alpha_i \|z - x_i\|` with ``alpha_i = 1/n`` by ``T``
    iterations of

    .. math:: \beta_i = \frac{\alpha_i}{\max(\nu, \|z - x_i\|)},\qquad
              z \leftarrow \frac{\sum_i \beta_i x_i}{\sum_i \beta_i}

    The iterations run on ``n x n`` quantities: with ``y_i = x_i - z_0`` and ``G = Y Y^T``
    (:func:`jbyz._sorting.gram`, by column tiles), ``z_t = z_0 + \sum_j w_j y_j`` and ``\|z_t - x_i\|^2 = G_ii - 2 (G w)_i + w^T G w``;
    only the final ``z_T = \sum_j w_j x_j`` touches ``d``-vectors again. Unusable (non-finite)
    rows get ``alpha_i = 0``.

    Args:
      iters: number of Weiszfeld iterations ``T`` (static; 8 as VR_Byzantine, 3 as Karimireddy
        et al. 2021 CIFAR).
      nu: smoothing ``nu > 0`` (float or array).
      start: ``z_0``: ``"median"`` (coordinate-wise median, default), ``"mean"`` or ``"zero"``
        (the reference code).

    Returns:
      An :class:`~jbyz.types.AggregationRule`.

    References:
      Pillutla, Kakade, Harchaoui. Robust aggregation for federated learning. IEEE TSP 2022;
      Chen, Su, Xu. Distributed statistical machine learning in adversarial settings. 2017.
    """
    _choice("geometric_median", "start", start, ("median", "mean", "zero"))
    _check_number("geometric_median", "iters", iters, low=0, integer=True)
    _check_number("geometric_median", "nu", nu, low=0, low_open=True)
    iters = int(iters)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        if start == "median":
            z0 = S.columnwise(lambda xb: S.median_of_sorted(_sorted(xb, valid, None), m, "mean"), x)
        elif start == "mean":
            sq = jnp.einsum("id,id->i", x, x, precision=lax.Precision.HIGHEST)
            ok = (valid & jnp.isfinite(sq)).astype(jnp.float32)
            z0 = S.weighted_row_sum(ok / jnp.sum(ok), x)
        else:
            z0 = jnp.zeros((x.shape[1],), jnp.float32)
        if iters == 0:
            return z0, state
        g = S.gram(x, S.materialize(z0))  # (x - z0)(x - z0)^T, column tile by tile
        usable = valid & jnp.isfinite(jnp.diagonal(g))
        alpha = usable.astype(jnp.float32)
        g = jnp.where(usable[:, None] & usable[None, :], g, 0.0)
        gd = jnp.diagonal(g)
        nu_ = jnp.asarray(nu, jnp.float32)

        def body(t, w):
            gw = g @ w
            d2 = jnp.maximum(gd - 2.0 * gw + jnp.dot(w, gw), 0.0)
            beta = alpha / jnp.maximum(nu_, jnp.sqrt(d2))
            return beta / jnp.sum(beta)

        w = lax.fori_loop(0, iters, body, jnp.zeros_like(alpha))
        return S.weighted_row_sum(w, x), state

    return _make(
        "geometric_median",
        apply,
        _requirement("geometric_median", "n >= 1", lambda n, f: n >= 1),
    )


# --------------------------------------------------------------------------------------------
# Centered clipping


@AGGREGATORS.register(
    "centered_clip",
    "Centered clipping: L steps v <- v + mean_i clip_tau(x_i - v) from the previous aggregate.",
    "Karimireddy, He, Jaggi, ICML 2021",
)
@memoize
def centered_clip(tau=0.1, iters: int = 1, start: str = "previous") -> AggregationRule:
    r"""Centered clipping (CC).

    Starting from the centre ``v`` (the previous aggregate, kept in the state), repeat ``L``
    times

    .. math:: v \leftarrow v + \frac{1}{n}\sum_i \mathrm{clip}_\tau(x_i - v),\qquad
              \mathrm{clip}_\tau(y) = y \min\!\left(1, \frac{\tau}{\|y\|}\right)

    so each iteration moves the centre by at most ``tau``. With ``u = v - v_0 = \sum_j c_j y_j``
    and ``y_j = x_j - v_0``, the distances of later iterations come from the Gram matrix of ``y``
    (:func:`jbyz._sorting.gram`); ``L = 1`` needs only the row norms. An unusable (non-finite)
    row's clipped difference is 0.

    Args:
      tau: clipping radius ``tau > 0`` (float or array; 0.1 in ByzSGDnm, 100 in Karimireddy et
        al.'s CIFAR script).
      iters: number of clipping iterations ``L`` (static, default 1).
      start: ``"previous"``: start from the previous aggregate (state; initially 0, as the
        reference code); ``"zero"``: start every step from 0 (stateless).

    Returns:
      An :class:`~jbyz.types.AggregationRule`; with ``start="previous"`` its state is the last
      aggregate ``[d]`` (``init(n, d)`` gives zeros; a ``()`` state is read as zeros).

    Example::

      >>> agg = centered_clip(tau=1.0)
      >>> x = jnp.array([[3.0, 0.0], [0.0, 4.0]])
      >>> out, state = agg(x, jnp.ones(2, bool), f=0, key=None, state=agg.init(2, 2))
      >>> out.tolist()  # each difference clipped to norm 1, then averaged
      [0.5, 0.5]

    References:
      Karimireddy, He, Jaggi. Learning from history for Byzantine robust optimization. ICML 2021.
    """
    _choice("centered_clip", "start", start, ("previous", "zero"))
    _check_number("centered_clip", "iters", iters, low=1, integer=True)
    _check_number("centered_clip", "tau", tau, low=0, low_open=True)
    iters = int(iters)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        d = x.shape[1]
        if start == "previous" and not (isinstance(state, tuple) and state == ()):
            v0 = jnp.asarray(state, jnp.float32)
        else:
            v0 = jnp.zeros((d,), jnp.float32)
        tau_ = jnp.asarray(tau, jnp.float32)
        inv_m = 1.0 / m.astype(jnp.float32)
        y = x - v0[None, :]
        if iters == 1:
            yy = jnp.einsum("id,id->i", y, y, precision=lax.Precision.HIGHEST)
            usable = valid & jnp.isfinite(yy)
            norm = jnp.sqrt(jnp.where(usable, yy, 0.0))
            scale = jnp.minimum(1.0, tau_ / jnp.where(norm > 0, norm, 1.0))
            c = jnp.where(usable, scale * inv_m, 0.0)
        else:
            g = S.gram(x, v0)
            usable = valid & jnp.isfinite(jnp.diagonal(g))
            g = jnp.where(usable[:, None] & usable[None, :], g, 0.0)
            gd = jnp.diagonal(g)

            def body(t, c):
                gc = g @ c
                d2 = jnp.maximum(gd - 2.0 * gc + jnp.dot(c, gc), 0.0)
                norm = jnp.sqrt(d2)
                scale = jnp.minimum(1.0, tau_ / jnp.where(norm > 0, norm, 1.0))
                w = jnp.where(usable, scale * inv_m, 0.0)
                return (1.0 - jnp.sum(w)) * c + w

            c = lax.fori_loop(0, iters, body, jnp.zeros((x.shape[0],), jnp.float32))
        # Summing over x instead, (1 - sum c) v0 + sum c_i x_i, made the kernel alone 2.7-3.8x
        # faster at d = 1e6 but a training step slower (Fashion-MNIST MLP, n = 10: 1.49 -> 1.73x
        # the bare-gradient floor; n = 51: 1.55 -> 1.81x), so the differences are summed.
        out = v0 + S.weighted_row_sum(c, y)
        return out, (out if start == "previous" else state)

    def init(n, d):
        return jnp.zeros((d,), jnp.float32) if start == "previous" else ()

    return _make(
        "centered_clip",
        apply,
        _requirement("centered_clip", "n >= 1", lambda n, f: n >= 1),
        init=init,
    )


# --------------------------------------------------------------------------------------------
# Minimum-diameter averaging


@AGGREGATORS.register(
    "mda",
    "Minimum-diameter averaging: mean of the n - f inputs whose subset has the smallest diameter.",
    "El Mhamdi, Guerraoui, Rouault, ICLR 2021 (after Rousseeuw 1985)",
)
@memoize
def mda(max_subsets: int = 2**16) -> AggregationRule:
    r"""Minimum-diameter averaging (MDA).

    .. math:: S^\star = \operatorname{arg\,min}_{|S| = n - f}\ \max_{i, j \in S}\|x_i - x_j\|,
              \qquad \mathrm{out} = \frac{1}{n - f}\sum_{i \in S^\star} x_i

    ``f`` and the valid mask stay traced: a conditional (``lax.switch``) on ``k = m - f`` runs
    the branch that enumerates the ``C(n, k)`` subsets of ``k`` of the ``n`` worker slots; the
    subsets made of valid rows compete. Distances from one Gram matmul; subsets with an unusable
    (non-finite) row have infinite diameter.

    Ties: among subsets of exactly equal diameter (common: subsets that share their farthest
    pair), the one with the smallest bitmask :math:`\sum_{i \in S} 2^i` wins, i.e. the subset
    whose largest slot index is smallest, then whose second largest is, and so on
    (colexicographic order on sorted index tuples). Since the valid rows keep their order among
    the slots, this is the same choice whatever the padding.

    Args:
      max_subsets: the largest ``2^n`` allowed (default ``2**16``, i.e. ``n <= 16`` slots); the
        enumeration costs ``O(C(n, k) k^2)`` (0.6 ms a call at ``n = 13``, ``f = 3``,
        ``d = 25,450`` on a shared 2-core CPU; 8.8 ms when all ``2^n`` subsets were scored, as
        until 2026-12-04; under ``vmap`` the conditional runs every branch, i.e. all ``2^n``).

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 1`` and ``2^n <= max_subsets``.

    References:
      El Mhamdi, Guerraoui, Rouault. Distributed momentum for Byzantine-resilient stochastic
      gradient descent. ICLR 2021; Rousseeuw. Multivariate estimation with high breakdown point.
      1985.
    """
    base = _requirement("mda", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1)
    subsets = SubsetEnumeration("mda", max_subsets, base, "time grows as C(n, n - f) (n - f)**2")

    def pick(idx, d2, valid):
        eligible = jnp.all(valid[idx], axis=1)
        diam = jnp.max(d2[idx[:, :, None], idx[:, None, :]], axis=(1, 2))
        # exact ties (common: subsets that share their farthest pair): the smallest bitmask
        return S.argmin_preferring(diam, eligible), jnp.any(eligible)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        d2, usable = S.pairwise_sq_distances(x, valid)
        # only the C(n, m - f) subsets of the size m - f compete, so only they are scored
        sel = subsets.choose(x.shape[0], m - f, pick, d2, valid)
        w = sel.astype(jnp.float32) / jnp.maximum(jnp.sum(sel), 1).astype(jnp.float32)
        return S.weighted_row_sum(w, x), state

    return _make("mda", apply, subsets.requirement)


__all__ = [
    "AGGREGATORS",
    "mean",
    "median",
    "trimmed_mean",
    "meamed",
    "phocas",
    "krum",
    "multi_krum",
    "bulyan",
    "geometric_median",
    "centered_clip",
    "mda",
]


# --------------------------------------------------------------------------------------------
# MoNNA, SMEA, CAF, DnC, FLTrust: the kernels live in jbyz/aggregators_extra.py (which imports
# only _sorting, registry and types, so the dependency points one way); registered here, memoised
# like the rules above, and reachable as jbyz.aggregators.<name>.

from jbyz import aggregators_extra as _extra  # noqa: E402

for _rule in _extra.RULES:
    globals()[_rule.name] = AGGREGATORS.register(_rule.name, _rule.description, _rule.reference)(
        memoize(_rule.factory)
    )
    __all__.append(_rule.name)
del _rule


# --------------------------------------------------------------------------------------------
# dSTAR (registered as "dstar"): the rule lives in jbyz/algorithms/dstar.py, which builds on the
# helpers above and registers itself when imported. The registry imports it on first use of the
# name, so this module never imports it and the dependency points one way.

AGGREGATORS.provided_by("dstar", "jbyz.algorithms.dstar")
