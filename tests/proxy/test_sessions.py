"""Session lifecycle without sockets: policy check, lease per session, teardown, outages,
heartbeats, the session credential, limits per principal, revocation retries, reconcile."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from guard.broker.audit.sink import AuditUnavailable, MemoryAuditSink
from guard.broker.credentials.fake import FakeIssuer
from guard.broker.credentials.issuer import CredentialsUnavailable
from guard.broker.errors import (
    BadRequest,
    DependencyUnavailable,
    Forbidden,
    NotFound,
    Unauthenticated,
)
from guard.broker.fakes import FakeComponentWarning
from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import load_policy_file
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.sessions import CREDENTIAL_PREFIX, AuditDown, SessionManager, TooManySessions
from guard.broker.settings import SessionSettings, TargetSettings
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
        session.upstream_scram.derive(session.credentials.password, b"salt" * 4, 1)
        await mgr.end(session.id, "ended by client")
        assert conn.closed == "ended by client"
        assert session.upstream_scram._derived == {}  # its upstream keys went with it
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


# ---------------------------------------------------------------- hardening (issue 12)
class _Clock:
    def __init__(self):
        from datetime import UTC, datetime

        # Near the wall clock: the fake issuer's leases expire by it.
        self.now = datetime.now(UTC)

    def __call__(self):
        return self.now

    def advance(self, seconds):
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)


class _FlakyIssuer(FakeIssuer):
    """Revocations fail while `down` is set (OpenBao unreachable)."""

    down = False

    def revoke(self, lease_id):
        if self.down:
            raise CredentialsUnavailable("OpenBao at http://127.0.0.1:9 is unreachable")
        super().revoke(lease_id)


class _AuditFailingAt(MemoryAuditSink):
    """Fails the n-th record (1-based) and every one after it."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def append_statements(self, records):
        if len(self.records) + 1 >= self.n:
            raise AuditUnavailable("cannot write audit log /x: [Errno 28] No space left")
        return super().append_statements(records)


def hardened(tmp_path, *, issuer=None, audit=None, clock=None, **settings):
    if issuer is None:
        with pytest.warns(FakeComponentWarning):
            issuer = FakeIssuer()
    audit = audit if audit is not None else MemoryAuditSink()
    state = SqliteStateStore(tmp_path / "s.db")
    mgr = SessionManager(
        policy=POLICY,
        targets={"demo": TargetSettings(database="demo", openbao_role="guard-demo")},
        issuer=issuer,
        audit=audit,
        state=state,
        clock=clock or _Clock(),
        settings=SessionSettings(**settings),
    )
    return mgr, issuer, audit, state


def test_a_session_whose_heartbeats_stop_is_ended_and_its_lease_revoked(tmp_path):
    """Finding 3: a kill -9'd CLI left the session valid until its TTL."""
    clock = _Clock()
    mgr, issuer, audit, _ = hardened(tmp_path, clock=clock, heartbeat_grace_seconds=45)

    async def scenario():
        cli = (await mgr.open(ALICE, "demo", reason="", ttl_seconds=None, heartbeat=True)).session
        raw = (await mgr.open(ALICE, "demo", reason="", ttl_seconds=None)).session
        clock.advance(40)
        mgr.heartbeat(cli.id)  # alive: 45 s more from now
        clock.advance(40)
        await mgr.end_expired()
        assert mgr.is_live(cli) and mgr.is_live(raw)
        clock.advance(10)  # 50 s since the last heartbeat
        await mgr.end_expired()
        assert not mgr.is_live(cli) and issuer.revoked == [cli.credentials.lease_id]
        # A session opened without `heartbeat` lasts until its TTL …
        assert mgr.is_live(raw)
        # … unless a first heartbeat turns the check on.
        mgr.heartbeat(raw.id)
        clock.advance(46)
        await mgr.end_expired()
        assert not mgr.is_live(raw)

    asyncio.run(scenario())
    ended = [r for r in audit.records if r["event"] == "ended"]
    assert [r["detail"] for r in ended] == ["heartbeat lost (none for 45 s)"] * 2


