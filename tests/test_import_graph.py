"""The package's modules import each other without circles (issue 16): a static check over every import, at module
level or inside functions (a lazy import hides a circle at start-up, not from the reader)."""

from __future__ import annotations

import ast

from helpers import REPO

PACKAGES = ("megatron_a3po", "checkpoints_tools")


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """`a.b.c` -> the longest prefix that is one of our modules (c may be a function of module a.b)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    paths = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {_module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        me, deps = _module_name(path), set()
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            deps |= {t for t in (_resolve(name, modules) for name in targets) if t and t != me}
        graph[me] = deps
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, trail: list[str]) -> list[str] | None:
        if state.get(module) == 1:
            return trail[trail.index(module):] + [module]
        if state.get(module) == 2:
            return None
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            circle = visit(dep, trail + [module])
            if circle:
                return circle
        state[module] = 2
        return None

    for module in sorted(graph):
        circle = visit(module, [])
        if circle:
            return circle
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and "megatron_a3po.job" in graph["megatron_a3po.train"]
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_only_the_cli_imports_the_training_entry_point():
    importers = sorted(m for m, deps in import_graph().items() if "megatron_a3po.train" in deps)
    assert importers == [], importers  # torchrun / a3po-train start it as `-m megatron_a3po.train`
