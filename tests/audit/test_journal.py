"""The audit journal (`audit.journal`, the sink without fsync): records go to a mapped ring
first and to the log at the next flush; what a crash leaves in the ring is recovered.

What is checked: `chain.continuation` takes exactly the lines that continue the log's
chain (not stale, torn, zeroed, forged or another log's); the log gets the ring's lines at
`flush` and `close` (a record no statement waits for at once), in chain order, and the
ring is removed after a clean close; a process that dies without flushing, or is killed
with SIGKILL, loses nothing (the next open appends the lines and says so); the ring never
stores over lines the log lacks, however many laps it makes; a log that refuses the flush
refuses statements until it takes them, losing none, and the ring's lines wait while the
log is renamed away; a ring beside an empty log is set aside, not replayed into it; and
without a usable ring every record is written at once.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from guard.broker.audit import journal as journal_module
from guard.broker.audit.chain import GENESIS, continuation, seal_bytes, split_line
from guard.broker.audit.serialize import fixed_fields
from guard.broker.audit.sink import AuditUnavailable, JsonlAuditSink
from tests.audit.audit_logs import body, kinds, stmt, verify
from tests.audit.crash_writer import kill_repeatedly, recorded_aliases

ROOT = Path(__file__).resolve().parents[2]


def chain_of(n: int, prev: str = GENESIS) -> list[bytes]:
    lines = []
    for i in range(n):
        line, prev = seal_bytes(prev, b'{"kind":"statement","seq":%d}' % (i + 1))
        lines.append(line)
    return lines


def fingerprints(path: Path) -> list[str]:
    return [
        body(line)["fingerprint"]
        for line in path.read_bytes().splitlines()
        if body(line)["kind"] == "statement"
    ]


# ---------------------------------------------------------------------- continuation
def test_continuation_takes_the_lines_after_the_logs_end_in_chain_order():
    lines = chain_of(12)
    logged, unlogged = lines[:5], lines[5:]
    last = split_line(logged[-1])[1]
    shuffled = unlogged[:]
    random.Random(7).shuffle(shuffled)
    torn = unlogged[2][:40]  # a store a crash cut off
    # Ring order is arbitrary after a wrap: stale lines, zeros never written, a torn line.
    ring = b"".join([*logged[2:], b"\0" * 300, torn, b"\n", *shuffled, b"\0" * 100])
    assert continuation(ring, last) == unlogged


def test_continuation_stops_at_a_line_that_does_not_check():
    lines = chain_of(6)
    last = split_line(lines[1])[1]
    forged = lines[3].replace(b'"seq":4', b'"seq":9')  # prev intact, hash no longer checks
    ring = b"".join([lines[2], forged, lines[4], lines[5]])
    assert continuation(ring, last) == [lines[2]]


def test_continuation_of_another_chain_is_nothing():
    ours = chain_of(3)
    theirs = chain_of(4, prev="1" * 64)
    assert continuation(b"".join(theirs), split_line(ours[-1])[1]) == []
    assert continuation(b"", split_line(ours[-1])[1]) == []


# ---------------------------------------------------------------------- the sink
def test_records_reach_the_log_at_flush_and_the_ring_goes_at_close(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, journal=True)
    ring = tmp_path / "audit.jsonl.journal"
    assert not ring.exists()
    # A new log's first line goes to the log itself: a ring never sits beside an empty log.
    sink.append_statements([fixed_fields(stmt(0))])
    assert fingerprints(path) == ["fp0"]
    assert ring.exists() and ring.stat().st_mode & 0o777 == 0o600
    sink.append_statements([fixed_fields(stmt(i)) for i in (1, 2)])
    assert fingerprints(path) == ["fp0"]  # in the ring (safe from kill -9), not in the log
    # A record no statement waits for (`append`: an event) goes through, after them.
    sink.append(stmt(3))
    assert fingerprints(path) == ["fp0", "fp1", "fp2", "fp3"]
    sink.append_statements([fixed_fields(stmt(4))])
    assert fingerprints(path) == ["fp0", "fp1", "fp2", "fp3"]
    sink.flush()
    assert fingerprints(path) == ["fp0", "fp1", "fp2", "fp3", "fp4"]
    sink.append_statements([fixed_fields(stmt(5))])
    sink.close()
    assert not ring.exists()
    assert fingerprints(path) == ["fp0", "fp1", "fp2", "fp3", "fp4", "fp5"]
    assert verify(path).ok


CRASH = """
import os, sys
from pathlib import Path
from guard.broker.audit.serialize import fixed_fields
from guard.broker.audit.sink import JsonlAuditSink
from tests.audit.audit_logs import stmt
sink = JsonlAuditSink(Path(sys.argv[1]), journal=True, journal_size=int(sys.argv[2]),
                      checkpoint_every=50)
for i in range(int(sys.argv[3])):
    sink.append_statements([fixed_fields(stmt(i))])
    if i == int(sys.argv[4]):
        sink.flush()
