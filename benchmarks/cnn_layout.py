"""Per-worker CNN gradients on XLA:CPU: formulations, layouts, inside / outside lax.scan.

Workload: ``lenet`` (conv5x5-32, maxpool2, conv5x5-64, maxpool2, fc-10, VALID convs as in
jbyz's ``lenet`` on 28x28: 28 -> 24 -> 12 -> 8 -> 4, fc 1024 -> 10) on 28x28x1
inputs, 7 workers x 32 samples. Each row times one way of obtaining the 7 per-worker gradients
(except ``summed``, which computes one gradient of the summed loss over all 224 samples: the
floor any per-worker formulation is compared with).

Formulations:
  vmap      jax.vmap(jax.grad(loss)) over the worker axis (kernel gradients become grouped convs)
  unroll    Python loop over the 7 workers inside one traced function (7 ordinary conv gradients)
  map       jax.lax.map over the workers (one loop body)
  shared    custom_vjp convolution: forward and input-gradient convs run once over all 224 samples
            with the shared weights; only the kernel gradient is taken per worker (unrolled)
  summed    jax.grad of the summed loss over 224 samples (NOT per-worker; reference floor)

Pooling: reshape + max (default, as jbyz.models); the row suffix "+rw" uses lax.reduce_window,
whose gradient is XLA's select_and_scatter.
Layouts: NHWC (HWIO kernels) and NCHW (OIHW kernels), same maths.
"top": one jitted call of the gradients; "scan": the same inside a ``lax.scan`` of S SGD steps
(time per step); "scanU": that scan fully unrolled (no while loop left in the program).

Run:  python benchmarks/cnn_layout.py [--reps 5] [--steps 4] [--where top,scan] [--only-nnx]
      python benchmarks/cnn_layout.py --recorded     # print the table measured when written

See benchmarks/NOTES_cnn.md for the conclusions.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

N_WORKERS, BATCH, CLASSES = 7, 32, 10

# What this script printed when written (ms per step of 7 per-worker gradients, median).
# A: an idle 2-core slice (taskset -c 0,1) of a 16-core Intel Xeon, jax 0.11.2, XLA:CPU.
# B: a 2-core AMD EPYC (AVX2), jax 0.10.2, with other jobs running (load 2-5):
#    absolute numbers inflated ~2-3x, compare rows within the column only.
# C: one H100, jax 0.11.2 (same script, no taskset).
RECORDED = """
where  layout  method      A: Xeon 2c   B: EPYC 2c (loaded)   C: H100
top    NHWC    summed*          92.4          561                  0.7
top    NHWC    vmap            130.7         2732                  1.1
top    NHWC    unroll           80.9          321                  1.2
top    NHWC    map            1486.0         2798                  1.2
top    NHWC    shared           74.7          864                    -
top    NHWC    unroll+rw       135.4         1040                    -
top    NCHW    summed*         185.0         1416                  0.7
top    NCHW    vmap            188.0         4341                  1.1
top    NCHW    unroll          129.9          945                  1.4
top    NCHW    map            1853.5         5132                  1.4
top    NCHW    shared          157.3         1141                    -
top    NCHW    unroll+rw       155.9         1449                    -
scan   NHWC    summed*        2969.6        13737                  0.3
scan   NHWC    vmap           1616.3         2802                  0.8
scan   NHWC    unroll         1548.1         2440                  1.0
scan   NHWC    map            1621.2         3049                  1.4
scan   NHWC    shared         1513.0         3492                    -
scan   NHWC    unroll+rw      1605.4         2421                    -
scan   NCHW    summed*        2173.7        20219                  0.4
scan   NCHW    vmap           1896.7         2562                  0.8
scan   NCHW    unroll         2044.2         2011                  0.9
scanU  NHWC    summed*          74.5              -                    -
scanU  NHWC    vmap            121.7              -                    -
scanU  NHWC    unroll           68.6              -                    -
(* summed = one gradient of the summed loss over 224 samples, not per-worker: the floor)

jbyz.models lenet via per_worker_grads; fast = fast_conv_grad=True (the default), xla = False
where  method/grad     A: Xeon 2c   B: EPYC 2c (loaded)
top    vmap/xla            126.7         2727
top    unroll/xla           69.0          298
top    vmap/fast               -         2057
top    unroll/fast             -          309
scan   vmap/xla                -         2981
scan   unroll/xla              -         3061
scan   vmap/fast               -         2330
scan   unroll/fast             -          409

