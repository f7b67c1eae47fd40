"""The CLI's loopback relay: a local PostgreSQL endpoint that lives as long as the session.

asyncio only; moves bytes and decides nothing (policy, masking and audit happen in the
broker's gateway). Listens on 127.0.0.1 with an ephemeral port, so only local processes
can reach it. Loopback stays plain: the relay answers a client's SSLRequest/GSSENCRequest
with 'N' itself; towards the gateway it speaks TLS (verified against the configured CA and
the gateway's host name) when the gateway offers it, and never downgrades to plaintext.
CancelRequest packets travel the same way, so psql's Ctrl-C reaches the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

_CHUNK = 256 * 1024
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
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


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()  # backpressure: a slow reader slows the sender
    except (ConnectionError, asyncio.CancelledError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


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
            await asyncio.gather(_pipe(creader, gwriter), _pipe(greader, cwriter))
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
