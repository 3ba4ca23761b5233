"""The speed race: ByzFL (PyTorch) vs jbyz, one run and grids of seeds, side by side.

Two workloads (``_bench.workload``), both Fashion-MNIST, MLP 784-100-10, ALIE (ByzFL's
``mean + 1.5 std``), worker momentum 0.9 (EMA), server SGD lr 0.1, coordinate-wise median:

* ``mlp``: n = 10, f = 3, batch 32 (the reference workload of benchmarks/README.md);
* ``dm``: the distributed-momentum setting, n = 51, f = 24, batch 83;
* ``cnn``: as ``mlp`` but the small CNN (conv5x5-32, pool, conv5x5-64, pool, fc-10, VALID; jbyz
  ``lenet``, ByzFL ``byzfl_workload.py --model cnn``), 22.5 MFLOP a sample. Only run when asked
  (``--workloads cnn``); one run only unless ``--grids`` names sizes. jbyz: ``--steps-cnn`` steps
  a timed call, ``--single-runs-cnn`` single runs back to back; ByzFL: ``--byzfl-steps-cnn``.

ByzFL runs in its own venv (``benchmarks/setup_byzfl.sh``) through ``byzfl_workload.py --json``, as
a child of this process, K seeds one after another (``--byzfl-seeds``); its grid figures for 8 and
64 seeds are that per-seed cost times 8 and 64 (sequential runs in one process add nothing but
their own time: 8 seeds take 8 times as long). jbyz runs in this
process: one run (``Program.compiled_single``; timed as 8 single runs back to back so that a timed
call lasts about as long as a grid's) and grids of 8 and 64 seeds through the real grid
path (``jbyz.grid.BatchRunner``: ``lax.map`` / ``vmap`` over runs; ``--widths``), compiled ahead of
time so that compilation is reported apart. ByzFL and jbyz alternate (ByzFL, jbyz, ByzFL, jbyz...)
so that machine load hits both; the load average is recorded with every figure.

Throughput is run-steps per second of training (ByzFL: its 300-step loop per seed, without
imports, data loading, model construction and evaluation, which are reported apart; jbyz: the
compiled chunk, initialisation included). Ratios are jbyz / ByzFL-sequential. GFLOP/s counts the
honest workers' forward + backward only (0.32 MFLOP a sample). jbyz rows also carry CPU-ms per
run-step (process CPU time), ByzFL rows the rate of its fastest tenth of steps.

ByzFL's default is 2 torch threads (``--byzfl-threads 2``, as in the first ByzFL figures). On a loaded
machine its two threads wait for each other at every op and it collapses (0.95 steps/s at load
8 here, against 28-30 on a quiet machine); ``--byzfl-threads 1`` is the fairer opponent then.

    python benchmarks/vs_byzfl.py --quick          # short smoke run (few steps, mlp, grid of 8)
    python benchmarks/vs_byzfl.py                  # both workloads, 1 / 8 / 64 seeds
    python benchmarks/vs_byzfl.py --workloads mlp --grids 8 64 --widths 1 auto
    python benchmarks/vs_byzfl.py --workloads cnn --grids --out benchmarks/results/vs_byzfl_cnn.json
    python benchmarks/vs_byzfl.py --workloads cnn --quick --out /tmp/vs_byzfl_cnn_smoke.json
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/vs_byzfl.py \
        --workloads mlp --grids 64 --widths 1 --devices 2      # runs sharded over both cores

Writes ``benchmarks/results/vs_byzfl.json`` (``--quick``: ``vs_byzfl_quick.json``), or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _bench import (RESULTS, cnn_flop_per_step, load, meta, mlp_flop_per_step, workload,  # noqa: E402
                    write_json)

BYZFL_PY = HERE / ".venv-byzfl" / "bin" / "python"
SHAPES = {"mlp": dict(n=10, f=3, batch=32), "dm": dict(n=51, f=24, batch=83),
          "cnn": dict(n=10, f=3, batch=32)}
BYZFL_MODEL = {"cnn": "cnn"}  # byzfl_workload.py --model (default fc_mnist)
FLOP_PER_STEP = {"mlp": mlp_flop_per_step, "dm": mlp_flop_per_step, "cnn": cnn_flop_per_step}


def run_byzfl(wl: str, steps: int, seeds: int, aggregator: str, threads: int) -> dict:
    s = SHAPES[wl]
    agg = {"median": "median", "trimmed_mean": "trmean", "krum": "krum"}[aggregator]
    cmd = [str(BYZFL_PY), str(HERE / "byzfl_workload.py"), "--aggregator", agg, "--attack", "alie",
           "--steps", str(steps), "--seeds", str(seeds), "--threads", str(threads),
           "--n", str(s["n"]), "--f", str(s["f"]), "--batch", str(s["batch"]), "--json"]
    if wl in BYZFL_MODEL:
        cmd += ["--model", BYZFL_MODEL[wl]]
    import resource

    l0 = load()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode:
        raise RuntimeError(f"byzfl_workload failed ({p.returncode}):\n{p.stderr[-3000:]}")
    out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    keep = ("steps_per_s", "steps_per_s_per_seed", "step_ms_median", "step_ms_p10", "train_s_per_seed",
            "setup_s_per_seed", "eval_s_per_seed", "seeds_total_s", "seeds_train_total_s", "import_s",
            "data_load_s", "end_to_end_s", "torch_threads", "other_processes_cpu_cores",
            "loadavg_1min_before_after", "final_test_accuracy_per_seed", "versions", "model")
    r = {k: out.get(k) for k in keep}
    r.update(process_wall_s=wall, process_cpu_s=child_cpu, load=max(l0, load()), steps=steps, seeds=seeds)
    per_seed_s = out["seeds_total_s"] / seeds  # setup + train + eval of one seed
    r["per_seed_total_s_for_300_steps"] = per_seed_s - sum(out["train_s_per_seed"]) / seeds \
        + 300 / out["steps_per_s"]
    return r


class Jbyz:
    """jbyz's single-run program and grid runners for one workload, compiled once."""

    def __init__(self, wl: str, aggregator: str, steps: int, grids: list[int], widths: list[str], ds,
                 single_runs: int = 8, devices: int = 1):
        import jax
        import jax.numpy as jnp

        from jbyz.grid import BatchRunner, GridOptions, _stack
        from jbyz.simulate import get_program

        self.wl, self.steps = wl, steps
        cfg0 = workload(wl, seed=0, steps=steps, aggregator=aggregator)
        self.prog = prog = get_program(cfg0, dataset=ds)
        self.fns, self.compile_s = {}, {}
        init, chunk, _ = prog.compiled_single()
        ins = [jax.device_put(prog.inputs(workload(wl, seed=s, steps=steps, aggregator=aggregator)))
               for s in range(single_runs)]
        t = time.perf_counter()
        c1 = jax.jit(prog.chunk, static_argnums=(2,), donate_argnums=(0,)).lower(
            init(ins[0]), jnp.int32(0), steps, ins[0], prog.train).compile()
        self.compile_s["single"] = time.perf_counter() - t

        def single():
            # one run at a time, `single_runs` of them back to back: a call lasts about as long
            # as a grid's (under a CPU quota short calls get CPU bursts and look faster)
            outs = []
            for inp1 in ins:
                c, _ = c1(init(inp1), jnp.int32(0), inp1, prog.train)
                outs.append(c.params)
            jax.block_until_ready(outs)
        self.fns[("single", single_runs, "-")] = single
        for R in grids:
            cfgs = [workload(wl, seed=s, steps=steps, aggregator=aggregator) for s in range(R)]
            w = max(prog.split_width(c) for c in cfgs)
            inp = jax.tree.map(jnp.asarray, _stack([prog.inputs(c, w) for c in cfgs]))
            for width in widths:
                opts = GridOptions(vmap_width=None if width == "auto" else int(width), devices=devices)
                runner = BatchRunner(prog, R, opts, devices)
                ini = runner.init_fn()
                t = time.perf_counter()
                fn = runner.chunk_fn(steps, (ini(inp), jnp.int32(0), inp, prog.train))
                self.compile_s[f"grid{R}:w{width}"] = time.perf_counter() - t

                def go(fn=fn, ini=ini, inp=inp):
                    c, _ = fn(ini(inp), jnp.int32(0), inp, prog.train)
                    jax.block_until_ready(c.params)
                tag = f"{width}->{runner.width}" + (f" x{devices}dev" if devices > 1 else "")
                self.fns[("grid", R, tag)] = go

    def time_all(self, repeats: int, warm: bool = True) -> list[dict]:
        out = []
        for (kind, R, width), fn in self.fns.items():
            ts, cpus, loads = [], [], []
            if warm and R * self.steps <= 2000:
                fn()  # warm (allocations); the chunk is compiled ahead of time already
            for _ in range(repeats):
                l0 = load()
                c = time.process_time()
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
                loads.append(max(l0, load()))
            med = sorted(ts)[len(ts) // 2]
            out.append(dict(kind=kind, R=R, width=width, steps=self.steps, times_s=ts, cpu_s=cpus,
                            load=loads, run_steps_per_s=R * self.steps / med,
                            cpu_ms_per_run_step=1e3 * sorted(cpus)[len(cpus) // 2] / (R * self.steps)))
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="*", default=None, choices=list(SHAPES),
                    help="default: mlp dm (--quick: mlp); cnn only when named")
    ap.add_argument("--aggregator", default="median", choices=["median", "trimmed_mean", "krum"])
    ap.add_argument("--grids", type=int, nargs="*", default=None,
                    help="grid sizes (seeds); default 8 64 for mlp and dm, none for cnn")
    ap.add_argument("--widths", nargs="*", default=["auto", "1"],
                    help="GridOptions.vmap_width values for the grids ('auto' = jbyz's default)")
    ap.add_argument("--steps", type=int, default=30, help="jbyz steps per timed call (mlp)")
    ap.add_argument("--steps-dm", type=int, default=5, help="jbyz steps per timed call (dm)")
    ap.add_argument("--steps-cnn", type=int, default=20, help="jbyz steps per timed call (cnn)")
    ap.add_argument("--byzfl-steps", type=int, default=300)
    ap.add_argument("--byzfl-steps-dm", type=int, default=30)
    ap.add_argument("--byzfl-steps-cnn", type=int, default=50)
    ap.add_argument("--byzfl-seeds", type=int, default=1, help="ByzFL seeds run one after another")
    ap.add_argument("--byzfl-threads", type=int, default=2)
    ap.add_argument("--single-runs", type=int, default=8,
                    help="jbyz one-run figure: this many single runs back to back per timed call")
    ap.add_argument("--single-runs-cnn", type=int, default=2,
                    help="--single-runs for cnn (a call of 2 x 20 steps lasts about as long as "
                         "ByzFL's 50)")
    ap.add_argument("--rounds", type=int, default=2, help="ByzFL / jbyz alternations (dm: 1)")
    ap.add_argument("--repeats", type=int, default=1, help="jbyz timed calls per round")
    ap.add_argument("--devices", type=int, default=1,
                    help="grids: shard the runs over this many devices (on CPU start with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N: one device per core)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/vs_byzfl.json (--quick: vs_byzfl_quick.json)")
    args = ap.parse_args(argv)
    grids_given = args.grids is not None  # cnn: no grid unless named
    if args.grids is None:
        args.grids = [8, 64]
    if args.workloads is None:
        args.workloads = ["mlp"] if args.quick else ["mlp", "dm"]
    if args.quick:
        args.grids, args.widths = [8], ["auto"]
        args.steps, args.byzfl_steps, args.byzfl_seeds, args.rounds = 10, 40, 1, 1
        args.single_runs = 2
        args.steps_cnn, args.byzfl_steps_cnn, args.single_runs_cnn = 3, 10, 1  # cnn: no grid
    if args.out is None:
        args.out = str(RESULTS / ("vs_byzfl_quick.json" if args.quick else "vs_byzfl.json"))
    if not BYZFL_PY.exists():
        sys.exit(f"{BYZFL_PY} missing: run `bash benchmarks/setup_byzfl.sh` first")

    from jbyz import data

    ds = data.load_dataset("fashion_mnist")
    report = {"meta": meta(), "args": vars(args), "workloads": {}}
    for wl in args.workloads:
        s = SHAPES[wl]
        flop = FLOP_PER_STEP[wl](s["n"], s["f"], s["batch"])
        jsteps = {"mlp": args.steps, "dm": args.steps_dm, "cnn": args.steps_cnn}[wl]
        bsteps = {"mlp": args.byzfl_steps, "dm": args.byzfl_steps_dm, "cnn": args.byzfl_steps_cnn}[wl]
        grids = [] if wl == "cnn" and (args.quick or not grids_given) else args.grids
        single_runs = args.single_runs_cnn if wl == "cnn" else args.single_runs
        print(f"\n== {wl}: n={s['n']} f={s['f']} batch={s['batch']} {args.aggregator}/ALIE, "
              f"{flop / 1e6:.1f} MFLOP of gradients a step", flush=True)
        t = time.perf_counter()
        jb = Jbyz(wl, args.aggregator, jsteps, grids,
                  args.widths if wl == "mlp" else args.widths[:1], ds, single_runs, args.devices)
        print(f"jbyz compiled in {time.perf_counter() - t:.1f}s: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in jb.compile_s.items()), flush=True)
        byz, jrows = [], []
        for rnd in range(1 if wl == "dm" else args.rounds):
            b = run_byzfl(wl, bsteps, args.byzfl_seeds, args.aggregator, args.byzfl_threads)
            byz.append(b)
            b["steps_per_s_p10"] = 1e3 / b["step_ms_p10"] if b.get("step_ms_p10") else None
            print(f"[round {rnd}] ByzFL: {b['steps_per_s']:.1f} steps/s per seed, fastest-tenth steps "
                  f"{b['steps_per_s_p10'] or float('nan'):.1f}/s "
                  f"({b['steps_per_s_per_seed']}), other cores busy {b['other_processes_cpu_cores']}, "
                  f"load {b['load']}, test acc {b['final_test_accuracy_per_seed']}", flush=True)
            # cnn: warm-up call in the first round only (a call costs seconds; nothing to warm later)
            for r in jb.time_all(args.repeats, warm=(wl != "cnn" or rnd == 0)):
                r["round"] = rnd
                jrows.append(r)
                print(f"[round {rnd}] jbyz {r['kind']:<6} R={r['R']:<3} width {r['width']:<8} "
                      f"{r['run_steps_per_s']:8.1f} run-steps/s  {r['cpu_ms_per_run_step']:6.2f} CPU-ms/run-step"
                      f"  load {r['load']}", flush=True)
            report["workloads"][wl] = dict(shape=s, partial=True, byzfl=byz, jbyz=jrows)
            write_json(args.out, report)
        # summary: medians over rounds
        med = lambda xs: sorted(xs)[len(xs) // 2]
        b_sps = med([b["steps_per_s"] for b in byz])
        summary = {"byzfl_steps_per_s": b_sps, "byzfl_gflops": b_sps * flop / 1e9,
                   "flop_per_step": flop, "rows": []}
        print(f"\n{'':<28}{'run-steps/s':>12}{'GFLOP/s':>9}{'vs ByzFL':>10}{'per run vs single':>19}")
        print(f"{'ByzFL, 1 run (sequential)':<28}{b_sps:>12.1f}{b_sps * flop / 1e9:>9.2f}{1.0:>10.2f}")
        single = None
        keys = []
        for r in jrows:
            k = (r["kind"], r["R"], r["width"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            rs = [r for r in jrows if (r["kind"], r["R"], r["width"]) == k]
            v = med([r["run_steps_per_s"] for r in rs])
            if k[0] == "single":
                single = v
            row = dict(kind=k[0], R=k[1], width=k[2], run_steps_per_s=v, gflops=v * flop / 1e9,
                       cpu_ms_per_run_step=med([r["cpu_ms_per_run_step"] for r in rs]),
                       vs_byzfl=v / b_sps, per_run_vs_single=(v / single) if single else None,
                       loads=[x for r in rs for x in r["load"]])
            summary["rows"].append(row)
            label = (f"jbyz, 1 run (x{k[1]} seq.)" if k[0] == "single" else f"jbyz, grid {k[1]} (w {k[2]})")
            print(f"{label:<28}{v:>12.1f}{v * flop / 1e9:>9.2f}{v / b_sps:>10.1f}"
                  f"{(v / single if single else float('nan')):>19.2f}")
        report["workloads"][wl] = dict(shape=s, jbyz_steps=jsteps, byzfl_steps=bsteps,
                                       compile_s=jb.compile_s, byzfl=byz, jbyz=jrows, summary=summary)
        if wl in BYZFL_MODEL:
            report["workloads"][wl].update(jbyz_model=jb.prog.cfg.model, byzfl_model=BYZFL_MODEL[wl])
        write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
