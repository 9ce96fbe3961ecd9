"""The packages' dependencies flow one way, sae_core <- orchestrator <- analysis, with the command line
(orchestrator/cli.py) on top, and no two modules import each other, directly or through others (imports inside
functions count: a lazy import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sae_core", "orchestrator", "analysis")
LAYER = {"sae_core": 0, "orchestrator": 1, "analysis": 2}
COMMAND_LINE = "orchestrator.cli"  # ties running to analysing; nothing imports it


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding this module
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` names module a.b.c or its package
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(path, name, _modules()) for name, path in _modules().items()}


def test_dependencies_flow_one_way():
    wrong = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
                   if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]] and m != COMMAND_LINE)
    assert not wrong, "\n".join(wrong)
    assert not [m for m, targets in GRAPH.items() if COMMAND_LINE in targets]


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles() == []


@pytest.mark.parametrize("package", PACKAGES)
def test_the_graph_sees_each_package(package):
    # guards the test itself: a parser that found no imports would pass the checks above vacuously
    assert sum(len(t) for m, t in GRAPH.items() if m.startswith(package)) > 5
