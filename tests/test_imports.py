"""Imports run one way: no two modules of the package import each other when they load."""

from __future__ import annotations

import ast
from pathlib import Path

import splitprefix

ROOT = Path(splitprefix.__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def load_time_imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports at module level (not in functions, not for typing)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_the_package_has_no_import_cycles():
    # Prepare
    paths = {module_name(p): p for p in (ROOT / "splitprefix").rglob("*.py")}
    graph = {m: load_time_imports(p, set(paths)) for m, p in paths.items()}

    # Execute: depth-first search for a back edge
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state[target] == 1:
                cycles.append([*path[path.index(target) :], target])
            elif state[target] == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [module])

    # Assert
    assert len(graph) > 50  # the walk found the package
    assert cycles == []
