"""Durable audit records by group commit (`audit.commit`, the sink's fsync path).

What is checked: records handed over in one event-loop iteration share one batch (one
fsync) and are sealed in the order they were handed over; what arrives while a batch is
being committed goes into the next; answers come back on the submitter's event loop; the
fsync never runs on the caller's thread; a batch that cannot be written answers every
submitter with `AuditUnavailable` (and the broker's health hears of it with the answer);
a failed fsync refuses every later record; `kill -9` of a gateway loses no record of a
statement it forwarded, and the log still verifies.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading

import pytest

from guard.broker.audit import sink as sink_module
from guard.broker.audit.commit import GroupCommit
from guard.broker.audit.record import SessionEvent
from guard.broker.audit.serialize import fixed_fields
from guard.broker.audit.sink import AuditUnavailable, JsonlAuditSink
from guard.broker.settings import AuditSettings
from tests.audit.audit_logs import body, kinds, stmt, verify
from tests.audit.crash_writer import kill_repeatedly, recorded_aliases


def records(*ids: int) -> list[bytes]:
    return [fixed_fields(stmt(i)) for i in ids]


async def submit_all(group: GroupCommit, batches: list[list[bytes]]) -> list:
    """Hand every batch over in this one loop iteration; their answers, in order."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in batches]
    for recs, fut in zip(batches, futures, strict=True):
        group.submit(recs, fut.set_result, loop)
    return list(await asyncio.gather(*futures))


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    """The thread of every fsync the sink does (the Python thread's: the C one's fsyncs
    cannot be watched from Python)."""
    monkeypatch.setenv("GUARD_PURE_PYTHON", "1")
    seen: list[int] = []
    real = sink_module._fdatasync

    def recording(fd: int) -> None:
        seen.append(threading.get_ident())
        real(fd)

    monkeypatch.setattr(sink_module, "_fdatasync", recording)
    return seen


def test_records_handed_over_together_share_one_batch_in_their_order(tmp_path, fsyncs):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, fsync=True, checkpoint_every=4)
    group = sink.group_commit
    assert group is not None
    fsyncs.clear()  # opening the log
    answered_on: list[int] = []

    async def main():
        answers = await submit_all(group, [records(1), records(2, 3), records(4)])
        answered_on.append(threading.get_ident())
        return answers

    # seq 5 is the checkpoint after 4 records, written in the same batch
    assert asyncio.run(main()) == [[1], [2, 3], [4]]
    assert (group.batches, group.records) == (1, 4)
    assert len(fsyncs) == 1 and fsyncs[0] != answered_on[0]  # in the writer thread
    sink.close()
    lines = path.read_bytes().splitlines()
    assert [body(line)["fingerprint"] for line in lines[:4] if "fingerprint" in body(line)] == [
        "fp1",
        "fp2",
        "fp3",
        "fp4",
    ]
    assert kinds(lines) == ["statement"] * 4 + ["checkpoint"]
    assert verify(path).ok


def test_what_arrives_during_an_fsync_goes_into_the_next_one():
    started, release = threading.Event(), threading.Event()
    writes: list[list[list[bytes]]] = []
    syncs: list[int] = []
    seq = 0

    def write(batch):
        nonlocal seq
        writes.append([list(r) for r in batch])
        out = []
        for recs in batch:
            out.append(list(range(seq + 1, seq + 1 + len(recs))))
            seq += len(recs)
        return out

    def sync():
        syncs.append(seq)  # what this fsync covers: everything written before it
        started.set()
        release.wait(10)

    group = GroupCommit(write, sync)

    async def main():
        loop = asyncio.get_running_loop()
        first = loop.create_future()
        group.submit([b"a"], first.set_result, loop)
        await loop.run_in_executor(None, started.wait, 10)  # its fsync is in flight
        task = asyncio.ensure_future(submit_all(group, [[b"b"], [b"c", b"d"]]))
        while len(writes) < 2:  # written while the first fsync is still in flight
            await asyncio.sleep(0)
        assert not first.done()
        release.set()
        return await first, await task

    assert asyncio.run(main()) == ([1], [[2], [3, 4]])
    assert writes == [[[b"a"]], [[b"b"], [b"c", b"d"]]]  # one write per loop iteration
    assert syncs == [1, 4]  # the second fsync covers the whole second batch
    group.close()


def test_a_batch_that_cannot_be_written_refuses_every_statement_in_it(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, fsync=True, check_interval=0)
    assert sink.group_commit is not None
    os.unlink(path)
    answers = asyncio.run(submit_all(sink.group_commit, [records(1), records(2)]))
    assert all(isinstance(a, AuditUnavailable) for a in answers)
    assert "was deleted or renamed" in str(answers[0])
    with pytest.raises(AuditUnavailable):  # the broker's 200 ms flush tells its health watch
        sink.flush()
    sink.flush()  # once
    sink.close()
    assert not path.exists()


