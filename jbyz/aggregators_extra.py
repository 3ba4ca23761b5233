r"""More robust aggregation rules: MoNNA, SMEA, CAF, DnC, FLTrust, SignGuard, clipped clustering.

The same kernel contract as :mod:`jbyz.aggregators` (read its module docstring first): every
factory returns a :class:`jbyz.types.AggregationRule` whose ``apply`` is
``apply(x [n, d], valid [n] bool, f int32[], key, state) -> (out [d] float32, state)``; ``f`` and
the valid mask are traced (one compiled program serves every ``f``); invalid rows never
influence the result; ``requirement(n, f)`` says on the host when a rule cannot run. The rules
are registered in :data:`jbyz.aggregators.AGGREGATORS` (``jbyz list`` shows them), which imports
this module; this module imports only the helpers below it (``_sorting``, ``registry``,
``types``), never :mod:`jbyz.aggregators`, so there is no import cycle.

Non-finite inputs follow the distance-based policy of :mod:`jbyz.aggregators`: a row is
*unusable* when its squared norm (or, for MoNNA, its squared distance to the trusted row) is not
finite; unusable rows get zero weight and are never selected while enough usable rows remain.

Eigen-solves (SMEA, CAF, DnC) work on ``n x n`` matrices built from one Gram matrix of the rows
(:func:`jbyz._sorting.gram`), never on ``d x d`` covariances: for ``Y`` the centred rows, the
non-zero eigenvalues of ``Y^T D Y`` and ``D^{1/2} Y Y^T D^{1/2}`` coincide, and ``Y v`` (the
projections on a top eigenvector ``v``) is proportional to ``Y Y^T D^{1/2} u`` for the top
eigenvector ``u`` of the small matrix. The eigen-solves run under ``stop_gradient``: gradients
(for adaptive attacks) flow through the selected rows and the weights, with the eigen-directions
held fixed.

Semantics follow the peers' code (ByzFL, LPD-EPFL/byzfl at 69bd1ac, for MoNNA, SMEA and CAF;
Blades' engine fedlib, fedlib/fedlib at 8428019, for DnC, SignGuard and clipped clustering; Blades
v0.1.0, lishenghui/blades, for FLTrust); every difference is stated in the rule's docstring. ``tests/data/make_peer_reference.py`` regenerates the
peers' outputs that ``tests/test_aggregators_extra.py`` compares against.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jbyz import _sorting as S
from jbyz._rule_checks import SubsetEnumeration
from jbyz._rule_checks import check_number as _check_number
from jbyz._rule_checks import choice as _choice
from jbyz._rule_checks import inputs as _inputs
from jbyz._rule_checks import requirement as _requirement
from jbyz.registry import ConfigError
from jbyz.registry import concrete_number as _concrete
from jbyz.types import AggregationRule

Array = jax.Array
_HI = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Helpers


def _make(name, apply, requirement, needs_reference=False) -> AggregationRule:
    return AggregationRule(
        name=name, apply=apply, requirement=requirement, needs_reference=needs_reference
    )


def _weighted_mean(keep: Array, x: Array) -> Array:
    """Mean of the rows with ``keep`` (exact zeros elsewhere, so non-finite rows are masked);
    0 when nothing is kept."""
    count = jnp.sum(keep.astype(jnp.float32))
    return S.weighted_row_sum(keep.astype(jnp.float32) / jnp.maximum(count, 1.0), x)


def _median_centre(x: Array, valid: Array, m: Array) -> Array:
    """Coordinate-wise median of the valid rows (non-finite coordinates -> 0): a Gram centre close
    to the honest rows, which keeps the float32 cancellation of centred Gram matrices small."""
    med = S.columnwise(lambda xb: S.median_of_sorted(S.sorted_rows(S.prepare(xb, valid)), m), x)
    return S.materialize(jnp.where(jnp.isfinite(med), med, 0.0))


def _masked_gram(x: Array, valid: Array, centre: Array | None) -> tuple[Array, Array]:
    """``(G [n, n], usable [n])``: the Gram matrix of ``x - centre`` with every entry that involves
    an unusable row (invalid, or non-finite squared norm) set to 0."""
    g = S.gram(x, centre)
    usable = valid & jnp.isfinite(jnp.diagonal(g))
    return jnp.where(usable[:, None] & usable[None, :], g, 0.0), usable


def _centred(g: Array, w: Array) -> Array:
    """``K = (I - 1 w^T) G (I - w 1^T)``: the Gram matrix of the rows minus their ``w``-weighted
    mean (``sum w = 1``), i.e. ``K_ij = <x_i - mu, x_j - mu>``."""
    gw = g @ w
    return g - gw[:, None] - gw[None, :] + jnp.dot(w, gw)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule of this module, as :mod:`jbyz.aggregators` registers it."""

    name: str
    factory: Callable[..., AggregationRule]
    description: str
    reference: str


# --------------------------------------------------------------------------------------------
# MoNNA


