"""Where audit records go: an append-only JSONL file with a hash chain.

Does file I/O (this is the audit adapter; only the asyncio shell and the broker's service
code call it, never the sans-IO core). Imports `audit.chain`, `audit.checkpoint`,
`audit.journal`, `audit.record`, `audit.serialize`, `cryptography` and the stdlib.

`append_statements` returns only after the lines are in the file (one os.write on an
O_APPEND descriptor for all records of one call: a multi-statement string), or in its
journal (below), so the shell can forward a statement knowing its record exists; any
failure raises `AuditUnavailable` and the statement is refused instead (fail closed). A
written line survives `kill -9` of the broker (it is in the kernel's page cache); surviving
an OS crash or power loss needs an fsync.

The journal (`journal=True`, which the broker sets; used only without fsync): the lines go
to a memory-mapped ring beside the log (`audit.journal`, `<log>.journal`) and the log gets
them in one write at the next `flush` (every 200 ms), when the ring is half full, and at
`close`, which removes the ring. A store into the mapping survives `kill -9` as a write
does, without the write's system call (~5 µs a statement under load, issue 13). Records no
statement waits for (`append`: session events, approvals) go to the log at once, after the
ring's lines. A log's first line goes to the log itself before the ring is made, so a ring
beside an empty log is another log's (set aside as `.orphaned-<ns>`, never replayed).
Opening the log appends what a ring left by a crash holds beyond it (the lines that
continue its hash chain, `chain.continuation`) and says so (`AuditEvent`
"journal-recovered"). When the log refuses the ring's lines (a full disk), statements are
refused until it takes them; none is lost. While the path no longer holds the log (the
file check below) the ring's lines wait for it to come back. When the ring cannot be made,
every line goes to the log at once, as with no journal.

Durability (`fsync=True`, the broker's default: `audit.fsync`): statement records are made
durable before their statements are forwarded, by group commit (`audit.commit`): the
asyncio shell hands them to `group_commit`, which seals and writes everything handed over
in one event-loop iteration in one write, and whose fsync thread then fsyncs (fdatasync)
and answers each connection on its event loop; records written while an fsync is in flight
share the next one. An fsync costs 0.3–2 ms here, a write ~8 µs: one per batch instead of
one per record is what makes durable records cheap. A synchronous `append_statements` with
fsync on syncs inline (callers without an event loop). Records that describe what already
happened or that no statement waits for (`append`: session events; result batches;
checkpoints) are written at once and made durable by the fsync thread soon after (asked for
at once, and at every `flush`), never by an fsync on the event loop. Every fsync covers all
lines written before it, so what a crash keeps is always a prefix of the log. A failed fsync
is final until the broker restarts (every append is refused): after a failed fsync Linux
may drop the unwritten pages and report the next fsync as a success, so nothing after it
could be trusted to be on disk.

`append_deferred` and `append_results` are for records that describe what already happened
(result row counts): they are queued with their time and sealed together, as one `results`
batch record, at the next `flush` (the broker flushes every 200 ms, and at 256 queued). One
hash and one write per batch instead of per statement keeps them off the hot path, and so
does making their JSON only then, in C when built (`serialize.result_entries_py` is the
reference: tests/audit/test_cseal.py). A result is stored as the array of its values, its
session and connection ids an index into the batch's `ids` (a third of the bytes of its
record's body, to hash and to write: issue 13); `record.expand` turns a batch back into its
`result` records for readers. A crash loses at
most the queued results, never a statement record: those are written before their
statement is forwarded.

Opening the log (the constructor, so the broker needs no extra call): a torn last line (a
crash mid-write leaves a record without its newline) is cut away, and the first new record
says so (`AuditEvent` "torn-line-cut": the byte count, never the bytes); a file that is not a
guard audit log at all is refused with a message saying so. Records left without a
checkpoint by a broker that stopped without closing the log are named (`unsigned-tail`) and
signed at once.

Signed checkpoints (`audit.checkpoint`): after every `checkpoint_every` records (in the same
write as the record that completes the count), when records were written and
`checkpoint_seconds` have passed since the last one (checked with the file check below and
at every `flush`), and at `close`. The Ed25519 key lives in `signing_key_file` (default
`<log>.key`), created 0600 when missing; its public half is written beside it (`.pub`).

The page cache: every `RELEASE_STEP` bytes written, the log's pages but those of its last
`RELEASE_KEEP` bytes are given back (POSIX_FADV_DONTNEED, over the last few steps: a page
still dirty at one call is being written back and goes at a later one). Nothing reads an
audit log's past through the cache, and a log that grows for weeks otherwise takes every
page it writes from memory the kernel has not handed out lately. Measured with
bench/audit_pages.py (1 GB logs through this sink's journal, ~2.5 MB a write): the log's
write() calls cost 1.67–1.76 µs a KB with the pages kept once earlier logs held the
cache, 0.23–0.32 with them given back, and the advice itself ~0.2 µs a KB; in a
gateway's profile after 1.6 GB of records the write's page-cache copy was 4.3 % of its
CPU (issue 13). PostgreSQL does the same with a WAL segment no archiver or standby will
read (xlog.c, XLogFileClose). It is advice: a file system that ignores it (tmpfs), or a
platform without it, is written as before.

The file check: a log deleted, renamed or replaced under the broker would take records
nobody can see. Before a write, at most every `check_interval` seconds (10 ms; a stat costs
~3 µs, a third of an append, so not per record), the sink compares the path's st_dev/st_ino
with its descriptor's; when they differ it logs one error naming the path and raises
`AuditUnavailable` on every append (statements are refused, 58030) until the file is back
or the broker restarts: it never recreates the file. Records written within the interval
before the change went to the old file (the log line says how many). The C hot path does
this check's common case itself (the file still the log, no checkpoint due by time); the
rest is `_check`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard.broker.audit import checkpoint
from guard.broker.audit.chain import (
    GENESIS,
    continuation,
    is_record_prefix,
    last_hash_of,
    seal_line,
    split_line,
)
from guard.broker.audit.journal import SIZE as JOURNAL_SIZE
from guard.broker.audit.journal import Journal, journal_path
from guard.broker.audit.journal import read as read_journal
from guard.broker.audit.record import AuditEvent, result_body, utc_now_iso
from guard.broker.audit.serialize import (
    Recordable,
    complete,
    dumps,
    fixed_fields,
    result_entries_py,
    seal_record_py,
    serialize,
)

log = logging.getLogger("guard.broker.audit")
_monotonic_ns = time.monotonic_ns
# fdatasync: the data and the file size (what a reader needs), not the timestamps.
_fdatasync = getattr(os, "fdatasync", os.fsync)
_fadvise = getattr(os, "posix_fadvise", None)
# The page cache: see the module docstring.
RELEASE_STEP = 8 << 20
RELEASE_KEEP = 8 << 20


def _native_syncer(fd: int) -> Any:
    """The group commit's C fsync thread for `fd` (`audit/_cfsync.c`), or None: not built
    (no compiler), or GUARD_PURE_PYTHON=1 (the Python thread, the reference)."""
    if os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from guard.broker.audit._cfsync import Syncer
    except ImportError:
        return None
    return Syncer(fd)


def _compiled_seal() -> Any:
    """The compiled record writer (`audit/_cseal.c`: `seal`, `result_entries`), or None: not
    built (no compiler or no OpenSSL headers), or GUARD_PURE_PYTHON=1 (`serialize`'s
    `seal_record_py` and `result_entries_py`, the references)."""
    if os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from guard.broker.audit import _cseal
    except ImportError:
        return None
    return _cseal


_cseal = _compiled_seal()
# Every record the sink writes is completed and chained by this one function.
seal_record: Callable[[bytes, bytes, int, int], tuple[bytes, bytes]] = (
    _cseal.seal if _cseal is not None else seal_record_py
)
# The queued result records of a `results` batch, as JSON.
result_entries: Callable[
    [list[tuple[list[tuple[Any, ...]], int]], dict[tuple[str, str], int]], bytes
] = _cseal.result_entries if _cseal is not None else result_entries_py
# The sink's lock: a threading.Lock that the C hot path takes without a method call.
_new_lock: Callable[[], Any] = _cseal.Lock if _cseal is not None else threading.Lock

_CHECKPOINT_MARK = b'"kind":"checkpoint"'  # cannot occur inside a JSON string (quotes escaped)


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


def default_key_file(log_path: Path) -> Path:
    """Where the signing key lives unless configured: beside the log, `<log>.key`."""
    return log_path.with_name(log_path.name + ".key")


def public_key_file(key_file: Path) -> Path:
    """The exported public key beside a signing key file: `<key without .key>.pub`."""
    return (
        key_file.with_suffix(".pub")
        if key_file.suffix == ".key"
        else key_file.with_name(key_file.name + ".pub")
    )


def load_or_create_signing_key(key_file: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in `key_file`, made (mode 0600, exclusively) when there is none; its
    public key is (re)written beside it. AuditUnavailable on any problem; messages name the
    file and the problem, never key material."""
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            mode = os.stat(key_file).st_mode
            if mode & 0o077:
                raise AuditUnavailable(
                    f"audit signing key {key_file} is accessible to other users "
                    f"(mode {mode & 0o777:o}); make it 0600 (chmod 600)"
                )
            key = checkpoint.load_private_pem(key_file.read_bytes())
        except OSError as exc:
            raise AuditUnavailable(
                f"cannot read audit signing key {key_file}: {exc.strerror}"
            ) from None
        except ValueError as exc:
            raise AuditUnavailable(f"audit signing key {key_file}: {exc}") from None
    except OSError as exc:
        raise AuditUnavailable(
            f"cannot create audit signing key {key_file}: {exc.strerror}"
        ) from None
    else:
        key = Ed25519PrivateKey.generate()
        try:
            os.write(fd, checkpoint.private_pem(key))
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(key_file)
            raise AuditUnavailable(
                f"cannot write audit signing key {key_file}: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)
        log.info("audit: created the checkpoint signing key %s", key_file)
    _export_public_key(key, public_key_file(key_file))
    return key


def _export_public_key(key: Ed25519PrivateKey, path: Path) -> None:
    pem = checkpoint.public_pem(key.public_key())
    try:
        if path.exists() and path.read_bytes() == pem:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:  # the key still signs; `guard audit pubkey` can derive it
        log.warning("audit: cannot write the public key %s: %s", path, exc.strerror)


@dataclass
class _Scan:
    records: int = 0
    last_hash: str = GENESIS
    last_checkpoint: int = 0  # seq (line count) of the last checkpoint, 0: none
    good_size: int = 0  # bytes up to the end of the last complete line
    torn: int = 0  # bytes after it (a write cut short)

    def count(self, line: bytes) -> None:
        """One more record in the log: `line` (a checkpoint's line names its kind)."""
        self.records += 1
        if _CHECKPOINT_MARK in line:
            self.last_checkpoint = self.records


def _scan(path: Path) -> _Scan:
    """Count records, find the last hash and the last checkpoint, and any torn tail, so a
    restarted broker continues the chain. ValueError with an accurate message when the file
    is not a guard audit log or its last complete line is not a record."""
    scan = _Scan()
    first: bytes | None = None
    last: bytes | None = None
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                scan.torn = len(line)
                if not is_record_prefix(line):
                    raise ValueError(
                        f"{path} is not a guard audit log: line 1 is not an audit record"
                        if first is None
                        else f"audit log {path} is damaged: its last line ({scan.records + 1}) "
                        "is not an audit record"
                    )
                break
            scan.good_size += len(line)
            if not line.strip():
                continue
            scan.count(line)
            if first is None:
                first = line
                try:
                    split_line(line)
                except ValueError:
                    raise ValueError(
                        f"{path} is not a guard audit log: line 1 is not an audit record"
                    ) from None
            last = line
    if last is not None:
        try:
            scan.last_hash = last_hash_of(last)
        except ValueError:
            raise ValueError(
                f"audit log {path} is damaged: line {scan.records} (the last complete one) "
                "is not an audit record"
            ) from None
    return scan


class _AuditSettings(Protocol):
    @property
    def path(self) -> Path: ...
    @property
    def signing_key_file(self) -> Path | None: ...
    @property
    def checkpoint_every(self) -> int: ...
    @property
    def checkpoint_seconds(self) -> float: ...
    @property
    def fsync(self) -> bool: ...


class JsonlAuditSink:
    # The state the C hot path (`_cseal.HotPath`) reads and stores: slots, which an instance
    # keeps at fixed offsets, where the rest of it is in the instance dict.
    __slots__ = (
        "_broken",
        "_fsync",
        "_next_check",
        "_journal",
        "_pending_error",
        "_seq",
        "_prev",
        "_cp_due",
        "_pending",
        "_pending_bytes",
        "_lock",
        "_deferred",
        "_deferred_count",
        "_gone",
        "_checked_seq",
        "_cp_seq",
        "_cp_time",
        "__dict__",
        "__weakref__",
    )
    # Queued after-the-fact records that force a flush from the hot path.
    MAX_DEFERRED = 256

    def __init__(
        self,
        path: Path,
        *,
        fsync: bool = False,
        signing_key_file: Path | None = None,
        checkpoint_every: int = checkpoint.EVERY,
        checkpoint_seconds: float = checkpoint.SECONDS,
        check_interval: float = 0.01,
        journal: bool = False,
        journal_size: int = JOURNAL_SIZE,
    ) -> None:
        self.path = path
        self._fsync = fsync
        # The ring the lines go to first, without fsync (see "The journal"); until it is
        # made, and when it cannot be, lines are written to the log at once.
        self._journal: Journal | None = None
        self._journal_wanted = journal and not fsync
        self._journal_size = journal_size
        self._pending: list[bytes] = []  # lines in the ring that the log does not hold yet
        self._pending_bytes = 0
        self._pending_error: str | None = None  # why the last write of them failed
        self._retry_at = 0  # monotonic ns: when to try that write again
        self._lock = _new_lock()
        self._dirty = False  # written since the last fsync
        self._broken: str | None = None  # why appends are refused for good (a failed fsync)
        self._commit_error: str | None = None  # a failed group commit, until `flush` says so
        # Answers the asyncio shell's statement records after their batch's fsync; None
        # without fsync (the shell then appends synchronously: no thread hop to pay).
        self.group_commit: GroupCommit | None = None
        self._hot: Any = None  # the C common case (`hot_path`), made at the end
        # The results of one `append_results` call with its time in ns, and after-the-fact
        # record bodies, in order; and how many records that is.
        self._deferred: list[tuple[list[tuple[Any, ...]], int] | dict[str, Any]] = []
        self._deferred_count = 0
        self._every = max(1, int(checkpoint_every))
        self._seconds = float(checkpoint_seconds)
        self._seconds_ns = int(self._seconds * 1e9)
        self._interval_ns = int(check_interval * 1e9)
        self._next_check = 0  # monotonic ns of the next file check
        self._gone: str | None = None  # why the path no longer holds our file
        self._unreleased = 0  # bytes written since the log's pages were last given back
        self._fd = -1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._key = load_or_create_signing_key(signing_key_file or default_key_file(path))
            self._key_id = checkpoint.key_id(self._key.public_key())
            # O_APPEND: every write lands at the end even if another process appends, and a
            # partial earlier write can never be overwritten in place.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            st = os.fstat(self._fd)
            self._identity = (st.st_dev, st.st_ino)
            scan = _scan(path)
            if scan.torn:
                # A crash mid-write: the record never finished, so its statement never ran
                # (or, with a journal, the ring still holds it: recovered next).
                os.ftruncate(self._fd, scan.good_size)
            recovered = self._recover_journal(scan)
        except OSError as exc:
            self._close_fd()
            raise AuditUnavailable(f"cannot open audit log {path}: {exc}") from exc
        except ValueError as exc:
            self._close_fd()
            raise AuditUnavailable(f"{exc}; move it aside or set audit.path") from exc
        except AuditUnavailable:
            self._close_fd()
            raise
        self._seq, self._prev = scan.records, scan.last_hash.encode("ascii")
        self._cp_seq = scan.last_checkpoint
        self._cp_due = self._cp_seq + self._every
        self._cp_time = _monotonic_ns()
        self._checked_seq = self._seq  # records known to be in the file at `path`
        try:
            self._open_records(scan, recovered)
            if fsync:
                with self._lock:
                    self._sync()
        except AuditUnavailable:
            self._close_fd()
            raise
        if fsync:
            from guard.broker.audit.commit import GroupCommit  # it imports AuditUnavailable

            self.group_commit = GroupCommit(
                self._write_for_commit,
                self._sync_in_background,
                native=_native_syncer(self._fd),
                fsync_failed=self._native_fsync_failed,
            )
        # The common case of `append_statements` and `append_results` in C, or None (the
        # Python below runs: the reference).
        self._hot = self.hot_path()

    def hot_path(self, watcher: object = None) -> Any:
        """This sink's common case in C (`_cseal.HotPath`: one statement record into the
        journal, result records queued, each without a Python frame), bound to this sink
        and to a health `watcher` whose `last_error` it must leave to the Python path; its
        `statements` answers None and its `results` False wherever the Python path must
        run. None when `_cseal` is not built or GUARD_PURE_PYTHON=1."""
        return None if _cseal is None else _cseal.HotPath(self, watcher)

    @classmethod
    def from_settings(cls, settings: _AuditSettings, **kwargs: Any) -> JsonlAuditSink:
        """The sink `AuditSettings` describe (path, signing key, checkpoint schedule)."""
        return cls(
            settings.path,
            signing_key_file=settings.signing_key_file,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_seconds=settings.checkpoint_seconds,
            # The journal is for logs without fsync (fsync writes once per batch already).
            **{"fsync": settings.fsync, "journal": True, **kwargs},
        )

    @property
    def key_id(self) -> str:
        return self._key_id

    def _recover_journal(self, scan: _Scan) -> int:
        """Append what a journal left by a crash holds beyond the log (`scan` is updated);
        how many records that was. The journal is gone after, or set aside when it cannot
        belong to this log."""
        path = journal_path(self.path)
        data = read_journal(path)
        if data is None:
            return 0
        if scan.records == 0:
            # The sink writes a log's first line to the log itself before it makes a journal:
            # a ring beside an empty log is another log's. Kept for whoever looks into it.
            if data.strip(b"\0"):
                aside = path.with_name(f"{path.name}.orphaned-{time.time_ns()}")
                os.replace(path, aside)
                log.warning(
                    "audit journal %s belongs to no record of the empty log %s: kept as %s",
                    path,
                    self.path,
                    aside,
                )
            else:
                path.unlink()
            return 0
        lines = continuation(data, scan.last_hash)
        if lines:
            blob = b"".join(lines)
            self._write_now(blob)  # AuditUnavailable, a short write taken back: the ring stays
            _fdatasync(self._fd)  # in the log for good before the ring goes
            for line in lines:
                scan.count(line)
            scan.last_hash = last_hash_of(lines[-1])
            scan.good_size += len(blob)
            log.warning(
                "audit log %s: %d record(s) the broker had not written to it before it "
                "stopped were recovered from its journal",
                self.path,
                len(lines),
            )
        path.unlink()
        return len(lines)

    def _open_records(self, scan: _Scan, recovered: int = 0) -> None:
        """What opening the log has to say, chained to its last good line, then signed."""
        with self._lock:
            unsigned = scan.records - scan.last_checkpoint
            if scan.torn:
                log.warning(
                    "audit log %s ended in a torn line (%d bytes, a write cut short by a "
                    "crash): cut away, and recorded",
                    self.path,
                    scan.torn,
                )
                self._append_locked(
                    AuditEvent(
                        "torn-line-cut",
                        detail="the last line was cut off mid-record (a write interrupted by "
                        "a crash); it was removed when the log was opened",
                        bytes_cut=scan.torn,
                    )
                )
            if recovered:
                self._append_locked(
                    AuditEvent(
                        "journal-recovered",
                        detail="records the broker had put in its journal but not yet in "
                        "the log when it stopped were appended when the log was opened",
                        records=recovered,
                    )
                )
            if unsigned:
                since = f"seq {scan.last_checkpoint}" if scan.last_checkpoint else "the start"
                self._append_locked(
                    AuditEvent(
                        "unsigned-tail",
                        detail=f"{unsigned} record(s) after the last checkpoint ({since}) "
                        "were not signed: the broker stopped without closing the log",
                        records=unsigned,
                    )
                )
            if self._seq > self._cp_seq:
                self._write_checkpoint()
            if self._journal_wanted and self._seq > 0:
                self._start_journal()

    def append(self, record: Recordable) -> int:
        """Write one record that no statement waits for (a session event, an approval); with
        fsync on it is made durable by the fsync thread, not here on the caller's event
        loop. With a journal it goes to the log at once, after the ring's lines: an event is
        rare, and whoever reads the log for it finds it there."""
        with self._lock:
            (seq,) = self._seal_write((fixed_fields(record),), through=True)
        self._durable_soon()
        return seq

    def _append_locked(self, record: Recordable) -> None:
        seq = self._seq + 1
        data, prev = seal_record(self._prev, fixed_fields(record), seq, time.time_ns())
        self._write(data)
        self._seq, self._prev = seq, prev

    def append_statements(self, records: Sequence[bytes]) -> list[int]:
        hot = self._hot
        if hot is not None:
            seqs: list[int] | None = hot.statements(records)
            if seqs is not None:
                return seqs
        with self._lock:
            seqs = self._seal_write(records)
            if self._fsync and seqs:
                self._sync()
            return seqs

    def _write_batch(self, batch: Sequence[Sequence[bytes]]) -> list[list[int]]:
        """The records of several `append_statements` calls sealed in order and written at
        once; their seqs, per call. No fsync."""
        if len(batch) == 1:
            with self._lock:
                return [self._seal_write(batch[0])]
        with self._lock:
            seqs = self._seal_write([fixed for records in batch for fixed in records])
        out, i = [], 0
        for records in batch:
            out.append(seqs[i : i + len(records)])
            i += len(records)
        return out

    def _seal_write(self, records: Sequence[bytes], *, through: bool = False) -> list[int]:
        """Chain and write records (the lock is held); their seqs. `through`: into the
        log now, not the journal."""
        if self._broken is not None:
            raise AuditUnavailable(self._broken)
        if _monotonic_ns() >= self._next_check:
            self._check()
        seq, prev, due = self._seq, self._prev, self._cp_due
        signed = 0  # seq of a checkpoint written with these records
        if len(records) == 1:  # the common case (hot path): no list to join
            seq += 1
            data, prev = seal_record(prev, records[0], seq, time.time_ns())
            seqs = [seq]
            if seq >= due:
                line, prev = self._checkpoint_line(seq, prev)
                data += line
                seq = signed = seq + 1
        else:
            lines = []
            seqs = []
            for fixed in records:
                seq += 1
                line, prev = seal_record(prev, fixed, seq, time.time_ns())
                lines.append(line)
                seqs.append(seq)
                if seq >= due:  # exactly every N records, even inside one write
                    line, prev = self._checkpoint_line(seq, prev)
                    lines.append(line)
                    seq = signed = seq + 1
                    due = seq + self._every
            if not lines:
                return []
            data = b"".join(lines)
        self._write(data, through)
        # Only written lines advance the chain: after a failed write the next record
        # links to the last one that exists.
        self._seq, self._prev = seq, prev
        if signed:
            self._signed(signed)
        return seqs

    def _checkpoint_line(self, head_seq: int, head: bytes) -> tuple[bytes, bytes]:
        body = checkpoint.body(
            self._key,
            self._key_id,
            head=head.decode("ascii"),
            head_seq=head_seq,
            time=utc_now_iso(),
            every=self._every,
            seconds=self._seconds,
        )
        return seal_line(head, serialize(body))

    def _signed(self, checkpoint_seq: int) -> None:
        """The checkpoint with this seq is written: the schedule starts again from it."""
        self._cp_seq = checkpoint_seq
        self._cp_due = checkpoint_seq + self._every
        self._cp_time = _monotonic_ns()

    def _write_checkpoint(self) -> None:
        """Sign the chain head now (the lock is held)."""
        line, prev = self._checkpoint_line(self._seq, self._prev)
        self._write(line)
        self._seq, self._prev = self._seq + 1, prev
        self._signed(self._seq)

    def _check(self) -> None:
        """The periodic duties before a write (the lock is held): is the path still our file,
        and is a checkpoint due by time? AuditUnavailable when the file is gone."""
        now = _monotonic_ns()
        self._next_check = now + self._interval_ns
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            reason = "was deleted or renamed"
        except OSError as exc:
            reason = f"cannot be checked ({exc.strerror})"
        else:
            if (st.st_dev, st.st_ino) == self._identity:
                self._checked_seq = self._seq
                if self._gone is not None:
                    log.warning("audit log %s is back: writing resumes", self.path)
                    self._gone = None
                if self._seq > self._cp_seq and now - self._cp_time >= self._seconds_ns:
                    self._write_checkpoint()
                return
            reason = "was replaced by another file"
        if self._gone is None:
            unchecked = self._seq - self._checked_seq
            log.error(
                "audit log %s %s: statements are refused (58030) until it is restored or "
                "the broker restarts; nothing is written elsewhere%s",
                self.path,
                reason,
                f" ({unchecked} record(s) written in the last "
                f"{self._interval_ns // 1_000_000} ms may be in the old file)"
                if unchecked
                else "",
            )
        self._gone = reason
        self._next_check = 0  # check again before every write until it is back
        raise self._gone_error(reason)

    def _gone_error(self, reason: str) -> AuditUnavailable:
        return AuditUnavailable(f"audit log {self.path} {reason}; not writing elsewhere")

    def append_deferred(self, record: Recordable) -> None:
        self._defer(record.to_body(), 1)

    def append_results(self, results: Iterable[tuple[Any, ...]]) -> None:
        # One entry per call, its results sharing the call's time (they arrived together):
        # the hot path pays one tuple, the JSON is made at the flush.
        hot = self._hot
        if hot is not None and hot.results(results):
            return
        queued = results if results.__class__ is list else list(results)
        if queued:  # nothing to say: no entry (a batch's JSON never has an empty part)
            self._defer((queued, time.time_ns()), len(queued))

    def _defer(self, entry: tuple[list[tuple[Any, ...]], int] | dict[str, Any], n: int) -> None:
        with self._lock:
            self._deferred.append(entry)
            self._deferred_count += n
            full = self._deferred_count >= self.MAX_DEFERRED
        if full:
            self.flush()

    def flush(self) -> None:
        """Chain and write the queued after-the-fact records, as one batch record; write a
        checkpoint when one is due by time (the broker calls this every 200 ms)."""
        with self._lock:
            if self._commit_error is not None:
                # A group commit failed since the last flush: say so once (the broker's
                # health watch records it; the statements were refused already).
                error, self._commit_error = self._commit_error, None
                raise AuditUnavailable(error)
            if not self._deferred:
                if _monotonic_ns() >= self._next_check:
                    # Idle: notice a removed file (logged once), sign records due by time.
                    with contextlib.suppress(AuditUnavailable):
                        self._check()
                self._write_pending()
                self._durable_soon()
                return
            batch, self._deferred = self._deferred, []
            count, self._deferred_count = self._deferred_count, 0
        # The body `dumps({"kind": "results", "ids": [...], "results": [...]})` without its
        # closing brace, each run of queued results made JSON at once (`result_entries`,
        # which adds their (session, connection) pairs to `ids`; `record.expand`).
        parts: list[bytes] = []
        run: list[tuple[list[tuple[Any, ...]], int]] = []
        ids: dict[tuple[str, str], int] = {}
        for entry in batch:
            if entry.__class__ is tuple:
                run.append(entry)
                continue
            if run:
                parts.append(result_entries(run, ids))
                run = []
            parts.append(dumps(entry))
        if run:
            parts.append(result_entries(run, ids))
        body = b'{"kind":"results","ids":%b,"results":[%b]' % (dumps(list(ids)), b",".join(parts))
        try:
            with self._lock:
                self._seal_write((body,))
        except AuditUnavailable:
            with self._lock:  # keep them for the next flush, in order
                self._deferred[:0] = batch
                self._deferred_count += count
            raise
        with self._lock:
            self._write_pending()  # the journal's lines (statements, this batch) to the log
        self._durable_soon()

    def _write(self, data: bytes, through: bool = False) -> None:
        """Lines into the journal when there is one (the log gets them at the next flush),
        else, or `through`, into the log (the lock is held). AuditUnavailable when they
        went nowhere."""
        journal = self._journal
        if through and journal is not None:
            self._pending.append(data)  # after the ring's lines, in one write
            try:
                self._write_pending()
            except AuditUnavailable:
                self._pending.pop()  # not written: the chain does not advance
                raise
            return
        if journal is None:
            self._write_now(data)
            if self._journal_wanted:  # a new log: its first line is in it, the ring may start
                self._start_journal()
            return
        if self._pending_error is not None:
            # The log refused the ring's lines: refuse (fail closed) until it takes them.
            if _monotonic_ns() < self._retry_at:
                raise AuditUnavailable(self._pending_error)
            self._write_pending()
        n = len(data)
        # Never store over lines the log does not hold. Lines of at most a quarter of the
        # ring leave a gap of less than that at a wrap, and with at most half the ring
        # pending there is at most one such gap among them: they span under 3/4 of it.
        if n > journal.size // 4:
            self._write_pending()
            self._write_now(data)
            return
        if self._pending_bytes + n > journal.size // 2:
            self._write_pending()
        journal.put(data)
        self._pending.append(data)
        self._pending_bytes += n

    def _write_pending(self) -> None:
        """Append the journal's lines that the log does not hold, in one write."""
        pending = self._pending
        if not pending:
            return
        if self._gone is not None:
            # Not into a file that is no longer the log (see "The file check"): the ring
            # keeps them until it is back, or for the next start to set aside.
            raise self._gone_error(self._gone)
        try:
            self._write_now(pending[0] if len(pending) == 1 else b"".join(pending))
        except AuditUnavailable as exc:
            self._pending_error = str(exc)
            self._retry_at = _monotonic_ns() + self._interval_ns
            raise
        self._pending = []
        self._pending_bytes = 0
        self._pending_error = None

    def _start_journal(self) -> None:
        """Make the ring (the lock is held, the log holds at least one line)."""
        self._journal_wanted = False
        path = journal_path(self.path)
        try:
            self._journal = Journal(path, self._journal_size)
        except (OSError, ValueError) as exc:
            log.warning(
                "audit journal %s cannot be made (%s): each record goes to the log at once",
                path,
                exc,
            )

    def _stop_journal(self) -> None:
        """The ring's lines into the log, then the ring removed (kept when the log cannot
        take them: the next open recovers them). The lock is held."""
        self._journal_wanted = False  # closing: no ring is made for the last lines
        journal, self._journal = self._journal, None
        if journal is None:
            return
        try:
            self._write_pending()
        finally:
            journal.close(remove=not self._pending)

    def _write_now(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                # Disk full mid-line: take the torn line back, or every verifier would stop
                # at it and the records after it (once there is room) could not be checked.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            raise AuditUnavailable(f"cannot write audit log {self.path}: {exc}") from exc
        self._dirty = True
        self._unreleased += written
        if self._unreleased >= RELEASE_STEP:
            self._release_pages()

    def _release_pages(self) -> None:
        """Give back the page cache's pages of the log but its last RELEASE_KEEP bytes
        (see "The page cache"; the lock is held)."""
        self._unreleased = 0
        if _fadvise is None:
            return
        try:
            upto = os.lseek(self._fd, 0, os.SEEK_END) - RELEASE_KEEP
            start = max(0, upto - 4 * RELEASE_STEP)
            if upto > start:
                _fadvise(self._fd, start, upto - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only: the log is written as before

    def _sync(self) -> None:
        """fsync what was written (the lock is held)."""
        self._dirty = False
        try:
            _fdatasync(self._fd)
        except OSError as exc:
            self._dirty = True
            raise self._fsync_failed(exc) from exc

    def sync(self) -> None:
        """Make every line written so far durable (the fsync thread's call). The write lock
        is not held during the fsync: the event loop's own appends go on meanwhile (the next
        fsync covers them)."""
        with self._lock:
            if not self._dirty or self._fd < 0:
                return
            if self._broken is not None:
                raise AuditUnavailable(self._broken)
            self._dirty = False
            fd = self._fd
        try:
            _fdatasync(fd)
        except OSError as exc:
            with self._lock:
                self._dirty = True
                raise self._fsync_failed(exc) from exc

    def _fsync_failed(self, exc: OSError) -> AuditUnavailable:
        # Final (see the module docstring): the kernel may have dropped the pages this fsync
        # failed to write, and a later fsync would not say so.
        self._broken = (
            f"fsync of audit log {self.path} failed ({exc.strerror}): records may be lost in "
            "an OS crash; statements are refused until the broker restarts"
        )
        log.error("audit: %s", self._broken)
        return AuditUnavailable(self._broken)

    def _write_for_commit(self, batch: Sequence[Sequence[bytes]]) -> list[list[int]]:
        """The group commit's write (on the event loop, once per iteration)."""
        try:
            return self._write_batch(batch)
        except AuditUnavailable as exc:
            self._commit_error = str(exc)
            raise

    def _sync_in_background(self) -> None:
        try:
            self.sync()
        except AuditUnavailable as exc:
            self._commit_error = str(exc)
            raise

    def _native_fsync_failed(self, exc: OSError) -> Exception:
        """The C fsync thread's failure, made final as `sync`'s is."""
        with self._lock:
            self._dirty = True
            error = self._fsync_failed(exc)
        self._commit_error = str(error)
        return error

    def _durable_soon(self) -> None:
        """Lines no statement waits for were written: have the fsync thread fsync them."""
        if self.group_commit is not None and self._dirty:
            self.group_commit.sync_soon()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        if self.group_commit is not None:
            self.group_commit.close()  # commits what was handed over, then stops
        with contextlib.suppress(AuditUnavailable):
            self.flush()
        with self._lock:
            with contextlib.suppress(AuditUnavailable):
                self._stop_journal()
            # A cleanly closed log ends with a checkpoint: nothing in it is unsigned. (Not
            # after lines the log could not take: the ring keeps them, recovered next time.)
            unsigned = self._seq > self._cp_seq
            if self._fd >= 0 and self._gone is None and not self._pending and unsigned:
                with contextlib.suppress(AuditUnavailable):
                    self._check()
                    if self._gone is None and self._seq > self._cp_seq:
                        self._write_checkpoint()
            if self._fsync and self._dirty and self._fd >= 0 and self._broken is None:
                with contextlib.suppress(AuditUnavailable):
                    self._sync()
            self._close_fd()


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
            body = json.loads(complete(fixed, len(self.records) + 1, time.time_ns()))
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
