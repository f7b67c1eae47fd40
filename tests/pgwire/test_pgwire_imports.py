"""guard/broker/pgwire is stdlib-only (DESIGN.md §4) and every module says what it does."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "guard" / "broker" / "pgwire"
MODULES = sorted(PACKAGE.rglob("*.py"))
ALLOWED = set(sys.stdlib_module_names) | {"__future__"}


def test_the_package_has_its_modules() -> None:
    names = {p.name for p in MODULES}
    assert {
        "__init__.py",
        "messages.py",
        "parser.py",
        "encoder.py",
        "scram.py",
        "errors.py",
    } <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_only_stdlib_or_relative_imports(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] not in ALLOWED]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:
                continue  # within pgwire
            module = node.module or ""
            if module.split(".")[0] not in ALLOWED:
                bad.append(module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            bad.append("__import__(...)")
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_module_opens_with_a_docstring(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring, f"{path.name} has no module docstring"
    assert "stdlib" in docstring.lower(), f"{path.name} does not state its import rule"
