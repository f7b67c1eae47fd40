"""Unmasked access through the real stack (issue 16): a fraud investigator's session reads
protected columns raw, only as the policy says, and the audit says so.

The demo policy lets `fraud-investigators` (dave) ask, with `--unmasked` and a reason, and
a security lead (bob, carol) approves first. A second stack whose policy needs no approval
runs the gateway in two worker processes: the session's unmasked state must reach the
worker that serves its connection.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.fix_stack import (
    DEMO_POLICY,
    Stack,
    denying_approvals,
    gateway_connect,
    stack_with_policy,
)

pytestmark = pytest.mark.integration

SSN = "SELECT ssn FROM customers WHERE id = 1"


def _token(stack: Stack, user: str) -> str:
    token = stack.guard("dev", "token", user)
    assert token.returncode == 0, token.stderr
    return token.stdout.strip()


def _api(stack: Stack, method: str, path: str, user: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {_token(stack, user)}"}
    return stack.api(method, path, headers=headers, **kwargs)


def _open(stack: Stack, user: str = "dave", **body) -> httpx.Response:
    body = {"target": "demo", "reason": "fraud case 7", "unmasked": True, **body}
    return _api(stack, "POST", "/v1/sessions", user, json=body)


def _state(stack: Stack, created: dict) -> dict:
    headers = {"Authorization": f"Bearer {created['session_token']}"}
    answer = stack.api("GET", f"/v1/sessions/{created['session_id']}", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _until_decided(stack: Stack, created: dict, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while (info := _state(stack, created))["unmask_state"] == "pending":
        assert time.monotonic() < deadline, "the request was never settled"
        time.sleep(0.1)
    return info


def _end(stack: Stack, created: dict) -> None:
    headers = {"Authorization": f"Bearer {created['session_token']}"}
    assert stack.end_session(created["session_id"], headers).status_code in (204, 404)


def _memberships(stack: Stack, role: str) -> list[str]:
    return [
        name
        for (name,) in stack.direct(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s ORDER BY 1",
            (role,),
        )
    ]


def _unmasked_cells(stack: Stack, session_id: str) -> int:
    return sum(
        r.get("unmasked_cells", 0)
        for r in stack.audit_records()
        if r.get("kind") == "result" and r.get("session_id") == session_id
    )


def _session_role(stack: Stack, session_id: str) -> str:
    """The database role the broker issued for a session (its connection's usename)."""
    rows = stack.direct(
        "SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name = %s",
        (f"unmasked-{session_id}",),
    )
    assert len(rows) == 1, rows
    return rows[0][0]


@pytest.mark.parametrize(
    ("user", "body", "status", "words"),
    [
        ("alice", {}, 403, "requires membership in one of: fraud-investigators"),
        ("dave", {"reason": "  "}, 400, "needs a reason"),
        ("mallory", {}, 403, "may not connect"),
    ],
)
def test_who_may_ask_and_how(dev_stack, user, body, status, words):
    answer = _open(dev_stack, user, **body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["message"]
    assert answer.json()["hint"]


def test_approved_session_reads_raw_and_the_audit_says_so(dev_stack):
    raw = dev_stack.direct("SELECT ssn FROM public.customers WHERE id = 1")[0][0]
    answer = _open(dev_stack)
    assert answer.status_code == 201, answer.text
    created = {**answer.json(), "gateway_ca": dev_stack.status["gateway_ca"]}
    try:
        assert created["unmask_state"] == "pending" and created["unmask_request"]
        request_id = created["unmask_request"]
        # Meanwhile the session reads masked, and a connection made now stays masked.
        before = gateway_connect(created, autocommit=True)
        assert before.execute(SSN).fetchone() != (raw,)
        # The requester cannot approve it; a security lead can.
        own = _api(dev_stack, "POST", f"/v1/approvals/{request_id}/approve", "dave", json={})
        assert own.status_code in (403, 404), own.text
        shown = _api(dev_stack, "GET", f"/v1/approvals/{request_id}", "bob")
        assert shown.json()["kind"] == "unmasked" and shown.json()["session_reason"]
        ok = _api(dev_stack, "POST", f"/v1/approvals/{request_id}/approve", "bob", json={})
        assert ok.status_code == 200, ok.text
        info = _until_decided(dev_stack, created)
        assert info["unmask_state"] == "granted" and "approved by bob" in info["unmask_detail"]

        with gateway_connect(
            created, autocommit=True, application_name=f"unmasked-{created['session_id']}"
        ) as conn:
            role = _session_role(dev_stack, created["session_id"])
            assert "guard_unmasked" in _memberships(dev_stack, role)
            # Raw on every path: simple, extended (text and binary), qualified, COPY.
            assert conn.execute(SSN, prepare=False).fetchone() == (raw,)
            assert conn.execute("SELECT ssn FROM customers WHERE id = %s", (1,)).fetchone() == (
                raw,
            )
            with conn.cursor(binary=True) as cur:
                assert cur.execute("SELECT ssn FROM public.customers WHERE id = 1").fetchone() == (
                    raw,
                )
            with conn.cursor().copy("COPY (SELECT ssn FROM customers WHERE id = 1) TO STDOUT") as c:
                assert bytes(b"".join(c)).decode().strip() == raw
            # A path the client sets keeps the raw views first.
            conn.execute("SET search_path = public")
            assert conn.execute(SSN).fetchone() == (raw,)
            # A lookup by the raw value works; a copy of it into a table does not.
            found = conn.execute("SELECT id FROM customers WHERE ssn = %s", (raw,)).fetchall()
            assert found == [(1,)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unmasked-copy"):
                conn.execute("INSERT INTO products(name, price) SELECT ssn, 1 FROM customers")
            # Approval-gated tables still need their own approval.
            with denying_approvals(dev_stack), pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT count(*) FROM transactions")
        # The connection made before the grant still reads masked.
        assert before.execute(SSN).fetchone() != (raw,)
        before.close()
    finally:
        _end(dev_stack, created)
    session_id = created["session_id"]
    records = dev_stack.audit_records()
    mine = [r for r in records if r.get("session_id") == session_id]
    (event,) = [r for r in mine if r.get("event") == "unmasked"]
    assert "approved by bob" in event["detail"] and "fraud case 7" in event["detail"]
    reads = [r for r in mine if r.get("kind") == "statement" and "ssn" in r["statement"]]
    raw_reads = [r for r in reads if "public.customers.ssn:unmasked" in r["masking"]]
    assert len(raw_reads) >= 5 and all(r["masked_columns"] == [] for r in raw_reads)
    # The connection made before the grant: masked by the view, and recorded so.
    assert any("public.customers.ssn:view" in r["masking"] for r in reads)
    # Result records reach the file within the broker's flush interval (200 ms).
    deadline = time.monotonic() + 10
    while _unmasked_cells(dev_stack, session_id) < 3:
        assert time.monotonic() < deadline, "no result record counts the raw cells"
        time.sleep(0.1)
    # No raw value in the audit log, not even from the lookup by value.
    assert raw not in dev_stack.audit_path.read_text()


def test_a_denied_request_ends_guard_exec_with_one_line(dev_stack):
    env = {"GUARD_ID_TOKEN": _token(dev_stack, "dave")}
    with denying_approvals(dev_stack, reason="no case number"):
        run = dev_stack.guard(
            "exec", "demo", "--unmasked", "--reason", "curious", "--", "true", env=env
        )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "unmasked access was not granted" in run.stderr
    assert "denied by carol: no case number" in run.stderr
    assert "hint:" in run.stderr


def test_unmasked_without_a_reason_is_a_usage_error(dev_stack):
    env = {"GUARD_ID_TOKEN": _token(dev_stack, "dave")}
    run = dev_stack.guard("exec", "demo", "--unmasked", "--", "true", env=env)
    assert run.returncode == 2, run.stderr
    assert "--unmasked needs a reason" in run.stderr and "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def direct_stack(dev_stack, tmp_path_factory):
    """Unmasked access without approval, the gateway in two worker processes."""
    text = DEMO_POLICY.read_text().replace(
        "      approval: {approver_groups: [security-leads], approvals_required: 1}\n", ""
    )
    assert "unmasked_access:" in text and "approvals_required: 1}\n      max_ttl" not in text
    home: Path = tmp_path_factory.mktemp("unmasked-direct")
    with stack_with_policy(dev_stack, home, text, env={"GUARD_DEV_GATEWAY_WORKERS": "2"}) as stack:
        yield stack


def test_guard_exec_unmasked_for_a_member_reads_raw_through_workers(direct_stack):
    raw = direct_stack.direct("SELECT ssn FROM public.customers WHERE id = 1")[0][0]
    env = {"GUARD_ID_TOKEN": _token(direct_stack, "dave")}
    run = direct_stack.guard(
        "exec", "demo", "--unmasked", "--reason", "case 9", "--",
        "psql", "-XAtc", SSN, "-c", "SHOW search_path",
        env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:1] == [raw]
    assert "guard_unmasked" in run.stdout
    assert "reads protected columns UNMASKED" in run.stderr
    # The same member without --unmasked reads masked.
    masked = direct_stack.guard("exec", "demo", "--", "psql", "-XAtc", SSN, env=env)
    assert masked.returncode == 0, masked.stderr
    assert masked.stdout.strip() != raw and masked.stdout.strip().endswith(raw[-4:])


def test_the_role_loses_guard_unmasked_when_the_session_ends(direct_stack):
    answer = _open(direct_stack)
    assert answer.status_code == 201, answer.text
    created = {**answer.json(), "gateway_ca": direct_stack.status["gateway_ca"]}
    assert created["unmask_state"] == "granted"
    with gateway_connect(
        created, autocommit=True, application_name=f"unmasked-{created['session_id']}"
    ):
        role = _session_role(direct_stack, created["session_id"])
    assert "guard_unmasked" in _memberships(direct_stack, role)
    # A security lead sees who reads raw.
    listed = direct_stack.guard(
        "sessions", "--all", env={"GUARD_ID_TOKEN": _token(direct_stack, "bob"), "COLUMNS": "200"}
    )
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if created["session_id"] in line]
    assert "unmasked" in listed.stdout and row.rstrip().endswith("yes")
    _end(direct_stack, created)
    deadline = time.monotonic() + 15
    while direct_stack.direct("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)):
        assert time.monotonic() < deadline, "the session role was never dropped"
        time.sleep(0.1)


RAW_SPELLINGS = [
    "SELECT ssn FROM guard_unmasked.customers",
    'SELECT ssn FROM "guard_unmasked"."customers"',
    'SELECT ssn FROM U&"\\0067uard_unmasked".customers',
    "SELECT email FROM guard_unmasked.v_customer_contacts",
    "COPY (SELECT ssn FROM guard_unmasked.customers) TO STDOUT",
    "TABLE guard_unmasked.customers",
]


@pytest.mark.parametrize("sql", RAW_SPELLINGS)
def test_a_masked_session_never_reads_the_raw_views(dev_stack, sql):
    """Every spelling of guard_unmasked from a session without the role: refused, on the
    extended protocol (psycopg) and the simple one (psql); never a raw value."""
    import subprocess

    raw = dev_stack.direct("SELECT ssn FROM public.customers")
    raws = {ssn for (ssn,) in raw}
    session, headers = dev_stack.open_session("dave")  # a member, but not unmasked
    try:
        with gateway_connect(session, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                if sql.startswith("COPY"):
                    with conn.cursor().copy(sql) as copy:
                        b"".join(copy)
                else:
                    conn.execute(sql).fetchall()
        psql = subprocess.run(
            ["psql", "-XAt", "-v", "ON_ERROR_STOP=1", "-c", sql],
            env=dev_stack.libpq_env(session),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert psql.returncode != 0 and "permission denied" in psql.stderr
        assert not raws & set(psql.stdout.split())
    finally:
        dev_stack.end_session(session["session_id"], headers)


def test_a_masked_session_cannot_path_or_role_its_way_to_raw(dev_stack):
    raw = dev_stack.direct(SSN.replace("customers", "public.customers"))[0][0]
    session, headers = dev_stack.open_session("dave")
    try:
        with gateway_connect(session, autocommit=True) as conn:
            conn.execute("SET search_path = guard_unmasked, public")
            # The gateway keeps the masking views first: unqualified names read masked.
            assert conn.execute(SSN).fetchone() != (raw,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SET ROLE guard_unmasked")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT set_config('role', 'guard_unmasked', false)")
            assert conn.execute(SSN).fetchone() != (raw,)
    finally:
        dev_stack.end_session(session["session_id"], headers)


def test_an_unmasked_session_cannot_copy_through_a_view_spelling(direct_stack):
    answer = _open(direct_stack)
    assert answer.status_code == 201, answer.text
    created = {**answer.json(), "gateway_ca": direct_stack.status["gateway_ca"]}
    try:
        with gateway_connect(created, autocommit=True) as conn:
            for source in ("guard_unmasked.customers", "guard_masked.customers", "customers"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unmasked-copy"):
                    conn.execute(f"INSERT INTO products(name, price) SELECT ssn, 1 FROM {source}")
        copied = direct_stack.direct(
            "SELECT count(*) FROM products p JOIN customers c ON c.ssn = p.name"
        )
        assert copied == [(0,)]
    finally:
        _end(direct_stack, created)


def test_guard_targets_says_who_may_ask(dev_stack, direct_stack):
    import json

    def targets(stack: Stack, user: str, *args: str):
        env = {"GUARD_ID_TOKEN": _token(stack, user), "COLUMNS": "200"}
        return stack.guard("targets", *args, env=env)

    (dave,) = json.loads(targets(dev_stack, "dave", "--json").stdout)
    assert dave["unmasked"] == "after approval"
    (member,) = json.loads(targets(direct_stack, "dave", "--json").stdout)
    assert member["unmasked"] == "yes"
    (alice,) = json.loads(targets(dev_stack, "alice", "--json").stdout)
    assert alice["unmasked"] == ""
    table = targets(dev_stack, "dave").stdout
    assert "unmasked (--unmasked)" in table and "after approval" in table
    assert "unmasked" not in targets(dev_stack, "alice").stdout  # no column nobody can use
