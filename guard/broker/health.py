"""What the broker can say about its own health: the audit sink's last failure, revocations.

`WatchedAuditSink` wraps the real sink (it forwards every call unchanged) and remembers
whether the last write failed, so `/v1/health` can answer from an attribute without
touching the disk. `BrokerHealth` gathers the reasons the broker is degraded. Imports the
audit sink's protocol and the revocation queue; no I/O of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from guard.broker.audit.serialize import Recordable
from guard.broker.audit.sink import AuditSink, AuditUnavailable
from guard.broker.revocation import RevocationQueue


class WatchedAuditSink:
    """An `AuditSink` that records its last failure in `last_error` (None after any
    successful write). One attribute store per call on the hot path, nothing else."""

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        self.last_error: str | None = None

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

    def __getattr__(self, name: str) -> Any:
        # Anything else the sink offers (its path, …) is the sink's.
        return getattr(self.sink, name)


class BrokerHealth:
    def __init__(self, audit: WatchedAuditSink, revocations: RevocationQueue) -> None:
        self.audit = audit
        self.revocations = revocations

    def reasons(self) -> list[str]:
        """Empty when healthy; otherwise one line per failing part."""
        reasons = []
        if self.audit.last_error is not None:
            reasons.append(f"audit: the audit log cannot be written ({self.audit.last_error})")
        failing = self.revocations.failing()
        if failing is not None:
            reasons.append(failing)
        return reasons
