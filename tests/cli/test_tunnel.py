"""The CLI's loopback relay (guard/cli/tunnel.py) against a fake TLS gateway.

The fake gateway is a plain asyncio server that answers the relay's SSLRequest as told
('S' then TLS with a dev-CA certificate, 'N', or 'S' followed by injected plaintext) and
records what it decrypts. A recording TCP hop sits between the relay and the gateway, so
the tests also see the raw bytes on the wire. Every read is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.parser import BackendParser
from guard.cli import tunnel
from guard.cli.tunnel import LoopbackRelay, client_tls_context
from guard.devstack.tls import make_dev_ca

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
MARKER = b"relay-test-user-7f3a"  # only ever sent inside the startup packet
STARTUP = (lambda body: struct.pack("!i", 4 + len(body)) + body)(
    struct.pack("!i", 196608) + b"user\x00" + MARKER + b"\x00database\x00demo\x00\x00"
)
CANCEL = struct.pack("!iiii", 16, 80877102, 4242, 0x5EC2E7)
# AuthenticationOk + ReadyForQuery(idle): what the fake gateway answers a startup with.
GATEWAY_REPLY = b"R\x00\x00\x00\x08\x00\x00\x00\x00" + b"Z\x00\x00\x00\x05I"
T = 5.0  # bound on every wait


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    ca, cert, key = make_dev_ca(tmp_path_factory.mktemp("ca"))
    other_ca, _, _ = make_dev_ca(tmp_path_factory.mktemp("other-ca"))
    return {"ca": ca, "cert": cert, "key": key, "other_ca": other_ca}


def server_context(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    return ctx


@dataclass
class FakeGateway:
    """mode: 'tls' (S + TLS), 'refuse' (N), 'inject' (S + plaintext bytes, then TLS)."""

    tls: ssl.SSLContext
    mode: str = "tls"
    host: str = "127.0.0.1"
    inject: bytes = b""
    connections: int = 0
    pre_tls: list[bytes] = field(default_factory=list)  # the 8 bytes before the answer
    decrypted: list[bytes] = field(default_factory=list)  # first packet after TLS
    handshake_errors: list[BaseException] = field(default_factory=list)
    port: int = 0
    got_packet: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()

    async def _handle(self, reader, writer) -> None:
        self.connections += 1
        try:
            first = await asyncio.wait_for(reader.readexactly(8), T)
            self.pre_tls.append(first)
            if first != SSL_REQUEST or self.mode == "refuse":
                writer.write(b"N")
                await writer.drain()
                # Whatever a downgrading client would send next, in plaintext.
                with contextlib.suppress(Exception):
                    self.decrypted.append(await asyncio.wait_for(reader.read(65536), 1.0))
                return
            writer.write(b"S" + (self.inject if self.mode == "inject" else b""))
            await writer.drain()
            try:
                await asyncio.wait_for(writer.start_tls(self.tls), T)
            except (ssl.SSLError, ConnectionError, TimeoutError) as e:
                self.handshake_errors.append(e)
                return
            header = await asyncio.wait_for(reader.readexactly(4), T)
            (length,) = struct.unpack("!i", header)
            packet = header + await asyncio.wait_for(reader.readexactly(length - 4), T)
            self.decrypted.append(packet)
            self.got_packet.set()
            if packet != CANCEL:
                writer.write(GATEWAY_REPLY)
                await writer.drain()
                # Echo whatever the client sends next, to prove the pipe runs both ways.
                while data := await asyncio.wait_for(reader.read(65536), T):
                    writer.write(data)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()


class Recorder:
    """A TCP hop relay → recorder → gateway that keeps every byte the relay sends."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.raw = bytearray()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        return self._server.sockets[0].getsockname()[1]

    async def _handle(self, creader, cwriter) -> None:
        greader, gwriter = await asyncio.open_connection(*self.target)

        async def pipe(r, w, keep: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    if keep:
                        self.raw += data
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pipe(creader, gwriter, True), pipe(greader, cwriter, False))

    async def close(self) -> None:
        self._server.close()


