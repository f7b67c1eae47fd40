"""Logging in to the upstream PostgreSQL with the session's issued credentials.

asyncio streams + the sans-IO codec. Supports TLS (SSLRequest, then a verified handshake
when the target's settings ask for it; no silent fallback to plaintext; the record layer is
`proxy.tlslayer` over the plain stream, which the pump keeps using) and the methods a
server may ask for: SCRAM-SHA-256-PLUS (channel binding to the TLS certificate, which stops
a man in the middle that terminates TLS), SCRAM-SHA-256, md5 and cleartext. The issued
password never leaves this module except inside those exchanges.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import NEED_DATA, BackendParser
from guard.broker.pgwire.scram import ScramClient, ScramKeys, md5_password
from guard.broker.proxy import tlstransport
from guard.broker.proxy.tlslayer import TLSClient, TLSClosed

log = logging.getLogger("guard.proxy")

# Startup parameters a client may pass through. Everything else (notably `options`, which
# can carry `-c role=…` or `-c search_path=…`, and `replication`) is dropped: those would
# let a client step around the session role's masking defaults.
PASSTHROUGH_PARAMS = frozenset(
    {
        "application_name",
        "client_encoding",
        "DateStyle",
        "datestyle",
        "TimeZone",
        "timezone",
        "IntervalStyle",
        "intervalstyle",
        "extra_float_digits",
        "lc_monetary",
        "lc_numeric",
        "lc_time",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
    }
)

CONNECT_TIMEOUT = 10.0


class UpstreamError(Exception):
    """Login upstream failed; `error` is the server's ErrorResponse when it sent one."""

    def __init__(self, message: str, error: m.ErrorResponse | None = None) -> None:
        super().__init__(message)
        self.error = error


class Wire:
    """The upstream byte stream: a plain asyncio stream, with TLS on top once started."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.tls: TLSClient | None = None

    @property
    def transport(self) -> asyncio.Transport:
        return self.writer.transport  # type: ignore[return-value]

    def write(self, data: bytes) -> None:
        self.writer.write(self.tls.encrypt(data) if self.tls is not None else data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def read(self) -> bytes:
        """Next plaintext bytes; b"" at end of stream."""
        if self.tls is None:
            return await self.reader.read(65536)
        data = b""  # records already buffered come first
        while True:
            plain = self._decrypt(data)
            if plain is None:
                return b""  # the server ended TLS
            if plain:
                return plain
            data = await self.reader.read(65536)
            if not data:
                return b""

    def take_buffered(self) -> bytes:
        """Plaintext of everything received but not yet read (handed over to the pump)."""
        data = take_stream_buffer(self.reader)
        return data if self.tls is None else self._decrypt(data) or b""

    def _decrypt(self, data: bytes) -> bytes | None:
        """Plaintext of the complete records so far; None once the server ended TLS."""
        assert self.tls is not None
        try:
            return self.tls.decrypt(data)
        except TLSClosed:
            return None
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS to the database failed: {exc.reason or exc}") from exc

    def close(self) -> None:
        self.writer.close()


def take_stream_buffer(reader: asyncio.StreamReader) -> bytes:
    """Bytes a StreamReader holds but nobody read yet (handed over to the pump)."""
    buffer = reader._buffer  # noqa: SLF001 - no public API to take over a stream's buffer
    data = bytes(buffer)
    buffer.clear()
    return data


@dataclass
class UpstreamConnection:
    wire: Wire
    parameter_status: list[m.ParameterStatus]
    backend_key: m.BackendKeyData | None
    leftover: bytes  # plaintext received after ReadyForQuery (none in practice)

    async def hand_over(self) -> tuple[asyncio.Transport, TLSClient | None, bytes]:
        """For the pump: the transport, the TLS record layer it still runs itself (None:
        plain, or the records move in C: `tlstransport`), and the plaintext received but
        not yet relayed (the login's leftover first). Raises UpstreamError when received
        bytes do not decrypt."""
        wire = self.wire
        if wire.tls is not None:
            await tlstransport.settle(wire.writer)  # before the reader's bytes are taken
        pending = self.leftover + wire.take_buffered()
        if wire.tls is not None:
            # No await since the buffer was taken: every record after it reaches C.
            adopted = tlstransport.adopt(wire.transport, wire.tls.ssl_object)
            if adopted is not None:
                return adopted, None, pending
        return wire.transport, wire.tls, pending


async def _next(wire: Wire, parser: BackendParser):
    while True:
        msg = parser.next_message()
        if msg is not NEED_DATA:
            return msg
        data = await wire.read()
        if not data:
            raise UpstreamError("the database closed the connection during login")
        parser.feed(data)


async def login(
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    database: str,
    params: dict[str, str],
    tls: ssl.SSLContext | None = None,
    search_path: str | None = None,
    scram_keys: ScramKeys | None = None,
) -> UpstreamConnection:
    """Log in as the session's role. `search_path`, when given, is set by the startup
    packet (never from the client's parameters, which cannot carry it); `scram_keys`
    keeps the password's SCRAM keys between logins (the session's)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout=CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"cannot reach the database at {host}:{port}: {exc}") from exc
    wire = Wire(reader, writer)
    try:
        if tls is not None:
            await asyncio.wait_for(_start_tls(wire, tls, host), CONNECT_TIMEOUT)
        return await asyncio.wait_for(
            _handshake(
                wire,
                user=user,
                password=password,
                database=database,
                params=params,
                search_path=search_path,
                scram_keys=scram_keys,
            ),
            timeout=CONNECT_TIMEOUT,
        )
    except BaseException:
        writer.close()
        raise


