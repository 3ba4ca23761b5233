"""The batch-size study's analysis (experiments/byzsgdnm/analyze_study.py) on hand-made tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "byzsgdnm" / "analyze_study.py"
_spec = importlib.util.spec_from_file_location("byzsgdnm_analyze_study", _PATH)
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def _runs(acc) -> pd.DataFrame:
    """acc[(B, lr)] -> final accuracy per seed (a list); one method, rule and f_real."""
    rows = [dict(method="ByzSGDnm", rule="CM", f_real=3, batch_size=b, lr=lr, seed=s, final=v)
            for (b, lr), vals in acc.items() for s, v in enumerate(vals)]
    return pd.DataFrame(rows)


def test_cell_table_picks_the_best_mean_over_seeds_and_flags_edges():
    runs = _runs({(8, 0.01): [0.80, 0.82, 0.81], (8, 0.03): [0.86, 0.84, 0.85],
                  (8, 0.1): [0.90, 0.70, 0.80],  # best single seed, worse mean
                  (32, 0.01): [0.5, 0.5, 0.5], (32, 0.03): [0.6, 0.6, 0.6], (32, 0.1): [0.7, 0.8, 0.9]})
    cells = S.cell_table(runs).set_index("batch_size")
    assert cells.loc[8, "lr"] == 0.03 and cells.loc[8, "edge"] == ""
    assert cells.loc[8, "mean"] == pytest.approx(0.85)
    assert cells.loc[8, "se"] == pytest.approx(0.01 / np.sqrt(3))
    assert cells.loc[32, "lr"] == 0.1 and cells.loc[32, "edge"] == "high"
    assert cells.loc[32, "seeds"] == 3


def test_b_star_per_seed_at_each_batch_sizes_chosen_lr():
    runs = _runs({(8, 0.1): [0.80, 0.80, 0.90], (8, 0.3): [0.1, 0.1, 0.1],
                  (32, 0.1): [0.85, 0.70, 0.70], (32, 0.3): [0.83, 0.83, 0.83],
                  (128, 0.1): [0.2, 0.2, 0.2], (128, 0.3): [0.84, 0.84, 0.84]})
    cells = S.cell_table(runs)
    # chosen lr: B=8 -> 0.1 (0.833), B=32 -> 0.3 (0.83 > 0.75), B=128 -> 0.3
    bs = S.b_star(runs, cells).iloc[0]
    # seed 0: 0.80 / 0.83 / 0.84 -> 128; seed 1: 0.80 / 0.83 / 0.84 -> 128; seed 2: 0.90 -> 8
    assert bs["per_seed"] == "128 128 8"
    assert bs["B_star"] == pytest.approx(2 ** ((7 + 7 + 3) / 3))
    assert bs["se_log2"] == pytest.approx(np.std([7, 7, 3], ddof=1) / np.sqrt(3))


def test_runs_reads_a_study_without_diagnostics(monkeypatch):
    """The study logs no agg_distance (diagnostics off); _runs must not need it."""
    rows = [dict(run_id=f"r{s}", step=t, test_accuracy=0.5 + 0.1 * s + 0.01 * t, method_name="x",
                 seed=s) for s in range(2) for t in (0, 10)]
    df = pd.DataFrame(rows)
    monkeypatch.setattr(S.results, "load_results", lambda path: df)
    monkeypatch.setattr(S, "label", lambda d: d)
    monkeypatch.setattr(S.plots, "per_run", lambda d: d.groupby("run_id", as_index=False)
                        ["test_accuracy"].last().rename(columns={"test_accuracy": "final"}))
    runs = S._runs(Path("unused"))
    assert list(runs["final"]) == pytest.approx([0.6, 0.7])
    assert runs["mean_agg_distance"].isna().all()
    with_diag = df.assign(agg_distance=[1.0, 3.0, 2.0, 2.0])
    monkeypatch.setattr(S.results, "load_results", lambda path: with_diag)
    assert list(S._runs(Path("unused"))["mean_agg_distance"]) == [2.0, 2.0]


def test_claims_count_rows_and_gaps_against_their_standard_error():
    """B* per row from the mean over seeds; a ByzSGDnm gain counts only beyond 2 SE."""
    acc = {  # (method, f_real) -> mean accuracy at B = 8, 32, 128, 512
        ("ByzSGDm", 0): [0.90, 0.88, 0.86, 0.84], ("ByzSGDnm", 0): [0.89, 0.90, 0.88, 0.87],
        ("ByzSGDm", 1): [0.80, 0.85, 0.84, 0.83], ("ByzSGDnm", 1): [0.84, 0.86, 0.87, 0.86],
        ("ByzSGDm", 3): [0.30, 0.60, 0.80, 0.82], ("ByzSGDnm", 3): [0.60, 0.75, 0.82, 0.821],
    }
    rows = [dict(method=m, rule="CM", f_real=f, batch_size=b, lr=0.1, mean=v, se=0.002, seeds=3, edge="")
            for (m, f), vals in acc.items() for b, v in zip([8, 32, 128, 512], vals)]
    cells = pd.DataFrame(rows)
    bs = pd.DataFrame([dict(method=m, rule="CM", f_real=f, per_seed="8 8 32") for (m, f) in acc])
    cl = S.claims(cells, bs)
    by = {c.split(".")[0]: r for c, r in zip(cl["claim"], cl["reproduced"])}
    ours = {c.split(".")[0]: o for c, o in zip(cl["claim"], cl["ours"])}
    assert by["C1"] == "1/2 rows"            # ByzSGDm best at 8; ByzSGDnm at 32
    assert "CM 8 [8/8/32]" in ours["C1"] and "CM 32 [8/8/32]" in ours["C1"]
    assert by["C2"] == "1/1 rows"            # ByzSGDm at delta = 1/8: 32 > 8
    assert by["C3"] == "2/2 rows"            # 512 for both methods
    assert by["C4"] == "2/2 rows"            # 8/32/512 and 32/128/512
    assert by["C5"] == "1/1 rows" and "CM +30.00 ± 0.28" in ours["C5"]
    assert by["C6"] == "0/1 rows"            # +0.1 points is inside 2 SE (0.57)
    assert by["C8"] == "2/2 rows" and "ByzSGDm+CM 60.0/2.0" in ours["C8"]
    # the paper's side is computed from its tables, not typed in
    assert "KR 512, GM 128, CM 128, CC 128" in cl["paper"].iloc[1]


def test_cell_table_compares_lr_values_on_the_same_number_of_seeds():
    """A value run on one seed so far (a grid extension in progress) is not chosen over values
    run on three, however good its one seed; it still sets the grid's edge."""
    runs = _runs({(8, 0.001): [0.95], (8, 0.01): [0.80, 0.82, 0.81], (8, 0.03): [0.70, 0.70, 0.70]})
    cell = S.cell_table(runs).iloc[0]
    assert cell["lr"] == 0.01 and cell["seeds"] == 3 and cell["edge"] == ""
    runs = _runs({(8, 0.001): [0.95, 0.94, 0.96], (8, 0.01): [0.80, 0.82, 0.81]})
    cell = S.cell_table(runs).iloc[0]
    assert cell["lr"] == 0.001 and cell["edge"] == "low"
