"""The asyncio shell of one authenticated connection: moves bytes, executes commands.

Bytes from either side go straight into the sans-IO `GatewayConnection`, and the commands
it returns are executed at once, in order, by `Pump.run` — the only place those commands
meet the outside world: transport writes, the audit log (statement records written before
the commands that forward their statements; result records queued) and the operator log.
The pump
decides nothing about statements. What it owns:

- The audit write before forwarding. With a durable log (`audit.fsync`, the sink's
  `group_commit`) the records are handed to the group commit and the connection stays
  paused (the core waits in PAUSED; client bytes queue) until the writer thread answers on
  this loop after the batch's fsync; then `audit_written`/`audit_failed` and its commands
  run. Without fsync the write is synchronous (a thread hop would cost more than the write):
  the core records through the sink's hot path itself (`connection.recorder`, set here),
  without pausing, and a WriteAudit it gives when that path declines is answered at once
  by the sink's own method. Result records go through the same hot path, fsync or not
  (`connection.result_recorder`); a RecordResults it declines, the sink's method queues.

- Backpressure: the transports' own. When one side's write buffer passes its high-water
  mark, reading from the other side pauses until it drains, so a slow client throttles the
  upstream and memory per connection stays bounded.
- Half-close: a client's EOF is an event for the core (its last requests still run, then
  PostgreSQL is told the client terminated); a plain client transport stays open for the
  responses. The database's EOF ends the connection once what it sent is relayed.
- The idle watchdog: when nothing crossed either side for `idle_timeout` seconds the core is
  asked (`idle_for`); it ends only connections that wait for nothing. A read only marks
  the connection active (a clock read and a float per read were ~290 instructions, 2 % of a
  TPC-B transaction, issue 13); the watchdog, which looks at least every `IDLE_STEP`
  seconds, takes a mark as activity at that look. So an idle connection ends between
  `idle_timeout` and `idle_timeout + IDLE_STEP` after its last read, never before.
- Crashes: an exception in the shell itself (an unknown command, a transport bug) is logged
  with the connection id and ends the connection; the core handles its own (FAILED state).

TLS on either leg is normally inside its transport (`proxy.tlstransport`: records moved
in C). Without that build, upstream TLS is the sans-IO `proxy.tlslayer` over the plain
transport (`tls`; a third of the cost of an SSL transport).

This module is the reference; `proxy.core` runs its compiled twin (`_cpump`, this file
compiled by Cython with the declarations in pump.pxd) when it was built.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

from guard.broker.audit.commit import GroupCommit, Result
from guard.broker.audit.sink import AuditSink, AuditUnavailable
from guard.broker.proxy.commands import (
    CloseConnection,
    Command,
    EndApproval,
    Log,
    RecordResults,
    RequestApproval,
    SendToClient,
    SendToServer,
    WriteAudit,
)
from guard.broker.proxy.connection import GatewayConnection
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.proxy.state import State
from guard.broker.proxy.tasks import spawn
from guard.broker.proxy.tlslayer import TLSClient, TLSClosed

log = logging.getLogger("guard.proxy")

# Per-direction write buffer bounds (bytes) before the opposite side stops being read.
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18
# Client bytes queued behind a paused statement (one held for approval may wait minutes)
# before the client stops being read: what a client sends meanwhile stays bounded.
QUEUE_LIMIT = 1 << 20
# A client message whose start arrived must be complete within this long (seconds).
MESSAGE_TIMEOUT = 60.0
# The idle watchdog looks at least this often (seconds): how late an idle connection may end.
IDLE_STEP = 5.0
# Read on every client read: an enum member's lookup through its class costs 70 ns.
_PAUSED = State.PAUSED


class ApprovalDesk(Protocol):
    """Where a connection's held statements are decided (the approval service, bound to
    the connection's session)."""

    async def hold(self, command: RequestApproval) -> ApprovalDecided:
        """Make the request and wait for its outcome (the grant given when approved)."""
        ...

    async def end(self, request_id: str) -> None:
        """Take back the per-statement grant of an approved statement that completed."""
        ...

    def withdraw(self, request_id: str, reason: str) -> None:
        """The request of a statement still waiting is withdrawn (cancel, disconnect)."""
        ...


