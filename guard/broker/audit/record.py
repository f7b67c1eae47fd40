"""What one audit record says: who ran which statement, under which verdict, with what result.

Imports only the stdlib. A record has no field that could hold a result value or a
statement literal: statements are stored as their fingerprint plus normalized text
(constants replaced by `$n` by the analyzer), and results only as counts and column ids.
That is what stops the audit log itself from becoming a copy of the protected data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any


def _body(record: Any) -> dict[str, Any]:
    # Shallow on purpose: every field is a str/int/None or a tuple of str, all JSON-ready.
    # dataclasses.asdict deep-copies and cost ~60 µs per record on the hot path.
    names = _FIELDS.get(type(record))
    if names is None:
        names = _FIELDS[type(record)] = tuple(f.name for f in fields(record))
    return {name: getattr(record, name) for name in names}


_FIELDS: dict[type, tuple[str, ...]] = {}


_second: list[object] = [None, ""]


def iso_from_ns(ns: int) -> str:
    """RFC 3339 UTC time with microseconds; the formatted second is cached (hot path)."""
    sec, micros = divmod(ns // 1000, 1_000_000)
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{micros:06d}Z"


def utc_now_iso() -> str:
    return iso_from_ns(time.time_ns())


# A ResultRecord's own fields, in order: the hot path queues just these values (a tuple)
# and the sink writes them in a batch (`serialize.result_entries_py` and its compiled
# twin), which `expand` turns back into the record's body (`result_body`; a test holds
# both to the ResultRecord dataclass).
RESULT_FIELDS = (
    "session_id",
    "connection_id",
    "statement_seq",
    "outcome",
    "command_tag",
    "rows",
    "masked_cells",
    "sqlstate",
    "view_masked_cells",
    "unmasked_cells",
)


def result_body(values: tuple[Any, ...], time: str) -> dict[str, Any]:
    """The body of the ResultRecord with these RESULT_FIELDS values, written at `time`."""
    session, connection, seq, outcome, tag, rows, masked, sqlstate, view_masked, unmasked = values
    return {
        "session_id": session,
        "connection_id": connection,
        "statement_seq": seq,
        "outcome": outcome,
        "command_tag": tag,
        "rows": rows,
        "masked_cells": masked,
        "sqlstate": sqlstate,
        "view_masked_cells": view_masked,
        "unmasked_cells": unmasked,
        "kind": "result",
        "time": time,
    }


def expand(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The records one stored body stands for.

    Result records are stored in batches (`kind: results`, see audit.sink), one entry per
    statement result; readers see them as the individual `result` records they are. An
    entry is the record's body itself (after-the-fact records the sink was given whole,
    and every result of a log written before issue 13's compact batches), or an array:
    the index of its (session_id, connection_id) pair in the batch's `ids`, then the
    other `RESULT_FIELDS` values and the time (`serialize.result_entries_py`). The
    array holds what the body would, without its eleven keys and the two ids that every
    result of a connection repeats: a third of the bytes the chain hashes and the log
    stores for each result.
    """
    if body.get("kind") != "results":
        return [body]
    ids = body.get("ids", ())
    return [
        entry if isinstance(entry, dict) else result_body((*ids[entry[0]], *entry[1:-1]), entry[-1])
        for entry in body.get("results", ())
    ]


@dataclass(frozen=True, slots=True)
class StatementRecord:
    """Written before a statement is forwarded (or instead of forwarding it, when refused)."""

    session_id: str
    connection_id: str
    principal: str
    issuer: str
    groups: tuple[str, ...]
    target: str
    protocol: str  # "simple" | "extended" | "fast-path"
    fingerprint: str
    statement: str  # normalized text: literals replaced by placeholders
    operations: tuple[str, ...]
    tables: tuple[str, ...]
    verdict: str  # allow | deny | require_approval
    rule: str
    masked_columns: tuple[str, ...] = ()
    # How each protected value the statement reads is masked, never a value: one
    # "<relation or column>:<layer>" entry per masked column or twin view — `view` (the
    # name resolved to its masking view), `redirected` (the gateway pointed a spelling
    # of the base table at its view), `twin` (a view of the target read through its
    # masked twin), `unmasked` (an unmasked session read the column raw, through
    # guard_unmasked). Cells the gateway itself had to mask are counted in ResultRecord.
    masking: tuple[str, ...] = ()
    kind: str = "statement"
    time: str = field(default_factory=utc_now_iso)

    def to_body(self) -> dict[str, Any]:
        return _body(self)


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """Written when upstream finished a forwarded statement: counts, never values."""

    session_id: str
    connection_id: str
    statement_seq: int  # the `seq` of the StatementRecord this result belongs to
    outcome: str  # "ok" | "error"
    command_tag: str = ""
    rows: int | None = None
    # Cells the gateway itself masked (a protected base column in a result: drift).
    masked_cells: int = 0
    sqlstate: str | None = None
    # Cells the masking views masked: rows × the result's columns that are masked columns
    # of a masking view (by table OID and attribute number, never by name).
    view_masked_cells: int = 0
    # Cells an unmasked session read raw: rows × the result's columns that are protected
    # columns of guard_unmasked's raw views.
    unmasked_cells: int = 0
    kind: str = "result"
    time: str = field(default_factory=utc_now_iso)

    def to_body(self) -> dict[str, Any]:
        return _body(self)


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """Session lifecycle: opened, connection accepted, ended (and why)."""

    session_id: str
    event: str
    principal: str
    target: str
    detail: str = ""
    # On the `requested` record: how the principal was proven (`identity_record`).
    identity: dict[str, Any] | None = None
    kind: str = "session"
    time: str = field(default_factory=utc_now_iso)

    def to_body(self) -> dict[str, Any]:
        return _body(self)


@dataclass(frozen=True, slots=True)
class ApprovalEvent:
    """An approval request's life: requested, each vote, approved/denied/expired/withdrawn,
    the database grant given and taken back. `actor` is who acted (the requester, an
    approver with the groups their own token carried then, or "guard")."""

    request_id: str
    session_id: str
    event: str
    actor: str
    actor_issuer: str
    actor_groups: tuple[str, ...]
    target: str
    rule: str
    detail: str = ""
    kind: str = "approval"
    time: str = field(default_factory=utc_now_iso)

    def to_body(self) -> dict[str, Any]:
        return _body(self)


@dataclass(frozen=True, slots=True)
class BackstopEvent:
    """A change of a target's database backstop (`guard target apply`): who asked, how many
    statements ran and their SHA-256 (the statements themselves are `guard target plan`'s
    output, reproducible from the policy and catalog), and the drift left after it."""

    target: str
    event: str  # requested | applied | failed
    actor: str
    actor_issuer: str
    statements: int = 0
    digest: str = ""
    detail: str = ""
    kind: str = "backstop"
    time: str = field(default_factory=utc_now_iso)

    def to_body(self) -> dict[str, Any]:
        return _body(self)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """The audit log's own events, written by the sink when it opens the log: a torn last
    line cut away (`torn-line-cut`: how many bytes, never what they said), records appended
    from the journal a crash left (`journal-recovered`: how many) and records found without
    a checkpoint after them (`unsigned-tail`: the broker stopped without closing the log, so
    they were never signed)."""

    event: str
    detail: str = ""
    bytes_cut: int = 0
    records: int = 0
    kind: str = "audit"
    time: str = field(default_factory=utc_now_iso)

    def to_body(self) -> dict[str, Any]:
        return _body(self)
