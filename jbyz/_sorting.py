"""Coordinate-wise order statistics over a small, static worker axis (internal).

Robust coordinate-wise rules (median, trimmed mean, MeaMed, Phocas, Bulyan's last stage) need,
per coordinate, the ``n`` worker values in sorted order. XLA:CPU is poor at this on an ``[n, d]``
array: its generic sort (on axis 0, on the transposed ``[d, n]`` array, or ``lax.top_k``) runs a
comparator-callback sort per column, and even a plain reduction over the leading axis is a
strided loop. This module instead sorts with a *sorting network* over the static worker count,
written as element-wise compares and selects on whole rows: XLA fuses the network and the
consumer's rank-masked reduction into one vectorised loop over ``d`` (each coordinate's ``n``
values are sorted in registers). The sorted rows are returned as a Python list, never stacked.

Measured on the project machine kind (AMD EPYC, 2 cores, AVX2, XLA:CPU, jax 0.10.2; the machine
was shared with other jobs, so single figures are noisy; ms per jitted call of the median of the
sorted rows with a traced count, median of 5 repeats; ``python benchmarks/kernels.py --sorting``
reproduces the d = 1e4 rows):

=====  ======  =========  ========  ========  ==========  ===========  ========  ===========
n      d       network    bitonic   jnp.sort  jnp.sort    lax.top_k    mean      jnp.sum
                                    axis 0    of x.T      of -x.T      (tree)    axis 0
=====  ======  =========  ========  ========  ==========  ===========  ========  ===========
10     1e4     0.22       1.5       9.0       9.1         8.3          0.13      0.40
51     1e4     0.82       6.9       70        71          62           0.26      0.39
100    1e4     2.9        28        188       --          --           --        --
128    1e4     23         29        341       --          --           --        --
160    1e4     10,800     --        --        --          --           --        --
200    1e4     (*)        87-129    373-552   360         325          1.1       1.4
10     1e5     0.5-0.6    --        88        91          81           0.28      33
51     1e5     4.3-9      --        715       720         642          2.5       97
=====  ======  =========  ========  ========  ==========  ===========  ========  ===========

(*) XLA puts the whole network into one loop fusion. Up to n ~ 128 that is ideal (each
coordinate is sorted in registers, one pass over memory); beyond, compile time and run time blow
up (n = 160: 22 s to compile, 10.8 s per call; n = 200 did not finish compiling in 10 minutes
when the count was traced). ``lax.optimization_barrier`` after each layer made no difference
(the optimised HLO still held one fusion); forcing materialisation every few layers (through a
reduction) made it worse (n = 200: 190 ms, 86 s compile). Other variants measured and
rejected: comparators as ``jnp.minimum``/``jnp.maximum`` (NaN-propagating min/max cost 2-3x
more than one compare and two selects: 25 ms vs 8 ms at n = 51, d = 1e5), one ``lax.scan`` over
the layers with a static partner gather (319 ms at n = 51, d = 1e5), column-tiled networks in a
``fori_loop`` (33 ms at n = 51, d = 1e5). Stacking the sorted rows into an ``[n, d]`` array and
slicing it dynamically lets XLA fuse the stack with the network and recompute it per row (see
:func:`shifted`); the kernels therefore keep the sorted rows as a list. For sums over the worker
axis, ``jnp.sum(x, 0)`` becomes a slow strided loop once ``[n, d]`` leaves the cache (100x
slower than an unrolled tree of row sums at d = 1e5); a ``(1, n) @ (n, d)`` matmul is as fast as
the tree but lets ``0 * NaN`` through, so the kernels use the select-guarded tree
(:func:`weighted_row_sum`).

Choice: the Batcher odd-even merge network (compare + two selects per comparator) for
``n <= NETWORK_MAX_N = 128``; the bitonic network on reshaped blocks beyond (3-4x faster than
``jnp.sort`` at n = 200, compiles in ~3 s). From ``n = 24`` on, the coordinate-wise kernels also
run tile by tile over the columns (:func:`columnwise`), which halves the time at n = 51 and
n = 200 once ``[n, d]`` leaves the cache (measurements in :func:`column_tile`).

NaN policy: the sort itself does not handle NaN (a compare with NaN is false); callers map NaN to
``+inf`` first (see :func:`prepare`), which also pushes invalid rows to the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

NETWORK_MAX_N = 128


@functools.lru_cache(maxsize=None)
def batcher_layers(n: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Comparator layers of Batcher's odd-even merge sort for ``n`` keys.

    Built for the next power of two; comparators touching an index ``>= n`` are dropped, which is
    valid because the missing keys can be thought of as ``+inf`` already in place. Comparators
    within a layer touch disjoint indices.
    """
    size = 1
    while size < n:
        size *= 2
    layers = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            layer = []
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        layer.append((a, b))
            if layer:
                layers.append(tuple(layer))
            k //= 2
        p *= 2
    return tuple(layers)


