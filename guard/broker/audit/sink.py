"""Where audit records go: an append-only JSONL file with a hash chain.

Does file I/O (this is the audit adapter); imports `audit.chain` and the stdlib only.
`append` returns only after the line is in the file (os.write on an O_APPEND descriptor), so
the gate can forward a statement knowing its record exists; any failure raises
`AuditUnavailable` and the gate refuses the statement (fail closed).

`append_deferred` is for records that describe what already happened (result row counts):
they are queued with their time and sealed together, as one `results` batch record, at the
next `flush` (the broker flushes every 200 ms, and at 256 queued). One hash and one write
per batch instead of per statement keeps them off the hot path; `record.expand` turns a
batch back into its `result` records for readers. A crash loses at most the queued results,
never a statement record: those are written before their statement is forwarded.

Every stored body ends with its `seq` and `time`, after the record's own fields. That lets
a caller that writes the same record many times (a prepared statement's executions) keep
the serialized fields (`fixed_fields`) and pay only for the sequence number and the clock
per record (`append_fixed`): the hot path serializes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from guard.broker.audit.chain import GENESIS, canonical, last_hash_of, seal_line
from guard.broker.audit.record import result_bodies, result_body, utc_now_iso

try:  # ~20x faster than json.dumps; the chain hashes the stored bytes, so either is valid
    import orjson

    def _serialize(body: dict[str, Any]) -> bytes:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    _dumps = orjson.dumps
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _serialize = canonical

    def _dumps(body: Any) -> bytes:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def fixed_fields(record: Recordable) -> bytes:
    """The record's fields but `seq` and `time`, serialized, without the closing brace.

    `append_fixed` completes it with `,"seq":N,"time":"..."}`; the result is a JSON object.
    """
    body = record.to_body()
    body.pop("time", None)
    body.pop("seq", None)
    return _serialize(body)[:-1]


def _complete(fixed: bytes, seq: int) -> bytes:
    return b'%b,"seq":%d,"time":"%b"}' % (fixed, seq, utc_now_iso().encode("ascii"))


class AuditUnavailable(Exception):
    """The record could not be written; the statement it describes must not run."""

    sqlstate = "58030"  # io_error


class Recordable(Protocol):
    def to_body(self) -> dict[str, Any]: ...


class AuditSink(Protocol):
    def append(self, record: Recordable) -> int:
        """Write the record; return its sequence number (1-based)."""
        ...

    def append_deferred(self, record: Recordable) -> None:
        """Queue an after-the-fact record; it is chained and written at the next flush."""
        ...

    def append_result(self, values: tuple[Any, ...]) -> None:
        """`append_deferred` of the ResultRecord with these `record.RESULT_FIELDS` values."""
        ...

    def append_fixed(self, fixed: bytes) -> int:
        """`append` of a record already serialized by `fixed_fields`."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _read_tail(path: Path) -> tuple[int, str]:
    """Count lines and find the last hash, so a restarted broker continues the chain."""
    count, last = 0, GENESIS
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                count += 1
                last_line = line
        if count:
            last = last_hash_of(last_line)
    return count, last


class JsonlAuditSink:
    # Queued after-the-fact records that force a flush from the hot path.
    MAX_DEFERRED = 256

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self._fsync = fsync
        self._lock = threading.Lock()
        # (result values, time in ns) and after-the-fact record bodies, in order
        self._deferred: list[tuple[tuple[Any, ...], int] | dict[str, Any]] = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._seq, prev = _read_tail(path) if path.exists() else (0, GENESIS)
            self._prev = prev.encode("ascii")
            # O_APPEND: every write lands at the end even if another process appends, and a
            # partial earlier write can never be overwritten in place.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except (OSError, ValueError) as exc:
            raise AuditUnavailable(f"cannot open audit log {path}: {exc}") from exc

    def append(self, record: Recordable) -> int:
        return self._append(fixed_fields(record))

    def append_fixed(self, fixed: bytes) -> int:
        return self._append(fixed)

    def append_deferred(self, record: Recordable) -> None:
        self._defer(record.to_body())

    def append_result(self, values: tuple[Any, ...]) -> None:
        self._defer((values, time.time_ns()))

    def _defer(self, entry: tuple[tuple[Any, ...], int] | dict[str, Any]) -> None:
        with self._lock:
            self._deferred.append(entry)
            full = len(self._deferred) >= self.MAX_DEFERRED
        if full:
            self.flush()

    def _append(self, fixed: bytes) -> int:
        with self._lock:
            seq = self._seq + 1
            line, digest = seal_line(self._prev, _complete(fixed, seq))
            self._write(line)
            # Only a written line advances the chain: after a failed write the next record
            # links to the last one that exists.
            self._seq, self._prev = seq, digest
            return seq

    def flush(self) -> None:
        """Chain and write the queued after-the-fact records, as one batch record."""
        with self._lock:
            if not self._deferred:
                return
            batch, self._deferred = self._deferred, []
        entries: list[dict[str, Any]] = []
        run: list[tuple[tuple[Any, ...], int]] = []
        for entry in batch:
            if entry.__class__ is tuple:
                run.append(entry)  # type: ignore[arg-type]
                continue
            entries += result_bodies(run)
            run = []
            entries.append(entry)  # type: ignore[arg-type]
        entries += result_bodies(run)
        try:
            self._append(_dumps({"kind": "results", "results": entries})[:-1])
        except AuditUnavailable:
            with self._lock:  # keep them for the next flush, in order
                self._deferred[:0] = batch
            raise

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                # Disk full mid-line: take the torn line back, or every verifier would stop
                # at it and the records after it (once there is room) could not be checked.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise AuditUnavailable(f"cannot write audit log {self.path}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(AuditUnavailable):
            self.flush()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class MemoryAuditSink:
    """In-memory sink for unit tests of the gate (keeps bodies, chains nothing)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.fail = False

    def append(self, record: Recordable) -> int:
        return self.append_fixed(fixed_fields(record))

    def append_deferred(self, record: Recordable) -> None:
        # Deferred records are kept one by one at once: tests read them without a flush.
        self.append(record)

    def append_result(self, values: tuple[Any, ...]) -> None:
        if self.fail:
            raise AuditUnavailable("audit sink failing (test)")
        self.records.append({**result_body(values, utc_now_iso()), "seq": len(self.records) + 1})

    def append_fixed(self, fixed: bytes) -> int:
        if self.fail:
            raise AuditUnavailable("audit sink failing (test)")
        body = json.loads(_complete(fixed, len(self.records) + 1))
        self.records.append(body)
        return body["seq"]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
