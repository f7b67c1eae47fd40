"""Sessions: who may reach which target until when, and the lease behind it.

A session is opened by the API for a verified principal whose groups the policy lets
connect, with a credential lease cut to the session TTL. The gateway looks sessions up by
their gateway user name and authenticates clients against the session's SCRAM verifier
(the broker keeps the verifier, never the secret it handed out). Ending a session — by the
client, by TTL, or at broker shutdown — closes every gateway connection of the session and
revokes the lease (whose revocation statements terminate the role's backends).

Imports the credential issuer protocol, policy, audit and state; no sockets of its own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from guard.broker.audit.record import SessionEvent
from guard.broker.audit.sink import AuditSink, AuditUnavailable
from guard.broker.credentials.issuer import CredentialIssuer, IssuedCredentials
from guard.broker.errors import DependencyUnavailable, Forbidden, NotFound
from guard.broker.identity.principal import Principal
from guard.broker.pgwire.scram import ScramVerifier, make_verifier
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.settings import TargetSettings
from guard.broker.state import SqliteStateStore

log = logging.getLogger("guard.sessions")


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
    connections: set[ConnectionHandle] = field(default_factory=set)
    ended: bool = False

    def expired_at(self, now: datetime) -> bool:
        """Whether the session's time is up at `now` (the manager's clock, never the wall's)."""
        return now >= self.expires_at


@dataclass(frozen=True)
class OpenedSession:
    session: Session
    secret: str = field(repr=False)


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
    ) -> None:
        self.policy = policy
        self.targets = targets
        self.issuer = issuer
        self.audit = audit
        self.state = state
        self.clock = clock
        self._by_id: dict[str, Session] = {}
        self._by_user: dict[str, Session] = {}
        # Called with the session id when a session ends (its approvals are withdrawn).
        self.on_end: list[Callable[[str], Awaitable[None]]] = []

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

    # -- open --------------------------------------------------------------------------
    async def open(
        self, principal: Principal, target: str, *, reason: str, ttl_seconds: int | None
    ) -> OpenedSession:
        verdict = self.policy.can_connect(principal, target)
        if not verdict.allowed:
            raise Forbidden(verdict.message)
        spec = self.policy.targets[target]
        upstream = self.targets.get(target)
        if upstream is None:
            raise DependencyUnavailable(
                f"target {target!r} is in the policy but not in the broker configuration",
                hint="add it under `targets:` in the broker config",
            )
        ttl = min(ttl_seconds or spec.default_ttl_seconds, spec.max_ttl_seconds)
        session_id = secrets.token_hex(8)
        # Opening the session is itself recorded before any credential exists.
        self._audit(SessionEvent(session_id, "requested", principal.subject, target, reason[:200]))
        try:
            creds = await asyncio.to_thread(self.issuer.issue, upstream.openbao_role, ttl)
        except Exception as exc:
            raise DependencyUnavailable(
                f"could not issue database credentials for {target!r}: {exc}",
                hint="check that OpenBao/Vault is running and the broker's token is valid",
            ) from exc
        expires_at = min(self.clock() + timedelta(seconds=ttl), creds.expires_at)
        secret = secrets.token_urlsafe(32)
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
        )
        try:
            self.state.session_opened(
                session_id=session_id,
                issuer=principal.issuer,
                subject=principal.subject,
                groups=sorted(principal.groups),
                target=target,
                reason=reason,
                lease_id=creds.lease_id,
                expires_at=expires_at,
            )
            self._audit(
                SessionEvent(
                    session_id,
                    "opened",
                    principal.subject,
                    target,
                    f"expires {expires_at.isoformat()}",
                )
            )
        except Exception:
            await asyncio.to_thread(self._revoke_quietly, creds.lease_id)
            raise
        self._by_id[session_id] = session
        self._by_user[session.user] = session
        log.info("session %s opened for %s on %s", session_id, principal.label, target)
        return OpenedSession(session, secret)

    # -- end ---------------------------------------------------------------------------
    async def end(self, session_id: str, reason: str) -> None:
        session = self._by_id.get(session_id)
        if session is None or session.ended:
            return
        session.ended = True
        for conn in list(session.connections):
            conn.close(reason)
        session.connections.clear()
        self._by_user.pop(session.user, None)
        for hook in self.on_end:
            try:
                await hook(session_id)
            except Exception as exc:  # noqa: BLE001 - logged; the session still ends
                log.error("ending session %s: %s failed: %s", session_id, hook, exc)
        await asyncio.to_thread(self._revoke_quietly, session.credentials.lease_id)
        self.state.session_ended(session_id, reason)
        try:
            self._audit(
                SessionEvent(session_id, "ended", session.principal.subject, session.target, reason)
            )
        except AuditUnavailable:
            log.error("could not record the end of session %s", session_id)
        log.info("session %s ended: %s", session_id, reason)

    async def end_expired(self) -> None:
        now = self.clock()
        for session in self.active():
            if session.expired_at(now):
                await self.end(session.id, "ttl expired")

    async def end_all(self, reason: str) -> None:
        for session in self.active():
            await self.end(session.id, reason)

    async def revoke_orphans(self) -> None:
        """Revoke leases of sessions a previous broker run never ended."""
        for session_id, lease_id in self.state.open_leases():
            if session_id in self._by_id:
                continue
            await asyncio.to_thread(self._revoke_quietly, lease_id)
            self.state.session_ended(session_id, "broker restarted")

    def _revoke_quietly(self, lease_id: str) -> None:
        try:
            self.issuer.revoke(lease_id)
        except Exception as exc:  # noqa: BLE001 - logged; the lease still expires by TTL
            log.error("lease revocation failed (it will still expire at its TTL): %s", exc)

    def _audit(self, event: SessionEvent) -> None:
        self.audit.append(event)
