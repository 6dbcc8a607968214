"""The package's shape: no import cycles between its modules, no private names imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unsloth_nb"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import anywhere in the module, lazy ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if target in known:  # "from unsloth_nb.gguf import convert": the submodule itself
                    found.append((target, []))
                elif node.module in known:
                    found.append((node.module, [alias.name]))
    return [(m, names) for m, names in found if m != name]


def test_no_import_cycles() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: {m for m, _ in _imports(name, tree, known) if m.startswith("unsloth_nb")}
             for name, tree in modules.items()}
    for name in graph:  # a package's __init__ is imported with any of its submodules: it may not import them back
        graph[name] -= {n for n in graph if name.startswith(n + ".") and n != "unsloth_nb"}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_no_private_names_across_modules() -> None:
    modules = _modules()
    known = set(modules)
    taken = [f"{name} imports {m}.{n}" for name, tree in modules.items()
             for m, names in _imports(name, tree, known) for n in names if n.startswith("_") and m != "__future__"]
    assert not taken, "\n".join(taken)