@contextlib.asynccontextmanager
async def stack(pki, *, mode="tls", ca_key="ca", gw_host="127.0.0.1", inject=b""):
    """Fake gateway ← recorder ← relay; yields (relay port, gateway, recorder)."""
    gateway = FakeGateway(server_context(pki), mode=mode, host=gw_host, inject=inject)
    await gateway.start()
    recorder = Recorder(gw_host, gateway.port, host=gw_host)
    rec_port = await recorder.start()
    relay = LoopbackRelay(gw_host, rec_port, client_tls_context(str(pki[ca_key])))
    port = await relay.start()
    try:
        yield port, gateway, recorder
    finally:
        await relay.close()
        await recorder.close()
        await gateway.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the relay sends until it closes; fails (TimeoutError) on a hang."""
    out = bytearray()
    while data := await asyncio.wait_for(reader.read(65536), T):
        out += data
    return bytes(out)


def fatal(data: bytes) -> m.ErrorResponse:
    """The one FATAL ErrorResponse the relay sent before closing (08001: no gateway)."""
    parser = BackendParser()
    parser.feed(data)
    messages = list(parser.messages())
    assert len(messages) == 1 and isinstance(messages[0], m.ErrorResponse), data
    error = messages[0]
    assert error.severity == "FATAL" and error.sqlstate == "08001"
    assert "guard: cannot reach the gateway" in error.message
    return error


async def answer_without_the_gateway(pki, data: bytes, *, eof: bool = False) -> bytes:
    """Send `data` (then EOF) to the relay: all it answers before closing, which it must do
    promptly and without ever connecting to the gateway."""
    async with stack(pki) as (port, gateway, _recorder):
        answer = await exchange(port, data, eof=eof)
        assert gateway.connections == 0
        return answer


async def exchange(port: int, data: bytes, *, eof: bool = False) -> bytes:
    """Connect to the relay, send `data` (then EOF): all it answers before it closes."""
    reader, writer = await client(port)
    writer.write(data)
    await writer.drain()
    if eof:
        writer.write_eof()
    answer = await read_until_closed(reader)
    writer.close()
    return answer


async def client(port: int):
    return await asyncio.open_connection("127.0.0.1", port)


# 1. encryption requests answered locally; startup forwarded over TLS ------------------


@pytest.mark.parametrize(
    "requests", [[SSL_REQUEST], [GSSENC_REQUEST], [GSSENC_REQUEST, SSL_REQUEST], []]
)
def test_encryption_requests_answered_n_and_startup_forwarded_over_tls(pki, requests):
    async def scenario():
        async with stack(pki) as (port, gateway, recorder):
            reader, writer = await client(port)
            for request in requests:
                writer.write(request)
                await writer.drain()
                assert await asyncio.wait_for(reader.readexactly(1), T) == b"N"
            writer.write(STARTUP)
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(len(GATEWAY_REPLY)), T) == (
                GATEWAY_REPLY
            )
            writer.write(b"Q\x00\x00\x00\x0dSELECT 1\x00")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(14), T) == (
                b"Q\x00\x00\x00\x0dSELECT 1\x00"
            )
            writer.close()
            # The gateway got exactly one SSLRequest in the clear, then the startup
            # packet inside TLS; the client's own encryption requests were not forwarded.
            assert gateway.pre_tls == [SSL_REQUEST]
            assert gateway.decrypted == [STARTUP]
            assert bytes(recorder.raw[:8]) == SSL_REQUEST
            assert MARKER not in recorder.raw and b"SELECT 1" not in recorder.raw
            assert recorder.raw[8] == 0x16  # a TLS handshake record follows

    run(scenario())


# 2. the gateway's certificate is verified ---------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"ca_key": "other_ca"}, id="unknown-ca"),
        # The dev certificate names localhost and 127.0.0.1 only; 127.0.0.2 is loopback
        # too but not in the certificate.
        pytest.param({"gw_host": "127.0.0.2"}, id="wrong-host-name"),
    ],
)
def test_unverifiable_gateway_is_refused_and_nothing_leaks(pki, case):
    async def scenario():
        async with stack(pki, **case) as (port, gateway, recorder):
            reader, writer = await client(port)
            writer.write(SSL_REQUEST + STARTUP)
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(1), T) == b"N"
            # The relay says why and closes the client's connection (no gateway bytes).
            error = fatal(await read_until_closed(reader))
            assert "certificate did not verify" in error.message
            writer.close()
            assert gateway.connections == 1 and gateway.decrypted == []
            assert MARKER not in recorder.raw
            assert bytes(recorder.raw[:8]) == SSL_REQUEST

    run(scenario())


def test_gateway_refusing_tls_is_not_downgraded(pki):
    async def scenario():
        async with stack(pki, mode="refuse") as (port, gateway, recorder):
            reader, writer = await client(port)
            writer.write(STARTUP)
            await writer.drain()
            assert "refused TLS" in fatal(await read_until_closed(reader)).message
            writer.close()
            assert gateway.pre_tls == [SSL_REQUEST]
            # Nothing after the SSLRequest: no plaintext startup, no second attempt.
            assert gateway.decrypted in ([], [b""])
            assert bytes(recorder.raw) == SSL_REQUEST
            assert gateway.connections == 1

    run(scenario())


def test_plaintext_injected_after_the_gateways_s_is_not_relayed(pki):
    # CVE-2021-23222 pattern: a man in the middle answers 'S' and appends plaintext
    # (here a forged AuthenticationOk + ReadyForQuery) before the TLS handshake. Those
    # bytes must never reach the client as if they came from the verified gateway.
    forged = b"R\x00\x00\x00\x08\x00\x00\x00\x00" + b"Z\x00\x00\x00\x05E"

    async def scenario():
        async with stack(pki, mode="inject", inject=forged) as (port, gateway, recorder):
            reader, writer = await client(port)
            writer.write(STARTUP)
            await writer.drain()
            received = await read_until_closed(reader)
            writer.close()
            assert forged not in received
            # The injected bytes land in the TLS handshake, which fails: the relay
            # refuses the gateway and closes the client, relaying nothing of the gateway.
            fatal(received)
            assert MARKER not in recorder.raw

    run(scenario())


# 4. CancelRequest ---------------------------------------------------------------------


@pytest.mark.parametrize("preceded_by_ssl", [False, True])
def test_cancel_request_reaches_the_gateway_byte_identical_over_tls(pki, preceded_by_ssl):
    async def scenario():
        async with stack(pki) as (port, gateway, recorder):
            reader, writer = await client(port)
            if preceded_by_ssl:
                writer.write(SSL_REQUEST)
                await writer.drain()
                assert await asyncio.wait_for(reader.readexactly(1), T) == b"N"
            writer.write(CANCEL)
            await writer.drain()
            await asyncio.wait_for(gateway.got_packet.wait(), T)
            # The gateway closes a cancel connection; so does the relay towards psql.
            assert await read_until_closed(reader) == b""
            writer.close()
            assert gateway.decrypted == [CANCEL]
            assert CANCEL not in recorder.raw  # the secret key travels encrypted

    run(scenario())


# 5. bytes pipelined after the SSLRequest ----------------------------------------------


def test_startup_pipelined_after_ssl_request_is_plain_startup_not_an_upgrade(pki):
    # CVE-2021-23214 pattern: bytes sent together with the SSLRequest, before the answer.
    # The relay never answers 'S' on loopback, so there is no upgrade to bypass: it
    # answers 'N' and treats the pipelined bytes as the (plaintext) startup packet, which
    # it forwards to the gateway over TLS like any other.
    async def scenario():
        async with stack(pki) as (port, gateway, recorder):
            reader, writer = await client(port)
            writer.write(SSL_REQUEST + STARTUP)
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(1), T) == b"N"
            reply = await asyncio.wait_for(reader.readexactly(len(GATEWAY_REPLY)), T)
            assert reply == GATEWAY_REPLY
            writer.close()
            assert gateway.decrypted == [STARTUP]
            assert MARKER not in recorder.raw

    run(scenario())


def test_tls_client_hello_pipelined_after_ssl_request_is_refused(pki):
    # A client that assumes 'S' and starts TLS straight away: its ClientHello is not a
    # startup packet (its "length" is 0x1603xxxx), so the relay closes without calling
    # the gateway.
    hello = bytes.fromhex("160301020001") + b"\x00" * 64

    assert run(answer_without_the_gateway(pki, SSL_REQUEST + hello)) == b"N"


# 6. malformed startup packets ---------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(struct.pack("!ii", 4, 196608), id="length-below-8"),
        pytest.param(struct.pack("!ii", -1, 196608), id="negative-length"),
        pytest.param(struct.pack("!ii", 10_001, 196608) + b"x" * 100, id="over-10000"),
        pytest.param(struct.pack("!ii", 0x7FFFFFFF, 196608), id="huge-length"),
        pytest.param(struct.pack("!ii", 0, 0), id="zero-length"),
    ],
)
def test_malformed_startup_is_closed_promptly_without_calling_the_gateway(pki, packet):
    assert run(answer_without_the_gateway(pki, packet)) == b""


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(STARTUP[:20], id="truncated-body"),
        pytest.param(STARTUP[:5], id="truncated-header"),
        pytest.param(SSL_REQUEST[:6], id="truncated-ssl-request"),
    ],
)
def test_truncated_startup_then_eof_is_closed_promptly(pki, packet):
    assert run(answer_without_the_gateway(pki, packet, eof=True)) == b""


def test_gateway_unreachable_closes_the_client(pki):
    async def scenario():
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        relay = LoopbackRelay("127.0.0.1", dead_port, client_tls_context(str(pki["ca"])))
        port = await relay.start()
        try:
            answer = await exchange(port, STARTUP)
            assert "cannot reach the gateway at 127.0.0.1" in fatal(answer).message
            # A cancel has no answer to give (PostgreSQL sends none either): just closed.
            assert await exchange(port, CANCEL) == b""
        finally:
            await relay.close()

    run(scenario())


def test_silent_gateway_is_given_up_on(pki, monkeypatch):
    # A gateway that accepts the TCP connection but never answers the SSLRequest must not
    # hold the client forever: the relay gives up after its gateway timeout and closes.
    monkeypatch.setattr(tunnel, "_GATEWAY_TIMEOUT", 0.5)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader, writer):
        accepted.append(writer)

    async def scenario():
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        gw_port = server.sockets[0].getsockname()[1]
        relay = LoopbackRelay("127.0.0.1", gw_port, client_tls_context(str(pki["ca"])))
        port = await relay.start()
        try:
            answer = await exchange(port, STARTUP)
            assert "no answer within 0.5 s" in fatal(answer).message
            assert len(accepted) == 1
        finally:
            await relay.close()
            for w in accepted:
                w.close()
            server.close()

    run(scenario())


def test_the_relay_takes_channel_binding_out_of_the_gateways_offer():
    """The gateway offers SCRAM-SHA-256-PLUS to its TLS peer, the relay; the client behind
    the relay talks plain loopback, and libpq refuses a -PLUS offer without TLS."""
    from guard.broker.pgwire import messages as m
    from guard.broker.pgwire.encoder import encode
    from guard.broker.pgwire.parser import BackendParser
    from guard.cli.tunnel import without_channel_binding

    offer = encode(m.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
    parser = BackendParser()
    parser.feed(without_channel_binding(offer))
    assert tuple(parser.next_message().mechanisms) == ("SCRAM-SHA-256",)
    plain = encode(m.AuthenticationSASL(("SCRAM-SHA-256",)))
    assert without_channel_binding(plain) == plain
    refusal = encode(m.ErrorResponse.build("28000", "no", severity="FATAL"))
    assert without_channel_binding(refusal) == refusal