One conv (lenet conv2, 32 x 12x12x32 -> 64, 5x5), B, ms: forward top 10.5 / in scan 6.4;
input gradient 16.1 / 8.5; kernel gradient 8.5 / 206 (XLA's) and 8.4 / 8.1 (transposed
operands, as jbyz.models does); im2col patches + matmul 45 / 43.
"""


# ----------------------------------------------------------------------------- raw LeNet
def init_params(key, layout):
    k1, k2, k3 = jax.random.split(key, 3)
    w1 = jax.random.normal(k1, (5, 5, 1, 32)) * 0.2
    w2 = jax.random.normal(k2, (5, 5, 32, 64)) * 0.035
    if layout == "NCHW":
        w1, w2 = w1.transpose(3, 2, 0, 1), w2.transpose(3, 2, 0, 1)
    return {
        "w1": w1, "b1": jnp.zeros(32), "w2": w2, "b2": jnp.zeros(64),
        "w3": jax.random.normal(k3, (4 * 4 * 64, CLASSES)) * 0.04, "b3": jnp.zeros(CLASSES),
    }


def _dn(layout):
    return ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")


def plain_conv(x, w, layout):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_dn(layout))


def make_shared_conv(layout, n):
    """conv(x [n*B, ...], w [n, ...]) whose forward uses w[0] (all rows equal) over the whole
    batch, and whose backward gives dx in one conv and dw per worker."""

    @jax.custom_vjp
    def conv(x, wn):
        return plain_conv(x, wn[0], layout)

    def fwd(x, wn):
        return conv(x, wn), (x, wn[0])

    def bwd(res, dy):
        x, w = res
        _, vjp_x = jax.vjp(lambda xx: plain_conv(xx, w, layout), x)
        (dx,) = vjp_x(dy)
        xs = x.reshape(n, -1, *x.shape[1:])
        dys = dy.reshape(n, -1, *dy.shape[1:])
        dws = []
        for i in range(n):
            _, vjp_w = jax.vjp(lambda ww: plain_conv(xs[i], ww, layout), w)
            dws.append(vjp_w(dys[i])[0])
        return dx, jnp.stack(dws)

    conv.defvjp(fwd, bwd)
    return conv


POOL = {"kind": "reshape"}


def pool(x, layout):
    """2x2 max pool: reshape + max (default) or lax.reduce_window (select_and_scatter grad)."""
    if POOL["kind"] == "reduce_window":
        win = (1, 2, 2, 1) if layout == "NHWC" else (1, 1, 2, 2)
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, win, win, "VALID")
    if layout == "NHWC":
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).max((2, 4))
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).max((3, 5))


def forward(p, x, layout, conv=None):
    conv = conv or (lambda a, w: plain_conv(a, w, layout))
    bshape = (1, 1, 1, -1) if layout == "NHWC" else (1, -1, 1, 1)
    h = pool(jax.nn.relu(conv(x, p["w1"]) + p["b1"].reshape(bshape)), layout)
    h = pool(jax.nn.relu(conv(h, p["w2"]) + p["b2"].reshape(bshape)), layout)
    if layout == "NCHW":
        h = h.transpose(0, 2, 3, 1)
    return h.reshape(h.shape[0], -1) @ p["w3"] + p["b3"]


def xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def loss(p, x, y, layout):
    return xent(forward(p, x, layout), y)


# ----------------------------------------------------------------------------- formulations
def grads_fn(method, layout):
    g1 = jax.grad(functools.partial(loss, layout=layout))
    if method == "vmap":
        return jax.vmap(g1, in_axes=(None, 0, 0))
    if method == "unroll":
        return lambda p, x, y: jax.tree.map(
            lambda *a: jnp.stack(a), *[g1(p, x[i], y[i]) for i in range(x.shape[0])]
        )
    if method == "map":
        return lambda p, x, y: jax.lax.map(lambda a: g1(p, *a), (x, y))
    if method == "summed":
        def summed(p, x, y):
            g = jax.grad(lambda q: loss(q, x.reshape(-1, *x.shape[2:]), y.reshape(-1), layout))(p)
            return g  # one gradient (of the mean over 224 samples), not per worker
        return summed
    if method == "shared":
        conv = make_shared_conv(layout, N_WORKERS)

        def shared(p, x, y):
            n, b = x.shape[:2]
            pn = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), p)

            def total(pn):
                # conv kernels are per-worker copies consumed by the custom conv; the rest of the
                # network uses per-sample parameters gathered from the worker copies.
                q = {k: v for k, v in pn.items()}
                xx = x.reshape(n * b, *x.shape[2:])
                h = forward_shared(q, xx, layout, conv, n, b)
                lp = jax.nn.log_softmax(h).reshape(n, b, -1)
                nll = -jnp.take_along_axis(lp, y[..., None], 2)[..., 0]
                return jnp.sum(jnp.mean(nll, axis=1))  # sum over workers of worker means

            return jax.grad(total)(pn)

        return shared
    raise ValueError(method)


def forward_shared(pn, x, layout, conv, n, b):
    bshape = (n, 1, 1, 1, -1) if layout == "NHWC" else (n, 1, -1, 1, 1)

    def add_bias(h, bias):
        return (h.reshape(n, b, *h.shape[1:]) + bias.reshape(bshape)).reshape(h.shape)

    h = pool(jax.nn.relu(add_bias(conv(x, pn["w1"]), pn["b1"])), layout)
    h = pool(jax.nn.relu(add_bias(conv(h, pn["w2"]), pn["b2"])), layout)
    if layout == "NCHW":
        h = h.transpose(0, 2, 3, 1)
    h = h.reshape(n, b, -1)
    out = jnp.einsum("nbi,nio->nbo", h, pn["w3"]) + pn["b3"][:, None, :]
    return out.reshape(n * b, -1)


# ----------------------------------------------------------------------------- timing
def timeit(f, *args, reps):
    jax.block_until_ready(f(*args))  # compile + warm
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench(method, layout, where, reps, steps):
    key = jax.random.key(0)
    p = init_params(key, layout)
    shape = (N_WORKERS, BATCH, 28, 28, 1) if layout == "NHWC" else (N_WORKERS, BATCH, 1, 28, 28)
    x = jax.random.normal(jax.random.key(1), shape)
    y = jax.random.randint(jax.random.key(2), (N_WORKERS, BATCH), 0, CLASSES)
    g = grads_fn(method, layout)
    if where == "top":
        return timeit(jax.jit(g), p, x, y, reps=reps)

    shift = jnp.arange(steps).reshape(-1, 1, 1, 1, 1, 1) * 1e-3
    xs = jnp.broadcast_to(x, (steps, *x.shape)) + shift

    @jax.jit
    def run(p, xs, y):
        def step(p, xt):
            gr = g(p, xt, y)
            if method != "summed":
                gr = jax.tree.map(lambda a: a.mean(0), gr)
            return jax.tree.map(lambda a, b: a - 0.01 * b, p, gr), None

        return jax.lax.scan(step, p, xs, unroll=(where == "scanU"))[0]

    return timeit(run, p, xs, y, reps=max(2, reps // 2)) / steps


def bench_nnx_model(reps, steps, wheres=("top", "scan")):
    """jbyz.models lenet through per_worker_grads, with the loop-friendly kernel gradient
    (fast_conv_grad=True, the default) and with XLA's own (False)."""
    from jbyz.models import build_model, per_worker_grads

    x = jax.random.normal(jax.random.key(1), (N_WORKERS, BATCH, 28, 28, 1))
    y = jax.random.randint(jax.random.key(2), (N_WORKERS, BATCH), 0, CLASSES)
    keys = jax.random.split(jax.random.key(3), N_WORKERS)
    xs = jnp.broadcast_to(x, (steps, *x.shape))
    out = {}
    for fast in (True, False):
        m = build_model("lenet", (28, 28, 1), CLASSES, key=jax.random.key(0), fast_conv_grad=fast)
        for method in ("vmap", "unroll"):
            g = per_worker_grads(m, xent, method=method)
            for where in wheres:
                if where == "top":
                    f = jax.jit(g)
                    out[(where, method, fast)] = timeit(f, m.params, m.state, x, y, keys, reps=reps)
                    continue

                @jax.jit
                def run(p, xs, g=g, m=m):
                    def step(p, xt):
                        gr, _ = g(p, m.state, xt, y, keys)
                        return jax.tree.map(lambda a, b: a - 0.01 * b.mean(0), p, gr), None

                    return jax.lax.scan(step, p, xs)[0]

                sec = timeit(run, m.params, xs, reps=max(2, reps // 2))
                out[(where, method, fast)] = sec / steps
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--methods", default="summed,vmap,unroll,map,shared,unroll+rw")
    ap.add_argument("--layouts", default="NHWC,NCHW")
    ap.add_argument("--where", default="top,scan")
    ap.add_argument("--skip-nnx", action="store_true", help="skip the jbyz.models rows")
    ap.add_argument("--only-nnx", action="store_true", help="only the jbyz.models rows")
    ap.add_argument("--recorded", action="store_true", help="print the recorded table and exit")
    args = ap.parse_args()
    if args.recorded:
        print(RECORDED)
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; "
          f"lenet 28x28x1, {N_WORKERS} workers x {BATCH}; ms per step of 7 per-worker gradients")
    rows = []
    for where in ([] if args.only_nnx else args.where.split(",")):
        for layout in args.layouts.split(","):
            for method in args.methods.split(","):
                POOL["kind"] = "reduce_window" if method.endswith("+rw") else "reshape"
                ms = 1e3 * bench(method.split("+")[0], layout, where, args.reps, args.steps)
                rows.append((where, layout, method, ms))
                print(f"{where:5s} {layout:5s} {method:10s} {ms:8.1f} ms", flush=True)
    if args.skip_nnx:
        return
    print("\nvia jbyz.models.per_worker_grads (NNX lenet; fast = loop-friendly kernel gradient):")
    try:
        res = bench_nnx_model(args.reps, args.steps, tuple(args.where.split(",")))
    except Exception as e:  # noqa: BLE001 (the package is assembled by several people at once)
        print(f"  skipped: {e!r}")
        res = {}
    for (where, method, fast), sec in res.items():
        label = f"{method}/{'fast' if fast else 'xla'}"
        print(f"{where:5s} NHWC  {label:12s} {1e3 * sec:8.1f} ms")


if __name__ == "__main__":
    main()
