"""How to formulate a grid of MLP runs for XLA:CPU: a standalone prototype (not part of jbyz).

Workload (benchmarks/README.md): Fashion-MNIST, MLP 784-100-10, n = 10 workers of which f = 3
Byzantine, batch 32, worker momentum 0.9 (EMA, zero start as ByzFL), ALIE (mean + 1.5 std),
coordinate-wise median (jbyz's own kernel), SGD lr 0.1. The step is written here by hand, with
its stages switchable, so that the cost of each stage and of each formulation of the two batch
axes (workers, runs) can be measured side by side:

* ``stages``: ``g`` = per-worker gradients + their mean + SGD (the bare-gradient floor),
  ``gm`` = + worker momentum, ``gma`` = + ALIE, ``full`` = + median instead of the mean.
* ``grads`` (per-worker gradients): ``flat`` (``vmap(grad)`` of a loss of one flat parameter
  vector, as jbyz's simulator does: the gradient is one ``[n, d]`` matrix made by a concatenate),
  ``tree`` (``vmap(grad)`` on the parameter pytree; every later stage works per leaf, no
  concatenate), ``manual`` (hand-written backward: the forward as one ``[224, 784]`` matmul, the
  per-worker weight gradients as batched ``einsum``; per leaf), ``manualT`` (as ``manual`` with
  the gathered batch laid out ``[worker, 784, batch]`` so the weight-gradient dot has its
  contraction dimension innermost on both sides).
* ``runs`` (the runs axis, R runs): ``seq`` (R calls of the one-run program, one after another),
  ``vmap`` (``vmap`` over runs inside the step scan: every matmul becomes a batched matmul),
  ``map`` (``lax.map`` over runs of the whole scan: R scans in one program), ``unroll`` (a Python
  loop over the R runs inside the scan body: R independent subgraphs per step, which XLA:CPU's
  thunk executor may run concurrently), ``shard`` (``shard_map`` over the CPU devices, each
  device ``vmap``-ping its share; needs ``--flags 2dev``, i.e. 2 XLA host devices).

XLA flag sets (``--flags``) need a fresh process; ``--flag-sets a,b,c`` re-runs this script once
per set, alternating, and collects the results (see ``FLAG_SETS``).

    python benchmarks/grid_formulations.py --quick
    python benchmarks/grid_formulations.py --R 8 --steps 50 --variants seq/flat/full vmap/flat/full
    python benchmarks/grid_formulations.py --flag-sets default,2dev --variants vmap/tree/full shard/tree/full
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/grid_formulations.py \
        --profile vmap/flat/full              # per-HLO-op time of one call (also jbyz:map, jbyz:vmap)
    python benchmarks/grid_formulations.py --matmuls   # GFLOP/s ceilings of the step's products

Metric: run-steps/s (R x steps / seconds) and the gradient GFLOP/s it implies (0.32 MFLOP per
sample, 224 samples a step), and CPU-ms per run-step (process CPU time, all threads: far steadier
than wall time on a machine that also runs other jobs). Writes ``benchmarks/results/grid_formulations.json`` (merged by key).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

FLAG_SETS = {
    "default": "",
    "2dev": "--xla_force_host_platform_device_count=2",
    "eigen1": "--xla_cpu_multi_thread_eigen=false",
    "nothunk": "--xla_cpu_use_thunk_runtime=false",
    "noynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "fastmath": "--xla_cpu_enable_fast_math=true",
    "concsched": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "vec512": "--xla_cpu_prefer_vector_width=512",
}


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--R", type=int, default=8, help="runs in the grid")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--aggregator", default="median")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="runs/grads/stages[/R], e.g. vmap/tree/full or seq/flat/g/1")
    ap.add_argument("--jbyz", nargs="*", default=[], choices=["seq", "vmap", "map"],
                    help="also time jbyz's own Program / BatchRunner this way")
    ap.add_argument("--flags", default=None, help="this process's flag set (informational)")
    ap.add_argument("--flag-sets", default=None, help="comma list: run one subprocess per set, alternating")
    ap.add_argument("--rounds", type=int, default=1, help="with --flag-sets: alternations")
    ap.add_argument("--profile", default=None, help="one variant: per-op profile instead of timing")
    ap.add_argument("--matmuls", action="store_true", help="time the step's products alone")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--key", default=None, help="result key in the JSON (default: from the args)")
    ap.add_argument("--out", default=str(HERE / "results" / "grid_formulations.json"))
    ap.add_argument("--emit", action="store_true", help="print one JSON line (for --flag-sets)")
    return ap.parse_args(argv)


DEFAULT_VARIANTS = ["seq/flat/g/1", "seq/flat/gm/1", "seq/flat/gma/1", "seq/flat/full/1",
                    "seq/flat/full", "vmap/flat/full", "map/flat/full", "unroll/flat/full",
                    "vmap/tree/full", "map/tree/full", "unroll/tree/full", "vmap/manualT/full"]


# ----------------------------------------------------------------------------- the prototype


def build(ds, spec: str, R_default: int, steps: int, aggregator: str = "median",
          n: int = 10, f: int = 3, B: int = 32):
    """Returns ``(go, R)``: ``go()`` runs ``steps`` steps of ``R`` runs and blocks."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from jbyz import _sorting as S
    from jbyz import data
    from jbyz.aggregators import AGGREGATORS

    parts = spec.split("/")
    runs, grads, stages = parts[:3]
    R = int(parts[3]) if len(parts) > 3 else R_default
    h = n - f
    beta, lr, tau = 0.9, 0.1, 1.5
    X = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1))
    Y = jnp.asarray(ds.y_train)
    agg_rule = AGGREGATORS.build(aggregator)

    def init_params(seed):
        k1, k2 = jax.random.split(jax.random.key(seed))
        W1 = jax.random.normal(k1, (784, 100)) * (1 / 28.0)
        W2 = jax.random.normal(k2, (100, 10)) * 0.1
        return {"W1": W1, "b1": jnp.zeros(100), "W2": W2, "b2": jnp.zeros(10)}

    p_example = init_params(0)
    _, unravel = ravel_pytree(p_example)

    def logits_fn(p, x):
        hdn = jax.nn.relu(x @ p["W1"] + p["b1"])
        return hdn @ p["W2"] + p["b2"]

    def loss_tree(p, x, y):
        lg = logits_fn(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), y[:, None], 1))

    def per_worker_grads(p, xb, yb):
        """``xb [h, B, 784]`` (or ``[h, 784, B]`` for manualT) -> per-worker grads (tree or flat)."""
        if grads == "flat":
            return jax.vmap(jax.grad(lambda fl, x, y: loss_tree(unravel(fl), x, y)),
                            in_axes=(None, 0, 0))(p, xb, yb)
        if grads == "tree":
            return jax.vmap(jax.grad(loss_tree), in_axes=(None, 0, 0))(p, xb, yb)
        if grads in ("manual", "manualT"):
            xt = xb if grads == "manualT" else None
            x2 = (jnp.swapaxes(xb, 1, 2) if grads == "manualT" else xb).reshape(h * B, 784)
            a1 = x2 @ p["W1"] + p["b1"]
            hdn = jax.nn.relu(a1)
            lg = hdn @ p["W2"] + p["b2"]
            dl = (jax.nn.softmax(lg) - jax.nn.one_hot(yb.reshape(-1), 10)) / B  # [hB, 10]
            dl3, hd3 = dl.reshape(h, B, 10), hdn.reshape(h, B, 100)
            dW2 = jnp.einsum("wbi,wbo->wio", hd3, dl3)
            db2 = dl3.sum(1)
            dh = (dl @ p["W2"].T) * (a1 > 0)
            dh3 = dh.reshape(h, B, 100)
            if xt is not None:
                dW1 = jnp.einsum("wib,wbo->wio", xt, dh3)
            else:
                dW1 = jnp.einsum("wbi,wbo->wio", xb, dh3)
            return {"W1": dW1, "b1": dh3.sum(1), "W2": dW2, "b2": db2}
        raise ValueError(grads)

    def rows_of(leaf):
        return [leaf[i] for i in range(leaf.shape[0])]

    def combine(sent):
        """Attack + aggregation on one leaf ``[h, ...]`` -> ``[...]``."""
        shape = sent.shape[1:]
        rows = rows_of(sent.reshape(h, -1))
        if "a" in stages or stages == "full":
            mu = S.tree_sum(rows) / h
            var = S.tree_sum([jnp.square(r - mu) for r in rows]) / (h - 1)
            mal = mu + tau * jnp.sqrt(var)
            rows = [mal] * f + rows
        k = len(rows)
        if stages == "full":
            x = jnp.stack(rows)
            out, _ = agg_rule.apply(x, jnp.ones((k,), bool), jnp.int32(f), jax.random.key(0),
                                    agg_rule.init(k, x.shape[1]))
        else:
            out = S.tree_sum(rows) / k
        return out.reshape(shape)

    def step(state, t, run):
        p, m = state
        seed, idx_tab, sizes = run
        key = jax.random.fold_in(jax.random.key(seed), t)
        wk = jax.vmap(lambda w: jax.random.fold_in(key, w))(jnp.arange(f, n))
        idx = jax.vmap(data.sample_indices, in_axes=(0, 0, 0, None))(wk, idx_tab, sizes, B)
        yb = Y[idx]
        if grads == "manualT":
            xb = X.T[:, idx].transpose(1, 0, 2)  # [h, 784, B], gathered in that layout
        else:
            xb = X[idx]
        g = per_worker_grads(p, xb, yb)
        if "m" in stages or stages == "full":
            m = jax.tree.map(lambda m_, g_: beta * m_ + (1 - beta) * g_, m, g)
            sent = m
        else:
            sent = g
        agg = jax.tree.map(combine, sent)
        p = jax.tree.map(lambda a, b: a - lr * b, p, agg)
        return (p, m), None

    def init_state(seed):
        p = init_params(seed)
        if grads == "flat":
            p, _ = ravel_pytree(p)
        m = jax.tree.map(lambda a: jnp.zeros((h,) + a.shape, a.dtype), p)
        return p, m

    def run_inputs(r):
        split = data.split_workers(ds.y_train, n, "iid", seed=r)
        return (np.int32(r), split.indices[f:].astype(np.int32), split.sizes[f:].astype(np.int32))

    def stack(trees):
        return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)

    def scan_one(state, run):
        state, _ = jax.lax.scan(lambda c, t: step(c, t, run), state, jnp.arange(steps))
        return state

    if runs == "seq":
        one = jax.jit(scan_one, donate_argnums=0)
        ins = [jax.device_put(run_inputs(r)) for r in range(R)]

        def go():
            outs = [one(init_state(r), ins[r]) for r in range(R)]
            jax.block_until_ready(outs)
        return go, R

    runs_in = stack([run_inputs(r) for r in range(R)])
    state0 = lambda: stack([init_state(r) for r in range(R)])
    if runs == "vmap":
        def fn(states, rs):
            def body(c, t):
                return jax.vmap(lambda s, r: step(s, t, r)[0])(c, rs), None
            return jax.lax.scan(body, states, jnp.arange(steps))[0]
    elif runs == "map":
        def fn(states, rs):
            return jax.lax.map(lambda a: scan_one(*a), (states, rs))
    elif runs == "unroll":
        def fn(states, rs):
            sl = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
            st = tuple(sl(states, i) for i in range(R))
            rr = tuple(sl(rs, i) for i in range(R))

            def body(c, t):
                return tuple(step(c[i], t, rr[i])[0] for i in range(R)), None
            st = jax.lax.scan(body, st, jnp.arange(steps))[0]
            return stack(list(st))
    elif runs == "shard":
        from jax.sharding import Mesh, PartitionSpec as P
        ndev = jax.device_count()
        mesh = Mesh(np.array(jax.devices()), ("runs",))

        def local(states, rs):
            def body(c, t):
                return jax.vmap(lambda s, r: step(s, t, r)[0])(c, rs), None
            return jax.lax.scan(body, states, jnp.arange(steps))[0]
        fn = jax.shard_map(local, mesh=mesh, in_specs=(P("runs"), P("runs")), out_specs=P("runs"),
                           check_vma=False)
        assert R % ndev == 0, (R, ndev)
    else:
        raise ValueError(runs)
    jf = jax.jit(fn, donate_argnums=0)

    def go():
        jax.block_until_ready(jf(state0(), runs_in))
    return go, R


