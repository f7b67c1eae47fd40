"""The gateway's startup phase and framing over raw sockets, against the real demo stack.

Every read is bounded (READ_TIMEOUT): a gateway that waits for bytes that will never come
fails the test instead of hanging it. Messages are built and read with guard's own codec.
Clients log in over verified TLS (the gateway refuses plaintext logins, see
test_gateway_tls_only); CancelRequests go in plaintext, as libpq's PQcancel sends them.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import socket
import ssl
import struct
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import NEED_DATA, BackendParser
from guard.broker.pgwire.scram import ScramClient
from tests.fix_stack import Stack
from tests.integration import test_gateway
from tests.integration.test_gateway import connect

pytestmark = pytest.mark.integration
session = test_gateway.session  # the module-scoped session fixture, shared

READ_TIMEOUT = 5.0
PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2


class Wire:
    """One raw client connection: bounded reads, backend messages decoded by BackendParser."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.sock: socket.socket = socket.create_connection((host, port), timeout=READ_TIMEOUT)
        self.parser = BackendParser()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, size: int = 65536) -> bytes:
        try:
            return self.sock.recv(size)
        except TimeoutError:
            pytest.fail(f"the gateway sent nothing within {READ_TIMEOUT} s (hang)")

    def byte(self) -> bytes:
        """One raw byte (the answer to SSLRequest/GSSENCRequest); never reads further."""
        assert not self.parser.buffered
        data = self._recv(1)
        assert data, "connection closed instead of answering"
        return data

    def message(self) -> m.BackendMessage:
        while True:
            msg = self.parser.next_message()
            if msg is not NEED_DATA:
                return msg
            data = self._recv()
            if not data:
                raise EOFError("the gateway closed the connection")
            self.parser.feed(data)

    def fatal(self) -> m.ErrorResponse:
        """The next message, which must be a FATAL ErrorResponse, then a prompt close."""
        msg = self.message()
        assert isinstance(msg, m.ErrorResponse), msg
        assert msg.severity == "FATAL"
        self.assert_closed()
        return msg

    def assert_closed(self) -> None:
        assert not self.parser.buffered, "data after the FATAL error"
        try:
            data = self._recv()
        except ConnectionResetError:
            return
        assert data == b"", f"unexpected bytes instead of a close: {data[:40]!r}"

    def nothing_pending(self, wait: float) -> bool:
        if isinstance(self.sock, ssl.SSLSocket):
            # TLS has no MSG_PEEK: whatever arrives is kept for the next message().
            if self.parser.buffered or self.sock.pending():
                return False
            self.sock.settimeout(wait)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return True
            finally:
                self.sock.settimeout(READ_TIMEOUT)
            self.parser.feed(data)
            return not data
        self.sock.settimeout(wait)
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(READ_TIMEOUT)

    def start_tls(self, cafile: str) -> None:
        self.send(encode(m.SSLRequest()))
        assert self.byte() == b"S"
        context = ssl.create_default_context(cafile=cafile)
        self.sock = context.wrap_socket(self.sock, server_hostname=self.host)

    def login(
        self, body: dict, *, protocol: int = PROTOCOL_3_0, extra: tuple = ()
    ) -> tuple[list[m.BackendMessage], m.BackendKeyData]:
        """Startup + SCRAM-SHA-256 up to ReadyForQuery; (messages before the SASL request,
        BackendKeyData)."""
        params = (("user", body["user"]), ("database", body["database"]), *extra)
        self.send(encode(m.StartupMessage(protocol, params)))
        before = []
        msg = self.message()
        while not isinstance(msg, m.AuthenticationSASL):
            assert not isinstance(msg, m.ErrorResponse), msg.message
            before.append(msg)
            msg = self.message()
        assert "SCRAM-SHA-256" in msg.mechanisms
        scram = ScramClient(body["password"])
        self.send(encode(m.SASLInitialResponse("SCRAM-SHA-256", scram.client_first())))
        cont = self.message()
        assert isinstance(cont, m.AuthenticationSASLContinue), cont
        self.send(encode(m.SASLResponse(scram.handle_server_first(cont.data))))
        final = self.message()
        assert isinstance(final, m.AuthenticationSASLFinal), final
        scram.verify_server_final(final.data)
        assert isinstance(self.message(), m.AuthenticationOk)
        key = None
        while not isinstance(msg := self.message(), m.ReadyForQuery):
            assert not isinstance(msg, m.ErrorResponse), msg.message
            if isinstance(msg, m.BackendKeyData):
                key = msg
        assert msg.status == b"I"
        assert key is not None, "no BackendKeyData before ReadyForQuery"
        return before, key

    def query(self, sql: str) -> list[m.BackendMessage]:
        """Simple query; every message up to ReadyForQuery."""
        self.send(encode(m.Query(sql)))
        return self.until_ready()

    def until_ready(self) -> list[m.BackendMessage]:
        out = []
        while not isinstance(msg := self.message(), m.ReadyForQuery):
            out.append(msg)
        return out


