"""ByzFL's benchmark protocol (jbyz.results.select_hyperparameters, `jbyz select`, the heatmaps):
on small tables whose right answer is known by construction."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from jbyz import cli, plots, results  # noqa: E402
from jbyz.registry import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = (0, 10, 20)


def make_table(acc, *, aggregators=("median",), fs=(2,), splits=(("iid", 1.0),),
               lrs=(0.01, 0.1), attacks=("alie", "sign_flip"), seeds=(1, 2), steps=STEPS,
               extra=None):
    """One row per run and evaluation; ``acc(**point) -> (val, test)`` decides the accuracies."""
    rows = []
    for agg, f, (split, alpha), lr, attack, seed in itertools.product(
            aggregators, fs, splits, lrs, attacks, seeds):
        point = dict(aggregator=agg, f_real=f, split=split, dirichlet_alpha=alpha, lr=lr,
                     attack=attack, seed=seed, **(extra or {}))
        run_id = "-".join(map(str, point.values()))
        for step in steps:
            val, test = acc(**point, step=step)
            rows.append(dict(run_id=run_id, **point, n_workers=10, step=step,
                             val_accuracy=val, test_accuracy=test,
                             val_loss=1 - val, test_loss=1 - test))
    return pd.DataFrame(rows)


def ramp(step, top):
    return top * step / STEPS[-1]


# -- the choice ---------------------------------------------------------------------------------

def test_best_on_average_but_worst_under_one_attack_is_not_chosen():
    def acc(lr, attack, step, **_):
        top = {0.1: {"alie": 0.60, "sign_flip": 0.98}, 0.01: {"alie": 0.65, "sign_flip": 0.70}}
        return ramp(step, top[lr][attack]), ramp(step, top[lr][attack]) - 0.02

    table = make_table(acc)
    mean_best = table.groupby("lr")["val_accuracy"].mean().idxmax()
    assert mean_best == 0.1                               # the average prefers lr = 0.1 ...
    sel = results.select_hyperparameters(table)
    assert len(sel) == 1
    row = sel.iloc[0]
    assert row["lr"] == 0.01                              # ... the worst case does not
    assert row["val_accuracy_worst"] == pytest.approx(0.65)
    assert row["val_accuracy_worst_attack"] == "alie"
    assert row["test_accuracy_worst"] == pytest.approx(0.63)
    assert row["test_accuracy_worst_attack"] == "alie"
    assert row["test_accuracy_worst_step"] == 20
    assert row["test_accuracy_attack_mean"] == pytest.approx((0.63 + 0.68) / 2)
    assert (row["seeds"], row["attacks"], row["candidates"]) == (2, 2, 2)
    assert sel.attrs["selection"]["tune"] == ["lr"]
    assert list(sel.columns[:4]) == ["aggregator", "f_real", "heterogeneity", "lr"]


def test_the_validation_set_chooses_and_the_test_set_only_reports():
    # lr = 0.1 is better on the test set, lr = 0.01 on validation: validation decides.
    def acc(lr, step, **_):
        return (ramp(step, 0.8 if lr == 0.01 else 0.6), ramp(step, 0.5 if lr == 0.01 else 0.9))

    row = results.select_hyperparameters(make_table(acc)).iloc[0]
    assert row["lr"] == 0.01 and row["test_accuracy_worst"] == pytest.approx(0.5)
    on_test = results.select_hyperparameters(make_table(acc), metric="test_accuracy").iloc[0]
    assert on_test["lr"] == 0.1 and on_test["test_accuracy_worst"] == pytest.approx(0.9)
    assert "test_accuracy_worst" in on_test and "val_accuracy_worst" not in on_test


def test_seeds_are_averaged_before_the_best_evaluation_as_in_byzfl():
    # Seed 1 peaks at step 0, seed 2 at step 20: the seed-mean curve is flat at 0.5. ByzFL's
    # number is 0.5 (max of the mean curve), not 0.9 (mean of each seed's max).
    curves = {1: (0.9, 0.5, 0.1), 2: (0.1, 0.5, 0.9)}

    def acc(seed, step, **_):
        v = curves[seed][STEPS.index(step)]
        return v, v

    table = make_table(acc, lrs=(0.1,))
    best = results.select_hyperparameters(table).iloc[0]
    assert best["val_accuracy_worst"] == pytest.approx(0.5)
    assert best["test_accuracy_worst"] == pytest.approx(0.5)
    assert best["test_accuracy_worst_step"] == 0          # the first of equal evaluations
    assert best["test_accuracy_worst_std"] == pytest.approx(np.std([0.9, 0.1], ddof=1))
    assert results.select_hyperparameters(table, reduce_steps="max").equals(
        results.select_hyperparameters(table))              # "max" is ByzFL's name for it


def test_final_and_at_val_best_step_reductions():
    # validation peaks at step 10, test keeps rising to step 20
    def acc(step, **_):
        val = {0: 0.1, 10: 0.8, 20: 0.6}[step]
        return val, {0: 0.1, 10: 0.5, 20: 0.7}[step]

    table = make_table(acc, lrs=(0.1,))
    final = results.select_hyperparameters(table, reduce_steps="final").iloc[0]
    assert final["val_accuracy_worst"] == pytest.approx(0.6)
    assert final["test_accuracy_worst"] == pytest.approx(0.7)
    assert final["test_accuracy_worst_step"] == 20
    at_val = results.select_hyperparameters(table, reduce_steps="at_val_best").iloc[0]
    assert at_val["val_accuracy_worst"] == pytest.approx(0.8)
    assert at_val["test_accuracy_worst"] == pytest.approx(0.5)   # read at step 10, not at 20
    assert at_val["test_accuracy_worst_step"] == 10
    best = results.select_hyperparameters(table).iloc[0]
    assert best["test_accuracy_worst"] == pytest.approx(0.7)     # ByzFL: test's own best step


def test_each_cell_chooses_on_its_own():
    # at f = 1 the large lr survives every attack, at f = 3 it does not
    def acc(f_real, lr, attack, split, step, **_):
        broken = f_real == 3 and lr == 0.1 and attack == "alie"
        v = 0.2 if broken else (0.9 if lr == 0.1 else 0.8)
        if split == "dirichlet":
            v -= 0.1
        return ramp(step, v), ramp(step, v)

    table = make_table(acc, aggregators=("median", "krum"), fs=(1, 3),
                       splits=(("iid", 1.0), ("dirichlet", 0.1)))
    sel = results.select_hyperparameters(table)
    assert len(sel) == 2 * 2 * 2
    chosen = {(r.aggregator, r.f_real, r.heterogeneity): r.lr for r in sel.itertuples()}
    for agg in ("median", "krum"):
        for het in ("iid", "dirichlet alpha=0.1"):
            assert chosen[(agg, 1, het)] == 0.1 and chosen[(agg, 3, het)] == 0.01
    assert list(sel["heterogeneity"].cat.categories) == ["iid", "dirichlet alpha=0.1"]


def test_exact_ties_go_to_the_better_mean_over_attacks():
    # both lrs collapse to chance under alie; lr = 0.1 is better against sign flipping
    def acc(lr, attack, step, **_):
        v = 0.1 if attack == "alie" else (0.9 if lr == 0.1 else 0.6)
        return v, v

    assert results.select_hyperparameters(make_table(acc)).iloc[0]["lr"] == 0.1


def test_losses_are_minimised():
    def acc(lr, attack, step, **_):
        top = {0.1: {"alie": 0.60, "sign_flip": 0.98}, 0.01: {"alie": 0.65, "sign_flip": 0.70}}
        return ramp(step, top[lr][attack]), ramp(step, top[lr][attack])

    row = results.select_hyperparameters(make_table(acc), metric="val_loss",
                                         report="test_loss").iloc[0]
    assert row["lr"] == 0.01
    assert row["val_loss_worst"] == pytest.approx(0.35)   # the worst case of a loss is its max
    assert row["test_loss_worst_attack"] == "alie"


def test_every_varying_hyperparameter_is_tuned_and_attacks_keep_their_options():
    def acc(lr, momentum, attack, step, **_):
        v = 0.8 if (lr, momentum) == (0.01, 0.9) else 0.7
        if attack.startswith("alie") and (lr, momentum) == (0.01, 0.9):
            v = 0.75
        return ramp(step, v), ramp(step, v)

    table = pd.concat([make_table(acc, extra={"momentum": m}) for m in (0.0, 0.9)],
                      ignore_index=True)
    # two strengths of ALIE are two adversaries
    alie = table["attack"] == "alie"
    table2 = pd.concat([table.assign(**{"attack.z": np.where(alie, 1.0, np.nan)}),
                        table[alie].assign(**{"attack.z": 3.0, "run_id": table["run_id"] + "-z3"})],
                       ignore_index=True)
    sel = results.select_hyperparameters(table2)
    assert sel.attrs["selection"]["tune"] == ["lr", "momentum"]
    assert (sel.iloc[0]["lr"], sel.iloc[0]["momentum"]) == (0.01, 0.9)
    assert sel.iloc[0]["attacks"] == 3
    detail = results.select_hyperparameters(table2, per_attack=True)
    assert sorted(detail["attack"]) == ["alie (z = 1)", "alie (z = 3)", "sign_flip"]
    assert list(detail.columns) == ["aggregator", "f_real", "heterogeneity", "lr", "momentum",
                                    "attack", "val_accuracy", "test_accuracy",
                                    "test_accuracy_std", "test_accuracy_step", "seeds"]
    only = results.select_hyperparameters(table2, attacks=["sign_flip"])
    assert only.iloc[0]["attacks"] == 1


def test_preaggregators_are_tuned_or_kept_a_setting():
    def acc(preaggregators, attack, step, **_):
        v = 0.8 if (preaggregators == ["nnm"]) == (attack == "alie") else 0.6
        v = 0.75 if preaggregators == ["nnm"] and attack == "sign_flip" else v
        return v, v

    table = pd.concat([make_table(acc, lrs=(0.1,), extra={"preaggregators": list(pre)})
                       for pre in ((), ("nnm",))], ignore_index=True)
    sel = results.select_hyperparameters(table)
    assert sel.attrs["selection"]["tune"] == ["preaggregators"]
    assert sel.iloc[0]["preaggregators"] == '["nnm"]'
    kept = results.select_hyperparameters(
        table, by=("aggregator", "preaggregators", "f_real", "heterogeneity"))
    assert len(kept) == 2 and kept.attrs["selection"]["tune"] == []
    labels = results.rule_labels(kept, ["aggregator", "preaggregators"])
    assert sorted(labels) == ["median", "median + nnm"]


def test_split_seeds_are_seeds():
    # ByzFL averages over training and data-distribution seeds alike
    def acc(lr, split_seed, step, **_):
        v = (0.8 if lr == 0.01 else 0.7) + 0.1 * split_seed
        return v, v

    table = pd.concat([make_table(acc, extra={"split_seed": k}) for k in (0, 1)],
                      ignore_index=True)
    row = results.select_hyperparameters(table).iloc[0]
    assert table.attrs == {} and row["seeds"] == 4 and row["lr"] == 0.01
    assert "split_seed" not in row.index
    assert row["test_accuracy_worst"] == pytest.approx(0.85)


def test_heterogeneity_levels_order_and_name():
    table = pd.DataFrame({
        "split": ["extreme", "dirichlet", "iid", "dirichlet", "iid", "shared"],
        "dirichlet_alpha": [1.0, 0.1, 0.1, 10.0, 1.0, 1.0],
    })
    levels = results.heterogeneity_levels(table)
    assert levels.tolist() == ["extreme", "dirichlet alpha=0.1", "iid", "dirichlet alpha=10",
                               "iid", "shared"]         # alpha means nothing to iid rows
    assert list(levels.cat.categories) == ["shared", "iid", "dirichlet alpha=10",
                                           "dirichlet alpha=0.1", "extreme"]
    new = pd.DataFrame({"split": ["gamma_similarity", "gamma_similarity", "iid", "shards",
                                  "shards"],
                        "gamma": [0.0, 1.0, 0.5, 0.5, 0.5], "shards_per_worker": [2, 2, 1, 1, 4]})
    levels = results.heterogeneity_levels(new)
    assert levels.tolist() == ["gamma_similarity gamma=0", "gamma_similarity gamma=1", "iid",
                               "shards per_worker=1", "shards per_worker=4"]
    assert list(levels.cat.categories) == [
        "iid", "gamma_similarity gamma=1", "gamma_similarity gamma=0", "shards per_worker=4",
        "shards per_worker=1"]


def test_a_named_heterogeneity_column_is_used_as_it_is():
    def acc(step, **_):
        return ramp(step, 0.8), ramp(step, 0.8)

    table = make_table(acc, splits=(("dirichlet", 0.1), ("dirichlet", 1.0)), lrs=(0.1,))
    sel = results.select_hyperparameters(table, heterogeneity="dirichlet_alpha")
    assert sel["dirichlet_alpha"].tolist() == [0.1, 1.0]
    none = results.select_hyperparameters(table[table["dirichlet_alpha"] == 0.1],
                                          heterogeneity=None)
    assert list(none.columns[:3]) == ["aggregator", "f_real", "val_accuracy_worst"]


def test_unfinished_candidates_are_left_out_with_a_warning():
    def acc(lr, attack, step, **_):
        v = 0.9 if lr == 0.1 else 0.6
        return v, v

    table = make_table(acc)
    partial = table[~((table["lr"] == 0.1) & (table["attack"] == "alie"))]
    with pytest.warns(UserWarning, match="1 of 2 candidates lack an attack"):
        sel = results.select_hyperparameters(partial)
    assert sel.iloc[0]["lr"] == 0.01 and sel.iloc[0]["candidates"] == 2


# -- the errors say what is missing and what would be valid -------------------------------------

def _table():
    return make_table(lambda step, **_: (ramp(step, 0.8), ramp(step, 0.8)))


def test_error_without_a_validation_column():
    with pytest.raises(ConfigError) as e:
        results.select_hyperparameters(_table().drop(columns=["val_accuracy", "val_loss"]))
    text = str(e.value)
    assert "no 'val_accuracy' column" in text and "validation_size" in text
    assert "metric='test_accuracy'" in text and "test_accuracy, test_loss" in text


def test_errors_name_the_columns_and_suggest():
    t = _table()
    with pytest.raises(ConfigError, match=r"by: no column 'aggregatr'.*did you mean 'aggregator'"):
        results.select_hyperparameters(t, by=("aggregatr", "f_real"))
    with pytest.raises(ConfigError, match=r"tune: no column 'lrr'.*vary: .*lr"):
        results.select_hyperparameters(t, tune=("lrr",))
    with pytest.raises(ConfigError, match=r"metric='val_acc'.*did you mean 'val_accuracy'"):
        results.select_hyperparameters(t, metric="val_acc")
    with pytest.raises(ConfigError, match="heterogeneity='gamma'.*present: split, dirichlet_alpha"):
        results.select_hyperparameters(t, heterogeneity="gamma")
    with pytest.raises(ConfigError, match="reduce_steps='mean'; valid: best, final, at_val_best"):
        results.select_hyperparameters(t, reduce_steps="mean")
    with pytest.raises(ConfigError, match="attacks: 'ipm' not in .* values there: alie, sign_flip"):
        results.select_hyperparameters(t, attacks=["ipm"])
    with pytest.raises(ConfigError, match="empty"):
        results.select_hyperparameters(t.iloc[:0])


def test_columns_varying_outside_by_and_tune_are_refused():
    t = _table()
    with pytest.raises(ConfigError, match=r"^lr varies inside the cells .*lr: 0.01, 0.1.*add it "
                                          r"to by .* or to tune"):
        results.select_hyperparameters(t, tune=())
    with pytest.raises(ConfigError, match=r"^split varies inside the cells"):
        mixed = pd.concat([t, t.assign(split="extreme", run_id=t["run_id"] + "x")])
        results.select_hyperparameters(mixed, heterogeneity=None)
    with pytest.raises(ConfigError, match=r"^n_workers varies inside"):  # a setting: never tuned
        results.select_hyperparameters(pd.concat([t, t.assign(n_workers=20, run_id="b")]))


# -- the best rule per cell ---------------------------------------------------------------------

def _selection():
    tops = {"median": {1: 0.9, 3: 0.5}, "krum": {1: 0.8, 3: 0.6}, "mean": {1: 0.9, 3: 0.1}}

    def acc(aggregator, f_real, split, step, **_):
        v = tops[aggregator][f_real] - (0.1 if split == "dirichlet" else 0.0)
        return ramp(step, v), ramp(step, v)

    table = make_table(acc, aggregators=tuple(tops), fs=(1, 3),
                       splits=(("iid", 1.0), ("dirichlet", 0.5)))
    return results.select_hyperparameters(table)


def test_best_rule_per_cell_with_ties():
    best = results.best_rule_per_cell(_selection())
    assert list(best.columns) == ["f_real", "heterogeneity", "rule", "test_accuracy_worst",
                                  "tied", "runner_up"]
    got = {(r.f_real, r.heterogeneity): (r.rule, r.tied) for r in best.itertuples()}
    assert got[(1, "iid")] == ("mean", "median")          # a tie: the first name, the other listed
    assert got[(3, "iid")] == ("krum", "")
    assert got[(3, "dirichlet alpha=0.5")] == ("krum", "")
    row = best[(best["f_real"] == 3) & (best["heterogeneity"] == "iid")].iloc[0]
    assert row["test_accuracy_worst"] == pytest.approx(0.6)
    assert row["runner_up"] == pytest.approx(0.5)


# -- figures ------------------------------------------------------------------------------------

def _panels(fig):
    return [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]


def test_selection_heatmaps_axes(tmp_path):
    sel = _selection()
    fig = plots.selection_heatmaps(sel, path=tmp_path / "h.png", ncols=2, title="MNIST")
    assert (tmp_path / "h.png").stat().st_size > 5_000
    axes = _panels(fig)
    assert [a.get_title() for a in axes] == ["krum", "mean", "median"]   # one panel per rule
    for a in axes:
        assert list(a.get_xticks()) == [0, 1] and list(a.get_yticks()) == [0, 1]
        if a.get_xlabel():   # tick labels under the lowest panel of each column
            assert [t.get_text() for t in a.get_xticklabels()] == ["1", "3"]
        if a.get_ylabel():
            assert [t.get_text() for t in a.get_yticklabels()] == ["iid", "dirichlet alpha=0.5"]
        grid = a.images[0].get_array()
        assert grid.shape == (2, 2)
    # shared axes: y label on the first column only, x label under the lowest panel of a column
    assert [a.get_ylabel() for a in axes] == ["data heterogeneity", "", "data heterogeneity"]
    assert [a.get_xlabel() for a in axes] == ["", "Byzantine workers (f_real)",
                                              "Byzantine workers (f_real)"]
    krum = axes[0].images[0].get_array()
    assert krum[0, 1] == pytest.approx(0.6) and krum[1, 0] == pytest.approx(0.7)
    texts = [t.get_text() for t in axes[0].texts]
    assert sorted(texts) == ["0.50", "0.60", "0.70", "0.80"]
    assert fig.get_layout_engine() is not None and fig._suptitle.get_text() == "MNIST"
    cbar = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(cbar) == 1 and cbar[0].get_ylabel() == "test accuracy (worst attack)"
    assert len(fig.axes) == 5 and not fig.axes[3].get_visible()  # the spare slot stays empty


def test_best_rule_map_colours_and_annotations(tmp_path):
    fig = plots.best_rule_map(_selection(), path=tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 5_000
    (ax,) = fig.axes
    assert ax.get_xlabel() == "Byzantine workers (f_real)"
    assert ax.get_ylabel() == "data heterogeneity"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["iid", "dirichlet alpha=0.5"]
    img = ax.images[0].get_array()
    assert img.shape == (2, 2, 4)
    # f = 3: krum wins both rows (same colour); f = 1: mean (tied with median) in both rows
    assert np.allclose(img[0, 1], img[1, 1]) and np.allclose(img[0, 0], img[1, 0])
    assert not np.allclose(img[0, 0], img[0, 1])
    cells = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text()
             for t in ax.texts}
    assert cells[(1, 0)] == "0.60" and cells[(1, 1)] == "0.50"
    assert cells[(0, 0)] == "0.90\n(+1 tied)"
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["krum", "mean"]
    assert legend.get_title().get_text() == "aggregator"


# -- the command --------------------------------------------------------------------------------

def _results_dir(path: Path, table: pd.DataFrame, parts: bool = False) -> Path:
    if parts:   # a grid still running: only parts/
        for i, (_, chunk) in enumerate(table.groupby("aggregator")):
            results.write_table(chunk, path / "parts" / f"part{i}.parquet", {"jbyz_version": "t"})
    else:
        results.write_table(table, path / "results.parquet", {"jbyz_version": "t"})
    return path


def _cell_table():
    tops = {"median": 0.8, "krum": 0.7}

    def acc(aggregator, lr, attack, f_real, step, **_):
        v = tops[aggregator] - 0.1 * (f_real - 1)
        if lr == 0.1:
            v = 0.2 if attack == "alie" else v + 0.1
        return ramp(step, v), ramp(step, v) - 0.01

    return make_table(acc, aggregators=tuple(tops), fs=(1, 2),
                      splits=(("iid", 1.0), ("dirichlet", 0.3)))


@pytest.mark.parametrize("parts", [False, True])
def test_select_command_end_to_end(tmp_path, capsys, parts):
    d = _results_dir(tmp_path / "grid", _cell_table(), parts)
    assert cli.main(["select", str(d)]) == 0
    out = capsys.readouterr().out
    sel = pd.read_csv(d / "selection.csv")
    assert len(sel) == 2 * 2 * 2 and set(sel["lr"]) == {0.01}
    assert sel["test_accuracy_worst"].round(4).tolist() == [0.69, 0.69, 0.59, 0.59,
                                                             0.79, 0.79, 0.69, 0.69]
    detail = pd.read_csv(d / "selection_per_attack.csv")
    assert len(detail) == 2 * len(sel)
    for name in ("selection_heatmaps.png", "best_rule.png"):
        assert (d / name).stat().st_size > 5_000
    assert "the lr maximising val_accuracy against the worst attack" in out
    assert re.search(r"median\s+2\s+dirichlet alpha=0.3\s+0.01\s+0.7000\s+0.6900", out), out
    assert "best rule per cell" in out and "selection.csv" in out


def test_select_command_options_and_errors(tmp_path, capsys):
    d = _results_dir(tmp_path / "grid", _cell_table())
    out_dir = tmp_path / "sel"
    assert cli.main(["select", str(d / "results.parquet"), "--out", str(out_dir),
                     "--steps", "final", "--attacks", "sign_flip", "--tune", "lr"]) == 0
    sel = pd.read_csv(out_dir / "selection.csv")
    assert set(sel["lr"]) == {0.1} and (sel["attacks"] == 1).all()
    capsys.readouterr()
    no_val = tmp_path / "noval"
    _results_dir(no_val, _cell_table().drop(columns=["val_accuracy", "val_loss"]))
    assert cli.main(["select", str(no_val)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jbyz: error: metric='val_accuracy'") and "validation_size" in err
    assert "--metric test_accuracy" in err
    assert not (no_val / "selection.csv").exists()
    assert cli.main(["select", str(no_val), "--metric", "test_accuracy"]) == 0
    assert cli.main(["select", str(d), "--by", "aggregator,f_real"]) == 2
    assert "split, dirichlet_alpha vary inside the cells" in capsys.readouterr().err


# -- the documentation's example ----------------------------------------------------------------

def test_benchmark_page_code_runs(tmp_path):
    page = ROOT / "docs" / "benchmark.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
    assert blocks
    _results_dir(tmp_path / "runs" / "benchmark", _cell_table())
    proc = subprocess.run([sys.executable, "-c", "import matplotlib; matplotlib.use('Agg')\n"
                           + "\n\n".join(blocks)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "runs" / "benchmark" / "best_rule.png").exists()
