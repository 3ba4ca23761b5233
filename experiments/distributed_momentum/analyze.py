"""Every table and figure of the distributed-momentum reproduction, from the stored grid parts.

    python experiments/distributed_momentum/analyze.py

reads ``results/grid`` (the authors' setting, ``grid.toml``), ``results/baseline`` (jbyz's first
run, ``baseline.toml``) and ``results/ablation`` (``ablation.toml``), whatever part of them has
run, and writes into ``results/``:

* ``headline.csv``: the authors' counters (their ``reproduce.py``), per subset, with numerator
  and denominator, beside the paper's numbers with theirs;
* ``vnr_within_f<f>_nesterov_<bool>.png``: the paper's variance-norm figures, rebuilt: within the
  runs with momentum at the workers, the ratio of the honest workers' *sampled* gradients against
  that of the vectors they *submit* (their momenta), per step, mean over seeds (band: 25-75th
  percentiles), one panel per (GAR, attack, lr); ``vnr_cells.csv`` the same as numbers;
* ``vnr_bound.csv``: per run with a GAR whose bound is known (Krum, Median, Bulyan), the share of
  steps whose submitted ratio is below the bound while the loss is not above its initial value;
* ``vnr_cross_run.png``: the submitted ratio at update vs at the workers, across runs (the
  comparison of the authors' earlier preprint, NOT the ICLR paper's; see its caption);
* ``ablation.csv``: each deviation from the authors' setting switched back alone, on the
  ablation slice, and how the headline numbers and the within-run ratio move;
* ``boxplot.png``, ``cells.csv``, ``pairs.csv``, ``runs.csv``; for the baseline
  ``baseline_counters.csv`` and ``boxplot_baseline.png``.

Definitions (as the authors' ``reproduce.py``): a run's metric is its highest observed test
accuracy. For every run with momentum at the workers, ``ats`` is the same configuration and seed
with momentum at update (the server) and ``ref`` the unattacked run (n - f honest workers
averaging, same dataset, lr, Nesterov and seed); ``loss = ref - ats``, ``gain = atw - ats``. All
thresholds are strict: the attack is "effective at X" when ``loss > X``; "gain above X" counts
``gain > X`` among the pairs effective at X; "performance loss > X" counts ``gain < -X``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from jbyz import results
from jbyz.aggregators import variance_norm_bound
from jbyz.plots import per_run

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KEY = ["dataset", "f_real", "lr", "nesterov", "gar", "attack_name", "seed"]

# The paper's numbers as the authors' reproduce.py computes them: (share, numerator, denominator,
# subset). The subsets pool datasets by a substring of the run name: "mnist" matches MNIST and
# Fashion-MNIST (880 pairs), "cifar" CIFAR-10 and -100, "f_11" / "f_5" the CIFAR f values.
PAPER = [
    ("attack effective at 20% (loss > 0.2)", "MNIST + Fashion-MNIST (FC)", 0.2580, 227, 880, None),
    ("attack effective at 20% (loss > 0.2)", "CIFAR-10 + CIFAR-100 (CNN)", 0.7080, 623, 880, None),
    ("worker momentum worse (gain < 0)", "all four datasets", 0.0023, 4, 1760, None),
    ("worker momentum worse (gain < 0)", "MNIST + Fashion-MNIST (FC; all 4 pairs were FC)",
     4 / 880, 4, 880, None),
    ("gain above 10% where effective at 10%", "CIFAR, f = 11 (f ~ n/2, CNN)", 0.7975, None, None, 24),
    ("gain above 20% where effective at 20%", "CIFAR, f = 11 (f ~ n/2, CNN)", 0.4925, None, None, 24),
    ("attack effective at 20% (loss > 0.2)", "CIFAR, f = 5 (f ~ n/4, CNN)", 0.4646, None, None, 12),
    ("gain above 20% where effective at 20%", "CIFAR, f = 5 (f ~ n/4, CNN)", 0.9507, None, None, 12),
]


# ------------------------------------------------------------------------------ loading


def _name(spec, kwargs) -> str:
    kw = json.loads(kwargs) if isinstance(kwargs, str) and kwargs else (kwargs or {})
    if spec == "multi_krum" and kw.get("neighbours") == "code" and kw.get("distance") == "euclidean":
        return "Krum (code)"
    if spec == "bulyan" and kw.get("variant") == "multikrum":
        return "Bulyan (code)"
    return {"krum": "Krum (paper)", "bulyan": "Bulyan (paper)", "trimmed_mean": "Trimmed mean",
            "meamed": "MeaMed", "phocas": "Phocas", "median": "Median", "mean": "Average"}.get(
        spec, spec)


# The GARs with a variance-norm bound (jbyz.aggregators.variance_norm_bound), by display name.
BOUND_RULE = {"Krum (code)": "krum", "Krum (paper)": "krum", "Median": "median",
              "Bulyan (code)": "bulyan", "Bulyan (paper)": "bulyan"}


def _has_steps(v) -> bool:
    """Whether a run's per-step series has been recorded (runs before the diagnostic had none)."""
    return isinstance(v, np.ndarray) and v.size > 0


