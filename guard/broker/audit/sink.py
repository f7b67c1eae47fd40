"""Where audit records go: an append-only JSONL file with a hash chain.

Does file I/O (this is the audit adapter; only the asyncio shell and the broker's service
code call it, never the sans-IO core). Imports `audit.chain`, `audit.record`,
`audit.serialize` and the stdlib.

`append_statements` returns only after the lines are in the file (one os.write on an
O_APPEND descriptor for all records of one call: a multi-statement string, or, later, the
records of several connections committed as a group), so the shell can forward a statement
knowing its record exists; any failure raises `AuditUnavailable` and the statement is
refused instead (fail closed).

`append_deferred` and `append_results` are for records that describe what already happened
(result row counts): they are queued with their time and sealed together, as one `results`
batch record, at the next `flush` (the broker flushes every 200 ms, and at 256 queued). One
hash and one write per batch instead of per statement keeps them off the hot path;
`record.expand` turns a batch back into its `result` records for readers. A crash loses at
most the queued results, never a statement record: those are written before their
statement is forwarded.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any, Protocol

from guard.broker.audit.chain import GENESIS, last_hash_of, seal_line
from guard.broker.audit.record import result_bodies, result_body, utc_now_iso
from guard.broker.audit.serialize import Recordable, complete, dumps, fixed_fields


class AuditUnavailable(Exception):
    """The record could not be written; the statement it describes must not run."""

    sqlstate = "58030"  # io_error


class AuditSink(Protocol):
    def append(self, record: Recordable) -> int:
        """Write the record; return its sequence number (1-based)."""
        ...

    def append_statements(self, records: Sequence[bytes]) -> list[int]:
        """Write records serialized by `fixed_fields`, in order, in one write; their seqs."""
        ...

    def append_deferred(self, record: Recordable) -> None:
        """Queue an after-the-fact record; it is chained and written at the next flush."""
        ...

    def append_results(self, results: Iterable[tuple[Any, ...]]) -> None:
        """`append_deferred` of the ResultRecords with these `record.RESULT_FIELDS` values."""
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
        (seq,) = self.append_statements((fixed_fields(record),))
        return seq

    def append_statements(self, records: Sequence[bytes]) -> list[int]:
        with self._lock:
            seq, prev = self._seq, self._prev
            if len(records) == 1:  # the common case (hot path): no list to join
                seq += 1
                data, prev = seal_line(prev, complete(records[0], seq))
            else:
                lines = []
                for fixed in records:
                    seq += 1
                    line, prev = seal_line(prev, complete(fixed, seq))
                    lines.append(line)
                if not lines:
                    return []
                data = b"".join(lines)
            self._write(data)
            # Only written lines advance the chain: after a failed write the next record
            # links to the last one that exists.
            first, self._seq, self._prev = self._seq + 1, seq, prev
            return [seq] if first == seq else list(range(first, seq + 1))

    def append_deferred(self, record: Recordable) -> None:
        self._defer([record.to_body()])

    def append_results(self, results: Iterable[tuple[Any, ...]]) -> None:
        self._defer(list(zip(results, repeat(time.time_ns()))))

    def _defer(self, entries: list[tuple[tuple[Any, ...], int] | dict[str, Any]]) -> None:
        with self._lock:
            self._deferred += entries
            full = len(self._deferred) >= self.MAX_DEFERRED
        if full:
            self.flush()

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
            self.append_statements((dumps({"kind": "results", "results": entries})[:-1],))
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
        (seq,) = self.append_statements((fixed_fields(record),))
        return seq

    def append_statements(self, records: Sequence[bytes]) -> list[int]:
        if self.fail:
            raise AuditUnavailable("audit sink failing (test)")
        seqs = []
        for fixed in records:
            body = json.loads(complete(fixed, len(self.records) + 1))
            self.records.append(body)
            seqs.append(body["seq"])
        return seqs

    def append_deferred(self, record: Recordable) -> None:
        # Deferred records are kept one by one at once: tests read them without a flush.
        self.append(record)

    def append_results(self, results: Iterable[tuple[Any, ...]]) -> None:
        if self.fail:
            raise AuditUnavailable("audit sink failing (test)")
        for values in results:
            body = {**result_body(values, utc_now_iso()), "seq": len(self.records) + 1}
            self.records.append(body)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
