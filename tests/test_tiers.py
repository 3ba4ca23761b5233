"""The fast tier's list of slow tests (tests/conftest.py) names tests that exist."""

import ast
from pathlib import Path

from conftest import SLOW, _slow

TESTS = Path(__file__).resolve().parent


def test_every_slow_entry_names_an_existing_test():
    functions = {}
    for entry in SLOW:
        file, name = entry.split("::", 1)
        if file not in functions:
            tree = ast.parse((TESTS / file).read_text())
            functions[file] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name.split("[")[0] in functions[file], f"{entry}: no such test (renamed? update SLOW)"


def test_entries_match_whole_tests_or_case_prefixes():
    assert _slow("tests/test_grid.py::test_eight_devices_match_one")
    assert not _slow("tests/test_grid.py::test_eight_devices_match_one_more")
    assert _slow("tests/test_compression.py::test_randk_structure[10-3]")
    assert not _slow("tests/test_config.py::test_replace_with_a_new_component_resets_its_kwargs")


def test_readme_documents_the_fast_tier_and_ci_runs_everything():
    root = TESTS.parent
    readme = (root / "README.md").read_text()
    assert 'python -m pytest -m "not slow"' in readme
    assert "slow" not in (root / ".ci" / "run").read_text().split("python -m pytest", 1)[1].split("\n")[0]
    assert "slow:" in (root / "pyproject.toml").read_text()  # the marker is declared (--strict-markers)
