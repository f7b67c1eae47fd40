"""pgbench 15 through the real gateway.

The pgbench tables are initialised directly (admin DSN) and granted to `guard_session`;
the demo policy lets engineers read anything unprotected but write only `products`, so the
select-only script (-S) must pass in every query mode and TPC-B must be refused, naming a
rule. The tables are dropped again (as admin) when the module finishes.

Under a second stack whose policy also lets engineers write the pgbench tables, TPC-B must
run in every query mode with no failed transaction, leave the TPC-B balance invariants
intact (checked directly on PostgreSQL, and compared with the same run sent directly), and
leave one audit result record per forwarded statement.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import psycopg
import pytest

from tests.fix_stack import Stack, stack_with_rules
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


# ---------------------------------------------------------------- TPC-B under a write policy
# The demo policy plus one rule: engineers may write the four pgbench tables (only those).
PGBENCH_RULE = """
  - id: engineers-write-pgbench
    description: Engineers may run TPC-B against the pgbench tables (test policy)
    effect: allow
    groups: [engineers]
    when:
      operations: [insert, update, delete]
      writes: [public.pgbench_accounts, public.pgbench_branches,
               public.pgbench_tellers, public.pgbench_history]
"""
CLIENTS, TXNS = 3, 10  # per client; -t is per client
# The default TPC-B-like script: BEGIN, 3 UPDATEs, a SELECT, an INSERT, END.
STATEMENTS_PER_TXN = 7
INVARIANTS = """
SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts),
       (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches),
       (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers),
       (SELECT coalesce(sum(delta), 0) FROM pgbench_history),
       (SELECT count(*) FROM pgbench_history)
"""


@pytest.fixture(scope="module")
def pgbench_stack(dev_stack: Stack, tmp_path_factory):
    """A second demo stack (own GUARD_HOME, ports, cluster) whose policy lets engineers
    write the pgbench tables, initialised (scale 1) and granted to `guard_session`.
    Depends on `dev_stack` only for its skip/fail rules."""
    home = tmp_path_factory.mktemp("guard-home-pgbench")
    with stack_with_rules(dev_stack, home, PGBENCH_RULE) as stack:
        init = pgbench(clean_env(), "-i", "-s", "1", "-q", stack.admin_dsn)
        assert init.returncode == 0, init.stderr
        with psycopg.connect(stack.admin_dsn, autocommit=True) as conn:
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLES} TO guard_session")
        yield stack


def tpcb_state(stack: Stack) -> tuple[int, int, int, int, int]:
    """(sum abalance, sum bbalance, sum tbalance, sum delta, history rows), read directly."""
    with psycopg.connect(stack.admin_dsn) as conn:
        return conn.execute(INVARIANTS).fetchone()


def assert_tpcb_run(out: subprocess.CompletedProcess[str], stack: Stack, before, mode: str):
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"query mode: {mode}" in out.stdout, out.stdout
    total = CLIENTS * TXNS
    assert f"number of transactions actually processed: {total}/{total}" in out.stdout, out.stdout
    assert "number of failed transactions: 0 " in out.stdout, out.stdout
    after = tpcb_state(stack)
    accounts, branches, tellers, deltas, history = after
    # TPC-B: every transaction adds the same delta to one account, teller and branch and
    # records it in history, so the four sums stay equal, whatever the deltas were.
    assert accounts == branches == tellers == deltas, after
    assert history - before[4] == total, (before, after)
    return after


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_tpcb_runs_like_direct_in_every_query_mode(pgbench_stack: Stack, mode):
    stack = pgbench_stack
    args = ("-n", "-M", mode, "-t", str(TXNS), "-c", str(CLIENTS))
    body, headers = stack.open_session()
    try:
        before = tpcb_state(stack)
        assert before[0] == before[1] == before[2] == before[3], before
        out = pgbench(stack.libpq_env(body), *args)
        after = assert_tpcb_run(out, stack, before, mode)
        # The same run sent directly, on the same tables.
        direct = pgbench(clean_env(), *args, stack.admin_dsn)
        assert_tpcb_run(direct, stack, after, mode)
        assert_one_result_per_statement(stack, body["session_id"])
    finally:
        stack.end_session(body["session_id"], headers)


def assert_one_result_per_statement(stack: Stack, session_id: str) -> None:
    """Every statement the gateway let through for this session has exactly one result
    record (outcome ok), and every TPC-B statement of every transaction was recorded."""
    deadline = time.monotonic() + 5  # result records are flushed every 200 ms
    while True:
        records = [r for r in stack.audit_records() if r.get("session_id") == session_id]
        allowed = {
            r["seq"]: r for r in records if r["kind"] == "statement" and r["verdict"] == "allow"
        }
        results = [r for r in records if r["kind"] == "result"]
        if len(results) >= len(allowed) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    tpcb = [r for r in allowed.values() if "pgbench_" in r["statement"]]
    # Per transaction: 3 UPDATEs, 1 SELECT and 1 INSERT name a pgbench table.
    assert len(tpcb) >= CLIENTS * TXNS * 5, len(tpcb)
    assert len(allowed) >= CLIENTS * TXNS * STATEMENTS_PER_TXN, len(allowed)
    assert not [r for r in records if r["kind"] == "statement" and r["verdict"] != "allow"]
    by_statement: dict[int, list[dict]] = {}
    for r in results:
        by_statement.setdefault(r["statement_seq"], []).append(r)
    assert sorted(by_statement) == sorted(allowed), "a statement without exactly one result"
    assert all(len(v) == 1 for v in by_statement.values())
    assert {r["outcome"] for r in results} == {"ok"}
    total = CLIENTS * TXNS
    for verb, table in (
        ("UPDATE", "pgbench_accounts"),
        ("UPDATE", "pgbench_tellers"),
        ("UPDATE", "pgbench_branches"),
        ("INSERT", "pgbench_history"),
    ):
        ran = [
            r
            for r in tpcb
            if r["statement"].lstrip().upper().startswith(verb) and table in r["statement"]
        ]
        assert len(ran) == total, (verb, table, len(ran))
        # Each changed exactly one row, as the command tag said.
        assert {by_statement[r["seq"]][0]["rows"] for r in ran} == {1}, (verb, table)