def monna(idx: int = -1) -> AggregationRule:
    r"""MoNNA: the mean of the ``n - f`` nearest neighbours of a trusted input.

    .. math:: \mathrm{out} = \frac{1}{n - f}\sum_{i \in N_t} x_i

    where :math:`N_t` holds the ``n - f`` inputs closest (Euclidean) to the trusted input
    :math:`x_t`, itself included. MoNNA is meant for peer-to-peer learning, where each honest node
    aggregates around its own vector.

    The trusted input is the ``idx``-th *valid* row in slot order (negative ``idx`` counts from the
    last valid row), so padding does not move it. The default ``idx = -1`` is the last valid row:
    jbyz places the Byzantine workers in the first slots, so the last valid row is honest whenever
    an honest worker takes part. ByzFL's ``MoNNA(f, idx)`` indexes the input list directly (its
    Byzantine vectors come last, so its ``idx = 0`` is honest); on an unpadded stack
    ``monna(idx=i)`` equals ``MoNNA(f, i)`` for ``i >= 0``. Distance ties go to the lower slot
    (ByzFL's ``argpartition`` leaves them unspecified). Not permutation invariant, by design (it
    depends on which input is trusted).

    Non-finite rows are at infinite distance and never selected; the trusted row is assumed
    finite (if it is not, nothing is selected and the output is 0). Cost ``O(n d)``.

    Args:
      idx: position of the trusted input among the valid rows (Python int or int array).

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 1`` (ByzFL: ``2f < n``) and
      ``-n <= idx < n``.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
      >>> out, _ = monna(idx=1)(x, jnp.ones(3, bool), f=1, key=None)
      >>> out.tolist()  # the trusted row 1 and its nearest neighbour (row 0 wins the tie)
      [2.5, 3.5, 4.5]

    References:
      Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan. Robust collaborative learning with
      linear gradient overhead. ICML 2023.
    """
    _check_number("monna", "idx", idx, integer=True)
    iv = _concrete(idx)
    base = _requirement("monna", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1)

    def req(n, f):
        if iv is not None and n >= 1 and not -n <= iv < n:
            return (
                f"monna: the trusted input idx={iv} does not exist among n={n} valid inputs "
                f"(valid: {-n} <= idx <= {n - 1})"
            )
        return base(n, f)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        i = jnp.asarray(idx, jnp.int32)
        target = jnp.where(i < 0, m + i, i)
        pos = jnp.cumsum(valid.astype(jnp.int32)) - 1
        trusted = valid & (pos == target)
        xt = S.weighted_row_sum(trusted.astype(jnp.float32), x)
        diff = x - S.materialize(xt)[None, :]
        sq = jnp.einsum("id,id->i", diff, diff, precision=_HI)
        usable = valid & jnp.isfinite(sq)
        keep = usable & (S.ranks(sq, usable) < m - f)
        return _weighted_mean(keep, x), state

    return _make("monna", apply, req)


# --------------------------------------------------------------------------------------------
# SMEA


_SMEA_TIE = 1e-5  # relative tolerance under which two subsets' eigenvalues count as tied


def _smea_pick(idx, g, valid, usable):
    """SMEA's choice among the subsets ``idx [C, k]``: ``(position, found)``.

    Each subset is scored by the top eigenvalue of its centred ``k x k`` Gram block over ``k``;
    eligible: every row valid; a subset with an unusable row scores ``+inf``.
    """
    size = idx.shape[1]
    block = g[idx[:, :, None], idx[:, None, :]]  # [C, k, k]
    # k^2 x the centred block, no division before the eigen-solve (exact for integer Gram
    # entries, so exact ties stay ties): K = B - rows/k - cols/k + total/k^2
    rows, cols = jnp.sum(block, axis=2, keepdims=True), jnp.sum(block, axis=1, keepdims=True)
    scaled = size * size * block - size * (rows + cols) + jnp.sum(block, axis=(1, 2), keepdims=True)
    lam = jnp.linalg.eigvalsh(0.5 * (scaled + jnp.swapaxes(scaled, 1, 2)))[:, -1] / size**3
    eligible = jnp.all(valid[idx], axis=1)
    score = jnp.where(jnp.all(usable[idx], axis=1), lam, jnp.inf)
    # Ties: the eigen-solves of exactly tied subsets differ by float32 rounding (relative ~1e-7
    # of the block's trace), so scores within 1e-5 of the best subset's trace over k count as
    # tied and the smallest bitmask among them wins.
    first = S.argmin_preferring(score, eligible)
    trace = jnp.trace(scaled[first]) / size**3
    tied = eligible & (score <= score[first] + _SMEA_TIE * jnp.abs(trace))
    return jnp.argmax(tied), jnp.any(eligible)  # the first tied subset in bitmask order


