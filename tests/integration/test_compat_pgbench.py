"""pgbench 15 through the real gateway.

The pgbench tables are initialised directly (admin DSN) and granted to `guard_session`;
the demo policy lets engineers read anything unprotected but write only `products`, so the
select-only script (-S) must pass in every query mode and TPC-B must be refused, naming a
rule. The tables are dropped again (as admin) when the module finishes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import psycopg
import pytest

from tests.fix_stack import Stack
from tests.integration.test_gateway import session  # noqa: F401 - module-scoped fixture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench not on PATH"),
]
TABLES = "pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


@pytest.fixture(scope="module")
def pgbench_tables(dev_stack: Stack):
    def drop():
        with psycopg.connect(dev_stack.admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {TABLES}")

    drop()
    init = subprocess.run(
        ["pgbench", "-i", "-s", "1", "-q", dev_stack.admin_dsn],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert init.returncode == 0, init.stderr
        with psycopg.connect(dev_stack.admin_dsn, autocommit=True) as conn:
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLES} TO guard_session")
        yield
    finally:
        drop()


@pytest.fixture(scope="module")
def gw_env(dev_stack: Stack, session, pgbench_tables):  # noqa: F811
    return dev_stack.libpq_env(session)


def pgbench(env: dict, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pgbench", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_select_only_passes_in_every_query_mode(dev_stack: Stack, gw_env, mode):
    out = pgbench(gw_env, "-n", "-M", mode, "-S", "-t", "50", "-c", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"query mode: {mode}" in out.stdout
    assert re.search(r"number of transactions actually processed: 100/100", out.stdout), out.stdout
    assert "number of failed transactions: 0" in out.stdout
    # The same run sent directly succeeds too (a sanity check of the setup).
    direct = pgbench(clean_env(), "-n", "-M", mode, "-S", "-t", "5", dev_stack.admin_dsn)
    assert direct.returncode == 0, direct.stderr


@pytest.mark.parametrize("mode", ["simple", "prepared"])
def test_tpcb_is_refused_naming_a_rule(dev_stack: Stack, gw_env, mode):
    with psycopg.connect(dev_stack.admin_dsn) as conn:
        before = conn.execute(
            "SELECT sum(abalance), (SELECT count(*) FROM pgbench_history) FROM pgbench_accounts"
        ).fetchone()
    out = pgbench(gw_env, "-n", "-M", mode, "-t", "5")
    assert out.returncode != 0, out.stdout
    assert "aborted" in out.stderr
    assert re.search(r'refused by rule "[^"]+"', out.stderr), out.stderr
    assert "pgbench_" in out.stderr or "default-deny" in out.stderr
    with psycopg.connect(dev_stack.admin_dsn) as conn:
        after = conn.execute(
            "SELECT sum(abalance), (SELECT count(*) FROM pgbench_history) FROM pgbench_accounts"
        ).fetchone()
    assert after == before
