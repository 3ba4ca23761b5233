"""The `jbyz` command: list, check, run, plot; results load into pandas."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from jbyz import aggregators, attacks, cli, data, models, preaggregators, results

ROOT = Path(__file__).resolve().parents[1]


def test_list_shows_every_registered_component(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for reg in (aggregators.AGGREGATORS, preaggregators.PREAGGREGATORS, attacks.ATTACKS,
                models.MODELS, data.DATASETS):
        for name, desc, ref in reg.describe():
            assert f"  {name} " in out, name
            assert desc and ref, f"{name} lacks a description or reference"


def test_console_script_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "jbyz.cli", "list", "attacks"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "alie" in r.stdout and "Aggregators" not in r.stdout


def test_check_reports_invalid_points(tmp_path, capsys):
    p = tmp_path / "bad.toml"
    p.write_text('[run]\nn_workers = 7\nf_real = 3\n[sweep]\naggregator = ["krum", "median"]\n')
    assert cli.main(["check", str(p)]) == 1
    out = capsys.readouterr().out
    assert "2f + 3" in out and "1 valid, 1 invalid" in out
    assert cli.main(["check", str(ROOT / "experiments" / "quickstart.toml")]) == 0


def test_run_refuses_invalid_before_compute(tmp_path, capsys):
    p = tmp_path / "bad.toml"
    p.write_text('[run]\naggregator = "bulyann"\n')
    assert cli.main(["run", str(p), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "did you mean 'bulyan'" in capsys.readouterr().err.lower()
    assert not (tmp_path / "o").exists()


def test_run_writes_table_summary_and_plot(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(
        '[run]\nsteps = 20\neval_every = 10\n'
        '[sweep]\naggregator = ["mean", "median"]\nseed = [0, 1]\n'
    )
    out = tmp_path / "out"
    assert cli.main(["run", str(p), "--out", str(out), "--no-progress"]) == 0
    df = results.load_results(out / "results.parquet")
    assert len(df) == 4 * 3  # 4 runs x evaluations at steps 0, 10, 20
    assert {"aggregator", "attack", "seed", "step", "test_accuracy", "jax_version", "run_id", "f"} <= set(df.columns)
    assert "config_hash" not in df.columns  # run_id is the one id column
    meta = results.read_metadata(out / "results.parquet")
    assert meta["jax_version"]
    summ = pd.read_csv(out / "summary.csv")
    assert set(summ["aggregator"]) == {"mean", "median"} and (summ["seeds"] == 2).all()
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert cli.main(["plot", str(out / "results.parquet"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


@pytest.mark.slow
def test_quickstart_main_job_end_to_end(tmp_path):
    """The README's main job as a user runs it (the full quickstart grid)."""
    out = tmp_path / "qs"
    table = cli.run_experiment(ROOT / "experiments" / "quickstart.toml", out, progress=False, quiet=True)
    s = results.summarize(table)
    acc = {(r.aggregator, r.attack, r.momentum_at): r.final_mean for r in s.itertuples()}
    for at in ("server", "worker"):
        assert acc[("mean", "none", at)] > 0.9
        assert acc[("mean", "sign_flip", at)] < 0.3      # bit flipping defeats the mean ...
        assert acc[("median", "sign_flip", at)] > 0.85   # ... and a robust rule holds
    for rule in ("median", "krum"):  # ALIE slips past the robust rules at the server ...
        assert acc[(rule, "alie", "server")] < acc[("mean", "none", "server")] - 0.04
        # ... and momentum at the workers recovers
        assert acc[(rule, "alie", "worker")] > acc[(rule, "alie", "server")] + 0.03


def test_only_filters_runs_and_explains_misses():
    from jbyz.cli import select
    from jbyz.config import load_experiment
    from jbyz.registry import ConfigError

    runs = load_experiment(text="""
[run]
dataset = "digits"
[sweep]
seed = [1, 2, 3]
normalize = [true, false]
lr = [0.1, 0.05]
""").runs()
    assert len(select(runs, ["normalize=true"])) == 6  # as TOML spells it
    assert len(select(runs, ["normalize=True", "seed=1,3"])) == 4
    assert {r.lr for r in select(runs, ["lr=0.05"])} == {0.05}
    with pytest.raises(ConfigError, match="values of seed there: 1, 2, 3"):
        select(runs, ["seed=7"])
    with pytest.raises(ConfigError, match="unknown field 'sed'"):
        select(runs, ["sed=1"])


def test_every_option_and_command_has_help_text():
    import argparse

    from jbyz.cli import build_parser

    def walk(parser, where):
        seen = 0
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                assert set(helps) == set(action.choices), where
                for name, sub in action.choices.items():
                    assert (helps[name] or "").strip(), f"{where} {name}: command without help"
                    seen += walk(sub, f"{where} {name}")
                continue
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
                f"{where}: option {action.option_strings or action.dest} has no help text"
            seen += 1
        return seen

    assert walk(build_parser(), "jbyz") >= 30  # every command's every argument was looked at


def test_version_option(capsys):
    from jbyz import __version__, cli, results

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"jbyz {__version__}"
    import importlib.metadata

    assert importlib.metadata.version("jbyz") == __version__  # pyproject reads jbyz.__version__
    assert results.run_metadata()["jbyz_version"] == __version__
