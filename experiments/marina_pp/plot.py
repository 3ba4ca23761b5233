"""Figures, summary tables and the README's claim table for experiments/marina_pp.

Reads the stored runs: ``results/<name>.parts/`` (one Parquet part per finished run, so a run
still going is read as far as it got) or, for the first runs, which have no parts,
``results/<name>.parquet``. Missing runs are skipped and reported as pending.

Run (from the repository root):
    python experiments/marina_pp/plot.py            # figures, results/*_summary.md, claims
    python experiments/marina_pp/plot.py claims     # only the claim table (README, last section)
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from jbyz.results import load_results, read_metadata  # noqa: E402

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
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
    _band(ax, sel("PP, clipping", alpha=1.0, f_real=5), "epochs", "PP (C = 4), clipping", lw=4,
          alpha=0.5)
    _band(ax, sel("Byz-VR-MARINA (full participation)"), "epochs",
          "Byz-VR-MARINA (C = n), no clipping")
    _band(ax, sel("PP+, clipping"), "epochs", "PP+ (mean in compressed rounds)")
    _band(ax, sel("PP, clipping, code quirks (p=0, threshold alpha*|g|)"), "epochs",
          "MNIST script's schedule (no full round after g^0), radius gamma*|g^k|", ls="--")
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
    tab = pd.DataFrame(out).sort_values(["lr", "config", "alpha", "f_real"],
                                        ascending=[False, True, True, False])
    (HERE / "results" / "logreg_summary.md").write_text(_markdown(tab, ".3g"))
    print(tab.to_string(index=False))


def load(name: str) -> pd.DataFrame | None:
    """The stored runs of ``name``: its parts (as far as the run got), else its table, else None."""
    parts = RES / f"{name}.parts"
    if parts.is_dir() and any(parts.glob("*.parquet")):
        return load_results(parts)
    if (RES / f"{name}.parquet").exists():
        return load_results(RES / f"{name}.parquet")
    return None


def wall_time(name: str) -> str:
    """Parts stored for ``name`` and the sum of their ``wall_s`` (compilation included)."""
    parts = sorted((RES / f"{name}.parts").glob("*.parquet"))
    total = sum(float(read_metadata(f).get("wall_s", "nan")) for f in parts)
    return f"{len(parts)} parts stored, {total / 60:.1f} min of run time (sum of the parts' wall_s)"


def mean_se(v) -> tuple[float, float, int]:
    """Mean, standard error (std with ddof 1 / sqrt(n); NaN for one value) and n."""
    v = np.asarray(v, float)
    n = len(v)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"), n


def fmt_mse(v, f=".3g") -> str:
    m, se, n = mean_se(v)
    if not np.all(np.isfinite(np.asarray(v, float))):
        bad = int((~np.isfinite(np.asarray(v, float))).sum())
        return f"{bad} of {n} seeds inf/NaN"
    return f"{m:{f}} ± {se:{f}} (n={n})"


# ---------------------------------------------------------------- logistic regression (configs)

PP, NOCLIP, FULL = "PP, clipping", "PP, no clipping", "Byz-VR-MARINA (full participation)"
PLUS, CODE = "PP+, clipping", "PP, clipping, threshold alpha*|g| (a9a-pp.sh clip-mult grid)"
QUIRKS = "PP, clipping, code quirks (p=0, threshold alpha*|g|)"
RANDK = "PP, clipping, RandK K=8"
LOGREG_RUNS = {  # name -> how its full rounds are drawn
    "logreg_paper": "Bernoulli(p = b/m = 0.056)",
    "logreg_a9a_schedule": "one at each epoch start, every 18 rounds",
    "logreg_p0001": "one at each epoch start, every 1000 rounds (p ~ 0.001)",
}


def pick(df, config, **kw):
    m = df.config == config
    for k, v in kw.items():
        m &= np.isclose(df[k], v) if isinstance(v, float) else df[k] == v
    return df[m]


def finals(g: pd.DataFrame) -> pd.Series:
    """The last recorded gap of each seed."""
    return g[g.step == g.step.max()].set_index("seed").gap.sort_index()


def decades_per_1000(g: pd.DataFrame) -> pd.Series:
    """Per seed: -slope of log10(gap) against rounds over the second half of the run, x 1000.

    Only finite gaps above 1e-13 (the float64 floor of f(x) - f*) count; NaN if none.
    """
    out = {}
    half = g.step.max() / 2
    for seed, h in g[g.step >= half].groupby("seed"):
        h = h[np.isfinite(h.gap) & (h.gap > 1e-13)]
        out[seed] = (-np.polyfit(h.step, np.log10(h.gap), 1)[0] * 1000 if len(h) > 2
                     else np.nan)
    return pd.Series(out).sort_index()


def gap_at_epochs(g: pd.DataFrame, epochs: float) -> pd.Series:
    """Per seed: the gap at the last record with at most ``epochs`` epochs spent."""
    return (g[g.epochs <= epochs].sort_values("step").groupby("seed").tail(1)
            .set_index("seed").gap.sort_index())


def logreg_run(name: str):
    """Figure and summary table of one logistic-regression config run (the paper's grid)."""
    df = load(name)
    if df is None:
        print("pending:", name)
        return None
    lrs = sorted(set(df.lr), reverse=True)
    fig, axes = plt.subplots(2, len(lrs), figsize=(5 * len(lrs), 8), squeeze=False)
    rows = (  # top: against rounds; bottom: against epochs, the clip multiplier and C = n
        ("step", ((PP, dict(alpha=1.0, f_real=5), "PP, clipping alpha=1, shift-back", {}),
                  (NOCLIP, dict(f_real=5), "PP, no clipping, shift-back", {}),
                  (NOCLIP, dict(f_real=0), "PP, no Byzantine clients", dict(ls=":")),
                  (FULL, {}, "Byz-VR-MARINA, C = n, no clipping", dict(ls="--")),
                  (CODE, dict(alpha=1.0, f_real=5), "code's radius 1*|g^k|", dict(ls="-.")))),
        ("epochs", tuple((PP, dict(alpha=al, f_real=5), f"PP, clipping alpha={al:g}", {})
                         for al in (0.1, 1.0, 10.0))
         + ((FULL, {}, "Byz-VR-MARINA, C = n", dict(ls="--")),)))
    for (x, curves), ax_row in zip(rows, axes):
        for ax, lr in zip(ax_row, lrs):
            d = df[np.isclose(df.lr, lr)]
            for c, kw, label, style in curves:
                g = pick(d, c, **kw)
                if not g.empty:
                    _band(ax, g, x, label, **style)
            ax.set_yscale("log")
            low = d.gap[np.isfinite(d.gap) & (d.gap > 0)].min()
            ax.set_ylim(max(1e-14, low / 3), CAP * 2)
            ax.set_xlabel("rounds" if x == "step" else "epochs (gradient evaluations / (n m))")
            ax.set_ylabel("f(x^k) - f*")
            ax.set_title(f"gamma = {lr:g}, shift-back", fontsize=10)
            ax.grid(alpha=0.3)
        ax_row[0].legend(fontsize=7)
    fig.suptitle(f"{name}: full rounds {LOGREG_RUNS.get(name, '?')}; shift-back x0 - x "
                 "(multiplier lr); geometric mean and min-max over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(FIG / f"{name}.png", dpi=110)
    plt.close(fig)
    rows = []
    for (c, lr, al, fr), g in df.groupby(["config", "lr", "alpha", "f_real"]):
        fin, rate = finals(g), decades_per_1000(g)
        rows.append(dict(config=c, lr=lr, alpha=al, f_real=fr, rounds=int(g.step.max()),
                         epochs=round(float(g[g.step == g.step.max()].epochs.mean()), 1),
                         gap_final=fmt_mse(fin), gap_max=float(g.gap.max()),
                         decades_per_1000_rounds=fmt_mse(rate, ".2f"),
                         byz_majority_share=float(g[g.step > 0].byz_majority.mean())))
    tab = pd.DataFrame(rows).sort_values(["lr", "config", "alpha", "f_real"],
                                         ascending=[False, True, True, False])
    (RES / f"{name}_summary.md").write_text(_markdown(tab, ".3g"))
    print(f"== {name} ({df.groupby(['config', 'lr']).ngroups} parts)")
    print(tab.to_string(index=False))
    return df


# ---------------------------------------------------------------- Fashion-MNIST


def fmnist(name: str = "fmnist"):
    df = load(name)
    if df is None:
        print("pending:", name)
        return None
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
    fig.suptitle(f"{name}: Fashion-MNIST CNN, 20 clients (5 Byzantine), 4 sampled per round, "
                 f"worker momentum 0.9 ({'every client' if 'momentum_clients' in df else 'sampled'}"
                 f" clients' momentum updated), test images {int(df.test_size.iloc[0])}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(FIG / f"{name}.png", dpi=110)
    plt.close(fig)
    last = df[df.step == df.step.max()]
    tab = (last.groupby(["aggregator", "attack", "clipping"])
           .agg(final_acc_mean=("test_accuracy", "mean"),
                final_acc_se=("test_accuracy", lambda v: mean_se(v)[1]),
                final_acc_min=("test_accuracy", "min"),
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
    (RES / f"{name}_summary.md").write_text(_markdown(tab, ".3f"))
    print(f"== {name} ({df.groupby(['aggregator', 'attack', 'clipping', 'seed']).ngroups} runs)")
    print(tab.to_string(index=False))
    return df


# ---------------------------------------------------------------- claim table numbers

CMD = {
    "logreg_paper": "nice -n 10 python experiments/marina_pp/run_logreg.py --config "
                    "experiments/marina_pp/configs/logreg_paper.toml",
    "logreg_a9a_schedule": "nice -n 10 python experiments/marina_pp/run_logreg.py --config "
                           "experiments/marina_pp/configs/logreg_a9a_schedule.toml",
    "logreg_p0001": "nice -n 10 python experiments/marina_pp/run_logreg.py --config "
                    "experiments/marina_pp/configs/logreg_p0001.toml",
    "fmnist_full_test": "nice -n 10 python experiments/marina_pp/run_fmnist.py --config "
                        "experiments/marina_pp/configs/fmnist_full_test.toml",
    "fmnist_momentum_all": "nice -n 10 python experiments/marina_pp/run_fmnist.py --config "
                           "experiments/marina_pp/configs/fmnist_momentum_all.toml",
}


def _g(v) -> str:
    return f"{v:.3g}"


def _second_half_median(g: pd.DataFrame) -> pd.Series:
    h = g[g.step >= g.step.max() / 2]
    return h.groupby("seed").gap.median().sort_index()


def claims_logreg(name: str):
    """The numbers of the logistic-regression rows, from the stored parts of ``name``."""
    df = load(name)
    if df is None:
        print(f"[{name}] pending: {CMD[name]}")
        return
    done = set(df.config)
    rounds = int(df.step.max())
    print(f"[{name}] full rounds {LOGREG_RUNS[name]}; {rounds} rounds; {wall_time(name)}")
    for lr in sorted(set(df.lr), reverse=True):
        d = df[np.isclose(df.lr, lr)]
        tag = f"[{name}] gamma={lr:g}"
        if PP in done:
            for al in (0.1, 1.0, 10.0):
                a5, a0 = pick(d, PP, alpha=al, f_real=5), pick(d, PP, alpha=al, f_real=0)
                if a5.empty:
                    continue
                r5, r0 = decades_per_1000(a5), decades_per_1000(a0)
                ratio = finals(a5) / finals(a0)
                at2k = ""
                if rounds > 2000:  # the other runs' length, for a like-for-like comparison
                    s2k = int(a5.step[a5.step <= 2000].max())
                    at2k = (f" | at round {s2k}: {fmt_mse(a5[a5.step == s2k].gap)} vs "
                            f"{fmt_mse(a0[a0.step == s2k].gap)}")
                print(f"{tag} C1/C4 PP clip alpha={al:g}: final gap shift-back "
                      f"{fmt_mse(finals(a5))}"
                      f" | no Byzantines {fmt_mse(finals(a0))} | ratio {fmt_mse(ratio)}"
                      f" | decades/1000 rounds {fmt_mse(r5, '.2f')} vs {fmt_mse(r0, '.2f')}"
                      f" | max gap with shift-back {_g(a5.gap.max())}{at2k}")
        if NOCLIP in done:
            n5, n0 = pick(d, NOCLIP, f_real=5), pick(d, NOCLIP, f_real=0)
            gap0 = float(n5[n5.step == 0].gap.iloc[0])
            fin = finals(n5)
            print(f"{tag} C2 PP no clip shift-back: final gap {fmt_mse(fin)} (seeds: "
                  f"{', '.join(_g(v) for v in fin)}); median gap over the"
                  f" 2nd half {fmt_mse(_second_half_median(n5))}; min {_g(n5.gap.min())}, max "
                  f"{_g(n5.gap.max())} (start {_g(gap0)}); no Byzantines: final "
                  f"{fmt_mse(finals(n0))}; Byzantine majority in "
                  f"{n5[n5.step > 0].byz_majority.mean():.3f} of the recorded rounds")
        if FULL in done and PP in done:
            pp = pick(d, PP, alpha=1.0, f_real=5)
            fu = pick(d, FULL)
            # the largest multiple of 10 epochs that every seed of both runs reached
            reached = min(pp.groupby("seed").epochs.max().min(),
                          fu.groupby("seed").epochs.max().min())
            e = float(np.floor(reached / 10) * 10)
            print(f"{tag} C3 at {e:g} epochs: PP clip alpha=1 {fmt_mse(gap_at_epochs(pp, e))} "
                  f"| full participation {fmt_mse(gap_at_epochs(fu, e))}; after {rounds} rounds: "
                  f"PP {fmt_mse(finals(pp))} ({pp[pp.step == rounds].epochs.mean():.0f} epochs) "
                  f"| full {fmt_mse(finals(fu))} ({fu[fu.step == rounds].epochs.mean():.0f} "
                  "epochs)")
        if PLUS in done and PP in done:
            a = pick(d, PP, alpha=1.0, f_real=5).set_index(["seed", "step"]).gap
            b = pick(d, PLUS).set_index(["seed", "step"]).gap
            print(f"{tag} PP+ vs PP (alpha=1): max |gap difference| "
                  f"{_g(float((a - b.reindex(a.index)).abs().max()))}")
        if CODE in done:
            for al in sorted(set(pick(d, CODE).alpha)):
                c5, c0 = pick(d, CODE, alpha=al, f_real=5), pick(d, CODE, alpha=al, f_real=0)
                print(f"{tag} code radius mult={al:g}*|g^k|: final gap shift-back "
                      f"{fmt_mse(finals(c5))} | no Byzantines {fmt_mse(finals(c0))}; decades/1000"
                      f" rounds {fmt_mse(decades_per_1000(c5), '.2f')}")
        if QUIRKS in done:
            q = pick(d, QUIRKS)
            print(f"{tag} MNIST script's schedule (no full round after g^0), radius gamma*|g^k|:"
                  f" final gap {fmt_mse(finals(q))}")
        if RANDK in done:
            for al in sorted(set(pick(d, RANDK).alpha)):
                print(f"{tag} RandK K=8 alpha={al:g}: final gap "
                      f"{fmt_mse(finals(pick(d, RANDK, alpha=al)))}")


def claims_old_logreg():
    df = load("logreg")
    for lr in (0.5, 0.1):
        n5 = pick(df[np.isclose(df.lr, lr)], NOCLIP, f_real=5)
        fin = finals(n5)
        print(f"[logreg (multiplier 2, stored defaults)] gamma={lr:g} C2 PP no clip: final gap "
              f"{fmt_mse(fin)}; max finite gap {_g(n5.gap[np.isfinite(n5.gap)].max())}")
    a10 = pick(df[np.isclose(df.lr, 0.5)], PP, alpha=10.0, f_real=5)
    print(f"[logreg (multiplier 2, stored defaults)] gamma=0.5 (> 1/L = 0.30) C4 PP clip alpha=10:"
          f" final gap {fmt_mse(finals(a10))}")


def _final_acc(df):
    last = df[df.step == df.step.max()]
    return last.set_index(["aggregator", "attack", "clipping", "seed"]).test_accuracy


def claims_fmnist(name: str):
    df = load(name)
    if df is None:
        print(f"[{name}] pending: {CMD[name]}")
        return
    acc = _final_acc(df)
    loss = df[df.step == df.step.max()].set_index(
        ["aggregator", "attack", "clipping", "seed"]).test_loss
    print(f"[{name}] {wall_time(name)}; test images {int(df.test_size.iloc[0])}; final accuracy "
          f"after "
          f"{int(df.step.max())} rounds")
    for (agg, att, clip), v in acc.groupby(level=[0, 1, 2]):
        nan = int((~np.isfinite(loss.loc[(agg, att, clip)])).sum())
        print(f"[{name}] {agg} {att} clip={clip}: {fmt_mse(v.to_numpy())}"
              + (f"; diverged (NaN loss) {nan} of {len(v)}" if nan else ""))
    for agg in sorted(set(df.aggregator)):
        for a, b, label in ((("none", True), ("none", False), "C6 clipping cost, no attack"),
                            (("shift_back", True), ("none", True), "C5 shift-back cost, clipping")):
            try:
                x, y = acc.loc[(agg, *a)], acc.loc[(agg, *b)]
            except KeyError:
                continue
            diff = (x - y).dropna()
            if len(diff):
                print(f"[{name}] {agg} {label}: {a} - {b} = {fmt_mse(diff.to_numpy(), '.4f')} "
                      "(paired by seed)")


def claims_momentum():
    a, b = load("fmnist_momentum_all"), load("fmnist_full_test")
    if a is None or b is None:
        return
    x, y = _final_acc(a), _final_acc(b)
    for key in sorted(set(x.index.droplevel(3)) & set(y.index.droplevel(3))):
        diff = (x.loc[key] - y.loc[key]).dropna()
        if len(diff):
            print(f"[momentum every client - sampled only] {' '.join(map(str, key))}: "
                  f"{fmt_mse(diff.to_numpy(), '.4f')} (paired by seed)")


def claims():
    """Every number of the README's claim table, from the stored parts."""
    claims_old_logreg()
    for name in LOGREG_RUNS:
        claims_logreg(name)
    for name in ("fmnist_full_test", "fmnist_momentum_all"):
        claims_fmnist(name)
    claims_momentum()


if __name__ == "__main__":
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 60)
    if sys.argv[1:] == ["claims"]:
        claims()
    else:
        logreg()
        for name in LOGREG_RUNS:
            logreg_run(name)
        for name in ("fmnist", "fmnist_full_test", "fmnist_momentum_all"):
            fmnist(name)
        print()
        claims()
