"""Asynchronous and bulk backend traffic through the real gateway: LISTEN/NOTIFY
notifications passed through to the client, and a large result to a client that stops
reading, which must throttle the upstream instead of piling up in the broker's memory."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from psycopg import pq

from tests.fix_stack import Stack, stack_with_rules
from tests.integration.test_gateway import connect, session  # noqa: F401 - module fixture

pytestmark = pytest.mark.integration

# The demo policy plus one rule: engineers may LISTEN (NOTIFY stays refused).
LISTEN_RULE = """
  - id: engineers-listen
    description: Engineers may wait for notifications (test policy)
    effect: allow
    groups: [engineers]
    when: {operations: [listen]}
"""


@pytest.fixture(scope="module")
def listen_stack(dev_stack: Stack, tmp_path_factory):
    """A second demo stack (own GUARD_HOME, ports, cluster) whose policy allows LISTEN.
    Depends on `dev_stack` only for its skip/fail rules when PostgreSQL or OpenBao is
    missing."""
    home = tmp_path_factory.mktemp("guard-home-listen")
    with stack_with_rules(dev_stack, home, LISTEN_RULE) as stack:
        yield stack


def test_notification_reaches_the_listening_client(listen_stack: Stack):
    body, headers = listen_stack.open_session()
    try:
        with (
            connect(body, autocommit=True) as conn,
            psycopg.connect(listen_stack.admin_dsn, autocommit=True) as admin,
        ):
            conn.execute("LISTEN guard_chan")
            # NOTIFY is still refused: only the listen operation was allowed.
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute("NOTIFY guard_chan, 'from the gateway'")
            assert refused.value.sqlstate == "42501"
            assert "default-deny" in str(refused.value)
            admin.execute("NOTIFY other_chan, 'not for us'")
            admin.execute("SELECT pg_notify('guard_chan', 'payload 1 ✓')")
            admin.execute("NOTIFY guard_chan, 'payload 2'")
            start = time.monotonic()
            got = list(conn.notifies(timeout=10, stop_after=2))
            assert time.monotonic() - start < 10, "notifications did not arrive in time"
            assert [(n.channel, n.payload, n.pid) for n in got] == [
                ("guard_chan", "payload 1 ✓", admin.info.backend_pid),
                ("guard_chan", "payload 2", admin.info.backend_pid),
            ]
            # A notification arriving while the client is idle between statements is
            # delivered with the next statement's results.
            admin.execute("NOTIFY guard_chan, 'while idle'")
            time.sleep(0.5)
            seen: list[tuple[str, str]] = []

            def handler(n: psycopg.Notify) -> None:
                seen.append((n.channel, n.payload))

            conn.add_notify_handler(handler)
            assert conn.execute("SELECT 1").fetchone() == (1,)
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                conn.execute("SELECT 1")
                time.sleep(0.1)
            assert seen == [("guard_chan", "while idle")]
            conn.remove_notify_handler(handler)
            conn.execute("UNLISTEN *")
            admin.execute("NOTIFY guard_chan, 'after unlisten'")
            assert list(conn.notifies(timeout=1)) == []
    finally:
        listen_stack.end_session(body["session_id"], headers)


def test_demo_policy_refuses_listen_with_42501(session):  # noqa: F811
    with connect(session, autocommit=True) as conn:
        for statement in ("LISTEN guard_chan", "NOTIFY guard_chan, 'x'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute(statement)
            assert refused.value.sqlstate == "42501"
            assert "default-deny" in str(refused.value)
        # The connection stays usable after the refusals.
        assert conn.execute("SELECT 1").fetchone() == (1,)


ROWS = 200_000
WIDTH = 1000
BIG_QUERY = f"SELECT repeat('x', {WIDTH}) FROM generate_series(1, {ROWS})"  # ~200 MB
MAX_GROWTH = 64 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def backend_state(admin: psycopg.Connection) -> tuple[str, str | None] | None:
    row = admin.execute(
        "SELECT state, wait_event FROM pg_stat_activity WHERE query = %s", (BIG_QUERY,)
    ).fetchone()
    return None if row is None else (row[0], row[1])


def test_slow_client_throttles_upstream_and_bounds_broker_memory(
    dev_stack: Stack,
    session,  # noqa: F811
):
    broker = int(dev_stack.status["pids"]["broker"])
    with (
        connect(session, autocommit=True) as conn,
        psycopg.connect(dev_stack.admin_dsn, autocommit=True) as admin,
    ):
        assert conn.execute("SELECT 1").fetchone() == (1,)
        baseline = rss(broker)
        pg = conn.pgconn
        pg.send_query(BIG_QUERY.encode())
        assert pg.set_single_row_mode() is None
        while pg.flush():
            time.sleep(0.01)
        # The client now reads nothing. Once the socket buffers and the gateway's write
        # buffer are full, the gateway must stop reading upstream, so the backend blocks
        # writing to its client (wait_event ClientWrite) with the query unfinished.
        deadline = time.monotonic() + 30
        while backend_state(admin) != ("active", "ClientWrite"):
            assert time.monotonic() < deadline, (
                f"backend never blocked on its client: {backend_state(admin)}"
            )
            time.sleep(0.1)
        peak = baseline
        for _ in range(20):
            peak = max(peak, rss(broker))
            time.sleep(0.1)
        # Still blocked: the upstream is throttled, not merely slow to start.
        assert backend_state(admin) == ("active", "ClientWrite")
        assert peak - baseline < MAX_GROWTH, f"broker RSS grew by {(peak - baseline) >> 20} MiB"

        # Now read everything: every row arrives, in order and intact.
        count = 0
        while (result := pg.get_result()) is not None:
            if result.status == pq.ExecStatus.SINGLE_TUPLE:
                if count == 0:
                    assert result.get_value(0, 0) == b"x" * WIDTH
                count += 1
            else:
                assert result.status == pq.ExecStatus.TUPLES_OK, result.error_message
        assert count == ROWS
        peak = max(peak, rss(broker))
        assert peak - baseline < MAX_GROWTH, f"broker RSS grew by {(peak - baseline) >> 20} MiB"
        assert conn.execute("SELECT 2").fetchone() == (2,)