def test_the_session_credential_ends_its_own_session_only(tmp_path):
    """Finding 2: ending needed the (expired) ID token; the session credential suffices."""
    mgr, _, _, _ = hardened(tmp_path)

    async def scenario():
        one = await mgr.open(ALICE, "demo", reason="", ttl_seconds=None, heartbeat=True)
        two = await mgr.open(ALICE, "demo", reason="", ttl_seconds=None, heartbeat=True)
        assert one.credential.startswith(CREDENTIAL_PREFIX)
        assert one.credential.encode() not in repr(one.session).encode()
        assert one.session.credential_hash != one.credential.encode()
        assert mgr.by_credential(one.session.id, one.credential) is one.session
        with pytest.raises(NotFound):
            mgr.by_credential(one.session.id, two.credential)
        with pytest.raises(NotFound):
            mgr.by_credential(one.session.id, CREDENTIAL_PREFIX + "guess")

    asyncio.run(scenario())


def test_the_session_limit_per_principal_refuses_with_429_and_is_audited(tmp_path):
    """Finding 9: one ID token opened 50 sessions."""
    mgr, issuer, audit, _ = hardened(tmp_path, max_sessions_per_principal=2)
    bob = Principal("https://idp", "bob", frozenset({"engineers"}))

    async def scenario():
        first = await mgr.open(ALICE, "demo", reason="", ttl_seconds=None)
        await mgr.open(ALICE, "demo", reason="", ttl_seconds=None)
        with pytest.raises(TooManySessions) as info:
            await mgr.open(ALICE, "demo", reason="", ttl_seconds=None)
        assert info.value.http_status == 429 and info.value.hint
        await mgr.open(bob, "demo", reason="", ttl_seconds=None)  # per principal
        await mgr.end(first.session.id, "ended by client")
        await mgr.open(ALICE, "demo", reason="", ttl_seconds=None)

    asyncio.run(scenario())
    limited = [r for r in audit.records if r["event"] == "limit-reached"]
    assert len(limited) == 1 and limited[0]["principal"] == "alice"
    assert len(issuer.active) == 3


@pytest.mark.parametrize("failing_record", [1, 2], ids=["requested", "opened"])
def test_open_while_the_audit_fails_is_503_and_leaves_nothing_open(tmp_path, failing_record):
    """Finding 7: a session opened on a full audit disk left a state row without an end
    (and a plain-text 500)."""
    mgr, issuer, _, state = hardened(tmp_path, audit=_AuditFailingAt(failing_record))
    with pytest.raises(AuditDown) as info:
        asyncio.run(mgr.open(ALICE, "demo", reason="", ttl_seconds=None))
    assert info.value.http_status == 503 and info.value.code == "audit_unavailable"
    assert state.open_leases() == [] and state.pending_revocations() == []
    assert issuer.active == {}  # issued (for "opened") and revoked, or never issued
    assert mgr.active() == []


def test_a_failed_revocation_is_retried_with_backoff_until_it_succeeds(tmp_path):
    """Finding 8: a revocation while OpenBao was down was given up at once."""
    clock = _Clock()
    with pytest.warns(FakeComponentWarning):
        issuer = _FlakyIssuer()
    mgr, _, _, state = hardened(
        tmp_path,
        issuer=issuer,
        clock=clock,
        revoke_retry_initial_seconds=1,
        revoke_retry_max_seconds=4,
    )

    async def scenario():
        session = (await mgr.open(ALICE, "demo", reason="", ttl_seconds=None)).session
        lease = session.credentials.lease_id
        issuer.down = True
        await mgr.end(session.id, "ended by client")
        assert lease in issuer.active and mgr.revocations.failing()
        assert [p.lease_id for p in state.pending_revocations()] == [lease]
        waits = []
        for _ in range(4):
            pending = state.pending_revocations()[0]
            waits.append((pending.next_attempt_at - clock.now).total_seconds())
            await mgr.revocations.retry_due()  # not due yet: nothing happens
            assert state.pending_revocations()[0].attempts == pending.attempts
            clock.advance(waits[-1])
            await mgr.revocations.retry_due()
        assert waits == [1, 2, 4, 4]  # doubling, capped
        issuer.down = False
        clock.advance(4)
        await mgr.revocations.retry_due()
        assert lease not in issuer.active and issuer.revoked == [lease]
        assert state.pending_revocations() == [] and mgr.revocations.failing() is None

    asyncio.run(scenario())


