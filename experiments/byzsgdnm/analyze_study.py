"""The ALIE-strength pilot and the batch-size study with seeds (pilot_z.toml, study.toml).

    python experiments/byzsgdnm/analyze_study.py pilot      # -> results/pilot_z.md
    python experiments/byzsgdnm/analyze_study.py study      # -> results/study.md, study_*.csv, figure

Both read the stored parts (``results/pilot_z/parts``, ``results/study/parts``), so they work on a
half-finished grid: missing cells print as blanks.

**Pilot.** Per (method, rule, z): the final top-1 test accuracy at B = 8, delta = 3/8, its drop
against the run with all 8 workers honest (same method and rule), and the mean over the run of
``agg_distance`` = ||aggregate - mean of the honest workers' vectors|| (evaluated every step, averaged
between evaluations).

**Study.** Per cell (method, rule, delta, B) the learning rate lr0 is the one with the best
*mean over seeds* of the final accuracy (the paper reports the best lr0 per entry, one seed); the
entry is that mean +- its standard error over seeds, and it is flagged when lr0 sits on an edge of
the grid. B* of a row (method, rule, delta) is, per seed, the batch size with the best final
accuracy at each B's chosen lr0; it is reported as the per-seed values, their geometric mean and
the standard error of log2 B*.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from jbyz import plots, results

HERE = Path(__file__).resolve().parent


def _scaled_analysis():
    """This folder's analyze.py (the scaled study's labels and markdown), loaded by path: other
    experiments have an ``analyze`` module too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("byzsgdnm_analyze", HERE / "analyze.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_A = _scaled_analysis()
label, md = _A.label, _A.md

KEY = ["method", "rule", "f_real", "batch_size"]


def _runs(path: Path) -> pd.DataFrame:
    df = label(results.load_results(path))
    if "attack.z" not in df:
        df["attack.z"] = np.nan
    per = plots.per_run(df)
    if "agg_distance" not in df:  # the study runs without diagnostics (the pilot logs them)
        return per.assign(mean_agg_distance=np.nan)
    dist = df.groupby("run_id")["agg_distance"].mean().rename("mean_agg_distance")
    return per.join(dist, on="run_id")


def pilot(out: Path) -> str:
    runs = _runs(HERE / "results" / "pilot_z")
    clean = runs[runs["f_real"] == 0].set_index(["method", "rule"])["final"]
    att = runs[runs["f_real"] > 0].copy()
    att["clean"] = [clean.get((m, r), np.nan) for m, r in zip(att["method"], att["rule"])]
    att["drop"] = 100 * (att["clean"] - att["final"])
    t = att.pivot_table(index=["rule", "method"], columns="attack.z", values="drop")
    d = att.pivot_table(index=["rule", "method"], columns="attack.z", values="mean_agg_distance")
    c = (100 * clean).round(2).rename("no attack (%)").swaplevel()
    t = t.round(1).rename(columns=lambda z: f"drop z={z:g}")
    d = d.round(2).rename(columns=lambda z: f"dist z={z:g}")
    table = pd.concat([c.reindex(t.index), t, d], axis=1)
    table.index = [f"{m}+{r}" for r, m in table.index]
    table.to_csv(out / "pilot_z.csv")
    ten = att.assign(hit=att["drop"] >= 10).groupby("attack.z")["hit"].agg(["sum", "count"])
    ten = ten.astype(int).astype(str)
    lines = [f"# ALIE strength pilot: {len(runs)} runs (B = 8, delta = 3/8, lr0 0.1, T = 4,096)\n",
             "drop = final accuracy with all 8 honest minus with ALIE (points); dist = mean over "
             "the run of ||aggregate - honest mean||.\n", md(table, index_name="method+rule"),
             "\nRows (method+rule) whose drop is >= 10 points, per z:\n",
             md(ten.rename(columns={"sum": ">= 10 points", "count": "rows"}), index_name="z")]
    text = "\n".join(lines)
    (out / "pilot_z.md").write_text(text)
    return text


def cell_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, rule, f_real, B): the chosen lr0, mean +- SE over seeds, edge flag."""
    g = runs.groupby([*KEY, "lr"])["final"]
    s = g.agg(mean="mean", se=lambda v: v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.nan,
              seeds="count").reset_index()
    lrs = runs.groupby(KEY)["lr"].agg(lo="min", hi="max").reset_index()
    best = s.loc[s.groupby(KEY)["mean"].idxmax()].merge(lrs, on=KEY)
    best["edge"] = np.where(best["lr"] == best["lo"], "low",
                            np.where(best["lr"] == best["hi"], "high", ""))
    return best.drop(columns=["lo", "hi"]).reset_index(drop=True)


def b_star(runs: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Per row (method, rule, f_real): B* per seed at each B's chosen lr0."""
    chosen = runs.merge(cells[[*KEY, "lr"]], on=[*KEY, "lr"])
    rows = []
    for (m, r, f), g in chosen.groupby(["method", "rule", "f_real"]):
        per_seed = g.loc[g.groupby("seed")["final"].idxmax(), ["seed", "batch_size"]]
        if g["batch_size"].nunique() < 2:
            continue
        lb = np.log2(per_seed["batch_size"].to_numpy(float))
        se = lb.std(ddof=1) / np.sqrt(len(lb)) if len(lb) > 1 else np.nan
        rows.append(dict(method=m, rule=r, f_real=f, per_seed=" ".join(str(int(b)) for b in per_seed["batch_size"]),
                         B_star=float(2 ** lb.mean()), se_log2=se, seeds=len(lb),
                         batches=g["batch_size"].nunique()))
    return pd.DataFrame(rows)


def study(out: Path) -> str:
    runs = _runs(HERE / "results" / "study")
    cells = cell_table(runs)
    cells.to_csv(out / "study_cells.csv", index=False)
    bs = b_star(runs, cells)
    bs.to_csv(out / "study_bstar.csv", index=False)
    cells["entry"] = [f"{100 * m:.2f} ± {100 * s:.2f}" + ("*" if e else "")
                      for m, s, e in zip(cells["mean"], cells["se"].fillna(0), cells["edge"])]
    parts = [f"# Batch-size study: {len(runs)} runs, seeds {sorted(runs['seed'].unique().tolist())}\n",
             "Final top-1 test accuracy (%), mean ± SE over seeds at the lr0 with the best mean "
             "(* = that lr0 is on an edge of the grid).\n"]
    for f in sorted(cells["f_real"].unique()):
        t = cells[cells["f_real"] == f].pivot_table(index=["rule", "method"], columns="batch_size",
                                                     values="entry", aggfunc="first")
        t.index = [f"{m}+{r}" for r, m in t.index]
        parts.append(f"\n## delta = {int(f)}/8\n\n" + md(t, index_name="method+rule \\ B"))
    parts.append("\n## B* per row (per seed; geometric mean; SE of log2 B*)\n\n"
                 + md(bs.round(3), index=False))
    text = "\n".join(parts)
    (out / "study.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["pilot", "study"])
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(pilot(out) if a.what == "pilot" else study(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
