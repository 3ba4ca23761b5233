"""The paper's headline statistics, computed the paper's way, from the grid's results.

    python experiments/distributed_momentum/analyze.py [experiments/distributed_momentum/results/grid]

Per run the metric is the highest observed test accuracy (every evaluation of the run). For an
attacked configuration and seed, with ``ref`` the max accuracy of the matching unattacked run
(same dataset, f, lr, Nesterov and seed; n - f honest workers averaging):

* ``loss = ref - acc_update`` (the attack's cost with momentum at the server, "at update");
* ``gain = acc_worker - acc_update`` (what moving momentum to the workers recovers).

Writes ``results/runs.csv`` (one row per run), ``results/headline.csv``, ``results/pairs.csv``,
``results/cells.csv`` (per GAR x attack x f), ``results/per_seed.csv`` and ``results/boxplot.png``
in this folder, and prints the statistics beside the paper's
(spec §4(c)).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from jbyz import results
from jbyz.plots import _mpl, per_run

PAPER = {
    "attack costs >= 20 points (FC)": "25.80 %",
    "attack costs >= 20 points (CNN)": "70.80 %",
    "worker momentum worse than server (pairs)": "4 pairs (0.23 %), all FC / Krum / FoE",
    "CNN f ~ n/2: worker recovers >= 10 / >= 20 points": "79.75 % / 49.25 %",
    "CNN f ~ n/4: worker recovers >= 20 points, where the attack costs >= 20": "95.07 %",
}
CONFIG = ["dataset", "model", "f_real", "lr", "nesterov", "aggregator", "attack", "seed"]


def pairs_table(df: pd.DataFrame) -> pd.DataFrame:
    runs = per_run(df)
    runs["attack"] = runs["attack"].astype(str)
    att = runs[runs["attack"] != "none"]
    ref = runs[runs["attack"] == "none"].copy()
    # the unattacked reference of f has n - f honest workers
    n_full = att.groupby("dataset")["n_workers"].max()
    ref["f_real"] = ref["dataset"].map(n_full).astype(float) - ref["n_workers"].astype(float)
    ref["f_real"] = ref["f_real"].astype("Int64")
    ref = ref.set_index(["dataset", "f_real", "lr", "nesterov", "seed"])["best"].rename("ref")
    up = att[att["momentum_at"] == "server"].set_index(CONFIG)["best"].rename("acc_update")
    wk = att[att["momentum_at"] == "worker"].set_index(CONFIG)["best"].rename("acc_worker")
    p = pd.concat([up, wk], axis=1, join="inner").reset_index()
    p = p.join(ref, on=["dataset", "f_real", "lr", "nesterov", "seed"])
    p["loss"] = p["ref"] - p["acc_update"]
    p["gain"] = p["acc_worker"] - p["acc_update"]
    p["family"] = np.where(p["model"].isin(["mlp"]), "FC", "CNN")
    n_by_ds = runs.groupby("dataset")["n_workers"].max()
    p["f_regime"] = np.where(p["f_real"] >= (p["dataset"].map(n_by_ds) - 3) // 2, "f ~ n/2", "f ~ n/4")
    return p


def _costly(g: pd.DataFrame) -> pd.Series:
    """Pairs where the attack costs >= 20 points at update."""
    return g["loss"] >= 0.2


def _recovers(g: pd.DataFrame, points: float) -> float:
    """Share of the pairs where the attack costs >= 20 points that worker momentum lifts by
    >= ``points`` (NaN when there are none)."""
    hurt = g[_costly(g)]
    return (hurt["gain"] >= points).mean() if len(hurt) else np.nan


def headline(p: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for fam, g in p.groupby("family"):
        g = g[g["ref"].notna()]  # pairs whose unattacked reference has run
        rows += [
            (fam, "all", "pairs (attacked config x seed)", len(g)),
            (fam, "all", "attack costs >= 20 points at update (share of pairs)", _costly(g).mean()),
            (fam, "all", "worker momentum worse than update (pairs)", int((g["gain"] < 0).sum())),
            (fam, "all", "worker momentum worse than update (share)", (g["gain"] < 0).mean()),
            (fam, "all", "worker recovers >= 10 points where attack costs >= 20", _recovers(g, 0.1)),
            (fam, "all", "worker recovers >= 20 points where attack costs >= 20", _recovers(g, 0.2)),
        ]
        for reg, h in g.groupby("f_regime"):
            rows += [
                (fam, reg, "attack costs >= 20 points at update", _costly(h).mean()),
                (fam, reg, "worker recovers >= 10 points where attack costs >= 20", _recovers(h, 0.1)),
                (fam, reg, "worker recovers >= 20 points where attack costs >= 20", _recovers(h, 0.2)),
            ]
    return pd.DataFrame(rows, columns=["family", "f", "statistic", "value"])


def cells_table(p: pd.DataFrame) -> pd.DataFrame:
    """Per (GAR, attack, f) cell, over its pairs (2 lr x 2 Nesterov x seeds): mean loss, mean
    gain, the pairs where worker momentum is worse, and the pairs."""
    g = p[p["ref"].notna()].copy()
    g["attack_name"] = results.component_name(g["attack"])
    out = g.groupby(["f_real", "aggregator", "attack_name"]).agg(
        loss=("loss", "mean"), gain=("gain", "mean"), worse=("gain", lambda v: int((v < 0).sum())),
        pairs=("gain", "size")).reset_index()
    return out.sort_values(["f_real", "aggregator", "attack_name"], ascending=[False, True, True])


def per_seed(p: pd.DataFrame) -> pd.DataFrame:
    """The headline statistics seed by seed (FC pairs with a reference)."""
    rows = []
    for seed, g in p[p["ref"].notna()].groupby("seed"):
        rows.append(dict(seed=seed, pairs=len(g), attack_costs_20=_costly(g).mean(),
                         worse=int((g["gain"] < 0).sum()), recovers_10=_recovers(g, 0.1),
                         recovers_20=_recovers(g, 0.2)))
    return pd.DataFrame(rows)


def boxplot(df: pd.DataFrame, path: Path) -> None:
    """Max accuracy per GAR, at update vs at the workers, one panel per (dataset, attack, f)."""
    plt = _mpl()
    runs = per_run(df)
    runs["attack"] = runs["attack"].astype(str)
    att = runs[runs["attack"] != "none"]
    ref = runs[runs["attack"] == "none"]
    panels = att.groupby(["dataset", "attack", "f_real"]).size().index.tolist()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (ds, atk, f) in zip(axes[0], panels):
        sub = att[(att.dataset == ds) & (att.attack == atk) & (att.f_real == f)]
        gars = list(dict.fromkeys(sub["aggregator"]))
        data, pos, colors = [], [], []
        for i, g in enumerate(gars):
            for j, (where, c) in enumerate((("server", "tab:orange"), ("worker", "tab:blue"))):
                data.append(sub[(sub.aggregator == g) & (sub.momentum_at == where)]["best"].to_numpy())
                pos.append(i * 3 + j)
                colors.append(c)
        bp = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=True)
        for patch, c in zip(bp["boxes"], colors):
            patch.set_facecolor(c)
            patch.set_alpha(0.6)
        n_full = runs[runs.dataset == ds]["n_workers"].max()
        r = ref[(ref.dataset == ds) & (ref.n_workers == n_full - f)]["best"]
        if len(r):
            ax.axhline(r.median(), color="k", ls="--", lw=0.8)
        ax.set_xticks([i * 3 + 0.5 for i in range(len(gars))], gars, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{ds}\n{atk.split(chr(34))[3] if atk.startswith('{') else atk}, f = {f}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("max test accuracy")
    from matplotlib.patches import Patch

    # below the panels, so that it hides no box (Krum / FoE at update sits at ~0.13)
    fig.legend([Patch(color="tab:orange", alpha=0.6), Patch(color="tab:blue", alpha=0.6)],
               ["momentum at update (server)", "momentum at the workers"], fontsize=8,
               loc="lower center", ncol=2)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=150)


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the grid's fields, ``best`` / ``final`` accuracy, mean variance-norm ratio."""
    runs = per_run(df)
    vnr = df[df["step"] > 0].groupby("run_id")["variance_norm_ratio"].mean().rename("mean_vnr")
    runs = runs.join(vnr, on="run_id")
    keep = ["run_id", "dataset", "model", "n_workers", "f_real", "lr", "nesterov", "momentum_at",
            "aggregator", "attack", "seed", "best", "final", "mean_vnr", "wall_time_s"]
    return runs[keep]


