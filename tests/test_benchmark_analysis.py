"""experiments/robustness_benchmark/analyze.py: only complete rules enter the tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "robustness_benchmark" / "analyze.py"
_spec = importlib.util.spec_from_file_location("robustness_benchmark_analyze", _PATH)
A = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(A)


def test_complete_rules_leave_out_a_rule_with_missing_runs():
    df = pd.DataFrame({"aggregator": ["mean"] * 4 + ["median"] * 3 + ["krum"] * 4,
                       "run_id": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]})
    rules, partial = A.complete_rules(df)
    assert rules == ["krum", "mean"]
    assert partial == {"median": 3}