def test_a_restarted_broker_goes_on_with_the_revocations_it_owed(tmp_path):
    with pytest.warns(FakeComponentWarning):
        issuer = _FlakyIssuer()
    mgr, _, _, _ = hardened(tmp_path, issuer=issuer)
    session = asyncio.run(mgr.open(ALICE, "demo", reason="", ttl_seconds=None)).session
    issuer.down = True
    asyncio.run(mgr.end(session.id, "ended by client"))
    issuer.down = False
    fresh, _, _, state = hardened(tmp_path, issuer=issuer)  # same state file, new process
    asyncio.run(fresh.revoke_orphans())
    assert issuer.revoked == [session.credentials.lease_id]
    assert state.pending_revocations() == []


def test_reconcile_revokes_open_leases_no_live_session_owns(tmp_path):
    mgr, issuer, _, state = hardened(tmp_path)

    async def scenario():
        live = (await mgr.open(ALICE, "demo", reason="", ttl_seconds=None)).session
        stray = issuer.issue("guard-demo", 60)
        state.session_opened(
            session_id="feedfacefeedface",
            issuer="https://idp",
            subject="alice",
            groups=[],
            target="demo",
            reason="",
            lease_id=stray.lease_id,
            expires_at=stray.expires_at,
        )
        await mgr.reconcile()
        assert issuer.revoked == [stray.lease_id]
        assert [sid for sid, _ in state.open_leases()] == [live.id]

    asyncio.run(scenario())


# ---------------------------------------------------------------- the API's answers
@dataclass
class _Gateway:
    host: str = "127.0.0.1"
    port: int = 6433
    tls: bool = True
    ca_pem: str | None = None


def _resolve(token):
    if token == "alice-id-token":
        return ALICE
    if token == "crash":
        raise RuntimeError("resolver bug: token=crash")
    raise Unauthenticated("token expired", hint="run `guard login`")


class _Api:
    """The app over httpx's ASGI transport, one event loop per request (sync for tests);
    what the app left running after answering finishes before the loop closes."""

    def __init__(self, app):
        self.app = app

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def request(self, method, path, **kwargs):
        import httpx

        async def go():
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://broker") as c:
                response = await c.request(method, path, **kwargs)
            # A server's loop goes on after answering (a lease revoked after the DELETE was
            # answered): let this one finish that work before it closes.
            others = asyncio.all_tasks() - {asyncio.current_task()}
            await asyncio.gather(*others, return_exceptions=True)
            return response

        return asyncio.run(go())

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def delete(self, path, **kwargs):
        return self.request("DELETE", path, **kwargs)


def api(mgr, health=None):
    from guard.broker.api.app import create_app

    app = create_app(sessions=mgr, resolve_principal=_resolve, gateway=_Gateway(), health=health)
    return _Api(app)


ALICE_AUTH = {"Authorization": "Bearer alice-id-token"}


def test_api_ends_a_session_with_its_credential_after_the_id_token_expired(tmp_path):
    mgr, issuer, _, _ = hardened(tmp_path, heartbeat_interval_seconds=10)
    with api(mgr) as http:
        created = http.post(
            "/v1/sessions", json={"target": "demo", "heartbeat": True}, headers=ALICE_AUTH
        ).json()
        assert created["heartbeat_interval_seconds"] == 10
        assert created["heartbeat_grace_seconds"] == 45
        own = {"Authorization": f"Bearer {created['session_token']}"}
        sid = created["session_id"]
        beat = http.post(f"/v1/sessions/{sid}/heartbeat", headers=own)
        assert beat.status_code == 200 and beat.json()["heartbeat_deadline"]
        expired = {"Authorization": "Bearer an-expired-id-token"}
        assert http.delete(f"/v1/sessions/{sid}", headers=expired).status_code == 401
        assert http.delete(f"/v1/sessions/{sid}", headers=own).status_code == 204
        assert len(issuer.revoked) == 1
        gone = http.post(f"/v1/sessions/{sid}/heartbeat", headers=own)
        assert gone.status_code == 404 and gone.json()["error"] == "not_found"


