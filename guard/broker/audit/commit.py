"""Group commit: statement records of many connections made durable by one fsync.

An fsync costs 0.3–2 ms on this machine's disk (a record's write ~8 µs) and ~150 µs of CPU:
one per record would cap the gateway at a few thousand durable statements per second, and
would stop the event loop for each. Instead the asyncio shell hands a statement's records
to `GroupCommit.submit` and its connection stays paused. Once per event-loop iteration
(a `call_soon` callback, which runs after the iteration's I/O callbacks) everything handed
over is sealed and written in one write, on the loop thread as before; then one writer
thread fsyncs (fdatasync) and answers each connection on its event loop
(`call_soon_threadsafe`), which then forwards the statements. Records written while an
fsync is in flight wait for the next one, which covers all of them: the busier the gateway,
the more records per fsync. The thread does nothing but the fsync: each time it runs Python
it needs the GIL, which a busy event loop hands over only every switch interval (5 ms), so
sealing there (tried first) made every batch wait for the GIL several times.

Native fsync threads: with one fsync in flight, a statement that arrives while an fsync
runs waits for it and then for its own, ~1.5 fsyncs; under load an fdatasync takes 0.6–2 ms
here (p50–p90 with the CPUs saturated, 0.24 ms idle), and a Python thread also waits for
the GIL before and after each one. With a `native` syncer (`audit/_cfsync.c`, built with
the package; `GUARD_PURE_PYTHON=1` or no compiler: the Python thread) up to four C threads
fsync at once without the GIL (fdatasyncs of one file overlap: 987/s from one thread,
3365/s from four, measured under load), and an fsync that returns makes durable
everything written before it began, so the answered batch number only grows. The loop
asks for a batch number (`request`); a thread fdatasyncs and bumps an eventfd that the
loop watches; the loop answers the batches the fsyncs covered. Same order, same answers,
same failure rules; `tests/audit/test_group_commit.py` runs them, and the kill -9 test,
both ways.

Ordering: records are sealed in the order they were handed over (one queue, one loop), so
a connection's records are in its order, and none of its statements is forwarded before
the fsync covering its record returned. Failure: when the batch cannot be written, or the
fsync fails, every connection waiting for it gets the `AuditUnavailable` and refuses its
statements (58030); none of them is forwarded.

Imports threading, logging and `audit.sink`'s exception; the sink's write and fsync come in
as callables (or a native syncer the sink made for its fd), so this module does no file
I/O itself beyond reading the syncer's eventfd, and never touches a socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from guard.broker.audit.sink import AuditUnavailable

log = logging.getLogger("guard.broker.audit")

# What a submitter gets back, on its event loop: the records' seqs, or why they were not
# written (AuditUnavailable; any other exception is a bug in the sink, also delivered).
Result = list[int] | Exception
Done = Callable[[Result], None]

# How long `close` waits for the writer thread to commit what it was handed (seconds).
CLOSE_TIMEOUT = 10.0


class NativeSyncer(Protocol):
    """`_cfsync.Syncer`: C threads that fdatasync one fd on request."""

    eventfd: int

    def request(self, batch: int) -> None: ...

    def state(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


class GroupCommit:
    """Batches of handed-over records, written per loop iteration, fsynced off the loop
    (by one Python thread, or by the native syncer's threads)."""

    def __init__(
        self,
        write: Callable[[Sequence[Sequence[bytes]]], list[list[int]]],
        sync: Callable[[], None],
        *,
        name: str = "guard-audit-fsync",
        native: NativeSyncer | None = None,
        fsync_failed: Callable[[OSError], Exception] | None = None,
    ) -> None:
        self._write = write  # seal and write a batch (no fsync): seqs per submission
        self._sync = sync  # fsync everything written so far (the Python thread's)
        # The C threads instead (see "Native fsync threads"), and what their failure means.
        self._native = native
        self._fsync_failed = fsync_failed or (lambda exc: AuditUnavailable(str(exc)))
        self._watched: asyncio.AbstractEventLoop | None = None  # the loop reading its eventfd
        self._queue: list[tuple[Sequence[bytes], Done]] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None  # a write is due there
        self._cond = threading.Condition(threading.Lock())
        # Written batches waiting for their fsync: (batch number, loop, answers), in order.
        self._waiting: list[tuple[int, asyncio.AbstractEventLoop, list[tuple[Done, Result]]]] = []
        self._written = 0  # number of the last batch written
        self._synced = 0  # number of the last batch an fsync covered (or failed)
        self._closing = False
        # Counters for benches and tests: fsyncs done (batches), records they covered.
        self.batches = 0
        self.records = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if native is None:
            self._thread.start()

    def submit(self, records: Sequence[bytes], done: Done, loop: asyncio.AbstractEventLoop) -> None:
        """Commit `records` with this iteration's batch; `done(seqs or exception)` is called
        on `loop` (the caller's running loop: this is called from it). Never blocks."""
        if self._closing:
            raise AuditUnavailable("the audit log is closing")
        self._queue.append((records, done))
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self._write_queued, loop)

    def _write_queued(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once per iteration, on the loop: seal and write what was handed over, one write."""
        if self._scheduled_on is loop:
            self._scheduled_on = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        try:
            seqs = self._write([records for records, _ in batch])
        except Exception as exc:  # noqa: BLE001 - answered: AuditUnavailable, or a bug
            for _, done in batch:
                _answer_one(done, exc)
            return
        answers: list[tuple[Done, Result]] = [
            (done, result) for (_, done), result in zip(batch, seqs, strict=True)
        ]
        with self._cond:
            self._written += 1
            self._waiting.append((self._written, loop, answers))
            self.records += sum(len(s) for s in seqs)
            self._cond.notify()
        if self._native is not None:
            self._watch(loop)
            self._native.request(self._written)

    def sync_soon(self) -> None:
        """Have the thread fsync what was written outside batches (events, result records)."""
        with self._cond:
            if not self._closing:
                self._written += 1  # an empty batch: nobody waits, but it is synced
                self._cond.notify()
                if self._native is not None:
                    self._native.request(self._written)

    def close(self) -> None:
        """Write what was handed over (answers go to its loops), fsync, stop the thread."""
        self._closing = True
        for loop in {self._scheduled_on} - {None}:
            assert loop is not None
            self._write_queued(loop)
        with self._cond:
            self._cond.notify()
        if self._native is not None:
            self._close_native()
            return
        self._thread.join(CLOSE_TIMEOUT)
        if self._thread.is_alive():
            log.error("audit: the fsync thread did not finish within %ss", CLOSE_TIMEOUT)
        else:
            self._log_totals()

    def _log_totals(self) -> None:
        if self.batches:
            log.info(
                "audit: %d statement record(s) made durable by %d fsync(s) (%.1f per fsync)",
                self.records,
                self.batches,
                self.records / self.batches,
            )

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while self._synced == self._written and not self._closing:
                    cond.wait()
                upto = self._written
                if upto == self._synced:
                    return  # closing, all synced
            error: Exception | None = None
            try:
                self._sync()  # covers every batch up to `upto` (written before this call)
            except Exception as exc:  # noqa: BLE001 - answered: AuditUnavailable, or a bug
                error = exc
            self.batches += 1
            self._deliver(upto, error, here=None)

    # ------------------------------------------------------------------ native thread
    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the C thread's eventfd on the loop that submits (one per process; a test's
        next `asyncio.run` is another, so the watch moves with it)."""
        if self._watched is loop:
            return
        assert self._native is not None
        if self._watched is not None and not self._watched.is_closed():
            self._watched.remove_reader(self._native.eventfd)
        self._watched = loop
        loop.add_reader(self._native.eventfd, self._fsynced)

    def _fsynced(self) -> None:
        """On the loop: the C thread finished an fsync (or several)."""
        assert self._native is not None
        try:
            fsyncs = int.from_bytes(os.read(self._native.eventfd, 8), sys.byteorder)
        except BlockingIOError:
            return
        self.batches += fsyncs
        self._deliver(*self._native_state(), here=self._watched)

    def _native_state(self) -> tuple[int, Exception | None]:
        """How far the C threads made the log durable, and their failure as the sink words
        it (an errno from C)."""
        assert self._native is not None
        synced, errno_ = self._native.state()
        if not errno_:
            return synced, None
        return synced, self._fsync_failed(OSError(errno_, os.strerror(errno_)))

    # ------------------------------------------------------------------ answers
    def _deliver(
        self, synced: int, error: Exception | None, here: asyncio.AbstractEventLoop | None
    ) -> None:
        """Answer every batch up to `synced` (with `error` if the fsync failed): on `here`,
        the loop this runs on, directly; on any other loop through call_soon_threadsafe,
        one call per loop."""
        with self._cond:
            self._synced = max(self._synced, synced)
            ready = [w for w in self._waiting if w[0] <= synced]
            self._waiting = self._waiting[len(ready) :]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Done, Result]]] = {}
        for _, loop, answers in ready:
            if error is not None:
                answers = [(done, error) for done, _ in answers]
            by_loop.setdefault(loop, []).extend(answers)
        for loop, answers in by_loop.items():
            if loop is here:
                _answer(answers)
                continue
            try:
                loop.call_soon_threadsafe(_answer, answers)
            except RuntimeError:  # the loop is closed: its connections are gone
                log.warning("audit: %d answer(s) for a closed event loop dropped", len(answers))

    def _close_native(self) -> None:
        assert self._native is not None
        if self._watched is not None and not self._watched.is_closed():
            self._watched.remove_reader(self._native.eventfd)
        self._native.close()  # fsyncs what was requested, then joins its threads
        synced, error = self._native_state()
        self.batches += 1 if synced > self._synced else 0
        self._deliver(synced, error, here=None)
        self._log_totals()


def _answer(answers: list[tuple[Done, Result]]) -> None:
    for done, result in answers:
        _answer_one(done, result)


def _answer_one(done: Done, result: Result) -> None:
    try:
        done(result)
    except Exception:  # noqa: BLE001 - one connection's bug must not starve the others
        log.exception("audit: a group commit answer raised")
