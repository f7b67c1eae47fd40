"""Sessions: who may reach which target until when, and the lease behind it.

A session is opened by the API for a verified principal whose groups the policy lets
connect, with a credential lease cut to the session TTL. The gateway looks sessions up by
their gateway user name and authenticates clients against the session's SCRAM verifier
(the broker keeps the verifier, never the secret it handed out). Ending a session — by the
client, by TTL, when its client's heartbeats stop, or at broker shutdown — closes every
gateway connection of the session and revokes the lease (whose revocation statements
terminate the role's backends). A revocation that fails is retried by the
`RevocationQueue` until it succeeds, and `reconcile` revokes leases the state holds open
that no live session owns.

The client that opened a session gets a session credential (a random bearer secret; the
broker keeps only its SHA-256) for heartbeats and the end, so ending a session never needs
the ID token to be still valid. A session opened with `heartbeat=True` (the CLI does) is
ended when no heartbeat came for the grace period; one opened without it (raw API use)
is bound by its TTL only, until its first heartbeat turns the check on.

Imports the credential issuer protocol, policy, audit and state; no sockets of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from guard.broker.approvals.grants import Grants
from guard.broker.audit.record import SessionEvent
from guard.broker.audit.sink import AuditSink, AuditUnavailable
from guard.broker.credentials.issuer import CredentialIssuer, IssuedCredentials
from guard.broker.errors import (
    BadRequest,
    DependencyUnavailable,
    Forbidden,
    GuardError,
    NotFound,
)
from guard.broker.identity.principal import Principal
from guard.broker.pgwire.scram import ScramKeys, ScramVerifier, make_verifier
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.policy.model import ApprovalRequirement, Effect, Verdict
from guard.broker.revocation import RevocationQueue
from guard.broker.settings import SessionSettings, TargetSettings
from guard.broker.state import SqliteStateStore

log = logging.getLogger("guard.sessions")

# Session credentials carry this prefix, so the API tells them from ID tokens (JWTs).
CREDENTIAL_PREFIX = "gsc_"

UNMASK_GRANTED = "granted"
UNMASK_PENDING = "pending"


class TooManySessions(GuardError):
    http_status = 429
    sqlstate = "53300"
    code = "session_limit"


class AuditDown(DependencyUnavailable):
    """The audit log cannot be written: no session is opened without its records."""

    code = "audit_unavailable"


def credential_hash(credential: str) -> bytes:
    return hashlib.sha256(credential.encode()).digest()


class ConnectionHandle(Protocol):
    def close(self, reason: str) -> None: ...


@dataclass(eq=False)
class Session:
    id: str
    principal: Principal
    target: str
    upstream: TargetSettings
    user: str
    verifier: ScramVerifier = field(repr=False)
    credentials: IssuedCredentials = field(repr=False)
    expires_at: datetime
    reason: str
    credential_hash: bytes = field(default=b"", repr=False)
    # The upstream SCRAM keys of `credentials`' password, derived at its first login and
    # reused by the next (PBKDF2 once per session, not once per connection); gone with it.
    upstream_scram: ScramKeys = field(default_factory=ScramKeys, repr=False)
    # None: no heartbeat expected (yet); else ended when the clock passes it.
    heartbeat_deadline: datetime | None = None
    connections: set[ConnectionHandle] = field(default_factory=set)
    ended: bool = False
    # When it was opened (the manager's clock): its lifetime, extensions included, is at
    # most the policy's session_ttl.max from here.
    opened_at: datetime | None = None
    # Its target requires reauthentication: when its holder's ID token expires (the one it
    # was opened or last reauthenticated with). None: no such limit.
    login_expires_at: datetime | None = None
    # Unmasked access (`--unmasked`): "" not asked; "pending" an approval request
    # (`unmask_request`) is open; "granted" its role holds guard_unmasked, and connections
    # made from then on read protected columns raw; "denied"/"expired"/"withdrawn"/
    # "failed" it stays masked (`unmask_detail` says why).
    unmask_state: str = ""
    unmask_request: str | None = None
    unmask_detail: str = ""

    @property
    def unmasked(self) -> bool:
        return self.unmask_state == UNMASK_GRANTED

    def expired_at(self, now: datetime) -> bool:
        """Whether the session's time is up at `now` (the manager's clock, never the wall's)."""
        return now >= self.expires_at


