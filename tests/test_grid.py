"""Grids: grouping, one compilation per group, equality with single runs, padding, 8 devices,
resume after kill -9, invalid points, version safety, two processes through jax.distributed."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jbyz import grid, results, simulate
from jbyz.config import RunConfig, load_experiment
from jbyz.registry import ConfigError

BASE = RunConfig(dataset="digits", model="mlp", n_workers=10, f_real=3, batch_size=16, steps=40,
                 eval_every=20, aggregator="median", attack="alie", diagnostics=True)
METRICS = ["test_accuracy", "test_loss", "train_loss", "variance_norm_ratio", "agg_distance",
           "agg_cosine"]

GRID_TOML = """
[run]
dataset = "digits"
model = "mlp"
n_workers = 10
f_real = 3
batch_size = 16
steps = 40
eval_every = 20
aggregator = "median"
attack = "alie"

[sweep]
seed = [0, 1]
lr = [0.1, 0.05]

[[grid]]
[[grid]]
n_workers = 7
f_real = [1, 2]
seed = 3
"""


def _grid_configs():
    return load_experiment(text=GRID_TOML).runs()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run in this process on one device, uninterrupted."""
    out = tmp_path_factory.mktemp("ref")
    table = grid.run_grid(_grid_configs(), out, grid.GridOptions(runs_per_call=3), progress=False,
                          log=None)
    return out, table


def _metrics(df):
    return df.sort_values(["run_id", "step"])[METRICS].to_numpy()


def test_config_blocks_union_and_dedupe():
    runs = _grid_configs()
    assert len(runs) == 8  # 2 seeds x 2 lr, plus 2 f x 2 lr at n = 7
    assert sorted({(r.n_workers, r.f_real) for r in runs}) == [(7, 1), (7, 2), (10, 3)]


def test_plan_groups_by_static_part_and_pads_workers():
    cfgs = _grid_configs() + [BASE.replace(aggregator="trimmed_mean", seed=s) for s in range(2)]
    pl = grid.plan(cfgs, grid.GridOptions())
    sizes = sorted(len(g.configs) for g in pl.groups)
    assert sizes == [2, 8]  # seeds, lr, f and n share a program; the rule does not
    g = next(g for g in pl.groups if len(g.configs) == 8)
    assert g.n_max == 10 and g.grad_rows == 10 - 1  # slots below min f_real skip gradients
    unpadded = grid.plan(cfgs, grid.GridOptions(pad_workers=False))
    assert len(unpadded.groups) == 3


def test_invalid_points_reported_together_or_skipped(tmp_path):
    bad = [BASE.replace(aggregator="krum", f_real=4, n_workers=10),  # needs n >= 2f + 3 = 11
           BASE.replace(aggregator="bulyan", f_real=3), BASE.replace(lr=-1.0)]
    with pytest.raises(ConfigError) as e:
        grid.plan(bad + [BASE], grid.GridOptions())
    msg = str(e.value)
    assert "3 of 4" in msg and "krum" in msg and "bulyan" in msg and "lr must be > 0" in msg
    table = grid.run_grid(bad + [BASE.replace(steps=20)], tmp_path, grid.GridOptions(invalid="skip"),
                          progress=False, log=None)
    assert table["run_id"].nunique() == 1
    inv = pd.read_csv(tmp_path / "invalid.csv")
    assert len(inv) == 3 and inv["reason"].str.contains("2f").any()


def test_one_compilation_per_group(tmp_path, monkeypatch):
    traces = []
    orig = simulate.Program.step

    def counting(self, *a, **k):
        traces.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(simulate.Program, "step", counting)
    simulate._PROGRAMS.clear()
    cfgs = [BASE.replace(seed=s, lr=lr, f_real=f, aggregator="trimmed_mean")
            for s in range(2) for lr in (0.1, 0.2) for f in (2, 3)]
    grid.run_grid(cfgs, tmp_path, grid.GridOptions(runs_per_call=4), progress=False, log=None)
    first = len(traces)
    assert first >= 1
    # Two batches, one static group, two chunks each: the step was traced for the first batch's
    # programs only (scan may trace its body more than once while compiling).
    traces.clear()
    grid.run_grid([c.replace(seed=c.seed + 10) for c in cfgs], tmp_path / "b",
                  grid.GridOptions(runs_per_call=4), progress=False, log=None)
    assert len(traces) == 0, "the second grid of the same group must not retrace"