def test_api_errors_are_json_with_a_hint(tmp_path, caplog):
    mgr, _, _, _ = hardened(tmp_path, max_sessions_per_principal=1)
    with api(mgr) as http:
        bad = http.post("/v1/sessions", json={"target": "", "ttl": 5}, headers=ALICE_AUTH)
        assert bad.status_code == 422
        body = bad.json()
        assert body["error"] == "invalid_request" and body["hint"]
        assert "target" in body["message"] and "ttl" in body["message"]

        crash = http.post(
            "/v1/sessions", json={"target": "demo"}, headers={"Authorization": "Bearer crash"}
        )
        assert crash.status_code == 500
        body = crash.json()
        assert body["error"] == "internal_error" and body["hint"]
        assert "Traceback" not in crash.text and "crash" not in crash.text
        request_id = body["message"].split("request id ")[1].rstrip(")")
        assert any(request_id in r.getMessage() for r in caplog.records)

        assert http.get("/v1/nothing").json()["error"] == "not_found"

        ok = http.post("/v1/sessions", json={"target": "demo"}, headers=ALICE_AUTH)
        assert ok.status_code == 201
        limited = http.post("/v1/sessions", json={"target": "demo"}, headers=ALICE_AUTH)
        assert limited.status_code == 429
        assert limited.json()["error"] == "session_limit" and limited.json()["hint"]


def test_api_open_during_an_audit_outage_is_a_json_503(tmp_path):
    mgr, _, audit, state = hardened(tmp_path)
    audit.fail = True
    with api(mgr) as http:
        answer = http.post("/v1/sessions", json={"target": "demo"}, headers=ALICE_AUTH)
    assert answer.status_code == 503
    assert answer.json()["error"] == "audit_unavailable" and answer.json()["hint"]
    assert state.open_leases() == []


def test_health_is_degraded_while_the_audit_or_revocations_fail(tmp_path):
    from guard.broker.health import BrokerHealth, WatchedAuditSink

    with pytest.warns(FakeComponentWarning):
        issuer = _FlakyIssuer()
    sink = MemoryAuditSink()
    watched = WatchedAuditSink(sink)
    mgr, _, _, _ = hardened(tmp_path, issuer=issuer, audit=watched)
    with api(mgr, health=BrokerHealth(watched, mgr.revocations).reasons) as http:
        assert http.get("/v1/health").json() == {"status": "ok"}
        created = http.post("/v1/sessions", json={"target": "demo"}, headers=ALICE_AUTH).json()
        issuer.down = True
        http.delete(f"/v1/sessions/{created['session_id']}", headers=ALICE_AUTH)
        sink.fail = True
        assert (
            http.post("/v1/sessions", json={"target": "demo"}, headers=ALICE_AUTH).status_code
            == 503
        )
        degraded = http.get("/v1/health")
        assert degraded.status_code == 503
        reasons = degraded.json()["reasons"]
        assert degraded.json()["status"] == "degraded" and len(reasons) == 2
        assert reasons[0].startswith("audit:") and reasons[1].startswith("openbao:")
        sink.fail, issuer.down = False, False
        asyncio.run(mgr.revocations.retry_due(force=True))
        assert (
            http.post("/v1/sessions", json={"target": "demo"}, headers=ALICE_AUTH).status_code
            == 201
        )
        assert http.get("/v1/health").json() == {"status": "ok"}


# ---------------------------------------------------------------- seeing and revoking sessions
BOB = Principal("https://idp", "bob-sub", frozenset({"security-leads"}), display_name="bob")
CAROL = Principal("https://idp", "carol-sub", frozenset({"engineers"}), display_name="carol")


def test_revoke_ends_the_sessions_matching_every_selector_and_says_who_and_why(tmp_path):
    mgr, issuer, audit, _ = hardened(tmp_path, auditor_groups=["security-leads"])

    async def scenario():
        a1 = (await mgr.open(ALICE, "demo", reason="r", ttl_seconds=None)).session
        a2 = (await mgr.open(ALICE, "demo", reason="r", ttl_seconds=None)).session
        c1 = (await mgr.open(CAROL, "demo", reason="r", ttl_seconds=None)).session
        conn = _Conn()
        a1.connections.add(conn)
        assert {s.id for s in mgr.held_by(ALICE)} == {a1.id, a2.id}
        assert {s.id for s in mgr.live()} == {a1.id, a2.id, c1.id}
        # Selectors are ANDed: alice's sessions on another target are none.
        assert await mgr.revoke(BOB, "x", subject="alice", target="other") == []
        # A user by subject or by the name `guard sessions --all` shows (carol's label).
        assert await mgr.revoke(BOB, "left", subject="carol") == [c1.id]
        ended = await mgr.revoke(BOB, "offboarded", subject="alice")
        assert sorted(ended) == sorted([a1.id, a2.id])
        assert conn.closed == "revoked by bob (bob-sub): offboarded"
        assert mgr.live() == []
        with pytest.raises(BadRequest):
            await mgr.revoke(BOB, "x")

    asyncio.run(scenario())
    assert len(issuer.revoked) == 3
    details = [r["detail"] for r in audit.records if r["event"] == "ended"]
    assert sorted(details) == sorted(
        ["revoked by bob (bob-sub): left"] + ["revoked by bob (bob-sub): offboarded"] * 2
    )
    assert mgr.is_auditor(BOB) and not mgr.is_auditor(ALICE)