os._exit(0)  # dies as kill -9 would: no flush, no close
"""


def crash(path: Path, *, size: int, records: int, flush_at: int = -1) -> None:
    subprocess.run(
        [sys.executable, "-c", CRASH, str(path), str(size), str(records), str(flush_at)],
        cwd=ROOT,
        check=True,
    )


@pytest.mark.parametrize(
    ("size", "records", "flush_at"),
    [(1 << 20, 40, -1), (1 << 20, 40, 25), (16 << 10, 300, 120)],
    ids=["never-flushed", "flushed-once", "many-laps"],
)
def test_a_process_that_dies_without_flushing_loses_no_record(tmp_path, size, records, flush_at):
    path = tmp_path / "audit.jsonl"
    crash(path, size=size, records=records, flush_at=flush_at)
    assert verify(path).ok  # what the log holds is a sound prefix
    assert len(fingerprints(path)) < records  # the rest is only in the ring
    JsonlAuditSink(path).close()  # the next start recovers, says so, and signs
    assert fingerprints(path) == [f"fp{i}" for i in range(records)]
    assert verify(path).ok
    events = [body(line) for line in path.read_bytes().splitlines()]
    recovered = [e for e in events if e.get("event") == "journal-recovered"]
    assert len(recovered) == 1 and recovered[0]["records"] > 0
    assert not (tmp_path / "audit.jsonl.journal").exists()


def test_a_recovery_the_log_refuses_keeps_the_ring_for_the_next_start(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    crash(path, size=1 << 20, records=10)
    ring = tmp_path / "audit.jsonl.journal"
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(AuditUnavailable, match="No space left"):
        JsonlAuditSink(path)  # the broker does not start: statements would be refused
    assert ring.exists()
    monkeypatch.setattr(os, "write", real_write)
    JsonlAuditSink(path).close()
    assert fingerprints(path) == [f"fp{i}" for i in range(10)]
    assert verify(path).ok and not ring.exists()


def test_kill_9_loses_no_record_of_a_forwarded_statement(tmp_path):
    """`crash_writer` (real pumps) over a sink with a journal, killed three times at
    different moments: every statement acknowledged as forwarded has its record once the
    next start has recovered the ring, and the log verifies."""
    path = tmp_path / "audit.jsonl"
    acked = kill_repeatedly(path, dict(os.environ), "journal")
    JsonlAuditSink(path).close()  # the next start: a torn tail cut, the ring recovered
    assert verify(path).ok
    assert acked and acked <= recorded_aliases(path)


def test_the_ring_never_stores_over_lines_the_log_lacks(tmp_path):
    path = tmp_path / "audit.jsonl"
    size = 8 << 10
    sink = JsonlAuditSink(path, journal=True, journal_size=size)
    for i in range(200):  # ~25 laps, never flushed by the caller
        sink.append_statements([fixed_fields(stmt(i))])
        assert sink._pending_bytes <= size // 2
    big = dataclasses.replace(stmt(200), statement="SELECT " + "x" * size)
    sink.append_statements([fixed_fields(big)])  # larger than a quarter ring: to the log
    sink.close()
    assert fingerprints(path) == [f"fp{i}" for i in range(201)]
    assert verify(path).ok


def test_a_log_that_refuses_the_flush_refuses_statements_and_loses_none(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, journal=True, check_interval=0)
    sink.append_statements([fixed_fields(stmt(0))])  # the log's first line, in the log
    sink.append_statements([fixed_fields(stmt(1))])  # in the ring
    log_fd = sink._fd
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if fd == log_fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(AuditUnavailable, match="No space left"):
        sink.flush()
    with pytest.raises(AuditUnavailable, match="No space left"):
        sink.append_statements([fixed_fields(stmt(2))])  # fail closed: not forwarded
    monkeypatch.setattr(os, "write", real_write)
    sink.append_statements([fixed_fields(stmt(3))])  # the log takes the ring's lines again
    assert fingerprints(path) == ["fp0", "fp1"]
    sink.close()
    assert fingerprints(path) == ["fp0", "fp1", "fp3"]
    assert verify(path).ok


def test_the_rings_lines_wait_while_the_log_is_gone(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, journal=True, check_interval=0)
    sink.append_statements([fixed_fields(stmt(0))])
    sink.append_statements([fixed_fields(stmt(1))])  # in the ring
    moved = tmp_path / "moved.jsonl"
    os.rename(path, moved)
    with pytest.raises(AuditUnavailable, match="deleted or renamed"):
        sink.append_statements([fixed_fields(stmt(2))])
    with pytest.raises(AuditUnavailable, match="deleted or renamed"):
        sink.flush()
    assert fingerprints(moved) == ["fp0"]  # nothing went on into a file that is not the log
    os.rename(moved, path)
    sink.append_statements([fixed_fields(stmt(3))])
    sink.close()
    assert fingerprints(path) == ["fp0", "fp1", "fp3"]
    assert verify(path).ok


def test_a_ring_beside_an_empty_log_is_set_aside_not_replayed(tmp_path, caplog):
    old = tmp_path / "old" / "audit.jsonl"
    crash(old, size=1 << 20, records=5)
    path = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.journal").write_bytes(
        (tmp_path / "old" / "audit.jsonl.journal").read_bytes()
    )
    sink = JsonlAuditSink(path, journal=True)
    sink.append(stmt(9))
    sink.close()
    assert fingerprints(path) == ["fp9"]
    assert kinds(path.read_bytes().splitlines()) == ["statement", "checkpoint"]
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.orphaned-*")] == [
        "audit.jsonl.journal.orphaned"
    ]
    assert "belongs to no record" in caplog.text


@pytest.mark.parametrize("why", ["disk-full", "no-posix_fallocate"])
def test_without_a_usable_ring_every_record_is_written_at_once(tmp_path, monkeypatch, caplog, why):
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if why == "disk-full":
        monkeypatch.setattr(journal_module.os, "posix_fallocate", no_space)
    else:  # macOS
        monkeypatch.delattr(journal_module.os, "posix_fallocate")
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, journal=True)
    sink.append_statements([fixed_fields(stmt(0))])
    sink.append_statements([fixed_fields(stmt(1))])
    assert fingerprints(path) == ["fp0", "fp1"]
    assert "cannot be made" in caplog.text
    assert not (tmp_path / "audit.jsonl.journal").exists()
    sink.close()
    assert verify(path).ok