def gateway(body: dict, *, tls: bool = True) -> Wire:
    """A raw connection to the gateway, TLS already negotiated (verified against the
    stack's CA) unless `tls` is False (the test negotiates, or sends a CancelRequest)."""
    wire = Wire(body["gateway_host"], body["gateway_port"])
    if tls:
        wire.start_tls(body["gateway_ca"])
    return wire


def scalar(messages: list[m.BackendMessage]) -> bytes:
    errors = [x for x in messages if isinstance(x, m.ErrorResponse)]
    assert not errors, errors[0].message
    (row,) = [x for x in messages if isinstance(x, m.DataRow)]
    return row.values[0]


def cancel(body: dict, process_id: int, secret_key: bytes) -> None:
    """A CancelRequest on its own plaintext connection (as libpq's PQcancel sends it); the
    gateway answers nothing and hangs up."""
    with gateway(body, tls=False) as wire:
        wire.send(encode(m.CancelRequest(process_id, secret_key)))
        wire.assert_closed()


def upstream_address(stack: Stack) -> tuple[str, int]:
    info = psycopg.conninfo.conninfo_to_dict(stack.admin_dsn)
    if "host" in info:
        return info["host"], int(info.get("port", 5432))
    url = urlsplit(stack.admin_dsn)
    return url.hostname, url.port or 5432


# ---------------------------------------------------------------- 1. protocol negotiation
def test_protocol_3_2_with_unknown_option_is_negotiated_down_like_postgres(
    dev_stack: Stack, session
):
    option = ("_pq_.guard_test_option", "on")
    with gateway(session) as wire:
        before, _key = wire.login(session, protocol=PROTOCOL_3_2, extra=(option,))
        # Protocol 3.0, as the full version number PostgreSQL sends (see below), and the
        # option it does not know.
        assert before == [m.NegotiateProtocolVersion(PROTOCOL_3_0, ("_pq_.guard_test_option",))]
        # Login continued normally: the connection works.
        assert scalar(wire.query("SELECT 41 + 1")) == b"42"
    # PostgreSQL itself answers the same startup packet with the same message first.
    host, port = upstream_address(dev_stack)
    with Wire(host, port) as direct:
        direct.send(encode(m.StartupMessage(PROTOCOL_3_2, (("user", "nobody"), option))))
        assert direct.message() == before[0]


def test_libpq_asking_for_protocol_3_2_falls_back_to_3_0(session):
    """libpq 18 with max_protocol_version=3.2 reads NegotiateProtocolVersion's version as
    a full version number: a bare minor (0) made it refuse the connection."""
    if psycopg.pq.version() < 180000:
        pytest.skip("libpq < 18 cannot ask for protocol 3.2")
    with connect(session, max_protocol_version="3.2") as conn:
        assert conn.info.pgconn.protocol_version == 3
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_plain_3_0_startup_gets_no_negotiation(session):
    with gateway(session) as wire:
        before, _key = wire.login(session)
        assert before == []


# ---------------------------------------------------------------- 2. GSSENCRequest
def test_gssenc_request_answered_n_then_tls_and_login(dev_stack: Stack, session):
    with gateway(session, tls=False) as wire:
        wire.send(encode(m.GSSENCRequest()))
        assert wire.byte() == b"N"
        assert wire.nothing_pending(0.2), "more than the single 'N' byte"
        wire.start_tls(dev_stack.status["gateway_ca"])
        wire.login(session)
        assert scalar(wire.query("SELECT 7")) == b"7"


# ---------------------------------------------------------------- 3. replication
@pytest.mark.parametrize("value", ["database", "true", "on"])
def test_replication_startup_refused(session, value):
    with gateway(session) as wire:
        params = (("user", session["user"]), ("database", session["database"]))
        wire.send(encode(m.StartupMessage(PROTOCOL_3_0, (*params, ("replication", value)))))
        error = wire.fatal()
        assert error.sqlstate == "42501"
        assert "replication" in error.message


