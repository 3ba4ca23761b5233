"""The ALIE-strength pilot and the batch-size study with seeds (pilot_z.toml, study.toml).

    python experiments/byzsgdnm/analyze_study.py pilot      # -> results/pilot_z.md
    python experiments/byzsgdnm/analyze_study.py study      # -> results/study.md, study_*.csv, figure
    python experiments/byzsgdnm/analyze_study.py study --model cnn   # the CNN study (study_cnn.toml)

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
    """One row per (method, rule, f_real, B): the chosen lr0, mean +- SE over seeds, edge flag.

    The choice is among the lr0 values run on the most seeds of the cell; the edge flag is
    against every lr0 of the cell's grid (so a value still running counts as the grid's edge)."""
    g = runs.groupby([*KEY, "lr"])["final"]
    s = g.agg(mean="mean", se=lambda v: v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.nan,
              seeds="count").reset_index()
    lrs = runs.groupby(KEY)["lr"].agg(lo="min", hi="max").reset_index()
    # lr0 values are compared on equal footing only: in a half-finished grid a value run on fewer
    # seeds than the cell's others is left out of the choice until its seeds are in
    full = s["seeds"] == s.groupby(KEY)["seeds"].transform("max")
    s = s[full]
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


# The paper's numbers that the claims below are tested against (final top-1 test accuracy, %,
# CIFAR-10 ResNet-20, batch per worker 32 ... 1024): Table 7 (no attack), Tables 1-2 (ByzSGDm,
# ALIE, delta = 1/8), Table 9 (ALIE, delta = 3/8).
PAPER_B = [32, 64, 128, 256, 512, 1024]
PAPER = {
    (0, "ByzSGDm"): {"KR": [91.08, 89.98, 89.71, 89.15, 86.15, 84.97], "GM": [92.02, 91.50, 90.85, 89.26, 88.21, 86.52],
                     "CM": [92.30, 91.79, 90.43, 89.84, 87.27, 84.06], "CC": [92.52, 91.74, 90.63, 89.40, 88.78, 85.50]},
    (0, "ByzSGDnm"): {"KR": [91.00, 90.15, 89.23, 88.76, 87.83, 84.71], "GM": [92.18, 91.81, 91.22, 89.93, 90.01, 88.08],
                      "CM": [92.29, 91.70, 91.15, 90.20, 89.06, 88.11], "CC": [92.51, 91.91, 91.50, 90.00, 89.33, 88.47]},
    (1, "ByzSGDm"): {"KR": [55.84, 63.22, 75.06, 84.47, 85.68, 83.48], "GM": [83.81, 87.92, 89.68, 87.99, 87.70, 85.94],
                     "CM": [86.46, 88.09, 89.16, 88.60, 87.20, 83.71], "CC": [86.55, 88.59, 88.94, 88.46, 88.29, 84.88]},
    (3, "ByzSGDm"): {"KR": [38.55, 54.15, 55.98, 59.28, 83.42, 83.45], "GM": [63.11, 70.88, 82.08, 87.62, 86.95, 84.75],
                     "CM": [33.11, 55.66, 66.38, 82.47, 83.25, 80.94], "CC": [72.83, 79.45, 84.94, 87.25, 87.46, 83.70]},
    (3, "ByzSGDnm"): {"KR": [43.47, 70.88, 80.20, 82.83, 85.12, 85.93], "GM": [69.45, 83.23, 86.63, 88.66, 89.13, 88.16],
                      "CM": [61.28, 71.46, 80.24, 83.55, 86.03, 85.74], "CC": [78.50, 83.91, 86.56, 88.32, 88.53, 87.89]},
}
RULE_ORDER = ["KR", "GM", "CM", "CC"]


def _paper_bstar(f, method):
    return {r: PAPER_B[int(np.argmax(v))] for r, v in PAPER.get((f, method), {}).items()}


def _paper_gaps(f, i):
    """The paper's ByzSGDnm - ByzSGDm per rule at delta = f/8 and its i-th batch size."""
    return {r: PAPER[(f, "ByzSGDnm")][r][i] - PAPER[(f, "ByzSGDm")][r][i] for r in RULE_ORDER}


def _rises(seq) -> bool:
    """A B* sequence over delta that never falls and ends above its start."""
    return all(a <= b for a, b in zip(seq, seq[1:])) and seq[0] < seq[-1]


def _ours_bstar(cells, f, method):
    """B* from the mean over seeds (each B at its chosen lr0)."""
    c = cells[(cells["f_real"] == f) & (cells["method"] == method)]
    return {r: int(g.loc[g["mean"].idxmax(), "batch_size"]) for r, g in c.groupby("rule")}