def _steps(g: pd.DataFrame, col: str) -> np.ndarray:
    """A run's per-step series: the ``<col>`` lists of its evaluation rows, in step order."""
    vals = [json.loads(v) if isinstance(v, str) else v  # stored as JSON text in Parquet
            for v in g.sort_values("step")[col]]
    vals = [v for v in vals if isinstance(v, (list, np.ndarray))]
    return np.concatenate(vals).astype(float) if vals else np.array([])


def load_runs(folder: Path, setting: str) -> pd.DataFrame:
    """One row per run: the configuration, ``best`` accuracy and the per-step series."""
    if not folder.exists() or not (any(folder.glob("parts/*.parquet"))
                                   or (folder / "results.parquet").exists()):
        return pd.DataFrame()
    df = results.load_results(folder)  # its parts: every run stored so far
    runs = per_run(df)
    runs["setting"] = setting
    runs["gar"] = [_name(a, k) for a, k in zip(runs["aggregator"], runs["aggregator_kwargs"])]
    runs["attack_name"] = results.component_name(runs["attack"].astype(str)).str.upper().replace(
        {"NONE": "none"})
    for col in ("vnr_sampled_steps", "vnr_submitted_steps", "train_loss_steps"):
        if col in df:
            series = {rid: _steps(g, col) for rid, g in df[["run_id", "step", col]].groupby("run_id")}
            runs[col] = runs["run_id"].map(series)
    if "variance_norm_ratio" in df:  # jbyz's first definition: sqrt, over h, chunk means
        runs["vnr_old"] = runs["run_id"].map(df[df["step"] > 0].groupby("run_id")[
            "variance_norm_ratio"].mean())
    for col, default in (("nesterov_form", "pytorch"), ("sampling", "replacement")):
        if col not in runs:
            runs[col] = default
    return runs


# ------------------------------------------------------------------------------ pairs, counters