def smea(max_subsets: int = 2**12) -> AggregationRule:
    r"""SMEA: the mean of the ``(n - f)``-subset whose covariance has the smallest top eigenvalue.

    .. math:: S^\star = \operatorname{arg\,min}_{|S| = n - f}\ \lambda_{\max}(\Sigma_S),\quad
              \Sigma_S = \frac{1}{|S|}\sum_{i\in S}(x_i - \mu_S)(x_i - \mu_S)^T,\quad
              \mathrm{out} = \mu_S^\star = \frac{1}{|S^\star|}\sum_{i\in S^\star} x_i

    The eigenvalue is computed *exactly*: :math:`\lambda_{\max}(\Sigma_S)` is the top eigenvalue
    of the subset's centred ``|S| x |S|`` Gram matrix divided by ``|S|``, here
    :math:`(I - \mathbf{1}\mathbf{1}^T/|S|)\, G_S\, (I - \mathbf{1}\mathbf{1}^T/|S|) / |S|`
    (``G_S`` the subset's block of one Gram matrix of all rows, centred at their coordinate-wise
    median for float32 accuracy), by a batched symmetric eigen-solve. ByzFL's ``SMEA`` instead estimates
    each subset's eigenvalue with one power-method step from a random start, so its choice of
    subset is random and can differ from the exact one.

    ``f`` and the valid mask stay traced: a conditional (``lax.switch``) on ``k = m - f`` runs
    the branch that enumerates the ``C(n, k)`` subsets of ``k`` of the ``n`` worker slots; the
    subsets made of valid rows compete, those with an unusable (non-finite) row lose. Each is
    scored by the top eigenvalue of its own centred ``k x k`` Gram block (formed as ``k^2`` times
    the block, so integer Gram entries stay exact). Ties: scores within ``1e-5`` of the best
    subset's trace (over ``k``) count as tied, since the float32 eigen-solves of exactly tied
    subsets differ by rounding; the first tied subset in bitmask order wins (ByzFL: the first
    in ``itertools.combinations`` order, exact comparison). Cost: ``O(C(n, k) k^3)`` time per
    call, at most ``O(2^n n^3 / sqrt(n))``; measured on a shared 2-core CPU at ``d = 10^4`` and
    ``f = 3``: 1.1 ms a call at ``n = 10``, 2.2 ms at ``n = 12`` and 2.5 ms at ``n = 13``
    (enumerating all ``2^n`` subsets, as until 2026-12-04: 8.7, 35 and 83 ms). Under ``vmap``
    the conditional becomes a select that runs every branch, i.e. all ``2^n`` subsets again.

    Args:
      max_subsets: the largest ``2^n`` allowed (default ``2**12``, i.e. ``n <= 12`` worker
        slots; ``2**16`` allows 16 at about 16x the time and memory).

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 1`` (ByzFL: ``2f < n``) and
      ``2^n <= max_subsets``.

    References:
      Allouah, Guerraoui, Gupta, Pinot, Stephan. On the privacy-robustness-utility trilemma in
      distributed learning. ICML 2023.
    """
    base = _requirement("smea", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1)
    subsets = SubsetEnumeration("smea", max_subsets, base, "time grows as C(n, n - f) (n - f)**3")

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        n = x.shape[0]
        g, usable = _masked_gram(x, valid, _median_centre(x, valid, m))
        # only the C(n, m - f) subsets of the size m - f compete, so only they are scored
        keep = subsets.choose(n, m - f, _smea_pick, lax.stop_gradient(g), valid, usable)
        return _weighted_mean(keep, x), state

    return _make("smea", apply, subsets.requirement)


# --------------------------------------------------------------------------------------------
# CAF