def test_a_failed_fsync_refuses_every_later_record(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GUARD_PURE_PYTHON", "1")  # the failure is injected in Python
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, fsync=True)
    assert sink.group_commit is not None

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(sink_module, "_fdatasync", failing)
    (answer,) = asyncio.run(submit_all(sink.group_commit, [records(1)]))
    assert isinstance(answer, AuditUnavailable) and "fsync" in str(answer)
    monkeypatch.undo()  # the disk is fine again: after a failed fsync that proves nothing
    (answer,) = asyncio.run(submit_all(sink.group_commit, [records(2)]))
    assert isinstance(answer, AuditUnavailable)
    with pytest.raises(AuditUnavailable):
        sink.append_statements(records(3))
    with pytest.raises(AuditUnavailable):
        sink.append(stmt(4))
    sink.close()
    # The line whose fsync failed is in the file, signed at close, and the chain holds.
    assert kinds(path.read_bytes().splitlines()) == ["statement", "checkpoint"]
    assert verify(path).ok
    reopened = JsonlAuditSink(path, fsync=True)  # a restart writes again
    assert reopened.append_statements(records(5))
    reopened.close()
    assert verify(path).ok


def test_health_hears_of_a_failed_fsync_from_the_answer_itself(tmp_path, monkeypatch):
    """The broker's health watch sees a group commit's failure when the connections do,
    not only at the next flush; a later good batch (after a restart) clears it."""
    from guard.broker.health import WatchedAuditSink

    monkeypatch.setenv("GUARD_PURE_PYTHON", "1")  # the failure is injected in Python
    watched = WatchedAuditSink(JsonlAuditSink(tmp_path / "audit.jsonl", fsync=True))
    (answer,) = asyncio.run(submit_all(watched.group_commit, [records(1)]))
    assert isinstance(answer, list) and watched.last_error is None

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sink_module, "_fdatasync", failing)
    (answer,) = asyncio.run(submit_all(watched.group_commit, [records(2)]))
    assert isinstance(answer, AuditUnavailable)
    assert watched.last_error is not None and "fsync" in watched.last_error
    watched.close()
    monkeypatch.undo()
    again = WatchedAuditSink(JsonlAuditSink(tmp_path / "audit.jsonl", fsync=True))
    again.last_error = "from before the restart"
    (answer,) = asyncio.run(submit_all(again.group_commit, [records(3)]))
    assert isinstance(answer, list) and again.last_error is None
    again.close()


def test_records_no_statement_waits_for_are_synced_by_the_thread(tmp_path, fsyncs, monkeypatch):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, fsync=True)
    fsyncs.clear()
    synced = threading.Event()
    monkeypatch.setattr(sink_module, "_fdatasync", _then(sink_module._fdatasync, synced.set))
    sink.append(SessionEvent("s1", "opened", "alice", "demo", "c1"))
    assert synced.wait(10)
    assert fsyncs and threading.get_ident() not in fsyncs
    sink.close()
    assert verify(path).ok


def _then(f, after):
    def both(fd: int) -> None:
        f(fd)
        after()

    return both


def _native_syncer():
    try:
        from guard.broker.audit._cfsync import Syncer
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("guard.broker.audit._cfsync was not built (CI=true: a failure)")
        pytest.skip("guard.broker.audit._cfsync was not built (no C compiler?)")
    return Syncer


def test_the_native_fsync_thread_is_the_default_and_pure_python_selects_the_thread(
    tmp_path, monkeypatch
):
    _native_syncer()
    monkeypatch.delenv("GUARD_PURE_PYTHON", raising=False)
    native = JsonlAuditSink(tmp_path / "a.jsonl", fsync=True)
    assert native.group_commit is not None and native.group_commit._native is not None
    native.close()
    monkeypatch.setenv("GUARD_PURE_PYTHON", "1")
    pure = JsonlAuditSink(tmp_path / "b.jsonl", fsync=True)
    assert pure.group_commit is not None and pure.group_commit._native is None
    pure.close()


