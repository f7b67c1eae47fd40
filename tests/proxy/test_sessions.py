"""Session lifecycle without sockets: policy check, lease per session, teardown, outages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from guard.broker.audit.sink import MemoryAuditSink
from guard.broker.credentials.fake import FakeIssuer
from guard.broker.credentials.issuer import CredentialsUnavailable
from guard.broker.errors import DependencyUnavailable, Forbidden
from guard.broker.fakes import FakeComponentWarning
from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import load_policy_file
from guard.broker.sessions import SessionManager
from guard.broker.settings import TargetSettings
from guard.broker.state import SqliteStateStore

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "policies.yaml")
ALICE = Principal("https://idp", "alice", frozenset({"engineers"}))
MALLORY = Principal("https://idp", "mallory", frozenset())


class _DownIssuer(FakeIssuer):
    def issue(self, role, ttl_seconds):
        raise CredentialsUnavailable("OpenBao at http://127.0.0.1:9 is unreachable")


def manager(tmp_path, issuer=None):
    if issuer is None:
        with pytest.warns(FakeComponentWarning):
            issuer = FakeIssuer()
    audit = MemoryAuditSink()
    mgr = SessionManager(
        policy=POLICY,
        targets={"demo": TargetSettings(database="demo", openbao_role="guard-demo")},
        issuer=issuer,
        audit=audit,
        state=SqliteStateStore(tmp_path / "s.db"),
    )
    return mgr, issuer, audit


class _Conn:
    def __init__(self):
        self.closed = None

    def close(self, reason):
        self.closed = reason


def test_open_and_end_revokes_lease_and_closes_connections(tmp_path):
    mgr, issuer, audit = manager(tmp_path)

    async def scenario():
        opened = await mgr.open(ALICE, "demo", reason="ticket-1", ttl_seconds=10_000_000)
        session = opened.session
        assert mgr.by_user(session.user) is session
        # TTL is capped by the policy's max (8h), and the lease by the session.
        assert (session.expires_at - session.credentials.expires_at).total_seconds() <= 0
        conn = _Conn()
        session.connections.add(conn)
        await mgr.end(session.id, "ended by client")
        assert conn.closed == "ended by client"
        assert issuer.revoked == [session.credentials.lease_id]
        assert mgr.by_user(session.user) is None

    asyncio.run(scenario())
    events = [r["event"] for r in audit.records]
    assert events == ["requested", "opened", "ended"]


def test_policy_refuses_group_less_user(tmp_path):
    mgr, issuer, _ = manager(tmp_path)
    with pytest.raises(Forbidden):
        asyncio.run(mgr.open(MALLORY, "demo", reason="", ttl_seconds=None))
    assert issuer.active == {}


def test_openbao_outage_fails_closed_with_what_to_check(tmp_path):
    with pytest.warns(FakeComponentWarning):
        down = _DownIssuer()
    mgr, _, _ = manager(tmp_path, issuer=down)
    with pytest.raises(DependencyUnavailable) as info:
        asyncio.run(mgr.open(ALICE, "demo", reason="", ttl_seconds=None))
    assert "OpenBao" in info.value.message and info.value.hint


def test_restart_revokes_leases_a_crashed_broker_left_open(tmp_path):
    mgr, issuer, _ = manager(tmp_path)
    opened = asyncio.run(mgr.open(ALICE, "demo", reason="", ttl_seconds=None))
    lease = opened.session.credentials.lease_id
    fresh, fresh_issuer, _ = manager(tmp_path)  # same state file, new process
    asyncio.run(fresh.revoke_orphans())
    assert fresh_issuer.revoked == [lease]
