"""Approvals through the real stack: alice's read of `transactions` is held by the gateway,
security leads decide it through the broker API, and the database enforces the grant.

The dev users: alice (engineers) asks, bob and carol (security-leads) decide. The demo
policy approves for a 30-minute window; a second stack whose rule has no window shows the
one-statement scope (the grant is gone from pg_auth_members once the statement ran).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.fix_stack import DEMO_POLICY, Stack, gateway_connect, stack_with_policy

pytestmark = pytest.mark.integration

TX = "SELECT count(*) FROM transactions"


def _token(stack: Stack, user: str) -> dict[str, str]:
    token = stack.guard("dev", "token", user)
    assert token.returncode == 0, token.stderr
    return {"Authorization": f"Bearer {token.stdout.strip()}"}


def _api(stack: Stack, method: str, path: str, user: str, **kwargs) -> httpx.Response:
    url = f"{stack.status['broker_url']}{path}"
    return httpx.request(
        method, url, headers=_token(stack, user), timeout=30, verify=stack.broker_tls(), **kwargs
    )


class Client:
    """A connection through the gateway that runs statements in a thread, so the test can
    decide what they wait for meanwhile: their notices, rows or error."""

    def __init__(self, session: dict, ca: str) -> None:
        self.conn = gateway_connect({**session, "gateway_ca": ca}, autocommit=True)
        self.conn.add_notice_handler(lambda n: self.notices.append(n.message_primary or ""))
        self.notices: list[str] = []

    def start(self, sql: str = TX) -> Client:
        self.notices, self.rows, self.error = [], None, None
        self.thread = threading.Thread(target=self._run, args=(sql,), daemon=True)
        self.thread.start()
        return self

    def _run(self, sql: str) -> None:
        try:
            self.rows = self.conn.execute(sql).fetchall()
        except Exception as exc:  # noqa: BLE001 - the test reads it
            self.error = exc

    def request_id(self, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while not self.notices:
            assert time.monotonic() < deadline, "no NoticeResponse naming the request"
            time.sleep(0.05)
        words = self.notices[0].split()
        return words[words.index("request") + 1]

    def result(self, timeout: float = 30) -> tuple[list[tuple] | None, Exception | None]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the held statement never finished"
        return self.rows, self.error


def _session(stack: Stack, user: str = "alice", reason: str = "INC-123") -> dict:
    created = _api(stack, "POST", "/v1/sessions", user, json={"target": "demo", "reason": reason})
    assert created.status_code == 201, created.text
    return created.json()


def _members(stack: Stack, role: str) -> list[str]:
    rows = stack.direct(
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
        " JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s"
        " AND g.rolname LIKE 'guard_approved_%%'",
        (role,),
    )
    return [name for (name,) in rows]


def test_alice_is_held_cannot_approve_herself_and_bob_approves(dev_stack: Stack):
    ca = dev_stack.status["gateway_ca"]
    session = _session(dev_stack)
    held = Client(session, ca).start()
    request_id = held.request_id()
    assert "security-leads" in held.notices[0] or "approval" in held.notices[0]

    # The requester sees her request but may not decide it, under any spelling.
    mine = _api(dev_stack, "GET", "/v1/requests", "alice").json()
    assert [r["id"] for r in mine][:1] == [request_id] and mine[0]["state"] == "pending"
    refused = _api(dev_stack, "POST", f"/v1/approvals/{request_id}/approve", "alice", json={})
    assert refused.status_code == 403 and "segregation of duties" in refused.json()["message"]
    assert held.thread.is_alive()  # still waiting

    pending = _api(dev_stack, "GET", "/v1/approvals", "bob").json()
    (shown,) = [r for r in pending if r["id"] == request_id]
    assert shown["session_reason"] == "INC-123" and shown["requester"] == "alice"
    assert shown["tables"] == ["public.transactions"] and shown["can_decide"] is True
    approved = _api(
        dev_stack, "POST", f"/v1/approvals/{request_id}/approve", "bob", json={"comment": "ok"}
    )
    assert approved.status_code == 200 and approved.json()["state"] == "approved"

    rows, error = held.result()
    assert error is None and rows and rows[0][0] > 0  # the rows of transactions arrive
    # Within the demo rule's 30-minute window a second read runs without a new request.
    assert held.conn.execute(TX).fetchone()[0] == rows[0][0]
    held.conn.close()

    events = [
        (r["event"], r["actor"])
        for r in dev_stack.audit_records()
        if r.get("kind") == "approval" and r["request_id"] == request_id
    ]
    assert [e for e, _ in events][:4] == ["requested", "vote-approve", "approved", "granted"]


def test_carols_denial_reaches_alice_and_her_next_statement_works(dev_stack: Stack):
    ca = dev_stack.status["gateway_ca"]
    session = _session(dev_stack, reason="denial test")
    held = Client(session, ca).start()
    request_id = held.request_id()
    denied = _api(
        dev_stack,
        "POST",
        f"/v1/approvals/{request_id}/deny",
        "carol",
        json={"comment": "not during the audit"},
    )
    assert denied.status_code == 200 and denied.json()["state"] == "denied"
    rows, error = held.result()
    assert rows is None and isinstance(error, psycopg.errors.InsufficientPrivilege)
    assert "denied by carol: not during the audit" in str(error)
    assert held.conn.execute("SELECT count(*) FROM products").fetchone()[0] > 0
    held.conn.close()


def test_a_cancel_withdraws_the_request(dev_stack: Stack):
    ca = dev_stack.status["gateway_ca"]
    session = _session(dev_stack, reason="cancel test")
    held = Client(session, ca).start()
    request_id = held.request_id()
    held.conn.cancel()
    rows, error = held.result()
    assert isinstance(error, psycopg.errors.QueryCanceled)
    state = _api(dev_stack, "GET", f"/v1/approvals/{request_id}", "alice").json()
    assert state["state"] == "withdrawn"
    assert held.conn.execute("SELECT 1").fetchone() == (1,)
    held.conn.close()


@contextlib.contextmanager
def _stack_with_rule(base: Stack, home: Path, approval: str) -> Iterator[Stack]:
    """A second demo stack whose approval rule's terms are `approval` (YAML flow mapping
    body), e.g. one statement instead of the demo's 30-minute window."""
    demo = "approver_groups: [security-leads], approvals_required: 1, window: 30m"
    text = DEMO_POLICY.read_text()
    assert demo in text
    with stack_with_policy(base, home, text.replace(demo, approval)) as stack:
        yield stack


