"""A sweep over an attack's strength: one compiled program (traced hyper-parameters) or one per value.

Since 2026-12-03 a grid's runs that differ only in an attack's float hyper-parameters (ALIE's
``z``, FoE's ``eps``, ...) share one compiled program (``jbyz.chain.traced_attack_kwargs``);
``JBYZ_TRACED_ATTACK_KWARGS=0`` restores the previous behaviour (the value compiled in, one
program per value). This script runs the same grid both ways, end to end (``jbyz.grid.run_grid``
in a fresh subprocess each time, persistent compilation cache off, a fresh output directory),
interleaved, and reports wall time, CPU time, the number of compiled groups, and whether the two
ways give the same results.

Default grid: ``_bench.workload("mlp")`` (Fashion-MNIST, MLP 784-100-10, n = 10, f = 3, batch 32,
worker momentum 0.9, median), ALIE with z in {0.25, 0.5, 0.75, 1, 1.5, 2} x seeds {0, 1}: 12 runs.

    python benchmarks/compile_sharing.py                      # 300 steps, 2 repeats
    python benchmarks/compile_sharing.py --steps 50 --repeats 1 --values 0.5 1.5

Writes ``benchmarks/results/compile_sharing.json`` (merged by ``--key``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _bench import RESULTS, load, meta, write_json  # noqa: E402


def child(args) -> None:
    """Runs the grid once in this process and prints one JSON line."""
    from _bench import workload
    from jbyz.grid import plan, run_grid

    cfgs = [workload("mlp", seed=s, steps=args.steps, aggregator=args.rule, attack=args.attack,
                     attack_kwargs={args.param: v, **({"sign": "plus"} if args.attack == "alie" else {})})
            for v in args.values for s in range(args.seeds)]
    groups = len(plan(cfgs).groups)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        df = run_grid(cfgs, out, progress=False, log=lambda *a, **k: None)
    wall = time.perf_counter() - t
    last = df[df.step == df.step.max()].set_index("run_id").test_accuracy
    print(json.dumps(dict(groups=groups, runs=len(cfgs), wall_s=wall,
                          final={k: float(v) for k, v in last.items()})), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attack", default="alie")
    ap.add_argument("--param", default="z")
    ap.add_argument("--values", type=float, nargs="*", default=[0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rule", default="median")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--key", default=None)
    ap.add_argument("--out", default=str(RESULTS / "compile_sharing.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--child"]
    rows = {"compiled in (one program per value)": "0", "traced (one program)": "1"}
    res = {k: [] for k in rows}
    for rep in range(args.repeats):
        for label, flag in rows.items():
            env = dict(os.environ, JBYZ_TRACED_ATTACK_KWARGS=flag, JBYZ_COMPILE_CACHE="off")
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            l0, t = load(), time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", *passthrough], env=env,
                                 capture_output=True, text=True, check=True).stdout
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = json.loads(out.strip().splitlines()[-1])
            r.update(process_wall_s=wall, cpu_s=(after.ru_utime - before.ru_utime)
                     + (after.ru_stime - before.ru_stime), load=[l0, load()], repeat=rep)
            res[label].append(r)
            print(f"[{rep}] {label:<38} groups {r['groups']:>3}  process {wall:7.1f} s  "
                  f"run_grid {r['wall_s']:7.1f} s  CPU {r['cpu_s']:7.1f} s  load {l0:.1f}", flush=True)

    import statistics

    a, b = (res[k] for k in rows)
    same = all(x["final"] == y["final"] for x, y in zip(a, b))
    diff = max(abs(x["final"][k] - y["final"][k]) for x, y in zip(a, b) for k in x["final"])
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("process_wall_s", "wall_s", "cpu_s")}
           for k, v in res.items()}
    (ka, kb) = rows
    print(f"\nmedian process wall: {med[ka]['process_wall_s']:.1f} s vs {med[kb]['process_wall_s']:.1f} s "
          f"({med[ka]['process_wall_s'] / med[kb]['process_wall_s']:.2f}x); CPU "
          f"{med[ka]['cpu_s']:.1f} s vs {med[kb]['cpu_s']:.1f} s "
          f"({med[ka]['cpu_s'] / med[kb]['cpu_s']:.2f}x); final test accuracies "
          f"{'identical' if same else f'differ by at most {diff:.2e}'}")
    key = args.key or f"{args.attack}.{args.param}:{len(args.values)}x{args.seeds}:{args.rule}:{args.steps}"
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    old[key] = dict(meta=meta(), args={k: v for k, v in vars(args).items() if k not in ("child", "out")},
                    runs=res, median=med, identical=same, max_abs_diff=diff)
    write_json(out, old)
    print(f"wrote {out} [{key}]")


if __name__ == "__main__":
    main()
