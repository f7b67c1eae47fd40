"""What the gateway asks the broker about sessions: find one, admit a connection, release it.

In one process (`LocalDirectory`) the answers come from the `SessionManager`; in a gateway
worker process (`proxy.worker`) from the broker over its control channel. Either way the
broker's session is the one truth: `admit` is where a connection is counted against the
session's limit and registered, so ending the session (client, TTL, revocation, shutdown)
closes it in whichever process it lives.

Imports the session and policy types; no sockets of its own.
"""

from __future__ import annotations

from typing import Protocol

from guard.broker.policy.engine import CompiledPolicy
from guard.broker.sessions import ConnectionHandle, Session, SessionManager

# Why `admit` refused a connection (None: admitted).
ENDED = "ended"  # the session ended (or expired) since the client proved it
AT_LIMIT = "limit"  # the session holds max_connections_per_session already


class SessionDirectory(Protocol):
    async def find(self, user: str) -> Session | None:
        """The live session whose gateway user is `user`, or None."""
        ...

    def is_live(self, session: Session) -> bool:
        """Neither ended nor past its expiry, as far as this process knows."""
        ...

    async def admit(self, session: Session, handle: ConnectionHandle) -> str | None:
        """Count a connection against its session and register `handle`, so the session's
        end closes it; None, or why not (`ENDED`, `AT_LIMIT`)."""
        ...

    def release(self, session: Session, handle: ConnectionHandle) -> None:
        """The connection admitted with `handle` is gone (once per admitted handle)."""
        ...


class LocalDirectory:
    """The gateway and the session manager in one process."""

    def __init__(self, sessions: SessionManager, policy: CompiledPolicy) -> None:
        self.sessions = sessions
        self.policy = policy
        self._count: dict[str, int] = {}

    async def find(self, user: str) -> Session | None:
        return self.sessions.by_user(user)

    def is_live(self, session: Session) -> bool:
        return self.sessions.is_live(session)

    async def admit(self, session: Session, handle: ConnectionHandle) -> str | None:
        return admit_connection(self.sessions, self.policy, self._count, session, handle)

    def release(self, session: Session, handle: ConnectionHandle) -> None:
        release_connection(self._count, session, handle)


def admit_connection(
    sessions: SessionManager,
    policy: CompiledPolicy,
    count: dict[str, int],
    session: Session,
    handle: ConnectionHandle,
) -> str | None:
    """`SessionDirectory.admit` over the broker's own session (`count`: connections per
    session id, the caller's). One session cannot take the database's max_connections from
    everyone else: the target's limit in the policy (the issued role's CONNECTION LIMIT is
    the database's own backstop)."""
    if not sessions.is_live(session):
        return ENDED
    if count.get(session.id, 0) >= policy.targets[session.target].max_connections_per_session:
        return AT_LIMIT
    count[session.id] = count.get(session.id, 0) + 1
    session.connections.add(handle)
    return None


def release_connection(count: dict[str, int], session: Session, handle: ConnectionHandle) -> None:
    """Undo `admit_connection` (called once per admitted handle)."""
    session.connections.discard(handle)
    left = count.pop(session.id, 1) - 1
    if left > 0:
        count[session.id] = left