def caf(iters: int | None = None, tau_max: str = "active") -> AggregationRule:
    r"""CAF, the covariance-bound agnostic filter.

    Start from weights :math:`c_i = 1`. While :math:`\sum_i c_i > n - 2f`:

    .. math:: \mu_c = \frac{\sum_i c_i x_i}{\sum_i c_i},\quad
              \Sigma_c = \frac{\sum_i c_i (x_i - \mu_c)(x_i - \mu_c)^T}{\sum_i c_i},\quad
              \tau_i = \big((x_i - \mu_c)^T v\big)^2,\quad
              c_i \leftarrow c_i \Big(1 - \frac{\tau_i}{\max_j \tau_j}\Big)

    with :math:`(\lambda, v)` the top eigenpair of :math:`\Sigma_c`; return the :math:`\mu_c` of
    the iteration whose :math:`\lambda` was smallest (the plain mean when the loop never runs,
    e.g. ``f = 0``; ByzFL returns ``None`` there).

    The eigenpair is computed *exactly*, from the ``n x n`` matrix
    :math:`D^{1/2} K D^{1/2} / \sum c` (``D = diag(c)``, ``K`` the Gram matrix of
    :math:`x_i - \mu_c`) by a symmetric eigen-solve; ByzFL's ``CAF`` takes one power-method step
    from a random start instead, so its weights and its choice are random.

    ``tau_max`` says over which rows :math:`\max_j \tau_j` runs:

    * ``"active"`` (default): the rows whose weight is still positive. Each iteration then zeroes
      at least one remaining row, so the loop ends after at most ``2f`` iterations and a static
      loop of ``n`` iterations (frozen once the weight sum reaches ``n - 2f``) is exact.
    * ``"all"``: every valid row, as ByzFL's code. A row already at weight 0 can keep the largest
      projection; the others then shrink only slowly, and the loop can need thousands of
      iterations (measured on random inputs with ``n <= 15``: a median of 2, but more than ``2n``
      in about a fifth of the cases). It runs ``iters`` iterations at most, so it equals ByzFL's
      loop (with an exact eigenpair) only when that loop ends within ``iters``.

    Unusable (non-finite) rows start at weight 0 (as if already filtered; the stopping rule still
    counts ``n`` valid inputs). When every remaining row projects to 0 the weights stop changing.

    Args:
      iters: the static iteration bound; ``None``: ``n`` (the worker slots), enough for
        ``tau_max="active"``.
      tau_max: ``"active"`` or ``"all"`` (see above).

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 1`` (ByzFL: ``2f < n``).

    References:
      Allouah, Guerraoui, Stephan. Towards trustworthy federated learning with untrusted
      participants. ICML 2025.
    """
    _choice("caf", "tau_max", tau_max, ("active", "all"))
    if iters is not None:
        _check_number("caf", "iters", iters, low=1, integer=True)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        n = x.shape[0]
        t_max = n if iters is None else int(iters)
        g, usable = _masked_gram(x, valid, _median_centre(x, valid, m))
        stop = (m - 2 * f).astype(jnp.float32)
        c0 = usable.astype(jnp.float32)
        w0 = c0 / jnp.maximum(jnp.sum(c0), 1.0)

        def body(t, carry):
            c, best_lam, best_w = carry
            total = jnp.sum(c)
            running = total > stop
            w = c / jnp.maximum(total, 1e-30)
            k = _centred(g, w)
            sc = lax.stop_gradient(jnp.sqrt(c))
            mat = lax.stop_gradient(sc[:, None] * k * sc[None, :] / jnp.maximum(total, 1e-30))
            lams, vecs = jnp.linalg.eigh(0.5 * (mat + mat.T))
            lam = lams[-1]
            proj = k @ (sc * vecs[:, -1])  # proportional to (x_i - mu_c)^T v
            tau = jnp.where(usable, proj * proj, 0.0)
            scope = (c > 0) if tau_max == "active" else usable
            tmax = jnp.max(jnp.where(scope, tau, 0.0))
            ratio = jnp.where(tmax > 0, tau / jnp.where(tmax > 0, tmax, 1.0), 0.0)
            # The maximising rows get exactly 0 (XLA may divide by multiplying with 1 / tmax,
            # which can leave them a weight of ~1e-8 that would keep them "active").
            c_new = jnp.where((tmax > 0) & (tau >= tmax), 0.0, jnp.maximum(c * (1.0 - ratio), 0.0))
            better = running & (lam < best_lam)
            return (
                jnp.where(running, c_new, c),
                jnp.where(better, lam, best_lam),
                jnp.where(better, w, best_w),
            )

        init = (c0, jnp.asarray(jnp.inf, jnp.float32), w0)
        _, _, w = lax.fori_loop(0, t_max, body, init)
        return S.weighted_row_sum(w, x), state

    return _make("caf", apply, _requirement("caf", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1))


# --------------------------------------------------------------------------------------------
# DnC


def dnc(
    sub_dim: int = 10000, iters: int = 5, filter_frac=1.0, combine: str = "intersection"
) -> AggregationRule:
    r"""Divide-and-conquer (DnC): filter by the projection on the top singular vector.

    ``iters`` times: draw ``b = sub_dim`` coordinates at random (without replacement: the ``b``
    largest of ``d`` uniform keys; all of them when ``b >= d``), centre the sub-vectors at their mean :math:`\mu`, take the top right
    singular vector :math:`v` of the centred ``[n, b]`` matrix and the scores
    :math:`s_i = ((x_i - \mu)^T v)^2`; keep the ``n - floor(filter_frac * f)`` inputs with the
    lowest scores. Return the mean of the inputs kept in every iteration (``combine=
    "intersection"``, fedlib) or in any (``"union"``, Blades v0.1.0); 0 if the intersection is
    empty (as fedlib).

    The singular vector comes from the ``n x n`` centred Gram matrix of the sub-vectors (its top
    eigenvector ``u`` gives :math:`s_i \propto (K u)_i^2`). Differences from fedlib's ``DnC``:
    the coordinates come from ``key`` (iteration ``r`` uses ``fold_in(key, r)``; fedlib uses
    torch's global generator), the mean and the Gram matrix use the usable rows only (unusable
    rows score ``+inf`` and are never kept; fedlib's SVD fails on NaN), and score ties go to the
    lower slot. With ``sub_dim >= d`` the rule is deterministic and equals fedlib's.

    Args:
      sub_dim: coordinates drawn per iteration (static; fedlib default 10000).
      iters: iterations (static; fedlib default 5, Blades v0.1.0 1).
      filter_frac: fraction of ``f`` filtered per iteration (float or array; default 1).
      combine: ``"intersection"`` or ``"union"``.

    Returns:
      An :class:`~jbyz.types.AggregationRule`. Needs ``n >= 2f + 1``.

    References:
      Shejwalkar, Houmansadr. Manipulating the Byzantine: optimizing model poisoning attacks and
      defenses for federated learning. NDSS 2021.
    """
    _check_number("dnc", "sub_dim", sub_dim, low=1, integer=True)
    _check_number("dnc", "iters", iters, low=1, integer=True)
    _check_number("dnc", "filter_frac", filter_frac, low=0)
    _choice("dnc", "combine", combine, ("intersection", "union"))
    sub_dim, iters = int(sub_dim), int(iters)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        n, d = x.shape
        sq = jnp.einsum("id,id->i", x, x, precision=_HI)
        usable = valid & jnp.isfinite(sq)
        xu = jnp.where(usable[:, None], x, 0.0)
        w = usable.astype(jnp.float32) / jnp.maximum(jnp.sum(usable), 1).astype(jnp.float32)
        drop = jnp.floor(jnp.asarray(filter_frac, jnp.float32) * f).astype(jnp.int32)
        kept = []
        for r in range(iters):
            if sub_dim >= d:
                xs = xu
            else:
                if key is None:
                    raise ConfigError("dnc(sub_dim < d) draws coordinates: pass a key.")
                # the sub_dim coordinates with the largest uniform keys: a uniform random subset
                # (float32 key ties, ~d^2 / 2^25 pairs, go to the lower index); lax.top_k costs
                # ~1/4 of jax.random.permutation's sort on XLA:CPU (3 vs 14 ms at d = 25,450)
                u = jax.random.uniform(jax.random.fold_in(key, r), (d,))
                xs = jnp.take(xu, lax.top_k(u, sub_dim)[1], axis=1)
            mu = S.weighted_row_sum(w, xs)
            k = jnp.where(usable[:, None] & usable[None, :], S.gram(xs, mu), 0.0)
            k = lax.stop_gradient(0.5 * (k + k.T))
            _, vecs = jnp.linalg.eigh(k)
            proj = k @ vecs[:, -1]
            score = jnp.where(usable, proj * proj, jnp.inf)
            kept.append(usable & (S.ranks(score, usable) < m - drop))
            if sub_dim >= d:  # every iteration would be the same
                break
        keep = kept[0]
        for kr in kept[1:]:
            keep = (keep & kr) if combine == "intersection" else (keep | kr)
        return _weighted_mean(keep, x), state

    return _make("dnc", apply, _requirement("dnc", "n >= 2f + 1", lambda n, f: n >= 2 * f + 1))