def main(folder="experiments/distributed_momentum/results/grid", dest=None):
    folder = Path(folder)
    dest = Path(dest) if dest else Path(__file__).resolve().parent / "results"
    dest.mkdir(parents=True, exist_ok=True)
    df = results.load_results(folder)
    runs = runs_table(df)
    runs.to_csv(dest / "runs.csv", index=False)
    p = pairs_table(df)
    p.to_csv(dest / "pairs.csv", index=False)
    h = headline(p)
    h.to_csv(dest / "headline.csv", index=False)
    cells = cells_table(p)
    cells.to_csv(dest / "cells.csv", index=False)
    seeds = per_seed(p)
    seeds.to_csv(dest / "per_seed.csv", index=False)
    boxplot(df, dest / "boxplot.png")
    print(f"{len(runs)} runs ({runs['seed'].nunique()} seed(s)); "
          f"sum of per-run wall time (compilation excluded) {runs['wall_time_s'].sum() / 60:.1f} min")
    with pd.option_context("display.width", 160, "display.max_colwidth", 80):
        print(h.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\npaper:", *(f"  {k}: {v}" for k, v in PAPER.items()), sep="\n")
    worse = p[p["gain"] < 0].sort_values("gain")
    print(f"\npairs where worker momentum is worse: {len(worse)}")
    print(worse[CONFIG + ["acc_update", "acc_worker", "gain"]].head(20).to_string(index=False))
    print("\nper seed:\n" + seeds.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nper cell (mean over its pairs):\n"
          + cells.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    q = p[p["ref"].notna()]
    print("\nattack costs >= 20 points, by lr:\n"
          + q.groupby("lr")[["loss"]].apply(lambda v: _costly(v).mean()).to_string())
    print("worker momentum better (gain > 0): "
          f"{int((q['gain'] > 0).sum())} of {len(q)}; where the attack costs >= 20: "
          f"{(q[_costly(q)]['gain'] > 0).mean():.4f}")
    ref = runs[runs["attack"] == "none"]["best"]
    print(f"unattacked references: {len(ref)} runs, max accuracy {ref.min():.4f}-{ref.max():.4f}, "
          f"median {ref.median():.4f}")
    lr_vnr = runs[runs["attack"] != "none"].groupby(["lr", "momentum_at"])["mean_vnr"].median()
    print("\nmedian over runs of the mean variance-norm ratio:\n" + lr_vnr.to_string())


if __name__ == "__main__":
    main(*sys.argv[1:])
