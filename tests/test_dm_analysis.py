"""The distributed-momentum analysis computes the authors' counters (their reproduce.py):
strict thresholds, "gain above X" conditioned on "effective at X", pairs by seed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "distributed_momentum"))
import analyze  # noqa: E402


def _runs(rows):
    out = []
    for i, (gar, at, seed, best) in enumerate(rows):
        out.append(dict(run_id=str(i), dataset="fashion_mnist", n_workers=51 if gar else 27,
                        f_real=24 if gar else 0, lr=0.5, nesterov=False, gar=gar or "Average",
                        attack_name="ALIE" if gar else "none", momentum_at=at, seed=seed, best=best))
    return pd.DataFrame(out)


def test_pairs_and_strict_counters():
    runs = _runs([
        (None, "server", 1, 0.80), (None, "server", 2, 0.80),
        ("Median", "server", 1, 0.60), ("Median", "worker", 1, 0.70),  # loss 0.2 exactly, gain 0.1
        ("Median", "server", 2, 0.45), ("Median", "worker", 2, 0.44),  # loss 0.35, gain -0.01
        ("Krum (code)", "server", 1, 0.30), ("Krum (code)", "worker", 1, 0.75),  # loss .5 gain .45
        ("Krum (code)", "worker", 2, 0.5),  # no at-update twin: not a pair
    ])
    p = analyze.pairs_table(runs)
    assert len(p) == 3
    np.testing.assert_allclose(sorted(p["loss"]), [0.2, 0.35, 0.5])
    # exact thresholds (set directly: 0.8 - 0.6 is not exactly 0.2 in floating point)
    p["loss"] = [0.2, 0.35, 0.5]
    p["gain"] = [0.1, -0.01, 0.45]
    p["ref"], p["atw"] = 0.8, [0.7, 0.44, 0.75]
    c = analyze.counters(p)
    assert c["attack effective at 20% (loss > 0.2)"] == (2, 3)  # 0.2 itself is not > 0.2
    assert c["attack effective at 10% (loss > 0.1)"] == (3, 3)
    assert c["gain above 10% where effective at 10%"] == (1, 3)  # 0.1 is not > 0.1
    assert c["gain above 20% where effective at 20%"] == (1, 2)
    assert c["attack effective at 40% (loss > 0.4)"] == (1, 3)
    assert c["gain above 40% where effective at 40%"] == (1, 1)
    assert c["worker momentum worse (gain < 0)"] == (1, 3)
    assert c["worker momentum worse (gain < -0.02)"] == (0, 3)
    assert c["worse and more than 5% under the reference"] == (1, 3)  # 0.80 - 0.44 > 0.05
    assert analyze._fmt(2, 3) == "2/3 (66.67%)"


def test_bound_share_counts_steps_under_the_bound_with_loss_not_above_start():
    kappa2 = 1 / 27  # the median's bound squared at n = 51, f = 24
    sub = np.array([3.0, 0.02, 0.02, 0.02]) * kappa2  # steps 1-3 under the bound
    loss = np.array([2.0, 2.5, 1.9, 2.0])  # step 1 above the start
    runs = _runs([("Median", "worker", 1, 0.7)])
    runs["vnr_submitted_steps"] = [sub]
    runs["train_loss_steps"] = [loss]
    t = analyze.bound_table(runs)
    assert t.loc[0, "steps_valid"] == 2 and t.loc[0, "share"] == pytest.approx(0.5)
    assert t.loc[0, "bound"] == pytest.approx(kappa2 ** 0.5)


def test_ablation_rows_use_the_seeds_the_ablation_has_run():
    """A partly run ablation (seed 1 only) is compared with the authors' setting on seed 1 only."""
    assert analyze.ablation_seeds(pd.DataFrame()) == (1, 2, 3)
    assert analyze.ablation_seeds(pd.DataFrame({"seed": [1, 1, 3, 3]})) == (1, 3)
    # a seed begun but not finished is left out until it has as many runs as the others
    assert analyze.ablation_seeds(pd.DataFrame({"seed": [1, 1, 1, 2, 3]})) == (1,)
    runs = _runs([(None, "server", 1, 0.8), (None, "server", 2, 0.8),
                  ("Median", "server", 1, 0.6), ("Median", "server", 2, 0.6)])
    assert sorted(analyze._slice(runs, seeds=(1,))["seed"]) == [1, 1]
    assert len(analyze._slice(runs, seeds=(1, 2))) == 4


def test_f12_slice_keeps_one_attack_and_lr_with_its_references():
    rows = [dict(run_id=str(i), dataset="fashion_mnist", n_workers=n, f_real=f, lr=lr,
                 nesterov=False, attack_name=a, seed=1)
            for i, (n, f, lr, a) in enumerate([
                (51, 12, 0.5, "ALIE"), (51, 12, 0.5, "FOE"), (51, 12, 0.02, "ALIE"),
                (51, 24, 0.5, "ALIE"), (39, 0, 0.5, "none"), (39, 0, 0.02, "none"),
                (27, 0, 0.5, "none")])]
    runs = pd.DataFrame(rows)
    kept = analyze._slice(runs, f=12, lr=0.5, attack="ALIE")
    assert kept["run_id"].tolist() == ["0", "4"]
    assert analyze._slice(runs, f=24)["run_id"].tolist() == ["3", "6"]