@dataclass(frozen=True)
class OpenedSession:
    session: Session
    secret: str = field(repr=False)
    # Bearer secret for this session's heartbeat and end (CREDENTIAL_PREFIX…).
    credential: str = field(default="", repr=False)
    # Why the session is shorter than asked (the policy's maximum, the lease's), if it is.
    ttl_notice: str | None = None


# How many ended sessions' reasons are kept for their holders to ask (bounded: memory).
ENDED_REMEMBERED = 10_000
# A lease this much shorter than the session asked for is not worth a notice (the time
# OpenBao took to answer).
LEASE_SLACK_SECONDS = 5
# A session that requires reauthentication ends this long after its holder's ID token
# expired without a fresh one (the ID token verifier's own leeway).
LOGIN_LEEWAY = timedelta(seconds=30)


def identity_record(principal: Principal) -> dict[str, Any]:
    """What the audit keeps of who opened a session and how that was proven: the issuer
    and which trusted issuer entry admitted the token (`via`), whether it was a person's
    login or a CI job's token (`kind`), a human-readable name beside the subject, the
    groups policy saw, and the claims the bindings looked at (repository, ref, run…)."""
    return {
        "issuer": principal.issuer,
        "via": principal.via,
        "kind": principal.kind,
        "subject": principal.subject,
        "name": principal.display_name,
        "groups": sorted(principal.groups),
        "claims": dict(principal.evidence),
    }


def _login_expiry(principal: Principal) -> datetime | None:
    """When a session backed by `principal`'s ID token must have a fresh one."""
    if principal.token_expires is None:
        return None
    return datetime.fromtimestamp(principal.token_expires, UTC) + LOGIN_LEEWAY


