"""The composite-curvature slice (``curvature.toml``): figure and table.

    python experiments/distributed_momentum/curvature.py [experiments/distributed_momentum/results/curvature]

Per run: ``composite_curvature`` (mean of s_t over each 5-step evaluation chunk) against the step,
one panel per learning rate, one line per (GAR, momentum position) and the unattacked reference;
and a table of the run's mean s_t over steps 5-300, its max accuracy and mean variance-norm ratio.
Writes ``results/curvature.png`` and ``results/curvature.csv`` in this folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from jbyz import results
from jbyz.plots import _mpl


def main(folder="experiments/distributed_momentum/results/curvature", dest=None):
    dest = Path(dest) if dest else Path(__file__).resolve().parent / "results"
    df = results.load_results(folder)
    df = df[df["step"] > 0].copy()
    df["attack"] = df["attack"].astype(str)
    df["label"] = [("reference (27 honest, mean)" if a == "none" else f"{g}, momentum at {'update' if m == 'server' else 'workers'}")
                   for a, g, m in zip(df["attack"], df["aggregator"], df["momentum_at"])]
    table = df.groupby(["lr", "label"]).agg(
        mean_curvature=("composite_curvature", "mean"), max_accuracy=("test_accuracy", "max"),
        mean_vnr=("variance_norm_ratio", "mean")).reset_index()
    table.to_csv(dest / "curvature.csv", index=False)
    plt = _mpl()
    lrs = sorted(df["lr"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 3.8), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for label, g in df[df["lr"] == lr].groupby("label"):
            ls = "--" if "update" in label else ("-" if "workers" in label else ":")
            ax.plot(g["step"], g["composite_curvature"], ls, lw=1.2, label=label,
                    color="k" if "reference" in label else None)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"Fashion-MNIST, n = 51, f = 24, ALIE, lr = {lr}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("composite curvature $s_t$ (5-step mean)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest / "curvature.png", dpi=150)
    with pd.option_context("display.width", 160):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main(*sys.argv[1:])
