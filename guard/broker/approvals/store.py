"""Where approval requests live: an `ApprovalStore` protocol, SQLite, and a dict for tests.

`SqliteApprovalStore` keeps requests in the broker's state file (the one `state.py`'s
`SqliteStateStore` uses, or any other) so they survive a broker restart. File I/O through
sqlite3 only, on its own connection; imports the stdlib and `approvals.model` only, and must
never import asyncio or anything that talks to the network. Calls block on the local file
(short, indexed statements). `MemoryApprovalStore` is the same contract in a dict, for tests.

The stores persist exactly the immutable values `model.py` returns and decide nothing —
except `expire_all_pending`, which the broker calls at start: a previous run's sessions
are gone, so their pending requests can never be answered.

Representation (SQLite): one `approval_requests` row per request and one
`approval_decisions` row per decision, in order. Datetimes are ISO 8601 UTC text with
microseconds (so text order is time order) and come back as aware UTC datetimes; a naive
datetime is refused rather than guessed. Sets of groups are JSON lists, sorted; the tables
tuple is a JSON list in its own order. Reading back gives a request equal to the one saved.

Ordering: `pending()` oldest first, `by_requester()` newest first; requests created at
the same instant are ordered by id, so both stores agree.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from guard.broker.approvals.model import ApprovalRequest, Decision, Person, RequestState


class ApprovalStore(Protocol):
    def save(self, request: ApprovalRequest) -> None:
        """Insert or replace the request and all its decisions, atomically."""

    def get(self, request_id: str) -> ApprovalRequest | None: ...

    def pending(self) -> list[ApprovalRequest]:
        """Requests still pending, oldest first."""

    def by_requester(self, subject: str, limit: int = 50) -> list[ApprovalRequest]:
        """The requests of this subject (under any issuer), newest first."""

    def expire_all_pending(self, reason: str, now: datetime) -> list[ApprovalRequest]:
        """Expire every pending request (broker start); returns the changed requests."""

    def close(self) -> None: ...


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment.isoformat()}: approval times must be aware")
    return moment.astimezone(UTC)


def _in_utc(request: ApprovalRequest) -> ApprovalRequest:
    """The same request with every time in UTC (equal to it); a naive time is refused."""
    return replace(
        request,
        created_at=_utc(request.created_at),
        expires_at=_utc(request.expires_at),
        decisions=tuple(replace(d, at=_utc(d.at)) for d in request.decisions),
    )


def expired_at_start(request: ApprovalRequest, reason: str, now: datetime) -> ApprovalRequest:
    """A pending request left by a previous broker run, expired as of `now`.

    Unlike `model.expire` this does not wait for `expires_at`: the session that would use
    the approval is gone. `expires_at` becomes `now` when that is earlier, so the stored
    request says when it stopped being decidable.
    """
    return replace(
        request,
        state=RequestState.EXPIRED,
        state_reason=reason,
        expires_at=min(request.expires_at, _utc(now)),
    )


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")


def _oldest_first(request: ApprovalRequest) -> tuple[datetime, str]:
    return (request.created_at, request.id)


class MemoryApprovalStore:
    """The `ApprovalStore` contract in a dict; for tests (nothing survives the process)."""

    def __init__(self) -> None:
        self._requests: dict[str, ApprovalRequest] = {}
        self._lock = threading.Lock()

    def save(self, request: ApprovalRequest) -> None:
        in_utc = _in_utc(request)  # as SQLite gives it back
        with self._lock:
            self._requests[request.id] = in_utc

    def get(self, request_id: str) -> ApprovalRequest | None:
        with self._lock:
            return self._requests.get(request_id)

    def pending(self) -> list[ApprovalRequest]:
        with self._lock:
            found = [r for r in self._requests.values() if r.state is RequestState.PENDING]
        return sorted(found, key=_oldest_first)

    def by_requester(self, subject: str, limit: int = 50) -> list[ApprovalRequest]:
        _check_limit(limit)
        with self._lock:
            found = [r for r in self._requests.values() if r.requester.subject == subject]
        return sorted(found, key=_oldest_first, reverse=True)[:limit]

    def expire_all_pending(self, reason: str, now: datetime) -> list[ApprovalRequest]:
        _utc(now)
        with self._lock:
            pending = [r for r in self._requests.values() if r.state is RequestState.PENDING]
            pending.sort(key=_oldest_first)
            changed = [expired_at_start(r, reason, now) for r in pending]
            for request in changed:
                self._requests[request.id] = request
        return changed

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS approval_requests (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    target TEXT NOT NULL,
    requester_issuer TEXT NOT NULL,
    requester_subject TEXT NOT NULL,
    requester_label TEXT NOT NULL,
    requester_groups TEXT NOT NULL,
    session_reason TEXT NOT NULL,
    statement TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    tables TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    approver_groups TEXT NOT NULL,
    approvals_required INTEGER NOT NULL,
    window_seconds INTEGER,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    state TEXT NOT NULL,
    state_reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approval_requests_state
    ON approval_requests (state, created_at, id);
CREATE INDEX IF NOT EXISTS approval_requests_requester
    ON approval_requests (requester_subject, created_at, id);
CREATE TABLE IF NOT EXISTS approval_decisions (
    request_id TEXT NOT NULL REFERENCES approval_requests (id),
    seq INTEGER NOT NULL,
    approver_issuer TEXT NOT NULL,
    approver_subject TEXT NOT NULL,
    approver_label TEXT NOT NULL,
    approver_groups TEXT NOT NULL,
    approve INTEGER NOT NULL,
    comment TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (request_id, seq)
);
"""

