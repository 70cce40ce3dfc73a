"""The package's folders are its layers (CONTRIBUTING.md): every import, at module level or
inside a function, goes to the module's own layer or one below it, and no modules import
each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "esper_func.core": 0,
    "esper_func.data": 1,
    "envs": 2,
    "policies": 2,
    "esper_func.rl": 3,
    "esper_func.perf": 4,
}
"""Rank of each layer: a module imports from its own layer or from a lower rank (envs and policies are side by side)."""
ENTRY_POINTS = ("train", "evaluate", "curves", "growth", "collect_worker", "bench", "bench_distributed", "tasks")
"""The thin `python -m esper_func.<name>` modules at the package's top; they import nothing of ours."""


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer(module: str) -> str:
    return max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len)


def our_imports(path: Path) -> set[str]:
    """Modules of ours that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("esper_func", "envs", "policies")}


def import_graph() -> dict[str, set[str]]:
    modules = {
        module_name(path): path
        for package in ("esper_func", "envs", "policies")
        for path in (ROOT / package).rglob("*.py")
    }
    return {name: {imported for imported in our_imports(path) if imported in modules} for name, path in modules.items()}


def test_every_module_sits_in_a_layer_or_is_an_entry_point() -> None:
    top = {
        name
        for name in import_graph()
        if name.count(".") == 1 and name.startswith("esper_func.") and name not in LAYERS
    }
    assert top - {f"esper_func.{name}" for name in ENTRY_POINTS} == set()
    for name in ENTRY_POINTS:
        assert our_imports(ROOT / "esper_func" / f"{name}.py") == set(), name


def test_imports_go_downward_only() -> None:
    upward = []
    for name, imported in import_graph().items():
        if name == "esper_func" or name.removeprefix("esper_func.") in ENTRY_POINTS:
            continue
        for target in imported:
            if layer(target) != layer(name) and LAYERS[layer(target)] >= LAYERS[layer(name)]:
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in path:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def test_the_core_and_the_data_know_nothing_of_torchrl() -> None:
    users = []
    for package in ("core", "data"):
        for path in (ROOT / "esper_func" / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                users += [f"{module_name(path)} -> {m}" for m in modules if m.split(".")[0] == "torchrl"]
    assert users == []
