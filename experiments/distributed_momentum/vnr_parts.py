"""The variance-norm ratio's two factors, submitted against sampled, within worker-momentum runs.

    jbyz run experiments/distributed_momentum/vnr_parts.toml
    python experiments/distributed_momentum/vnr_parts.py      # -> results/vnr_parts.csv, .png

The ratio of El Mhamdi et al. (ICLR 2021) is r = (dev / norm)^2 with dev the spread of the honest
vectors and norm the length of their mean, so

    r_submitted / r_sampled = (dev_submitted / dev_sampled)^2 / (norm_submitted / norm_sampled)^2.

Momentum (sum form, mu = 0.9) makes both factors longer: the mean by up to 1 / (1 - mu) = 10 when
the honest mean gradient keeps its direction, the spread by about 1 / sqrt(1 - mu^2) = 2.3 when the
sampling noise is independent from step to step. The ratio falls below 1 only while the mean grows
more than the spread. The table gives, per run and phase (steps 1-50, 51-300), the medians over
the evaluation chunks (5 steps each) of the two factor ratios and of the ratio of ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from jbyz import results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MU = 0.9


def load(folder: Path = RESULTS / "vnr_parts") -> pd.DataFrame:
    df = results.load_results(folder)
    df = df[df["step"] > 0].copy()
    df["attack_name"] = results.component_name(df["attack"].astype(str)).str.upper()
    df["gar"] = np.where(df["aggregator"] == "median", "Median", "Krum (code)")
    df["norm_ratio"] = df["norm_submitted"] / df["norm_sampled"]
    df["dev_ratio"] = df["dev_submitted"] / df["dev_sampled"]
    df["ratio_of_ratios"] = df["vnr_submitted"] / df["vnr_sampled"]
    df["phase"] = np.where(df["step"] <= 50, "steps 1-50", "steps 51-300")
    return df


def table(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["norm_ratio", "dev_ratio", "ratio_of_ratios", "norm_sampled", "train_loss"]
    t = df.groupby(["attack_name", "lr", "gar", "phase"])[cols].median()
    return t.unstack("phase")


def figure(df: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = sorted(df.groupby(["attack_name", "lr"]).groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), sharey=True,
                             layout="constrained")
    for ax, (atk, lr) in zip(np.atleast_1d(axes), keys):
        sub = df[(df["attack_name"] == atk) & (df["lr"] == lr)]
        for (gar, g), ls in zip(sub.groupby("gar"), ("-", "--")):
            g = g.sort_values("step")
            ax.plot(g["step"], g["norm_ratio"], ls=ls, color="tab:blue", label=f"norm, {gar}")
            ax.plot(g["step"], g["dev_ratio"], ls=ls, color="tab:orange", label=f"dev, {gar}")
        ax.axhline(1 / (1 - MU), color="tab:blue", lw=0.6, ls=":")
        ax.axhline(1 / np.sqrt(1 - MU ** 2), color="tab:orange", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"{atk}, lr {lr:g}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("submitted / sampled")
    np.atleast_1d(axes)[0].legend(fontsize=6)
    fig.suptitle("Worker momentum: length of the honest mean (norm) and spread (dev), submitted "
                 "over sampled; dotted: 1/(1-mu) and 1/sqrt(1-mu^2)", fontsize=8)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None) -> int:
    df = load()
    t = table(df)
    t.to_csv(RESULTS / "vnr_parts.csv")
    figure(df, RESULTS / "vnr_parts.png")
    with pd.option_context("display.width", 220):
        print(t.to_string(float_format="{:.3f}".format))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
