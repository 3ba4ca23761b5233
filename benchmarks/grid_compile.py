"""A real grid's compilation cold, warm and without the persistent cache, in fresh processes.

`jbyz run` keeps its compiled programs in JAX's persistent compilation cache (`jbyz.compile_cache`).
This script measures what that saves on an experiment's own grid, e.g. the distributed-momentum
grid's Fashion-MNIST seed 1 (184 runs in 90 compiled groups), without training it for two hours:
every run is cut to ``--chunks`` evaluation chunks (``steps = chunks * eval_every``), which compiles
exactly the programs of the full run (the chunk is a ``lax.scan`` of ``eval_every`` steps, whatever
``steps`` is) and trains 1/60 of it. Three fresh processes, in this order:

* ``off``:  ``--compile-cache off`` (the behaviour before the cache; every program compiled);
* ``cold``: an empty cache directory (every program compiled, then written);
* ``warm``: the same directory again (every program loaded).

Each reports process wall time, CPU seconds, the number of compiled groups, and the cache's
entries and bytes. ``cold - warm`` is what the cache saves on every later run of the grid. The
full grid's training time comes from the stored parts (``--stored``: the sum of the batches'
``wall_time_s``, which includes their own compilation), so the saving is put beside it.

    python benchmarks/grid_compile.py experiments/distributed_momentum/grid.toml \\
        --only dataset=fashion_mnist --only seed=1 \\
        --stored experiments/distributed_momentum/results/grid

Writes ``benchmarks/results/grid_compile.json`` (merged by ``--key``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
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


def configs(args):
    """The selected grid points, each cut to ``args.chunks`` evaluation chunks."""
    from jbyz.cli import select
    from jbyz.config import load_experiment

    runs = select(load_experiment(args.config).runs(), args.only or [])
    return runs, [dataclasses.replace(c, steps=min(c.steps, args.chunks * c.eval_every)) for c in runs]


def child(args) -> None:
    """Runs the cut grid once in this process (cache as given) and prints one JSON line."""
    from jbyz.config import load_experiment
    from jbyz.grid import GridOptions, plan, run_grid

    exp = load_experiment(args.config)
    opts = GridOptions.from_dict({**exp.execution, "compile_cache": args.cache})
    _, cut = configs(args)
    pl = plan(cut, opts)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_grid(cut, out, opts, progress=False, log=None)
    print(json.dumps(dict(runs=len(pl.configs), groups=len(pl.groups), batches=len(pl.batches),
                          run_grid_s=time.perf_counter() - t)), flush=True)


def cache_size(path: str) -> tuple[int, int]:
    """(entries, bytes) of a JAX compilation cache directory."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def stored_time(stored: str, run_ids: set[str]) -> dict | None:
    """The full grid's training time from its stored parts: sum over batches of ``wall_time_s``."""
    import pandas as pd

    parts = sorted(glob.glob(str(Path(stored) / "parts" / "*.parquet")))
    if not parts:
        return None
    frames = [pd.read_parquet(p, columns=["run_id", "batch_id", "wall_time_s"]) for p in parts]
    df = pd.concat(frames)
    df = df[df.run_id.isin(run_ids)]
    per_batch = df.groupby("batch_id").wall_time_s.max()
    return dict(runs_found=int(df.run_id.nunique()), batches=int(len(per_batch)),
                wall_s=float(per_batch.sum()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--only", action="append", metavar="FIELD=V1,V2")
    ap.add_argument("--chunks", type=int, default=1, help="evaluation chunks per run (default 1)")
    ap.add_argument("--stored", default=None, help="the full grid's output directory (its parts/)")
    ap.add_argument("--key", default=None)
    ap.add_argument("--out", default=str(RESULTS / "grid_compile.json"))
    ap.add_argument("--cache", default="off", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    base = list(argv if argv is not None else sys.argv[1:])
    runs, cut = configs(args)
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        for label, where in (("off", "off"), ("cold", cache), ("warm", cache)):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            l0, t = load(), time.perf_counter()
            out = subprocess.run([sys.executable, __file__, *base, "--child", "--cache", where],
                                 capture_output=True, text=True, check=True).stdout
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = json.loads(out.strip().splitlines()[-1])
            entries, size = cache_size(cache) if where != "off" else (0, 0)
            r.update(process_wall_s=wall, cpu_s=(after.ru_utime - before.ru_utime)
                     + (after.ru_stime - before.ru_stime), load=[l0, load()],
                     cache_entries=entries, cache_mb=size / 2**20)
            res[label] = r
            print(f"{label:<5} groups {r['groups']:>3}  runs {r['runs']:>4}  process {wall:7.1f} s  "
                  f"CPU {r['cpu_s']:7.1f} s  cache {entries} entries {size / 2**20:.1f} MB  "
                  f"load {l0:.1f}", flush=True)
    saved = res["cold"]["process_wall_s"] - res["warm"]["process_wall_s"]
    full = stored_time(args.stored, {c.config_hash() for c in runs}) if args.stored else None
    print(f"\nwarm vs cold: {res['cold']['process_wall_s'] / res['warm']['process_wall_s']:.2f}x wall, "
          f"{res['cold']['cpu_s'] / res['warm']['cpu_s']:.2f}x CPU; {saved:.0f} s saved per run of the grid")
    if full:
        print(f"the full grid's stored training time: {full['wall_s']:.0f} s over {full['batches']} "
              f"batches ({full['runs_found']} of {len(runs)} runs found); the cache saves "
              f"{100 * saved / full['wall_s']:.1f}% of it")
    key = args.key or f"{Path(args.config).stem}:{' '.join(args.only or [])}:{args.chunks}"
    outp = Path(args.out)
    old = json.loads(outp.read_text()) if outp.exists() else {}
    old[key] = dict(meta=meta(), args={k: v for k, v in vars(args).items()
                                       if k not in ("child", "out", "cache")},
                    steps_per_run=sorted({c.steps for c in cut}), runs=res, stored=full,
                    saved_s=saved)
    write_json(outp, old)
    print(f"wrote {outp} [{key}]")


if __name__ == "__main__":
    main()