def test_an_unknown_or_forbidden_target_names_the_callers_targets(tmp_path):
    mgr, _, _ = manager(tmp_path)
    with pytest.raises(Forbidden) as unknown:
        asyncio.run(mgr.open(ALICE, "nope", reason="", ttl_seconds=None))
    assert unknown.value.hint == "targets you may use: demo (`guard targets` says more)"
    with pytest.raises(Forbidden) as none:
        asyncio.run(mgr.open(MALLORY, "demo", reason="", ttl_seconds=None))
    assert none.value.hint.startswith("you may open a session on no target")
    assert [(name, v.allowed) for name, v in mgr.reachable(ALICE)] == [("demo", True)]


def test_api_lists_own_sessions_and_everyone_only_for_auditors(tmp_path):
    mgr, _, _, _ = hardened(tmp_path, auditor_groups=["security-leads"])
    with api(mgr) as http:
        sid = http.post("/v1/sessions", json={"target": "demo"}, headers=ALICE_AUTH).json()[
            "session_id"
        ]
        mine = http.get("/v1/sessions", headers=ALICE_AUTH).json()
        assert [(s["session_id"], s["subject"]) for s in mine] == [(sid, "alice")]
        me = http.get("/v1/me", headers=ALICE_AUTH).json()
        assert (me["subject"], me["groups"], me["auditor"]) == ("alice", ["engineers"], False)
        targets = http.get("/v1/targets", headers=ALICE_AUTH).json()
        assert [(t["name"], t["allowed"]) for t in targets] == [("demo", True)]
        for method, path, body in (
            ("GET", "/v1/sessions?all=true", None),
            ("POST", "/v1/sessions/revoke", {"subject": "alice", "reason": "x"}),
        ):
            refused = http.request(method, path, json=body, headers=ALICE_AUTH)
            assert refused.status_code == 403, refused.text
            assert "security-leads" in refused.json()["hint"]
        assert mgr.held_by(ALICE)  # nothing was revoked


def test_an_ended_sessions_reason_is_told_to_its_holder_only(tmp_path):
    mgr, _, _ = manager(tmp_path)

    async def scenario():
        opened = await mgr.open(ALICE, "demo", reason="", ttl_seconds=None)
        await mgr.end(opened.session.id, "ttl expired")
        return opened

    opened = asyncio.run(scenario())
    sid = opened.session.id
    with pytest.raises(NotFound, match=f"^session {sid} ended: ttl expired$"):
        mgr.by_credential(sid, opened.credential)
    with pytest.raises(NotFound, match="^no active session"):
        mgr.by_credential(sid, "gsc_someone-elses")


def test_a_ttl_above_the_policys_maximum_is_cut_with_a_notice(tmp_path):
    mgr, _, _ = manager(tmp_path)
    clamped = asyncio.run(mgr.open(ALICE, "demo", reason="", ttl_seconds=99 * 3600))
    assert clamped.ttl_notice == (
        "asked for 99h; demo allows sessions of at most 8h (the policy's session_ttl.max)"
    )
    plain = asyncio.run(mgr.open(ALICE, "demo", reason="", ttl_seconds=30))
    assert plain.ttl_notice is None


