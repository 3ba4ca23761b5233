"""Figures and tables of the dSTAR first-k experiment from ``jbyz run``'s results table.

Usage (after ``nice -n 10 jbyz run experiments/stragglers_dstar/config.toml``)::

    python experiments/stragglers_dstar/plot.py [runs/stragglers_dstar]

Writes into this folder:
  accuracy_vs_k.png       final test accuracy vs k, one panel per attack, one line per rule;
  time_per_iteration.png  simulated time per iteration vs k (and the speed-up over k = n);
  accuracy_vs_time.png    test accuracy vs simulated wall-clock, dSTAR and the median, per k;
  results.md              the final-accuracy and time tables quoted in the README (plus the
                          dSTAR ablation when ``runs/stragglers_dstar_ablation`` exists).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
RULES = ["dstar", "mean", "median", "trimmed_mean", "krum", "geometric_median"]
LABEL = {"dstar": "dSTAR (E1, D1, k-f)", "mean": "mean", "median": "CM (median)",
         "trimmed_mean": "TM (b=f)", "krum": "Krum", "geometric_median": "GM"}
ATTACKS = ["none", "alie", "foe", "sign_flip", "gaussian"]
ATTACK_LABEL = {"none": "no attack", "alie": "ALIE", "foe": "FoE (eps 0.1)",
                "sign_flip": "sign flip (-10x)", "gaussian": "Gaussian (var 200)"}


def main(out_dir: str = "runs/stragglers_dstar") -> None:
    df = pd.read_parquet(Path(out_dir) / "results.parquet")
    last = df[df["step"] == df["steps"]].copy()
    last["time_per_iter"] = last["sim_time"] / last["steps"]
    acc = last.pivot_table(index=["attack", "aggregator"], columns="first_k",
                           values="test_accuracy", aggfunc="mean")
    ks = sorted(last["first_k"].unique())
    n = int(last["n_workers"].iloc[0])
    f = int(last["f_real"].iloc[0])

    # 1. Accuracy vs k per attack.
    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(4 * len(ATTACKS), 3.6), sharey=True)
    for ax, att in zip(axes, ATTACKS):
        for rule in RULES:
            if (att, rule) not in acc.index:
                continue
            row = acc.loc[(att, rule)]
            style = dict(lw=2.5, color="black") if rule == "dstar" else dict(lw=1.2)
            ax.plot(ks, [row[k] for k in ks], marker="o", label=LABEL[rule], **style)
        ax.set_title(ATTACK_LABEL[att])
        ax.set_xlabel("k (first arrivals kept)")
        ax.set_xticks(ks)
        ax.set_ylim(0, 0.9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy after {int(last['steps'].iloc[0])} steps")
    handles = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0]))
    axes[-1].legend(*handles, loc="lower right", fontsize=8)
    fig.suptitle(f"Fashion-MNIST MLP, n={n}, f={f} Byzantine arriving first; first-k rounds")
    fig.tight_layout()
    fig.savefig(HERE / "accuracy_vs_k.png", dpi=120)
    plt.close(fig)

    # 2. Simulated time per iteration vs k (the same latency draws for every rule and attack).
    tpi = last.groupby("first_k")["time_per_iter"].agg(["mean", "min", "max"])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(tpi.index, tpi["mean"], marker="o", color="black")
    for k, r in tpi.iterrows():
        ax.annotate(f"{r['mean']:.2f}", (k, r["mean"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("k (first arrivals kept)")
    ax.set_ylabel("simulated time per iteration")
    ax.set_xticks(ks)
    ax.set_title("1 + Exp(1) latencies, 5 of 20 workers 8x slower")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "time_per_iteration.png", dpi=120)
    plt.close(fig)

    # 3. Accuracy vs simulated wall-clock (dSTAR and CM under ALIE and sign flip).
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, att in zip(axes, ["alie", "sign_flip"]):
        for rule, ls in (("dstar", "-"), ("median", "--")):
            for k in ks:
                run = df[(df["aggregator"] == rule) & (df["attack"] == att) & (df["first_k"] == k)]
                run = run[run["step"] > 0].sort_values("step")
                t = run["sim_time"]
                ax.plot(t, run["test_accuracy"], ls, marker=".", label=f"{LABEL[rule]}, k={k}",
                        color=f"C{ks.index(k)}")
        ax.set_xscale("log")
        ax.set_xlabel("simulated wall-clock (log scale; evaluations every 50 steps)")
        ax.set_title(ATTACK_LABEL[att])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "accuracy_vs_time.png", dpi=120)
    plt.close(fig)

    # Tables.
    lines = ["Final test accuracy (step %d), rows: attack / rule, columns: k" % last["steps"].iloc[0], ""]
    lines.append("| attack | rule | " + " | ".join(f"k={k}" for k in ks) + " |")
    lines.append("|---|---|" + "---|" * len(ks))
    for att in ATTACKS:
        for rule in RULES:
            if (att, rule) in acc.index:
                row = acc.loc[(att, rule)]
                lines.append(f"| {ATTACK_LABEL[att]} | {LABEL[rule]} | "
                             + " | ".join(f"{row[k]:.3f}" for k in ks) + " |")
    lines += ["", "Simulated time per iteration (mean over runs; identical draws for every rule)", ""]
    lines.append("| k | time / iteration | speed-up vs k=%d |" % max(ks))
    lines.append("|---|---|---|")
    for k, r in tpi.iterrows():
        lines.append(f"| {k} | {r['mean']:.2f} | {tpi['mean'].loc[max(ks)] / r['mean']:.1f}x |")
    abl_path = Path(out_dir + "_ablation") / "results.parquet"
    if abl_path.exists():
        abl = pd.read_parquet(abl_path)
        abl = abl[abl["step"] == abl["steps"]]
        lines += ["", "dSTAR variants under ALIE (ablation.toml; the default row from config.toml)", ""]
        lines.append("| variant | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        lines.append("| E1 + D1 + keep k-f (default) | "
                     + " | ".join(f"{acc.loc[('alie', 'dstar')][k]:.3f}" for k in ks) + " |")
        for kw, g in abl.groupby("aggregator_kwargs", sort=False):
            row = g.set_index("first_k")["test_accuracy"]
            name = ", ".join(f"{a}={b}" for a, b in json.loads(kw).items()
                             if a != "missing_reference")
            lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in ks) + " |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
