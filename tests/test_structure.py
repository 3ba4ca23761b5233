"""The dependency direction written in docs/structure.md holds: no module imports upwards, no
import circle exists (imports inside functions count), and every module has a layer."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jbyz"


def module_files() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The jbyz modules ``name`` imports, anywhere in its file (module level or in functions)."""
    deps = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from jbyz import aggregators` imports the module jbyz.aggregators, not jbyz itself
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = subs or [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # jbyz.aggregators.AGGREGATORS -> jbyz.aggregators
                t = t.rpartition(".")[0]
            if t and t != name:
                deps.add(t)
    return deps


def layers_from_docs() -> dict[str, int]:
    text = (ROOT / "docs" / "structure.md").read_text()
    layers = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*(\d+)\s[^|]*\|(.*)\|\s*$", line)
        if m:
            for mod in re.findall(r"`([\w.]+)`", m.group(2)):
                layers[mod] = int(m.group(1))
    return layers


MODULES = module_files()
GRAPH = {name: imports_of(name, path, MODULES) for name, path in MODULES.items()}
LAYERS = layers_from_docs()


def strongly_connected(graph) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read_correctly():
    assert "jbyz.aggregators" in GRAPH["jbyz.validation"]
    assert "jbyz.aggregators" in GRAPH["jbyz.algorithms.dstar"]   # `import jbyz.aggregators as A`
    assert "jbyz.simulate" in GRAPH["jbyz.grid"]                  # an import inside a function
    assert "jbyz.config" in GRAPH["jbyz.schedules"]


def test_no_import_circle():
    assert strongly_connected(GRAPH) == []


def test_the_cycle_finder_finds_a_circle():
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["jbyz.config"].add("jbyz.grid")                          # the circle this layout removed
    assert any({"jbyz.config", "jbyz.grid"} <= set(c) for c in strongly_connected(graph))


def test_every_module_has_a_layer():
    missing = sorted(set(MODULES) - set(LAYERS))
    assert not missing, f"add these modules to the layer table of docs/structure.md: {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    up = sorted(d for d in GRAPH[name] if LAYERS.get(d, -1) > LAYERS.get(name, 99))
    assert not up, (f"{name} (layer {LAYERS.get(name)}) imports from higher layers: "
                    + ", ".join(f"{d} (layer {LAYERS[d]})" for d in up))


def test_registries_are_complete_whichever_module_comes_first():
    import subprocess
    import sys

    code = ("import jbyz.aggregators as A; assert 'dstar' in A.AGGREGATORS; "
            "r = A.AGGREGATORS.build('dstar'); assert r.name == 'dstar' and r.needs_reference; "
            "assert any(n == 'dstar' for n, _, _ in A.AGGREGATORS.describe())")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