def test_the_native_thread_commits_batches_in_order_and_answers_on_the_loop(
    tmp_path, monkeypatch
):
    _native_syncer()
    monkeypatch.delenv("GUARD_PURE_PYTHON", raising=False)
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, fsync=True, checkpoint_every=4)
    group = sink.group_commit
    assert group is not None and group._native is not None
    answered_on: list[int] = []

    async def main():
        first = await submit_all(group, [records(1), records(2, 3), records(4)])
        answered_on.append(threading.get_ident())
        # one statement per iteration, as separate clients send them: each gets its answer
        later = [await submit_all(group, [records(i)]) for i in (6, 7, 8)]
        return first, later

    first, later = asyncio.run(main())
    assert first == [[1], [2, 3], [4]]  # seq 5 is the checkpoint after 4 records
    assert later == [[[6]], [[7]], [[8]]]
    assert answered_on == [threading.get_ident()]  # on the loop, no thread hop back
    assert group.batches >= 2 and group.records == 7  # statement records (not the checkpoint)
    sink.close()
    assert verify(path).ok


def test_a_failed_native_fsync_refuses_what_waits_for_it_and_everything_after(caplog):
    Syncer = _native_syncer()
    read_end, write_end = os.pipe()  # fdatasync of a pipe fails (EINVAL): a broken disk
    written: list[int] = []

    def write(batch):
        written.append(len(batch))
        return [[len(written)] for _ in batch]

    failures: list[OSError] = []

    def failed(exc: OSError) -> Exception:
        failures.append(exc)
        return AuditUnavailable(f"fsync failed: {exc.strerror}")

    group = GroupCommit(write, lambda: None, native=Syncer(write_end), fsync_failed=failed)
    answers = asyncio.run(submit_all(group, [records(1), records(2)]))
    again = asyncio.run(submit_all(group, [records(3)]))
    group.close()
    os.close(read_end)
    os.close(write_end)
    assert all(isinstance(a, AuditUnavailable) for a in answers + again)
    assert failures and failures[0].errno == errno.EINVAL


def test_the_native_syncer_closes_once_and_a_never_started_one_closes_no_fd():
    Syncer = _native_syncer()
    read_end, write_end = os.pipe()
    syncer = Syncer(write_end, threads=2)
    syncer.request(1)
    syncer.close()
    syncer.close()  # a second close (another thread's, at shutdown) does nothing
    synced, error = syncer.state()  # read after close, as the group commit does
    assert synced == 1 and error == errno.EINVAL  # fdatasync of a pipe fails
    with pytest.raises(ValueError, match="closed"):
        syncer.request(2)
    with pytest.raises(RuntimeError, match="already started"):
        syncer.__init__(write_end)  # its mutex is never initialized twice
    assert syncer.eventfd == -1
    os.close(read_end)
    os.close(write_end)
    # One made but never started: nothing to read, and closing or dropping it closes no
    # descriptor (its fields start at -1, not 0: fd 0 is someone's).
    stdin_r, stdin_w = os.pipe()
    saved = os.dup(0)
    os.dup2(stdin_r, 0)
    try:
        idle = Syncer.__new__(Syncer)
        with pytest.raises(ValueError, match="not started"):
            idle.state()
        idle.close()
        del idle
        gc.collect()
        assert os.fstat(0).st_ino == os.fstat(stdin_r).st_ino  # fd 0 still open, the same
    finally:
        os.dup2(saved, 0)
        for fd in (saved, stdin_r, stdin_w):
            os.close(fd)


def test_fsync_is_on_by_default_in_the_broker_settings(tmp_path):
    durable = JsonlAuditSink.from_settings(AuditSettings(path=tmp_path / "a.jsonl"))
    assert durable.group_commit is not None
    durable.close()
    fast = JsonlAuditSink.from_settings(AuditSettings(path=tmp_path / "b.jsonl", fsync=False))
    assert fast.group_commit is None
    fast.close()


@pytest.mark.parametrize("fsync_thread", ["native", "python"])
def test_kill_9_loses_no_record_of_a_forwarded_statement(tmp_path, fsync_thread):
    """A gateway in miniature (`crash_writer`: real pumps, a durable sink) is killed with
    SIGKILL three times, at different moments, restarting on the same log: every statement
    it acknowledged as forwarded has its record in the log, and the log verifies. Both
    fsync threads: the C one (the default when built) and the Python reference."""
    if fsync_thread == "native":
        _native_syncer()
    env = {k: v for k, v in os.environ.items() if k != "GUARD_PURE_PYTHON"}
    if fsync_thread == "python":
        env["GUARD_PURE_PYTHON"] = "1"
    path = tmp_path / "audit.jsonl"
    acked = kill_repeatedly(path, env)
    JsonlAuditSink(path, fsync=False).close()  # what the broker's next start does to a torn tail
    assert verify(path).ok
    assert acked and acked <= recorded_aliases(path)
    JsonlAuditSink(path).close()  # the next broker start signs the tail
    assert verify(path).ok