def test_programs_in_memory_are_bounded_and_freed(tmp_path, monkeypatch):
    """A grid with more groups than the program cache holds keeps at most ``_MAX_PROGRAMS``
    programs, and an evicted program's compiled code is freed (XLA:CPU maps each compiled kernel
    into memory; a process that kept every program aborted at the 62nd: vm.max_map_count)."""
    import gc
    import weakref

    monkeypatch.setattr(simulate, "_MAX_PROGRAMS", 2)
    simulate._PROGRAMS.clear()
    rules = ["mean", "median", "trimmed_mean", "meamed"]
    cfgs = [BASE.replace(aggregator=a, steps=4, eval_every=2, diagnostics=False) for a in rules]
    first = simulate.get_program(cfgs[0])
    chunk_refs = []
    orig = grid.BatchRunner.chunk_fn

    def keep_ref(self, length, args):
        fn = orig(self, length, args)
        chunk_refs.append(weakref.ref(fn))
        return fn

    monkeypatch.setattr(grid.BatchRunner, "chunk_fn", keep_ref)
    table = grid.run_grid(cfgs, tmp_path, progress=False, log=None)
    assert sorted(table.aggregator.unique()) == sorted(rules)
    assert len(simulate._PROGRAMS) == 2
    assert first not in simulate._PROGRAMS.values()
    gc.collect()
    # the first two groups' compiled chunks are gone; the last two groups' are still cached
    alive = [r() is not None for r in chunk_refs[::2]]  # one chunk_fn call per chunk, 2 a run
    assert alive == [False, False, True, True]
    # an evicted program still held by someone compiles its pieces again and gives the same run
    again = simulate.Simulation(cfgs[0])
    assert again.run(progress=False).to_frame().test_accuracy.iloc[-1] == pytest.approx(
        table[table.aggregator == "mean"].sort_values("step").test_accuracy.iloc[-1])


def test_grid_equals_single_runs_alone_and_padded(reference):
    _, table = reference
    for cfg in _grid_configs()[::2] + [_grid_configs()[-1]]:
        alone = simulate.run(cfg, progress=False).to_frame()
        inside = table[table["run_id"] == cfg.config_hash()].sort_values("step")
        assert list(inside["step"]) == list(alone["step"])
        np.testing.assert_allclose(inside[METRICS].to_numpy(np.float64),
                                   alone[METRICS].to_numpy(np.float64), rtol=1e-5, atol=1e-6)


def test_results_table_has_every_field_and_metadata(reference):
    out, table = reference
    df = results.load_results(out / "results.parquet")
    for col in ["run_id", "seed", "lr", "n_workers", "f_real", "aggregator", "attack", "step",
                "test_accuracy", "jbyz_version", "jax_version", "device_kind"]:
        assert col in df.columns, col
    assert len(df) == 8 * 3
    meta = results.read_metadata(out / "results.parquet")
    assert meta["jbyz_version"] and meta["jax_version"]
    s = results.summarize(df)
    assert {"final_mean", "final_std", "best_mean", "seeds"} <= set(s.columns)


def test_parts_from_another_version_are_refused(reference, tmp_path):
    out, _ = reference
    part = sorted((out / "parts").glob("*.parquet"))[0]
    target = tmp_path / "parts"
    target.mkdir()
    df = pd.read_parquet(part)
    meta = {**results.read_metadata(part), "jbyz_version": "0.0.0-old"}
    results.write_table(df, target / part.name, meta)
    with pytest.raises(ConfigError, match="never mixed"):
        grid.run_grid(_grid_configs(), tmp_path, grid.GridOptions(runs_per_call=3),
                      progress=False, log=None)


def test_resume_is_per_run_across_subsets_and_batch_sizes(reference, tmp_path):
    """Runs finished by a subset (as `jbyz run --only ...`) with another batch size are not
    recomputed by the whole grid, and the table equals the uninterrupted one."""
    _, ref = reference
    configs = _grid_configs()
    subset = [c for c in configs if c.seed == 0]
    msgs = []
    grid.run_grid(subset, tmp_path, grid.GridOptions(runs_per_call=1), progress=False, log=None)
    first = {p.name for p in (tmp_path / "parts").glob("*.parquet")}
    assert len(first) == len(subset)  # one run per batch
    table = grid.run_grid(configs, tmp_path, grid.GridOptions(runs_per_call=3), progress=False,
                          log=msgs.append)
    assert any(f"{len(subset)} of {len(configs)} runs already finished" in m for m in msgs), msgs
    parts = {p.name for p in (tmp_path / "parts").glob("*.parquet")}
    new = [pd.read_parquet(tmp_path / "parts" / n) for n in parts - first]
    recomputed = set(pd.concat(new)["run_id"]) & {c.config_hash() for c in subset}
    assert not recomputed
    assert set(table["run_id"]) == {c.config_hash() for c in configs}
    np.testing.assert_allclose(_metrics(table), _metrics(ref), rtol=1e-5, atol=1e-6)


def _write_toml(tmp_path):
    p = tmp_path / "grid.toml"
    p.write_text(GRID_TOML)
    return p