def prepare(x: Array, valid: Array) -> Array:
    """``x`` in float32 with NaN -> ``+inf`` and invalid rows -> ``+inf`` (sorted last)."""
    x = x.astype(jnp.float32)
    keep = valid[:, None] & ~jnp.isnan(x)
    return jnp.where(keep, x, jnp.inf)


def prepare_rows(rows: list[Array], valid: Array) -> list[Array]:
    """:func:`prepare` for a list of rows (avoids stacking them)."""
    return [jnp.where(valid[i] & ~jnp.isnan(r), r, jnp.inf) for i, r in enumerate(rows)]


def materialize(x: Array) -> Array:
    """Makes XLA compute ``x`` once before it is broadcast against ``[n, d]``.

    XLA:CPU fuses a cheap element-wise producer (a sorting network and the select chain that
    picks the median are element-wise!) into every consumer element, so ``x - median[None, :]``
    recomputes the median ``n`` times: the geometric median started from the coordinate-wise
    median took 63 ms instead of 6 ms at n = 51, d = 1e4. ``lax.optimization_barrier`` does not
    help (XLA:CPU removes it before fusion); a max-reduction over a trailing axis of size 2 does,
    because XLA does not fuse reductions into their consumers. Cost: one extra pass over ``d``.
    """
    return jnp.max(jnp.stack([x, jnp.full_like(x, -jnp.inf)], axis=-1), axis=-1)


def _network(rows: list[Array]) -> list[Array]:
    rows = list(rows)
    for layer in batcher_layers(len(rows)):
        for a, b in layer:
            lo, hi = rows[a], rows[b]
            c = lax.lt(hi, lo)  # one compare, two selects (NaN-free inputs, see prepare)
            rows[a] = lax.select(c, hi, lo)
            rows[b] = lax.select(c, lo, hi)
    return rows


