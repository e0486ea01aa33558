"""The product's import graph, read from the source (no import runs): no circles, and one direction.

Modules are named as installed: ``kernels/x.py`` is ``vllm_kvquant.kernels.x``, ``scales/x.py``
``vllm_kvquant.scales.x``. Every import counts, lazy ones inside functions and ``TYPE_CHECKING``
ones too: a circle hidden in a function is still a circle in the design. An import of a package
(``from .scales import f``) is an edge to its ``__init__``; importing a submodule does not count as
importing its parent package's ``__init__`` (that would make every package a circle).
Also the layout's rules on vLLM: ``kernels/`` never imports it, ``scales/`` not at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: installed package name -> source folder (pyproject's package-dir mapping)
PACKAGE_DIRS = {"vllm_kvquant": "vllm_kvquant", "vllm_kvquant.kernels": "kernels", "vllm_kvquant.scales": "scales"}
#: a layer may import itself and the layers after it, never the ones before it
LAYERS = ["vllm_kvquant", "vllm_kvquant.scales", "vllm_kvquant.kernels"]


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "vllm_kvquant" and parts and parts[0] in ("kernels", "scales"):
                continue  # a wheel-style layout inside the package folder is not the source layout
            mods[".".join([package, *parts])] = path
    return mods


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # `from pkg import sub` imports the submodule; `from pkg import name` the package
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin for a in node.names]
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of ours: the deepest module that exists
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def test_the_graph_is_read() -> None:
    graph = _edges(_modules())
    assert "vllm_kvquant.scales.format" in graph["vllm_kvquant.scales.validate"]
    assert "vllm_kvquant.kernels.dtypes" in graph["vllm_kvquant.layer_scales"]
    assert len(graph) > 30


def test_no_import_circles() -> None:
    cycles = _cycles(_edges(_modules()))
    assert not cycles, "import circles (each line: modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_imports_run_one_way() -> None:
    """kernels <- scales <- vllm_kvquant: kernels import neither scales nor the plugin, scales not the plugin."""
    graph = _edges(_modules())
    wrong = sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets if _layer(b) < _layer(a))
    assert not wrong, "\n".join(wrong)


def _vllm_imports(tree: ast.AST, lazy: bool) -> list[str]:
    """vLLM modules ``tree`` imports; with ``lazy`` False only those run at import time (not in functions)."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append(node.module or "")
        found += _vllm_imports(node, lazy)
    return [n for n in found if n == "vllm" or n.startswith("vllm.")]


def test_kernels_import_no_vllm_and_scales_none_at_import_time() -> None:
    wrong = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        if name.startswith("vllm_kvquant.kernels"):
            wrong += [f"{name} imports {n}" for n in _vllm_imports(tree, lazy=True)]
        elif name.startswith("vllm_kvquant.scales"):
            wrong += [f"{name} imports {n} at import time" for n in _vllm_imports(tree, lazy=False)]
    assert not wrong, "\n".join(wrong)
    assert _vllm_imports(ast.parse("def f():\n    import vllm.config\n"), lazy=True) == ["vllm.config"]
    assert _vllm_imports(ast.parse("def f():\n    import vllm.config\n"), lazy=False) == []


@pytest.mark.parametrize("module", ["vllm_kvquant.compat"])
def test_compat_depends_on_nothing_of_ours(module: str) -> None:
    """compat holds the differences between vLLM releases only."""
    assert not _edges(_modules())[module]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
