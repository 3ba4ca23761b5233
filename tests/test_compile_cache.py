"""The grid runner's persistent compilation cache: option / environment parsing, precedence, the
output line, no effect of ``import jbyz``, and a second run that loads its programs from the
cache with results identical to a run without it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pandas as pd
import pytest

from jbyz import cli, compile_cache, grid, results, simulate
from jbyz.registry import ConfigError

TINY = """
[run]
dataset = "digits"
model = "mlp"
n_workers = 5
f_real = 1
batch_size = 16
steps = 10
eval_every = 5
aggregator = "median"
attack = "alie"

[sweep]
seed = [0, 1]
"""
METRICS = ["step", "test_accuracy", "test_loss", "train_loss"]


def test_parse_values_and_clear_errors(tmp_path):
    assert compile_cache.parse("off") is None and compile_cache.parse("OFF") is None
    assert compile_cache.parse(False) is None
    assert compile_cache.parse("on") == compile_cache.parse(True) == "default"
    assert compile_cache.parse(str(tmp_path / "c")) == tmp_path / "c"
    assert compile_cache.parse("rel").is_absolute()
    with pytest.raises(ConfigError, match=r"'0' is ambiguous: write 'off'.*or a path such as \./0"):
        compile_cache.parse("0", "JBYZ_COMPILE_CACHE")
    with pytest.raises(ConfigError, match="compile_cache is empty: give a directory"):
        compile_cache.parse("  ")
    with pytest.raises(ConfigError, match="expected a directory, 'off' or 'on' \\(got int\\)"):
        compile_cache.parse(3)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        compile_cache.parse(str(f))
    # GridOptions and [execution] refuse a bad value when built, before anything compiles
    with pytest.raises(ConfigError, match="ambiguous"):
        grid.GridOptions(compile_cache="false")
    assert grid.GridOptions.from_dict({"compile_cache": "off"}).compile_cache == "off"


def test_precedence_and_default_dir(tmp_path, monkeypatch):
    env = {"JBYZ_COMPILE_CACHE": str(tmp_path / "env")}
    assert compile_cache.resolve(str(tmp_path / "opt"), env) == (tmp_path / "opt", "option")
    assert compile_cache.resolve("off", env) == (None, "option")
    assert compile_cache.resolve(None, env) == (tmp_path / "env", "JBYZ_COMPILE_CACHE")
    assert compile_cache.resolve(None, {"JBYZ_COMPILE_CACHE": "off"}) == (None, "JBYZ_COMPILE_CACHE")
    with pytest.raises(ConfigError, match="JBYZ_COMPILE_CACHE='yes' is ambiguous"):
        compile_cache.resolve(None, {"JBYZ_COMPILE_CACHE": "yes"})
    # unset or empty: the per-user default, by the XDG rule when platformdirs is absent
    monkeypatch.setitem(sys.modules, "platformdirs", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve(None, {"JBYZ_COMPILE_CACHE": ""}) == (
        tmp_path / "xdg" / "jbyz" / "jax", "default")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "jbyz" / "jax"
    # a directory the user gave JAX itself is kept when jbyz is not told otherwise
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    try:
        assert compile_cache.resolve(None, {}) == (tmp_path / "mine", "jax_compilation_cache_dir")
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


@pytest.mark.slow
def test_import_jbyz_does_not_enable_the_cache(tmp_path):
    """A fresh process: importing jbyz (and its runner modules) and compiling leaves JAX's cache
    unset and writes nothing in the (fake) home's cache directory."""
    code = textwrap.dedent("""
        import jax, jbyz, jbyz.grid, jbyz.cli, jbyz.simulate
        jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
        print("DIR", jax.config.jax_compilation_cache_dir)
    """)
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache"),
           "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "DIR None" in r.stdout
    assert not (tmp_path / ".cache" / "jbyz").exists()


def _run(capsys, toml, out, *args):
    assert cli.main(["run", str(toml), "--out", str(out), "--no-progress", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_second_run_loads_from_cache_with_identical_results(tmp_path, capsys, monkeypatch):
    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY)
    cache = tmp_path / "cache"
    before = jax.config.jax_compilation_cache_dir
    simulate._PROGRAMS.clear()  # every program of the grid compiles (none in memory already)
    jax.clear_caches()
    # 1. cold, through the option: the first line names the directory
    out1 = _run(capsys, toml, tmp_path / "o1", "--compile-cache", str(cache))
    assert f"compile cache: {cache} (from the compile_cache option; 0 programs stored" in out1
    n_cold = compile_cache.entries(cache)
    assert n_cold >= 3  # init, evaluation and the chunk of steps, at least
    assert jax.config.jax_compilation_cache_dir == before  # restored after the run

    # 2. warm, through the environment, with every in-memory cache of this process dropped
    hits = []
    listener = lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
    jax.monitoring.register_event_listener(listener)
    try:
        simulate._PROGRAMS.clear()
        jax.clear_caches()
        monkeypatch.setenv("JBYZ_COMPILE_CACHE", str(cache))
        out2 = _run(capsys, toml, tmp_path / "o2")
        assert f"compile cache: {cache} (from $JBYZ_COMPILE_CACHE; {n_cold} programs stored" in out2
        assert len(hits) >= 3, "the second run compiled its programs again"
        assert compile_cache.entries(cache) == n_cold  # nothing new to store

        # 3. without the cache: nothing loaded, nothing stored
        hits.clear()
        simulate._PROGRAMS.clear()
        jax.clear_caches()
        out3 = _run(capsys, toml, tmp_path / "o3", "--compile-cache", "off")
        assert "compile cache: off (from the compile_cache option" in out3
        assert not hits and compile_cache.entries(cache) == n_cold
    finally:
        jax.monitoring.unregister_event_listener(listener)

    tables = [results.load_results(tmp_path / o / "results.parquet").sort_values(["run_id", "step"])
              for o in ("o1", "o2", "o3")]
    assert len(tables[0]) == 2 * 3
    for t in tables[1:]:
        pd.testing.assert_frame_equal(t[["run_id", *METRICS]].reset_index(drop=True),
                                      tables[0][["run_id", *METRICS]].reset_index(drop=True),
                                      check_exact=True)


def test_bad_value_fails_before_compute(tmp_path, capsys, monkeypatch):
    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY)
    assert cli.main(["run", str(toml), "--out", str(tmp_path / "a"), "--compile-cache", "no"]) == 2
    assert "compile_cache='no' is ambiguous" in capsys.readouterr().err
    monkeypatch.setenv("JBYZ_COMPILE_CACHE", "1")
    assert cli.main(["run", str(toml), "--out", str(tmp_path / "b")]) == 2
    assert "JBYZ_COMPILE_CACHE='1' is ambiguous" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unusable_directory_is_an_error_or_for_the_default_a_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot use .*Give another directory or 'off'"):
        with compile_cache.enabled(str(blocker / "sub"), environ={}):
            pass
    monkeypatch.setattr(compile_cache, "default_dir", lambda: blocker / "sub")
    lines = []
    with pytest.warns(UserWarning, match="not usable"):
        with compile_cache.enabled(None, log=lines.append, environ={}) as path:
            assert path is None
    assert lines[0].startswith("compile cache: off (the default directory is not writable")


def test_the_suite_keeps_the_cache_out_of_the_home_directory():
    """tests/conftest.py points JBYZ_COMPILE_CACHE at a directory of the test session."""
    d = Path(os.environ["JBYZ_COMPILE_CACHE"])
    assert d.name.startswith("jax_compile_cache") and Path.home() / ".cache" not in d.parents
