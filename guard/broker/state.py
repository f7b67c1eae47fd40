"""Broker state in SQLite: sessions, their leases and the revocations still owed.

Does file I/O through sqlite3 only (the seam for a PostgreSQL store later). Credentials
are never stored: only lease ids, so a restarted broker can revoke leases its previous run
left open and go on retrying revocations OpenBao refused (`pending_revocations`).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    groups TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    ended_at TEXT,
    end_reason TEXT
);
CREATE TABLE IF NOT EXISTS pending_revocations (
    lease_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class PendingRevocation:
    lease_id: str
    session_id: str
    reason: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None


class SqliteStateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def session_opened(
        self,
        *,
        session_id: str,
        issuer: str,
        subject: str,
        groups: list[str],
        target: str,
        reason: str,
        lease_id: str,
        expires_at: datetime,
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions (id, issuer, subject, groups, target, reason, lease_id,"
                " created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    session_id,
                    issuer,
                    subject,
                    ",".join(groups),
                    target,
                    reason,
                    lease_id,
                    datetime.now(UTC).isoformat(),
                    expires_at.isoformat(),
                ),
            )

    def session_extended(self, session_id: str, expires_at: datetime) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET expires_at = ? WHERE id = ? AND ended_at IS NULL",
                (expires_at.isoformat(), session_id),
            )

    def session_ended(
        self, session_id: str, reason: str, *, revoke_lease: str | None = None
    ) -> None:
        """Mark the session ended and, in the same transaction, owe its lease's revocation
        (`revoke_lease`): a crash after this still leaves the revocation to be done."""
        now = datetime.now(UTC).isoformat()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE sessions SET ended_at = ?, end_reason = ?"
                    " WHERE id = ? AND ended_at IS NULL",
                    (now, reason, session_id),
                )
                if revoke_lease is not None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO pending_revocations"
                        " (lease_id, session_id, reason, next_attempt_at, created_at)"
                        " VALUES (?,?,?,?,?)",
                        (revoke_lease, session_id, reason, now, now),
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- revocations still owed ------------------------------------------------------------
    def pending_revocations(self) -> list[PendingRevocation]:
        with self._lock:
            rows = self._db.execute(
                "SELECT lease_id, session_id, reason, attempts, next_attempt_at, last_error"
                " FROM pending_revocations ORDER BY created_at"
            ).fetchall()
        return [
            PendingRevocation(r[0], r[1], r[2], r[3], datetime.fromisoformat(r[4]), r[5])
            for r in rows
        ]

    def revocation_failed(
        self, lease_id: str, *, attempts: int, next_attempt_at: datetime, error: str
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE pending_revocations SET attempts = ?, next_attempt_at = ?,"
                " last_error = ? WHERE lease_id = ?",
                (attempts, next_attempt_at.isoformat(), error[:500], lease_id),
            )

    def revocation_done(self, lease_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM pending_revocations WHERE lease_id = ?", (lease_id,))

    def open_leases(self) -> list[tuple[str, str]]:
        """(session id, lease id) of sessions never marked ended (a crashed broker's)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, lease_id FROM sessions WHERE ended_at IS NULL"
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