# --------------------------------------------------------------------------------------------
# FLTrust


def fltrust(eps: float = 1e-6) -> AggregationRule:
    r"""FLTrust: trust scores from the server's reference update.

    With :math:`g_0` the server's reference (jbyz: its gradient on the validation samples it
    holds, ``RunConfig.server_validation``):

    .. math:: TS_i = \mathrm{ReLU}\big(\cos(x_i, g_0)\big),\qquad
              \mathrm{out} = \frac{1}{\sum_i TS_i}\sum_i TS_i\,\frac{\|g_0\|}{\|x_i\|}\,x_i

    Each update is rescaled to the reference's norm and weighted by its clipped cosine
    similarity with the reference; ``f`` is not used. The cosine is
    :math:`\langle x_i, g_0\rangle / (\max(\|x_i\|, \epsilon)\max(\|g_0\|, \epsilon))`.

    Differences from Blades v0.1.0's ``Fltrust`` (where the reference is a trusted client among
    the inputs): when every score is 0 the output is 0 (the paper's convention; Blades divides 0
    by 0), a zero row contributes 0 (Blades divides by its norm), and unusable (non-finite) rows
    get score 0. Not translation equivariant and not unanimous (identical inputs ``v`` give
    ``v ||g_0|| / ||v||``, or 0 when ``v`` points away from ``g_0``), by design.

    Args:
      eps: the cosine's norm floor (torch's ``CosineSimilarity(eps=1e-6)``, as Blades).

    Returns:
      An :class:`~jbyz.types.AggregationRule` with ``needs_reference=True``:
      ``apply(x, valid, f, key, state, reference=g0 [d])``. Without a reference it raises
      :class:`~jbyz.registry.ConfigError` (the simulator passes one when
      ``server_validation > 0``).

    References:
      Cao, Fang, Liu, Gong. FLTrust: Byzantine-robust federated learning via trust bootstrapping.
      NDSS 2021.
    """
    _check_number("fltrust", "eps", eps, low=0, low_open=True)

    def apply(x, valid, f, key, state, reference=None):
        x, valid, f, m = _inputs(x, valid, f)
        if reference is None:
            raise ConfigError(
                "fltrust needs the server's reference update: call apply(..., reference=g0 [d]) "
                "(the simulator computes it when RunConfig.server_validation > 0)."
            )
        ref = jnp.asarray(reference, jnp.float32).reshape(x.shape[1])
        sq = jnp.einsum("id,id->i", x, x, precision=_HI)
        usable = valid & jnp.isfinite(sq)
        xu = jnp.where(usable[:, None], x, 0.0)
        dots = jnp.einsum("id,d->i", xu, ref, precision=_HI)
        norm = jnp.sqrt(jnp.where(usable, sq, 0.0))
        rnorm = jnp.sqrt(jnp.dot(ref, ref, precision=_HI))
        e = jnp.asarray(eps, jnp.float32)
        ts = jnp.maximum(dots / (jnp.maximum(norm, e) * jnp.maximum(rnorm, e)), 0.0)
        ts = jnp.where(usable & (norm > 0) & jnp.isfinite(ts), ts, 0.0)
        total = jnp.sum(ts)
        coef = jnp.where(ts > 0, ts * rnorm / jnp.where(norm > 0, norm, 1.0), 0.0)
        coef = coef / jnp.where(total > 0, total, 1.0)
        return S.weighted_row_sum(coef, x), state

    return _make(
        "fltrust", apply, _requirement("fltrust", "n >= 1", lambda n, f: n >= 1), True
    )


# --------------------------------------------------------------------------------------------
# SignGuard