# ---------------------------------------------------------------- 4. garbage startup
GARBAGE = {
    "oversized length": struct.pack("!ii", 10_005, PROTOCOL_3_0) + b"\0" * 64,
    "huge length": struct.pack("!ii", 0x7FFFFFFF, PROTOCOL_3_0),
    "negative length": struct.pack("!ii", -1, PROTOCOL_3_0),
    "length below 8": struct.pack("!ii", 4, PROTOCOL_3_0),
    "protocol 2.0": struct.pack("!ii", 8, 2 << 16),
    "protocol 4.0": encode(m.StartupMessage(4 << 16, (("user", "x"),))),
    "missing terminator": struct.pack("!ii", 13, PROTOCOL_3_0) + b"user\0",
    "http": b"GET / HTTP/1.1\r\nHost: guard\r\n\r\n",
    "tls client hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 32,
    # More than the startup limit, so whatever length word the bytes start with, the
    # gateway has all it needs to decide.
    **{f"random bytes {seed}": random.Random(seed).randbytes(16_384) for seed in range(4)},
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_startup_is_a_fatal_protocol_violation(session, data):
    with gateway(session) as wire:
        start = time.monotonic()
        wire.send(data)
        error = wire.fatal()
        assert error.sqlstate == "08P01", error.message
        assert time.monotonic() - start < READ_TIMEOUT


def test_second_ssl_request_is_refused(session):
    with gateway(session) as wire:
        wire.send(encode(m.SSLRequest()))
        assert wire.fatal().sqlstate == "08P01"


# ---------------------------------------------------------------- 5. CVE-2021-23214
def test_bytes_pipelined_after_ssl_request_are_refused(session):
    params = (("user", session["user"]), ("database", session["database"]))
    with gateway(session, tls=False) as wire:
        wire.send(encode(m.SSLRequest()) + encode(m.StartupMessage(PROTOCOL_3_0, params)))
        # No 'S' (no handshake starts) and no authentication request: the injected
        # startup packet was not interpreted.
        first = wire.sock.recv(1, socket.MSG_PEEK)
        assert first == b"E", f"expected an ErrorResponse, got {first!r}"
        error = wire.fatal()
        assert error.sqlstate == "08P01"
        assert "SSLRequest" in error.message


# ---------------------------------------------------------------- 6. framing after login
def _audit_text(stack: Stack, session_id: str) -> str:
    return json.dumps([r for r in stack.audit_records() if r.get("session_id") == session_id])


def _tagged(tag: bytes, body: bytes, length: int | None = None) -> bytes:
    return tag + struct.pack("!i", 4 + len(body) if length is None else length) + body


MALFORMED = {
    "query length below 4": lambda sql: _tagged(b"Q", sql + b"\0", length=2),
    "query without terminator": lambda sql: _tagged(b"Q", sql),
    "unknown type byte": lambda sql: _tagged(b"@", sql + b"\0"),
    "oversized message": lambda sql: _tagged(b"Q", sql + b"\0", length=0x7FFFFFF0),
}


@pytest.mark.parametrize("build", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_after_login_is_fatal_and_forwards_nothing(
    dev_stack: Stack, session, build
):
    seen = f"seen_{secrets.token_hex(4)}"
    unseen = f"unseen_{secrets.token_hex(4)}"
    with gateway(session) as wire:
        wire.login(session)
        # Positive control: a well-formed statement with a marker reaches the audit log.
        pid = int(scalar(wire.query(f"SELECT pg_backend_pid() AS {seen}")))
        wire.send(build(f"SELECT 1 AS {unseen}".encode()))
        assert wire.fatal().sqlstate == "08P01"
    deadline = time.monotonic() + 3
    while seen not in _audit_text(dev_stack, session["session_id"]):
        assert time.monotonic() < deadline, "the control statement never reached the audit log"
        time.sleep(0.1)
    time.sleep(0.3)  # past the broker's 200 ms flush interval
    assert unseen not in _audit_text(dev_stack, session["session_id"])
    rows = dev_stack.direct(
        "SELECT coalesce(query, '') FROM pg_stat_activity WHERE pid = %s", (pid,)
    )
    assert all(unseen not in query for (query,) in rows)


# ---------------------------------------------------------------- 7. cancel isolation
def _sleeping(stack: Stack, pid: int) -> bool:
    rows = stack.direct("SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,))
    return bool(rows) and rows[0][0] == "active" and "pg_sleep" in rows[0][1]


def test_cancel_keys_are_isolated_per_connection(dev_stack: Stack, session):
    body_b, headers_b = dev_stack.open_session()
    try:
        with gateway(session) as a, gateway(body_b) as b:
            _, key_a = a.login(session)
            _, key_b = b.login(body_b)
            real_pid = int(scalar(a.query("SELECT pg_backend_pid()")))
            # The client never learns the upstream backend's key.
            assert key_a.process_id != real_pid
            assert key_a != key_b
            a.send(encode(m.Query("SELECT pg_sleep(30)")))
            deadline = time.monotonic() + READ_TIMEOUT
            while not _sleeping(dev_stack, real_pid):
                assert time.monotonic() < deadline, "the sleep never started upstream"
                time.sleep(0.05)
            # (a) forged, (b) B's valid key, (a') A's pid with a wrong secret, and the real
            # upstream pid: none of them cancels A.
            cancel(session, secrets.randbelow(2**31 - 1) + 1, secrets.token_bytes(4))
            cancel(body_b, key_b.process_id, key_b.secret_key)
            wrong = bytes(x ^ 0xFF for x in key_a.secret_key)
            cancel(session, key_a.process_id, wrong)
            cancel(session, real_pid, key_a.secret_key)
            assert a.nothing_pending(1.0), "A's query ended after a foreign CancelRequest"
            assert _sleeping(dev_stack, real_pid)
            # B's connection was not affected either.
            assert scalar(b.query("SELECT 1")) == b"1"
            # (c) A's own key cancels A's query.
            start = time.monotonic()
            cancel(session, key_a.process_id, key_a.secret_key)
            replies = a.until_ready()
            errors = [x for x in replies if isinstance(x, m.ErrorResponse)]
            assert [e.sqlstate for e in errors] == ["57014"]
            assert time.monotonic() - start < READ_TIMEOUT
            assert scalar(a.query("SELECT 2")) == b"2"
    finally:
        dev_stack.end_session(body_b["session_id"], headers_b)


# ---------------------------------------------------------------- 8. ending a connection
def test_a_client_that_goes_away_ends_its_backend_and_the_ending_is_recorded(
    dev_stack: Stack, session
):
    # The client sends a statement and disappears (TLS closed, socket closed): the backend
    # goes, and the audit trail has the connection's start and its end with the reason.
    # (A TCP half-close, where the client keeps reading, needs a plain connection, which a
    # gateway with a certificate refuses; the pump's tests cover it on a plain transport.)
    with gateway(session) as wire:
        wire.login(session)
        pid = int(scalar(wire.query("SELECT pg_backend_pid()")))
        wire.send(encode(m.Query("SELECT pg_sleep(0.2)")))
    deadline = time.monotonic() + 10
    while dev_stack.direct("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
        assert time.monotonic() < deadline, "the backend outlived its client"
        time.sleep(0.05)

    def events() -> list[tuple[str, str]]:
        return [
            (r["event"], r["detail"])
            for r in dev_stack.audit_records()
            if r.get("kind") == "session"
            and r["session_id"] == session["session_id"]
            and r["event"].startswith("connection_")
        ]

    # The end is recorded once the gateway tore the connection down: wait for it.
    while not any(e == "connection_ended" and "client" in d for e, d in events()):
        assert time.monotonic() < deadline, events()
        time.sleep(0.05)
    assert any(e == "connection_opened" for e, _ in events())


# ---------------------------------------------------------------- 9. unauthenticated memory
def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_strangers_announcing_huge_messages_hold_no_memory(dev_stack: Stack, session):
    # Finding 1 of the hardening issue: 8 sockets each sending one 64 MiB SASL message took
    # the broker from 125 MB to 608 MB. Now a message before authentication is refused at
    # its header (16 KiB limit), so their bodies are never buffered.
    broker = dev_stack.status["pids"]["broker"]
    before = _rss_kib(broker)
    body = b"x" * (1 << 20)
    wires = []
    for _ in range(16):
        wire = gateway(session)  # TLS negotiated
        wire.send(
            encode(m.StartupMessage(PROTOCOL_3_0, (("user", "guard_x"), ("database", "demo"))))
        )
        while not isinstance(wire.message(), m.AuthenticationSASL):
            pass
        wire.send(b"p" + struct.pack("!i", 64 * 1024 * 1024 - 1) + b"SCRAM-SHA-256\0")
        with contextlib.suppress(OSError):
            for _ in range(8):  # what it manages to push before the gateway closes it
                wire.sock.sendall(body)
        wires.append(wire)
    for wire in wires:
        with contextlib.suppress(OSError, EOFError):
            assert wire.fatal().sqlstate == "28P01"
        wire.sock.close()
    grown_mib = (_rss_kib(broker) - before) / 1024
    assert grown_mib < 64, f"the broker grew {grown_mib:.0f} MiB"