async def _start_tls(wire: Wire, context: ssl.SSLContext, host: str) -> None:
    wire.write(encode(m.SSLRequest()))
    await wire.drain()
    # Exactly one byte: anything the server sent after 'S' and before our handshake would
    # be an injection attempt (CVE-2021-23222), which the handshake then rejects.
    answer = await wire.reader.readexactly(1)
    if answer != b"S":
        raise UpstreamError("the database refused TLS, which this target requires")
    tls = TLSClient(context, host)
    groups = tlstransport.upstream_groups(context)
    if groups is not None:
        tlstransport.prefer_groups(tls.ssl_object, groups)
    try:
        wire.writer.write(await tlstransport.handshake(tls, wire.reader, wire.writer))
    except EOFError:
        raise UpstreamError("the database closed the connection during the TLS handshake") from None
    except ssl.SSLCertVerificationError as exc:
        # Say which check failed (unknown CA, hostname, expiry): that is what to fix.
        raise UpstreamError(
            f"TLS to the database failed: certificate verification: {exc.verify_message}"
        ) from exc
    except ssl.SSLError as exc:
        raise UpstreamError(f"TLS to the database failed: {exc.reason or exc}") from exc
    await wire.drain()
    wire.tls = tls


def tls_server_end_point(wire: Wire) -> bytes | None:
    """RFC 5929 channel-binding data of the database's certificate, once TLS is up."""
    ssl_object = wire.tls.ssl_object if wire.tls is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return certificate_end_point(der) if der else None


def certificate_end_point(der: bytes) -> bytes:
    """RFC 5929 "tls-server-end-point" data: the certificate's hash with its signature's
    hash algorithm (SHA-256 for MD5/SHA-1)."""
    algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        return hashlib.sha256(der).digest()
    return hashlib.new(algorithm.name, der).digest()


