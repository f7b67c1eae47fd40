"""Gateway worker processes: started, answered and restarted by the broker.

With `gateway.workers` N > 1 the broker serves no client itself: it starts N processes
(`python -m guard.broker.proxy.worker`), each listening on the gateway's port with
SO_REUSEPORT (the kernel spreads new connections over them), each with its own control
channel (`proxy.control`) back to the broker. The broker stays the one truth about sessions
and approvals: a worker finds a session, admits a connection (counted against the session's
limit across all workers) and holds statements through it, and the broker closes a
connection in whichever worker holds it when its session ends.

Each worker writes its own audit log (`<log>.gateway-<i>.jsonl`, its own hash chain and
signed checkpoints, with the broker's signing key): one chain per writer, so N processes
never serialize on one file. The broker's log records each worker log's opening and closing
(`AuditEvent` `gateway-log-opened` / `gateway-log-closed`), so an examiner knows every file
to verify (`guard audit verify` takes several).

A worker that dies is started again (its connections are gone: their clients see the
connection drop, their sessions go on). When the broker stops it asks every worker to stop;
a worker whose broker vanished (kill -9) stops by itself when its channel closes, since
without the broker it can admit nobody.

Imports asyncio, the session manager and the approval service; speaks to workers only
through `proxy.control`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from guard.broker.approvals.service import ApprovalService, HeldStatement, Requester
from guard.broker.audit.record import AuditEvent
from guard.broker.audit.sink import AuditSink, AuditUnavailable, default_key_file
from guard.broker.errors import NotFound
from guard.broker.pgwire.scram import ScramKeys
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.proxy.control import Channel, frame
from guard.broker.proxy.directory import ENDED, admit_connection, release_connection
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.sessions import Session, SessionManager
from guard.broker.settings import BrokerSettings

log = logging.getLogger("guard.gateway.supervisor")

# A worker that exits is started again after this long (doubling up to the maximum while
# it keeps dying within a minute of its start), so a crash loop cannot spin a core.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
# How long a worker has to stop after being asked, before it is killed.
STOP_GRACE = 10.0
READY_TIMEOUT = 30.0
# Secrets in the broker's environment a worker has no use for: a worker that is taken over
# (it parses every client's bytes) must not hold the key to the credential issuer.
WORKER_ENV_DROPPED = ("GUARD_OPENBAO_TOKEN", "VAULT_TOKEN", "BAO_TOKEN")


# What a worker's frames may name besides plain values (`control._Restricted`): the
# approval call's arguments. Their contents are checked against the worker's own sessions.
WORKER_GLOBALS = frozenset(
    {
        ("datetime", "datetime"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        ("guard.broker.approvals.service", "HeldStatement"),
        ("guard.broker.approvals.service", "Requester"),
        ("guard.broker.identity.principal", "Principal"),
        ("guard.broker.policy.model", "ApprovalRequirement"),
    }
)


class GatewayStartFailed(Exception):
    """A worker exited before it listened (its log says why)."""


def worker_audit_path(log_path: Path, index: int) -> Path:
    """Worker `index`'s audit log, beside the broker's: `audit.jsonl` → `audit.gateway-1.jsonl`."""
    return log_path.with_name(f"{log_path.stem}.gateway-{index}{log_path.suffix or '.jsonl'}")


class _RemoteHandle:
    """A connection that worker `worker` admitted under `key` (`sessions.ConnectionHandle`)."""

    __slots__ = ("worker", "key")

    def __init__(self, worker: _Worker, key: int) -> None:
        self.worker, self.key = worker, key

    def close(self, reason: str) -> None:
        if self.worker.channel is not None:
            self.worker.channel.notify("close", self.key, reason)


@dataclasses.dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ready: asyncio.Future[None] | None = None
    # key → the session and handle the broker admitted for it
    admitted: dict[int, tuple[Session, _RemoteHandle]] = dataclasses.field(default_factory=dict)
    held: set[str] = dataclasses.field(default_factory=set)  # approval requests it made
    audit_error: str | None = None
    started_at: float = 0.0


class GatewayWorkers:
    def __init__(
        self,
        *,
        count: int,
        settings: BrokerSettings,
        policy: CompiledPolicy,
        policy_text: str,
        sessions: SessionManager,
        approvals: ApprovalService,
        audit: AuditSink,
    ) -> None:
        self.count = count
        self.settings = settings
        self.policy = policy
        self.policy_text = policy_text
        self.sessions = sessions
        self.approvals = approvals
        self.audit = audit
        self._workers = [_Worker(i) for i in range(count)]
        self._count: dict[str, int] = {}  # connections per session, across workers
        self._reservation: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._supervisors: list[asyncio.Task[None]] = []
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Reserve the port, start every worker and wait until all of them listen."""
        self._address = self._reserve(host, port)
        for worker in self._workers:
            worker.ready = asyncio.get_running_loop().create_future()
            self._supervisors.append(
                asyncio.get_running_loop().create_task(
                    self._supervise(worker), name=f"gateway worker {worker.index}"
                )
            )
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                for worker in self._workers:
                    assert worker.ready is not None
                    await worker.ready
        except BaseException:
            await self.close()
            raise
        return self._address

    def _reserve(self, host: str, port: int) -> tuple[str, int]:
        """Bind (never listen on) the address with SO_REUSEPORT, so the port — a random one
        when `port` is 0 — stays the broker's while workers come and go; only listening
        sockets take connections, so this one takes none."""
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        self._reservation = sock
        bound = sock.getsockname()
        return bound[0], bound[1]

    def forget_catalog(self, target: str) -> None:
        """Every worker reads `target`'s catalog facts again at its next connection (its
        backstop was applied: new masking view OIDs, new twins)."""
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.notify("forget_catalog", target)

    async def close(self) -> None:
        self._closing = True
        for worker in self._workers:
            if worker.channel is not None:
                worker.channel.notify("stop")
        for task in self._supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(asyncio.shield(task), STOP_GRACE)
                except TimeoutError:
                    task.cancel()
                    await task
        if self._reservation is not None:
            self._reservation.close()

    def reasons(self) -> list[str]:
        """For /v1/health: workers down or unable to write their audit logs."""
        reasons = []
        for worker in self._workers:
            if worker.channel is None or worker.channel.closed:
                reasons.append(f"gateway: worker {worker.index} is not running")
            elif worker.audit_error is not None:
                reasons.append(
                    f"audit: gateway worker {worker.index}'s audit log cannot be written"
                    f" ({worker.audit_error})"
                )
        return reasons

    # ------------------------------------------------------------------ one worker
    async def _supervise(self, worker: _Worker) -> None:
        delay = RESTART_DELAY
        loop = asyncio.get_running_loop()
        while True:
            worker.started_at = loop.time()
            try:
                await self._run(worker)
            except asyncio.CancelledError:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()
                raise
            except Exception:  # noqa: BLE001 - logged; the worker is started again
                log.exception("gateway worker %s failed", worker.index)
            if self._closing:
                return
            delay = RESTART_DELAY if loop.time() - worker.started_at > 60 else delay
            log.error("gateway worker %s stopped: starting it again in %.1f s", worker.index, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    async def _run(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "guard.broker.proxy.worker",
                "--control-fd",
                str(theirs.fileno()),
                "--log-level",
                logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k not in WORKER_ENV_DROPPED},
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        channel = Channel(
            reader,
            writer,
            calls=self._calls(worker),
            notices=self._notices(worker),
            name=f"gateway worker {worker.index}",
            allowed=WORKER_GLOBALS,
        )
        worker.channel = channel
        assert self._address is not None
        audit_path = worker_audit_path(self.settings.audit.path, worker.index)
        writer.write(
            frame(
                (
                    "hello",
                    {
                        "index": worker.index,
                        "count": self.count,
                        "settings": self.settings,
                        "policy_text": self.policy_text,
                        "address": self._address,
                        "audit_path": audit_path,
                        "signing_key_file": self.settings.audit.signing_key_file
                        or default_key_file(self.settings.audit.path),
                        "holding_targets": self.approvals.holding_targets,
                    },
                )
            )
        )
        pid = worker.process.pid
        self._record("gateway-log-opened", f"worker {worker.index} (pid {pid}): {audit_path}")
        try:
            await channel.serve()
        finally:
            channel.close()
            self._forget(worker)
            with contextlib.suppress(ProcessLookupError):
                if self._closing:
                    try:
                        await asyncio.wait_for(worker.process.wait(), STOP_GRACE)
                    except TimeoutError:
                        worker.process.kill()
                else:
                    worker.process.kill()  # its channel broke: it must not serve on
            code = await worker.process.wait()
            self._record("gateway-log-closed", f"worker {worker.index} (pid {pid}) exit {code}")
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_exception(
                    GatewayStartFailed(
                        f"gateway worker {worker.index} exited ({code}) before it listened"
                    )
                )

    def _forget(self, worker: _Worker) -> None:
        """The worker is gone, and so are its connections: their sessions count them no more."""
        for session, handle in worker.admitted.values():
            release_connection(self._count, session, handle)
        worker.admitted.clear()
        worker.held.clear()
        worker.channel = None

    def _record(self, event: str, detail: str) -> None:
        try:
            self.audit.append(AuditEvent(event, detail=detail))
        except AuditUnavailable as exc:
            log.error("could not record %s: %s", event, exc)

    # ------------------------------------------------------------------ what a worker asks
    def _calls(self, worker: _Worker) -> dict[str, Any]:
        return {
            "ready": functools.partial(self._ready, worker),
            "find": self._find,
            "admit": functools.partial(self._admit, worker),
            "hold": functools.partial(self._hold, worker),
            "end_statement": functools.partial(self._end_statement, worker),
        }

    async def _ready(self, worker: _Worker) -> None:
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_result(None)

    async def _find(self, user: str) -> Session | None:
        session = self.sessions.by_user(user)
        if session is None:
            return None
        # A snapshot: what the worker needs to log the client in and relay for it. The
        # worker keeps its own SCRAM keys per session (`worker.RemoteDirectory`).
        return dataclasses.replace(
            session, connections=set(), credential_hash=b"", upstream_scram=ScramKeys()
        )

    async def _admit(self, worker: _Worker, session_id: str, key: int) -> str | None:
        try:
            session = self.sessions.get(session_id)
        except NotFound:  # ended since the worker found it
            return ENDED
        handle = _RemoteHandle(worker, key)
        refused = admit_connection(self.sessions, self.policy, self._count, session, handle)
        if refused is None:
            worker.admitted[key] = (session, handle)
        return refused

    async def _hold(
        self, worker: _Worker, request_id: str, requester: Requester, held: HeldStatement
    ) -> ApprovalDecided:
        # A worker speaks only for the sessions it holds connections of, and who they are
        # is the broker's to say: the requester is rebuilt from the broker's session.
        session = next(
            (s for s, _h in worker.admitted.values() if s.id == requester.session_id), None
        )
        if session is None or not isinstance(held, HeldStatement):
            raise PermissionError("no connection of that session on this worker")
        requester = Requester.of(session)
        worker.held.add(request_id)
        try:
            decided = await self.approvals.hold(request_id, requester, held)
        except asyncio.CancelledError:
            # The worker holding the statement is gone (its channel closed): nobody waits
            # for the decision any more.
            self.approvals.withdraw(request_id, "the gateway worker holding it stopped")
            raise
        if not (decided.approved and decided.per_statement):
            worker.held.discard(request_id)  # nothing left for the worker to end
        return decided

    async def _end_statement(self, worker: _Worker, request_id: str) -> None:
        if request_id in worker.held:  # only a request this worker made
            worker.held.discard(request_id)
            await self.approvals.end_statement(request_id)

    def _notices(self, worker: _Worker) -> dict[str, Any]:
        def release(key: int) -> None:
            admitted = worker.admitted.pop(key, None)
            if admitted is not None:
                release_connection(self._count, *admitted)

        def cancel(process_id: int, secret_key: bytes) -> None:
            owner = self._workers[(process_id - 1) % self.count]
            if owner.channel is not None:
                owner.channel.notify("cancel", process_id, secret_key)

        def withdraw(request_id: str, reason: str) -> None:
            if request_id in worker.held:  # only a request this worker made
                worker.held.discard(request_id)
                self.approvals.withdraw(request_id, reason)

        def audit_health(error: str | None) -> None:
            worker.audit_error = error

        return {
            "release": release,
            "cancel": cancel,
            "withdraw": withdraw,
            "audit_health": audit_health,
        }
