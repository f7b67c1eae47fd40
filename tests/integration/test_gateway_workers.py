"""The gateway in several worker processes (`gateway.workers: 2`) through the real stack.

The kernel spreads connections over the workers (SO_REUSEPORT); the broker stays the one
truth about sessions. Checked: both workers relay and mask, each into its own verified
audit chain that the broker's log names; ending a session closes its connections in every
worker within a second; the per-session connection limit counts across workers; a cancel
reaches its connection whichever worker the kernel hands it to; a held statement is
approved through the broker; a worker killed is replaced; a broker killed takes its
workers with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.fix_stack import DEMO_POLICY, Stack, gateway_connect, stack_with_policy

pytestmark = pytest.mark.integration

LIMIT = 6
POLICY = DEMO_POLICY.read_text().replace(
    "    connect_groups: [engineers, security-leads, service]\n",
    "    connect_groups: [engineers, security-leads, service]\n"
    f"    max_connections_per_session: {LIMIT}\n",
)


@pytest.fixture(scope="module")
def stack(dev_stack: Stack, tmp_path_factory) -> Stack:
    base = Stack(
        home=dev_stack.home,
        status=dev_stack.status,
        env={**dev_stack.env, "GUARD_DEV_GATEWAY_WORKERS": "2"},
    )
    assert f"max_connections_per_session: {LIMIT}" in POLICY
    with stack_with_policy(base, tmp_path_factory.mktemp("workers"), POLICY) as stack:
        yield stack


def _workers(stack: Stack) -> list[int]:
    broker = stack.status["pids"]["broker"]
    out = subprocess.run(
        ["pgrep", "-P", str(broker), "-f", "guard.broker.proxy.worker"],
        capture_output=True,
        text=True,
    )
    return sorted(int(pid) for pid in out.stdout.split())


def _worker_logs(stack: Stack) -> list[Path]:
    return sorted(stack.audit_path.parent.glob("audit.gateway-*.jsonl"))


def _records(path: Path) -> list[dict]:
    from guard.broker.audit.record import expand

    return [
        r
        for line in path.read_text().splitlines()
        if line
        for r in expand(json.loads(line)["body"])
    ]


def _connect_all(session: dict, count: int) -> list[psycopg.Connection]:
    return [gateway_connect(session, autocommit=True) for _ in range(count)]


def test_both_workers_relay_and_mask_into_their_own_verified_chains(stack: Stack):
    session, _headers = stack.open_session()
    conns = _connect_all(session, LIMIT)
    try:
        for conn in conns:
            (ssn,) = conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()
            assert ssn.startswith("***-**-")  # masked on every worker
    finally:
        for conn in conns:
            conn.close()
    logs = _worker_logs(stack)
    assert [p.name for p in logs] == ["audit.gateway-0.jsonl", "audit.gateway-1.jsonl"]
    time.sleep(0.5)  # result records are flushed every 200 ms
    statements = {
        p.name: [
            r
            for r in _records(p)
            if r.get("kind") == "statement" and r["session_id"] == session["session_id"]
        ]
        for p in logs
    }
    # Each statement is in the log of the worker that relayed it (which one is the
    # kernel's choice: SO_REUSEPORT hashes the client's address and port).
    assert sum(len(v) for v in statements.values()) == LIMIT
    opened = [r for r in stack.audit_records() if r.get("event") == "gateway-log-opened"]
    assert {r["detail"].split(": ")[-1] for r in opened} >= {str(p) for p in logs}
    for path in logs:
        # The broker's public key, found beside the broker's log without --pubkey.
        verify = stack.guard("audit", "verify", str(path))
        assert verify.returncode == 0, verify.stdout + verify.stderr


def test_ending_a_session_closes_its_connections_in_every_worker_within_a_second(stack: Stack):
    session, headers = stack.open_session()
    conns = _connect_all(session, 4)
    ended_at: list[float] = []

    def wait_for_end(conn: psycopg.Connection) -> None:
        try:
            conn.execute("SELECT pg_sleep(30)")
        except psycopg.OperationalError:
            ended_at.append(time.monotonic())

    threads = [threading.Thread(target=wait_for_end, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert stack.end_session(session["session_id"], headers).status_code == 204
    for t in threads:
        t.join(10)
    assert len(ended_at) == 4
    assert max(ended_at) - start < 1.0, f"{max(ended_at) - start:.2f} s"
    with pytest.raises(psycopg.OperationalError):
        gateway_connect(session)


def test_the_connection_limit_counts_across_workers(stack: Stack):
    session, _headers = stack.open_session()
    conns = _connect_all(session, LIMIT)
    try:
        with pytest.raises(psycopg.OperationalError, match="its limit"):
            gateway_connect(session)
        conns.pop().close()
        time.sleep(0.2)  # the release notice reaches the broker
        conns.append(gateway_connect(session))  # a freed slot is free on any worker
    finally:
        for conn in conns:
            conn.close()


def test_cancels_reach_their_connection_whichever_worker_takes_them(stack: Stack):
    session, _headers = stack.open_session()
    conns = _connect_all(session, LIMIT)
    try:
        for conn in conns:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            assert time.monotonic() - started < 5
    finally:
        for conn in conns:
            conn.close()


def test_a_statement_held_in_a_worker_is_approved_through_the_broker(stack: Stack):
    from tests.integration.test_approvals import Client, _api, _session

    session = _session(stack)
    client = Client(session, stack.status["gateway_ca"]).start()
    request_id = client.request_id()
    decided = _api(
        stack, "POST", f"/v1/approvals/{request_id}/approve", "bob", json={"comment": "ok"}
    )
    assert decided.status_code == 200, decided.text
    rows, error = client.result()
    assert error is None and rows and rows[0][0] > 0
    client.conn.close()


def test_a_killed_worker_is_replaced_and_health_says_so_meanwhile(stack: Stack):
    before = _workers(stack)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        now = _workers(stack)
        if len(now) == 2 and before[0] not in now:
            break
        assert time.monotonic() < deadline, f"not replaced: {now}"
        time.sleep(0.1)
    session, _headers = stack.open_session()
    conns = _connect_all(session, 4)  # both workers serve again
    for conn in conns:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.close()
    closed = [r for r in stack.audit_records() if r.get("event") == "gateway-log-closed"]
    assert any(f"pid {before[0]}" in r["detail"] for r in closed)


def test_workers_stop_when_their_broker_is_killed(dev_stack: Stack, tmp_path_factory):
    base = Stack(
        home=dev_stack.home,
        status=dev_stack.status,
        env={**dev_stack.env, "GUARD_DEV_GATEWAY_WORKERS": "2"},
    )
    with stack_with_policy(base, tmp_path_factory.mktemp("orphans"), POLICY) as stack:
        session, _headers = stack.open_session()
        conn = gateway_connect(session, autocommit=True)
        workers = _workers(stack)
        assert len(workers) == 2
        os.kill(stack.status["pids"]["broker"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "a worker outlived its broker"
            time.sleep(0.1)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its dead parent's reaper) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_an_apply_reaches_every_worker_at_once(stack: Stack):
    """A view created and twinned by `guard target apply` reads masked by its qualified
    name at the very next connection, whichever worker takes it (each worker's cached
    catalog facts are dropped on the apply, not after their minute)."""
    bob = {"GUARD_ID_TOKEN": stack.guard("dev", "token", "bob").stdout.strip()}
    with psycopg.connect(stack.admin_dsn, autocommit=True) as admin:
        admin.execute("CREATE VIEW public.v_worker_emails AS SELECT id, email FROM customers")
    try:
        body, headers = stack.open_session()  # every worker caches the catalog now
        for _ in range(4):
            with gateway_connect(body) as conn:
                conn.execute("SELECT 1").fetchone()
        applied = stack.guard("target", "apply", "demo", env=bob)
        assert applied.returncode == 0, applied.stderr + applied.stdout
        for _ in range(6):  # the kernel spreads these over both workers
            with gateway_connect(body) as conn:
                row = conn.execute(
                    "SELECT email FROM public.v_worker_emails WHERE id = 1"
                ).fetchone()
            assert row == ("a***@example.com",)
        stack.end_session(body["session_id"], headers)
    finally:
        with psycopg.connect(stack.admin_dsn, autocommit=True) as admin:
            admin.execute("DROP VIEW public.v_worker_emails CASCADE")
        stack.guard("target", "apply", "demo", env=bob)
