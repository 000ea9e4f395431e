"""The package's shape: docs/layout.md lists every module once, and each imports only modules listed
before it (so the import graph has no cycles and no upward arrows); no function runs past one screen."""

import ast
import re

from conftest import REPO

PACKAGE = REPO / "coco_accel"
LONGEST_FUNCTION = 60  # lines, decorators excluded


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.glob("*.py"))
            if p.stem != "__init__"}


def _package_imports(tree: ast.Module) -> set[str]:
    """The package modules a module imports anywhere in it, function-level imports included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("coco_accel"):
            found.update([node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("coco_accel."))
    return found


def _documented_order() -> tuple[list[str], set[str]]:
    """(every module in the order docs/layout.md lists them, those listed under Foundations)."""
    order, foundations, section = [], set(), ""
    for line in (REPO / "docs" / "layout.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line
        match = re.match(r"\| `(\w+)\.py` \|", line)
        if match:
            order.append(match.group(1))
            if section.startswith("## Foundations"):
                foundations.add(match.group(1))
    return order, foundations


def test_every_module_is_listed_once_and_imports_only_earlier_ones():
    modules = _modules()
    order, foundations = _documented_order()
    assert sorted(order) == sorted(modules), "docs/layout.md must list each module of coco_accel/ exactly once"
    position = {name: i for i, name in enumerate(order)}
    upward = {name: sorted(m for m in _package_imports(tree) if position.get(m, len(order)) >= position[name])
              for name, tree in modules.items()}
    assert {name: later for name, later in upward.items() if later} == {}
    assert {name: sorted(_package_imports(modules[name])) for name in foundations
            if _package_imports(modules[name])} == {}


def test_no_function_is_longer_than_a_screen():
    lengths = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1
               for name, tree in _modules().items() for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {f: n for f, n in lengths.items() if n > LONGEST_FUNCTION} == {}
