"""The documentation's code runs as printed: docs/extending.md's Python blocks, in order, as one
script in a fresh interpreter (the page registers components; they must not leak into the
registries the other tests see)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


@pytest.mark.slow  # ~30 s of CPU: two small training runs, compiled in a fresh interpreter
def test_extending_page_code_runs(tmp_path):
    blocks = python_blocks(ROOT / "docs" / "extending.md")
    assert len(blocks) >= 5  # rule, its use, attack, model, grid
    script = tmp_path / "extending.py"
    script.write_text("\n\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "norm_clipped_mean" in proc.stdout  # the grid's summary was printed
    assert (tmp_path / "runs" / "extending" / "results.parquet").exists()


def test_python_blocks_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n\n```toml\n[run]\n```\n```python\ny = 2\n```\n")
    assert python_blocks(page) == ["x = 1\n", "y = 2\n"]


def test_every_public_module_is_in_the_api_reference():
    import pkgutil

    import jbyz

    pages = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md")
                      if "_build" not in p.parts)
    documented = set(re.findall(r"\.\. automodule:: ([\w.]+)", pages))
    modules = {"jbyz"} | {m.name for m in pkgutil.walk_packages(jbyz.__path__, "jbyz.")}
    public = {m for m in modules if not any(part.startswith("_") for part in m.split("."))}
    assert not public - documented, f"modules missing from docs/: {sorted(public - documented)}"
    assert not documented - modules, f"docs/ documents unknown modules: {sorted(documented - modules)}"


def test_ci_builds_the_docs_with_warnings_as_errors():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[docs]"' in ci
    build = next(line for line in ci.splitlines() if "sphinx-build" in line)
    assert " -W " in build and " docs " in build
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^docs = \[(.*?)^\]", pyproject, re.S | re.M)
    assert extra, "pyproject.toml lost its docs extra"
    conf = (ROOT / "docs" / "conf.py").read_text()
    for package, extension in (("sphinx", "sphinx.ext.autodoc"), ("myst-parser", "myst_parser"),
                               ("furo", '"furo"')):
        assert f'"{package}>=' in extra.group(1) and extension in conf


def test_components_page_lists_every_registry():
    page = (ROOT / "docs" / "components.md").read_text()
    listed = set(re.findall(r"^```\{jbyz-registry\} ([\w.]+) (\w+)", page, re.M))
    defined = set()
    for path in (ROOT / "jbyz").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in re.findall(r"^(\w+) = Registry\(", path.read_text(), re.M):
            defined.add((module, name))
    assert len(defined) >= 7 and defined <= listed, (
        f"registries missing from docs/components.md: {sorted(defined - listed)}")


def test_running_page_code_runs():
    blocks = python_blocks(ROOT / "docs" / "running.md")
    assert blocks
    proc = subprocess.run([sys.executable, "-c", "\n\n".join(blocks)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
