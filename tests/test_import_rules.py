"""Import rules of DESIGN.md §4, enforced: pure packages stay pure, the CLI stays thin."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "guard"
STDLIB = set(sys.stdlib_module_names)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    top = name.split(".")[0]
    return (
        top in STDLIB
        or top == "__future__"
        or any(name == p or name.startswith(p + ".") for p in prefixes)
    )


RULES = {
    "broker/pgwire": (),
    "broker/sql": ("pglast",),
    "broker/policy": (
        "pglast",
        "pydantic",
        "yaml",
        "guard.broker.sql",
        "guard.broker.pgwire.messages",
        "guard.broker.identity.principal",
        "guard.broker.policy",
        "guard.broker.masking.strategies",
    ),
    "broker/masking": (
        "guard.broker.sql",
        "guard.broker.pgwire.messages",
        "guard.broker.policy",
        "guard.broker.masking",
    ),
}


@pytest.mark.parametrize("package", sorted(RULES))
def test_pure_packages_import_only_what_they_may(package):
    assert modules(package), f"{package} has no modules"
    for path in modules(package):
        bad = {n for n in imports_of(path) if not allowed(n, RULES[package])}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_audit_chain_is_stdlib_only():
    bad = {n for n in imports_of(ROOT / "broker/audit/chain.py") if not allowed(n, ())}
    assert not bad


@pytest.mark.parametrize("module", ["broker/proxy/session.py", "broker/proxy/gate.py"])
def test_session_logic_has_no_networking(module):
    names = imports_of(ROOT / module)
    assert not {n for n in names if n.split(".")[0] in {"asyncio", "socket", "ssl", "selectors"}}


def test_cli_imports_only_api_schemas_from_broker():
    # `guard policy check` may use the pure policy compiler (offline validation).
    permitted = ("guard.broker.api.schemas", "guard.broker.policy")
    for path in ROOT.joinpath("cli").rglob("*.py"):
        broker = {n for n in imports_of(path) if n.startswith("guard.broker")}
        bad = {n for n in broker if not any(n == p or n.startswith(p + ".") for p in permitted)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
