"""The shape of pipeline/: no import cycles (lazy imports inside functions count), and no
module reaching into another's private names. Read from the source with `ast`."""

from __future__ import annotations

import ast
import os

PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline")


def imports() -> dict[str, dict[str, set[str]]]:
    """module -> {imported pipeline module -> names taken from it}, every import in the file."""
    graph: dict[str, dict[str, set[str]]] = {}
    for name in sorted(os.listdir(PIPELINE)):
        if not name.endswith(".py"):
            continue
        module = name[:-3]
        tree = ast.parse(open(os.path.join(PIPELINE, name), encoding="utf-8").read())
        edges: dict[str, set[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .x import a
                    edges.setdefault(node.module.split(".")[0], set()).update(a.name for a in node.names)
                elif node.level == 1:  # from . import x, y
                    for a in node.names:
                        edges.setdefault(a.name, set())
                elif node.module and node.module.startswith("pipeline."):
                    edges.setdefault(node.module.split(".")[1], set()).update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("pipeline."):
                        edges.setdefault(a.name.split(".")[1], set())
        edges.pop("__init__", None)
        graph[module] = {k: v for k, v in edges.items() if os.path.exists(os.path.join(PIPELINE, k + ".py"))}
    return graph


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