def _bitonic(x: Array) -> list[Array]:
    """Bitonic sort on ``[2^k, d]`` blocks: each layer is one reshape + compare + select pass."""
    n, d = x.shape
    size = 1
    while size < n:
        size *= 2
    if size > n:
        x = jnp.concatenate([x, jnp.full((size - n, d), jnp.inf, x.dtype)])
    k = 2
    while k <= size:
        j = k // 2
        while j >= 1:
            y = x.reshape(size // (2 * j), 2, j, d)
            a, b = y[:, 0], y[:, 1]
            block = np.arange(size // (2 * j))
            ascending = jnp.asarray(((block * 2 * j) & k) == 0)[:, None, None]
            keep = (a < b) == ascending
            x = jnp.stack([jnp.where(keep, a, b), jnp.where(keep, b, a)], axis=1).reshape(size, d)
            j //= 2
        k *= 2
    return [x[i] for i in range(n)]


def sorted_rows(x: Array | list[Array], method: str | None = None) -> list[Array]:
    """Sorts ``x: [n, d]`` along the worker axis; returns the ``n`` sorted rows as a list.

    Never stack the returned rows into an ``[n, d]`` array before reducing them: XLA would fuse
    the stack with the network (see :func:`shifted`).

    Args:
      x: ``[n, d]`` values without NaN (see :func:`prepare`), or a list of ``n`` rows.
      method: ``"network"``, ``"bitonic"``, ``"sort"`` or ``None`` (pick by ``n``, see the
        module docstring).

    Returns:
      A list of ``n`` arrays ``[d]``; ``rows[r]`` holds the ``r``-th smallest value per coordinate.
    """
    rows = list(x) if isinstance(x, list) else [x[i] for i in range(x.shape[0])]
    n = len(rows)
    if method is None:
        method = "network" if n <= NETWORK_MAX_N else "bitonic"
    if method == "network":
        return _network(rows)
    if method == "bitonic":
        return _bitonic(jnp.stack(rows))
    if method == "sort":
        s = jnp.sort(jnp.stack(rows), axis=0)
        return [s[i] for i in range(n)]
    raise ValueError(f"unknown sorting method {method!r}; valid: 'network', 'bitonic', 'sort'")


TILE_MIN_N = 24


def column_tile(n: int, d: int) -> int | None:
    """Columns per tile for :func:`columnwise` (``None``: do not tile).

    Measured (trimmed mean, d = 1e6 unless stated): n = 10: untiled 8 ms, tiled 22 ms (a big
    loop fusion runs on both cores, a tile on one); n = 51: 212 ms untiled, 137 / 116 / 118 ms
    with 2048 / 4096 / 8192 columns; n = 200, d = 1e5: 1092 ms untiled, 510 / 434 / 721 ms with
    512 / 1024 / 4096. So: tiles of about 256 KiB (a power of two >= 1024 columns) from n = 24 on,
    when there are at least 4 tiles.
    """
    if n < TILE_MIN_N:
        return None
    c = 1 << max(10, (2**18 // n).bit_length() - 1)
    return c if d >= 4 * c else None


def columnwise(fn, x: Array, tile: int | None | str = "auto") -> Array:
    """Applies a column-separable ``fn: [n, C] -> [C]`` tile by tile over the columns of ``x``.

    Sorting networks over many rows are limited by memory traffic when ``[n, d]`` does not fit
    in the cache; a ``fori_loop`` over column tiles keeps each tile's ``n`` rows in cache. The
    last tile is aligned to the end (it overlaps the previous one and recomputes a few columns),
    so one loop body serves every ``d``.

    Args:
      fn: maps ``[n, C]`` to ``[C]`` float32; must treat columns independently.
      x: ``[n, d]``.
      tile: columns per tile, ``None`` (no tiling) or ``"auto"`` (:func:`column_tile`).

    Returns:
      ``[d]`` float32.
    """
    n, d = x.shape
    c = column_tile(n, d) if tile == "auto" else tile
    if not c or c >= d:
        return fn(x)

    def body(i, out):
        start = jnp.minimum(i * c, d - c)
        block = lax.dynamic_slice_in_dim(x, start, c, axis=1)
        return lax.dynamic_update_slice_in_dim(out, fn(block).astype(jnp.float32), start, axis=0)

    return lax.fori_loop(0, -(-d // c), body, jnp.zeros((d,), jnp.float32))


def tree_sum(rows: list[Array]) -> Array:
    """Pairwise (tree) sum of a list of equally shaped arrays."""
    rows = list(rows)
    while len(rows) > 1:
        nxt = [rows[i] + rows[i + 1] for i in range(0, len(rows) - 1, 2)]
        if len(rows) % 2:
            nxt.append(rows[-1])
        rows = nxt
    return rows[0]


def masked_row_sum(rows: list[Array], keep: Array) -> Array:
    """``sum_r rows[r]`` over ``r`` with ``keep[r]``; dropped rows contribute exactly 0.

    ``keep`` is ``[n]`` bool, or ``[n, d]`` bool for a per-coordinate choice.
    """
    zero = jnp.zeros((), rows[0].dtype)
    return tree_sum([jnp.where(keep[r], rows[r], zero) for r in range(len(rows))])


def weighted_row_sum(w: Array, x: Array | list[Array]) -> Array:
    """``sum_i w_i x_i`` over the rows of ``x``; rows with ``w_i == 0`` contribute exactly 0.

    Unlike ``w @ x`` a zero weight masks a non-finite row. Unrolled over the static row count
    (fast and contiguous on XLA:CPU, see the module docstring).

    Args:
      w: ``[n]`` weights.
      x: ``[n, d]`` array or list of ``n`` rows ``[d]``.

    Returns:
      ``[d]``.
    """
    n = len(x) if isinstance(x, list) else x.shape[0]
    zero = jnp.zeros((), jnp.float32)
    terms = []
    for i in range(n):
        xi = x[i].astype(jnp.float32)
        terms.append(jnp.where(w[i] != 0, w[i] * xi, zero))
    return tree_sum(terms)


def pick(rows: list[Array], idx: Array, limit: int | None = None) -> Array:
    """``rows[idx]`` for a traced scalar (or ``[d]``) index, as a chain of selects.

    Args:
      rows: list of ``n`` arrays ``[d]``.
      idx: int scalar or ``[d]`` int array.
      limit: only rows ``r <= limit`` can be picked (a static bound that saves selects).

    Returns:
      ``[d]``; 0 where ``idx`` is out of range.
    """
    last = len(rows) - 1 if limit is None else min(limit, len(rows) - 1)
    out = jnp.zeros_like(rows[0])
    for r in range(last + 1):
        out = jnp.where(idx == r, rows[r], out)
    return out


def shifted(rows: list[Array], shift: Array) -> list[Array]:
    """Rows ``out[r] = rows[r + shift]`` (``+inf`` past the end) for a traced ``shift >= 0``.

    A barrel shifter: one select per row for each bit of ``shift``. (Stacking the sorted rows and
    taking a ``dynamic_slice`` instead made XLA fuse the stack with the whole sorting network:
    35 s to compile and 500 ms per call at n = 51, d = 1e5, against 3 s and 8 ms here.)
    """
    n = len(rows)
    inf = jnp.full_like(rows[0], jnp.inf)
    rows = list(rows)
    b = 0
    while (1 << b) <= n:
        step = 1 << b
        on = ((shift >> b) & 1) == 1
        rows = [jnp.where(on, rows[r + step] if r + step < n else inf, rows[r]) for r in range(n)]
        b += 1
    return rows


def window_mean(rows: list[Array], count: Array, k: Array, centre: Array) -> Array:
    """Per coordinate, the mean of the ``k`` values closest to ``centre`` among ``rows[:count]``.

    ``rows`` are sorted per coordinate, so the ``k`` closest values form a contiguous window
    ``[i*, i* + k)``. Sliding the window right past ``i - 1`` pays off iff the value dropped on the
    left is farther from the centre than the one gained on the right,
    ``c - s[i-1] > s[i+k-1] - c``; this holds for a prefix of ``i = 1 .. count - k``, so ``i*`` is
    the number of such ``i`` (ties keep the left value).

    Args:
      rows: ``n`` sorted rows ``[d]`` (values past ``count`` are ignored).
      count: traced number of values per coordinate.
      k: traced window size, ``1 <= k <= count``.
      centre: ``[d]``.

    Returns:
      ``[d]`` mean of the window.
    """
    n = len(rows)
    right = shifted(rows, k)  # right[j] = s[j + k]
    slack = count - k
    start = jnp.zeros(rows[0].shape, jnp.int32)
    for j in range(n - 1):  # candidate shift i = j + 1: drop s[j], gain s[j + k]
        move = (centre - rows[j] > right[j] - centre) & (j < slack)
        start = start + move.astype(jnp.int32)
    zero = jnp.zeros((), rows[0].dtype)
    end = start + k
    terms = [jnp.where((start <= r) & (r < end), rows[r], zero) for r in range(n)]
    return tree_sum(terms) / k.astype(jnp.float32)


def median_of_sorted(rows: list[Array], count: Array, even: str = "mean") -> Array:
    """Median of the first ``count`` sorted values per coordinate.

    Args:
      rows: ``n`` sorted rows ``[d]``.
      count: traced number of values.
      even: ``"mean"`` (average of the two middle values) or ``"lower"`` (lower middle, as
        ``torch.median``).
    """
    n = len(rows)
    lo = pick(rows, (count - 1) // 2, limit=(n - 1) // 2)
    if even == "lower":
        return lo
    hi = pick(rows, count // 2, limit=n // 2)
    return jnp.where(count % 2 == 1, lo, 0.5 * (lo + hi))


def rank_range_mean(rows: list[Array], lo: Array, hi: Array) -> Array:
    """Mean of the sorted rows with rank in ``[lo, hi)`` (traced bounds)."""
    r = jnp.arange(len(rows))
    keep = (r >= lo) & (r < hi)
    return masked_row_sum(rows, keep) / (hi - lo).astype(jnp.float32)


FLOAT_MAX = float(np.finfo(np.float32).max)


# Column tiles of the Gram matrix (see :func:`gram`).
GRAM_TILE = 2048  # the widest tile; narrower for many rows (:func:`gram_tile`)
GRAM_TILE_MIN = 512
GRAM_TILE_BYTES = 512 * 1024  # one tile's rows: an L2 cache of the project machine
GRAM_MIN_TILES = 8  # d < GRAM_MIN_TILES * GRAM_TILE: one plain matmul
GRAM_MAX_STATIC_TILES = 64  # more: a fori_loop over groups of GRAM_GROUP tiles
GRAM_GROUP = 16


def gram_tile(n: int) -> int:
    """Columns per Gram tile for ``n`` rows: the largest power of two whose ``[n, tile]``
    float32 block fits ``GRAM_TILE_BYTES``, within ``[GRAM_TILE_MIN, GRAM_TILE]``. Measured
    (ms per call, d = 79,510): n = 100 tiles of 1024 10.5 vs 2048 11.8; n = 200 512 36.9,
    1024 37-44, 2048 51-52 (one plain matmul 41-43)."""
    fit = 1 << max(0, int(np.floor(np.log2(max(GRAM_TILE_BYTES // (4 * n), 1)))))
    return min(GRAM_TILE, max(GRAM_TILE_MIN, fit))


def gram(x: Array, center: Array | None = None) -> Array:
    r"""The Gram matrix :math:`Y Y^T` of ``Y = x - 1 c^T`` (``c = center``, or 0), ``[n, n]``.

    One ``[n, d] x [d, n]`` matmul has a huge contraction and a tiny output, a shape XLA:CPU
    (YNNPACK, jax 0.10.2) handles badly once ``[n, d]`` leaves the cache: at ``d = 79,510`` it
    ran at ~46 GFLOP/s for n = 10 and ~39 for n = 51 (11 ms, slower than n = 64 or 100). Here
    the columns are cut into tiles (:func:`gram_tile`: 2048 columns up to n = 64, narrower
    beyond) and the tiles' small Gram matrices summed:
    each tile's rows stay in cache, and the independent tile matmuls run on all cores. Measured
    on the 2-core project machine (ms per call, plain -> tiled): d = 79,510: n = 10 0.47 -> 0.31,
    n = 51 11.2 -> 5.2; d = 1e6: n = 10 32 -> 4.9, n = 51 240 -> 54, n = 200 700 -> 455. Below
    ``d = GRAM_MIN_TILES * GRAM_TILE`` (16,384) columns one matmul is kept (d = 1e4: plain 0.07 vs
    tiled 0.08-0.10 ms at n = 10; n = 200: 4.1 vs 5.7-6.1).
    Up to ``GRAM_MAX_STATIC_TILES`` tiles are unrolled; beyond, a ``fori_loop`` takes
    ``GRAM_GROUP`` at a time (compile time stays under a second at d = 1e6).

    The centre is subtracted tile by tile (never as a separate ``[n, d]`` pass); centring close
    to the rows (e.g. at their median) keeps the float32 cancellation of
    ``|y_i|^2 + |y_j|^2 - 2 <y_i, y_j>`` small. ``precision="highest"``.

    Args:
      x: ``[n, d]``.
      center: ``[d]`` or ``None``.

    Returns:
      ``[n, n]`` float32 (exactly symmetric only up to rounding).
    """
    x = x.astype(jnp.float32)
    n, d = x.shape
    prec = lax.Precision.HIGHEST
    tile = gram_tile(n)

    def block(lo: int | Array, width: int) -> Array:
        xs = lax.dynamic_slice_in_dim(x, lo, width, axis=1)
        if center is not None:
            xs = xs - lax.dynamic_slice_in_dim(center.astype(jnp.float32), lo, width)[None, :]
        return jnp.matmul(xs, xs.T, precision=prec)

    def static_tiles(lo: int, hi: int) -> list[Array]:
        return [block(s, min(tile, hi - s)) for s in range(lo, hi, tile)]

    if d < GRAM_MIN_TILES * GRAM_TILE:  # fits the cache anyway: one matmul
        return block(0, d)
    if -(-d // tile) <= GRAM_MAX_STATIC_TILES:
        return tree_sum(static_tiles(0, d))
    span = tile * GRAM_GROUP
    groups = d // span

    def body(i, g):
        lo = i * span
        return g + tree_sum([block(lo + j * tile, tile) for j in range(GRAM_GROUP)])

    g = lax.fori_loop(0, groups, body, jnp.zeros((n, n), jnp.float32))
    rest = static_tiles(groups * span, d)
    return g + tree_sum(rest) if rest else g


def pairwise_sq_distances(x: Array, valid: Array) -> tuple[Array, Array]:
    """Squared Euclidean distances from the Gram matrix, with the non-finite policy applied.

    ``D_ij = max(0, |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>)`` (:func:`gram`, ``precision="highest"``). A row is
    *usable* when it is valid and its squared norm is finite (a NaN or +/-inf anywhere in the row,
    or values so large that the squared norm overflows float32, make it unusable). Pairs that
    involve an unusable row are at ``+inf``; ``D_ii = 0`` for usable rows. The Gram form loses
    relative precision when distances are tiny compared with the norms (float32 cancellation).

    Args:
      x: ``[n, d]``.
      valid: ``[n]`` bool.

    Returns:
      ``(D [n, n] float32, usable [n] bool)``.
    """
    x = x.astype(jnp.float32)
    n = x.shape[0]
    g = gram(x)
    sq = jnp.diagonal(g)
    usable = valid & jnp.isfinite(sq)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    pair = usable[:, None] & usable[None, :]
    d2 = 0.5 * (d2 + d2.T)  # exactly symmetric, so equal distances tie exactly
    eye = jnp.eye(n, dtype=bool)
    d2 = jnp.where(eye, 0.0, d2)
    return jnp.where(pair, d2, jnp.inf), usable


def argmin_preferring(score: Array, allowed: Array, tiebreak: Array | None = None) -> Array:
    """``argmin`` of ``score`` over ``allowed`` entries; an allowed entry wins even at ``+inf``.

    Exact ties are broken by ``tiebreak`` (smaller wins), then by index. Krum-type scores tie
    whenever few neighbours count (with one neighbour both ends of the closest pair score the
    same), and an index-based choice would break permutation invariance.
    """
    s = jnp.where(allowed, jnp.minimum(score, FLOAT_MAX), jnp.inf)
    if tiebreak is None:
        return jnp.argmin(s)
    best = s == jnp.min(s)
    return jnp.argmin(jnp.where(best, tiebreak, jnp.inf))


def ranks(score: Array, allowed: Array | None = None, tiebreak: Array | None = None) -> Array:
    """Ranks (0 = best) of a 1-D score by ``(score, tiebreak, index)``; disallowed rows last.

    Computed by ``O(n^2)`` pairwise comparisons (cheaper to compile and run than a sort for the
    small worker counts used here).
    """
    n = score.shape[0]
    s = score if allowed is None else jnp.where(allowed, jnp.minimum(score, FLOAT_MAX), jnp.inf)
    idx = jnp.arange(n)
    si, sj = s[:, None], s[None, :]
    before = (sj < si) | ((sj == si) & (idx[None, :] < idx[:, None]))
    if tiebreak is not None:
        ti, tj = tiebreak[:, None], tiebreak[None, :]
        later_index = idx[None, :] < idx[:, None]
        before = (sj < si) | ((sj == si) & ((tj < ti) | ((tj == ti) & later_index)))
    return jnp.sum(before.astype(jnp.int32), axis=1)