def _jbyz(args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "jbyz.cli", "run", *map(str, args), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_kill_gives_identical_table(reference, tmp_path):
    ref_out, ref = reference
    cfg = _write_toml(tmp_path)
    out = tmp_path / "out"
    proc = _jbyz([cfg, "--out", out, "--runs-per-call", 3])
    parts = out / "parts"
    deadline = time.time() + 240
    while time.time() < deadline and not (parts.exists() and list(parts.glob("*.parquet"))):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(list(parts.glob("*.parquet"))) < 3, "killed between batches (3 in all)"
    assert not (out / "results.parquet").exists()
    proc = _jbyz([cfg, "--out", out, "--runs-per-call", 3])
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert "already finished" in log
    table = results.load_results(out / "results.parquet")
    np.testing.assert_array_equal(_metrics(table), _metrics(ref))


def test_eight_devices_match_one(reference, tmp_path):
    _, ref = reference
    cfg = _write_toml(tmp_path)
    out = tmp_path / "out8"
    proc = _jbyz([cfg, "--out", out, "--runs-per-call", 3], {"JAX_NUM_CPU_DEVICES": "8"})
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    table = results.load_results(out / "results.parquet")
    assert (table["devices"] == "8").all()
    np.testing.assert_allclose(_metrics(table), _metrics(ref), rtol=1e-5, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_jax_distributed(reference, tmp_path):
    _, ref = reference
    cfg = _write_toml(tmp_path)
    out = tmp_path / "mp"
    addr = f"127.0.0.1:{_free_port()}"
    procs = [_jbyz([cfg, "--out", out, "--runs-per-call", 3, "--coordinator", addr,
                    "--num-processes", 2, "--process-id", i], {"JAX_NUM_CPU_DEVICES": "2"})
             for i in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    table = results.load_results(out / "results.parquet")
    assert (table["devices"] == "4").all()
    assert table.groupby("run_id").size().eq(3).all() and table["run_id"].nunique() == 8
    np.testing.assert_allclose(_metrics(table), _metrics(ref), rtol=1e-5, atol=1e-6)


def test_plots_heatmap_and_paired_from_grid(reference, tmp_path):
    from jbyz import cli, plots

    out, table = reference
    fig = plots.heatmap(table, x="lr", y="f_real", path=tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 5000
    _, pairs = plots.paired(table, field="lr", a=0.05, b=0.1, path=tmp_path / "p.png")
    # pairs: same seed, n and f, lr 0.05 vs 0.1 -> 2 seeds at n=10 + 2 f at n=7
    assert len(pairs) == 4
    runs = plots.per_run(table)
    one = pairs.iloc[0]
    a = runs[(runs.lr == 0.05) & (runs.seed == one.seed) & (runs.f_real == one.f_real)
             & (runs.n_workers == one.n_workers)]["best"].item()
    assert one["a"] == a
    assert cli.main(["plot", "heatmap", str(out), "--x", "lr", "--y", "f_real",
                     "--out", str(tmp_path / "h2.png")]) == 0
    assert cli.main(["plot", "paired", str(out / "results.parquet"), "--field", "lr", "--a", "0.05",
                     "--b", "0.1", "--out", str(tmp_path / "p2.png")]) == 0
    assert cli.main(["plot", str(out / "results.parquet"), "--out", str(tmp_path / "c.png")]) == 0


def test_component_name_reads_plain_names_and_json_specs():
    # Components with options are stored as JSON specs (results.tidy); analyses group by name.
    spec = results.tidy(pd.DataFrame({"attack": [{"name": "alie", "z": 1.5}]}))["attack"][0]
    col = pd.Series(["mean", spec, '{"name": "foe", "eps": 0.1}', "{not json", {"name": "krum"}])
    assert results.component_name(col).tolist() == ["mean", "alie", "foe", "{not json", "krum"]


def test_one_run_at_a_time_keeps_data_dependent_branches():
    """vmap_width = 1 (the CPU default) runs each run unbatched: a lax.switch on the run's data
    (SMEA's and MDA's subset size) stays a conditional that runs one branch. A vmap, even of
    size 1 (what lax.map(batch_size=1) does), turns it into a select that runs every branch;
    wider slices still vmap."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jbyz.config import GridOptions

    runner = grid.BatchRunner(None, 4, GridOptions(vmap_width=1), 1)
    fn = lambda k: lax.switch(k, [lambda: 0.0, lambda: 1.0, lambda: 2.0])  # noqa: E731
    ks = jnp.array([0, 2, 1, 2])

    text1 = str(jax.make_jaxpr(runner._mapped(fn, 1))(ks))
    assert "cond[" in text1 and "select_n" not in text1
    assert "cond[" in str(jax.make_jaxpr(runner._mapped(fn, 4))(ks[:1]))  # one run: no vmap either
    text4 = str(jax.make_jaxpr(runner._mapped(fn, 4))(ks))
    assert "select_n" in text4 and "cond[" not in text4
    np.testing.assert_array_equal(runner._mapped(fn, 1)(ks), [0.0, 2.0, 1.0, 2.0])
    np.testing.assert_array_equal(runner._mapped(fn, 4)(ks), [0.0, 2.0, 1.0, 2.0])