def build_jbyz(ds, how: str, R: int, steps: int, aggregator: str):
    """jbyz's own Program (``seq``: R single runs) or BatchRunner (``vmap`` / ``map`` over runs)."""
    import jax
    import jax.numpy as jnp

    from _bench import workload
    from jbyz.grid import BatchRunner, GridOptions, _stack
    from jbyz.simulate import get_program

    cfgs = [workload("mlp", seed=s, steps=steps, aggregator=aggregator) for s in range(R)]
    prog = get_program(cfgs[0], dataset=ds)
    if how == "seq":
        init, chunk, _ = prog.compiled_single()
        ins = [jax.device_put(prog.inputs(c)) for c in cfgs]

        def go():
            outs = []
            for inp in ins:
                c, _ = chunk(init(inp), jnp.int32(0), steps, inp, prog.train)
                outs.append(c.params)
            jax.block_until_ready(outs)
        return go
    runner = BatchRunner(prog, R, GridOptions(vmap_width=R if how == "vmap" else 1), 1)
    w = max(prog.split_width(c) for c in cfgs)
    inp = jax.tree.map(jnp.asarray, _stack([prog.inputs(c, w) for c in cfgs]))
    init = runner.init_fn()
    fn = runner.chunk_fn(steps, (init(inp), jnp.int32(0), inp, prog.train))

    def go():
        c, _ = fn(init(inp), jnp.int32(0), inp, prog.train)
        jax.block_until_ready(c.params)
    return go


