"""OrMo vs ASGD vs naive ASGDm vs SSGDm: runs one experiment of ``config.toml`` and plots it.

Usage (from the repository root)::

    nice -n 10 python experiments/async_ormo/run.py --experiment fmnist_cnn
    python experiments/async_ormo/run.py --experiment fmnist_cnn --plot-only
    python experiments/async_ormo/run.py --experiment cifar10_resnet20 --check   # validate only

Writes ``results/<experiment>.parquet`` (one row per run and evaluation, via
:func:`jbyz.results.write_table`) and ``figures/<experiment>_*.png``. Finished runs are kept in
the table; a rerun skips them (delete the file to start over).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_config(path: Path, name: str) -> tuple[dict, dict, dict]:
    cfg = tomllib.loads(path.read_text())
    if name not in cfg:
        exps = [k for k in cfg if k not in ("settings", "variants")]
        sys.exit(f"unknown experiment {name!r}; valid: {', '.join(exps)}")
    return cfg[name], cfg["settings"], cfg["variants"]


def grid(exp: dict, settings: dict, variants: dict):
    """Yields (run_key, label, setting, AsyncConfig kwargs) for every grid point."""
    base = dict(exp["base"])
    if "lr_milestones" in base:
        base["lr_milestones"] = tuple(base["lr_milestones"])
    if "model_kwargs" in base and "channels" in base["model_kwargs"]:
        base["model_kwargs"] = {**base["model_kwargs"], "channels": tuple(base["model_kwargs"]["channels"])}
    for label, K, setting in itertools.product(exp["variants"], exp["workers"], exp["settings"]):
        kw = {**base, **variants[label], **settings[setting], "n_workers": int(K)}
        if "lr_reference_K" in exp:  # same lr * K for every K (lr is per gradient)
            kw["lr"] = base["lr"] * exp["lr_reference_K"] / K
        yield f"{label}|K={K}|{setting}", label, setting, kw


def run(name: str, config: Path, out: Path, check_only: bool) -> Path:
    import pandas as pd

    from jbyz.algorithms.async_sgd import AsyncConfig, AsyncSimulation, check
    from jbyz.results import run_metadata, write_table

    exp, settings, variants = load_config(config, name)
    points = list(grid(exp, settings, variants))
    for _, _, _, kw in points:
        check(AsyncConfig(**kw))
    print(f"{name}: {len(points)} configurations x {len(exp['seeds'])} seed(s): valid")
    if check_only:
        return out
    path = out / f"{name}.parquet"
    frames = []
    done = set()
    if path.exists():
        old = pd.read_parquet(path)
        frames.append(old)
        done = set(old["run_key"].unique())
    dataset = None
    for key, label, setting, kw in points:
        if key in done:
            print(f"skip {key} (done)")
            continue
        cfg = AsyncConfig(**kw)
        t0 = time.perf_counter()
        sim = AsyncSimulation(cfg, dataset)
        dataset = sim.ds
        results = sim.run([{"seed": s} for s in exp["seeds"]], progress=False)
        for r in results:
            df = r.to_frame()
            df["run_key"] = key
            df["variant"] = label
            df["setting"] = setting
            df["experiment"] = name
            df["wall_time_s"] = r.wall_time_s
            df["compile_time_s"] = r.compile_time_s
            frames.append(df)
        last = results[0].history[-1]
        print(f"{key}: acc {last['test_accuracy']:.4f} loss {last['test_loss']:.4f} "
              f"clock {last['wall_clock']:.1f} iters {last['iteration']} "
              f"({time.perf_counter() - t0:.1f} s, compile {results[0].compile_time_s:.1f} s)",
              flush=True)
        write_table(pd.concat(frames, ignore_index=True), path, {**run_metadata(), "experiment": name})
    return path


COLORS = {
    "OrMo": "C3", "OrMo-DA": "C1", "OrMo (vanilla SGD step)": "C5", "ASGD": "C0",
    "naive ASGDm": "C2", "SSGDm": "k", "SMEGA2": "C4",
}


def plot(name: str, out: Path, figdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_parquet(out / f"{name}.parquet")
    figdir.mkdir(parents=True, exist_ok=True)
    Ks = sorted(df["n_workers"].unique())
    settings = [s for s in ("homogeneous", "heterogeneous") if s in set(df["setting"])]
    paths = []
    for metric, ylabel in (("test_accuracy", "test accuracy"), ("train_loss", "training loss")):
        for x, xlabel in (("epoch", "epochs (arrivals x B / N)"), ("wall_clock", "simulated wall-clock")):
            fig, axes = plt.subplots(len(Ks), len(settings), figsize=(5.2 * len(settings), 3.6 * len(Ks)),
                                     squeeze=False)
            for (i, K), (j, s) in itertools.product(enumerate(Ks), enumerate(settings)):
                ax = axes[i, j]
                sub = df[(df["n_workers"] == K) & (df["setting"] == s)]
                for label in sub["variant"].unique():
                    runs = sub[sub["variant"] == label]
                    mean = runs.groupby("epoch")[[x, metric]].mean().reset_index(drop=True)
                    if metric == "train_loss":
                        mean = mean[mean[x] > 0]
                    ls = "--" if label == "SSGDm" else "-"
                    ax.plot(mean[x], mean[metric], ls, color=COLORS.get(label), label=label, lw=1.4)
                ax.set_title(f"K = {K}, {s}")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                if metric == "test_accuracy":
                    lo = max(0.0, float(sub[sub["epoch"] > 0][metric].quantile(0.05)) - 0.05)
                    ax.set_ylim(lo, None)
                else:
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
            axes[0, -1].legend(fontsize=8)
            fig.suptitle(f"{name}: {ylabel} vs {xlabel.split(' (')[0]}")
            fig.tight_layout()
            p = figdir / f"{name}_{metric}_vs_{x}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def summary(name: str, out: Path) -> str:
    import pandas as pd

    df = pd.read_parquet(out / f"{name}.parquet")
    last = df.sort_values("epoch").groupby(["run_key", "seed"]).tail(1)
    best = df.groupby(["run_key", "seed"])["test_accuracy"].max().rename("best_acc").reset_index()
    last = last.merge(best, on=["run_key", "seed"])
    cols = ["variant", "n_workers", "setting"]
    table = last.groupby(cols).agg(
        final_acc=("test_accuracy", "mean"), best_acc=("best_acc", "mean"),
        final_loss=("test_loss", "mean"), wall_clock=("wall_clock", "mean"),
        iterations=("iteration", "mean"), staleness=("staleness", "mean"),
        staleness_arrivals=("staleness_arrivals", "mean"), cpu_s=("wall_time_s", "mean"),
    ).reset_index().sort_values(["n_workers", "setting", "final_acc"], ascending=[True, True, False])
    return _markdown(table)


def _markdown(df) -> str:
    """A GitHub table without the optional ``tabulate`` dependency."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [list(df.columns)] + [[fmt(v) for v in r] for r in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(df.columns))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--config", type=Path, default=HERE / "config.toml")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--figures", type=Path, default=HERE / "figures")
    ap.add_argument("--check", action="store_true", help="validate the configurations only")
    ap.add_argument("--plot-only", action="store_true")
    a = ap.parse_args(argv)
    if not a.plot_only:
        run(a.experiment, a.config, a.out, a.check)
        if a.check:
            return
    for p in plot(a.experiment, a.out, a.figures):
        print("wrote", p)
    print(summary(a.experiment, a.out))


if __name__ == "__main__":
    main()
