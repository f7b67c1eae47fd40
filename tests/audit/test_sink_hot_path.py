"""The audit sink's common case in C (`_cseal.HotPath`) against the sink's own Python.

`JsonlAuditSink.append_statements` and `append_results` try the hot path first; the Python
below it is the reference, and runs whenever the hot path answers None (False for
results). What is checked: the same operations on a sink with the hot path and on one
without give the same seqs, the same records (all but their times and hashes), the same
ring and queue state, and logs that verify; the hot path takes the common case itself
(so these tests test it), the file check that passes included, and leaves every unusual
one to the Python path: a checkpoint due, a file check that does not pass, no journal,
fsync on, a remembered failure (the sink's or the health watcher's), a line too long for
the ring or a ring half full of unwritten lines, a full result queue, and the sink's lock
held by another thread. Records appended from another thread meanwhile never fork the
chain.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.broker.audit.record import expand
from guard.broker.audit.serialize import fixed_fields
from guard.broker.audit.sink import AuditUnavailable, JsonlAuditSink
from guard.broker.health import WatchedAuditSink
from tests.audit.audit_logs import stmt, verify

try:
    from guard.broker.audit import _cseal  # the hot path is built
except ImportError:  # no compiler or no OpenSSL headers
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("guard.broker.audit._cseal was not built (CI=true: a failure)", pytrace=False)
    pytest.skip("guard.broker.audit._cseal was not built", allow_module_level=True)

if os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0"):
    pytest.skip("GUARD_PURE_PYTHON=1: the sink runs without its hot path", allow_module_level=True)


def result(i: int) -> tuple[Any, ...]:
    return ("s1", "c1", i, "ok", "SELECT 1", 1, 0, None, 0, 0)


def open_sink(
    path: Path, *, hot: bool = True, first: bool = False, **kwargs: Any
) -> JsonlAuditSink:
    """A sink at `path` (`first`: with one record written, so its journal has started)."""
    kwargs.setdefault("journal", True)
    kwargs.setdefault("checkpoint_seconds", 3600.0)
    kwargs.setdefault("check_interval", 3600.0)  # no file check between operations
    sink = JsonlAuditSink(path, **kwargs)
    assert (sink._hot is not None) is True  # built: the default sink has it
    if not hot:
        sink._hot = None
    if first:
        sink.append(stmt(0))
    return sink


def _without_times(value: Any) -> Any:
    """A record's body without what depends on the clock (times, so hashes) or on the
    sink's own signing key."""
    if isinstance(value, dict):
        return {
            k: _without_times(v)
            for k, v in value.items()
            if k not in ("time", "head", "signature", "sig", "key_id")
        }
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def records(path: Path) -> list[Any]:
    """The log's records (a batch's results each their own, `expand`), without times."""
    return [
        _without_times(record)
        for line in path.read_bytes().splitlines()
        for record in expand(json.loads(line)["body"])
    ]


