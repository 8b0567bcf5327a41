"""The package's layering, checked on its source: `quantize ← runtime ← targets ← convert ←
(benchmarks, cli)`, where the command line may also use the benchmarks and nothing imports the
command line; and no import cycle between modules, function-local imports included (a lazy import
still ties two modules together)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A module may import its own layer and the layers below it. `ossedge` (the version) is a leaf
# anyone may import; `ossedge.assets` (the bundled model and its trainer) sits with the runtime.
LAYERS = {"ossedge": -1, "quantize": 0, "runtime": 1, "assets": 1, "targets": 2, "convert": 3,
          "benchmarks": 4, "cli": 5}  # fmt: skip


def _modules() -> dict[str, Path]:
    """Module name → file, from pyproject's package directories."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for package, folder in dirs.items():
        for f in sorted((ROOT / folder).glob("*.py")):
            name = package if f.stem == "__init__" else f"{package}.{f.stem}"
            out[name] = f
    return out


def _imports(path: Path) -> set[str]:
    """The ossedge modules `path` imports, anywhere in the file (a name imported from a package
    counts as the submodule when there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ossedge")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.startswith("ossedge"):  # fmt: skip
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(f) if i in modules and i != m} for m, f in modules.items()}


def _layer(module: str) -> int:
    if module == "ossedge.__main__":  # `python -m ossedge`: the command line
        return LAYERS["cli"]
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else parts[0]]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                out.append(sorted([v, *comp]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read() -> None:
    g = _graph()
    assert len(g) > 80 and "ossedge.targets.executorch.runner" in g
    assert "ossedge.runtime.model" in g["ossedge.targets.executorch.checks"]


def test_no_import_against_the_layers() -> None:
    wrong = [f"{a} imports {b}" for a, bs in _graph().items() for b in sorted(bs)
             if _layer(b) > _layer(a)]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_command_line() -> None:
    wrong = [f"{a} imports {b}" for a, bs in _graph().items() for b in sorted(bs)
             if b.startswith("ossedge.cli") and _layer(a) != LAYERS["cli"]]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])  # fmt: skip
def test_the_cycle_finder_finds_cycles(graph, cycle) -> None:
    assert _cycles(graph) == cycle


def test_the_layer_check_sees_a_wrong_import() -> None:
    assert _layer("ossedge.targets.plan") > _layer("ossedge.runtime.model")
    assert _layer("ossedge.cli.main") > _layer("ossedge.benchmarks.harness")
