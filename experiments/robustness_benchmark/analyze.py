"""Tables and heatmaps of the robustness benchmark, ByzFL's protocol, from the stored parts.

    python experiments/robustness_benchmark/analyze.py     # -> results/tables.md, heatmaps, csv

Works on a half-finished grid: only the rules whose every (attack, f, gamma, lr) run is stored
enter the tables (the others are listed as incomplete), so a rule is never judged on a subset of
attacks. What it computes, from ``jbyz.results.select_hyperparameters`` (the same as
``jbyz select``):

* per rule and cell (f x gamma), the lr whose worst case over the 16 attacks of *validation*
  accuracy is best, and the worst-case *test* accuracy there (ByzFL's benchmark protocol: the
  best evaluation of each run, seeds averaged first; one seed here);
* the best rule per cell, and which attack is the worst case how often;
* the gradient-optimised attack against the two line-search attacks (optimal ALIE and optimal
  IPM, ByzFL's 20-evaluation search) at the selected lr: per rule and cell, the test accuracy
  each leaves, and how often the gradient attack leaves less;
* each rule's and attack's measured cost (sum of the runs' wall times; the runs shared one core
  with another job, so these are comparisons, not timings).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from jbyz import plots, results

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
LINE_SEARCH = ("optimal_alie", "optimal_ipm")
GRADIENT = "gradient_ascent"


def _md(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    d = df.reset_index() if not isinstance(df.index, pd.RangeIndex) else df
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in d.iterrows():
        lines.append("| " + " | ".join(floatfmt.format(v) if isinstance(v, float) and not np.isnan(v)
                                       else ("" if isinstance(v, float) else str(v)) for v in r) + " |")
    return "\n".join(lines) + "\n"


def complete_rules(df: pd.DataFrame) -> tuple[list[str], dict[str, int]]:
    """The aggregators with as many runs as the most complete one (every attack, f, gamma, lr)."""
    n = df.groupby("aggregator")["run_id"].nunique()
    full = int(n.max())
    return sorted(n[n == full].index), {a: int(k) for a, k in n[n < full].items()}


def main(argv=None) -> int:
    df = results.load_results(OUT / "parts")
    df["attack_label"] = results.component_name(df["attack"].astype(str))
    rules, partial = complete_rules(df)
    df = df[df["aggregator"].isin(rules)]
    sel = results.select_hyperparameters(df, heterogeneity="gamma")
    detail = results.select_hyperparameters(df, heterogeneity="gamma", per_attack=True)
    sel.to_csv(OUT / "selection.csv", index=False)
    detail.to_csv(OUT / "selection_per_attack.csv", index=False)
    plots.selection_heatmaps(sel, x="f_real", path=OUT / "selection_heatmaps.png")
    plots.best_rule_map(sel, x="f_real", path=OUT / "best_rule.png")
    import matplotlib.pyplot as plt

    plt.close("all")

    parts = [f"# Robustness benchmark: {df['run_id'].nunique()} runs, {len(rules)} complete rules\n"]
    if partial:
        parts.append("Incomplete (not in the tables): "
                     + ", ".join(f"{a} ({k} runs)" for a, k in partial.items()) + "\n")
    worst = sel.pivot_table(index="aggregator", columns=["f_real", "gamma"],
                            values="test_accuracy_worst")
    worst.columns = [f"f={f}, gamma={g:g}" for f, g in worst.columns]
    worst["mean"] = worst.mean(axis=1)
    worst = worst.sort_values("mean", ascending=False)
    parts.append("\n## Worst-case test accuracy over the 16 attacks, at the lr selected on "
                 "validation\n\n" + _md(worst))
    att = sel.pivot_table(index="aggregator", columns=["f_real", "gamma"],
                          values="test_accuracy_worst_attack", aggfunc="first")
    att.columns = [f"f={f}, gamma={g:g}" for f, g in att.columns]
    parts.append("\n## Which attack is the worst case (test accuracy)\n\n" + _md(att.loc[worst.index]))
    counts = sel["test_accuracy_worst_attack"].value_counts().rename("cells").to_frame()
    parts.append("\nWorst-case attack, counted over rules x cells:\n\n" + _md(counts))
    best = sel.loc[sel.groupby(["f_real", "gamma"])["test_accuracy_worst"].idxmax(),
                   ["f_real", "gamma", "aggregator", "test_accuracy_worst"]]
    parts.append("\n## Best rule per cell\n\n" + _md(best.reset_index(drop=True)))

    # gradient attack vs the line searches, at the selected lr
    d = detail.copy()
    d["attack_label"] = results.component_name(d["attack"].astype(str))
    piv = d.pivot_table(index=["aggregator", "f_real", "gamma"], columns="attack_label",
                        values="test_accuracy")
    if GRADIENT in piv and all(a in piv for a in LINE_SEARCH):
        ls = piv[list(LINE_SEARCH)].min(axis=1)
        cmp = pd.DataFrame({"gradient": piv[GRADIENT], "optimal_alie": piv["optimal_alie"],
                            "optimal_ipm": piv["optimal_ipm"], "gradient - best line search":
                            piv[GRADIENT] - ls})
        cmp.to_csv(OUT / "gradient_vs_line_search.csv")
        lower = int((cmp["gradient - best line search"] < -0.005).sum())
        higher = int((cmp["gradient - best line search"] > 0.005).sum())
        parts.append(
            "\n## The gradient attack against the line-search attacks (test accuracy left, selected lr)\n\n"
            f"Over {len(cmp)} rule x cell entries, the gradient attack leaves at least 0.5 point "
            f"less accuracy than the stronger line search in {lower}, more in {higher}, within "
            f"0.5 point in {len(cmp) - lower - higher}; median difference "
            f"{100 * cmp['gradient - best line search'].median():+.1f} points.\n\n"
            + _md(cmp.reset_index()))

    # cost
    runs = df.groupby("run_id").agg(aggregator=("aggregator", "first"),
                                    attack=("attack_label", "first"),
                                    wall=("wall_time_s", "max"))
    cost_rule = runs.groupby("aggregator")["wall"].sum().sort_values()
    cost_att = runs.groupby("attack")["wall"].sum().sort_values()
    cost = pd.DataFrame({"runs": runs.groupby("aggregator").size(), "wall s (sum)": cost_rule})
    parts.append("\n## Cost per rule (sum of run wall times; one shared core)\n\n"
                 + _md(cost.sort_values("wall s (sum)"), "{:.0f}"))
    parts.append("\n## Cost per attack (over the complete rules)\n\n"
                 + _md(cost_att.rename("wall s (sum)").to_frame(), "{:.0f}"))
    text = "\n".join(parts)
    (OUT / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
