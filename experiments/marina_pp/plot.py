"""Figures and summary tables for experiments/marina_pp from the Parquet results.

Run (from the repository root):
    python experiments/marina_pp/plot.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from jbyz.results import load_results  # noqa: E402

HERE = Path(__file__).resolve().parent
FIG = HERE / "figures"
CAP = 1e2  # gaps above this (divergence, NaN) are drawn at the cap


def _markdown(df: pd.DataFrame, fmt: str) -> str:
    def cell(v):
        return format(v, fmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _band(ax, g, x, label, **kw):
    """Geometric mean over seeds (line) and min-max over seeds (band)."""
    piv = g.pivot_table(index="step", columns="seed", values="gap")
    xs = g.groupby("step")[x].mean().loc[piv.index]
    v = piv.to_numpy(dtype=float)
    v = np.where(np.isfinite(v), np.clip(v, 1e-16, CAP), CAP)
    line = np.exp(np.log(v).mean(1))
    (h,) = ax.plot(xs, line, label=label, **kw)
    ax.fill_between(xs, v.min(1), v.max(1), color=h.get_color(), alpha=0.2, lw=0)


def logreg():
    df = load_results(HERE / "results" / "logreg.parquet")
    FIG.mkdir(exist_ok=True)
    lr = 0.5
    d = df[df.lr == lr]
    sel = lambda c, **kw: d[(d.config == c) & np.logical_and.reduce(  # noqa: E731
        [d[k] == v for k, v in kw.items()] or [np.ones(len(d), bool)])]

    # (a) clipping vs no clipping under shift-back, + no-attack reference
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x in zip(axes, ("step", "epochs")):
        _band(ax, sel("PP, clipping", alpha=1.0, f_real=5), x, "PP, clipping (alpha=1), SHB")
        _band(ax, sel("PP, no clipping", f_real=5), x, "PP, no clipping, SHB")
        _band(ax, sel("PP, no clipping", f_real=0), x, "PP, no Byzantine clients", ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("rounds" if x == "step" else "epochs (gradient evaluations / (n m))")
        ax.set_ylabel("f(x^k) - f*")
        ax.set_ylim(1e-14, CAP * 2)
        ax.grid(alpha=0.3)
    if x == "epochs":
        axes[1].set_xlim(0, 120)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Breast cancer logistic regression, 15 honest + 5 Byzantine, CM + bucketing, "
                 f"C = 4 of 20, gamma = {lr}")
    fig.tight_layout()
    fig.savefig(FIG / "logreg_clipping.png", dpi=120)
    plt.close(fig)

    # (b) full vs partial participation, per epoch; + PP+, quirks, RandK
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _band(ax, sel("PP, clipping", alpha=1.0, f_real=5), "epochs", "PP (C = 4), clipping", lw=4, alpha=0.5)
    _band(ax, sel("Byz-VR-MARINA (full participation)"), "epochs",
          "Byz-VR-MARINA (C = n), no clipping")
    _band(ax, sel("PP+, clipping"), "epochs", "PP+ (mean in compressed rounds)")
    _band(ax, sel("PP, clipping, code quirks (p=0, threshold alpha*|g|)"), "epochs",
          "code quirks: p = 0, radius = gamma*|g|", ls="--")
    _band(ax, sel("PP, clipping, RandK K=8", alpha=4.0), "epochs", "PP, RandK K=8 of 31, alpha=4",
          ls="-.")
    ax.set_yscale("log")
    ax.set_xlim(0, 120)
    ax.set_ylim(1e-14, CAP * 2)
    ax.set_xlabel("epochs (gradient evaluations / (n m))")
    ax.set_ylabel("f(x^k) - f*")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Shift-back attack; full vs partial participation and variants", fontsize=10)
    fig.tight_layout()
    fig.savefig(FIG / "logreg_participation.png", dpi=120)
    plt.close(fig)

    # (c) clipping multipliers
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for al in (0.1, 1.0, 10.0):
        _band(ax, sel("PP, clipping", alpha=al, f_real=5), "epochs", f"alpha = {al}")
    ax.set_yscale("log")
    ax.set_xlim(0, 120)
    ax.set_ylim(1e-14, CAP * 2)
    ax.set_xlabel("epochs")
    ax.set_ylabel("f(x^k) - f*")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("PP with clipping under shift-back: clipping multiplier alpha", fontsize=10)
    fig.tight_layout()
    fig.savefig(FIG / "logreg_alpha.png", dpi=120)
    plt.close(fig)

    # summary table: gap after ~100 epochs and at the end
    out = []
    for (c, lr_, al, fr), g in df.groupby(["config", "lr", "alpha", "f_real"]):
        last = g[g.step == g.step.max()]
        at100 = g[g.epochs <= 100].sort_values("step").groupby("seed").tail(1)
        out.append(dict(config=c, lr=lr_, alpha=al, f_real=fr,
                        rounds=int(g.step.max()),
                        epochs=round(float(last.epochs.mean()), 1),
                        gap_100_epochs_median=float(at100.gap.median()),
                        gap_final_median=float(last.gap.median()),
                        gap_final_max=float(last.gap.max())))
    tab = pd.DataFrame(out).sort_values(["lr", "config", "alpha", "f_real"], ascending=[False, True, True, False])
    (HERE / "results" / "logreg_summary.md").write_text(_markdown(tab, ".3g"))
    print(tab.to_string(index=False))


def fmnist():
    path = HERE / "results" / "fmnist.parquet"
    if not path.exists():
        print("no", path)
        return
    df = load_results(path)
    attacks = [a for a in ("none", "bit_flip", "label_flip", "alie", "shift_back")
               if a in set(df.attack)]
    aggs = list(dict.fromkeys(df.aggregator))
    fig, axes = plt.subplots(len(aggs), len(attacks), figsize=(3.2 * len(attacks), 3 * len(aggs)),
                             sharey=True, squeeze=False)
    for i, agg in enumerate(aggs):
        for j, att in enumerate(attacks):
            ax = axes[i, j]
            for clip, ls in ((True, "-"), (False, "--")):
                g = df[(df.aggregator == agg) & (df.attack == att) & (df.clipping == clip)]
                if g.empty:
                    continue
                m = g.groupby("step").test_accuracy
                (h,) = ax.plot(m.mean().index, m.mean(), ls=ls,
                               label="clipping" if clip else "no clipping")
                ax.fill_between(m.min().index, m.min(), m.max(), color=h.get_color(), alpha=0.2,
                                lw=0)
            ax.set_title(f"{agg} + bucketing, {att}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_ylim(0, 1)
            if i == len(aggs) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST CNN, 20 clients (5 Byzantine), 4 sampled per round, worker "
                 "momentum 0.9", fontsize=10)
    fig.tight_layout()
    fig.savefig(FIG / "fmnist.png", dpi=110)
    plt.close(fig)
    last = df[df.step == df.step.max()]
    tab = (last.groupby(["aggregator", "attack", "clipping"])
           .agg(final_acc_mean=("test_accuracy", "mean"), final_acc_min=("test_accuracy", "min"),
                final_acc_max=("test_accuracy", "max"), seeds=("seed", "nunique"),
                byz_majority_rounds=("byz_majority_rounds", "mean"),
                diverged=("test_loss", lambda v: int((~np.isfinite(v)).sum())))
           .reset_index())
    # diverged: seeds whose final test loss is NaN/inf (the model's outputs are NaN; its
    # "accuracy" is then the share of the class argmax(NaN) = 0 picks, 8.2 % of this test subset)
    best = (df.groupby(["aggregator", "attack", "clipping", "seed"]).test_accuracy.max()
            .groupby(["aggregator", "attack", "clipping"]).mean().rename("best_acc_mean"))
    tab = tab.merge(best.reset_index(), on=["aggregator", "attack", "clipping"])
    tab["diverged"] = tab["diverged"].astype(str) + " of " + tab["seeds"].astype(str)
    (HERE / "results" / "fmnist_summary.md").write_text(_markdown(tab, ".3f"))
    print(tab.to_string(index=False))


if __name__ == "__main__":
    logreg()
    fmnist()
