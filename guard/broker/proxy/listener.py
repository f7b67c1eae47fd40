"""The PG gateway listener: accepts connections and takes each one to its relay.

Per client connection: the startup phase (SSLRequest answered 'S' and TLS started when the
gateway has a certificate, else 'N'; GSSENCRequest always 'N'; bytes pipelined after an
SSLRequest refused; CancelRequest routed by gateway-issued keys), SCRAM-SHA-256 against
the session's verifier, the upstream login with the issued credentials, the protected-column
map, then a `proxy.pump.Pump` running the sans-IO `proxy.connection.GatewayConnection`.
The connection's start and end (with its reason) are audit records.

Decides nothing about statements: that is `proxy.gate`'s job, reached via the connection.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from guard.broker.approvals.service import HeldStatement, Requester
from guard.broker.audit.record import SessionEvent
from guard.broker.audit.sink import AuditSink, AuditUnavailable
from guard.broker.masking.objects import session_search_path
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.errors import ProtocolError
from guard.broker.pgwire.parser import NEED_DATA, FrontendParser
from guard.broker.pgwire.scram import AuthenticationFailed, ScramServer, make_verifier
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.proxy import tlstransport, upstream
from guard.broker.proxy.commands import RequestApproval
from guard.broker.proxy.connection import ProtectedMap
from guard.broker.proxy.core import GatewayConnection
from guard.broker.proxy.core import Pump as BuiltPump  # the compiled twin, when built
from guard.broker.proxy.directory import AT_LIMIT, LocalDirectory, SessionDirectory
from guard.broker.proxy.encoding import codec_for
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.proxy.gate import Gate
from guard.broker.proxy.protected import ProtectedColumnMap
from guard.broker.proxy.pump import MESSAGE_TIMEOUT, Pump
from guard.broker.sessions import Session, SessionManager

log = logging.getLogger("guard.gateway")

READ_SIZE = 256 * 1024
# The whole login (startup packet, TLS, SCRAM, the upstream login) must finish within this
# (PostgreSQL's authentication_timeout is 60 s): a client that stops half-way holds nothing.
LOGIN_TIMEOUT = 30.0
# Connections still logging in (no session proven yet), at most: beyond it a new one gets
# FATAL 53300 at once, so unauthenticated clients cannot take the gateway's memory.
MAX_LOGGING_IN = 128
# Before authentication a message may be this large at most (PostgreSQL's limit for a
# SASL message is 64 KiB; SCRAM's are a few hundred bytes): nothing big is buffered for
# someone who has not proven a session.
AUTH_MESSAGE_LIMIT = 16 * 1024


class _Closed(Exception):
    pass


class TLSRequired(ProtocolError):
    """A plaintext login to a gateway that has a certificate (PostgreSQL's `hostssl`)."""

    sqlstate = "28000"  # invalid_authorization_specification, as PostgreSQL answers it


class GatewayApprovals(Protocol):
    """What the gateway needs of the approval service (`approvals.service.ApprovalService`
    in the broker's process; the broker over the control channel in a worker's)."""

    def holds_for(self, target: str) -> bool: ...

    async def hold(
        self, request_id: str, requester: Requester, held: HeldStatement
    ) -> ApprovalDecided: ...

    async def end_statement(self, request_id: str) -> None: ...

    def withdraw(self, request_id: str, reason: str) -> None: ...


@dataclass
class _CancelTarget:
    host: str
    port: int
    key: m.BackendKeyData
    tls: ssl.SSLContext | None  # the session connection's: the cancel goes the same way
    pump: Pump | None = None  # a held statement is withdrawn, not cancelled upstream


def _fatal(sqlstate: str, message: str, hint: str | None = None) -> bytes:
    return encode(m.ErrorResponse.build(sqlstate, message, severity="FATAL", hint=hint))


class Gateway:
    def __init__(
        self,
        *,
        sessions: SessionManager | None = None,
        directory: SessionDirectory | None = None,
        policy: CompiledPolicy,
        audit: AuditSink,
        protected_map: Callable[[str, upstream.UpstreamConnection], Awaitable[ProtectedMap]],
        tls: ssl.SSLContext | None = None,
        tls_certificate: bytes | None = None,
        idle_timeout: float | None = None,
        approvals: GatewayApprovals | None = None,
        login_timeout: float = LOGIN_TIMEOUT,
        max_logging_in: int = MAX_LOGGING_IN,
        message_timeout: float = MESSAGE_TIMEOUT,
        worker: tuple[int, int] = (0, 1),
        forward_cancel: Callable[[int, bytes], Awaitable[None]] | None = None,
    ) -> None:
        if directory is None:
            assert sessions is not None, "a gateway needs sessions or a directory"
            directory = LocalDirectory(sessions, policy)
        self.directory = directory
        # This gateway's index among the broker's gateway processes, and their number:
        # cancel keys carry the index, so a CancelRequest that the kernel hands to another
        # worker (SO_REUSEPORT balances connections, not sessions) is sent on to this one
        # (`forward_cancel`, through the broker).
        self.worker_index, self.workers = worker
        self._forward_cancel = forward_cancel
        self._handles: set[_Handle] = set()
        self.message_timeout = message_timeout
        self.tls = tls
        # SCRAM-SHA-256-PLUS: the client proves its SCRAM exchange ran over a TLS session
        # with this certificate (`tls_certificate`, DER), so a man in the middle holding
        # another certificate the client wrongly trusts cannot relay the login.
        self._channel_binding = (
            ("tls-server-end-point", upstream.certificate_end_point(tls_certificate))
            if tls is not None and tls_certificate is not None
            else None
        )
        self.login_timeout = login_timeout
        self.max_logging_in = max_logging_in
        self._logging_in = 0
        self.approvals = approvals
        self.idle_timeout = idle_timeout
        self._upstream_tls_cache: dict[str, ssl.SSLContext | None] = {}
        self.policy = policy
        self.audit = audit
        self._protected_map = protected_map
        self._cancel_keys: dict[tuple[int, bytes], _CancelTarget] = {}
        self._listener: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        self._listener = await asyncio.start_server(
            self._handle, host, port, limit=READ_SIZE, reuse_port=reuse_port or None
        )
        sock = self._listener.sockets[0].getsockname()
        return sock[0], sock[1]

    def _upstream_tls(self, session: Session) -> ssl.SSLContext | None:
        # One context per target, built once: loading CA files per connection is slow.
        key = session.target
        if key not in self._upstream_tls_cache:
            self._upstream_tls_cache[key] = session.upstream.tls_context()
        return self._upstream_tls_cache[key]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()

    @property
    def relaying(self) -> bool:
        """Whether any admitted connection is still open."""
        return bool(self._handles)

    def close_connections(self, reason: str) -> None:
        """End every relayed connection (a gateway worker whose broker is gone)."""
        for handle in list(self._handles):
            handle.close(reason)

    # ------------------------------------------------------------------ per connection
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._logging_in >= self.max_logging_in:
            # PostgreSQL's own answer to a full server; nothing of the client is read.
            writer.write(_fatal("53300", "guard: too many connections are logging in"))
            writer.close()
            return
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, _Closed):
            pass
        except Exception:  # noqa: BLE001 - one connection's bug must not kill the gateway
            log.exception("gateway connection failed")
        finally:
            writer.close()

    async def _read_startup(self, reader, writer, parser: FrontendParser):
        encrypted = False
        while True:
            msg = parser.next_message()
            if msg is NEED_DATA:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise _Closed
                parser.feed(data)
                continue
            if isinstance(msg, m.SSLRequest) and self.tls is not None:
                if parser.buffered:
                    # Bytes sent after SSLRequest but before the handshake would be read as if
                    # they had come over TLS (CVE-2021-23214-style injection): refuse.
                    raise ProtocolError("unencrypted data after SSLRequest")
                writer.write(b"S")
                await writer.drain()
                await tlstransport.start_tls(reader, writer, self.tls)
                encrypted = True
                continue
            if isinstance(msg, m.SSLRequest | m.GSSENCRequest):
                # No TLS configured / no GSSAPI: the client falls back or stops, as it chooses.
                writer.write(b"N")
                await writer.drain()
                continue
            if self.tls is not None and not encrypted and isinstance(msg, m.StartupMessage):
                # Like `hostssl`: a gateway with a certificate takes no plaintext login,
                # or the session secret and every statement would cross the network in the
                # clear. (A CancelRequest carries only a key and may come plain: libpq's
                # PQcancel sends it so.)
                raise TLSRequired("guard: this gateway requires TLS (sslmode=verify-full)")
            return msg

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._logging_in += 1
        admitted: list[tuple[Session, _Handle]] = []  # once the session counts it
        try:
            try:
                async with asyncio.timeout(self.login_timeout):
                    login = await self._login(reader, writer, admitted)
            except TimeoutError:
                writer.write(
                    _fatal(
                        "08P01", f"guard: the login did not finish within {self.login_timeout:g} s"
                    )
                )
                return
            finally:
                self._logging_in -= 1
            if login is not None:
                await self._relay(reader, writer, *login, handle=admitted[0][1])
        finally:
            for session, handle in admitted:
                self._handles.discard(handle)
                self.directory.release(session, handle)

    async def _login(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        admitted: list[tuple[Session, _Handle]],
    ) -> tuple[upstream.UpstreamConnection, Session, ProtectedMap, FrontendParser, bool] | None:
        """Startup, TLS, SCRAM and the upstream login; None when the client was refused (it
        was told why). Runs under one deadline (`_serve`). The last item: whether the
        connection reads unmasked (its session's state when the upstream login began)."""
        parser = FrontendParser(max_message_size=AUTH_MESSAGE_LIMIT)
        try:
            startup = await self._read_startup(reader, writer, parser)
        except ProtocolError as err:
            writer.write(encode(err.to_error_response()))
            await writer.drain()
            return None
        if isinstance(startup, m.CancelRequest):
            key = bytes(startup.secret_key)
            owner = (startup.process_id - 1) % self.workers
            if owner != self.worker_index and self._forward_cancel is not None:
                await self._forward_cancel(startup.process_id, key)
            else:
                await self.cancel(startup.process_id, key)
            return None
        params = _startup_params(startup, writer)
        if params is None:
            return None
        user = params.get("user", "")
        session = await self.directory.find(user)
        try:
            await self._authenticate(reader, writer, parser, session, user)
        except (AuthenticationFailed, ProtocolError):
            writer.write(_fatal("28P01", f'password authentication failed for user "{user}"'))
            await writer.drain()
            return None
        assert session is not None
        handle = _Handle()
        refused = await self.directory.admit(session, handle)
        if refused is not None:
            limit = self.policy.targets[session.target].max_connections_per_session
            writer.write(
                _fatal(
                    "53300",
                    f"guard: this session already has {limit} connections, its limit",
                    hint="close some, or ask for the target's max_connections_per_session",
                )
                if refused == AT_LIMIT
                else _fatal("57P01", "guard: session ended")
            )
            return None
        admitted.append((session, handle))
        self._handles.add(handle)
        database = params.get("database") or user
        if database != session.upstream.database:
            writer.write(
                _fatal(
                    "3D000",
                    f"guard: this session is for database "
                    f'"{session.upstream.database}", not "{database}"',
                )
            )
            return None
        # Read once: an approval landing meanwhile must not give this connection a masked
        # search_path and an unmasked gate.
        unmasked = session.unmasked
        opened = await self._open_upstream(session, params, writer, unmasked)
        if opened is None:
            return None
        return opened[0], session, opened[1], parser, unmasked

    async def _open_upstream(
        self,
        session: Session,
        params: dict[str, str],
        writer: asyncio.StreamWriter,
        unmasked: bool,
    ) -> tuple[upstream.UpstreamConnection, ProtectedMap] | None:
        """The session's upstream connection and the target's protected columns; None when
        either failed (the client was told)."""
        try:
            up = await upstream.login(
                host=session.upstream.host,
                port=session.upstream.port,
                user=session.credentials.username,
                password=session.credentials.password,
                database=session.upstream.database,
                params=params,
                tls=self._upstream_tls(session),
                # An unmasked session's unqualified names reach the raw views.
                search_path=session_search_path(unmasked=True) if unmasked else None,
                scram_keys=session.upstream_scram,
            )
        except upstream.UpstreamError as exc:
            log.warning("upstream login for session %s failed: %s", session.id, exc)
            writer.write(
                _fatal(
                    "08006",
                    "guard: cannot open the upstream database connection "
                    "for this session; ask the guard operator to check the broker log",
                )
            )
            await writer.drain()
            return None
        try:
            protected = await self._protected_map(session.target, up)
            if unmasked and isinstance(protected, ProtectedColumnMap):
                protected = protected.for_unmasked()
        except asyncio.CancelledError:  # the login deadline: the upstream goes too
            up.wire.close()
            raise
        except upstream.UpstreamError as exc:
            log.error("protected-column lookup failed for session %s: %s", session.id, exc)
            up.wire.close()
            writer.write(
                _fatal(
                    "08006",
                    "guard: cannot verify the masking configuration of this "
                    "target; refusing the connection",
                )
            )
            return None
        return up, protected

    async def _authenticate(
        self, reader, writer, parser: FrontendParser, session: Session | None, user: str
    ) -> None:
        # An unknown user still goes through a full SCRAM exchange against a throwaway
        # verifier, so a client cannot probe which session users exist.
        verifier = session.verifier if session is not None else make_verifier(secrets.token_hex(16))
        encrypted = writer.get_extra_info("ssl_object") is not None
        server = ScramServer(verifier, channel_binding=self._channel_binding if encrypted else None)
        writer.write(encode(m.AuthenticationSASL(server.mechanisms)))
        await writer.drain()
        parser.expect_password("sasl_initial")
        first = await self._read_message(reader, parser)
        if not isinstance(first, m.SASLInitialResponse):
            raise AuthenticationFailed("expected SASLInitialResponse")
        server_first = server.handle_client_first(first.data or b"", first.mechanism)
        writer.write(encode(m.AuthenticationSASLContinue(server_first)))
        await writer.drain()
        parser.expect_password("sasl")
        final = await self._read_message(reader, parser)
        if not isinstance(final, m.SASLResponse):
            raise AuthenticationFailed("expected SASLResponse")
        server_final = server.handle_client_final(final.data)
        if session is None or not self.directory.is_live(session):
            raise AuthenticationFailed("no such session")
        writer.write(encode(m.AuthenticationSASLFinal(server_final)))
        await writer.drain()

    def forget_catalog(self, target: str) -> None:
        """The target's catalog facts changed (its backstop was applied): read them again
        at the next connection instead of within the cache's lifetime."""
        forget = getattr(self._protected_map, "forget", None)
        if forget is not None:
            forget(target)

    async def _read_message(self, reader, parser: FrontendParser):
        while True:
            msg = parser.next_message()
            if msg is not NEED_DATA:
                return msg
            data = await reader.read(READ_SIZE)
            if not data:
                raise _Closed
            parser.feed(data)

    async def _relay(
        self,
        creader,
        cwriter,
        up: upstream.UpstreamConnection,
        session: Session,
        protected: ProtectedMap,
        parser: FrontendParser,
        unmasked: bool,
        *,
        handle: _Handle,
    ) -> None:
        connection_id = secrets.token_hex(4)
        gate = Gate(
            policy=self.policy,
            target=session.target,
            principal=session.principal,
            session_id=session.id,
            connection_id=connection_id,
            redirects=getattr(protected, "twins", frozenset()),
            unmasked=unmasked,
        )
        encoding = next(
            (p.value for p in up.parameter_status if p.name == "client_encoding"), "UTF8"
        )
        if codec_for(encoding) is None:
            cwriter.write(
                _fatal("0A000", f"guard: client_encoding {encoding} is not supported; use UTF8")
            )
            up.wire.close()
            return
        desk = None
        if self.approvals is not None and self.approvals.holds_for(session.target):
            desk = _Desk(self.approvals, Requester.of(session))
        connection = GatewayConnection(
            gate,
            protected=protected,
            client_user=session.user,
            client_encoding=encoding,
            holds=desk is not None,
            # A durable sink answers after its fsync (group commit, pump._write_audit).
            audit_answers_later=getattr(self.audit, "group_commit", None) is not None,
        )
        # Clients cancel with a gateway-issued key; only the gateway knows the upstream one.
        # Its process id says which gateway worker holds the connection: (pid - 1) % workers.
        client_key = m.BackendKeyData(
            secrets.randbelow((2**31 - 1) // self.workers) * self.workers + self.worker_index + 1,
            secrets.token_bytes(4),
        )
        key_id = (client_key.process_id, client_key.secret_key)
        if up.backend_key is not None:
            self._cancel_keys[key_id] = _CancelTarget(
                session.upstream.host,
                session.upstream.port,
                up.backend_key,
                self._upstream_tls(session),
            )
        hello = [m.AuthenticationOk()]
        for status in up.parameter_status:
            if status.name == "session_authorization":
                status = m.ParameterStatus(status.name, session.user)
            hello.append(status)
        hello += [client_key, m.ReadyForQuery(b"I")]
        cwriter.write(b"".join(encode(x) for x in hello))
        await cwriter.drain()

        server_failed = None
        try:
            upstream_transport, upstream_tls, server_pending = await up.hand_over()
        except upstream.UpstreamError as exc:
            server_failed, server_pending = exc, b""
            upstream_transport, upstream_tls = up.wire.transport, None
        pump = BuiltPump(
            connection,
            cwriter.transport,
            upstream_transport,
            audit=self.audit,
            tls=upstream_tls,
            idle_timeout=self.idle_timeout,
            approvals=desk,
            message_timeout=self.message_timeout,
        )
        if key_id in self._cancel_keys:
            self._cancel_keys[key_id].pump = pump
        self._record(session, "connection_opened", connection_id)
        try:
            if server_failed is not None:
                log.warning(
                    "upstream connection for session %s failed: %s", session.id, server_failed
                )
                pump.close(f"upstream failed: {server_failed}")
                return
            pump.start(upstream.take_stream_buffer(creader) + parser.unconsumed(), server_pending)
            handle.attach(pump)  # closed at once if the session ended meanwhile
            await pump.done
        finally:
            self._cancel_keys.pop(key_id, None)
            pump.close("gateway closing")
            self._record(session, "connection_ended", f"{connection_id}: {pump.end_reason}")

    async def cancel(self, process_id: int, secret_key: bytes) -> None:
        """A CancelRequest for a connection of this gateway (process)."""
        target = self._cancel_keys.get((process_id, secret_key))
        if target is not None and target.pump is not None and target.pump.cancel_held():
            return  # the statement was waiting for approval: its request is withdrawn
        if target is not None:
            await upstream.cancel(target.host, target.port, target.key, target.tls)
        # A key from another session (or none) cancels nothing.

    def _record(self, session: Session, event: str, detail: str) -> None:
        try:
            self.audit.append(
                SessionEvent(session.id, event, session.principal.subject, session.target, detail)
            )
        except AuditUnavailable as exc:
            log.error("could not record %s of session %s: %s", event, session.id, exc)


def _startup_params(startup: object, writer: asyncio.StreamWriter) -> dict[str, str] | None:
    """The startup parameters of a login guard accepts; None (the client told why) else."""
    if not isinstance(startup, m.StartupMessage):
        writer.write(_fatal("08P01", "guard: expected a startup message"))
        return None
    params = dict(startup.params)
    if params.get("replication") not in (None, "false", "0", "off", "no"):
        writer.write(_fatal("42501", "guard: replication connections are not allowed"))
        return None
    unrecognized = tuple(k for k in params if k.startswith("_pq_."))
    if startup.minor > 0 or unrecognized:
        # A 3.2 client (or one asking for protocol extensions) is told we speak 3.0, as
        # PostgreSQL itself does; the client then continues with 3.0 semantics. The
        # version is the full number (196608), as PostgreSQL sends it and libpq reads it:
        # a bare minor 0 reads as "pre-3.0" and libpq 18 drops the connection.
        writer.write(encode(m.NegotiateProtocolVersion(3 << 16, unrecognized)))
    return params


class _Desk:
    """The approval service, bound to one connection's session (`pump.ApprovalDesk`)."""

    def __init__(self, service: GatewayApprovals, requester: Requester) -> None:
        self.service = service
        self.requester = requester

    async def hold(self, command: RequestApproval) -> ApprovalDecided:
        return await self.service.hold(
            command.request_id, self.requester, HeldStatement.of(command.decision)
        )

    async def end(self, request_id: str) -> None:
        await self.service.end_statement(request_id)

    def withdraw(self, request_id: str, reason: str) -> None:
        self.service.withdraw(request_id, reason)


class _Handle:
    """What a session holds for each connection it admitted, so ending the session ends it
    (at once if relaying, else as soon as its relay starts)."""

    def __init__(self) -> None:
        self._pump: Pump | None = None
        self._closed: str | None = None

    def attach(self, pump: Pump) -> None:
        self._pump = pump
        if self._closed is not None:
            self.close(self._closed)

    def close(self, reason: str) -> None:
        self._closed = reason
        if self._pump is None:
            return
        if not self._pump.client_transport.is_closing():
            self._pump.client_transport.write(_fatal("57P01", f"guard: session ended ({reason})"))
        self._pump.close(f"session ended ({reason})")
