"""Group commit: statement records of many connections made durable by one fsync.

An fsync costs ~300 µs on this machine's disk (a record's write ~8 µs): one per record
would cap the gateway at ~3k durable statements per second, and would stop the event loop
for each. Instead the asyncio shell hands a statement's records to `GroupCommit.submit`
and its connection stays paused; one writer thread takes everything handed over so far,
has the sink seal, write and fsync it as one batch, and answers each connection on its
own event loop (`call_soon_threadsafe`), which then forwards the statements. The batch is
what arrived in one event-loop iteration (the thread is woken by a callback scheduled with
`call_soon`, which runs after the iteration's I/O callbacks), plus everything that arrived
while the previous fsync was in flight: the busier the gateway, the larger the batches.

Ordering: records are sealed in the order they were handed over (one queue, one thread),
so the chain order is submission order; a connection's own records are in its order, and
none of its statements is forwarded before the fsync covering its record returned.
Failure: when the batch cannot be written or synced, every connection in it gets the
`AuditUnavailable` and refuses its statements (58030); none of them is forwarded.

Imports threading, logging and `audit.sink`'s exception; the sink's writes come in as
callables, so this module does no file I/O itself and never touches a socket.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from guard.broker.audit.sink import AuditUnavailable

log = logging.getLogger("guard.broker.audit")

# What a submitter gets back, on its event loop: the records' seqs, or why they were not
# written (AuditUnavailable; any other exception is a bug in the sink, also delivered).
Result = list[int] | Exception
Done = Callable[[Result], None]
_Item = tuple[Sequence[bytes], Done, asyncio.AbstractEventLoop]

# How long `close` waits for the writer thread to commit what it was handed (seconds).
CLOSE_TIMEOUT = 10.0


class GroupCommit:
    """One writer thread committing batches of handed-over records (see module docstring)."""

    def __init__(
        self,
        commit: Callable[[Sequence[Sequence[bytes]]], list[list[int]]],
        sync: Callable[[], None],
        *,
        name: str = "guard-audit-commit",
    ) -> None:
        self._commit = commit  # seal, write and fsync a batch: seqs per submission
        self._sync = sync  # fsync what was written outside batches
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Item] = []
        self._kick_scheduled = False  # a wake-up is waiting on an event loop
        self._busy = False  # the thread is committing: what arrives now waits for it
        self._sync_wanted = False
        self._closing = False
        # Counters for benches and tests (batches committed, records in them).
        self.batches = 0
        self.records = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[bytes], done: Done, loop: asyncio.AbstractEventLoop) -> None:
        """Commit `records` with the next batch; `done(seqs or exception)` is then called on
        `loop` (the caller's running loop: this is called from it). Never blocks."""
        with self._cond:
            if self._closing:
                raise AuditUnavailable("the audit log is closing")
            self._queue.append((records, done, loop))
            if self._busy or self._kick_scheduled:
                return  # the thread takes it with the next batch
            self._kick_scheduled = True
        # Wake the thread once this iteration's other connections have handed theirs over.
        loop.call_soon(self._kick)

    def _kick(self) -> None:
        with self._cond:
            self._kick_scheduled = False
            self._cond.notify()

    def sync_soon(self) -> None:
        """Have the thread fsync what was written outside batches (events, result records)."""
        with self._cond:
            if not self._closing and not self._sync_wanted:
                self._sync_wanted = True
                self._cond.notify()

    def close(self) -> None:
        """Commit what was handed over, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(CLOSE_TIMEOUT)
        if self._thread.is_alive():
            log.error("audit: the group commit thread did not finish within %ss", CLOSE_TIMEOUT)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                self._busy = False
                while not self._queue and not self._sync_wanted and not self._closing:
                    cond.wait()
                batch, self._queue = self._queue, []
                if not batch and not self._sync_wanted:
                    return  # closing, nothing left
                self._sync_wanted = False
                self._busy = True
            if batch:
                self._commit_and_answer(batch)
            else:
                try:
                    self._sync()
                except AuditUnavailable:
                    pass  # logged by the sink; the next batch is refused for it
                except Exception:  # noqa: BLE001 - the thread must outlive a sink bug
                    log.exception("audit: background fsync failed")

    def _commit_and_answer(self, batch: list[_Item]) -> None:
        results: list[Result]
        try:
            seqs = self._commit([records for records, _, _ in batch])
            results = list(seqs)
        except Exception as exc:  # noqa: BLE001 - delivered: AuditUnavailable or a bug
            results = [exc] * len(batch)
        self.batches += 1
        self.records += sum(len(records) for records, _, _ in batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Done, Result]]] = {}
        for (_, done, loop), result in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((done, result))
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_answer, answers)
            except RuntimeError:  # the loop is closed: its connections are gone
                log.warning("audit: %d answer(s) for a closed event loop dropped", len(answers))


def _answer(answers: list[tuple[Done, Result]]) -> None:
    for done, result in answers:
        try:
            done(result)
        except Exception:  # noqa: BLE001 - one connection's bug must not starve the others
            log.exception("audit: a group commit answer raised")
