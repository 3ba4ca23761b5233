"""Time and memory of a jbyz step as n, d and the grid size grow.

Three sweeps of the full pipeline (Fashion-MNIST MLP, batch 32, ALIE with ByzFL's sign, worker
momentum 0.9, diagnostics off), each point compiled ahead of time and timed over a few steps:

* ``n`` (workers, 10 -> 200) at the 784-100-10 MLP (d = 79,510), f = n // 5;
* ``d`` (parameters, 1e4 -> 1e7) at n = 10, f = 3, by the MLP's hidden width
  (d = 795 h + 10: h = 13, 126, 1258, 12579);
* ``R`` (runs in a grid, 1 -> 256) at n = 10, f = 3, MLP, median, through ``jbyz.grid.BatchRunner``
  (``vmap`` over all runs, and ``lax.map`` one run at a time).

For each point: ms per step (per run-step for ``R``), the gradient share (the same run's
bare-gradient floor, ``_bench.floor_chunk``, for ``n`` and ``d``), and memory as XLA's buffer
assignment reports it (``compiled.memory_analysis()``: temporaries + outputs, i.e. the working
set beyond the inputs; arguments, which include the 188 MB training set, apart). It then prints
the log-log slope of each rule's *own* cost (step minus floor) between successive points: 1 =
linear in n or d, 2 = quadratic.

    python benchmarks/scaling.py --quick
    python benchmarks/scaling.py                       # all three sweeps
    python benchmarks/scaling.py --sweeps n --rules mean median krum

Writes ``benchmarks/results/scaling.json`` (merged by sweep).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _bench import RESULTS, floor_chunk, load, meta, workload, write_json  # noqa: E402


def _mem(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
        return dict(temp_mb=m.temp_size_in_bytes / 2**20, out_mb=m.output_size_in_bytes / 2**20,
                    args_mb=m.argument_size_in_bytes / 2**20,
                    working_mb=(m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20)
    except Exception:  # noqa: BLE001
        return {}


def _time(fn, steps, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[len(ts) // 2] / steps


def single_point(cfg, steps, repeats, ds, with_floor=True):
    import jax
    import jax.numpy as jnp

    from jbyz.simulate import Program

    prog = Program(cfg, dataset=ds)
    init, _, _ = prog.compiled_single()
    inp = jax.device_put(prog.inputs(cfg))
    t = time.perf_counter()
    comp = jax.jit(prog.chunk, static_argnums=(2,), donate_argnums=(0,)).lower(
        init(inp), jnp.int32(0), steps, inp, prog.train).compile()
    compile_s = time.perf_counter() - t

    def go():
        c, _ = comp(init(inp), jnp.int32(0), inp, prog.train)
        jax.block_until_ready(c.params)

    row = dict(d=prog.d, compile_s=compile_s, **_mem(comp))
    l0 = load()
    if with_floor:
        fl = jax.jit(floor_chunk(prog, steps)).lower(inp.params0, inp, prog.train).compile()
        fgo = lambda: jax.block_until_ready(fl(inp.params0, inp, prog.train))
        # interleave: floor, step, floor, step
        a, b = [], []
        fgo(), go()
        for _ in range(repeats):
            a.append(_time(fgo, steps, 1))
            b.append(_time(go, steps, 1))
        row["floor_ms_per_step"] = sorted(a)[len(a) // 2]
        row["ms_per_step"] = sorted(b)[len(b) // 2]
    else:
        row["ms_per_step"] = _time(go, steps, repeats)
    row["load"] = max(l0, load())
    return row


def sweep_n(args, ds):
    from jbyz.validation import validate

    rows = []
    for n in args.ns:
        for rule in args.rules:
            f = n // 5
            cfg = workload("mlp", steps=args.steps, aggregator=rule, n_workers=n, f_real=f)
            if validate(cfg):
                rows.append(dict(n=n, f=f, rule=rule, skipped=validate(cfg)[0]))
                continue
            steps = max(2, args.steps * 10 // n)
            r = single_point(cfg.replace(steps=steps, eval_every=steps), steps, args.repeats, ds)
            r.update(n=n, f=f, rule=rule, steps=steps)
            rows.append(r)
            _print(r, "n")
    return rows


def sweep_d(args, ds):
    rows = []
    for d_target in args.ds:
        h = max(1, round((d_target - 10) / 795))
        steps = max(1, min(args.steps, int(args.steps * 1e5 / d_target)))
        for rule in args.rules:
            cfg = workload("mlp", steps=steps, aggregator=rule, model_kwargs={"hidden": [h]})
            r = single_point(cfg, steps, args.repeats, ds)
            r.update(n=10, f=3, rule=rule, hidden=h, steps=steps, d_target=d_target)
            rows.append(r)
            _print(r, "d")
    return rows


def sweep_R(args, ds):
    import jax
    import jax.numpy as jnp

    from jbyz.grid import BatchRunner, GridOptions, _stack
    from jbyz.simulate import get_program

    rows = []
    for R in args.Rs:
        steps = max(2, args.steps * 4 // max(R, 4))
        cfgs = [workload("mlp", seed=s, steps=steps, aggregator="median") for s in range(R)]
        prog = get_program(cfgs[0], dataset=ds)
        w = max(prog.split_width(c) for c in cfgs)
        inp = jax.tree.map(jnp.asarray, _stack([prog.inputs(c, w) for c in cfgs]))
        for width in (R, 1) if R > 1 else (1,):
            runner = BatchRunner(prog, R, GridOptions(vmap_width=width), 1)
            ini = runner.init_fn()
            t = time.perf_counter()
            comp = runner.chunk_fn(steps, (ini(inp), jnp.int32(0), inp, prog.train))
            compile_s = time.perf_counter() - t

            def go():
                c, _ = comp(ini(inp), jnp.int32(0), inp, prog.train)
                jax.block_until_ready(c.params)

            l0 = load()
            ms = _time(go, steps * R, args.repeats)
            r = dict(R=R, width=width, steps=steps, ms_per_run_step=ms, run_steps_per_s=1e3 / ms,
                     compile_s=compile_s, load=max(l0, load()), **_mem(comp))
            rows.append(r)
            print(f"R={R:<4} width={width:<4} {ms:8.3f} ms/run-step  {1e3 / ms:8.1f} run-steps/s  "
                  f"working {r.get('working_mb', float('nan')):8.1f} MB  compile {compile_s:5.1f}s  "
                  f"load {r['load']}", flush=True)
    return rows


def _print(r, axis):
    print(f"{axis}={r['n'] if axis == 'n' else r['d']:<9} {r['rule']:<18} {r['ms_per_step']:9.2f} ms/step  "
          f"floor {r.get('floor_ms_per_step', float('nan')):8.2f}  working {r.get('working_mb', float('nan')):8.1f} MB"
          f"  compile {r['compile_s']:5.1f}s  load {r['load']}", flush=True)


def slopes(rows, axis):
    """log-log slope of (step - floor) between successive points of ``axis``, per rule."""
    out = {}
    for rule in sorted({r["rule"] for r in rows if "ms_per_step" in r}):
        pts = sorted((r[axis], r["ms_per_step"] - r.get("floor_ms_per_step", 0.0))
                     for r in rows if r.get("rule") == rule and "ms_per_step" in r)
        s = []
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if y0 > 0 and y1 > 0:
                s.append(round(math.log(y1 / y0) / math.log(x1 / x0), 2))
        out[rule] = dict(points=[(x, round(y, 3)) for x, y in pts], slopes=s)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweeps", nargs="*", default=["n", "d", "R"], choices=["n", "d", "R"])
    ap.add_argument("--rules", nargs="*", default=["mean", "median", "trimmed_mean", "krum"])
    ap.add_argument("--ns", type=int, nargs="*", default=[10, 25, 51, 100, 200])
    ap.add_argument("--ds", type=float, nargs="*", default=[1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--Rs", type=int, nargs="*", default=[1, 4, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=20, help="steps per timed call at the smallest size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "scaling.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rules, args.ns, args.ds, args.Rs = ["mean", "median"], [10, 25], [1e4, 1e5], [1, 4]
        args.steps, args.repeats = 5, 1
        args.out = str(RESULTS / "scaling_quick.json")

    from jbyz import data

    ds = data.load_dataset("fashion_mnist")
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    for sw in args.sweeps:
        print(f"\n== sweep {sw}", flush=True)
        rows = {"n": sweep_n, "d": sweep_d, "R": sweep_R}[sw](args, ds)
        entry = dict(meta=meta(), rows=rows)
        if sw in ("n", "d"):
            entry["slopes"] = slopes(rows, sw)
            for rule, v in entry["slopes"].items():
                print(f"  {rule:<18} own cost vs {sw}: {v['points']}  log-log slopes {v['slopes']}")
        res[sw] = entry
        write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