def _lex_argmax(score: Array, allowed: Array, tiebreak: Array) -> Array:
    """``argmax`` of ``score`` over ``allowed`` rows, exact ties to the larger ``tiebreak`` (a
    value, so the choice does not depend on the row order), then to the lower index."""
    return jnp.argmin(jnp.where(allowed, S.ranks(-score, allowed, -tiebreak), score.shape[0]))


def _two_means(feat: Array, usable: Array, tb: Array, iters: int) -> tuple[Array, Array]:
    """2-means of the usable rows of ``feat [n, k]`` by ``iters`` Lloyd steps from a
    deterministic start: centre ``a`` is the row farthest from the mean, centre ``b`` the row
    farthest from ``a`` (exact ties to the larger ``tb [n]``, a value computed from the features).
    Returns ``(in_a [n] bool, in_b [n] bool)`` (a distance tie goes to ``a``; an empty cluster
    keeps its centre)."""
    u = usable.astype(jnp.float32)
    mean = (u @ feat) / jnp.maximum(jnp.sum(u), 1.0)

    def sqd(c):
        return jnp.sum((feat - c[None, :]) ** 2, axis=1)

    ca = feat[_lex_argmax(sqd(mean), usable, tb)]
    cb = feat[_lex_argmax(sqd(ca), usable, tb)]

    def step(t, cs):
        ca, cb = cs
        in_a = usable & (sqd(ca) <= sqd(cb))
        in_b = usable & ~in_a
        na, nb = jnp.sum(in_a), jnp.sum(in_b)
        ca = jnp.where(na > 0, (in_a.astype(jnp.float32) @ feat) / jnp.maximum(na, 1), ca)
        cb = jnp.where(nb > 0, (in_b.astype(jnp.float32) @ feat) / jnp.maximum(nb, 1), cb)
        return ca, cb

    ca, cb = lax.fori_loop(0, iters, step, (ca, cb))
    in_a = usable & (sqd(ca) <= sqd(cb))
    return in_a, usable & ~in_a


def signguard(lower=0.1, upper=3.0, kmeans_iters: int = 10) -> AggregationRule:
    r"""SignGuard: norm filtering and clustering of the sign statistics.

    1. Norm clipping: with :math:`M` the median of the input norms, every input with
       :math:`\|x_i\| > M` is scaled by :math:`M / (\|x_i\| + 10^{-6})` (fedlib's
       ``clip_tensor_norm_``).
    2. Norm filter :math:`S_1`: the inputs whose (clipped) norm lies in
       :math:`[\mathrm{lower} \cdot M, \mathrm{upper} \cdot M]`.
    3. Sign filter :math:`S_2`: each input's features are its fractions of positive, negative and
       zero coordinates; 2-means on these features; :math:`S_2` is the larger cluster.
    4. Output: the mean of the clipped inputs in :math:`S_1 \cap S_2` (0 if it is empty).

    The semantics are fedlib's ``Signguard`` (the clipping happens before the norm filter there,
    so ``upper`` never bites after clipping). Differences: fedlib runs scikit-learn's
    ``KMeans(n_clusters=2, random_state=0)`` (k-means++ from a seeded random start, Lloyd steps to
    convergence); here the start is deterministic (the feature row farthest from the mean, then
    the row farthest from that one, ties broken by feature value so the rule stays permutation
    invariant) and ``kmeans_iters`` Lloyd steps run. Both find the same two clusters whenever
    these are well separated. Equal cluster sizes: fedlib keeps the one scikit-learn labels 0
    (which depends on its random start); here the cluster not seeded by the farthest row. The
    median and the clustering use the usable (finite) rows only; fedlib's median is NaN with a
    NaN row. Not translation equivariant (signs and norms), by design.

    Args:
      lower: lower norm bound factor (0.1 in the paper and fedlib; float or array).
      upper: upper norm bound factor (3.0; float or array).
      kmeans_iters: Lloyd iterations of the 2-means (static).

    Returns:
      An :class:`~jbyz.types.AggregationRule`. ``f`` is not used; needs ``n >= 1``.

    References:
      Xu, Huang, Song, Lan. SignGuard: Byzantine-robust federated learning through
      collaborative malicious gradient filtering. ICDCS 2022 (arXiv:2109.05872).
    """
    _check_number("signguard", "lower", lower, low=0)
    _check_number("signguard", "upper", upper, low=0)
    _check_number("signguard", "kmeans_iters", kmeans_iters, low=0, integer=True)
    kmeans_iters = int(kmeans_iters)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        sq = jnp.einsum("id,id->i", x, x, precision=_HI)
        usable = valid & jnp.isfinite(sq)
        count = jnp.sum(usable.astype(jnp.int32))
        norm = jnp.sqrt(jnp.where(usable, sq, 0.0))
        med = S.median_of_sorted(S.sorted_rows(S.prepare(norm[:, None], usable)), count)[0]
        scale = jnp.where(norm > med, med / (norm + 1e-6), 1.0)
        cnorm = norm * scale
        s1 = usable & (cnorm >= jnp.asarray(lower, jnp.float32) * med)
        s1 = s1 & (cnorm <= jnp.asarray(upper, jnp.float32) * med)
        d = x.shape[1]
        xs = jnp.where(usable[:, None], x, 0.0)
        pos = jnp.sum(xs > 0, axis=1).astype(jnp.float32)
        neg = jnp.sum(xs < 0, axis=1).astype(jnp.float32)
        feat = jnp.stack([pos, neg, d - pos - neg], axis=1) / d
        # Start ties by value: the (positive, negative) counts in lexicographic order (exact in
        # float32 up to d ~ 4000; beyond, rare ties between nearby counts fall back to the slot).
        tb = pos * (d + 1.0) + neg
        in_a, in_b = _two_means(feat, usable, tb, kmeans_iters)
        s2 = jnp.where(jnp.sum(in_b) >= jnp.sum(in_a), in_b, in_a)
        keep = s1 & s2
        total = jnp.sum(keep.astype(jnp.float32))
        w = jnp.where(keep, scale, 0.0) / jnp.maximum(total, 1.0)
        return S.weighted_row_sum(w, x), state

    return _make("signguard", apply, _requirement("signguard", "n >= 1", lambda n, f: n >= 1))


