"""Every module's docstring examples run (doctest), so the examples in the API reference are real.

Modules are found by walking the package: a new module is covered without editing this file.
"""

import doctest
import importlib
import pkgutil

import pytest

import jbyz

MODULES = ["jbyz"] + sorted(m.name for m in pkgutil.walk_packages(jbyz.__path__, "jbyz."))


def test_walk_finds_the_modules_with_examples():
    for name in ("jbyz.aggregators", "jbyz.attacks", "jbyz.protocols", "jbyz.algorithms.marina"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} example(s) failed in {name}"
