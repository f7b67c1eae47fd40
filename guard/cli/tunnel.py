"""The CLI's loopback relay: a local PostgreSQL endpoint that lives as long as the session.

asyncio only (uvloop's loop when the CLI runs it); moves bytes and decides nothing
(policy, masking and audit happen in the broker's gateway). Listens on 127.0.0.1 with an
ephemeral port, so only local processes can reach it. Loopback stays plain: the relay
answers a client's SSLRequest/GSSENCRequest with 'N' itself; towards the gateway it speaks
TLS (verified against the configured CA and the gateway's host name) when the gateway
offers it, and never downgrades to plaintext. CancelRequest packets travel the same way,
so psql's Ctrl-C reaches the gateway. After the startup packet each direction is a
protocol callback that writes to the other side (`_Splice`): no task per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_AUTH_SASL = 10  # AuthenticationSASL's code in an 'R' message
_MAX_STARTUP = 10_000  # as PostgreSQL's MAX_STARTUP_PACKET_LENGTH
_HEADER = struct.Struct("!ii")
_STARTUP_TIMEOUT = 30.0  # seconds for the client's startup packet
_GATEWAY_TIMEOUT = 30.0  # seconds to connect to the gateway and finish the TLS handshake


def _fatal(sqlstate: str, message: str) -> bytes:
    """A FATAL ErrorResponse (the CLI does not import the broker's codec: a few fields)."""
    fields = b"".join(
        code + value.encode("utf-8", "replace").replace(b"\0", b"") + b"\0"
        for code, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    return b"E" + struct.pack("!i", len(fields) + 5) + fields + b"\0"


class _Splice(asyncio.Protocol):
    """One direction's receiving end: what arrives is written to the peer's transport at
    once, from the event loop's callback, with no task or await per chunk (the relay's
    cost is the socket and TLS calls, not Python scheduling). Backpressure both ways: a
    peer whose buffer fills pauses this side's reading until it drains."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Splice | None = None
        self._done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool:
        # Half-close: the other side may still answer (a Terminate's last bytes).
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
            # Keep our writing side open for the answer; a TLS transport cannot (it
            # closes after close_notify), so the relay ends with it.
            tls = self.transport is not None and self.transport.get_extra_info("sslcontext")
            if not tls:
                return True
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:  # our transport is full: stop reading the peer
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def read_startup_packet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Answer encryption requests with 'N'; return the client's startup/cancel packet."""
    while True:
        header = await reader.readexactly(8)
        length, code = _HEADER.unpack(header)
        if length == 8 and code in (_SSL_REQUEST, _GSSENC_REQUEST):
            writer.write(b"N")
            await writer.drain()
            continue
        if not 8 <= length <= _MAX_STARTUP:
            raise ConnectionError("invalid startup packet length")
        return header + await reader.readexactly(length - 8)


async def _connect(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket to host:port (each resolved address in turn)."""
    loop = asyncio.get_running_loop()
    error: OSError | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"could not resolve {host}")


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    """One whole backend message (type byte, length, body)."""
    header = await reader.readexactly(5)
    length = struct.unpack_from("!i", header, 1)[0]
    if not 4 <= length <= _MAX_STARTUP:
        raise ConnectionError("invalid message from the gateway during login")
    return header + await reader.readexactly(length - 4)


def without_channel_binding(message: bytes) -> bytes:
    """The gateway's AuthenticationSASL with SCRAM-SHA-256-PLUS taken out; any other
    message unchanged.

    The gateway offers -PLUS because its TLS peer could bind to the TLS session, but that
    peer is this relay: the client behind it talks plain loopback, and libpq refuses a
    server that offers channel binding over a connection without TLS. The relay verified
    the gateway's certificate itself, which is what binding would prove."""
    if message[:1] != b"R" or struct.unpack_from("!i", message, 5)[0] != _AUTH_SASL:
        return message
    names = message[9:].split(b"\0")
    kept = [name for name in names if name and name != b"SCRAM-SHA-256-PLUS"]
    body = struct.pack("!i", _AUTH_SASL) + b"".join(name + b"\0" for name in kept) + b"\0"
    return b"R" + struct.pack("!i", len(body) + 4) + body


async def _splice(
    creader: asyncio.StreamReader,
    cwriter: asyncio.StreamWriter,
    greader: asyncio.StreamReader,
    gwriter: asyncio.StreamWriter,
) -> None:
    """Relay client <-> gateway until either side is done. The streams served the startup
    exchange; from here their transports get `_Splice` protocols, so each chunk costs one
    callback and one write. Bytes a stream had already read are relayed first."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    client, server = _Splice(done), _Splice(done)
    client.peer, server.peer = server, client
    for protocol, reader, writer in ((client, creader, cwriter), (server, greader, gwriter)):
        transport = writer.transport
        protocol.connection_made(transport)
        buffered = bytes(reader._buffer)  # noqa: SLF001 - read ahead by the stream
        reader._buffer.clear()  # noqa: SLF001
        transport.set_protocol(protocol)
        if buffered:
            protocol.data_received(buffered)
        if reader.at_eof():
            protocol.eof_received()
    await done


class LoopbackRelay:
    def __init__(
        self,
        gateway_host: str,
        gateway_port: int,
        tls: ssl.SSLContext | None = None,
        *,
        port: int = 0,  # 0: any free port
    ) -> None:
        self.gateway_host = gateway_host
        self.gateway_port = gateway_port
        self.tls = tls
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _open_gateway(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.tls is None:
            return await asyncio.open_connection(self.gateway_host, self.gateway_port)
        loop = asyncio.get_running_loop()
        sock = await _connect(self.gateway_host, self.gateway_port)
        try:
            await loop.sock_sendall(sock, _HEADER.pack(8, _SSL_REQUEST))
            # Exactly one byte off the socket: anything sent after the 'S' in the clear
            # stays in the socket and breaks the TLS handshake, instead of sitting in a
            # stream buffer and being relayed as if the verified gateway had sent it
            # (the CVE-2021-23222 pattern).
            if await loop.sock_recv(sock, 1) != b"S":
                raise ConnectionError("the gateway refused TLS; not falling back to plaintext")
            return await asyncio.open_connection(
                sock=sock, ssl=self.tls, server_hostname=self.gateway_host
            )
        except BaseException:
            sock.close()
            raise

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            startup = await asyncio.wait_for(
                read_startup_packet(creader, cwriter), _STARTUP_TIMEOUT
            )
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            cwriter.close()
            return
        try:
            greader, gwriter = await asyncio.wait_for(self._open_gateway(), _GATEWAY_TIMEOUT)
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            # Tell psql why (its own "server closed the connection unexpectedly" says
            # nothing), as PostgreSQL would, before the client has sent any credential.
            # A cancel connection gets no answer from PostgreSQL either.
            if _HEADER.unpack_from(startup)[1] != _CANCEL_REQUEST:
                cwriter.write(_fatal("08001", self._unreachable(exc)))
                with contextlib.suppress(ConnectionError):
                    await cwriter.drain()
            cwriter.close()
            return
        self._conns.update((cwriter, gwriter))
        try:
            gwriter.write(startup)
            if self.tls is not None and _HEADER.unpack_from(startup)[1] != _CANCEL_REQUEST:
                first = await asyncio.wait_for(_read_message(greader), _GATEWAY_TIMEOUT)
                cwriter.write(without_channel_binding(first))
            await _splice(creader, cwriter, greader, gwriter)
        finally:
            for w in (cwriter, gwriter):
                self._conns.discard(w)
                w.close()

    def _unreachable(self, exc: BaseException) -> str:
        where = f"{self.gateway_host}:{self.gateway_port}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = f"its TLS certificate did not verify ({exc.verify_message})"
        elif isinstance(exc, TimeoutError):
            why = f"no answer within {_GATEWAY_TIMEOUT:g} s"
        else:
            why = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        return (
            f"guard: cannot reach the gateway at {where}: {why}. Check that the broker is "
            "up and the session is live (guard connect again), and the gateway CA setting"
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


def client_tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the gateway's certificate and host name (system CAs unless a CA file is set)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