class UnknownCommand(TypeError):
    """The core returned something the shell cannot execute: a bug, never ignored."""


def _protocol_of(transport: asyncio.BaseTransport) -> asyncio.BaseProtocol | None:
    """The transport's protocol, or None from one that does not say (a test's stand-in)."""
    try:
        return transport.get_protocol()
    except NotImplementedError:
        return None


class _Side:
    """One transport's protocol (an `asyncio.Protocol` by its methods: no base class, so
    the compiled twin can make it an extension type): hands its bytes and its EOF to the
    pump."""

    def __init__(
        self,
        pump: Pump,
        feed: Callable[[bytes], list[Command] | bytes],
        eof: Callable[[], list[Command]],
        name: str,
    ) -> None:
        self.pump = pump
        # The core's `relay_from_*`: its commands, or the read itself to write on (`forward`).
        self.feed = feed
        self.forward: Callable[[bytes], object] | None = None
        self.eof = eof
        self.name = name
        self.other: asyncio.Transport | None = None
        self.keep_open_on_eof = False
        # The protocol the transport had before this side (the login's streams), told of
        # the end in `connection_lost` as asyncio would have told it.
        self.previous: asyncio.BaseProtocol | None = None

    def data_received(self, data: bytes) -> None:
        pump = self.pump
        pump.active = True  # (the watchdog's to read: see "The idle watchdog")
        try:
            said = self.feed(data)
            if isinstance(said, bytes):  # the read as it came: as SendToServer/Client of it
                self.forward(said)  # type: ignore[misc]
                if pump._queue_full:
                    pump.run([])
                if pump._message_timer is None:
                    # A read forwarded whole leaves no message incomplete and nothing
                    # paused: `client_read` has nothing to do (the steady state's reads).
                    return
            else:
                pump.run(said)
            if self.other is pump.upstream_transport:  # the client side
                pump.client_read()
        except Exception:  # noqa: BLE001 - a shell bug ends this connection, not the gateway
            pump.crashed(f"{self.name} data")

    def eof_received(self) -> bool:
        try:
            self.pump.run(self.eof())
        except Exception:  # noqa: BLE001 - as in data_received
            self.pump.crashed(f"{self.name} EOF")
        # A plain transport may stay open for writing (half-close); an SSL one cannot.
        return self.keep_open_on_eof and not self.pump.done.done()

    def connection_lost(self, exc: Exception | None) -> None:
        pump = self.pump
        if pump is None:
            return
        pump.close(f"{self.name} connection lost" + (f": {exc}" if exc else ""))
        # A connection is a web of references (pump and sides, a side and its transport,
        # the login's stream reader and writer): cut here, it is freed as it ends, not at
        # the cycle collector's next full pass, which walks every object of the gateway
        # and until then keeps each closed connection's TLS buffers (stop 35: ~81 objects
        # and two SSL objects a connection). The transport drops this side itself, so the
        # side's references to it and to the core make no cycle.
        previous, self.previous = self.previous, None
        self.pump = None  # type: ignore[assignment]
        if previous is not None:
            previous.connection_lost(None)  # its streams' end: they let go of each other

    def pause_writing(self) -> None:
        # This side cannot take more: stop reading the side that produces for it.
        if self.other is not None:
            self.other.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and not self.other.is_closing():
            self.other.resume_reading()


