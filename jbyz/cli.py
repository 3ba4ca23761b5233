"""The ``jbyz`` command: ``list``, ``check``, ``run``, ``plot``.

Examples::

    jbyz list                                   # every component with a description + reference
    jbyz check experiments/quickstart.toml      # validate a configuration, no compute
    jbyz run my_grid.toml --import mypkg        # with components registered by mypkg
    jbyz run experiments/quickstart.toml        # run it: results.parquet, summary.csv, accuracy.png
    jbyz plot runs/quickstart/results.parquet --hue aggregator --col attack
    jbyz plot heatmap runs/grid --x batch_size --y f_real --col aggregator
    jbyz plot paired runs/grid --field momentum_at --a server --b worker
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path


def _cmd_list(args) -> int:
    from jbyz import aggregators, attacks, compression, data, models, preaggregators, protocols

    groups = [
        ("Aggregators", aggregators.AGGREGATORS),
        ("Pre-aggregators", preaggregators.PREAGGREGATORS),
        ("Attacks", attacks.ATTACKS),
        ("Compressors", compression.COMPRESSORS),
        ("Latency models", protocols.LATENCIES),
        ("Models", models.MODELS),
        ("Datasets", data.DATASETS),
    ]
    for title, reg in groups:
        if args.kind and args.kind not in title.lower():
            continue
        print(f"\n{title} ({len(reg)})")
        width = max(len(n) for n in reg.names())
        for name, desc, ref in reg.describe():
            print(f"  {name:<{width}}  {desc}")
            if ref:
                print(" " * (width + 4) + textwrap.shorten(f"[{ref}]", 100))
    return 0


def _cmd_check(args) -> int:
    from jbyz.config import load_experiment
    from jbyz.validation import validate
    from jbyz.plugins import load_plugins

    load_plugins(args.imports or [])
    exp = load_experiment(args.config)
    runs = exp.runs()
    bad = 0
    for cfg in runs:
        errs = validate(cfg)
        if errs:
            bad += 1
            print(f"INVALID {cfg.label()}:\n  - " + "\n  - ".join(errs))
    print(f"{len(runs) - bad} valid, {bad} invalid run(s) in {args.config}")
    return 1 if bad else 0


def select(runs, only):
    """The runs matching every ``FIELD=V1,V2`` filter (values compared as text)."""
    from jbyz.config import FIELDS
    from jbyz.registry import ConfigError

    out = list(runs)
    for item in only:
        if "=" not in item:
            raise ConfigError(f"--only expects FIELD=VALUE[,VALUE...], got {item!r}")
        field, values = item.split("=", 1)
        if field not in FIELDS:
            raise ConfigError(f"--only: unknown field {field!r}; valid: {', '.join(sorted(FIELDS))}")
        allowed = {v.strip().lower() for v in values.split(",")}  # true/True alike
        kept = [r for r in out if str(getattr(r, field)).lower() in allowed]
        if out and not kept:
            seen = sorted({str(getattr(r, field)) for r in out})
            raise ConfigError(f"--only {item} matches none of the {len(out)} grid points left; "
                              f"values of {field} there: {', '.join(seen[:20])}")
        out = kept
    return out


def run_experiment(config_path, out_dir=None, progress=True, quiet=False, options=None, only=None,
                   plugins=None):
    """Runs every point of a configuration file as a grid (grouped, vmapped, resumable).

    Writes ``results.parquet`` (one row per run and evaluation), ``summary.csv`` (final and best
    accuracy per configuration, mean and spread over seeds) and ``accuracy.png`` into the output
    directory; a rerun of the same command resumes where a killed one stopped. ``plugins``:
    modules (names or ``.py`` paths) imported first, as ``jbyz run --import`` (see
    :mod:`jbyz.plugins`).
    """
    from jbyz import grid, plots, results
    from jbyz.config import load_experiment
    from jbyz.plugins import load_plugins
    from jbyz.registry import ConfigError

    load_plugins(plugins or [])
    exp = load_experiment(config_path)
    out = Path(out_dir) if out_dir else exp.output_dir
    opts = grid.GridOptions.from_dict({**exp.execution, **(options or {})})
    t0 = time.perf_counter()
    runs = exp.runs()
    subset = select(runs, only or [])
    if not subset:
        raise ConfigError(f"--only {' '.join(only)} matches none of the {len(runs)} grid points")
    table = grid.run_grid(subset, out, opts, progress=progress, log=None if quiet else print,
                          table_configs=runs if only else None)
    if table is None:  # a process other than 0 of a multi-process job
        return None
    summary = results.summarize(table)
    summary.to_csv(out / "summary.csv", index=False)
    hue = "aggregator" if table["aggregator"].nunique() > 1 else "attack"
    col = "attack" if table["attack"].nunique() > 1 and hue != "attack" else None
    # a third field that varies (e.g. where the momentum lives) gets its own line style
    style = next((f for f in ("momentum_at", "preaggregators", "nesterov", "f_real", "lr",
                              "batch_size") if f in table and table[f].astype(str).nunique() > 1
                  and table[f].astype(str).nunique() <= 4), None)
    plots.accuracy_curves(table, hue=hue, col=col, path=out / "accuracy.png",
                          title=Path(config_path).stem, style=style)
    if not quiet:
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 20,
                               "display.max_rows", 60):
            print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"\n{table['run_id'].nunique()} runs in {time.perf_counter() - t0:.1f} s")
        print(f"results: {out / 'results.parquet'}\nsummary: {out / 'summary.csv'}\n"
              f"plot:    {out / 'accuracy.png'}")
    return table


def _cmd_run(args) -> int:
    if args.coordinator or args.distributed:
        import jax

        # Collectives between CPU processes (results are gathered to process 0) need gloo;
        # the setting only concerns CPU devices, so it is harmless on GPU/TPU clusters.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if args.coordinator:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        else:
            jax.distributed.initialize()  # cluster auto-detection (SLURM, Open MPI, ...)
    opts = {}
    if args.skip_invalid:
        opts["invalid"] = "skip"
    for k in ("devices", "runs_per_call", "vmap_width", "compile_cache"):
        if getattr(args, k) is not None:
            opts[k] = getattr(args, k)
    run_experiment(args.config, args.out, progress=not args.no_progress, options=opts,
                   only=args.only, plugins=args.imports)
    return 0


def _cmd_plot(args) -> int:
    from jbyz import plots, results

    df = results.load_results(args.results)
    base = Path(args.results)
    folder = base if base.is_dir() else base.parent
    out = Path(args.out) if args.out else folder / f"{args.kind}.png"
    if args.kind == "curves":
        plots.accuracy_curves(df, hue=args.hue, col=args.col, metric=args.metric, path=out)
    elif args.kind == "heatmap":
        if not (args.x and args.y):
            raise SystemExit("jbyz plot heatmap needs --x and --y (two config columns)")
        plots.heatmap(df, x=args.x, y=args.y, stat=args.stat, metric=args.metric, col=args.col, path=out)
    else:
        if not (args.field and args.a is not None and args.b is not None):
            raise SystemExit("jbyz plot paired needs --field, --a and --b "
                             "(e.g. --field momentum_at --a server --b worker)")
        _, pairs = plots.paired(df, field=args.field, a=args.a, b=args.b, stat=args.stat,
                                metric=args.metric, hue=args.hue, path=out)
        print(f"{len(pairs)} pairs; mean gain {pairs['gain'].mean():+.4f}; "
              f"{args.b} better in {(pairs['gain'] > 0).mean():.1%}")
    print(f"wrote {out}")
    return 0


IMPORT_HELP = ("import this module first (a name importable from PYTHONPATH, or a .py path), "
               "e.g. one that registers your own aggregators, attacks or models; repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The ``jbyz`` argument parser (every option carries its help text)."""
    from jbyz._version import __version__

    p = argparse.ArgumentParser(prog="jbyz", description="Byzantine-robust distributed learning in JAX.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print jbyz's version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           help="list, check, run or plot")
    s = sub.add_parser("list", help="list aggregators, pre-aggregators, attacks, models and datasets",
                       description="Every registered component with its description and reference.")
    s.add_argument("kind", nargs="?", help="only one family, e.g. 'attacks'")
    s.set_defaults(fn=_cmd_list)
    s = sub.add_parser("check", help="validate a configuration file without running it",
                       description="Builds every grid point of a configuration file and reports "
                                   "every problem found; no data is loaded, nothing is trained.")
    s.add_argument("config", help="the TOML configuration file")
    s.add_argument("--import", dest="imports", action="append", metavar="MODULE", help=IMPORT_HELP)
    s.set_defaults(fn=_cmd_check)
    s = sub.add_parser("run", help="run a configuration file",
                       description="Runs every grid point of a configuration file (resumable) and "
                                   "writes results.parquet, summary.csv and accuracy.png.")
    s.add_argument("config", nargs="?", default=str(Path("experiments") / "quickstart.toml"),
                   help="the TOML configuration file (default: experiments/quickstart.toml)")
    s.add_argument("--import", dest="imports", action="append", metavar="MODULE", help=IMPORT_HELP)
    s.add_argument("--out", help="output directory (default: [output] dir of the file, or runs/<name>)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--only", action="append", metavar="FIELD=V1,V2",
                   help="run only the grid points with these values (repeatable), e.g. "
                        "--only dataset=fashion_mnist --only seed=1,2")
    s.add_argument("--skip-invalid", action="store_true",
                   help="run the valid grid points; list the invalid ones in invalid.csv")
    s.add_argument("--devices", type=int, help="devices on the runs mesh axis (default: all)")
    s.add_argument("--runs-per-call", type=int, help="runs per batch (the unit of saving/resuming)")
    s.add_argument("--vmap-width", type=int, help="runs vectorised together (default: auto)")
    s.add_argument("--compile-cache", metavar="DIR|off",
                   help="JAX's persistent compilation cache: a directory, 'off' or 'on' (default: "
                        "$JBYZ_COMPILE_CACHE, else a per-user directory such as ~/.cache/jbyz/jax; "
                        "the run's first line says which)")
    s.add_argument("--coordinator", help="multi-process: address:port of process 0")
    s.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    s.add_argument("--process-id", type=int, help="multi-process: this process's index")
    s.add_argument("--distributed", action="store_true",
                   help="multi-process with cluster auto-detection (jax.distributed.initialize())")
    s.set_defaults(fn=_cmd_run)
    s = sub.add_parser("plot", help="figures from a results file or directory: curves, heatmap, paired",
                       description="curves: a metric over steps; heatmap: a statistic over two "
                                   "config columns; paired: runs that differ in one field, "
                                   "against each other.")
    s.add_argument("kind", nargs="?", choices=("curves", "heatmap", "paired"), default="curves",
                   help="the figure (default: curves)")
    s.add_argument("results", help="a results .parquet file or a grid's output directory")
    s.add_argument("--out", help="the image file (default: <kind>.png beside the results)")
    s.add_argument("--hue", default="aggregator",
                   help="curves, paired: the column that colours lines / points (default: aggregator)")
    s.add_argument("--col", default=None, help="one panel per value of this column")
    s.add_argument("--metric", default="test_accuracy",
                   help="the metric column plotted (default: test_accuracy)")
    s.add_argument("--stat", default="best", choices=("best", "final"),
                   help="heatmap, paired: each run's best or final value of the metric (default: best)")
    s.add_argument("--x", help="heatmap: column on the x axis (e.g. batch_size)")
    s.add_argument("--y", help="heatmap: column on the y axis (e.g. f_real)")
    s.add_argument("--field", help="paired: the field compared (e.g. momentum_at)")
    s.add_argument("--a", help="paired: first value (x axis)")
    s.add_argument("--b", help="paired: second value (y axis)")
    s.set_defaults(fn=_cmd_plot)
    return p


def main(argv=None) -> int:
    p = build_parser()
    if argv is None:  # the `jbyz` command (not a call from a session): figures go to files only
        import matplotlib

        matplotlib.use("Agg")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"] and len(argv) > 1 and argv[1] not in ("curves", "heatmap", "paired"):
        argv.insert(1, "curves")  # `jbyz plot RESULTS` = curves
    args = p.parse_args(argv)
    from jbyz.registry import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"jbyz: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