def pairs_table(runs: pd.DataFrame, refs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The authors' pairs: every at-worker run with its at-update twin and its reference."""
    att = runs[runs["attack_name"] != "none"]
    ref_src = runs if refs is None else refs
    ref = ref_src[ref_src["attack_name"] == "none"].copy()
    cols = KEY + ["ats", "atw", "ref", "loss", "gain"]
    if ref.empty or att.empty:  # the references (or the attacked runs) have not run yet
        return pd.DataFrame(columns=cols)
    n_full = att.groupby("dataset")["n_workers"].max()
    ref["f_real"] = (ref["dataset"].map(n_full) - ref["n_workers"]).astype("Int64")
    ref = ref.drop_duplicates(["dataset", "f_real", "lr", "nesterov", "seed"])
    ref = ref.set_index(["dataset", "f_real", "lr", "nesterov", "seed"])["best"].rename("ref")
    up = att[att["momentum_at"] == "server"].set_index(KEY)["best"].rename("ats")
    wk = att[att["momentum_at"] == "worker"].set_index(KEY)["best"].rename("atw")
    p = pd.concat([up, wk], axis=1, join="inner").reset_index()
    p["f_real"] = p["f_real"].astype("Int64")
    p = p.join(ref, on=["dataset", "f_real", "lr", "nesterov", "seed"])
    p = p[p["ref"].notna()].copy()
    p["loss"] = p["ref"] - p["ats"]
    p["gain"] = p["atw"] - p["ats"]
    return p


def counters(p: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """The authors' counters, each as (numerator, denominator)."""
    out, total = {}, len(p)
    for x in (0.1, 0.2, 0.4):
        eff = p["loss"] > x
        out[f"attack effective at {x:.0%} (loss > {x})"] = (int(eff.sum()), total)
        out[f"gain above {x:.0%} where effective at {x:.0%}"] = (
            int((p.loc[eff, "gain"] > x).sum()), int(eff.sum()))
    for x in (0.0, 0.02, 0.05):
        out[f"worker momentum worse (gain < {-x:g})" if x else "worker momentum worse (gain < 0)"] = (
            int((p["gain"] < -x).sum()), total)
    for x in (0.05, 0.1):
        out[f"worse and more than {x:.0%} under the reference"] = (
            int(((p["gain"] < 0) & (p["ref"] - p["atw"] > x)).sum()), total)
    out["worker momentum raises the max accuracy where effective at 20 %"] = (
        int((p.loc[p["loss"] > 0.2, "gain"] > 0).sum()), int((p["loss"] > 0.2).sum()))
    return out


def headline(p: pd.DataFrame) -> pd.DataFrame:
    rows = []
    subsets = [("all pairs", p)]
    for ds, g in p.groupby("dataset"):
        subsets.append((f"{ds}", g))
        for f, h in g.groupby("f_real"):
            subsets.append((f"{ds}, f = {f}", h))
    for name, g in subsets:
        for stat, (k, n) in counters(g).items():
            rows.append(dict(subset=name, statistic=stat, k=k, N=n, share=k / n if n else np.nan))
    return pd.DataFrame(rows)


def _fmt(k, n):
    return f"{k}/{n} ({k / n:.2%})" if n else f"{k}/0"


# ------------------------------------------------------------------------------ ratios


def within_run_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Per at-worker cell: the mean over steps and seeds of the sampled and submitted ratios."""
    w = runs[(runs["momentum_at"] == "worker") & (runs["attack_name"] != "none")]
    # astype(bool): on an empty frame the mapped Series is of object dtype, which pandas would
    # read as a list of column labels
    w = w[w["vnr_submitted_steps"].map(_has_steps).astype(bool)]
    rows = []
    for key, g in w.groupby(["dataset", "f_real", "nesterov", "gar", "attack_name", "lr"]):
        s = np.stack(g["vnr_sampled_steps"].to_list())
        m = np.stack(g["vnr_submitted_steps"].to_list())
        rows.append(dict(zip(["dataset", "f_real", "nesterov", "gar", "attack", "lr"], key),
                         seeds=len(g), sampled=np.nanmean(s), submitted=np.nanmean(m),
                         submitted_over_sampled=np.nanmean(m) / np.nanmean(s),
                         steps_submitted_below_sampled=float(np.nanmean(m < s))))
    return pd.DataFrame(rows)


def bound_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run whose GAR has a bound: the share of steps with submitted ratio < bound^2 and the
    loss not above its initial value (the authors' reproduce.py; their n counts every worker)."""
    rows = []
    att = runs[runs["attack_name"] != "none"]
    for _, r in att.iterrows():
        rule = BOUND_RULE.get(r["gar"])
        sub, loss = r.get("vnr_submitted_steps"), r.get("train_loss_steps")
        if rule is None or not isinstance(sub, np.ndarray) or sub.size == 0:
            continue
        kappa = variance_norm_bound(rule, r["n_workers"], r["f_real"])
        ok = (sub < kappa ** 2) & (loss <= loss[0])
        rows.append(dict(dataset=r["dataset"], f_real=r["f_real"], lr=r["lr"],
                         nesterov=r["nesterov"], momentum_at=r["momentum_at"], gar=r["gar"],
                         attack=r["attack_name"], seed=r["seed"], bound=kappa,
                         steps_valid=int(ok.sum()), steps=len(ok), share=ok.mean()))
    return pd.DataFrame(rows)


def vnr_figures(runs: pd.DataFrame, dest: Path) -> list[Path]:
    """The paper's figure, rebuilt: sampled vs submitted ratio within the at-worker runs."""
    import matplotlib

    matplotlib.use("Agg")  # a script: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    w = runs[(runs["momentum_at"] == "worker") & (runs["attack_name"] != "none")]
    w = w[w["vnr_submitted_steps"].map(_has_steps)]
    paths = []
    for (ds, f, nest), g in w.groupby(["dataset", "f_real", "nesterov"]):
        gars = list(dict.fromkeys(g.sort_values("gar")["gar"]))
        cols = sorted(g.groupby(["attack_name", "lr"]).size().index.tolist())
        fig, axes = plt.subplots(len(gars), len(cols),
                                 figsize=(max(3.0 * len(cols), 8.0), 1.9 * len(gars) + 1.2),
                                 sharex=True, squeeze=False, constrained_layout=True)
        for i, gar in enumerate(gars):
            for j, (atk, lr) in enumerate(cols):
                ax = axes[i][j]
                c = g[(g["gar"] == gar) & (g["attack_name"] == atk) & (g["lr"] == lr)]
                for col, label, color in (("vnr_sampled_steps", "sampled", "tab:orange"),
                                          ("vnr_submitted_steps", "submitted", "tab:blue")):
                    if not len(c):
                        continue
                    a = np.stack(c[col].to_list())
                    mu = np.nanmean(a, 0)
                    # np.nanpercentile loops over columns in Python: use it only if needed
                    q = np.nanpercentile if np.isnan(a).any() else np.percentile
                    lo, hi = q(a, [25, 75], axis=0)
                    t = np.arange(a.shape[1])
                    ax.plot(t, mu, color=color, lw=1, label=label)
                    ax.fill_between(t, lo, hi, color=color, alpha=0.2, lw=0)
                rule = BOUND_RULE.get(gar)
                if rule:
                    kappa = variance_norm_bound(rule, int(c["n_workers"].max()) if len(c) else 51, f)
                    ax.axhline(kappa ** 2, color="k", ls=":", lw=0.8, label="GAR bound$^2$")
                ax.set_yscale("log")
                # no minor ticks on the log axes: their placement was most of this figure's cost
                ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(f"{atk}, lr {lr:g}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"{gar}\nratio", fontsize=8)
                if i == len(gars) - 1:
                    ax.set_xlabel("step", fontsize=8)
                ax.tick_params(labelsize=7)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
        fig.suptitle(f"{ds}, f = {f}, Nesterov {'on' if nest else 'off'}: variance-norm ratio, "
                     "sampled gradients vs submitted momenta\n"
                     "(momentum at the workers; line: mean over seeds, band: their 25-75th "
                     "percentiles)", fontsize=9)
        path = dest / f"vnr_within_f{f}_nesterov_{str(bool(nest)).lower()}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def cross_run_figure(runs: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Submitted ratio at update vs at the workers across runs (the preprint's comparison)."""
    import matplotlib.pyplot as plt

    a = runs[(runs["attack_name"] != "none")
             & runs["vnr_submitted_steps"].map(_has_steps)]
    if a.empty:
        return pd.DataFrame()
    a = a.assign(mean_submitted=a["vnr_submitted_steps"].map(np.nanmean))
    tab = a.groupby(["lr", "momentum_at"])["mean_submitted"].median().unstack()
    fig, ax = plt.subplots(figsize=(4.6, 3.2), constrained_layout=True)
    for where, color in (("server", "tab:orange"), ("worker", "tab:blue")):
        v = [a[(a["lr"] == lr) & (a["momentum_at"] == where)]["mean_submitted"] for lr in tab.index]
        pos = np.arange(len(tab.index)) * 3 + (0 if where == "server" else 1)
        bp = ax.boxplot(v, positions=pos, widths=0.8, patch_artist=True, showfliers=False)
        for b in bp["boxes"]:
            b.set_facecolor(color)
            b.set_alpha(0.6)
    ax.set_xticks(np.arange(len(tab.index)) * 3 + 0.5, [f"lr {lr:g}" for lr in tab.index])
    ax.set_yscale("log")
    ax.set_ylabel("run mean of the submitted ratio")
    ax.set_title("Across runs: at update (orange) vs at the workers (blue).\nNot the paper's "
                 "comparison: different runs, different trajectories", fontsize=8)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return tab


def boxplot(runs: pd.DataFrame, path: Path) -> None:
    """Max accuracy per GAR, at update vs at the workers, one panel per (dataset, attack, f)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    att = runs[runs["attack_name"] != "none"]
    ref = runs[runs["attack_name"] == "none"]
    panels = att.groupby(["dataset", "attack_name", "f_real"]).size().index.tolist()
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.8), sharey=True,
                             squeeze=False, constrained_layout=True)
    for ax, (ds, atk, f) in zip(axes[0], panels):
        sub = att[(att.dataset == ds) & (att.attack_name == atk) & (att.f_real == f)]
        gars = sorted(sub["gar"].unique())
        data, pos, colors = [], [], []
        for i, g in enumerate(gars):
            for j, (where, c) in enumerate((("server", "tab:orange"), ("worker", "tab:blue"))):
                data.append(sub[(sub.gar == g) & (sub.momentum_at == where)]["best"].to_numpy())
                pos.append(i * 3 + j)
                colors.append(c)
        bp = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True)
        for patch, c in zip(bp["boxes"], colors):
            patch.set_facecolor(c)
            patch.set_alpha(0.6)
        n_full = runs[runs.dataset == ds]["n_workers"].max()
        r = ref[(ref.dataset == ds) & (ref.n_workers == n_full - f)]["best"]
        if len(r):
            ax.axhline(r.median(), color="k", ls="--", lw=0.8)
        ax.set_xticks([i * 3 + 0.5 for i in range(len(gars))], gars, rotation=40, ha="right",
                      fontsize=8)
        ax.set_title(f"{ds}\n{atk}, f = {f}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("max test accuracy")
    fig.legend([Patch(color="tab:orange", alpha=0.6), Patch(color="tab:blue", alpha=0.6)],
               ["momentum at update (server)", "momentum at the workers"], fontsize=8,
               loc="outside lower center", ncol=2)
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------------------ ablation


def _slice(runs, nesterov=False, seeds=(1, 2, 3), f=24, lr=None, attack=None):
    """Fashion-MNIST runs with f Byzantine workers of 51 (and their references: 51 - f honest);
    optionally one learning rate and one attack (``attack_name``, e.g. "ALIE")."""
    if runs.empty:
        return runs
    keep = ((runs["dataset"] == "fashion_mnist") & (runs["nesterov"] == nesterov)
            & runs["seed"].isin(seeds)
            & ((runs["f_real"] == f) | ((runs["f_real"] == 0) & (runs["n_workers"] == 51 - f))))
    if lr is not None:
        keep &= np.isclose(runs["lr"].astype(float), lr)
    if attack is not None:
        keep &= runs["attack_name"].isin([attack, "none"])
    return runs[keep]


def ablation_seeds(ablation: pd.DataFrame) -> tuple[int, ...]:
    """The seeds the ablation has run as far as its most complete seed (every row of its table
    uses these, so that no block is compared on fewer seeds than the others), else 1-3."""
    if ablation.empty:
        return (1, 2, 3)
    counts = ablation["seed"].value_counts()
    return tuple(sorted(int(s) for s in counts.index[counts == counts.max()]))


def ablation_table(authors: pd.DataFrame, baseline: pd.DataFrame, ablation: pd.DataFrame,
                   f: int = 24, lr: float | None = None, attack: str | None = None,
                   skip: tuple[str, ...] = ()):
    """Headline numbers on the ablation slice, per setting (one deviation switched back).

    The slice is f Byzantine workers of 51 (``ablation.toml``: f = 24, both learning rates and
    attacks; ``ablation_f12.toml``: f = 12, lr 0.5, ALIE). Every row is computed on the same
    seeds: those the ablation has run so far (1-3 when it is complete), so the authors' and the
    baseline rows compare like with like."""
    from make_grid import ABLATIONS  # noqa: E402  (this folder)

    seeds = ablation_seeds(ablation)
    cut = dict(seeds=seeds, f=f, lr=lr, attack=attack)
    settings = [("authors' setting (grid.toml)", _slice(authors, **cut), None),
                ("jbyz's first run (baseline.toml)", _slice(baseline, **cut), None)]
    for key, (what, over, gar_list) in ABLATIONS.items():
        if ablation.empty:
            break
        if key in skip:
            continue
        nest = key == "pytorch_nesterov"
        sub = ablation[ablation["setting"].str.startswith("ablation")]
        sub = _slice(sub, nesterov=nest, **cut)
        sub = sub[_matches(sub, over, gar_list)]
        if nest and sub.empty:
            continue
        refs = _slice(authors, **cut) if gar_list else None
        if nest:
            settings.append(("authors' setting, Nesterov on",
                             _slice(authors, nesterov=True, **cut), None))
        settings.append((f"switched back: {what}", sub, refs))
    rows = []
    for name, runs, refs in settings:
        p = pairs_table(runs, refs) if len(runs) else pd.DataFrame()
        row = dict(setting=name, runs=len(runs), pairs=len(p))
        if len(p):
            c = counters(p)
            for label, key in (("effective_20", "attack effective at 20% (loss > 0.2)"),
                               ("worse", "worker momentum worse (gain < 0)"),
                               ("gain_above_10", "gain above 10% where effective at 10%"),
                               ("gain_above_20", "gain above 20% where effective at 20%")):
                k, n = c[key]
                row[label] = _fmt(k, n)
            row["mean_loss"] = p["loss"].mean()
            row["mean_gain"] = p["gain"].mean()
        cells = within_run_cells(runs) if "vnr_submitted_steps" in runs else pd.DataFrame()
        row["within_run_submitted_over_sampled"] = (
            cells["submitted_over_sampled"].median() if len(cells) else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def _matches(runs: pd.DataFrame, over: dict, gar_list) -> pd.Series:
    """The runs of one ablation block (identified by the field it switches back)."""
    ok = pd.Series(True, index=runs.index)
    for field, value in over.items():
        if field == "dataset_kwargs":
            ok &= runs[field].astype(str).isin(["{}", ""])
        elif field == "model_kwargs":
            ok &= runs[field].astype(str).str.contains("lecun")
        elif field == "nesterov":
            continue
        elif field in runs:
            ok &= runs[field].astype(str).str.strip('"') == value.strip('"')
        else:
            ok &= False
    paper_gars = runs["gar"].isin(["Krum (paper)", "Bulyan (paper)"])
    if gar_list:
        ok &= paper_gars | (runs["attack_name"] == "none")
    else:  # the other blocks run the code's Krum and Bulyan; exclude the other ablations' fields
        ok &= ~paper_gars
    for field, default in (("sampling", "epoch_stream"), ("nesterov_form", "lookahead"),
                           ("clip_form", "radius"), ("augment", "flip")):
        if field not in over and field in runs:
            ok &= runs[field].astype(str) == default
    if "dataset_kwargs" not in over and "dataset_kwargs" in runs:
        ok &= runs["dataset_kwargs"].astype(str).str.contains("normalize")
    if "model_kwargs" not in over and "model_kwargs" in runs:
        ok &= runs["model_kwargs"].astype(str).str.contains("torch")
    return ok


# ------------------------------------------------------------------------------ main


def main(dest: str | Path | None = None) -> None:
    t0 = time.perf_counter()
    dest = Path(dest) if dest else RESULTS
    dest.mkdir(parents=True, exist_ok=True)
    authors = load_runs(RESULTS / "grid", "authors")
    baseline = load_runs(RESULTS / "baseline", "baseline")
    ablation = load_runs(RESULTS / "ablation", "ablation")
    print(f"runs: authors' setting {len(authors)}, baseline {len(baseline)}, ablation {len(ablation)}")
    if not baseline.empty:
        pb = pairs_table(baseline)
        print(f"\nBaseline (jbyz's first run, paper-text GARs; {len(pb)} pairs), the authors' counters:")
        for stat, (k, n) in counters(pb).items():
            print(f"  {stat}: {_fmt(k, n)}")
        pd.DataFrame([dict(statistic=s_, k=k, N=n) for s_, (k, n) in counters(pb).items()]).to_csv(
            dest / "baseline_counters.csv", index=False)
        boxplot(baseline, dest / "boxplot_baseline.png")
    if authors.empty:
        print("\nresults/grid has no finished runs yet: run grid.toml first")
        return
    keep = [c for c in authors.columns if not c.endswith("_steps")]
    authors[keep].to_csv(dest / "runs.csv", index=False)
    p = pairs_table(authors)
    p.to_csv(dest / "pairs.csv", index=False)
    h = headline(p)
    h.to_csv(dest / "headline.csv", index=False)
    cells = p.groupby(["f_real", "gar", "attack_name"]).agg(
        loss=("loss", "mean"), gain=("gain", "mean"), worse=("gain", lambda v: int((v < 0).sum())),
        pairs=("gain", "size")).reset_index().sort_values(["f_real", "gar"], ascending=[False, True])
    cells.to_csv(dest / "cells.csv", index=False)

    print(f"\n{len(p)} pairs with a reference (seeds {sorted(p['seed'].unique().tolist())})")
    if p.empty:
        print("(no pair has both its at-update twin and its reference yet: counters skipped)")
    print("\nThe authors' counters (reproduce.py), ours beside the paper's:")
    for stat, where, share, k, n, f in (PAPER if len(p) else []):
        sub = p if f is None else p[p["f_real"] == f]
        mine = _fmt(*counters(sub)[stat])
        theirs = f"{k}/{n} ({share:.2%})" if k is not None else f"{share:.2%}"
        scope = "Fashion-MNIST, FC" + ("" if f is None else f", f = {f}; the paper's figure is CNN")
        print(f"  {stat}: ours {mine} ({scope}) | paper {theirs} on {where}")
    print("\nAll counters, per subset:")
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(h.assign(share=h["share"].map("{:.2%}".format)).to_string(index=False))
    print("\nPer cell (mean over its pairs):\n" + cells.to_string(index=False, float_format="{:.3f}".format))

    wc = within_run_cells(authors)
    wc.to_csv(dest / "vnr_cells.csv", index=False)
    if len(wc):
        print("\nWithin-run variance-norm ratio, momentum at the workers (mean over steps and seeds):")
        print(f"  submitted / sampled: median {wc['submitted_over_sampled'].median():.3f} over "
              f"{len(wc)} cells, below 1 in {int((wc['submitted_over_sampled'] < 1).sum())}; share "
              f"of steps with submitted < sampled: median {wc['steps_submitted_below_sampled'].median():.3f}")
        print("  by lr (median over cells):")
        print(wc.groupby("lr")[["sampled", "submitted", "submitted_over_sampled"]].median()
              .to_string(float_format="{:.4f}".format))
        vnr_figures(authors, dest)
    bt = bound_table(authors)
    bt.to_csv(dest / "vnr_bound.csv", index=False)
    if len(bt):
        zero = int((bt["steps_valid"] == 0).sum())
        print(f"\nSteps with the submitted ratio under the GAR's bound (and loss <= initial): runs "
              f"never under it {zero}/{len(bt)}; largest share {bt['share'].max():.3f}; mean share "
              "by momentum position:")
        print(bt.groupby(["gar", "momentum_at"])["share"].mean().unstack().to_string(
            float_format="{:.4f}".format))
    tab = cross_run_figure(authors, dest / "vnr_cross_run.png")
    if len(tab):
        print("\nAcross runs (not the paper's comparison), median of the run-mean submitted ratio:")
        print(tab.to_string(float_format="{:.4f}".format))
    boxplot(authors, dest / "boxplot.png")

    sys.path.insert(0, str(HERE))
    ab = ablation_table(authors, baseline, ablation)
    ab.to_csv(dest / "ablation.csv", index=False)
    seeds = ", ".join(map(str, ablation_seeds(ablation)))
    print(f"\nAblation (Fashion-MNIST, f = 24, seeds {seeds}, Nesterov off unless stated):")
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        print(ab.to_string(index=False, float_format="{:.3f}".format))
    ablation_f12 = load_runs(RESULTS / "ablation_f12", "ablation_f12")
    if not ablation_f12.empty:
        from make_grid import F12_LR, F12_SKIP  # noqa: E402  (this folder)

        ab12 = ablation_table(authors, baseline, ablation_f12, f=12, lr=F12_LR, attack="ALIE",
                              skip=F12_SKIP)
        ab12.to_csv(dest / "ablation_f12.csv", index=False)
        seeds = ", ".join(map(str, ablation_seeds(ablation_f12)))
        print(f"\nAblation at f = 12 (Fashion-MNIST, ALIE, lr 0.5, seeds {seeds}, no Nesterov):")
        with pd.option_context("display.width", 250, "display.max_colwidth", 60):
            print(ab12.to_string(index=False, float_format="{:.3f}".format))
    print(f"\n{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