def _bs_text(d, per_seed=None):
    out = []
    for r in RULE_ORDER:
        if r in d:
            seeds = f" [{per_seed[r]}]" if per_seed and r in per_seed else ""
            out.append(f"{r} {d[r]}{seeds}")
    return ", ".join(out) if out else "(not run yet)"


def _gap(cells, f, b, rule):
    """ByzSGDnm - ByzSGDm at (f, B, rule) in points, with the SE of the difference."""
    c = cells[(cells["f_real"] == f) & (cells["batch_size"] == b) & (cells["rule"] == rule)].set_index("method")
    if not {"ByzSGDm", "ByzSGDnm"} <= set(c.index):
        return None
    d = 100 * (c.loc["ByzSGDnm", "mean"] - c.loc["ByzSGDm", "mean"])
    se = 100 * np.sqrt(np.nansum([c.loc["ByzSGDnm", "se"] ** 2, c.loc["ByzSGDm", "se"] ** 2]))
    return d, se


def _gaps_text(cells, f, b):
    parts, wins, n = [], 0, 0
    for r in RULE_ORDER:
        g = _gap(cells, f, b, r)
        if g is None:
            continue
        n += 1
        wins += g[0] > 2 * g[1] and g[0] > 0
        parts.append(f"{r} {g[0]:+.2f} ± {g[1]:.2f}")
    return ", ".join(parts), wins, n


def claims(cells: pd.DataFrame, bs: pd.DataFrame) -> pd.DataFrame:
    """The paper's batch-size claims, each beside what this study measured.

    B* is the batch with the best mean over seeds (the per-seed B* in brackets); a ByzSGDnm gain
    counts as a win when it exceeds twice its standard error. Our batch grid is {8, 32, 128, 512}
    per worker against the paper's {32, ..., 1024}: "the smallest batch" is 8 here, 32 there."""
    per_seed = {(r.method, r.rule, r.f_real): r.per_seed.replace(" ", "/") for r in bs.itertuples()}
    small, large = int(cells["batch_size"].min()), int(cells["batch_size"].max())
    rows = []

    def bstar_row(claim, f, methods, paper_ref, test):
        paper, ours, ok, n = [], [], 0, 0
        for m in methods:
            pb, ob = _paper_bstar(f, m), _ours_bstar(cells, f, m)
            ps = {r: per_seed.get((m, r, f), "") for r in ob}
            paper.append(f"{m}: {_bs_text(pb)}")
            ours.append(f"{m}: {_bs_text(ob, ps)}")
            ok += sum(test(b) for b in ob.values())
            n += len(ob)
        rows.append(dict(claim=claim, paper=f"{paper_ref}: " + "; ".join(paper), ours="; ".join(ours),
                         reproduced=f"{ok}/{n} rows" if n else "not run yet"))

    bstar_row("C1. Without attack the smallest batch is best", 0, ["ByzSGDm", "ByzSGDnm"],
              "Table 7, B* (32 = smallest)", lambda b: b == small)
    bstar_row("C2. ALIE at delta = 1/8 moves B* above the smallest batch (ByzSGDm)", 1, ["ByzSGDm"],
              "Tables 1-2, B*", lambda b: b > small)
    upper = sorted(cells["batch_size"].unique())[-2]
    bstar_row(f"C3. ALIE at delta = 3/8 moves B* to the upper half of the batch grid ({upper}-{large} "
              "here, 256-1024 in the paper)", 3, ["ByzSGDm", "ByzSGDnm"],
              "Table 9, B*", lambda b: b >= upper)
    # C4: monotone in delta, per row
    mono, n, text = 0, 0, []
    for m in ["ByzSGDm", "ByzSGDnm"]:
        b = {f: _ours_bstar(cells, f, m) for f in (0, 1, 3)}
        for r in RULE_ORDER:
            if all(r in b[f] for f in (0, 1, 3)):
                n += 1
                seq = [b[f][r] for f in (0, 1, 3)]
                mono += _rises(seq)
                text.append(f"{m}+{r} {'/'.join(map(str, seq))}")
    pb = {f: _paper_bstar(f, "ByzSGDm") for f in (0, 1, 3)}
    pseq = {r: [pb[f][r] for f in (0, 1, 3)] for r in RULE_ORDER}
    rows.append(dict(claim="C4. B* grows with delta (0 -> 1/8 -> 3/8)",
                     paper="Tables 7, 1-2, 9, ByzSGDm: "
                           + ", ".join(f"{r} {'/'.join(map(str, v))}" for r, v in pseq.items())
                           + f" ({sum(map(_rises, pseq.values()))}/{len(pseq)} rows)",
                     ours="; ".join(text) if text else "(not run yet)",
                     reproduced=f"{mono}/{n} rows" if n else "not run yet"))

    def gap_row(claim, f, b, table):
        i = 0 if b == small else -1  # the paper's smallest / largest batch
        t, w, n = _gaps_text(cells, f, b)
        paper = ", ".join(f"{r} {v:+.2f}" for r, v in _paper_gaps(f, i).items())
        rows.append(dict(claim=claim, paper=f"{table}, B = {PAPER_B[i]}, nm - m: {paper}",
                         ours=f"B = {b}: {t}" if n else "(not run yet)",
                         reproduced=f"{w}/{n} rows" if n else "not run yet"))

    gap_row("C5. ByzSGDnm beats ByzSGDm at the smallest batch under ALIE, delta = 3/8", 3, small, "Table 9")
    gap_row("C6. ByzSGDnm beats ByzSGDm at the largest batch under ALIE, delta = 3/8", 3, large, "Table 9")
    gap_row("C7. ... and without attack (the normalised step's own gain)", 0, large, "Table 7")
    # C8: the attack's cost is largest at the smallest batch
    cost, n, ok = [], 0, 0
    for m in ["ByzSGDm", "ByzSGDnm"]:
        for r in RULE_ORDER:
            c = cells[(cells["method"] == m) & (cells["rule"] == r)].set_index(["f_real", "batch_size"])["mean"]
            if all(k in c.index for k in [(0, small), (3, small), (0, large), (3, large)]):
                lo, hi = 100 * (c[(0, small)] - c[(3, small)]), 100 * (c[(0, large)] - c[(3, large)])
                n += 1
                ok += lo > hi
                cost.append(f"{m}+{r} {lo:.1f}/{hi:.1f}")
    lost = {m: {r: [c - a for c, a in zip(PAPER[(0, m)][r], PAPER[(3, m)][r])] for r in RULE_ORDER}
            for m in ["ByzSGDm", "ByzSGDnm"]}  # Table 7 minus Table 9, per batch
    paper_cost = "; ".join(f"{m} " + ", ".join(f"{r} {v[0]:.1f}/{v[-1]:.1f}" for r, v in d.items())
                           for m, d in lost.items())
    rows.append(dict(claim="C8. ALIE at delta = 3/8 costs most at the smallest batch "
                           "(points lost against no attack, smallest / largest B)",
                     paper=f"Tables 7 and 9, B = {PAPER_B[0]} / {PAPER_B[-1]}: {paper_cost}",
                     ours="; ".join(cost) if cost else "(not run yet)",
                     reproduced=f"{ok}/{n} rows" if n else "not run yet"))
    return pd.DataFrame(rows)