# --------------------------------------------------------------------------------------------
# Clipped clustering


def _agglomerate_two(dist: Array, usable: Array, linkage: str) -> tuple[Array, Array]:
    """Greedy agglomerative clustering of the usable rows down to two clusters.

    ``n - 2`` static merge steps (a step merges only while more than two clusters remain): the
    closest pair of clusters (lowest index pair on exact ties) is merged, with the Lance-Williams
    update for ``"average"`` (size-weighted mean of the distances) or ``"single"`` (minimum)
    linkage. Returns ``(label [n] int, formed [n] int)``: each row's cluster representative, and
    for each representative the step that formed it (-1 for a single row)."""
    n = dist.shape[0]
    idx = jnp.arange(n)
    big = jnp.asarray(jnp.inf, jnp.float32)

    def step(t, carry):
        d, active, size, label, formed = carry
        go = jnp.sum(active.astype(jnp.int32)) > 2
        pair = active[:, None] & active[None, :] & (idx[:, None] < idx[None, :])
        flat = jnp.argmin(jnp.where(pair, d, big).reshape(-1))
        i, j = flat // n, flat % n
        si, sj = size[i], size[j]
        if linkage == "average":
            row = (si * d[i] + sj * d[j]) / (si + sj)
        else:
            row = jnp.minimum(d[i], d[j])
        new_d = d.at[i, :].set(row).at[:, i].set(row).at[i, i].set(0.0)
        new_active = active.at[j].set(False)
        new_size = size.at[i].add(sj)
        new_label = jnp.where(label == j, i, label)
        new_formed = formed.at[i].set(t)
        pick = lambda a, b: jnp.where(go, a, b)  # noqa: E731
        return (pick(new_d, d), pick(new_active, active), pick(new_size, size),
                pick(new_label, label), pick(new_formed, formed))

    init = (dist, usable, usable.astype(jnp.float32), idx, jnp.full((n,), -1, jnp.int32))
    _, active, _, label, formed = lax.fori_loop(0, max(n - 2, 0), step, init)
    return label, formed


