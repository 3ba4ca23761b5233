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