def test_extend_pushes_the_expiry_up_to_the_policys_maximum_from_the_start(tmp_path):
    clock = _Clock()
    mgr, issuer, audit, state = hardened(tmp_path, clock=clock)

    async def scenario():
        session = (await mgr.open(ALICE, "demo", reason="", ttl_seconds=600)).session
        opened_at = session.opened_at
        clock.advance(2)  # the fake's leases run on the wall clock: stay near it
        extended, notice = await mgr.extend(session.id, 2 * 3600)
        assert notice is None
        assert extended.expires_at == clock() + timedelta(hours=2)
        lease = issuer.active[session.credentials.lease_id]  # renewed to match
        assert lease.expires_at > datetime.now(UTC) + timedelta(minutes=119)
        # Never past 8h (the policy's max) from its start, and said.
        extended, notice = await mgr.extend(session.id, 99 * 3600)
        assert extended.expires_at == opened_at + timedelta(hours=8)
        assert notice.startswith("demo allows sessions of at most 8h from their start")
        # Never shorter than it is.
        extended, notice = await mgr.extend(session.id, 60)
        assert extended.expires_at == opened_at + timedelta(hours=8)
        assert notice == "the session already lasts that long"

    asyncio.run(scenario())
    assert [r["event"] for r in audit.records].count("extended") == 2


# ---------------------------------------------------------------- reauthentication
def _reauth_policy():
    """The demo policy with `session_ttl.reauthenticate: true` on its target."""
    demo = replace(POLICY.targets["demo"], reauthenticate=True)
    return CompiledPolicy(version=POLICY.version, targets={"demo": demo}, rules=POLICY.rules)


def _with_token(principal, seconds_left):
    return replace(principal, token_expires=datetime.now(UTC).timestamp() + seconds_left)


def test_a_session_needing_reauthentication_lasts_as_long_as_a_fresh_login(tmp_path):
    clock = _Clock()
    mgr, issuer, audit, _ = hardened(tmp_path, clock=clock)
    mgr.policy = _reauth_policy()

    async def scenario():
        session = (
            await mgr.open(_with_token(ALICE, 120), "demo", reason="", ttl_seconds=None)
        ).session
        first = session.login_expires_at
        assert first is not None
        assert 140 < (first - datetime.now(UTC)).total_seconds() <= 150  # exp + 30 s leeway
        await mgr.reauthenticate(session.id, _with_token(ALICE, 900))
        assert (session.login_expires_at - first).total_seconds() > 700
        # Someone else's token is refused; the session goes on.
        with pytest.raises(Forbidden):
            await mgr.reauthenticate(session.id, _with_token(CAROL, 900))
        assert mgr.is_live(session)
        # No fresh token in time: ended when the last one lapses.
        clock.advance(931)
        await mgr.end_expired()
        assert not mgr.live()

    asyncio.run(scenario())
    (ended,) = [r for r in audit.records if r["event"] == "ended"]
    assert ended["detail"].startswith("login not renewed: the ID token expired")
    assert len(issuer.revoked) == 1


def test_changed_groups_at_the_identity_provider_end_the_session_saying_so(tmp_path):
    mgr, _, audit, _ = hardened(tmp_path)
    mgr.policy = _reauth_policy()

    async def scenario():
        session = (
            await mgr.open(_with_token(ALICE, 600), "demo", reason="", ttl_seconds=None)
        ).session
        removed = replace(_with_token(ALICE, 900), groups=frozenset())
        with pytest.raises(NotFound, match=f"^session {session.id} ended: alice's groups changed"):
            await mgr.reauthenticate(session.id, removed)
        assert not mgr.live()

    asyncio.run(scenario())
    (ended,) = [r for r in audit.records if r["event"] == "ended"]
    assert ended["detail"] == (
        "alice's groups changed at the identity provider (now: no group); "
        'alice may not connect to target "demo" (requires membership in one of: '
        "engineers, security-leads, service)"
    )


def test_without_reauthentication_a_session_ignores_the_tokens_expiry(tmp_path):
    clock = _Clock()
    mgr, _, _, _ = hardened(tmp_path, clock=clock)

    async def scenario():
        session = (
            await mgr.open(_with_token(ALICE, 60), "demo", reason="", ttl_seconds=None)
        ).session
        assert session.login_expires_at is None
        clock.advance(600)
        await mgr.end_expired()
        assert mgr.is_live(session)

    asyncio.run(scenario())


# -- unmasked access ---------------------------------------------------------------------
DAVE = Principal("https://idp", "dave", frozenset({"engineers", "fraud-investigators"}))


