"""The package layout holds: no import cycles, and dependencies point one way.

features <- models <- serving engine and policy <- API, alerts, reports, schedules <- CLI,
with training beside the engine. Imports under `if TYPE_CHECKING:` are annotations only
and do not count; imports inside functions do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "models", "training", "serving", "keywatch_gateway")

ALLOWED: dict[str, tuple[str, ...]] = {
    "features": ("features",),
    "models": ("features", "models"),
    "serving.engine": ("features", "models", "serving.engine", "serving.policy",
                       "serving.settings"),
    "serving.policy": ("features", "models", "serving.engine", "serving.policy"),
    "serving.observability": ("features", "serving.engine", "serving.observability"),
    "training": ("features", "models", "training", "serving.engine", "serving.policy",
                 "serving.settings"),
    "keywatch_gateway": ("keywatch_gateway",),
}
"""Who may import whom (prefixes). Layers not listed (api, alerts, reports, schedules)
may import anything but the CLI; the CLI may import everything."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES if (ROOT / pkg).is_dir()
            for p in (ROOT / pkg).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == \
        "TYPE_CHECKING"


def _imported_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names.add(child.module)
                names.update(f"{child.module}.{alias.name}" for alias in child.names)
            stack.append(child)
    return names


def import_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports at run time."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        for target in targets:
            rule = max((p for p in ALLOWED if _inside(module, p)), key=len, default=None)
            if rule is not None:
                if not any(_inside(target, allowed) for allowed in ALLOWED[rule]):
                    bad.append(f"{module} -> {target}")
            elif _inside(target, "serving.cli") and not _inside(module, "serving.cli"):
                bad.append(f"{module} -> {target} (only the CLI imports the CLI)")
    return sorted(bad)


def test_no_import_cycles() -> None:
    assert find_cycles(import_graph()) == []


def test_dependencies_point_one_way() -> None:
    assert _layer_violations(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder_sees_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert find_cycles(graph) == expected


def test_layer_check_sees_a_wrong_way_import() -> None:
    assert _layer_violations({"features.x": {"serving.engine.scorer"}}) == [
        "features.x -> serving.engine.scorer"]