class Pump:
    """Executes one connection's commands against its two transports and the audit log."""

    def __init__(
        self,
        connection: GatewayConnection,
        client_transport: asyncio.Transport,
        upstream_transport: asyncio.Transport,
        *,
        audit: AuditSink,
        tls: TLSClient | None = None,
        idle_timeout: float | None = None,
        approvals: ApprovalDesk | None = None,
        message_timeout: float = MESSAGE_TIMEOUT,
    ) -> None:
        self.connection = connection
        self.message_timeout = message_timeout
        self._message_timer: asyncio.TimerHandle | None = None
        self._queue_full = False  # the client is not read: its queue behind a pause is full
        self.approvals = approvals
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until done (asyncio keeps none)
        self.client_transport = client_transport
        self.upstream_transport = upstream_transport
        self.audit = audit
        # The sink's group commit when its records must be fsynced (None: write at once).
        self._group_commit: GroupCommit | None = getattr(audit, "group_commit", None)
        # The sink's common case in C (`JsonlAuditSink.hot_path`) for statement records
        # (as the core's recorder) and result records; None for sinks without one.
        hot_path = getattr(audit, "hot_path", None)
        self._hot: Any = hot_path() if hot_path is not None else None
        if self._hot is not None:
            # The core queues its result records through it itself, and gives a
            # RecordResults only when it declines.
            connection.result_recorder = self._hot.results
            if self._group_commit is None:
                # The core records its statements through it at once (no WriteAudit, no
                # pause) and pauses for a WriteAudit only when it answers None.
                connection.recorder = self._hot.statements
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.last_activity = self.loop.time()
        self.active = False  # read since the watchdog last looked
        self.end_reason = ""
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._watchdog: asyncio.TimerHandle | None = None
        # The core answers a steady-state read relayed as it came with that bytes object
        # (`relay_from_*`), which its side writes on itself; anything else with commands.
        self._client_side = _Side(
            self, connection.relay_from_client, connection.client_eof, "client"
        )
        self._client_side.keep_open_on_eof = client_transport.get_extra_info("sslcontext") is None
        self._upstream_side = _Side(
            self,
            connection.relay_from_server if tls is None else self._from_tls,
            connection.server_eof,
            "upstream",
        )
        self._to_server = upstream_transport.write if tls is None else self._to_tls
        self._client_side.forward = self._to_server
        self._upstream_side.forward = client_transport.write
        self._client_side.other = upstream_transport  # client can't keep up → stop upstream
        self._upstream_side.other = client_transport

    def start(self, client_pending: bytes, server_pending: bytes) -> None:
        for transport, side in (
            (self.client_transport, self._client_side),
            (self.upstream_transport, self._upstream_side),
        ):
            transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
            side.previous = _protocol_of(transport)
            transport.set_protocol(cast(asyncio.Protocol, side))
        # Bytes the handshake readers had already buffered come first, in order.
        if client_pending:
            self.run(self.connection.from_client(client_pending))
        if server_pending:
            self.run(self.connection.from_server(server_pending))
        for transport in (self.client_transport, self.upstream_transport):
            if not transport.is_closing() and not transport.is_reading():
                transport.resume_reading()
        if self.idle_timeout and not self.done.done():
            self._watch(self.idle_timeout)

    # ------------------------------------------------------------------ commands
    def run(self, commands: list[Command]) -> None:  # noqa: C901 - one branch per command, the shell's hot loop
        """Execute commands in order. A WriteAudit is answered at once, and the commands
        the answer yields run next (in a loop, not by recursion: a pipeline of thousands of
        statements pauses once per statement)."""
        i, n = 0, len(commands)
        while i < n:
            cmd = commands[i]
            i += 1
            kind = cmd.__class__
            if kind is SendToServer:
                self._to_server(cmd.data)  # type: ignore[union-attr]
            elif kind is SendToClient:
                if i < n and commands[i].__class__ is SendToClient:
                    # One read's output in pieces (a row split across reads, then the run
                    # after it): one writelines, so a TLS transport sends them with one
                    # syscall and the client wakes once, not once for a 100-byte record.
                    pieces = [cmd.data]  # type: ignore[union-attr]
                    while i < n and commands[i].__class__ is SendToClient:
                        pieces.append(commands[i].data)  # type: ignore[union-attr]
                        i += 1
                    self.client_transport.writelines(pieces)
                else:
                    self.client_transport.write(cmd.data)  # type: ignore[union-attr]
            elif kind is WriteAudit:
                if i != n:
                    raise UnknownCommand("WriteAudit must be the last command of its list")
                commands = self._write_audit(cmd)  # type: ignore[arg-type]
                i, n = 0, len(commands)
            elif kind is RecordResults:
                self._record_results(cmd)  # type: ignore[arg-type]
            elif kind is RequestApproval or kind is EndApproval:
                if i != n:
                    raise UnknownCommand(f"{kind.__name__} must be the last command of its list")
                self._start_approval_step(cmd)  # type: ignore[arg-type]
            elif kind is Log:
                level = logging.ERROR if cmd.level == "error" else logging.WARNING  # type: ignore[union-attr]
                log.log(level, cmd.message, exc_info=cmd.exc)  # type: ignore[union-attr]
            elif kind is CloseConnection:
                self.close(cmd.reason)  # type: ignore[union-attr]
                return
            else:
                raise UnknownCommand(f"the shell cannot execute {cmd!r}")
        if self._queue_full and self.connection.state is not _PAUSED:
            self._queue_full = False  # the pause is over: read the client again
            if not self.client_transport.is_closing():
                self.client_transport.resume_reading()

    def _write_audit(self, cmd: WriteAudit) -> list[Command]:
        group = self._group_commit
        try:
            if group is not None:
                # Answered in `_audit_committed` after the batch's fsync; paused till then.
                group.submit(cmd.records, self._audit_committed, self.loop)
                return []
            # (With a hot path the core's recorder has declined these: the sink's method.)
            seqs = self.audit.append_statements(cmd.records)
        except AuditUnavailable as exc:
            return self._audit_refused(exc)
        return self.connection.audit_written(seqs)

    def _audit_refused(self, exc: AuditUnavailable) -> list[Command]:
        log.error(
            "audit log unwritable, statement refused (connection %s): %s",
            self.connection.gate.connection_id,
            exc,
        )
        return self.connection.audit_failed()

    def _audit_committed(self, result: Result) -> None:
        """The group commit's answer, on this loop: forward (or refuse) what waited."""
        if self.done.done():
            return  # the connection ended meanwhile: nothing is forwarded
        try:
            if isinstance(result, AuditUnavailable):
                commands = self._audit_refused(result)
            elif isinstance(result, Exception):
                raise result  # a bug in the sink: this connection ends, as a shell crash
            else:
                commands = self.connection.audit_written(result)
            self.run(commands)
        except Exception:  # noqa: BLE001 - as in data_received
            self.crashed("audit write")

    # ------------------------------------------------------------------ approvals
    def _start_approval_step(self, cmd: RequestApproval | EndApproval) -> None:
        """A held statement waits for people (or its grant's end for the database): off
        the event loop's path, in a task; the connection stays paused meanwhile."""
        if self.approvals is None:
            raise UnknownCommand(f"{type(cmd).__name__} on a connection without approvals")
        name = f"approval {cmd.request_id} ({self.connection.gate.connection_id})"
        self._spawn(self._approval_step(self.approvals, cmd), name)

    async def _approval_step(self, desk: ApprovalDesk, cmd: RequestApproval | EndApproval) -> None:
        try:
            if isinstance(cmd, RequestApproval):
                event = await desk.hold(cmd)
                commands = self.connection.approval_decided(event)
            else:
                await desk.end(cmd.request_id)
                commands = self.connection.approval_ended(cmd.request_id)
            if not self.done.done():
                self.run(commands)
        except Exception:  # noqa: BLE001 - as in data_received: this connection ends
            self.crashed(f"approval {cmd.request_id}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = spawn(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_held(self) -> bool:
        """The client's CancelRequest: withdraw a statement waiting for approval (True), or
        nothing here (False: the cancel goes to the database as usual)."""
        request_id = self.connection.awaiting_approval
        if request_id is None or self.approvals is None:
            return False
        self.approvals.withdraw(request_id, "cancelled by the client")
        return True

    def _record_results(self, cmd: RecordResults) -> None:
        hot = self._hot
        if hot is not None and hot.results(cmd.results):
            return
        try:
            self.audit.append_results(cmd.results)
        except AuditUnavailable as exc:
            # The statements already ran; their pre-execution records exist. A missing
            # result record is visible in the chain (no result for that seq).
            log.error("audit log unwritable, result records lost: %s", exc)

    # ------------------------------------------------------------------ upstream TLS
    def _from_tls(self, data: bytes) -> list[Command]:
        assert self.tls is not None
        try:
            plain = self.tls.decrypt(data)
        except TLSClosed:
            return self.connection.server_eof()
        except ssl.SSLError as exc:
            # A record that does not decrypt may be tampering: nothing of it is relayed.
            log.warning("upstream TLS error, closing the connection: %s", exc.reason or exc)
            return [CloseConnection("upstream TLS error")]
        reply = self.tls.pending_output()
        if reply:
            self.upstream_transport.write(reply)
        return self.connection.from_server(plain) if plain else []

    def _to_tls(self, data: bytes | memoryview) -> None:
        assert self.tls is not None
        self.upstream_transport.write(self.tls.encrypt(data))

    # ------------------------------------------------------------------ watchdog, ending
    def client_read(self) -> None:
        """After client bytes were handled: time a message left incomplete, and stop
        reading a client whose queue behind a paused statement is full."""
        connection = self.connection
        if connection.partial_message:
            if self._message_timer is None:
                self._message_timer = self.loop.call_later(
                    self.message_timeout, self._message_overdue
                )
        elif self._message_timer is not None:
            self._message_timer.cancel()
            self._message_timer = None
        if connection.state is _PAUSED and connection.queued_client_bytes > QUEUE_LIMIT:
            self._queue_full = True
            self.client_transport.pause_reading()

    def _message_overdue(self) -> None:
        self._message_timer = None
        if self.done.done():
            return
        try:
            self.run(self.connection.incomplete_for(self.message_timeout))
        except Exception:  # noqa: BLE001 - as in data_received
            self.crashed("incomplete message check")

    def _watch(self, quiet_left: float) -> None:
        """Look again when `quiet_left` more quiet seconds would make the connection idle,
        or sooner (IDLE_STEP): a read marks it active without a time."""
        self._watchdog = self.loop.call_later(min(quiet_left, IDLE_STEP), self._check_idle)

    def _check_idle(self) -> None:
        self._watchdog = None
        if self.done.done() or not self.idle_timeout:
            return
        now = self.loop.time()
        if self.active:  # read since the last look: active as of now, at the latest
            self.active = False
            self.last_activity = now
        quiet = now - self.last_activity
        if quiet >= self.idle_timeout:
            try:
                self.run(self.connection.idle_for(quiet))
            except Exception:  # noqa: BLE001 - as in data_received
                self.crashed("idle check")
            if self.done.done():
                return
            quiet = 0.0  # busy (a long query, a paused statement): look again later
        self._watch(self.idle_timeout - quiet)

    def crashed(self, where: str) -> None:
        log.exception(
            "gateway shell crashed on %s (connection %s); connection closed",
            where,
            self.connection.gate.connection_id,
        )
        self.close(f"internal error in the gateway shell ({where})")

    def close(self, reason: str) -> None:
        """End both sides (buffered writes are flushed first); the first reason stands.
        A held statement's request is withdrawn, and a running one's grant taken back."""
        held = self.connection.held_request
        if held is not None and self.approvals is not None and not self.done.done():
            if self.connection.awaiting_approval is not None:
                self.approvals.withdraw(held, f"the connection ended ({reason})")
            else:
                self._spawn(self.approvals.end(held), f"approval {held}: grant ends")
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._message_timer is not None:
            self._message_timer.cancel()
            self._message_timer = None
        for transport in (self.client_transport, self.upstream_transport):
            if not transport.is_closing():
                transport.close()
        if not self.done.done():
            self.end_reason = reason
            self.done.set_result(None)
