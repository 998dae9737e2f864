"""The shape of pipeline/, read from the source with `ast`: every module in a subpackage or on
the shared ground, imports only in the allowed directions, no import cycles (lazy imports
inside functions count), no module reaching into another's private names."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "pipeline")

SHARED = {"config", "counts", "errors", "storage", "wording", "faults"}
# What each part may import (besides itself). The shared ground imports only itself.
ALLOWED = {
    "shared": {"shared"},
    "models": {"shared"},
    "stages": {"shared", "models"},
    "quality": {"shared", "models", "stages"},
    "engines": {"shared", "models", "stages", "quality"},
}


def modules(root: str = PIPELINE) -> dict[str, str]:
    """'stages.read' -> its file, for every module of pipeline/ (package __init__s as 'stages')."""
    found = {}
    for dirpath, _, files in os.walk(root):
        if "__pycache__" in dirpath:
            continue
        package = os.path.relpath(dirpath, root).replace(os.sep, ".")
        for name in files:
            if name.endswith(".py"):
                stem = name[:-3]
                parts = ([] if package == "." else [package]) + ([] if stem == "__init__" else [stem])
                found[".".join(parts) or "__init__"] = os.path.join(dirpath, name)
    return found


def part_of(module: str) -> str:
    return "shared" if "." not in module and module in SHARED | {"__init__"} else module.split(".")[0]


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The dotted name (under pipeline) that a relative import in `module` names."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if module == "__init__":
        base = []
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def imports(root: str = PIPELINE) -> dict[str, dict[str, set[str]]]:
    """module -> {imported pipeline module -> names taken from it}, every import in the file."""
    known = modules(root)
    graph: dict[str, dict[str, set[str]]] = {}
    for module, path in known.items():
        is_package = path.endswith("__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        edges: dict[str, set[str]] = {}

        def add(target: str, names: set[str]) -> None:
            if target in known and target != "__init__":
                edges.setdefault(target, set()).update(names)

        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = resolve(module, is_package, node.level, node.module)
                elif node.module and (node.module == "pipeline" or node.module.startswith("pipeline.")):
                    target = node.module[len("pipeline."):] if node.module != "pipeline" else ""
                else:
                    if node.module and node.module.split(".")[0] == "jobs":
                        edges.setdefault("jobs", set())
                    continue
                names = {a.name for a in node.names}
                for a in node.names:  # from . import x: x may be a module
                    sub = f"{target}.{a.name}" if target else a.name
                    if sub in known:
                        add(sub, set())
                        names.discard(a.name)
                if names:
                    add(target, names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("pipeline."):
                        add(a.name[len("pipeline."):], set())
                    elif a.name.split(".")[0] == "jobs":
                        edges.setdefault("jobs", set())
        edges.pop(module, None)
        graph[module] = edges
    return graph


def test_every_module_lives_in_a_subpackage_or_on_the_shared_ground():
    loose = [m for m in modules() if "." not in m and m not in SHARED | {"__init__"} | set(ALLOWED)]
    assert loose == []


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_go_only_in_the_allowed_directions(part):
    wrong = [f"{m} imports {dep}" for m, deps in imports().items() if part_of(m) == part
             for dep in deps if dep == "jobs" or part_of(dep) not in ALLOWED[part] | {part}]
    assert wrong == []


def test_the_direction_check_sees_a_forbidden_import(tmp_path):
    """The check itself: a stage that imports an engine is caught (relative, two levels up)."""
    fake = tmp_path / "pipeline"
    (fake / "stages").mkdir(parents=True)
    (fake / "engines").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "stages" / "__init__.py").write_text("")
    (fake / "engines" / "__init__.py").write_text("")
    (fake / "engines" / "job.py").write_text("")
    (fake / "stages" / "read.py").write_text("def f():\n    from ..engines.job import plan\n")
    (fake / "models" ).mkdir()
    (fake / "models" / "checkpoint.py").write_text("from pipeline.stages import read\nimport jobs.cli\n")
    graph = imports(str(fake))
    assert graph["stages.read"] == {"engines.job": {"plan"}}
    assert graph["models.checkpoint"] == {"stages.read": set(), "jobs": set()}


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, {})):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_imports_another_modules_private_names():
    private = [(m, dep, n) for m, deps in imports().items() for dep, names in deps.items()
               for n in names if n.startswith("_") and n != "__version__"]
    assert private == []