_REQUEST_COLUMNS = (
    "id, session_id, target, requester_issuer, requester_subject, requester_label,"
    " requester_groups, session_reason, statement, fingerprint, tables, rule_id,"
    " approver_groups, approvals_required, window_seconds, created_at, expires_at, state,"
    " state_reason"
)
_UPSERT = (
    f"INSERT INTO approval_requests ({_REQUEST_COLUMNS})"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (id) DO UPDATE SET"
    " session_id = excluded.session_id, target = excluded.target,"
    " requester_issuer = excluded.requester_issuer,"
    " requester_subject = excluded.requester_subject,"
    " requester_label = excluded.requester_label,"
    " requester_groups = excluded.requester_groups,"
    " session_reason = excluded.session_reason, statement = excluded.statement,"
    " fingerprint = excluded.fingerprint, tables = excluded.tables,"
    " rule_id = excluded.rule_id, approver_groups = excluded.approver_groups,"
    " approvals_required = excluded.approvals_required,"
    " window_seconds = excluded.window_seconds, created_at = excluded.created_at,"
    " expires_at = excluded.expires_at, state = excluded.state,"
    " state_reason = excluded.state_reason"
)
_DECISION_COLUMNS = (
    "request_id, seq, approver_issuer, approver_subject, approver_label, approver_groups,"
    " approve, comment, at"
)
_PENDING = ("state = ?", "created_at ASC, id ASC")
_BY_REQUESTER = ("requester_subject = ?", "created_at DESC, id DESC")


def _time_text(moment: datetime) -> str:
    return _utc(moment).isoformat(timespec="microseconds")


