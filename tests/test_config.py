"""Configurations: invalid ones fail before compute, naming the problem and what is valid."""

from pathlib import Path

import pytest

from jbyz.config import RunConfig, from_dict, load_experiment
from jbyz.validation import check, validate
from jbyz.registry import ConfigError


def test_default_config_is_valid():
    assert validate(RunConfig()) == []


def test_krum_needs_2f_plus_3():
    errs = validate(RunConfig(n_workers=7, f_real=3, aggregator="krum"))
    assert any("2f + 3" in e or "2f+3" in e for e in errs), errs


def test_bulyan_needs_4f_plus_3():
    errs = validate(RunConfig(n_workers=10, f_real=3, aggregator="bulyan"))
    assert any("4f + 3" in e or "4f+3" in e for e in errs), errs
    assert validate(RunConfig(n_workers=15, f_real=3, aggregator="bulyan")) == []


def test_unknown_names_suggest_the_closest():
    errs = validate(RunConfig(aggregator="krun"))
    assert any("'krum'" in e for e in errs), errs
    errs = validate(RunConfig(attack="alei"))
    assert any("'alie'" in e for e in errs), errs
    with pytest.raises(ConfigError, match="did you mean 'momentum'"):
        from_dict({"momentun": 0.9})


def test_all_errors_reported_at_once():
    cfg = RunConfig(n_workers=5, f_real=5, momentum=1.5, split="iidd", lr=-1.0)
    with pytest.raises(ConfigError) as e:
        check(cfg)
    msg = str(e.value)
    for needle in ("f_real=5", "momentum must be in [0, 1)", "'iid'", "lr must be > 0"):
        assert needle in msg, msg


def test_bad_hyperparameter_lists_valid_ones():
    errs = validate(RunConfig(aggregator="trimmed_mean", aggregator_kwargs={"bee": 1}))
    assert errs and "bee" in errs[0] and "Valid" in errs[0]


def test_experiment_sweep_product_and_component_tables(tmp_path):
    p = tmp_path / "e.toml"
    p.write_text(
        """
[run]
steps = 10
[sweep]
aggregator = ["mean", {name = "centered_clip", tau = 2.0}]
seed = [0, 1, 2]
"""
    )
    exp = load_experiment(p)
    runs = exp.runs()
    assert len(runs) == 6
    cc = [r for r in runs if r.aggregator == "centered_clip"]
    assert len(cc) == 3 and all(r.aggregator_kwargs == {"tau": 2.0} for r in cc)
    assert all(r.aggregator_kwargs == {} for r in runs if r.aggregator == "mean")
    assert exp.output_dir.name == "e"


def test_experiment_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[runn]\nsteps=1\n")
    with pytest.raises(ConfigError, match="unknown table"):
        load_experiment(bad)
    bad.write_text("[sweep]\nstepz=[1]\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_experiment(bad)


def test_extends_layers_a_file_on_another(tmp_path):
    (tmp_path / "base.toml").write_text(
        """
[run]
steps = 10
model = "mlp"
model_kwargs = {hidden = [32]}
aggregator = {name = "centered_clip", tau = 2.0}
[sweep]
seed = [0, 1]
[[grid]]
attack = "none"
[execution]
invalid = "skip"
[output]
dir = "out/base"
"""
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "cnn.toml").write_text(
        """
extends = "../base.toml"
[run]
model = "lenet"
steps = 20
[sweep]
seed = [5]
[[grid]]
attack = "alie"
[output]
dir = "out/cnn"
"""
    )
    exp = load_experiment(sub / "cnn.toml")
    runs = exp.runs()
    # The other file's block first, then this file's; the sweep's seed replaced, not extended.
    assert [(r.attack, r.seed) for r in runs] == [("none", 5), ("alie", 5)]
    # A model named anew does not inherit the mlp's hidden sizes; the aggregator keeps its tau.
    assert all(r.model == "lenet" and r.model_kwargs == {} and r.steps == 20 for r in runs)
    assert all(r.aggregator_kwargs == {"tau": 2.0} for r in runs)
    assert exp.execution == {"invalid": "skip"} and str(exp.output_dir) == "out/cnn"
    # The same file without extends' additions: the base alone.
    base = load_experiment(tmp_path / "base.toml")
    assert [(r.model, r.seed) for r in base.runs()] == [("mlp", 0), ("mlp", 1)]


def test_extends_errors(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('extends = "b.toml"\n[run]\nsteps = 1\n')
    b.write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"extends forms a cycle: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_experiment(a)
    a.write_text('extends = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match=r"extends 'nowhere.toml', but .* does not exist \(a relative path"):
        load_experiment(a)
    a.write_text('extends = ["b.toml"]\n')
    with pytest.raises(ConfigError, match="extends must be the path of one configuration file"):
        load_experiment(a)


def test_study_cnn_is_the_study_with_a_cnn():
    """The CNN leg of the ByzSGDnm study runs every grid point of the MLP study, nothing else."""
    root = Path(__file__).resolve().parents[1] / "experiments" / "byzsgdnm"
    mlp, cnn = load_experiment(root / "study.toml"), load_experiment(root / "study_cnn.toml")
    strip = lambda r: r.replace(model="mlp", model_kwargs={}).config_hash()  # noqa: E731
    assert [strip(r) for r in cnn.runs()] == [strip(r) for r in mlp.runs()]
    assert {(r.model, tuple(r.model_kwargs["channels"])) for r in cnn.runs()} == {("lenet", (8, 16))}
    assert cnn.output_dir != mlp.output_dir


def test_config_hash_stable_and_sensitive():
    a, b = RunConfig(), RunConfig()
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != a.replace(lr=0.2).config_hash()


def test_replace_with_a_new_component_resets_its_kwargs():
    # As in configuration files: a component given anew starts from its own defaults.
    cfg = RunConfig(attack="sign_flip", attack_kwargs={"scale": -10.0},
                    aggregator="centered_clip", aggregator_kwargs={"tau": 1.0})
    alie = cfg.replace(attack="alie")
    assert alie.attack == "alie" and dict(alie.attack_kwargs) == {}
    assert validate(alie) == []                               # the old 'scale' is gone
    assert dict(alie.aggregator_kwargs) == {"tau": 1.0}       # other components untouched
    assert dict(cfg.replace(attack="sign_flip").attack_kwargs) == {"scale": -10.0}  # same name: kept
    table = cfg.replace(attack={"name": "alie", "z": 1.5})
    assert (table.attack, dict(table.attack_kwargs)) == ("alie", {"z": 1.5})
    given = cfg.replace(attack="alie", attack_kwargs={"z": 2.0})
    assert dict(given.attack_kwargs) == {"z": 2.0}
    assert dict(cfg.replace(aggregator="median").aggregator_kwargs) == {}
    # The old behaviour kept the kwargs and failed validation on them:
    stale = RunConfig(**{**cfg.to_dict(), "attack": "alie", "preaggregators": ()})
    assert any("has no hyper-parameter(s) 'scale'" in e for e in validate(stale))
