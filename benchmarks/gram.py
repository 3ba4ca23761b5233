"""The Gram matrix ``X X^T`` of ``[n, d]`` worker rows: one matmul vs column tiles (not a test).

Times, per ``(n, d)``, one jitted ``x @ x.T`` (``precision="highest"``) against
:func:`jbyz._sorting.gram` (column tiles of ``GRAM_TILE``, summed; the formulation the Gram-based
rules use), and optionally other tile widths. Calls are dispatched back to back and waited for
once; median of 5 repeats. See the README section "The Gram matrix by column tiles".

    python benchmarks/gram.py                                  # n in {10, 51}, d = 79,510
    python benchmarks/gram.py --n 10 51 200 --d 1e4 1e6        # the kernel grid's shapes
    python benchmarks/gram.py --tiles 1024 4096                # other tile widths too
    taskset -c 0 python benchmarks/gram.py                     # one core

Writes ``benchmarks/results/gram.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from _bench import meta, write_json  # noqa: E402
from jbyz import _sorting  # noqa: E402


def time_call(fn, x, calls: int, repeats: int = 5) -> tuple[float, float]:
    """(median ms per call, compile s) of ``calls`` back-to-back calls of ``jit(fn)(x)``."""
    t = time.perf_counter()
    c = jax.jit(fn).lower(x).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(c(x))
    per = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = None
        for _ in range(calls):
            out = c(x)
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t) / calls)
    return statistics.median(per) * 1e3, compile_s


def tiled_with(width: int):
    """``_sorting.gram`` with another tile width (the module constant is read at trace time)."""
    def fn(x):
        old = _sorting.GRAM_TILE
        _sorting.GRAM_TILE = width
        try:
            return _sorting.gram(x)
        finally:
            _sorting.GRAM_TILE = old
    return fn


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="*", default=[10, 51])
    ap.add_argument("--d", type=float, nargs="*", default=[79_510])
    ap.add_argument("--tiles", type=int, nargs="*", default=[], help="other tile widths to time")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gram.json"))
    args = ap.parse_args(argv)
    rows = []
    print(f"{'n':>4} {'d':>9} {'plain ms':>9} {'tiled ms':>9} {'ratio':>6}  others")
    for d in map(int, args.d):
        for n in args.n:
            x = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
            calls = max(3, min(200, int(2e8 / (n * n * d))))
            plain, _ = time_call(lambda x: jnp.matmul(x, x.T, precision=lax.Precision.HIGHEST), x, calls)
            tiled, comp = time_call(_sorting.gram, x, calls)
            others = {w: time_call(tiled_with(w), x, calls)[0] for w in args.tiles}
            print(f"{n:>4} {d:>9} {plain:>9.3f} {tiled:>9.3f} {tiled / plain:>6.2f}  "
                  + "  ".join(f"{w}: {v:.3f}" for w, v in others.items()), flush=True)
            rows.append(dict(n=n, d=d, plain_ms=plain, tiled_ms=tiled, tile=_sorting.GRAM_TILE,
                             tiled_compile_s=comp, other_tiles_ms=others))
    print(f"wrote {write_json(args.out, dict(meta=meta(), rows=rows))}")


if __name__ == "__main__":
    main()