def _time_value(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _groups_text(groups: frozenset[str]) -> str:
    return json.dumps(sorted(groups), ensure_ascii=False)


def _groups_value(text: str) -> frozenset[str]:
    return frozenset(str(g) for g in json.loads(text))


def _request_row(request: ApprovalRequest) -> tuple[object, ...]:
    who = request.requester
    return (
        request.id,
        request.session_id,
        request.target,
        who.issuer,
        who.subject,
        who.label,
        _groups_text(who.groups),
        request.session_reason,
        request.statement,
        request.fingerprint,
        json.dumps(list(request.tables), ensure_ascii=False),
        request.rule_id,
        _groups_text(request.approver_groups),
        request.approvals_required,
        request.window_seconds,
        _time_text(request.created_at),
        _time_text(request.expires_at),
        request.state.value,
        request.state_reason,
    )


def _decision_rows(request: ApprovalRequest) -> list[tuple[object, ...]]:
    return [
        (
            request.id,
            seq,
            d.approver.issuer,
            d.approver.subject,
            d.approver.label,
            _groups_text(d.approver.groups),
            int(d.approve),
            d.comment,
            _time_text(d.at),
        )
        for seq, d in enumerate(request.decisions)
    ]


def _decision(row: Sequence[Any]) -> Decision:
    # row: request_id, seq, issuer, subject, label, groups, approve, comment, at
    approver = Person(str(row[2]), str(row[3]), str(row[4]), _groups_value(row[5]))
    return Decision(approver, bool(row[6]), str(row[7]), _time_value(row[8]))


def _request(row: Sequence[Any], decisions: Iterable[Decision]) -> ApprovalRequest:
    window = row[14]
    return ApprovalRequest(
        id=str(row[0]),
        session_id=str(row[1]),
        target=str(row[2]),
        requester=Person(str(row[3]), str(row[4]), str(row[5]), _groups_value(row[6])),
        session_reason=str(row[7]),
        statement=str(row[8]),
        fingerprint=str(row[9]),
        tables=tuple(str(t) for t in json.loads(row[10])),
        rule_id=str(row[11]),
        approver_groups=_groups_value(row[12]),
        approvals_required=int(row[13]),
        window_seconds=None if window is None else int(window),
        created_at=_time_value(row[15]),
        expires_at=_time_value(row[16]),
        state=RequestState(row[17]),
        state_reason=str(row[18]),
        decisions=tuple(decisions),
    )


class SqliteApprovalStore:
    """Approval requests in a SQLite file, shareable with `SqliteStateStore` (WAL mode)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def save(self, request: ApprovalRequest) -> None:
        row, decisions = _request_row(request), _decision_rows(request)
        with self._lock:
            self._write(lambda: self._put(row, decisions))

    def get(self, request_id: str) -> ApprovalRequest | None:
        found = self._select("id = ?", "id", (request_id,), limit=1)
        return found[0] if found else None

    def pending(self) -> list[ApprovalRequest]:
        where, order = _PENDING
        return self._select(where, order, (RequestState.PENDING.value,), limit=-1)

    def by_requester(self, subject: str, limit: int = 50) -> list[ApprovalRequest]:
        _check_limit(limit)
        where, order = _BY_REQUESTER
        return self._select(where, order, (subject,), limit=limit)

    def expire_all_pending(self, reason: str, now: datetime) -> list[ApprovalRequest]:
        _utc(now)
        changed: list[ApprovalRequest] = []

        def expire_them() -> None:
            where, order = _PENDING
            pending = self._read(where, order, (RequestState.PENDING.value,), -1)
            changed.extend(expired_at_start(r, reason, now) for r in pending)
            for request in changed:
                self._put(_request_row(request), _decision_rows(request))

        with self._lock:
            self._write(expire_them)
        return changed

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- internals (called with the lock held) ---------------------------------------------

    def _write(self, body: Callable[[], None]) -> None:
        # BEGIN IMMEDIATE takes the file's write lock up front, so a writer on another
        # connection to the same file (the state store) makes us wait (sqlite3's busy
        # timeout) instead of failing a read-to-write upgrade halfway.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            body()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _put(self, row: tuple[object, ...], decisions: list[tuple[object, ...]]) -> None:
        self._db.execute(_UPSERT, row)
        self._db.execute("DELETE FROM approval_decisions WHERE request_id = ?", (row[0],))
        self._db.executemany(
            f"INSERT INTO approval_decisions ({_DECISION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
            decisions,
        )

    def _select(
        self, where: str, order: str, params: tuple[object, ...], *, limit: int
    ) -> list[ApprovalRequest]:
        with self._lock:
            # One read transaction: the requests and their decisions from the same snapshot.
            self._db.execute("BEGIN")
            try:
                return self._read(where, order, params, limit)
            finally:
                self._db.execute("COMMIT")

    def _read(
        self, where: str, order: str, params: tuple[object, ...], limit: int
    ) -> list[ApprovalRequest]:
        chosen = f"SELECT id FROM approval_requests WHERE {where} ORDER BY {order} LIMIT ?"
        rows = self._db.execute(
            f"SELECT {_REQUEST_COLUMNS} FROM approval_requests"
            f" WHERE {where} ORDER BY {order} LIMIT ?",
            (*params, limit),
        ).fetchall()
        by_request: dict[str, list[Decision]] = {str(r[0]): [] for r in rows}
        for d in self._db.execute(
            f"SELECT {_DECISION_COLUMNS} FROM approval_decisions"
            f" WHERE request_id IN ({chosen}) ORDER BY request_id, seq",
            (*params, limit),
        ):
            by_request[str(d[0])].append(_decision(d))
        return [_request(r, by_request[str(r[0])]) for r in rows]
