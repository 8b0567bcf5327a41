"""The package's layering, checked on its source: `quantize ← runtime ← targets ← convert ←
(benchmarks, cli)`, where the command line may also use the benchmarks and nothing imports the
command line; and no import cycle between modules, function-local imports included (a lazy import
still ties two modules together); and a module imports inside a function only what loads a heavy
package (torch, the backends), so the command line starts without them."""

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


# Third-party packages that take a noticeable time or memory to import: the only ones a module may
# import inside a function (STYLE.md's habit 8), directly or through an ossedge module that loads
# one at its top.
HEAVY = {"torch", "torchao", "executorch", "coremltools", "onnx", "onnxruntime",
         "onnxruntime_genai", "transformers", "matplotlib", "gguf", "llama_cpp", "openai_harmony",
         "quicktok", "safetensors.torch", "coreai", "coreai_torch"}  # fmt: skip


def _is_heavy(package: str) -> bool:
    parts = package.split(".")
    return any(".".join(parts[:i]) in HEAVY for i in range(1, len(parts) + 1))


def _top_level(path: Path) -> tuple[set[str], set[str]]:
    """(ossedge modules, other top-level packages) imported by `path` outside its functions."""
    ours, others = set(), set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.ClassDef):
            todo.extend(n for n in node.body if not isinstance(n, ast.FunctionDef))
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            todo.extend(ast.iter_child_nodes(node))
            continue
        for n in names:
            (ours if n.startswith("ossedge") else others).add(n)
    return ours, others


def _loads_heavy(modules: dict[str, Path]) -> dict[str, bool]:
    """Module → whether importing it loads a heavy package (through its top-level imports)."""
    top = {m: _top_level(f) for m, f in modules.items()}
    memo: dict[str, bool] = {}

    def heavy(m: str, seen: frozenset = frozenset()) -> bool:
        if m not in memo:
            ours, others = top[m]
            parents = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
            memo[m] = any(map(_is_heavy, others)) or any(
                heavy(o, seen | {m}) for o in (ours | parents) & modules.keys() - seen - {m})
        return memo[m]

    return {m: heavy(m) for m in modules}


def _local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function of `path`."""
    out = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                out += [(node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                sub = [f"{node.module}.{a.name}" for a in node.names]
                out += [(node.lineno, s) for s in sub] or [(node.lineno, node.module)]
    return out


def test_function_local_imports_are_of_heavy_modules_only() -> None:
    """A file's head shows what it depends on: a function-local import is kept only for a module
    that loads a heavy backend, so that `ossedge --help` and light commands stay fast."""
    modules = _modules()
    heavy = _loads_heavy(modules)
    wrong = []
    for m, f in modules.items():
        for line, name in _local_imports(f):
            target = name if name in modules else name.rsplit(".", 1)[0]
            if target in modules:
                ok = heavy[target]
            else:
                ok = _is_heavy(name)
            if not ok:
                wrong.append(f"{f.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not wrong, "\n".join(wrong)


def test_importing_the_command_line_loads_no_heavy_package() -> None:
    heavy = _loads_heavy(_modules())
    assert not heavy["ossedge.cli.main"]
    assert heavy["ossedge.runtime.model"] and heavy["ossedge.targets.plan"]
