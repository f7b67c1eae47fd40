"""What the broker can say about its own health: the audit sink's last failure, revocations.

`WatchedAuditSink` wraps the real sink (it forwards every call unchanged, the group
commit's answers included) and remembers whether the last write failed, so `/v1/health`
can answer from an attribute without touching the disk. `BrokerHealth` gathers the
reasons the broker is degraded. Imports the audit sink's protocol, the group commit's
types and the revocation queue; no I/O of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from guard.broker.audit.commit import Done, GroupCommit, Result
from guard.broker.audit.serialize import Recordable
from guard.broker.audit.sink import AuditSink, AuditUnavailable
from guard.broker.revocation import RevocationQueue

log = logging.getLogger("guard.broker")


class WatchedAuditSink:
    """An `AuditSink` that records its last failure in `last_error` (None after any
    successful write). One attribute store per call on the hot path, nothing else."""

    # `last_error` is read by the sink's C hot path (`_cseal.HotPath`): a slot, at a fixed offset.
    __slots__ = ("last_error", "__dict__")

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        self.last_error: str | None = None
        self._group_commit: _WatchedGroupCommit | None = None

    def append(self, record: Recordable) -> int:
        try:
            seq = self.sink.append(record)
        except AuditUnavailable as exc:
            self.last_error = str(exc)
            raise
        self.last_error = None
        return seq

    def append_statements(self, records: Sequence[bytes]) -> list[int]:
        try:
            seqs = self.sink.append_statements(records)
        except AuditUnavailable as exc:
            self.last_error = str(exc)
            raise
        self.last_error = None
        return seqs

    def append_deferred(self, record: Recordable) -> None:
        try:
            self.sink.append_deferred(record)
        except AuditUnavailable as exc:
            self.last_error = str(exc)
            raise

    def append_results(self, results: Iterable[tuple[Any, ...]]) -> None:
        try:
            self.sink.append_results(results)
        except AuditUnavailable as exc:
            self.last_error = str(exc)
            raise

    def flush(self) -> None:
        try:
            self.sink.flush()
        except AuditUnavailable as exc:
            self.last_error = str(exc)
            raise

    def close(self) -> None:
        self.sink.close()

    def hot_path(self) -> Any:
        """The sink's common case in C, which leaves every call while `last_error` is set
        to the methods above (a success must clear it), or None (`JsonlAuditSink.hot_path`)."""
        make = getattr(self.sink, "hot_path", None)
        return None if make is None else make(self)

    @property
    def group_commit(self) -> _WatchedGroupCommit | None:
        """The sink's group commit (None without fsync), its answers watched too: a batch
        that cannot be written or fsynced degrades health when its connections hear of
        it, not at the next flush."""
        inner = getattr(self.sink, "group_commit", None)
        if inner is None:
            return None
        if self._group_commit is None or self._group_commit.inner is not inner:
            self._group_commit = _WatchedGroupCommit(inner, self)
        return self._group_commit

    def __getattr__(self, name: str) -> Any:
        # Anything else the sink offers (its path, …) is the sink's.
        return getattr(self.sink, name)


class _WatchedGroupCommit:
    """`GroupCommit.submit` with each answer noted in the watcher's `last_error` first."""

    def __init__(self, inner: GroupCommit, watcher: WatchedAuditSink) -> None:
        self.inner = inner
        self.watcher = watcher

    def submit(self, records: Sequence[bytes], done: Done, loop: asyncio.AbstractEventLoop) -> None:
        watcher = self.watcher

        def noted(result: Result) -> None:
            if isinstance(result, AuditUnavailable):
                watcher.last_error = str(result)
            elif not isinstance(result, Exception):
                watcher.last_error = None
            done(result)

        try:
            self.inner.submit(records, noted, loop)
        except AuditUnavailable as exc:
            watcher.last_error = str(exc)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # counters, close, sync_soon: the real one's


# Result records are chained at once but written in batches: this often.
FLUSH_INTERVAL = 0.2


async def flush_audit_forever(
    audit: WatchedAuditSink,
    *,
    on_change: Callable[[str | None], None] | None = None,
    interval: float = FLUSH_INTERVAL,
) -> None:
    """Flush `audit`'s batched records every `interval` until cancelled; a failure is
    logged (statements are refused meanwhile) and `on_change` hears of every change of
    the sink's last error (a gateway worker tells its broker's health)."""
    reported: str | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            audit.flush()
        except AuditUnavailable:
            log.error("audit log unwritable: statements will be refused until it is fixed")
        if on_change is not None and audit.last_error != reported:
            reported = audit.last_error
            on_change(reported)


class BrokerHealth:
    def __init__(
        self,
        audit: WatchedAuditSink,
        revocations: RevocationQueue,
        gateway: Callable[[], list[str]] | None = None,
    ) -> None:
        self.audit = audit
        self.revocations = revocations
        self.gateway = gateway  # gateway worker processes' own reasons, when there are some

    def reasons(self) -> list[str]:
        """Empty when healthy; otherwise one line per failing part."""
        reasons = []
        if self.audit.last_error is not None:
            reasons.append(f"audit: the audit log cannot be written ({self.audit.last_error})")
        failing = self.revocations.failing()
        if failing is not None:
            reasons.append(failing)
        if self.gateway is not None:
            reasons += self.gateway()
        return reasons
