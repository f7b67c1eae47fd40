"""Logging in to the upstream PostgreSQL with the session's issued credentials.

asyncio streams + the sans-IO codec. Supports the authentication methods a server may ask
for: SCRAM-SHA-256, md5 and cleartext (TLS and SCRAM-PLUS arrive with the protocol work).
The issued password never leaves this module except inside the SCRAM/md5 exchange.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import NEED_DATA, BackendParser
from guard.broker.pgwire.scram import ScramClient, md5_password

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


@dataclass
class UpstreamConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parameter_status: list[m.ParameterStatus]
    backend_key: m.BackendKeyData | None
    leftover: bytes  # bytes received after ReadyForQuery (none in practice)


async def _next(reader: asyncio.StreamReader, parser: BackendParser):
    while True:
        msg = parser.next_message()
        if msg is not NEED_DATA:
            return msg
        data = await reader.read(65536)
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
) -> UpstreamConnection:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout=CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"cannot reach the database at {host}:{port}: {exc}") from exc
    try:
        return await asyncio.wait_for(
            _handshake(
                reader, writer, user=user, password=password, database=database, params=params
            ),
            timeout=CONNECT_TIMEOUT,
        )
    except BaseException:
        writer.close()
        raise


async def _handshake(reader, writer, *, user, password, database, params) -> UpstreamConnection:
    startup = {k: v for k, v in params.items() if k in PASSTHROUGH_PARAMS}
    startup.update({"user": user, "database": database})
    writer.write(encode(m.StartupMessage(196608, tuple(startup.items()))))
    await writer.drain()
    parser = BackendParser()
    scram: ScramClient | None = None
    statuses: list[m.ParameterStatus] = []
    key: m.BackendKeyData | None = None
    while True:
        msg = await _next(reader, parser)
        if isinstance(msg, m.ErrorResponse):
            raise UpstreamError(f"database login failed: {msg.message}", msg)
        if isinstance(msg, m.AuthenticationOk):
            continue
        if isinstance(msg, m.AuthenticationSASL):
            if "SCRAM-SHA-256" not in msg.mechanisms:
                raise UpstreamError(f"unsupported SASL mechanisms {msg.mechanisms}")
            scram = ScramClient(password)
            writer.write(encode(m.SASLInitialResponse(scram.mechanism, scram.client_first())))
        elif isinstance(msg, m.AuthenticationSASLContinue):
            if scram is None:
                raise UpstreamError("SASLContinue before SASL start")
            writer.write(encode(m.SASLResponse(scram.handle_server_first(msg.data))))
        elif isinstance(msg, m.AuthenticationSASLFinal):
            if scram is None:
                raise UpstreamError("SASLFinal before SASL start")
            # Verifying the server signature stops a fake upstream from accepting any
            # password and then reading the session's statements.
            scram.verify_server_final(msg.data)
            continue
        elif isinstance(msg, m.AuthenticationMD5Password):
            writer.write(encode(m.PasswordMessage(md5_password(user, password, msg.salt))))
        elif isinstance(msg, m.AuthenticationCleartextPassword):
            writer.write(encode(m.PasswordMessage(password.encode())))
        elif isinstance(msg, m.ParameterStatus):
            statuses.append(msg)
            continue
        elif isinstance(msg, m.BackendKeyData):
            key = msg
            continue
        elif isinstance(msg, m.NoticeResponse | m.NegotiateProtocolVersion):
            continue
        elif isinstance(msg, m.ReadyForQuery):
            leftover = parser.unconsumed() if hasattr(parser, "unconsumed") else b""
            return UpstreamConnection(reader, writer, statuses, key, leftover)
        else:
            raise UpstreamError(f"unexpected message during login: {type(msg).__name__}")
        await writer.drain()


async def simple_query_rows(conn: UpstreamConnection, sql: str) -> list[tuple[bytes | None, ...]]:
    """Run one internal catalog query on a fresh connection (before the client uses it)."""
    conn.writer.write(encode(m.Query(sql)))
    await conn.writer.drain()
    parser = BackendParser()
    rows: list[tuple[bytes | None, ...]] = []
    error: m.ErrorResponse | None = None
    while True:
        msg = await _next(conn.reader, parser)
        if isinstance(msg, m.DataRow):
            rows.append(msg.values)
        elif isinstance(msg, m.ErrorResponse):
            error = msg
        elif isinstance(msg, m.ReadyForQuery):
            break
    if error is not None:
        raise UpstreamError(f"catalog query failed: {error.message}", error)
    return rows


async def cancel(host: str, port: int, key: m.BackendKeyData) -> None:
    """Send a CancelRequest for an upstream backend (its own short connection)."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
    except (OSError, TimeoutError):
        return
    writer.write(encode(m.CancelRequest(key.process_id, key.secret_key)))
    await writer.drain()
    writer.close()
