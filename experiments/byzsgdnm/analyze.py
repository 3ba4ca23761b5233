"""Tables and heatmaps of the batch-size study, the paper's way (best final accuracy over lr0).

    python experiments/byzsgdnm/analyze.py [RESULTS_DIR] [--out experiments/byzsgdnm/results]

RESULTS_DIR defaults to ``runs/byzsgdnm_scaled`` (``jbyz run experiments/byzsgdnm/scaled.toml``;
``runs/byzsgdnm_paper`` for paper.toml). Per run the value is the **final** top-1 test accuracy;
per table entry (method, rule, Byzantine fraction, attack, batch size) the best over lr0 is
reported, as the paper; the robust choice (one lr0 per (method, rule, fraction, batch) for every
attack: the best worst case) comes from :func:`jbyz.algorithms.byzsgdnm.select_lr`.

Writes into ``--out``: ``per_run.csv`` (one row per run), ``best_lr.csv`` / ``robust_lr.csv``,
``tables.md`` (paper-format tables, best B per row, ByzSGDnm - ByzSGDm, robust choice),
``best_lr_wide.csv`` (B = 128 with the wider lr0 grid), ``heatmap_<attack>.png`` and
``heatmap_<attack>_gap.png`` (batch size x Byzantine count, one panel per method + rule) and
``curves_alie.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from jbyz import plots, results
from jbyz.algorithms.byzsgdnm import select_lr

HERE = Path(__file__).resolve().parent
RULES = {"krum": "KR", "geometric_median": "GM", "median": "CM", "centered_clip": "CC"}
ATTACKS = {"none": "none", "sign_flip": "bit-flip", "alie": "ALIE", "foe": "FoE"}
CELL = ["method", "rule", "f_real", "batch_size"]


def common_lrs(runs: pd.DataFrame) -> list[float]:
    """The lr0 values every (cell, attack) was run with. scaled.toml adds {0.01, 1.0} at B = 128
    for the nm-vs-m comparison only: using them in the batch-size tables would tune B = 128 more
    than the other batch sizes."""
    sets = [set(g) for _, g in runs.groupby([*CELL, "atk"])["lr"]]
    return [float(v) for v in sorted(set.intersection(*sets))] if sets else []


def _pre(v) -> str:
    v = json.loads(v) if isinstance(v, str) else (v or [])
    names = [p if isinstance(p, str) else (p[0] if isinstance(p, list) else p.get("name")) for p in v]
    return "".join(f"+{n.upper()}" for n in names)


def label(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``method`` (ByzSGDnm / ByzSGDm), ``rule`` (CM, CC+NNM, ...) and ``atk`` columns."""
    df = df.copy()
    df["method"] = np.where(df["normalize"].astype(bool), "ByzSGDnm", "ByzSGDm")
    df["rule"] = df["aggregator"].map(RULES).fillna(df["aggregator"]) + df["preaggregators"].map(_pre)
    df["atk"] = df["attack"].map(ATTACKS).fillna(df["attack"])
    df["delta"] = df["f_real"].astype(int).astype(str) + "/" + df["n_workers"].astype(int).astype(str)
    return df


def per_run_table(df: pd.DataFrame) -> pd.DataFrame:
    runs = plots.per_run(df)  # best, final per run
    keep = ["run_id", "method", "rule", "atk", "f_real", "delta", "batch_size", "steps", "lr",
            "seed", "final", "best", "wall_time_s"]
    return runs[[c for c in keep if c in runs]]


def paper_table(best: pd.DataFrame, f_real: int, atk: str, nnm: bool = False) -> pd.DataFrame:
    """Rows method + rule, columns batch size: best-over-lr0 final accuracy (%)."""
    sub = best[(best["f_real"] == f_real) & (best["atk"] == atk)
               & (best["rule"].str.contains(r"\+NNM") == nnm)]
    if sub.empty:
        return pd.DataFrame()
    t = sub.pivot_table(index=["rule", "method"], columns="batch_size", values="value")
    t = t.sort_index(level=["rule", "method"], ascending=[True, False])
    t.index = [f"{m}+{r}" for r, m in t.index]
    return (100 * t).round(2)


