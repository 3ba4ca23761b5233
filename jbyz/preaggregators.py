"""Pre-aggregation stages ``[n, d] -> [n_out, d]`` applied before a robust aggregator.

Every factory returns a :class:`jbyz.types.PreAggregator` whose ``apply`` is

``apply(x [n, d], valid [n] bool, f int32[], key, state) -> (x_out [n_out, d], valid_out [n_out],
f_out int32[], new_state)``.

Shapes depend only on ``n`` and static hyper-parameters; ``f`` and the valid mask stay traced.
Factories are memoised on hashable hyper-parameters, as in :mod:`jbyz.aggregators`.
Invalid rows never influence the valid output rows.

Non-finite inputs: pre-aggregators do not sanitise. ``clip`` and ``arc`` pass a non-finite row
through unchanged; in ``bucketing`` a bucket with a non-finite member becomes non-finite; in
``nnm`` a non-finite (unusable, see :mod:`jbyz.aggregators`) row is at ``+inf`` distance from
every other row, so it never enters another row's neighbourhood, and it passes through
unchanged. The downstream aggregator then applies its own policy to the rows that stay
non-finite (each Byzantine input spoils at most one output row, so ``f`` stays a valid bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jbyz import _sorting as S
from jbyz._rule_checks import check_number as _check_number
from jbyz._rule_checks import inputs as _inputs
from jbyz._rule_checks import requirement as _requirement
from jbyz.aggregators import memoize
from jbyz.registry import Registry
from jbyz.types import PreAggregator

Array = jax.Array

PREAGGREGATORS = Registry("pre-aggregator")


_TINY = 2.0**-100


def row_norms(x, valid):
    """``[n]`` Euclidean row norms, overflow-safe; rows with a NaN or an inf get ``+inf``.

    The squared norm of a finite row with entries beyond ~1e19 overflows float32; such rows are
    recomputed on ``x * 2^-100`` (a second pass, taken only when a valid row's squared norm is
    infinite, and only outside ``vmap``, where ``lax.cond`` runs both branches).
    """
    sq = jnp.einsum("id,id->i", x, x, precision=lax.Precision.HIGHEST)

    def rescaled(sq):
        xs = x * _TINY
        big = jnp.sqrt(jnp.einsum("id,id->i", xs, xs, precision=lax.Precision.HIGHEST)) / _TINY
        return jnp.where(jnp.isinf(sq), big, jnp.sqrt(sq))

    norm = lax.cond(jnp.any(jnp.isinf(sq) & valid), rescaled, jnp.sqrt, sq)
    return jnp.where(jnp.isnan(norm), jnp.inf, norm)


def clip_rows(x, norms, threshold, active):
    """Scales row ``i`` by ``min(1, threshold / |x_i|)`` where ``active`` and the norm is finite.

    (A row with an inf entry has an infinite norm and passes through; see the module docstring.)
    """
    finite = jnp.isfinite(norms)
    scale = jnp.minimum(1.0, threshold / jnp.where(norms > 0, norms, 1.0))
    scale = jnp.where(active & finite, scale, 1.0)
    return x * scale[:, None]


@PREAGGREGATORS.register(
    "bucketing",
    "Random buckets of s valid inputs, averaged (ceil(n/s) rows; f passed through).",
    "Karimireddy, He, Jaggi, ICLR 2022",
)
@memoize
def bucketing(s: int = 2) -> PreAggregator:
    r"""Bucketing.

    A key-driven random permutation of the *valid* rows is cut into buckets of ``s`` rows (the
    last one may be smaller); each bucket is replaced by the mean of its rows:

    .. math:: y_b = \frac{1}{|B_b|}\sum_{i \in B_b} x_{\pi(i)},\qquad b < \lceil n/s \rceil

    The output has ``ceil(n/s)`` rows (static); bucket ``b`` is valid iff it has a valid member,
    so ``ceil(m/s)`` buckets are valid for ``m`` valid rows. ``f`` is passed through unchanged: a
    Byzantine input spoils at most one bucket, so the number of Byzantine buckets is at most
    ``f`` (a downstream rule such as Krum then assumes ``f`` of ``ceil(m/s)``, as in the paper).
    The permutation sorts one uniform draw per worker slot; with JAX's default
    ``jax_threefry_partitionable=True`` the draws of the first slots do not depend on the slot
    count, so padding appended after the real rows leaves the buckets unchanged.

    Args:
      s: bucket size (static int ``>= 1``; the paper's default 2; ``s = 1`` only permutes).

    Returns:
      A :class:`~jbyz.types.PreAggregator` with ``out_rows(n) = ceil(n / s)``.

    References:
      Karimireddy, He, Jaggi. Byzantine-robust learning on heterogeneous datasets via bucketing.
      ICLR 2022.
    """
    _check_number("bucketing", "s", s, low=1, integer=True)
    s = int(s)

    def out_rows(n):
        return -(-n // s)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        n, d = x.shape
        nb = out_rows(n)
        # One uniform per slot. With JAX's default partitionable threefry the first m draws do
        # not depend on the total count, so padding appended after the real rows leaves the
        # buckets unchanged (a vmapped fold_in per slot would not need that default, but
        # compiles 2-3x slower).
        u = jax.random.uniform(key, (n,))
        order = jnp.argsort(jnp.where(valid, u, 2.0 + u))  # valid rows first, shuffled
        pos = jnp.arange(nb * s)
        slot = jnp.where(pos < n, order[jnp.minimum(pos, n - 1)], 0).reshape(nb, s)
        member = (pos < m).reshape(nb, s)  # the first m permuted slots are the valid rows
        zero = jnp.zeros((), jnp.float32)
        total = S.tree_sum(
            [jnp.where(member[:, t, None], jnp.take(x, slot[:, t], axis=0), zero) for t in range(s)]
        )
        count = jnp.sum(member.astype(jnp.int32), axis=1)
        out = total / jnp.maximum(count, 1).astype(jnp.float32)[:, None]
        return out, count > 0, f, state

    return PreAggregator(
        name="bucketing",
        apply=apply,
        out_rows=out_rows,
        requirement=_requirement("bucketing", "n >= 1", lambda n, f: n >= 1),
    )


@PREAGGREGATORS.register(
    "nnm",
    "Nearest-neighbour mixing: each input replaced by the mean of its n - f nearest inputs.",
    "Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, AISTATS 2023",
)
@memoize
def nnm() -> PreAggregator:
    r"""Nearest-neighbour mixing (NNM).

    Each valid row is replaced by the average of its ``n - f`` nearest valid rows (Euclidean,
    itself included):

    .. math:: y_i = \frac{1}{n - f}\sum_{j \in N_i} x_j,\qquad
              N_i = \text{the } n - f \text{ rows closest to } x_i

    Distances from one Gram matmul (``precision="highest"``, clamped at 0); the mixing is one
    ``[n, n] @ [n, d]`` matmul. ``f`` is passed through.

    Returns:
      A :class:`~jbyz.types.PreAggregator` (``n`` rows out). Needs ``n >= f + 1``.

    References:
      Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan. Fixing by mixing: a recipe for
      optimal Byzantine ML under heterogeneity. AISTATS 2023.
    """

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        d2, usable = S.pairwise_sq_distances(x, valid)
        k = m - f
        rank = jnp.argsort(jnp.argsort(d2, axis=1, stable=True), axis=1, stable=True)
        near = (rank < k) & usable[None, :] & usable[:, None]
        w = near.astype(jnp.float32)
        w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
        clean = jnp.where(usable[:, None], x, 0.0)
        mixed = jnp.matmul(w, clean, precision=lax.Precision.HIGHEST)
        return jnp.where(usable[:, None], mixed, x), valid, f, state

    return PreAggregator(
        name="nnm",
        apply=apply,
        requirement=_requirement("nnm", "n >= f + 1", lambda n, f: n >= f + 1),
    )


@PREAGGREGATORS.register(
    "clip",
    "Static clipping of every input to L2 norm at most tau.",
    "-",
)
@memoize
def clip(tau=1.0) -> PreAggregator:
    r"""Static L2-norm clipping of every row.

    .. math:: y_i = x_i \min\!\left(1, \frac{\tau}{\|x_i\|}\right)

    Args:
      tau: clipping radius ``> 0`` (float or array).

    Returns:
      A :class:`~jbyz.types.PreAggregator` (``n`` rows out, ``f`` passed through).
    """
    _check_number("clip", "tau", tau, low=0, low_open=True)

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        out = clip_rows(x, row_norms(x, valid), jnp.asarray(tau, jnp.float32), valid)
        return out, valid, f, state

    return PreAggregator(name="clip", apply=apply)


@PREAGGREGATORS.register(
    "arc",
    "Adaptive robust clipping: clip every input to the (k+1)-th largest norm, "
    "k = floor(2 (f/n)(n - f)).",
    "Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, arXiv:2405.14432, 2024",
)
@memoize
def arc() -> PreAggregator:
    r"""Adaptive robust clipping (ARC).

    With ``m`` valid rows, ``k = floor(2 (f / m)(m - f))``; every valid row is clipped to the norm
    of the ``(k+1)``-th largest valid norm (so the ``k`` largest are scaled down to it):

    .. math:: y_i = x_i \min\!\left(1, \frac{\|x\|_{(k+1)}}{\|x_i\|}\right)

    Non-finite norms count as ``+inf`` (largest); non-finite rows pass through unchanged.

    Returns:
      A :class:`~jbyz.types.PreAggregator` (``n`` rows out, ``f`` passed through).

    References:
      Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan. Boosting robustness by clipping
      gradients in distributed learning. arXiv:2405.14432, 2024.
    """

    def apply(x, valid, f, key, state):
        x, valid, f, m = _inputs(x, valid, f)
        n = x.shape[0]
        norms = row_norms(x, valid)
        k = (2 * f * (m - f)) // jnp.maximum(m, 1)
        desc = -jnp.sort(-jnp.where(valid, norms, -jnp.inf))
        threshold = lax.dynamic_index_in_dim(desc, jnp.clip(k, 0, n - 1), keepdims=False)
        return clip_rows(x, norms, threshold, valid), valid, f, state

    return PreAggregator(
        name="arc", apply=apply, requirement=_requirement("arc", "n >= f", lambda n, f: n >= f)
    )


__all__ = ["PREAGGREGATORS", "bucketing", "nnm", "clip", "arc"]
