"""Results tables: the declared f, hyper-parameters as columns, one id column, earlier layouts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from jbyz import grid, results
from jbyz.config import RunConfig

BASE = RunConfig(dataset="digits", model="mlp", model_kwargs={"hidden": [16]}, n_workers=7,
                 f_real=2, batch_size=8, steps=10, eval_every=10, diagnostics=False,
                 aggregator="centered_clip", aggregator_kwargs={"tau": 1.0},
                 attack="alie", attack_kwargs={"z": 1.5})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cfgs = [BASE, BASE.replace(f=3, seed=1)]  # one compiled group (f and seed are arguments)
    table = grid.run_grid(cfgs, out, grid.GridOptions(), progress=False, log=None)
    return out, cfgs, table


def test_rows_carry_declared_f_and_scalar_hyperparameters(tiny):
    out, cfgs, table = tiny
    df = results.load_results(out / "results.parquet")
    assert "config_hash" not in df.columns and "run_id" in df.columns
    by_id = {c.config_hash(): c for c in cfgs}
    assert set(df["run_id"]) == set(by_id)
    for run_id, rows in df.groupby("run_id"):
        c = by_id[run_id]
        assert (rows["f"] == c.f_declared).all()           # 2 where f was left unset, 3 declared
        assert (rows["aggregator.tau"] == 1.0).all()
        assert (rows["attack.z"] == 1.5).all()
        assert json.loads(rows["attack_kwargs"].iloc[0]) == {"z": 1.5}  # the full record stays
    assert sorted(df.drop_duplicates("run_id")["f"]) == [2, 3]
    assert "aggregator.iters" not in df.columns              # defaults are not spelled out ...
    assert "model.hidden" not in df.columns                  # a list: kept in model_kwargs only
    assert df.columns.tolist() == table.columns.tolist()


def test_attack_z_is_recorded_when_left_at_its_default(tmp_path):
    # ... except what an attack resolves from the setting: ALIE's z, default or Baruch's formula.
    cfgs = [BASE.replace(attack_kwargs={}), BASE.replace(attack={"name": "alie", "z": "baruch"})]
    batch = grid.Batch(0, cfgs)
    rows = [{"step": 0, "test_accuracy": 0.5, "_run": i} for i in range(2)]
    with pytest.warns(UserWarning, match="z = 0.253 at n=7, f_real=2"):
        table = grid._rows_to_frame(batch, rows, {"jbyz_version": "test"})
    assert table["attack_kwargs"].tolist() == ["{}", '{"z": "baruch"}']
    assert "config_hash" not in table.columns and table["f"].tolist() == [2, 2]  # f_real: f unset
    assert table["aggregator.tau"].tolist() == [1.0, 1.0]
    z = table.set_index("run_id")["attack.z"]
    from jbyz.attacks import alie_z

    assert z[cfgs[0].config_hash()] == 1.5
    assert z[cfgs[1].config_hash()] == pytest.approx(float(alie_z(7, 2)), abs=1e-6)


def test_summary_groups_by_readable_columns(tiny):
    _, cfgs, table = tiny
    other = table["run_id"] == cfgs[1].config_hash()  # as if run with tau = 0.5
    table = table.assign(aggregator_kwargs=table["aggregator_kwargs"].where(~other, '{"tau": 0.5}'),
                         **{"aggregator.tau": table["aggregator.tau"].where(~other, 0.5)})
    s = results.summarize(table)
    assert "aggregator.tau" in s.columns and "f" in s.columns
    assert "aggregator_kwargs" not in s.columns              # said by aggregator.tau
    assert sorted(s["aggregator.tau"]) == [0.5, 1.0]
    same_f = table.assign(f=table["f_real"])
    assert "f" not in results.config_columns(same_f)         # f = f_real everywhere: redundant


def _old_layout(df: pd.DataFrame) -> pd.DataFrame:
    """A table as jbyz wrote it before: config_hash beside run_id, f empty, kwargs as JSON only."""
    old = df.drop(columns=[c for c in df.columns if "." in c])
    old["config_hash"] = old["run_id"]
    old["f"] = None
    return old


def test_tables_of_earlier_versions_load_in_the_current_layout(tiny, tmp_path):
    out, cfgs, table = tiny
    part = sorted((out / "parts").glob("*.parquet"))[0]
    meta = results.read_metadata(part)
    old = _old_layout(pd.read_parquet(part))
    old_file = results.write_table(old, tmp_path / "old.parquet", meta)
    assert pd.read_parquet(old_file)["f"].isna().all()
    back = results.load_results(old_file)
    assert "config_hash" not in back.columns
    assert back["f"].tolist() == back["f_real"].tolist()    # f unset: the run used f_real
    assert back["f"].dtype == "int64"
    assert (back["attack.z"] == 1.5).all() and set(back["aggregator.tau"]) <= {0.5, 1.0}
    assert results.normalize(back).equals(back)                # the current layout is a fixed point


def test_grid_mixing_parts_of_both_layouts_gives_one_layout(tiny, tmp_path):
    out, cfgs, table = tiny
    parts = tmp_path / "parts"
    parts.mkdir()
    for p in sorted((out / "parts").glob("*.parquet")):
        results.write_table(_old_layout(pd.read_parquet(p)), parts / p.name, results.read_metadata(p))
    only = cfgs[0]
    results.write_table(table[table["run_id"] == only.config_hash()], parts / "new.parquet")
    pl = grid.plan(cfgs, grid.GridOptions())
    df = grid.collect(tmp_path, pl)
    assert "config_hash" not in df.columns
    assert df["f"].notna().all() and df["aggregator.tau"].notna().all()
    assert len(df) == len(table)


def test_hyperparameter_columns_and_mixed_types():
    cols = results.hyperparameter_columns({
        "aggregator_kwargs": '{"tau": 0.1, "iters": 3, "start": "zero"}',
        "attack_kwargs": {"z": None, "sign": "minus"},
        "model_kwargs": {"hidden": [16, 16]},
        "lr_schedule_kwargs": {"every": "epoch"},
    })
    assert cols == {"aggregator.tau": 0.1, "aggregator.iters": 3, "aggregator.start": "zero",
                    "attack.sign": "minus", "lr_schedule.every": "epoch"}
    # Two components spelling one hyper-parameter as a number and as text: stored as text.
    df = results.tidy(pd.DataFrame({"aggregator.b": [2, "auto", None], "lr": [0.1, 0.1, 0.1]}))
    b = df["aggregator.b"].tolist()
    assert b[:2] == ["2", "auto"] and pd.isna(b[2])


def test_fields_added_later_are_filled_with_the_default_an_older_part_ran():
    old = pd.DataFrame({"run_id": ["a", "a"], "step": [0, 10], "test_accuracy": [0.1, 0.5]})
    new = pd.DataFrame({"run_id": ["b"], "step": [10], "test_accuracy": [0.7],
                        "local_steps": [5], "fed_send": ["weights"], "split_seed": [3]})
    df = results.normalize(pd.concat([old, new], ignore_index=True))
    assert list(df["local_steps"]) == [1, 1, 5] and df["local_steps"].dtype.kind == "i"
    assert list(df["fed_send"]) == ["pseudo_gradient", "pseudo_gradient", "weights"]
    # a field whose default is "unset" stays missing (NaN) for the older part
    assert df["split_seed"].isna().tolist() == [True, True, False]


def test_a_run_stored_in_two_parts_loads_once(tiny, tmp_path):
    """Two overlapping processes of one grid can store a run twice; loading the parts gives each
    (run_id, step) row once, as the grid's own table does."""
    out, cfgs, table = tiny
    parts = tmp_path / "parts"
    parts.mkdir()
    for p in sorted((out / "parts").glob("*.parquet")):
        results.write_table(pd.read_parquet(p), parts / p.name, results.read_metadata(p))
    results.write_table(table[table["run_id"] == cfgs[0].config_hash()], parts / "again.parquet")
    df = results.load_results(tmp_path)
    assert len(table) > len(table[table["run_id"] == cfgs[0].config_hash()]) > 0
    assert len(df) == len(table)
    assert not df.duplicated(["run_id", "step"]).any()


def test_a_directory_loads_its_parts_not_the_last_commands_table(tiny, tmp_path):
    """results.parquet is written when a command finishes: parts stored since (another piece of
    the grid still running) are not in it. Loading the directory gives every stored run."""
    out, cfgs, table = tiny
    parts = tmp_path / "parts"
    parts.mkdir()
    for p in sorted((out / "parts").glob("*.parquet")):
        results.write_table(pd.read_parquet(p), parts / p.name, results.read_metadata(p))
    last_piece = table[table["run_id"] == cfgs[0].config_hash()]
    results.write_table(last_piece, tmp_path / "results.parquet")
    df = results.load_results(tmp_path)
    assert set(df["run_id"]) == {c.config_hash() for c in cfgs}
    assert len(df) == len(table)
    # without parts, the table is what there is
    empty = tmp_path / "only_table"
    empty.mkdir()
    results.write_table(last_piece, empty / "results.parquet")
    assert set(results.load_results(empty)["run_id"]) == {cfgs[0].config_hash()}