# ----------------------------------------------------------------------------- matmul ceilings


def matmul_ceilings(repeats: int = 20) -> list[dict]:
    """GFLOP/s of the step's two big products alone, per wall second and per CPU second.

    ``fwd``: the first layer's forward for the 7 workers' 224 samples, ``[224, 784] @ [784, 100]``;
    ``dW1``: the 7 per-worker weight gradients, ``einsum('wbi,wbo->wio')`` with K = 32;
    ``dW1_sum``: the *summed* weight gradient (what a non-robust trainer needs), one
    ``[784, 224] @ [224, 100]``; ``big``: ``[1024, 1024] @ [1024, 1024]`` (what XLA:CPU reaches on a
    large square product); each also through numpy (OpenBLAS) for reference; and all of them
    over a runs axis of 8 (``vmap``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    cases = {
        "fwd": (lambda a, b: a @ b, (f32(224, 784), f32(784, 100)), 2 * 224 * 784 * 100),
        "dW1": (lambda a, b: jnp.einsum("wbi,wbo->wio", a, b), (f32(7, 32, 784), f32(7, 32, 100)),
                2 * 7 * 32 * 784 * 100),
        "dW1_sum": (lambda a, b: a.reshape(-1, 784).T @ b.reshape(-1, 100),
                    (f32(7, 32, 784), f32(7, 32, 100)), 2 * 7 * 32 * 784 * 100),
        "big": (lambda a, b: a @ b, (f32(1024, 1024), f32(1024, 1024)), 2 * 1024 ** 3),
    }
    rows = []
    for name, (fn, args, flop) in cases.items():
        variants = {"xla": (jax.jit(fn), [jnp.asarray(a) for a in args], 1),
                    "xla_vmap8": (jax.jit(jax.vmap(fn)), [jnp.asarray(np.stack([a] * 8)) for a in args], 8)}
        if name != "dW1":
            variants["numpy"] = (fn, list(args), 1)
        else:
            variants["numpy"] = (lambda a, b: np.einsum("wbi,wbo->wio", a, b, optimize=True), list(args), 1)
        for vname, (f, a, mult) in variants.items():
            block = (lambda x: x.block_until_ready()) if vname != "numpy" else (lambda x: x)
            block(f(*a))
            reps = max(3, repeats // mult) if name != "big" else 5
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(reps):
                block(f(*a))
            wall, cpu = (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps
            rows.append(dict(case=name, impl=vname, mflop=flop * mult / 1e6, wall_ms=1e3 * wall,
                             cpu_ms=1e3 * cpu, gflops_wall=flop * mult / wall / 1e9,
                             gflops_per_cpu_s=flop * mult / cpu / 1e9))
            r = rows[-1]
            print(f"{name:<8} {vname:<10} {r['mflop']:8.1f} MFLOP  {r['wall_ms']:8.3f} ms  "
                  f"{r['gflops_wall']:6.1f} GFLOP/s wall  {r['gflops_per_cpu_s']:6.1f} GFLOP per CPU-s",
                  file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- driver


def measure(args) -> dict:
    import jax

    from _bench import interleaved, load, meta, mlp_flop_per_step
    from jbyz import data

    ds = data.load_dataset("fashion_mnist")
    variants = args.variants or (["seq/flat/full", "vmap/flat/full", "vmap/tree/full"]
                                 if args.quick else DEFAULT_VARIANTS)
    if args.quick:
        args.steps, args.repeats, args.R = min(args.steps, 20), 2, min(args.R, 4)
    fns, R_of, compile_s = {}, {}, {}
    for v in variants:
        t = time.perf_counter()
        fns[v], R_of[v] = build(ds, v, args.R, args.steps, args.aggregator)
        compile_s[v] = time.perf_counter() - t
    for how in args.jbyz:
        k = f"jbyz:{how}"
        fns[k] = build_jbyz(ds, how, args.R, args.steps, args.aggregator)
        R_of[k] = args.R
    print(f"# load {load()}  flags={os.environ.get('XLA_FLAGS', '')!r}  devices={jax.device_count()}",
          file=sys.stderr)
    res = interleaved(fns, args.repeats, log=lambda *a: None)
    flop = mlp_flop_per_step(10, 3, 32)
    rows = {}
    for k, v in res.items():
        rs = R_of[k] * args.steps / v["median_s"]
        rows[k] = dict(R=R_of[k], steps=args.steps, run_steps_per_s=round(rs, 2),
                       steps_per_s_per_run=round(rs / R_of[k], 2) if k.startswith("seq") else None,
                       grad_gflops=round(rs * flop / 1e9, 2), median_s=round(v["median_s"], 4),
                       cpu_ms_per_run_step=round(1e3 * v["median_cpu_s"] / (R_of[k] * args.steps), 3),
                       cpu_s=[round(x, 4) for x in v["cpu_s"]],
                       times_s=[round(x, 4) for x in v["times_s"]], load=[round(x, 2) for x in v["load"]],
                       first_call_s=round(v.get("first_call_s", 0), 2))
        cpu_ms = 1e3 * v["median_cpu_s"] / (R_of[k] * args.steps)
        print(f"{k:<24} R={R_of[k]:<4} {rs:9.1f} run-steps/s  {rs * flop / 1e9:6.2f} GFLOP/s  "
              f"{cpu_ms:6.2f} CPU-ms/run-step  (median {v['median_s']:.3f}s, load {v['load_median']})",
              file=sys.stderr)
    return dict(meta=meta(), flags=args.flags or "default", R=args.R, steps=args.steps,
                repeats=args.repeats, rows=rows)


def main(argv=None):
    args = _parse_args(argv)
    from _bench import write_json

    if args.flag_sets:
        sets = args.flag_sets.split(",")
        passthru = [a for a in (argv if argv is not None else sys.argv[1:])]
        # drop --flag-sets X / --rounds N / --out X from the child's args
        child, skip = [], False
        for a in passthru:
            if skip:
                skip = False
                continue
            if a in ("--flag-sets", "--rounds", "--out", "--key"):
                skip = True
                continue
            child.append(a)
        collected = {s: [] for s in sets}
        for rnd in range(args.rounds):
            for s in sets:
                env = dict(os.environ)
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAG_SETS[s]).strip()
                t = time.perf_counter()
                p = subprocess.run([sys.executable, __file__, *child, "--flags", s, "--emit"],
                                   env=env, capture_output=True, text=True)
                sys.stderr.write(p.stderr[-3000:])
                if p.returncode:
                    print(f"flag set {s}: exit {p.returncode}", file=sys.stderr)
                    collected[s].append({"error": p.stderr[-2000:]})
                    continue
                line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
                collected[s].append(json.loads(line))
                print(f"-- {s} round {rnd}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
        payload = {"flag_sets": {s: FLAG_SETS[s] for s in sets}, "results": collected}
        key = args.key or f"flags:{args.flag_sets}:R{args.R}"
    elif args.matmuls:
        from _bench import load, meta
        payload = {"meta": meta(), "load_before": load(), "rows": matmul_ceilings()}
        payload["load_after"] = load()
        key = args.key or "matmuls"
    elif args.profile:
        from _bench import op_profile
        from jbyz import data

        if "xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
            print("set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true for per-op events", file=sys.stderr)
        ds = data.load_dataset("fashion_mnist")
        if args.profile.startswith("jbyz:"):
            go, R = build_jbyz(ds, args.profile[5:], args.R, args.steps, args.aggregator), args.R
        else:
            go, R = build(ds, args.profile, args.R, args.steps, args.aggregator)
        go()
        go()
        prof = op_profile(go, steps=args.steps * R, top=30)
        for r in prof:
            print(f"{r['ms_per_step']:9.3f} ms/run-step  x{r['count']:<6} {r['op']}")
        payload = {"variant": args.profile, "R": R, "steps": args.steps, "ops": prof}
        key = args.key or f"profile:{args.profile}:R{R}"
    else:
        payload = measure(args)
        if args.emit:
            print(json.dumps(payload))
            return
        key = args.key or ("quick" if args.quick else f"R{args.R}:steps{args.steps}")
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    old[key] = payload
    write_json(out, old)
    print(f"wrote {out} [{key}]", file=sys.stderr)


if __name__ == "__main__":
    main()
