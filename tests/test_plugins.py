"""Plugins: components registered by a user's module, used from a TOML grid without editing jbyz."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jbyz import cli, results
from jbyz.config import load_experiment
from jbyz.validation import validate
from jbyz.plugins import load_plugins
from jbyz.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin_example"


def test_missing_plugin_is_a_clear_error(capsys):
    with pytest.raises(ConfigError, match=r"plugin 'no_such_jbyz_plugin' could not be imported: "
                                          r"no module named 'no_such_jbyz_plugin'\. Install it, add "
                                          r"its folder to PYTHONPATH"):
        load_plugins(["no_such_jbyz_plugin"])
    with pytest.raises(ConfigError, match=r"plugin 'nowhere/rules\.py' could not be imported: "
                                          r"file '.*nowhere/rules\.py' does not exist"):
        load_plugins(["nowhere/rules.py"], base_dir=ROOT)
    rc = cli.main(["check", str(ROOT / "experiments" / "quickstart.toml"),
                   "--import", "no_such_jbyz_plugin"])
    assert rc == 2
    assert "jbyz: error: plugin 'no_such_jbyz_plugin' could not be imported" in capsys.readouterr().err


def test_plugin_that_fails_inside_names_the_error(tmp_path):
    bad = tmp_path / "broken_jbyz_plugin.py"
    bad.write_text("import no_such_dependency_of_the_plugin\n")
    with pytest.raises(ConfigError, match=r"plugin 'broken_jbyz_plugin\.py' failed while importing: "
                                          r"ModuleNotFoundError: No module named "
                                          r"'no_such_dependency_of_the_plugin'"):
        load_plugins(["broken_jbyz_plugin.py"], base_dir=tmp_path)
    assert "broken_jbyz_plugin" not in sys.modules
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"plugin 'broken_jbyz_plugin' failed while importing: "
                                              r"ModuleNotFoundError"):
            load_plugins(["broken_jbyz_plugin"])
    finally:
        sys.path.remove(str(tmp_path))


def test_plugins_key_must_be_a_list_of_strings():
    with pytest.raises(ConfigError, match=r"\[run\] plugins must be a list of module names or \.py "
                                          r"paths, got 3"):
        load_experiment(text="[run]\nplugins = 3\n")


def test_unknown_component_without_its_plugin_is_reported():
    exp = load_experiment(text='[run]\naggregator = "a_rule_nobody_registered"\n')
    errs = validate(exp.runs()[0])
    assert any("unknown aggregator 'a_rule_nobody_registered'" in e for e in errs)


def test_plugin_example_checks_without_compute(capsys):
    assert cli.main(["check", str(EXAMPLE / "grid.toml")]) == 0
    assert "4 valid, 0 invalid run(s)" in capsys.readouterr().out
    exp = load_experiment(EXAMPLE / "grid.toml")
    assert {(c.aggregator, c.attack, c.model) for c in exp.runs()} == {
        (a, b, "tiny_mlp") for a in ("mean", "smallest_norms") for b in ("none", "inverted_mean")}


def test_plugin_example_runs_end_to_end(tmp_path, monkeypatch):
    """The README's worked example: a grid of user-registered aggregator, attack and model."""
    exp = load_experiment(EXAMPLE / "grid.toml")  # [run] plugins = ["my_components.py"]
    assert exp.plugins == ("my_components.py",)
    from jbyz.aggregators import AGGREGATORS
    from jbyz.attacks import ATTACKS
    from jbyz.models import MODELS

    assert "smallest_norms" in AGGREGATORS and "inverted_mean" in ATTACKS and "tiny_mlp" in MODELS
    # Importing again (here: by module name, with the folder on the path) registers nothing twice.
    monkeypatch.syspath_prepend(str(EXAMPLE))
    load_plugins(["my_components", str(EXAMPLE / "my_components.py")])
    assert cli.main(["check", str(EXAMPLE / "grid.toml"), "--import", "my_components"]) == 0

    table = cli.run_experiment(EXAMPLE / "grid.toml", tmp_path / "out", progress=False, quiet=True)
    assert (tmp_path / "out" / "summary.csv").exists()
    assert set(table["model"]) == {"tiny_mlp"}
    assert table["run_id"].nunique() == 4
    s = results.summarize(table)
    acc = {(r.aggregator, r.attack): r.final_mean for r in s.itertuples()}
    assert acc[("mean", "none")] > 0.6                        # the tiny model learns digits ...
    assert acc[("mean", "inverted_mean")] < 0.3               # ... the plugin attack breaks the mean
    assert acc[("smallest_norms", "inverted_mean")] > 0.6     # ... and the plugin rule holds


def test_readme_shows_the_example_as_it_is():
    readme = (ROOT / "README.md").read_text()
    code = (EXAMPLE / "my_components.py").read_text()
    toml = (EXAMPLE / "grid.toml").read_text()
    section = readme[readme.index("### Your own rules, attacks and models (plugins)"):]
    section = section[:section.index("\n### ")]
    blocks = section.split("```")[1::2]
    py = next(b for b in blocks if b.startswith("python\n"))[len("python\n"):]
    assert py in code
    tml = next(b for b in blocks if b.startswith("toml\n"))[len("toml\n"):]
    for line in tml.strip().splitlines():
        assert line in toml.splitlines(), line
    assert "jbyz run examples/plugin_example/grid.toml" in section
    assert "--import my_components" in toml and "--import my_components" in section
