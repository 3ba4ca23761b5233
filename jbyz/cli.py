"""The ``jbyz`` command: ``list``, ``check``, ``run``, ``plot``, ``select``.

Examples::

    jbyz list                                   # every component with a description + reference
    jbyz check experiments/quickstart.toml      # validate a configuration, no compute
    jbyz run my_grid.toml --import mypkg        # with components registered by mypkg
    jbyz run experiments/quickstart.toml        # run it: results.parquet, summary.csv, accuracy.png
    jbyz plot runs/quickstart/results.parquet --hue aggregator --col attack
    jbyz plot heatmap runs/grid --x batch_size --y f_real --col aggregator
    jbyz plot paired runs/grid --field momentum_at --a server --b worker
    jbyz select runs/benchmark                  # ByzFL's protocol: selection.csv + heatmaps
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


def _columns(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def _readable(df, values) -> str:
    """A table as text: metric columns with 4 decimals, everything else as short as it goes."""
    def fmt(col):
        if col in values:
            return lambda v: "" if v != v else (f"{v:.4f}" if isinstance(v, float) else str(v))
        return lambda v: f"{v:g}" if isinstance(v, float) else str(v)

    return df.to_string(index=False, formatters={c: fmt(c) for c in df.columns})


def _cmd_select(args) -> int:
    import pandas as pd

    from jbyz import plots, results

    df = results.load_results(args.results)
    base = Path(args.results)
    out = Path(args.out) if args.out else (base if base.is_dir() else base.parent)
    het = None if args.heterogeneity.lower() == "none" else args.heterogeneity
    kw = dict(by=_columns(args.by), over=args.over, tune=_columns(args.tune), heterogeneity=het,
              metric=args.metric, report=args.report, reduce_steps=args.steps,
              attacks=_columns(args.attacks))
    sel = results.select_hyperparameters(df, **kw)
    detail = results.select_hyperparameters(df, **kw, per_attack=True)
    info = sel.attrs["selection"]
    out.mkdir(parents=True, exist_ok=True)
    sel.to_csv(out / "selection.csv", index=False)
    detail.to_csv(out / "selection_per_attack.csv", index=False)
    x = "f_real" if "f_real" in info["by"] else None
    written = [out / "selection.csv", out / "selection_per_attack.csv"]
    if x is not None:
        plots.selection_heatmaps(sel, x=x, ncols=args.ncols, path=out / "selection_heatmaps.png")
        plots.best_rule_map(sel, x=x, path=out / "best_rule.png")
        written += [out / "selection_heatmaps.png", out / "best_rule.png"]
    tuned = ", ".join(info["tune"]) or "nothing (no column varies inside a cell)"
    print(f"ByzFL protocol: per {', '.join(info['by'])}, the {tuned} maximising "
          f"{info['metric']} against the worst {info['over']} ({info['reduce_steps']} evaluation "
          f"of the mean over seeds); {info['report']} reported there.\n")
    m, r = info["metric"], info["report"]
    shown = [*info["by"], *info["tune"],
             *(c for c in (f"{m}_worst", f"{r}_worst", f"{r}_worst_std", f"{r}_worst_attack",
                           "seeds", "candidates") if c in sel.columns)]
    print(_readable(sel[shown], [c for c in shown if c.startswith((f"{m}_", f"{r}_"))]))
    if x is not None:
        best = results.best_rule_per_cell(sel, x=x)
        print("\nbest rule per cell:")
        print(_readable(best, [f"{r}_worst", "runner_up"]))
    print("\nwrote " + ", ".join(str(p) for p in written))
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
                           help="list, check, run, plot or select")
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
    s = sub.add_parser(
        "select", help="ByzFL's benchmark protocol: per rule and setting, the hyper-parameters "
                       "best against the worst attack on validation, and their test accuracy",
        description="Per aggregator and cell (f_real x data heterogeneity), chooses the "
                    "hyper-parameters that vary (lr, momentum, pre-aggregators, ...) maximising "
                    "the worst case over attacks of the validation accuracy, reports the test "
                    "accuracy there, and writes selection.csv, selection_per_attack.csv, "
                    "selection_heatmaps.png and best_rule.png (jbyz.results."
                    "select_hyperparameters).")
    s.add_argument("results", help="a finished grid's output directory (or a results .parquet)")
    s.add_argument("--out", help="output directory (default: beside the results)")
    s.add_argument("--by", metavar="COL,COL",
                   help="the columns of a cell (default: aggregator,f_real,<heterogeneity>); e.g. "
                        "aggregator,preaggregators,f_real,heterogeneity keeps the "
                        "pre-aggregators a setting, as ByzFL does")
    s.add_argument("--tune", metavar="COL,COL",
                   help="the columns chosen per cell (default: every configuration column that "
                        "varies inside a cell)")
    s.add_argument("--over", default="attack",
                   help="the column of the adversaries of the worst case (default: attack)")
    s.add_argument("--attacks", metavar="NAME,NAME",
                   help="only these attacks (default: every attack in the table)")
    s.add_argument("--heterogeneity", default="auto",
                   help="the column of the data heterogeneity: auto (split and its parameter, "
                        "e.g. 'dirichlet alpha=0.1'), a column such as dirichlet_alpha, or none")
    s.add_argument("--metric", default="val_accuracy",
                   help="the column maximised over the candidates (default: val_accuracy; "
                        "test_accuracy selects on the test set, optimistically)")
    s.add_argument("--report", default="test_accuracy",
                   help="the column reported at the choice (default: test_accuracy)")
    s.add_argument("--steps", default="best", choices=("best", "max", "final", "at_val_best"),
                   help="a run's evaluations to one number: best (ByzFL: the best evaluation of "
                        "the seed-mean curve; max is the same), final, or at_val_best (the report "
                        "read where the validation curve is best) (default: best)")
    s.add_argument("--ncols", type=int, default=4, help="heatmap panels per row (default: 4)")
    s.set_defaults(fn=_cmd_select)
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