async def _handshake(  # noqa: C901 - one branch per message of the login exchange, in order
    wire: Wire,
    *,
    user: str,
    password: str,
    database: str,
    params: dict[str, str],
    search_path: str | None = None,
    scram_keys: ScramKeys | None = None,
) -> UpstreamConnection:
    startup = {k: v for k, v in params.items() if k in PASSTHROUGH_PARAMS}
    startup.update({"user": user, "database": database})
    if search_path is not None:
        startup["search_path"] = search_path
    wire.write(encode(m.StartupMessage(196608, tuple(startup.items()))))
    await wire.drain()
    parser = BackendParser()
    scram: ScramClient | None = None
    statuses: list[m.ParameterStatus] = []
    key: m.BackendKeyData | None = None
    while True:
        msg = await _next(wire, parser)
        if isinstance(msg, m.ErrorResponse):
            raise UpstreamError(f"database login failed: {msg.message}", msg)
        if isinstance(msg, m.AuthenticationOk):
            continue
        if isinstance(msg, m.AuthenticationSASL):
            binding = tls_server_end_point(wire)
            if binding is not None and "SCRAM-SHA-256-PLUS" in msg.mechanisms:
                scram = ScramClient(
                    password, channel_binding=("tls-server-end-point", binding), keys=scram_keys
                )
            elif "SCRAM-SHA-256" in msg.mechanisms:
                scram = ScramClient(password, keys=scram_keys)
            else:
                raise UpstreamError(f"unsupported SASL mechanisms {msg.mechanisms}")
            wire.write(encode(m.SASLInitialResponse(scram.mechanism, scram.client_first())))
        elif isinstance(msg, m.AuthenticationSASLContinue):
            if scram is None:
                raise UpstreamError("SASLContinue before SASL start")
            wire.write(encode(m.SASLResponse(scram.handle_server_first(msg.data))))
        elif isinstance(msg, m.AuthenticationSASLFinal):
            if scram is None:
                raise UpstreamError("SASLFinal before SASL start")
            # Verifying the server signature stops a fake upstream from accepting any
            # password and then reading the session's statements.
            scram.verify_server_final(msg.data)
            continue
        elif isinstance(msg, m.AuthenticationMD5Password):
            wire.write(encode(m.PasswordMessage(md5_password(user, password, msg.salt))))
        elif isinstance(msg, m.AuthenticationCleartextPassword):
            wire.write(encode(m.PasswordMessage(password.encode())))
        elif isinstance(msg, m.ParameterStatus):
            statuses.append(msg)
            continue
        elif isinstance(msg, m.BackendKeyData):
            key = msg
            continue
        elif isinstance(msg, m.NoticeResponse | m.NegotiateProtocolVersion):
            continue
        elif isinstance(msg, m.ReadyForQuery):
            leftover = parser.unconsumed()
            return UpstreamConnection(wire, statuses, key, leftover)
        else:
            raise UpstreamError(f"unexpected message during login: {type(msg).__name__}")
        await wire.drain()


async def query_rows(
    conn: UpstreamConnection, sql: str, params: Sequence[str] = ()
) -> list[tuple[bytes | None, ...]]:
    """Run one internal query on a fresh connection (before the client uses it).

    Extended protocol with `params` as text parameters typed `text` ($1, $2, ...): values
    are never spliced into the SQL. Rows come back in text format.
    """
    text_oid = 25
    conn.wire.write(
        b"".join(
            encode(msg)
            for msg in (
                m.Parse("", sql, (text_oid,) * len(params)),
                m.Bind("", "", (), tuple(p.encode() for p in params), ()),
                m.Execute("", 0),
                m.Sync(),
            )
        )
    )
    await conn.wire.drain()
    parser = BackendParser()
    rows: list[tuple[bytes | None, ...]] = []
    error: m.ErrorResponse | None = None
    while True:
        msg = await _next(conn.wire, parser)
        if isinstance(msg, m.DataRow):
            rows.append(msg.values)
        elif isinstance(msg, m.ErrorResponse):
            error = msg
        elif isinstance(msg, m.ReadyForQuery):
            break
    if error is not None:
        raise UpstreamError(f"catalog query failed: {error.message}", error)
    return rows


async def cancel(
    host: str, port: int, key: m.BackendKeyData, tls: ssl.SSLContext | None = None
) -> None:
    """Send a CancelRequest for an upstream backend (its own short connection).

    Over verified TLS when the session's connection uses it, as libpq 17 does: the key
    cancels that backend's queries, so it does not cross the network in the clear.
    Best effort, like PostgreSQL's own cancel: failures are logged, never raised.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request not sent: cannot reach the database: %s", exc)
        return
    wire = Wire(reader, writer)
    try:
        if tls is not None:
            await asyncio.wait_for(_start_tls(wire, tls, host), 5.0)
        wire.write(encode(m.CancelRequest(key.process_id, key.secret_key)))
        await wire.drain()
    except (OSError, TimeoutError, UpstreamError) as exc:
        log.warning("cancel request not sent: %s", exc)
    finally:
        wire.close()