OPERATION = st.one_of(
    st.tuples(st.just("statements"), st.integers(0, 3), st.integers(0, 2500)),
    st.tuples(st.just("results"), st.integers(0, 4), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
    st.tuples(st.just("event"), st.just(0), st.just(0)),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(OPERATION, max_size=60), every=st.integers(2, 9))
def test_the_hot_path_and_the_python_path_write_the_same_log(tmp_path_factory, ops, every):
    # A small ring (its wrap, writes of half a ring, lines over a quarter of it) and
    # checkpoints every few records.
    sinks = {}
    for name, hot in (("hot", True), ("python", False)):
        d = tmp_path_factory.mktemp(name)
        sinks[name] = open_sink(
            d / "audit.jsonl", hot=hot, checkpoint_every=every, journal_size=8192
        )
    n = 0
    for op, count, pad in ops:
        answers = []
        for sink in sinks.values():
            if op == "statements":
                batch = [
                    fixed_fields(stmt(n + k)) + b',"pad":"%b"' % (b"x" * pad) for k in range(count)
                ]
                answers.append(sink.append_statements(batch))
            elif op == "results":
                answers.append(sink.append_results([result(n + k) for k in range(count)]))
            elif op == "flush":
                answers.append(sink.flush())
            else:
                answers.append(sink.append(stmt(n)))
        n += count
        assert answers[0] == answers[1], op
        hot, ref = sinks["hot"], sinks["python"]
        assert (hot._seq, hot._pending_bytes, hot._deferred_count, len(hot._pending)) == (
            ref._seq,
            ref._pending_bytes,
            ref._deferred_count,
            len(ref._pending),
        )
        # The ring starts once the log has a line (then the same in both).
        assert getattr(hot._journal, "_pos", None) == getattr(ref._journal, "_pos", None)
    for sink in sinks.values():
        sink.close()
    hot_path, ref_path = (s.path for s in sinks.values())
    assert records(hot_path) == records(ref_path)
    assert verify(hot_path).ok and verify(ref_path).ok


def test_the_hot_path_takes_the_common_case_itself(tmp_path):
    sink = open_sink(tmp_path / "audit.jsonl", first=True)
    before = sink._seq
    assert sink._hot.statements((fixed_fields(stmt(1)),)) == [before + 1]
    assert sink._seq == before + 1 and len(sink._pending) == 1
    assert sink._journal._pos == len(sink._pending[0]) == sink._pending_bytes
    assert sink._hot.results([result(1), result(2)]) is True
    assert sink._deferred_count == 2
    assert sink._hot.results([]) is True and sink._deferred_count == 2  # nothing queued
    sink.close()
    assert verify(sink.path).ok
    kinds = [json.loads(line)["body"]["kind"] for line in sink.path.read_bytes().splitlines()]
    assert [k for k in kinds if k != "checkpoint"][-2:] == ["statement", "results"]


def _one(sink: JsonlAuditSink) -> list[int] | None:
    return sink._hot.statements([fixed_fields(stmt(1))])


def test_every_unusual_case_is_left_to_the_python_path(tmp_path):
    sink = open_sink(tmp_path / "a" / "audit.jsonl", first=True, checkpoint_every=6)
    assert _one(sink) is not None
    due = sink._cp_due
    while sink._seq + 1 < due:
        assert _one(sink) is not None
    seq = sink._seq
    assert _one(sink) is None and sink._seq == seq  # the checkpoint is Python's to write
    sink.append_statements([fixed_fields(stmt(1))])
    assert json.loads(sink._pending[-1].splitlines()[-1])["body"]["kind"] == "checkpoint"
    assert _one(sink) is not None  # and the common case is back

    # The file check due: the hot path takes its common case (the path still the log),
    # scheduling the next one as `_check` does, and leaves every other case to Python.
    sink._next_check = 0
    seq = sink._seq
    assert _one(sink) == [seq + 1]
    assert sink._checked_seq == seq and sink._next_check > time.monotonic_ns() + 3500 * 10**9
    sink._next_check, sink._cp_time = 0, time.monotonic_ns() - 3601 * 10**9
    assert _one(sink) is None  # a checkpoint due by time: Python's to write
    sink.append_statements([fixed_fields(stmt(2))])  # Python checks, and schedules the next
    assert [json.loads(line)["body"]["kind"] for line in sink._pending[-2:]] == [
        "checkpoint",
        "statement",
    ]
    assert _one(sink) is not None
    sink._next_check, sink._gone = 0, "was deleted or renamed"
    assert _one(sink) is None  # gone: Python's (it says when the log is back)
    sink._gone = None
    log = sink.path
    for change in ("renamed", "replaced"):
        log.rename(log.with_name("aside.jsonl"))
        if change == "replaced":
            log.write_bytes(b"")
        sink._next_check, seq = 0, sink._seq
        assert _one(sink) is None and sink._seq == seq and sink._next_check == 0
        if change == "replaced":
            log.unlink()
        log.with_name("aside.jsonl").rename(log)
    assert _one(sink) is not None

    for name, value in (("_broken", "fsync failed"), ("_pending_error", "disk full")):
        setattr(sink, name, value)
        assert _one(sink) is None
        setattr(sink, name, None)
    assert sink._hot.statements([]) is None  # nothing, or several records: Python's loop
    assert sink._hot.statements([fixed_fields(stmt(1))] * 2) is None

    # A line over a quarter of the ring; a ring whose unwritten lines reach half of it.
    assert sink._hot.statements([b'{"kind":"statement","pad":"%b"' % (b"x" * (1 << 20))]) is None
    sink._pending_bytes = sink._journal.size // 2 - 10
    assert _one(sink) is None
    sink._pending_bytes = sum(map(len, sink._pending))
    # A ring position no Journal makes (negative): the copy would land before the map.
    sink._journal._pos, pos = -(1 << 40), sink._journal._pos
    assert _one(sink) is None
    sink._journal._pos = pos

    # The result queue one short of full: the Python path queues and flushes.
    sink._deferred_count = sink.MAX_DEFERRED - 1
    assert sink._hot.results([result(1)]) is False
    sink._deferred_count = 0

    # The lock held by another thread: the hot path does not wait, the Python path does.
    with sink._lock:
        held = [_one(sink), sink._hot.results([result(1)])]
    assert held == [None, False]
    seq = sink._seq
    sink.close()
    assert verify(sink.path).ok and seq > 0

    for kwargs in ({"journal": False}, {"fsync": True}):
        other = open_sink(tmp_path / str(kwargs) / "audit.jsonl", first=True, **kwargs)
        assert _one(other) is None
        other.close()


def test_state_the_hot_path_cannot_find_in_slots_is_refused_or_left_to_python(tmp_path):
    # It reads and stores the sink's state where the classes' __slots__ put it: a class
    # that keeps a field anywhere else gets no hot path at all (a loud bug, never a store
    # at a wrong offset), and a field not set yet is the Python path's.
    class Plain:
        MAX_DEFERRED = 256  # everything in the instance dict

    class Shadowed(JsonlAuditSink):
        _seq = property(lambda self: 0)

    class Unwatched:
        last_error = None  # a class attribute, not a slot

    sink = open_sink(tmp_path / "audit.jsonl", first=True)
    for sink_like, watcher in (
        (Plain(), None),
        (object.__new__(Shadowed), None),
        (sink, Unwatched()),
    ):
        with pytest.raises(TypeError, match="__slots__"):
            _cseal.HotPath(sink_like, watcher)
    prev = sink._prev
    del sink._prev
    assert _one(sink) is None
    sink._prev = prev
    assert _one(sink) is not None
    # It takes only the sink's own kind of lock (`_cseal.Lock`) itself; any other, the
    # Python path takes.
    lock, sink._lock = sink._lock, threading.Lock()
    assert type(lock) is _cseal.Lock and _one(sink) is None
    sink._lock = lock
    sink.close()
    assert verify(sink.path).ok


def test_a_watched_sink_leaves_a_remembered_failure_to_the_python_path(tmp_path):
    watched = WatchedAuditSink(open_sink(tmp_path / "audit.jsonl", first=True))
    hot = watched.hot_path()
    assert hot.statements([fixed_fields(stmt(1))]) is not None
    watched.last_error = "cannot write audit log"
    assert hot.statements([fixed_fields(stmt(1))]) is None  # a success must clear it
    watched.append_statements([fixed_fields(stmt(1))])
    assert watched.last_error is None
    assert hot.statements([fixed_fields(stmt(1))]) is not None
    watched.close()
    assert verify(watched.sink.path).ok


def test_records_from_another_thread_never_fork_the_chain(tmp_path):
    sink = open_sink(tmp_path / "audit.jsonl", checkpoint_every=50, journal_size=1 << 16)
    stop = threading.Event()
    errors: list[BaseException] = []

    def other() -> None:  # session events and flushes, as the broker's threads make them
        try:
            while not stop.is_set():
                sink.append(stmt(0))
                sink.flush()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    thread = threading.Thread(target=other)
    thread.start()
    try:
        seqs = []
        for i in range(3000):
            seqs += sink.append_statements([fixed_fields(stmt(i))])
            sink.append_results([result(i)])
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors
    sink.close()
    report = verify(sink.path)
    assert report.ok, report
    assert seqs == sorted(set(seqs)) and len(seqs) == 3000


def test_results_queued_by_the_hot_path_are_kept_when_the_flush_fails(tmp_path):
    # The batch goes back to the queue, in order, and is written whole next time.
    sink = open_sink(tmp_path / "audit.jsonl", first=True)
    other = ("s2", "c2", 9, "error", None, None, 0, "57014", 0, 0)
    assert sink._hot.results([result(1), other]) is True
    sink.append_results([result(2)] + [other])  # (the Python path's, as a tuple)
    assert sink._hot.results([result(3)]) is True
    fd = sink._fd
    sink._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail
    sink._journal_wanted, journal, sink._journal = False, sink._journal, None
    with pytest.raises(AuditUnavailable):
        sink.flush()
    os.close(sink._fd)
    sink._fd, sink._journal = fd, journal
    assert sink._deferred_count == 5
    sink.close()
    assert verify(sink.path).ok
    (batch,) = [
        b
        for b in map(json.loads, sink.path.read_bytes().splitlines())
        if b["body"]["kind"] == "results"
    ]
    results = expand(batch["body"])
    assert [(r["session_id"], r["statement_seq"]) for r in results] == [
        ("s1", 1),
        ("s2", 9),
        ("s1", 2),
        ("s2", 9),
        ("s1", 3),
    ]
    assert results[1]["sqlstate"] == "57014" and results[1]["kind"] == "result"