def unmasking_manager(tmp_path, grants):
    mgr, issuer, audit = manager(tmp_path)
    mgr.targets["demo"] = TargetSettings(
        database="demo", openbao_role="guard-demo", admin_dsn_file=tmp_path / "dsn"
    )
    mgr.grants = grants
    return mgr, issuer, audit


def test_unmasked_session_asks_approvers_and_is_granted_on_approval(tmp_path):
    from guard.broker.approvals.grants import MemoryGrants

    grants = MemoryGrants()
    mgr, _issuer, audit = unmasking_manager(tmp_path, grants)
    asked = []
    mgr.request_unmask = lambda session, approval: asked.append(approval) or "req-1"

    async def scenario():
        opened = await mgr.open(DAVE, "demo", reason="case 7", ttl_seconds=8 * 3600, unmasked=True)
        session = opened.session
        # The unmasked session is capped by unmasked_access.max_ttl (1h), and waits.
        assert (session.expires_at - session.opened_at).total_seconds() <= 3600
        assert "unmasked sessions of at most 1h" in (opened.ttl_notice or "")
        # Extensions too: never past 1h from its start.
        extended, notice = await mgr.extend(session.id, 8 * 3600)
        assert (extended.expires_at - session.opened_at).total_seconds() <= 3600
        assert "unmasked_access.max_ttl" in (notice or "")
        assert (session.unmask_state, session.unmask_request) == ("pending", "req-1")
        assert not session.unmasked and grants.calls == []
        await mgr.unmask(session.id, "approved by bob (request req-1)")
        assert session.unmasked
        assert grants.held == {("demo", session.credentials.username, "guard_unmasked")}
        return session

    session = asyncio.run(scenario())
    (approval,) = asked
    assert approval.approver_groups == {"security-leads"}
    (event,) = [r for r in audit.records if r["event"] == "unmasked"]
    assert event["session_id"] == session.id and "case 7" in event["detail"]


def test_unmasked_refusals_before_anything_is_issued(tmp_path):
    from guard.broker.approvals.grants import MemoryGrants

    mgr, issuer, _ = unmasking_manager(tmp_path, MemoryGrants())
    with pytest.raises(Forbidden, match="fraud-investigators"):
        asyncio.run(mgr.open(ALICE, "demo", reason="x", ttl_seconds=None, unmasked=True))
    with pytest.raises(BadRequest, match="needs a reason"):
        asyncio.run(mgr.open(DAVE, "demo", reason=" ", ttl_seconds=None, unmasked=True))
    # Approval is required, and nobody can ask for it here.
    with pytest.raises(DependencyUnavailable, match="cannot grant unmasked access"):
        asyncio.run(mgr.open(DAVE, "demo", reason="x", ttl_seconds=None, unmasked=True))
    assert issuer.active == {}


def test_a_failed_unmasked_grant_ends_the_session(tmp_path):
    from guard.broker.approvals.grants import MemoryGrants

    grants = MemoryGrants(error=DependencyUnavailable("approval grants: grant failed"))
    mgr, issuer, audit = unmasking_manager(tmp_path, grants)
    mgr.request_unmask = lambda session, approval: "req-2"

    async def scenario():
        opened = await mgr.open(DAVE, "demo", reason="case 8", ttl_seconds=None, unmasked=True)
        with pytest.raises(DependencyUnavailable, match="could not be granted"):
            await mgr.unmask(opened.session.id, "approved by bob")
        return opened.session

    session = asyncio.run(scenario())
    assert session.ended and session.unmask_state == "failed" and not session.unmasked
    assert issuer.revoked == [session.credentials.lease_id]
    assert [r["event"] for r in audit.records][-2:] == ["unmasked", "ended"]


def test_a_refused_request_leaves_the_session_masked(tmp_path):
    from guard.broker.approvals.grants import MemoryGrants

    mgr, _issuer, _ = unmasking_manager(tmp_path, MemoryGrants())
    mgr.request_unmask = lambda session, approval: "req-3"

    async def scenario():
        opened = await mgr.open(DAVE, "demo", reason="case 9", ttl_seconds=None, unmasked=True)
        mgr.unmask_refused(opened.session.id, "denied", "request req-3 was denied by bob")
        return opened.session

    session = asyncio.run(scenario())
    assert (session.unmask_state, session.unmasked) == ("denied", False)
    assert "denied by bob" in session.unmask_detail