def duration_text(seconds: int) -> str:
    """Seconds as the policy writes durations: 8h, 90m, 45s (the largest exact unit)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class SessionManager:
    def __init__(
        self,
        *,
        policy: CompiledPolicy,
        targets: dict[str, TargetSettings],
        issuer: CredentialIssuer,
        audit: AuditSink,
        state: SqliteStateStore,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        settings: SessionSettings | None = None,
        revocations: RevocationQueue | None = None,
        verify_target: Callable[[str], Awaitable[None]] | None = None,
        grants: Grants | None = None,
    ) -> None:
        self.policy = policy
        # Grants guard_unmasked to an unmasked session's role (None: no unmasked session).
        self.grants = grants
        # Asks approvers for an unmasked session (the approval service sets it): the
        # request's id; its outcome comes back through `unmask` / `unmask_refused`.
        self.request_unmask: Callable[[Session, ApprovalRequirement], str] | None = None
        # Raises (503) when the target's database backstop has drifted: no credentials
        # are issued for a database whose masking is not in place (`broker.backstop`).
        self.verify_target = verify_target
        self.targets = targets
        self.issuer = issuer
        self.audit = audit
        self.state = state
        self.clock = clock
        self.settings = settings or SessionSettings()
        self.revocations = revocations or RevocationQueue(
            issuer,
            state,
            initial_backoff=self.settings.revoke_retry_initial_seconds,
            max_backoff=self.settings.revoke_retry_max_seconds,
            clock=clock,
        )
        self._by_id: dict[str, Session] = {}
        # Ended sessions: why, for the holder of the session's credential only.
        self._ended: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._by_user: dict[str, Session] = {}
        # Opens in progress (credentials being issued): per principal, and their ids.
        self._opening: Counter[tuple[str, str]] = Counter()
        self._opening_ids: set[str] = set()
        # Called with the session id when a session ends (its approvals are withdrawn).
        self.on_end: list[Callable[[str], Awaitable[None]]] = []
        # Revocations running after the end was answered (`end(wait_for_revocation=False)`).
        self._revoking: set[asyncio.Task[bool]] = set()

    # -- lookup ------------------------------------------------------------------------
    def by_user(self, user: str) -> Session | None:
        session = self._by_user.get(user)
        if session is None or not self.is_live(session):
            return None
        return session

    def is_live(self, session: Session) -> bool:
        """Neither ended nor past its expiry by this manager's clock."""
        return not session.ended and not session.expired_at(self.clock())

    def get(self, session_id: str) -> Session:
        session = self._by_id.get(session_id)
        if session is None or session.ended:
            raise NotFound(f"no active session {session_id!r}")
        return session

    def active(self) -> list[Session]:
        return [s for s in self._by_id.values() if not s.ended]

    def by_credential(self, session_id: str, credential: str) -> Session:
        """The session `credential` was issued for; NotFound otherwise (the same answer as
        for a session that does not exist)."""
        session = self._by_id.get(session_id)
        if session is None or session.ended:
            reason, held = self._ended.get(session_id, ("", b""))
            if held and hmac.compare_digest(credential_hash(credential), held):
                # Its holder learns why (the CLI says it): TTL, revocation, heartbeats.
                raise NotFound(f"session {session_id} ended: {reason}")
            raise NotFound(f"no active session {session_id!r}")
        if not session.credential_hash or not hmac.compare_digest(
            credential_hash(credential), session.credential_hash
        ):
            raise NotFound(f"no active session {session_id!r}")
        return session

    def heartbeat(self, session_id: str) -> Session:
        """The client is alive: push the session's heartbeat deadline out by the grace
        (the first heartbeat of a session opened without `heartbeat` turns the check on)."""
        session = self.get(session_id)
        if not self.is_live(session):
            raise NotFound(f"no active session {session_id!r}")
        session.heartbeat_deadline = self.clock() + timedelta(
            seconds=self.settings.heartbeat_grace_seconds
        )
        return session

    # -- what a caller may see ---------------------------------------------------------
    def reachable(self, principal: Principal) -> list[tuple[str, Verdict]]:
        """Every policy target, in name order, with whether `principal` may open a
        session on it (and why not)."""
        return [
            (name, self.policy.can_connect(principal, name)) for name in sorted(self.policy.targets)
        ]

    def _targets_hint(self, principal: Principal) -> str:
        allowed = [name for name, verdict in self.reachable(principal) if verdict.allowed]
        if not allowed:
            return "you may open a session on no target; ask for one of its connect groups"
        return f"targets you may use: {', '.join(allowed)} (`guard targets` says more)"

    def is_auditor(self, principal: Principal) -> bool:
        return not principal.groups.isdisjoint(self.settings.auditor_groups)

    def held_by(self, principal: Principal) -> list[Session]:
        """`principal`'s live sessions, oldest expiry first."""
        key = (principal.issuer, principal.subject)
        mine = [
            s
            for s in self.active()
            if (s.principal.issuer, s.principal.subject) == key and self.is_live(s)
        ]
        return sorted(mine, key=lambda s: s.expires_at)

    def live(self) -> list[Session]:
        """Every live session, oldest expiry first."""
        return sorted((s for s in self.active() if self.is_live(s)), key=lambda s: s.expires_at)

    async def extend(self, session_id: str, ttl_seconds: int | None) -> tuple[Session, str | None]:
        """Make a live session last `ttl_seconds` (None: its target's default) from now,
        never past the policy's session_ttl.max from its start, nor shorter than it is;
        its lease is renewed to match. The session, and a notice when it got less than
        asked."""
        session = self.get(session_id)
        if not self.is_live(session):
            raise NotFound(f"no active session {session_id!r}")
        spec = self.policy.targets[session.target]
        now = self.clock()
        wanted = now + timedelta(seconds=ttl_seconds or spec.default_ttl_seconds)
        longest, what = spec.max_ttl_seconds, ("sessions", "session_ttl.max")
        if session.unmask_state and spec.unmasked is not None:
            # Asked for unmasked: its own maximum holds, extensions included.
            longest = min(longest, spec.unmasked.max_ttl_seconds)
            what = ("unmasked sessions", "unmasked_access.max_ttl")
        limit = (session.opened_at or now) + timedelta(seconds=longest)
        notice = None
        if wanted > limit:
            notice = (
                f"{session.target} allows {what[0]} of at most {duration_text(longest)} from"
                f" their start (the policy's {what[1]}): this one now ends there"
            )
        new_end = min(wanted, limit)
        if new_end <= session.expires_at:
            return session, notice or "the session already lasts that long"
        seconds = int((new_end - now).total_seconds())
        try:
            lease_end = await asyncio.to_thread(
                self.issuer.renew, session.credentials.lease_id, seconds
            )
        except Exception as exc:
            raise DependencyUnavailable(
                f"could not renew the credentials of session {session_id}: {exc}",
                hint="the session keeps its expiry; check that OpenBao/Vault is running",
            ) from exc
        if lease_end < new_end - timedelta(seconds=LEASE_SLACK_SECONDS):
            new_end = max(session.expires_at, lease_end)
            notice = (
                f"the OpenBao role {session.upstream.openbao_role!r} allows no longer a lease "
                "(its max_ttl)"
            )
        # Recorded before it takes effect: unrecorded, the session still ends when it
        # would have (and its longer lease is revoked then).
        self._audit_or_refuse(
            SessionEvent(
                session_id,
                "extended",
                session.principal.subject,
                session.target,
                f"expires {new_end.isoformat()}",
            )
        )
        self.state.session_extended(session_id, new_end)
        session.expires_at = new_end
        log.info("session %s extended to %s", session_id, new_end.isoformat())
        return session, notice

    async def reauthenticate(self, session_id: str, principal: Principal) -> Session:
        """A fresh ID token for a session whose target requires reauthentication: the
        same person, in the same groups, so the session may last until that token
        expires. A different person is refused; changed groups end the session (its
        policy decisions were made for the old ones), recorded with why."""
        session = self.get(session_id)
        if not self.is_live(session):
            raise NotFound(f"no active session {session_id!r}")
        held = session.principal
        if (principal.issuer, principal.subject) != (held.issuer, held.subject):
            raise Forbidden(f"{principal.label} does not hold session {session_id}")
        if principal.groups != held.groups:
            verdict = self.policy.can_connect(principal, session.target)
            now_in = ", ".join(sorted(principal.groups)) or "no group"
            why = f"{held.label}'s groups changed at the identity provider (now: {now_in})" + (
                "" if verdict.allowed else f"; {verdict.message.removeprefix('guard: ')}"
            )
            await self.end(session_id, why)
            # As for any ended session: its holder's CLI says why and stops.
            raise NotFound(f"session {session_id} ended: {why}", hint="open a new session")
        fresh = _login_expiry(principal)
        if session.login_expires_at is not None and fresh is not None:
            session.login_expires_at = max(session.login_expires_at, fresh)
        return session

    async def revoke(
        self,
        by: Principal,
        reason: str,
        *,
        session_id: str | None = None,
        subject: str | None = None,
        target: str | None = None,
    ) -> list[str]:
        """End every live session matching all the given selectors (an auditor's
        revocation; `subject` matches a principal's subject or its label, as
        `guard sessions --all` shows it): gateway connections closed, leases revoked
        before this returns, each end recorded with who revoked it and why. The ids
        ended."""
        if session_id is None and subject is None and target is None:
            raise BadRequest(
                "a revocation names a session, a user or a target",
                hint="guard revoke SESSION | --user USER | --target TARGET",
            )
        chosen = [
            s
            for s in self.live()
            if (session_id is None or s.id == session_id)
            and (subject is None or subject in (s.principal.subject, s.principal.label))
            and (target is None or s.target == target)
        ]
        who = by.label if by.label == by.subject else f"{by.label} ({by.subject})"
        why = f"revoked by {who}: {reason}"
        log.warning("%s revokes %d session(s): %s", by.label, len(chosen), reason)
        # Concurrently: revoking a user's ten sessions takes as long as one.
        await asyncio.gather(*(self.end(s.id, why) for s in chosen))
        return [s.id for s in chosen]

    # -- open --------------------------------------------------------------------------
    async def open(
        self,
        principal: Principal,
        target: str,
        *,
        reason: str,
        ttl_seconds: int | None,
        heartbeat: bool = False,
        unmasked: bool = False,
    ) -> OpenedSession:
        verdict = self.policy.can_connect(principal, target)
        if not verdict.allowed:
            raise Forbidden(verdict.message, hint=self._targets_hint(principal))
        unmask = self._may_unmask(principal, target, reason) if unmasked else None
        capped = None
        if unmask is not None:
            access = self.policy.targets[target].unmasked
            assert access is not None  # can_unmask allowed it
            wanted = ttl_seconds or self.policy.targets[target].default_ttl_seconds
            if wanted > access.max_ttl_seconds:
                ttl_seconds = access.max_ttl_seconds
                capped = (
                    f"{target} allows unmasked sessions of at most "
                    f"{duration_text(access.max_ttl_seconds)} (the policy's "
                    "unmasked_access.max_ttl)"
                )
        key = (principal.issuer, principal.subject)
        self._check_limit(principal, target)
        self._opening[key] += 1
        try:
            opened = await self._open(principal, target, reason, ttl_seconds, heartbeat)
        finally:
            self._opening[key] -= 1
            if self._opening[key] <= 0:
                del self._opening[key]
        if unmask is not None:
            await self._start_unmask(opened.session, unmask)
        if capped is not None and opened.ttl_notice is None:
            opened = replace(opened, ttl_notice=capped)
        return opened

    # -- unmasked access -----------------------------------------------------------------
    def _may_unmask(self, principal: Principal, target: str, reason: str) -> Verdict:
        """The policy's answer to an unmasked session (ALLOW or REQUIRE_APPROVAL), or the
        refusal, before anything is issued."""
        verdict = self.policy.can_unmask(principal, target)
        if verdict.effect is Effect.DENY:
            raise Forbidden(verdict.message, hint="open a masked session: leave out --unmasked")
        if not reason.strip():
            raise BadRequest(
                "an unmasked session needs a reason: it is recorded, and approvers read it",
                hint='give one: --reason "fraud case 1234"',
            )
        settings = self.targets.get(target)
        enforceable = settings is not None and (
            settings.grants_dsn_file is not None or settings.admin_dsn_file is not None
        )
        if (
            self.grants is None
            or not enforceable
            or (verdict.effect is Effect.REQUIRE_APPROVAL and self.request_unmask is None)
        ):
            raise DependencyUnavailable(
                f"this broker cannot grant unmasked access on {target!r}",
                hint="the target needs grants_dsn_file (or admin_dsn_file) in the broker config",
            )
        return verdict

    async def _start_unmask(self, session: Session, verdict: Verdict) -> None:
        if verdict.effect is Effect.REQUIRE_APPROVAL:
            assert self.request_unmask is not None and verdict.approval is not None
            session.unmask_state = UNMASK_PENDING
            session.unmask_detail = verdict.message
            try:
                session.unmask_request = self.request_unmask(session, verdict.approval)
            except BaseException:
                await self.end(session.id, "the request for unmasked access could not be made")
                raise
            return
        groups = ", ".join(sorted(session.principal.groups & self._unmask_groups(session)))
        await self.unmask(session.id, f"allowed for members of {groups}")

    def _unmask_groups(self, session: Session) -> frozenset[str]:
        access = self.policy.targets[session.target].unmasked
        return access.groups if access is not None else frozenset()

    async def unmask(self, session_id: str, why: str) -> None:
        """Grant the session's role guard_unmasked (recorded first): connections made from
        now on read protected columns raw. If the record or the grant fails, the session
        ends and DependencyUnavailable is raised."""
        session = self._by_id.get(session_id)
        if session is None or session.ended:
            return
        assert self.grants is not None
        try:
            self._audit_or_refuse(
                SessionEvent(
                    session.id,
                    "unmasked",
                    session.principal.subject,
                    session.target,
                    f"{why}; reason: {session.reason}"[:500],
                )
            )
            await self.grants.grant_unmasked(session.target, session.credentials.username)
        except GuardError as exc:  # not recorded, or not granted: no half-unmasked session
            session.unmask_state, session.unmask_detail = "failed", exc.message
            await self.end(session.id, "the unmasked grant failed")
            raise DependencyUnavailable(
                f"unmasked access could not be granted: {exc.message}",
                hint=exc.hint or "ask the guard operator to check the broker log",
            ) from exc
        session.unmask_state, session.unmask_detail = UNMASK_GRANTED, why
        log.info("session %s reads %s unmasked: %s", session.id, session.target, why)

    def unmask_refused(self, session_id: str, state: str, detail: str) -> None:
        """The approval request ended without approval: the session stays masked."""
        session = self._by_id.get(session_id)
        if session is not None and session.unmask_state == UNMASK_PENDING:
            session.unmask_state, session.unmask_detail = state, detail

    def _check_limit(self, principal: Principal, target: str) -> None:
        key = (principal.issuer, principal.subject)
        limit = self.settings.max_sessions_per_principal
        count = self._opening[key] + len(self.held_by(principal))
        if count < limit:
            return
        try:
            self._audit(
                SessionEvent(
                    "",
                    "limit-reached",
                    principal.subject,
                    target,
                    f"{count} open sessions; the limit per principal is {limit}",
                )
            )
        except AuditUnavailable as exc:
            log.error("could not record a session limit refusal: %s", exc)
        log.warning("session limit reached for %s (%d open)", principal.label, count)
        raise TooManySessions(
            f"{principal.label} already has {count} open sessions; the limit is {limit}",
            hint="end one (quit its psql or guard exec) or wait until one expires, then retry",
        )

    async def _open(
        self,
        principal: Principal,
        target: str,
        reason: str,
        ttl_seconds: int | None,
        heartbeat: bool,
    ) -> OpenedSession:
        spec = self.policy.targets[target]
        upstream = self.targets.get(target)
        if upstream is None:
            raise DependencyUnavailable(
                f"target {target!r} is in the policy but not in the broker configuration",
                hint="add it under `targets:` in the broker config",
            )
        if self.verify_target is not None:
            await self.verify_target(target)
        ttl = min(ttl_seconds or spec.default_ttl_seconds, spec.max_ttl_seconds)
        notice = None
        if ttl_seconds is not None and ttl_seconds > spec.max_ttl_seconds:
            notice = (
                f"asked for {duration_text(ttl_seconds)}; {target} allows sessions of at most "
                f"{duration_text(spec.max_ttl_seconds)} (the policy's session_ttl.max)"
            )
        session_id = secrets.token_hex(8)
        # Opening the session is itself recorded before any credential exists.
        self._audit_or_refuse(
            SessionEvent(
                session_id,
                "requested",
                principal.subject,
                target,
                reason[:200],
                identity=identity_record(principal),
            )
        )
        try:
            creds = await asyncio.to_thread(self.issuer.issue, upstream.openbao_role, ttl)
        except Exception as exc:
            raise DependencyUnavailable(
                f"could not issue database credentials for {target!r}: {exc}",
                hint="check that OpenBao/Vault is running and the broker's token is valid",
            ) from exc
        now = self.clock()
        expires_at = min(now + timedelta(seconds=ttl), creds.expires_at)
        lease = int((creds.expires_at - now).total_seconds())
        if lease < ttl - LEASE_SLACK_SECONDS:
            notice = (
                f"the database credentials' lease lasts {duration_text(lease)}, not "
                f"{duration_text(ttl)}: the OpenBao role {upstream.openbao_role!r} allows no "
                "more (its max_ttl; the broker's operators can raise it)"
            )
        secret = secrets.token_urlsafe(32)
        credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
        grace = timedelta(seconds=self.settings.heartbeat_grace_seconds)
        session = Session(
            id=session_id,
            principal=principal,
            target=target,
            upstream=upstream,
            user=f"guard_{session_id}",
            verifier=make_verifier(secret),
            credentials=creds,
            expires_at=expires_at,
            reason=reason,
            credential_hash=credential_hash(credential),
            heartbeat_deadline=now + grace if heartbeat else None,
            opened_at=now,
            login_expires_at=_login_expiry(principal) if spec.reauthenticate else None,
        )
        self._opening_ids.add(session_id)
        try:
            await self._record_open(session, expires_at)
        finally:
            self._opening_ids.discard(session_id)
        self._by_id[session_id] = session
        self._by_user[session.user] = session
        log.info("session %s opened for %s on %s", session_id, principal.label, target)
        return OpenedSession(session, secret, credential, ttl_notice=notice)

    async def _record_open(self, session: Session, expires_at: datetime) -> None:
        """The state row and the `opened` record; if either fails, the session is marked
        ended in the state and its lease revoked (retried until done): nothing half-open."""
        principal = session.principal
        try:
            self.state.session_opened(
                session_id=session.id,
                issuer=principal.issuer,
                subject=principal.subject,
                groups=sorted(principal.groups),
                target=session.target,
                reason=session.reason,
                lease_id=session.credentials.lease_id,
                expires_at=expires_at,
            )
            self._audit_or_refuse(
                SessionEvent(
                    session.id,
                    "opened",
                    principal.subject,
                    session.target,
                    f"expires {expires_at.isoformat()}",
                )
            )
        except BaseException:
            await self._release_lease(session.id, session.credentials.lease_id, "open failed")
            raise

    def _audit_or_refuse(self, event: SessionEvent) -> None:
        try:
            self._audit(event)
        except AuditUnavailable as exc:
            log.error("session %s refused: %s", event.session_id, exc)
            raise AuditDown(
                "the broker cannot write its audit log, so no session can be opened now",
                hint="the broker's operators must fix the audit log's disk or permissions; "
                "retry when GET /v1/health answers ok",
            ) from exc

    async def _release_lease(
        self, session_id: str, lease_id: str, reason: str, *, wait: bool = True
    ) -> None:
        """Mark the session ended and owe its lease's revocation (persisted first), then
        try the revocation; a failure is retried by the queue. With `wait=False` the
        attempt runs in the background: the debt is already on disk, so a crash before it
        finishes is retried at the next start (`revoke_orphans`)."""
        try:
            self.state.session_ended(session_id, reason, revoke_lease=lease_id)
        except Exception as exc:  # noqa: BLE001 - the revocation is still attempted
            log.error("session %s: could not record its end in the state: %s", session_id, exc)
        if wait:
            await self.revocations.attempt(lease_id)
            return
        task = asyncio.get_running_loop().create_task(
            self.revocations.attempt(lease_id), name=f"revoke lease of session {session_id}"
        )
        self._revoking.add(task)
        task.add_done_callback(self._revoking.discard)

    # -- end ---------------------------------------------------------------------------
    async def end(self, session_id: str, reason: str, *, wait_for_revocation: bool = True) -> None:
        """End a session: its gateway connections close at once; its lease is revoked
        before this returns, or (`wait_for_revocation=False`, a client ending its own
        session: `guard exec` need not wait for OpenBao) right after, in the background."""
        session = self._by_id.get(session_id)
        if session is None or session.ended:
            return
        session.ended = True
        # The upstream SCRAM keys log in as the password does: not kept past the session.
        session.upstream_scram = ScramKeys()
        self._ended[session_id] = (reason, session.credential_hash)
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        for conn in list(session.connections):
            conn.close(reason)
        session.connections.clear()
        self._by_user.pop(session.user, None)
        for hook in self.on_end:
            try:
                await hook(session_id)
            except Exception as exc:  # noqa: BLE001 - logged; the session still ends
                log.error("ending session %s: %s failed: %s", session_id, hook, exc)
        await self._release_lease(
            session_id, session.credentials.lease_id, reason, wait=wait_for_revocation
        )
        # Only now may `reconcile` see the state row as another's: it is ended there.
        self._by_id.pop(session_id, None)
        try:
            self._audit(
                SessionEvent(session_id, "ended", session.principal.subject, session.target, reason)
            )
        except AuditUnavailable:
            log.error("could not record the end of session %s", session_id)
        log.info("session %s ended: %s", session_id, reason)

    async def end_expired(self) -> None:
        """End sessions past their TTL, those whose client stopped heartbeating, and those
        whose target requires reauthentication once their holder's login lapsed."""
        now = self.clock()
        for session in self.active():
            if session.expired_at(now):
                await self.end(session.id, "ttl expired")
            elif session.login_expires_at is not None and now >= session.login_expires_at:
                await self.end(
                    session.id,
                    "login not renewed: the ID token expired and no fresh one came (the "
                    "identity provider refused, or the CLI stopped); the policy requires "
                    "reauthentication",
                )
            elif session.heartbeat_deadline is not None and now >= session.heartbeat_deadline:
                grace = self.settings.heartbeat_grace_seconds
                await self.end(session.id, f"heartbeat lost (none for {grace:g} s)")

    async def end_all(self, reason: str) -> None:
        for session in self.active():
            await self.end(session.id, reason)
        if self._revoking:  # revocations of sessions clients ended just before
            await asyncio.gather(*self._revoking, return_exceptions=True)

    async def revoke_orphans(self) -> None:
        """At start: revoke leases of sessions a previous broker run never ended, and go on
        with the revocations it still owed."""
        await self.reconcile("broker restarted", force=True)

    async def reconcile(self, reason: str = "no live session holds its lease", *, force=False):
        """Compare the leases the state holds open with the live sessions: a lease no live
        session owns is marked ended and revoked. Then retry the revocations that are due
        (all of them with `force`)."""
        orphans = [
            (session_id, lease_id)
            for session_id, lease_id in self.state.open_leases()
            if session_id not in self._by_id and session_id not in self._opening_ids
        ]
        for session_id, lease_id in orphans:
            log.warning("session %s: revoking its lease (%s)", session_id, reason)
            try:
                self.state.session_ended(session_id, reason, revoke_lease=lease_id)
            except Exception as exc:  # noqa: BLE001 - tried again at the next reconcile
                log.error("session %s: could not record its end: %s", session_id, exc)
        await self.revocations.retry_due(force=force or bool(orphans))

    def _audit(self, event: SessionEvent) -> None:
        self.audit.append(event)
