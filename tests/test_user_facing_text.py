"""User-facing text stands alone: it cites the papers, not notes that are not in the repository.

The library's docstrings and ``jbyz list``, the READMEs, experiment configurations and scripts,
notebooks, benchmarks, docs and examples must not point a reader to an internal specification
("spec §3(b)", ``algorithms.md``), design notes (``design.md``, ``perf-notes.md``), a ``shared/``
folder, an issue number, or the machine they were written on ("the machine is shared").
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "a spec section": re.compile(r"\b[Ss]pec\b[^\n]{0,12}§|\b[Ss]pec\s+\d+(\.\d+)?\s*\(|\bSpec:"),
    "the spec": re.compile(r"\b[Tt]he spec\b|\bspec's\b|\bspec:\s*`"),
    "internal notes": re.compile(r"\b(algorithms|design|peers)\.md\b|perf-notes"),
    "a shared/ path": re.compile(r"(?:^|[\s`'\"(])(?:\.\./)*shared/"),
    "an issue number": re.compile(r"\b[Ii]ssue[- ]#?\d+"),
    "the shared machine": re.compile(r"machine (?:is|was) shared|\bshared machine"),
}

SUFFIXES = {".py", ".md", ".toml", ".ipynb", ".sh", ".txt", ".cfg", ".yaml", ".yml", ".rst"}
TREES = ["jbyz", "experiments", "notebooks", "benchmarks", "docs", "examples"]
FILES = ["README.md", "CHANGELOG.md"]
EXCLUDED: tuple[str, ...] = ()


def user_facing_files() -> list[Path]:
    out = [ROOT / f for f in FILES if (ROOT / f).exists()]
    for tree in TREES:
        for p in sorted((ROOT / tree).rglob("*")):
            rel = p.relative_to(ROOT).as_posix()
            if (p.is_file() and p.suffix in SUFFIXES and "/_build/" not in f"/{rel}"
                    and "/.venv" not in f"/{rel}" and not rel.startswith(EXCLUDED)):
                out.append(p)
    return out


def problems(text: str) -> list[str]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append(f"{lineno}: {what}: {line.strip()[:120]}")
    return found


def test_patterns_catch_the_old_citations_and_spare_paper_citations():
    bad = [
        "Attackers are omniscient (spec §6.2).",
        "Setting (spec §1(b)): m workers",
        "of all n clients at x^0 (spec 2(e) assumption).",
        "arXiv:2305.13856). Spec: ``shared/spec/algorithms.md`` §1.",
        "as restated in the spec (see the caveat)",
        "dSTAR with the spec's defaults",
        "The pipeline of one step (design.md §1)::",
        "Workload (perf-notes.md): Fashion-MNIST",
        "(see ../shared/spec/algorithms.md)",
        "# OrMo vs ASGD (asynchronous SGD, issue 7)",
        "| `vs_byzfl.py` | the issue-3 race |",
        "From the repository root (CPU; `nice` because the machine is shared):",
        "wall time on a shared machine",
    ]
    for line in bad:
        assert problems(line), line
    good = [
        "Malinovsky et al., NeurIPS 2024, §5 and appendix H (shift-back attack).",
        "CIFAR ResNet-20 (He et al. 2016 §4.2)",
        "the paper's Tables 7-11; a special case of a mask",
        "/usr/share/datasets/fashion-mnist",
        "in_specs=(P('runs'),), spec = dict(name='x')",
        "cnn_layout.py: shared forward over 224 samples with the shared weights",
    ]
    for line in good:
        assert not problems(line), line


def test_the_scan_covers_the_user_facing_trees():
    rels = {p.relative_to(ROOT).as_posix() for p in user_facing_files()}
    for expected in ("README.md", "jbyz/aggregators.py", "jbyz/algorithms/dstar.py",
                     "experiments/byzsgdnm/README.md", "experiments/quickstart.toml",
                     "notebooks/quickstart.ipynb", "benchmarks/README.md", "docs/extending.md"):
        assert expected in rels


@pytest.mark.parametrize("path", user_facing_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_user_facing_file_stands_alone(path):
    found = problems(path.read_text(encoding="utf-8", errors="replace"))
    assert not found, f"{path.relative_to(ROOT)} cites notes outside the repository:\n" + "\n".join(found)


def test_jbyz_list_stands_alone():
    out = subprocess.run([sys.executable, "-m", "jbyz.cli", "list"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert "Aggregators" in out and "dstar" in out
    found = problems(out)
    assert not found, "jbyz list:\n" + "\n".join(found)
