"""The house's import graph: no circles (counting imports inside functions), no upward imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO

PACKAGES = ("sam3_core", "components", "pipeline")
# who may import whom: the library knows nothing of the components or the pipeline
ALLOWED = {"sam3_core": {"sam3_core"}, "components": {"sam3_core", "components"}, "pipeline": set(PACKAGES)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Project modules `module` imports anywhere in its body, type-checking-only imports left out."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = [path for package in PACKAGES for path in (REPO / package).rglob("*.py")]
    modules = {_module_name(path): path for path in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py")
        # `from pkg import name` is an edge to pkg.name when that is a module, else to pkg
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its modules is not a circle: edges into a package are dropped."""
    packages = {name for name in graph if (REPO / name.replace(".", "/") / "__init__.py").exists()}
    return {name: targets - packages for name, targets in graph.items()}


def test_no_module_imports_itself_through_others():
    assert _cycles(_without_packages(_graph())) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_a_layer_above_it(package):
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in _graph().items()
        if name.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in ALLOWED[package]
    )
    assert upward == []
