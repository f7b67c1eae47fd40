"""How audit records become the bytes the chain seals: pure, no I/O.

Imports the stdlib, orjson and `audit.chain`/`audit.record`. Every stored body ends with
its `seq` and `time`, after the record's own fields. That lets a caller that writes the
same record many times (a prepared statement's executions) keep the serialized fields
(`fixed_fields`) and pay only for the sequence number and the clock per record
(`complete`): the hot path serializes nothing. The gate builds fixed fields; the sink
(`audit.sink`, the one module here that writes files) completes and seals them.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from guard.broker.audit.chain import canonical, seal_line
from guard.broker.audit.record import RESULT_FIELDS, iso_from_ns

try:  # ~20x faster than json.dumps; the chain hashes the stored bytes, so either is valid
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None  # type: ignore[assignment]  # the stdlib fallback below serves


def serialize(body: dict[str, Any]) -> bytes:
    """A body as sorted-key JSON bytes."""
    if orjson is None:  # pragma: no cover
        return canonical(body)
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def dumps(body: Any) -> bytes:
    """Any JSON value as compact bytes (key order kept)."""
    if orjson is None:  # pragma: no cover
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return orjson.dumps(body)


class Recordable(Protocol):
    def to_body(self) -> dict[str, Any]: ...


def fixed_fields(record: Recordable) -> bytes:
    """The record's fields but `seq` and `time`, serialized, without the closing brace.

    `complete` finishes it with `,"seq":N,"time":"..."}`; the result is a JSON object.
    """
    body = record.to_body()
    body.pop("time", None)
    body.pop("seq", None)
    return serialize(body)[:-1]


def complete(fixed: bytes, seq: int, ns: int) -> bytes:
    """A record's stored body: its fixed fields, then its sequence number and the time `ns`
    (`time.time_ns()`)."""
    return b'%b,"seq":%d,"time":"%b"}' % (fixed, seq, iso_from_ns(ns).encode("ascii"))


def seal_record_py(prev: bytes, fixed: bytes, seq: int, ns: int) -> tuple[bytes, bytes]:
    """The stored line of the record with these fixed fields, `seq` and time `ns`, chained
    after `prev`, and its hash. The reference of its compiled twin (`audit/_cseal.c`),
    which the sink uses when built (`audit.sink.seal_record`)."""
    return seal_line(prev, complete(fixed, seq, ns))


def result_entries_py(
    queued: list[tuple[list[tuple[Any, ...]], int]], ids: dict[tuple[str, str], int]
) -> bytes:
    """The JSON of queued result records, comma-separated, as a `results` batch record
    holds them (`record.expand` reads them back): each (results, ns) is the
    `record.RESULT_FIELDS` values of the results one call queued, at time `ns`; each result
    becomes the array `[i, statement_seq, outcome, command_tag, rows, masked_cells,
    sqlstate, view_masked_cells, unmasked_cells, time]`, where `i` indexes the batch's
    `ids`: its (session_id, connection_id) pairs in the order first seen, which this adds
    to. The reference of its compiled twin (`audit/_cseal.c`'s `result_entries`), which
    the sink uses when built (`audit.sink.result_entries`)."""
    parts = []
    for results, ns in queued:
        when = iso_from_ns(ns)
        for values in results:
            if len(values) != len(RESULT_FIELDS):
                raise ValueError("result_entries: a result must be a tuple of 10 values")
            session, connection = values[0], values[1]
            if type(session) is not str or type(connection) is not str:
                raise TypeError("result_entries: session_id and connection_id must be str")
            session.encode(), connection.encode()  # (JSON cannot hold a lone surrogate)
            i = ids.setdefault((session, connection), len(ids))
            parts.append(dumps([i, *values[2:], when]))
    return b",".join(parts)
