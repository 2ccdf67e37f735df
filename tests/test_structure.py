"""The package's shape (issue 11): no import cycles between the modules of
``flask_execute`` — none hidden behind ``TYPE_CHECKING`` or imports inside functions
either — no private name of one module used by another, and no module over the size
a reader can hold in mind."""

from __future__ import annotations

import ast
import pathlib

import flask_execute

PACKAGE = pathlib.Path(flask_execute.__file__).parent
MAX_LINES = 420


def modules() -> dict[str, ast.Module]:
    return {
        path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))
    }


def imported(name: str, tree: ast.Module) -> dict[str, set[str]]:
    """module -> names it imports from each sibling module (every import statement,
    wherever it is: module level, functions, ``if TYPE_CHECKING`` blocks)."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                target = node.module or ""
                if not target:  # from . import x
                    for alias in node.names:
                        found.setdefault(alias.name, set())
                    continue
                found.setdefault(target.split(".")[0], set()).update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("flask_execute."):
                target = node.module.split(".")[1]  # type: ignore[union-attr]
                found.setdefault(target, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("flask_execute."):
                    found.setdefault(alias.name.split(".")[1], set())
    found.pop(name, None)
    return found


def graph() -> dict[str, dict[str, set[str]]]:
    trees = modules()
    return {name: imported(name, tree) for name, tree in trees.items()}


def test_no_import_cycles() -> None:
    edges = {name: set(targets) - {"__init__"} for name, targets in graph().items()}
    edges.pop("__init__", None)  # re-exports only
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_type_checking_imports_of_our_modules() -> None:
    offenders = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.level >= 1:
                        offenders.append(f"{name}: from .{inner.module} import ...")
    assert not offenders


def test_no_private_names_across_modules() -> None:
    offenders = [
        f"{name} imports {target}.{imported_name}"
        for name, targets in graph().items()
        for target, names in targets.items()
        for imported_name in names
        if imported_name.startswith("_") and not imported_name.startswith("__")
    ]
    assert not offenders


def test_modules_stay_small() -> None:
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
