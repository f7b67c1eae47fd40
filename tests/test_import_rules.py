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


@pytest.mark.parametrize("module", ["broker/audit/checkpoint.py", "broker/audit/verify.py"])
def test_audit_verifier_needs_no_broker(module):
    # What the CLI may import for offline verification: stdlib, cryptography, each other.
    permitted = ("cryptography", "guard.broker.audit.chain", "guard.broker.audit.checkpoint")
    bad = {n for n in imports_of(ROOT / module) if not allowed(n, permitted)}
    assert not bad, f"{module} imports {sorted(bad)}"


# The sans-IO gateway core: it returns commands, the shell (proxy.pump) executes them.
CORE = [
    "broker/proxy/connection.py",
    "broker/proxy/gate.py",
    "broker/proxy/names.py",
    "broker/proxy/commands.py",
    "broker/proxy/encoding.py",
    "broker/proxy/events.py",
    "broker/approvals/model.py",
    "broker/audit/serialize.py",
    "broker/audit/record.py",
    "broker/audit/chain.py",
    "broker/audit/checkpoint.py",
    "broker/audit/verify.py",
]
PURE = [str(p.relative_to(ROOT)) for pkg in RULES for p in modules(pkg)] + CORE

# Modules that reach the network, files, other processes or the OS, or that write
# anywhere (logging's handlers do): none of them may appear in the pure code. The core
# hands log lines to the shell as commands instead.
IO_MODULES = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "select",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "subprocess",
    "multiprocessing",
    "threading",
    "sqlite3",
    "logging",
    "urllib",
    "http",
    "mmap",
    "fcntl",
    "signal",
    "sys",
    "glob",
    "fileinput",
}
IO_BUILTINS = {"open", "print", "input", "breakpoint", "exec", "eval", "compile", "__import__"}


def io_uses(path: Path) -> set[str]:
    """I/O-capable modules imported, and I/O builtins called, anywhere in the module."""
    tree = ast.parse(path.read_text())
    found = {n for n in imports_of(path) if n.split(".")[0] in IO_MODULES}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in IO_BUILTINS
        ):
            found.add(f"{node.func.id}()")
    return found


# The policy file is read at one place: load_policy_file, the edge the broker, the CLI and
# the dev stack call; everything after it is pure. (It is the only exception, and named.)
IO_ALLOWED = {"broker/policy/compile.py": {"os", "open()"}}


@pytest.mark.parametrize("module", PURE)
def test_pure_packages_and_the_core_do_no_io(module):
    found = io_uses(ROOT / module) - IO_ALLOWED.get(module, set())
    assert not found, f"{module} uses {sorted(found)}"


def test_the_io_check_sees_io():
    # The check itself must be able to fail: the shell does I/O and must be flagged.
    assert {"asyncio", "logging", "ssl"} <= io_uses(ROOT / "broker/proxy/pump.py")
    assert "os" in io_uses(ROOT / "broker/audit/sink.py")


def test_cli_imports_only_api_schemas_from_broker():
    # `guard policy check` may use the pure policy compiler (offline validation), and
    # `guard audit verify|pubkey` the audit verifier: an examiner checks a copied log with the
    # public key alone, so verification must not need the broker (or its dependencies).
    permitted = (
        "guard.broker.api.schemas",
        "guard.broker.policy",
        "guard.broker.audit.verify",
        "guard.broker.audit.chain",
        "guard.broker.audit.checkpoint",
    )
    for path in ROOT.joinpath("cli").rglob("*.py"):
        broker = {n for n in imports_of(path) if n.startswith("guard.broker")}
        bad = {n for n in broker if not any(n == p or n.startswith(p + ".") for p in permitted)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
