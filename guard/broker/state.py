"""Broker state in SQLite: sessions and their leases (the seam for a PostgreSQL store later).

Does file I/O through sqlite3 only. Credentials are never stored: only the lease id, so a
restarted broker can revoke leases its previous run left open.
"""

from __future__ import annotations

import sqlite3
import threading
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
"""


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

    def session_ended(self, session_id: str, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET ended_at = ?, end_reason = ?"
                " WHERE id = ? AND ended_at IS NULL",
                (datetime.now(UTC).isoformat(), reason, session_id),
            )

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