def study(out: Path, name: str = "study") -> str:
    """Tables, B* and the claims for the study in ``results/<name>`` (``study``: the MLP,
    ``study_cnn``: the CNN), written to ``<out>/<name>.md`` and ``<name>_*.csv``."""
    runs = _runs(HERE / "results" / name)
    cells = cell_table(runs)
    cells.to_csv(out / f"{name}_cells.csv", index=False)
    bs = b_star(runs, cells)
    bs.to_csv(out / f"{name}_bstar.csv", index=False)
    cells["entry"] = [f"{100 * m:.2f} ± {100 * s:.2f}" + ("*" if e else "")
                      for m, s, e in zip(cells["mean"], cells["se"].fillna(0), cells["edge"])]
    model = "CNN (lenet 8-16)" if name.endswith("cnn") else "MLP 784-100-10"
    parts = [f"# Batch-size study, {model}: {len(runs)} runs, seeds {sorted(runs['seed'].unique().tolist())}\n",
             "Final top-1 test accuracy (%), mean ± SE over seeds at the lr0 with the best mean "
             "(* = that lr0 is on an edge of the grid).\n"]
    for f in sorted(cells["f_real"].unique()):
        t = cells[cells["f_real"] == f].pivot_table(index=["rule", "method"], columns="batch_size",
                                                     values="entry", aggfunc="first")
        t.index = [f"{m}+{r}" for r, m in t.index]
        parts.append(f"\n## delta = {int(f)}/8\n\n" + md(t, index_name="method+rule \\ B"))
    parts.append("\n## B* per row (per seed; geometric mean; SE of log2 B*)\n\n"
                 + md(bs.round(3), index=False))
    cl = claims(cells, bs)
    cl.to_csv(out / f"{name}_claims.csv", index=False)
    parts.append("\n## The paper's claims beside this study\n\n"
                 "B* = the batch with the best mean over seeds, per-seed B* in brackets; a ByzSGDnm - "
                 "ByzSGDm gap counts when it exceeds twice its SE. Our batches are {8, 32, 128, 512} per "
                 "worker, the paper's {32, ..., 1024}.\n\n" + md(cl, index=False))
    text = "\n".join(parts)
    (out / f"{name}.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["pilot", "study"])
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                    help="which study: study.toml (mlp) or study_cnn.toml (cnn)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "study_cnn" if a.model == "cnn" else "study"
    print(pilot(out) if a.what == "pilot" else study(out, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