def test_one_statement_approval_grant_is_gone_after_the_statement(dev_stack: Stack, tmp_path):
    one_statement = "approver_groups: [security-leads], approvals_required: 1"
    with _stack_with_rule(dev_stack, tmp_path / "home", one_statement) as stack:
        ca = stack.status["gateway_ca"]
        session = _session(stack, reason="one statement")
        held = Client(session, ca).start()
        request_id = held.request_id()
        role = stack.direct(
            "SELECT usename FROM pg_stat_activity WHERE usename LIKE 'v-%%'"
            " AND backend_type = 'client backend' ORDER BY backend_start DESC LIMIT 1"
        )[0][0]
        assert _members(stack, role) == []  # nothing granted before a decision
        ok = _api(stack, "POST", f"/v1/approvals/{request_id}/approve", "bob", json={})
        assert ok.status_code == 200
        rows, error = held.result()
        assert error is None and rows[0][0] > 0
        # The grant covered exactly that statement: it is gone, and the next read of the
        # table is held again (a new request), not run.
        assert _members(stack, role) == []
        second = held.start().request_id()
        assert second != request_id
        _api(stack, "POST", f"/v1/approvals/{second}/deny", "bob", json={"comment": "no"})
        assert isinstance(held.result()[1], psycopg.errors.InsufficientPrivilege)
        held.conn.close()


def test_two_approvers_are_two_people_and_a_held_statement_runs_in_its_transaction(
    dev_stack: Stack, tmp_path
):
    two = "approver_groups: [security-leads], approvals_required: 2"
    with _stack_with_rule(dev_stack, tmp_path / "home", two) as stack:
        ca = stack.status["gateway_ca"]
        session = _session(stack, reason="two people")
        client = Client(session, ca)
        client.conn.execute("BEGIN")
        client.conn.execute("INSERT INTO products (name, kind, rate) VALUES ('held', 'test', 1)")
        client.start()
        request_id = client.request_id()
        approve = f"/v1/approvals/{request_id}/approve"
        assert _api(stack, "POST", approve, "bob", json={}).json()["state"] == "pending"
        again = _api(stack, "POST", approve, "bob", json={})
        assert again.status_code == 403 and "already decided" in again.json()["message"]
        assert client.thread.is_alive()  # one person, however many times, is not two
        assert _api(stack, "POST", approve, "carol", json={}).json()["state"] == "approved"
        rows, error = client.result()
        assert error is None and rows[0][0] > 0
        # The transaction was open all along: its earlier insert is still there to commit.
        held_insert = "SELECT count(*) FROM products WHERE name = 'held'"
        assert client.conn.execute(held_insert).fetchone() == (1,)
        client.conn.execute("ROLLBACK")
        client.conn.close()
        assert stack.direct("SELECT count(*) FROM products WHERE name = 'held'") == [(0,)]