def clipped_clustering(
    linkage: str = "average", max_tau=1e5, history: int = 1000
) -> AggregationRule:
    r"""Clipped clustering: clip to the median historical norm, keep the larger cosine cluster.

    1. Clipping: the threshold :math:`\tau = \min(\mathrm{median}(H), \tau_{\max})`, where
       :math:`H` holds the input norms of this step and of the previous ``history`` steps
       (recorded before clipping); every input with :math:`\|x_i\| > \tau` is scaled by
       :math:`\tau / (\|x_i\| + 10^{-6})` (fedlib's ``clip_tensor_norm_``).
    2. Clustering: agglomerative clustering of the inputs into two clusters on the cosine
       distances :math:`1 - \cos(x_i, x_j)`, with ``"average"`` or ``"single"`` linkage.
    3. Output: the mean of the clipped inputs of the larger cluster.

    Semantics as fedlib's ``Clippedclustering`` (scikit-learn's ``AgglomerativeClustering`` with
    a precomputed distance matrix). Differences: fedlib keeps *every* norm it has ever seen;
    a fixed-size state holds the last ``history`` steps' norms here (the same while the run is
    shorter). The clustering here merges greedily the closest pair of clusters, which gives
    scikit-learn's (scipy's) dendrogram unless distances tie exactly. Equal cluster sizes:
    both keep the cluster formed by the later merge (scikit-learn's label 0). Unusable
    (non-finite) rows are neither recorded, clustered nor averaged (fedlib gives them distance 2
    to every row and keeps them in the clustering). Not translation equivariant, by design.

    Args:
      linkage: ``"average"`` (default, as fedlib) or ``"single"``.
      max_tau: upper bound on the clipping threshold (fedlib default ``1e5``; float or array).
      history: number of past steps whose norms enter the median (static; the state is
        ``[history, n]``); 0 for this step's norms only (stateless).

    Returns:
      An :class:`~jbyz.types.AggregationRule` whose state is the norm history ``[history, n]``
      (NaN where empty; ``init(n, d)`` gives an empty history). ``f`` is not used; needs
      ``n >= 1``.

    References:
      Li, Ngai, Voigt. An experimental study of Byzantine-robust aggregation schemes in federated
      learning. IEEE Transactions on Big Data, 2023 (arXiv:2302.07173).
    """
    _choice("clipped_clustering", "linkage", linkage, ("average", "single"))
    _check_number("clipped_clustering", "max_tau", max_tau, low=0, low_open=True)
    _check_number("clipped_clustering", "history", history, low=0, integer=True)
    history = int(history)

    def init(n, d):
        return jnp.full((history, n), jnp.nan, jnp.float32) if history else ()

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        n = x.shape[0]
        g = S.gram(x)
        sq = jnp.diagonal(g)
        usable = valid & jnp.isfinite(sq)
        norm = jnp.sqrt(jnp.where(usable, sq, 0.0))
        now = jnp.where(usable, norm, jnp.nan)
        if history:
            empty = isinstance(state, tuple) and state == ()
            past = jnp.full((history, n), jnp.nan, jnp.float32) if empty else state
            past = jnp.asarray(past, jnp.float32)
            pool = jnp.concatenate([now, past.reshape(-1)])
        else:
            pool = now
        count = jnp.sum(~jnp.isnan(pool))
        srt = jnp.sort(jnp.where(jnp.isnan(pool), jnp.inf, pool))
        lo = jnp.take(srt, jnp.maximum((count - 1) // 2, 0))
        hi = jnp.take(srt, jnp.maximum(count // 2, 0))
        tau = jnp.minimum(0.5 * (lo + hi), jnp.asarray(max_tau, jnp.float32))
        scale = jnp.where(norm > tau, tau / (norm + 1e-6), 1.0)
        pair = usable[:, None] & usable[None, :]
        cos = jnp.where(pair, g, 0.0) / jnp.maximum(norm[:, None] * norm[None, :], 1e-8)
        dist = jnp.where(jnp.eye(n, dtype=bool), 0.0, 1.0 - cos)
        label, formed = _agglomerate_two(lax.stop_gradient(dist), usable, linkage)
        rep = jnp.where(usable, label, n)
        a = jnp.min(rep)  # the two representatives (a single one when m == 1)
        b = jnp.max(jnp.where(usable & (label != a), label, -1))
        in_a, in_b = usable & (label == a), usable & (label == b)
        na, nb = jnp.sum(in_a), jnp.sum(in_b)
        fa, fb = formed[a], jnp.where(b >= 0, formed[jnp.maximum(b, 0)], -2)
        # Equal sizes: the later-formed cluster (scikit-learn's label 0); two single rows: the
        # later one.
        b_wins = (nb > na) | ((nb == na) & ((fb > fa) | ((fb == fa) & (b > a))))
        keep = jnp.where(b_wins, in_b, in_a)
        total = jnp.sum(keep.astype(jnp.float32))
        w = jnp.where(keep, scale, 0.0) / jnp.maximum(total, 1.0)
        out = S.weighted_row_sum(w, x)
        if history:
            state = jnp.concatenate([now[None, :], past[:-1]], axis=0)
        return out, state

    return AggregationRule(
        name="clipped_clustering",
        apply=apply,
        init=init,
        requirement=_requirement("clipped_clustering", "n >= 1", lambda n, f: n >= 1),
    )


# --------------------------------------------------------------------------------------------
# What jbyz.aggregators registers (name, factory, description, reference).

RULES = (
    Rule(
        "monna",
        monna,
        "MoNNA: mean of the n - f nearest neighbours of a trusted input (default: the last "
        "valid row).",
        "Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, ICML 2023",
    ),
    Rule(
        "smea",
        smea,
        "SMEA: mean of the (n - f)-subset whose covariance has the smallest top eigenvalue "
        "(exact, all subsets; n <= 12 slots by default).",
        "Allouah, Guerraoui, Gupta, Pinot, Stephan, ICML 2023",
    ),
    Rule(
        "caf",
        caf,
        "CAF: down-weight along the top covariance eigenvector until the weight sum is n - 2f; "
        "the weighted mean of smallest top eigenvalue (exact eigen-solve).",
        "Allouah, Guerraoui, Stephan, ICML 2025",
    ),
    Rule(
        "dnc",
        dnc,
        "DnC: keep the n - f inputs with the smallest projection on the top singular vector of "
        "random coordinate subsets; mean of those kept in every round.",
        "Shejwalkar, Houmansadr, NDSS 2021",
    ),
    Rule(
        "fltrust",
        fltrust,
        "FLTrust: inputs rescaled to the server reference's norm, weighted by ReLU(cosine) "
        "with it (needs server_validation).",
        "Cao, Fang, Liu, Gong, NDSS 2021",
    ),
    Rule(
        "signguard",
        signguard,
        "SignGuard: clip to the median norm, keep inputs with norms in [0.1, 3] x median and in "
        "the larger 2-means cluster of sign statistics; their mean.",
        "Xu, Huang, Song, Lan, ICDCS 2022",
    ),
    Rule(
        "clipped_clustering",
        clipped_clustering,
        "Clipped clustering: clip to the median of the recent norms, average the larger of two "
        "agglomerative clusters on cosine distance.",
        "Li, Ngai, Voigt, IEEE Transactions on Big Data 2023",
    ),
)

__all__ = [
    "RULES", "Rule", "caf", "clipped_clustering", "dnc", "fltrust", "monna", "signguard", "smea",
]
