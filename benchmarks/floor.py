"""A grid's throughput against the bare cost of the same gradients (the floor), side by side.

Workload: ``_bench.workload("mlp")`` (Fashion-MNIST, MLP 784-100-10, n = 10, f = 3, batch 32,
ALIE, worker momentum 0.9) for each aggregator. For a grid of R seeds, jbyz's real grid path
(``jbyz.grid.BatchRunner``: ``Program.chunk`` over runs, ``vmap`` or ``lax.map`` by
``--width``) is timed against the *floor*: the same runs, mapped over runs the same way, doing only
what no Byzantine-robust simulation can avoid (sample the honest workers' batches with the same
keys, their per-worker gradients with the same flat parameters and ``grad_method``, the mean, an
SGD step; ``_bench.floor_chunk``). Interleaved, median of ``--repeats``; load average recorded.
Also prints the GFLOP/s of each (gradient flops only, 0.32 MFLOP a sample) and the floor's
fraction of the CPU's ~200 GFLOP/s fp32 peak (``--peak-gflops``). ``--workload`` picks another
``_bench.workload`` (``cifar_cnn``: the distributed-momentum grid's CIFAR-10 CNN), ``--n / --f /
--batch`` override its shape, ``--data auto`` trains on a random stand-in of the dataset's shapes
when its files are missing (same cost; the speed figures only).

    python benchmarks/floor.py --quick
    python benchmarks/floor.py --R 1 8 --rules mean median trimmed_mean krum --width 1
    python benchmarks/floor.py --R 64 --rules median --width 1 --steps 30
    python benchmarks/floor.py --R 64 --rules median median+nnm --width 1   # "+": pre-aggregators
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/floor.py --R 8 --width 1 --devices 2
    python benchmarks/floor.py --workload cifar_cnn --R 8 --rules median --steps 10 --data auto

Writes ``benchmarks/results/floor.json`` (merged by key).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _bench import (RESULTS, cnn_flop_per_step, dataset_or_stand_in, dm_cnn_flop_per_step,  # noqa: E402
                    floor_chunk, interleaved, load, meta, mlp_flop_per_step, over_runs, workload,
                    write_json)

PEAK_GFLOPS = 200.0
FLOP_PER_STEP = {"mlp": mlp_flop_per_step, "dm": mlp_flop_per_step, "cnn": cnn_flop_per_step,
                 "cifar_cnn": dm_cnn_flop_per_step}


def build(rule: str, R: int, width: int, steps: int, ds, wl: str = "mlp", devices: int = 1,
          over: dict | None = None):
    import jax
    import jax.numpy as jnp

    from jbyz.grid import BatchRunner, GridOptions, _stack
    from jbyz.simulate import get_program

    agg, *pre = rule.split("+")  # "median+nnm": the median after nearest-neighbour mixing
    extra = dict(over or {}, **({"preaggregators": tuple(pre)} if pre else {}))
    cfgs = [workload(wl, seed=s, steps=steps, aggregator=agg, **extra) for s in range(R)]
    prog = get_program(cfgs[0], dataset=ds)
    w = max(prog.split_width(c) for c in cfgs)
    inp = jax.tree.map(jnp.asarray, _stack([prog.inputs(c, w) for c in cfgs]))
    runner = BatchRunner(prog, R, GridOptions(vmap_width=width, devices=devices), devices)
    ini = runner.init_fn()
    t = time.perf_counter()
    fn = runner.chunk_fn(steps, (ini(inp), jnp.int32(0), inp, prog.train))
    c_jbyz = time.perf_counter() - t

    def jb():
        c, _ = fn(ini(inp), jnp.int32(0), inp, prog.train)
        jax.block_until_ready(c.params)

    fc = floor_chunk(prog, steps)
    train = prog.train
    per_dev = R // devices
    fl_body = over_runs(lambda p, i: fc(p, i, train), per_dev, min(width, per_dev))
    if devices > 1:  # the floor sharded over the same "runs" mesh as the grid
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((devices,), ("runs",), devices=jax.devices()[:devices])
        fl_body = jax.shard_map(fl_body, mesh=mesh, in_specs=(P("runs"), P("runs")),
                                out_specs=(P("runs"), P("runs")), check_vma=False)
        f_inp = jax.device_put(inp, NamedSharding(mesh, P("runs")))
    else:
        f_inp = inp
    fl_fn = jax.jit(fl_body)
    t = time.perf_counter()
    fl_c = fl_fn.lower(f_inp.params0, f_inp).compile()
    c_floor = time.perf_counter() - t

    def fl():
        jax.block_until_ready(fl_c(f_inp.params0, f_inp))

    return jb, fl, dict(compile_jbyz_s=c_jbyz, compile_floor_s=c_floor, width=runner.width)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", nargs="*", default=["mean", "median", "trimmed_mean", "krum"])
    ap.add_argument("--R", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--width", type=int, default=None, help="vmap width (default: R, i.e. vmap)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--devices", type=int, default=1,
                    help="shard the runs over this many devices, grid and floor alike (on CPU with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N: one device per core)")
    ap.add_argument("--workload", default="mlp", choices=list(FLOP_PER_STEP),
                    help="a _bench.workload (cifar_cnn: dm_cnn on CIFAR-10, n=25 f=11 b=50)")
    ap.add_argument("--n", type=int, default=None, help="override the workload's n_workers")
    ap.add_argument("--f", type=int, default=None, help="override the workload's f_real")
    ap.add_argument("--batch", type=int, default=None, help="override the workload's batch_size")
    ap.add_argument("--data", default="real", choices=["real", "auto", "stand-in"],
                    help="auto: a random stand-in of the dataset's shapes if its files are missing")
    ap.add_argument("--peak-gflops", type=float, default=PEAK_GFLOPS,
                    help="the device's fp32 peak for the %%peak column (default: this 2-core CPU)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--key", default=None)
    ap.add_argument("--out", default=str(RESULTS / "floor.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rules, args.R, args.steps, args.repeats = ["median"], [4], 10, 2

    over = {k: v for k, v in (("n_workers", args.n), ("f_real", args.f), ("batch_size", args.batch))
            if v is not None}
    shape = workload(args.workload, **over)
    ds, note = dataset_or_stand_in(shape.dataset, stand_in={"real": "never", "auto": "auto",
                                                            "stand-in": "always"}[args.data],
                                   **dict(shape.dataset_kwargs))
    flop = FLOP_PER_STEP[args.workload](shape.n_workers, shape.f_real, shape.batch_size)
    print(f"workload {args.workload}: {shape.dataset}{note}, {shape.model}, n={shape.n_workers} "
          f"f={shape.f_real} batch={shape.batch_size}, {flop / 1e6:.1f} MFLOP of gradients a step",
          flush=True)
    rows = []
    out = Path(args.out)
    key = args.key or ("quick" if args.quick else f"R{'-'.join(map(str, args.R))}:w{args.width or 'R'}"
                                          + (f":d{args.devices}" if args.devices > 1 else "")
                                          + (f":{args.workload}" if args.workload != "mlp" else ""))

    def save():  # after every row, so that a run stopped by a timeout keeps what it measured
        old = json.loads(out.read_text()) if out.exists() else {}
        old[key] = dict(meta=meta(), workload=args.workload, shape=dict(
            n=shape.n_workers, f=shape.f_real, batch=shape.batch_size, model=shape.model,
            dataset=shape.dataset + note), flop_per_step=flop, rows=rows)
        write_json(out, old)

    print(f"{'rule':<14}{'R':>4}{'width':>6}{'jbyz run-steps/s':>18}{'floor':>9}{'ratio':>7}"
          f"{'jbyz GFLOP/s':>14}{'floor GFLOP/s':>15}{'floor %peak':>12}{'CPU ratio':>10}{'load':>6}", flush=True)
    for R in args.R:
        width = args.width or R
        for rule in args.rules:
            if R % args.devices:
                sys.exit(f"--R {R} is not a multiple of --devices {args.devices}")
            jb, fl, info = build(rule, R, width, args.steps, ds, wl=args.workload,
                                 devices=args.devices, over=over)
            res = interleaved({"floor": fl, "jbyz": jb}, args.repeats)
            f_rs = R * args.steps / res["floor"]["median_s"]
            j_rs = R * args.steps / res["jbyz"]["median_s"]
            row = dict(rule=rule, R=R, steps=args.steps,
                       jbyz_run_steps_per_s=j_rs, floor_run_steps_per_s=f_rs, ratio=f_rs / j_rs,
                       jbyz_gflops=j_rs * flop / 1e9, floor_gflops=f_rs * flop / 1e9,
                       floor_fraction_of_peak=f_rs * flop / 1e9 / args.peak_gflops,
                       jbyz_cpu_ms_per_run_step=1e3 * res["jbyz"]["median_cpu_s"] / (R * args.steps),
                       floor_cpu_ms_per_run_step=1e3 * res["floor"]["median_cpu_s"] / (R * args.steps),
                       cpu_ratio=res["jbyz"]["median_cpu_s"] / res["floor"]["median_cpu_s"],
                       times_s={k: v["times_s"] for k, v in res.items()},
                       cpu_s={k: v["cpu_s"] for k, v in res.items()},
                       load=res["jbyz"]["load"] + res["floor"]["load"], **info)
            rows.append(row)
            save()
            print(f"{rule:<14}{R:>4}{info['width']:>6}{j_rs:>18.1f}{f_rs:>9.1f}{f_rs / j_rs:>7.2f}"
                  f"{j_rs * flop / 1e9:>14.2f}{f_rs * flop / 1e9:>15.2f}"
                  f"{100 * f_rs * flop / 1e9 / args.peak_gflops:>11.1f}%{row['cpu_ratio']:>10.2f}{load():>6.1f}",
                  flush=True)
    save()
    print(f"wrote {out} [{key}]")


if __name__ == "__main__":
    main()
