"""How to run a fixed-compute grid: grouping choices measured on one slice of scaled.toml.

    nice -n 5 python experiments/byzsgdnm/bench_grouping.py [--out /tmp/byzsgdnm_bench]

The slice: ByzSGDnm + CM under ALIE, f_real in {1, 3}, B in {8, 32, 128}, lr0 in {0.03, 0.1, 0.3}
(18 runs, 2.18 epochs each). Batch size and step count are static (they set array shapes and the
scan length), so runs of different B cannot share a compiled program without padding; padding
every run to the largest B and the longest T would multiply each run's compute by
``B_max T_max / (B T)`` = 16 here (C fixed makes B T constant; B_max T_max = 128 x 2048 = 16 x
8 x 2048), so padding is ruled out without measuring. Measured:

* ``grid``: ``jbyz.grid.run_grid`` as the config file runs it: one group per (B, compute_budget),
  i.e. per (B, delta), vmapping its 3 learning rates: 6 groups.
* ``grid_merged``: the same runs with ``steps`` given and no ``compute_budget``, so that
  f_real = 1 and 3 (same T) share a group: 3 groups of 6 (the group computes 7 gradient rows
  for both, instead of 5 for f_real = 3).
* ``sequential``: ``jbyz.simulate.run`` one run at a time (one compiled program per static key,
  reused across learning rates and f_real).

Prints the wall time of each and writes ``bench_grouping.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import pandas as pd

from jbyz import grid, simulate
from jbyz.config import load_experiment

HERE = Path(__file__).resolve().parent


def slice_runs():
    exp = load_experiment(HERE / "scaled.toml")
    return [c for c in exp.runs() if c.attack == "alie" and c.aggregator == "median" and c.normalize
            and not c.preaggregators and c.f_real in (1, 3)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/byzsgdnm_bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    runs = slice_runs()
    merged = [dataclasses.replace(c, compute_budget=None) for c in runs]  # steps kept as derived
    rows = []

    def timed(name, fn, n_groups):
        t = time.perf_counter()
        acc = fn()
        rows.append(dict(variant=name, runs=len(runs), groups=n_groups,
                         wall_s=round(time.perf_counter() - t, 1), mean_final_acc=round(acc, 4)))
        print(rows[-1], flush=True)

    def run_grid(cfgs, sub):
        table = grid.run_grid(cfgs, out / sub, progress=False, log=None)
        return float(table.sort_values("step").groupby("run_id")["test_accuracy"].last().mean())

    def sequential():
        return sum(simulate.run(c, progress=False).final_accuracy for c in runs) / len(runs)

    timed("grid", lambda: run_grid(runs, "grid"), len(grid.plan(runs).groups))
    timed("grid_merged", lambda: run_grid(merged, "merged"), len(grid.plan(merged).groups))
    timed("sequential", sequential, len({simulate.static_key(c) for c in runs}))
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "bench_grouping.csv", index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