def best_batch(best: pd.DataFrame) -> pd.DataFrame:
    """Best batch size per (method, rule, attack) and fraction: does it grow with delta?"""
    idx = best.groupby(["method", "rule", "atk", "f_real"])["value"].idxmax()
    b = best.loc[idx, ["method", "rule", "atk", "f_real", "batch_size", "value"]]
    return b.sort_values(["atk", "rule", "method", "f_real"]).reset_index(drop=True)


def nm_minus_m(best: pd.DataFrame) -> pd.DataFrame:
    """ByzSGDnm - ByzSGDm (percentage points) per (rule, fraction, attack, batch size)."""
    w = best.pivot_table(index=["atk", "f_real", "rule"], columns=["method", "batch_size"], values="value")
    d = 100 * (w["ByzSGDnm"] - w["ByzSGDm"])
    return d.round(2)


def md(df: pd.DataFrame, index=True, index_name="") -> str:
    if df.empty:
        return "(no runs)\n"
    d = (df.rename_axis(index_name) if index_name else df).reset_index() if index else df
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in d.iterrows():
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def heatmaps(df: pd.DataFrame, best: pd.DataFrame, out: Path, base_lr) -> list[Path]:
    """Batch size x Byzantine count, best-lr0 final accuracy, one figure per attack.

    delta = 0 (no attack) is the bottom row of every figure."""
    df = df[df["lr"].isin(base_lr)]
    chosen = best.merge(df[["run_id", *CELL, "atk", "lr"]].drop_duplicates("run_id"),
                        left_on=[*CELL, "atk", "best_lr"], right_on=[*CELL, "atk", "lr"])
    sel = df[df["run_id"].isin(chosen["run_id"])].copy()
    sel = sel[~sel["rule"].str.contains(r"\+NNM")]
    sel["panel"] = sel["method"] + "+" + sel["rule"]
    import matplotlib.pyplot as plt

    paths = []
    for atk in ("ALIE", "FoE", "bit-flip"):
        part = sel[(sel["atk"] == atk) | (sel["f_real"] == 0)]
        if part[part["atk"] == atk].empty:
            continue
        part = part.sort_values(["rule", "method"], ascending=[True, False])
        p = out / f"heatmap_{atk.lower().replace('-', '')}.png"
        fig = plots.heatmap(part, x="batch_size", y="f_real", stat="final", col="panel", path=p,
                            title=f"best-lr0 final test accuracy, {atk} (f_real = 0: no attack)")
        plt.close(fig)
        paths.append(p)
        # the same, relative to the best batch size of each row: where is the optimum?
        last = part.sort_values("step").groupby("run_id")["test_accuracy"].transform("last")
        part = part.assign(final_acc=last)
        row_best = part.groupby(["panel", "f_real"])["final_acc"].transform("max")
        part = part.assign(gap_to_best_B=part["final_acc"] - row_best)
        p = out / f"heatmap_{atk.lower().replace('-', '')}_gap.png"
        fig = plots.heatmap(part, x="batch_size", y="f_real", stat="final", metric="gap_to_best_B",
                            col="panel", path=p, fmt="{:+.3f}",
                            title=f"{atk}: final accuracy minus the best batch size's (0 = best B of the row)")
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="runs/byzsgdnm_scaled")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = label(results.load_results(args.results))
    runs = per_run_table(df)
    runs.to_csv(out / "per_run.csv", index=False)

    base_lr = common_lrs(runs)
    base = runs[runs["lr"].isin(base_lr)]
    choice = select_lr(base.rename(columns={"final": "value_final"}), cell=CELL, attack="atk",
                       metric="value_final")
    best = choice.per_attack
    best.to_csv(out / "best_lr.csv", index=False)
    robust = choice.robust
    robust.to_csv(out / "robust_lr.csv", index=False)

    parts = [f"# Measured: {runs['run_id'].nunique()} runs from {args.results}\n",
             f"Final top-1 test accuracy (%), best over lr0 in {base_lr} per entry (the paper's way).\n"]
    for f_real, atk, nnm, title in [
        (0, "none", False, "no attack, all workers honest (paper: Table 7)"),
        (1, "ALIE", False, "1 Byzantine, ALIE (paper: Tables 1-2, ByzSGDm only)"),
        (1, "FoE", False, "1 Byzantine, FoE (not in the paper)"),
        (3, "bit-flip", False, "3 Byzantine, bit-flip -10x (paper: Table 8)"),
        (3, "ALIE", False, "3 Byzantine, ALIE (paper: Table 9)"),
        (3, "FoE", False, "3 Byzantine, FoE (paper: Table 10)"),
        (3, "ALIE", True, "3 Byzantine, ALIE, with NNM (paper: Table 11)"),
    ]:
        t = paper_table(best, f_real, atk, nnm)
        if not t.empty:
            parts.append(f"\n## {title}\n\n" + md(t, index_name="method+rule \\ B"))
    parts.append("\n## Best batch size per row and Byzantine count (value = its accuracy)\n\n")
    bb = best_batch(best)
    bb["value"] = (100 * bb["value"]).round(2)
    parts.append(md(bb, index=False))
    parts.append("\n## ByzSGDnm - ByzSGDm (points), best lr0 each\n\n" + md(nm_minus_m(best)))
    rb = robust.copy()
    for c in rb.columns:
        if c in ("worst", "paper_worst") or c.startswith("at_"):
            rb[c] = (100 * rb[c]).round(2)
    parts.append("\n## Robust choice: one lr0 per cell for all its attacks (worst case, %)\n\n"
                 + md(rb.sort_values(["f_real", "rule", "method", "batch_size"]), index=False))
    wide_lr = runs.groupby([*CELL, "atk"])["lr"].transform("nunique") > len(base_lr)
    if wide_lr.any():
        ext = select_lr(runs[wide_lr].rename(columns={"final": "value_final"}), cell=CELL,
                        attack="atk", metric="value_final").per_attack
        ext.to_csv(out / "best_lr_wide.csv", index=False)
        w = ext.pivot_table(index=["atk", "f_real", "rule"], columns="method", values="value")
        lr_w = ext.pivot_table(index=["atk", "f_real", "rule"], columns="method", values="best_lr")
        t = pd.concat({"ByzSGDm": 100 * w["ByzSGDm"], "lr0 m": lr_w["ByzSGDm"],
                       "ByzSGDnm": 100 * w["ByzSGDnm"], "lr0 nm": lr_w["ByzSGDnm"],
                       "nm - m": 100 * (w["ByzSGDnm"] - w["ByzSGDm"])}, axis=1).round(2)
        lrs = [float(v) for v in sorted(runs.loc[wide_lr, "lr"].unique())]
        parts.append(f"\n## Largest batch with the wider lr0 grid {lrs}: best final accuracy (%)\n\n"
                     + md(t))
    lr_counts = best.groupby(["method", "best_lr"]).size().unstack(fill_value=0)
    parts.append("\n## How often each lr0 is the best (per method)\n\n" + md(lr_counts))
    (out / "tables.md").write_text("".join(parts))

    figs = heatmaps(df, best, out, base_lr)
    # accuracy curves of the best-lr0 run of each (method, B), 3 Byzantine, ALIE
    b3 = best[(best["atk"] == "ALIE") & (best["f_real"] == 3) & ~best["rule"].str.contains(r"\+NNM")]
    alie = df[df["lr"].isin(base_lr)].merge(b3[[*CELL, "atk", "best_lr"]],
                                            left_on=[*CELL, "atk", "lr"], right_on=[*CELL, "atk", "best_lr"])
    if not alie.empty:
        import matplotlib.pyplot as plt

        alie["series"] = alie["method"] + " B=" + alie["batch_size"].astype(str)
        alie = alie.sort_values(["method", "batch_size", "step"])
        alie["epoch"] = alie["step"] * alie["batch_size"] * alie["n_workers"] / 60000
        fig = plots.accuracy_curves(alie.assign(step=alie["epoch"]), hue="series", col="rule",
                                    path=out / "curves_alie.png",
                                    title="3 Byzantine, ALIE, best lr0 per line (x: epochs of Fashion-MNIST)")
        plt.close(fig)
    print((out / "tables.md").read_text())
    print("figures:", ", ".join(str(p) for p in figs))
    if "wall_time_s" in runs:
        print(f"sum of per-run wall time: {runs['wall_time_s'].sum():.0f} s over {len(runs)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
