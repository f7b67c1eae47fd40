"""Lease revocation that does not give up: persisted, retried with backoff until it succeeds.

A session's end first records in the state (one transaction with the session's end) that
its lease is owed a revocation, then tries it. A failure (OpenBao down, its database
unreachable) leaves the row in `pending_revocations` with the next attempt's time; the
broker's loop calls `retry_due` and the delay doubles from `initial_backoff` up to
`max_backoff`. A restarted broker finds the rows and goes on (`retry_due(force=True)` at
start). Revoking a lease OpenBao no longer knows succeeds, so retries converge.

While any revocation is failing, `failing()` says so, and `/v1/health` reports the broker
degraded. Imports the credential issuer protocol and the state store; no sockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from guard.broker.credentials.issuer import CredentialIssuer
from guard.broker.state import SqliteStateStore

log = logging.getLogger("guard.revocation")


def describe(exc: BaseException) -> str:
    """A short text of a failure: a domain error's message (it never holds a token),
    otherwise the exception's type only."""
    message = getattr(exc, "message", None)
    return str(message)[:300] if isinstance(message, str) else type(exc).__name__


class RevocationQueue:
    def __init__(
        self,
        issuer: CredentialIssuer,
        state: SqliteStateStore,
        *,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.issuer = issuer
        self.state = state
        self.initial_backoff = initial_backoff
        self.max_backoff = max(max_backoff, initial_backoff)
        self.clock = clock
        self._in_flight: set[str] = set()
        # lease id -> the last error of a revocation that is still owed
        self._failing: dict[str, str] = {}

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1, 2, …)."""
        return float(min(self.max_backoff, self.initial_backoff * 2 ** max(attempts - 1, 0)))

    async def attempt(self, lease_id: str, *, previous_attempts: int = 0) -> bool:
        """Try to revoke one owed lease now; True once it is revoked. The lease must have
        been recorded as owed first (`state.session_ended(..., revoke_lease=...)`)."""
        if lease_id in self._in_flight:
            return False
        self._in_flight.add(lease_id)
        try:
            await asyncio.to_thread(self.issuer.revoke, lease_id)
        except Exception as exc:  # noqa: BLE001 - every failure is retried
            attempts = previous_attempts + 1
            delay = self.backoff(attempts)
            error = describe(exc)
            self._failing[lease_id] = error
            self.state.revocation_failed(
                lease_id,
                attempts=attempts,
                next_attempt_at=self.clock() + timedelta(seconds=delay),
                error=error,
            )
            log.warning(
                "lease revocation failed (attempt %d; retrying in %.1f s): %s",
                attempts,
                delay,
                error,
            )
            return False
        finally:
            self._in_flight.discard(lease_id)
        self.state.revocation_done(lease_id)
        if self._failing.pop(lease_id, None) is not None or previous_attempts:
            log.info("lease revoked after %d failed attempt(s)", previous_attempts)
        return True

    async def retry_due(self, *, force: bool = False) -> None:
        """Attempt every owed revocation whose time has come (all of them with `force`)."""
        now = self.clock()
        for pending in self.state.pending_revocations():
            if force or pending.next_attempt_at <= now:
                await self.attempt(pending.lease_id, previous_attempts=pending.attempts)

    def failing(self) -> str | None:
        """Why revocations are failing now, or None."""
        if not self._failing:
            return None
        last = next(reversed(self._failing.values()))
        count = len(self._failing)
        return (
            f"openbao: {count} lease revocation{'s' if count > 1 else ''} failing, "
            f"retried with backoff: {last}"
        )
