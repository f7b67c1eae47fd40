"""`proxy._ctls.TLSTransport` (TLS records moved by C after Python's handshake) through
`proxy.tlstransport`, against a peer that speaks TLS through Python's `ssl` over a real
TCP socket: records intact both ways (split across reads, sent with the handshake's last
flight, megabytes), flow control, pause and resume, the peer's close_notify and FIN, a
tampered record, close and abort, a protocol that raises, and the fallbacks (an SSL
object it was not built for; no build); and an ended connection pumped through it freed by
its reference counts. On uvloop, the gateway's loop, and asyncio's."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from guard.broker.audit.sink import MemoryAuditSink
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.proxy import tlstransport, upstream
from guard.broker.proxy.core import Pump
from guard.broker.proxy.tlslayer import TLSClient, TLSClosed
from guard.devstack.tls import make_dev_ca
from tests.playbook import connection

if not tlstransport.usable():
    if os.environ.get("CI", "").lower() == "true" and not os.environ.get("GUARD_PURE_PYTHON"):
        pytest.fail("guard.broker.proxy._ctls was not built (CI=true: a failure)", pytrace=False)
    pytest.skip("guard.broker.proxy._ctls is not in use", allow_module_level=True)

LOOPS = ["uvloop", "asyncio"]


@pytest.fixture(scope="module")
def contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca, cert, key = make_dev_ca(tmp_path_factory.mktemp("tls"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(ca))


def run(kind: str, main: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(main(), 20)

    return uvloop.run(bounded()) if kind == "uvloop" else asyncio.run(bounded())


# The far ends made by the running test, closed after it (none leaks into the next).
_PEERS: list[socket.socket] = []


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    peer.setblocking(False)
    _PEERS.append(peer)
    return ours, peer


@pytest.fixture(autouse=True)
def _close_peers():
    yield
    while _PEERS:
        _PEERS.pop().close()


class Peer:
    """The far end: a raw socket and TLS over memory BIOs, driven by the test."""

    def __init__(self, sock: socket.socket, tls: TLSClient) -> None:
        self.sock, self.tls = sock, tls
        self.loop = asyncio.get_running_loop()

    async def handshake(self) -> None:
        out = self.tls.handshake()
        while not self.tls.handshake_done:
            await self.loop.sock_sendall(self.sock, out)
            out = self.tls.handshake(await self.loop.sock_recv(self.sock, 1 << 16))
        await self.loop.sock_sendall(self.sock, out)

    async def send_raw(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def send(self, plain: bytes) -> None:
        await self.send_raw(self.tls.encrypt(plain))

    async def recv(self, size: int) -> bytes:
        got = b""
        while len(got) < size:
            data = await self.loop.sock_recv(self.sock, 1 << 16)
            assert data, f"EOF after {len(got)} of {size} bytes"
            got += self.tls.decrypt(data)
        return got

    async def recv_end(self) -> str:
        """How the far end saw the connection end: "close_notify" or "eof"."""
        try:
            self.tls.decrypt()  # it may have come with the last data
        except TLSClosed:
            return "close_notify"
        while True:
            data = await self.loop.sock_recv(self.sock, 1 << 16)
            if not data:
                return "eof"
            try:
                assert self.tls.decrypt(data) == b""
            except TLSClosed:
                return "close_notify"


async def gateway_side(contexts) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Peer]:
    """A client connection as the listener has it after the SSLRequest: TLS started by
    `tlstransport.start_tls`, against a peer handshaking with the gateway's CA."""
    server, client = contexts
    ours, theirs = tcp_pair()
    reader, writer = await accepted(ours)
    peer = Peer(theirs, TLSClient(client, "localhost"))
    await asyncio.gather(tlstransport.start_tls(reader, writer, server), peer.handshake())
    return reader, writer, peer


async def accepted(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Server-side streams over `sock`, as asyncio.start_server (the listener) makes them."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.StreamWriter] = []
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader, lambda _r, w: made.append(w))
    await loop.connect_accepted_socket(lambda: protocol, sock)  # after connection_made
    # Taken out: the protocol's callback holds `made`, which holding the writer would make
    # a cycle the listener's streams do not have (test_an_ended_connection_is_freed...).
    return reader, made.pop()


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[Any] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.events.append("data")

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


def adopted_by_c(writer: asyncio.StreamWriter) -> bool:
    return type(writer.transport).__name__ == "TLSTransport"


@pytest.mark.parametrize("kind", LOOPS)
def test_records_both_ways_through_streams(contexts, kind):
    async def main() -> None:
        reader, writer, peer = await gateway_side(contexts)
        assert adopted_by_c(writer)
        assert isinstance(writer.get_extra_info("ssl_object"), ssl.SSLObject)
        assert writer.get_extra_info("sslcontext") is contexts[0]
        assert writer.get_extra_info("peername") == peer.sock.getsockname()
        await peer.send(b"Q\x00\x00\x00\x0dSELECT 1\x00")
        assert await reader.readexactly(14) == b"Q\x00\x00\x00\x0dSELECT 1\x00"
        big = os.urandom(3 << 20)
        writer.write(big)
        assert await peer.recv(len(big)) == big
        await writer.drain()
        up = os.urandom(300_000)
        await peer.send(up)
        assert await reader.readexactly(len(up)) == up
        writer.close()
        assert await peer.recv_end() == "close_notify"  # then the socket's end

    run(kind, main)


def _ssl_mode(ssl_object: ssl.SSLObject) -> int:
    """SSL_get_mode of the OpenSSL object under `ssl_object`, read as `_ctls` finds it
    (CPython's `_ssl._SSLSocket` layout, checked against the SSL's app data)."""
    import _ssl
    import ctypes

    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_ctrl.restype = ctypes.c_long
    lib.SSL_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_get_ex_data.restype = ctypes.c_void_p
    lib.SSL_get_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int]
    sslobj = ssl_object._sslobj  # type: ignore[attr-defined]
    pointer = ctypes.c_void_p.from_address(id(sslobj) + object.__basicsize__ + 8).value
    assert lib.SSL_get_ex_data(pointer, 0) == id(sslobj)
    return int(lib.SSL_ctrl(pointer, 33, 0, None))  # SSL_CTRL_MODE


RELEASE_BUFFERS = 0x10  # SSL_MODE_RELEASE_BUFFERS


@pytest.mark.parametrize("kind", LOOPS)
def test_the_records_keep_their_buffers(contexts, kind):
    """CPython's contexts release OpenSSL's record buffers whenever they are empty (a malloc
    and free of ~17 KB per record each way); a connection whose records C moves keeps
    them, as pgbouncer's do."""

    async def main() -> None:
        _, client = contexts
        assert _ssl_mode(client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())) & RELEASE_BUFFERS
        reader, writer, peer = await gateway_side(contexts)
        assert adopted_by_c(writer)
        assert not _ssl_mode(writer.get_extra_info("ssl_object")) & RELEASE_BUFFERS
        await peer.send(b"Q\x00\x00\x00\x0dSELECT 1\x00")
        assert await reader.readexactly(14) == b"Q\x00\x00\x00\x0dSELECT 1\x00"
        writer.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_records_sent_with_the_handshakes_last_flight_are_delivered(contexts, kind):
    """A client's first message can share a segment with its Finished: those records are
    in the memory BIO when C takes over, and come first."""

    async def main() -> None:
        server, client = contexts
        ours, theirs = tcp_pair()
        reader, writer = await accepted(ours)
        peer = Peer(theirs, TLSClient(client, "localhost"))
        loop = asyncio.get_running_loop()

        async def client_side() -> None:
            out = peer.tls.handshake()
            while not peer.tls.handshake_done:
                await loop.sock_sendall(theirs, out)
                out = peer.tls.handshake(await loop.sock_recv(theirs, 1 << 16))
            await loop.sock_sendall(theirs, out + peer.tls.encrypt(b"startup"))

        await asyncio.gather(tlstransport.start_tls(reader, writer, server), client_side())
        assert adopted_by_c(writer)
        assert await reader.readexactly(7) == b"startup"

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_record_split_across_reads_is_delivered_whole(contexts, kind):
    """The tail of a record can come alone, smaller than the plaintext it completes: all of
    that plaintext is delivered at once (nothing else may ever come to flush it)."""

    async def main() -> None:
        reader, writer, peer = await gateway_side(contexts)
        data = os.urandom(70_000)
        wire = peer.tls.encrypt(data)
        for cut in (len(wire) - 10, len(wire) - 1):
            await peer.send_raw(wire[:cut])
            await asyncio.sleep(0.02)  # its own read
            await peer.send_raw(wire[cut:])
            assert await reader.readexactly(len(data)) == data
            wire = peer.tls.encrypt(data)

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_tampered_record_ends_the_connection_and_is_not_delivered(contexts, kind):
    async def main() -> None:
        _reader, writer, peer = await gateway_side(contexts)
        recorder = Recorder()
        writer.transport.set_protocol(recorder)
        wire = bytearray(peer.tls.encrypt(b"DROP TABLE accounts"))
        wire[-3] ^= 0x40
        await peer.send_raw(bytes(wire))
        exc = await recorder.lost
        assert isinstance(exc, ssl.SSLError)
        assert recorder.data == b""
        assert writer.transport.is_closing()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_the_peers_close_notify_and_fin(contexts, kind):
    async def main() -> list[list[Any]]:
        seen = []
        for how in ("close_notify", "fin"):
            _reader, writer, peer = await gateway_side(contexts)
            recorder = Recorder()
            writer.transport.set_protocol(recorder)
            await peer.send(b"last words")
            if how == "close_notify":
                with pytest.raises(ssl.SSLWantReadError):
                    peer.tls.ssl_object.unwrap()
                await peer.send_raw(peer.tls.pending_output())
            else:
                peer.sock.shutdown(socket.SHUT_WR)
            assert await recorder.lost is None
            assert recorder.data == b"last words"
            seen.append(recorder.events)
        return seen

    assert run(kind, main) == [["data", "eof", "lost"], ["data", "eof", "lost"]]


@pytest.mark.parametrize("kind", LOOPS)
def test_flow_control_pauses_and_resumes_the_protocol(contexts, kind):
    async def main() -> None:
        _reader, writer, peer = await gateway_side(contexts)
        transport = writer.transport
        recorder = Recorder()
        transport.set_protocol(recorder)
        transport.set_write_buffer_limits(high=64 << 10, low=16 << 10)
        sent = bytearray()
        chunk = os.urandom(32 << 10)
        while "pause" not in recorder.events:  # the peer reads nothing meanwhile
            transport.write(chunk)
            sent += chunk
            assert len(sent) < 64 << 20, "never paused"
        assert transport.get_write_buffer_size() > 64 << 10
        assert await peer.recv(len(sent)) == sent
        await asyncio.sleep(0.05)
        assert recorder.events[-1] == "resume"
        assert transport.get_write_buffer_size() == 0

    run(kind, main)


def seqpacket_side(contexts) -> tuple[Any, socket.socket, TLSClient, ssl.SSLObject]:
    """A TLSTransport over one end of an AF_UNIX SOCK_SEQPACKET pair, handshaken by hand:
    each send() it makes arrives at the far end as one message, so the far end counts
    them. (Streams refuse such a socket, so `tlstransport.adopt` cannot be the way in.)"""
    server, client = contexts
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _PEERS.extend((ours, theirs))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    gateway = server.wrap_bio(incoming, outgoing, server_side=True)
    peer = TLSClient(client, "localhost")
    flight = peer.handshake()
    while not peer.handshake_done:
        incoming.write(flight)
        with pytest.raises(ssl.SSLWantReadError):
            gateway.do_handshake()
        flight = peer.handshake(outgoing.read())
    incoming.write(flight)
    gateway.do_handshake()
    assert peer.decrypt(outgoing.read()) == b""  # the session tickets, before any record
    transport = tlstransport._c.TLSTransport(
        gateway._sslobj, os.dup(ours.fileno()), asyncio.get_running_loop(), {}
    )
    theirs.setblocking(False)
    return transport, theirs, peer, gateway


def messages(sock: socket.socket) -> list[bytes]:
    """The messages waiting at a SOCK_SEQPACKET end: one per send() of the other end."""
    got = []
    while True:
        try:
            got.append(sock.recv(1 << 20))
        except BlockingIOError:
            return got


@pytest.mark.parametrize("kind", LOOPS)
def test_writelines_sends_its_pieces_together_in_order(contexts, kind):
    # One read's output in pieces (a split row, then the run after it): a send per piece
    # wakes the client twice per read, once for a record of one row.
    async def main() -> None:
        transport, theirs, peer, _ssl_object = seqpacket_side(contexts)
        transport.set_protocol(Recorder())
        row, run_after = b"D" + os.urandom(120), os.urandom(60_000)
        transport.writelines([row, memoryview(run_after), b"", bytearray(b"Z")])
        sent = messages(theirs)
        assert len(sent) == 1
        assert peer.decrypt(sent[0]) == row + run_after + b"Z"
        transport.write(row)  # as the pump wrote them before: a send each
        transport.write(run_after)
        sent = messages(theirs)
        assert len(sent) == 2
        assert peer.decrypt(b"".join(sent)) == row + run_after
        with pytest.raises(TypeError):
            transport.writelines([row, 42])
        transport.close()
        transport.writelines([row])  # after close: dropped, as write's
        with pytest.raises(TLSClosed):  # close_notify, and no row before it
            peer.decrypt(b"".join(messages(theirs)))

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_an_ssl_object_that_outlives_its_transport_fails_cleanly(contexts, kind):
    # The SSL object's records go through the transport's own BIO, which points at the
    # transport: I/O through an SSL object kept after the transport is freed must fail,
    # not reach freed memory (ssl runs it with the GIL released, too).
    def transports() -> int:
        gc.collect()  # the earlier tests' garbage first
        return _parts_alive()["TLSTransport"]

    async def main() -> None:
        before = transports()
        transport, theirs, peer, ssl_object = seqpacket_side(contexts)
        transport.set_protocol(Recorder())
        transport.write(b"before")
        assert peer.decrypt(b"".join(messages(theirs))) == b"before"
        transport.abort()
        del transport
        assert transports() == before  # freed: only the SSL object remains
        with pytest.raises(ssl.SSLError):
            ssl_object.write(b"after")
        with pytest.raises(ssl.SSLError):
            ssl_object.read(10)

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_pause_reading_holds_records_until_resumed(contexts, kind):
    async def main() -> None:
        _reader, writer, peer = await gateway_side(contexts)
        transport = writer.transport
        recorder = Recorder()
        transport.set_protocol(recorder)
        transport.pause_reading()
        assert not transport.is_reading()
        await peer.send(b"held")
        await asyncio.sleep(0.05)
        assert recorder.data == b""
        transport.resume_reading()
        await asyncio.sleep(0.05)
        assert recorder.data == b"held"

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_close_flushes_abort_does_not_and_later_writes_are_dropped(contexts, kind):
    async def main() -> None:
        _reader, writer, peer = await gateway_side(contexts)
        transport = writer.transport
        recorder = Recorder()
        transport.set_protocol(recorder)
        transport.write(b"goodbye")
        transport.close()
        transport.write(b"after close")  # dropped, as asyncio's transports do
        assert transport.is_closing()
        assert await peer.recv(7) == b"goodbye"
        assert await peer.recv_end() == "close_notify"
        assert await recorder.lost is None

        _reader, writer, peer = await gateway_side(contexts)
        recorder = Recorder()
        writer.transport.set_protocol(recorder)
        writer.transport.abort()
        assert await peer.recv_end() == "eof"  # no close_notify
        assert await recorder.lost is None

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_protocol_that_raises_ends_the_connection_and_is_reported(contexts, kind):
    async def main() -> None:
        _reader, writer, peer = await gateway_side(contexts)
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))

        class Broken(Recorder):
            def data_received(self, data: bytes) -> None:
                raise RuntimeError("a bug in the protocol")

        broken = Broken()
        writer.transport.set_protocol(broken)
        await peer.send(b"x")
        exc = await broken.lost
        assert isinstance(exc, RuntimeError)
        assert "data_received" in reported[0]["message"]
        assert reported[0]["exception"] is exc
        assert await peer.recv_end() == "eof"

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_the_client_side_is_adopted_too(contexts, kind):
    """The gateway's upstream leg: `proxy.tlslayer`'s client handshake, then C."""

    async def main() -> None:
        server, client = contexts
        ours, theirs = tcp_pair()
        reader, writer = await asyncio.open_connection(sock=ours)
        tls = TLSClient(client, "localhost")
        peer = Peer(theirs, TLSClient(server, None, server_side=True))
        handshake = asyncio.ensure_future(peer.handshake())
        writer.write(await tlstransport.handshake(tls, reader, writer))
        await handshake
        await peer.send(b"with the tickets")
        await asyncio.sleep(0.05)  # read by the stream (the listener's order below)
        tls.receive(upstream.take_stream_buffer(reader))  # C delivers them first
        transport = tlstransport.adopt(writer.transport, tls.ssl_object)
        assert transport is not None
        recorder = Recorder()
        transport.set_protocol(recorder)
        transport.resume_reading()
        await peer.send(b"R" * 20_000)
        transport.write(b"Q" * 5)
        assert await peer.recv(5) == b"QQQQQ"
        while len(recorder.data) < 20_016:
            await asyncio.sleep(0.01)
        assert recorder.data == b"with the tickets" + b"R" * 20_000

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_an_ssl_object_it_was_not_built_for_is_left_alone(contexts, kind):
    """A socket-BIO SSL object (ssl.SSLSocket's): adopt declines, the transport is as it was."""

    async def main() -> None:
        _server, client = contexts
        ours, theirs = tcp_pair()
        _reader, writer = await asyncio.open_connection(sock=ours)
        other, _far = tcp_pair()  # any connected socket
        wrapped = client.wrap_socket(other, server_hostname="x", do_handshake_on_connect=False)
        try:
            assert tlstransport.adopt(writer.transport, wrapped) is None  # type: ignore[arg-type]
            assert not writer.transport.is_closing()
            writer.write(b"still plain")
            assert await asyncio.get_running_loop().sock_recv(theirs, 64) == b"still plain"
        finally:
            wrapped.close()
            writer.close()

    run(kind, main)


def test_without_the_build_the_streams_own_start_tls_runs(contexts, monkeypatch):
    monkeypatch.setattr(tlstransport, "usable", lambda: False)

    async def main() -> None:
        reader, writer, peer = await gateway_side(contexts)
        assert not adopted_by_c(writer)
        await peer.send(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.write(b"world")
        assert await peer.recv(5) == b"world"
        writer.close()
        assert await peer.recv_end() == "close_notify"
        peer.sock.close()  # uvloop's TLS transport waits for the far end's close otherwise
        await asyncio.sleep(0.05)

    run("uvloop", main)


# What a connection through the gateway is made of, by type name: none of them may be left,
# once it has ended, for the cycle collector to free.
_CONNECTION_PARTS = (
    "Pump",
    "_Side",
    "GatewayConnection",
    "TLSTransport",
    "StreamReaderProtocol",
    "StreamWriter",
    "SSLObject",
)


def _parts_alive() -> dict[str, int]:
    alive = dict.fromkeys(_CONNECTION_PARTS, 0)
    for obj in gc.get_objects():  # unreachable ones too, until a collection
        name = type(obj).__name__
        if name in alive:
            alive[name] += 1
    return alive


@pytest.mark.parametrize("kind", LOOPS)
def test_an_ended_connection_is_freed_by_its_reference_counts(contexts, kind):
    """A client leg whose records C moves (begun as the login's streams) and a plain upstream
    leg, pumped by the real core until the client goes: once it has ended, nothing of it is
    left for the cycle collector, whose full pass walks the whole gateway and until then
    keeps every ended connection's TLS buffers (stop 35)."""

    async def main() -> None:
        reader, writer, peer = await gateway_side(contexts)
        assert adopted_by_c(writer)
        ours, theirs = tcp_pair()
        loop = asyncio.get_running_loop()
        up, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        pump = Pump(connection(), writer.transport, up, audit=MemoryAuditSink())
        pump.start(b"", b"")
        await peer.send(encode(m.Query("SELECT 1")))
        assert await loop.sock_recv(theirs, 100) == encode(m.Query("SELECT 1"))
        peer.sock.close()  # the client goes
        await asyncio.wait_for(pump.done, 5)
        for _ in range(5):  # connection_lost, called soon
            await asyncio.sleep(0)

    gc.collect()
    before = _parts_alive()
    gc.disable()
    try:
        run(kind, main)
        after = _parts_alive()
    finally:
        gc.enable()
    assert after == before, (before, after)


def test_a_tls_transport_exists_only_adopting_an_ssl_object():
    # Made by __new__ alone (no SSL object yet), its write, close and get_extra_info
    # reached a NULL SSL or dict: a crash of the gateway, not an exception.
    transport_type = tlstransport._c.TLSTransport  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        transport_type.__new__(transport_type)
    with pytest.raises(TypeError):
        transport_type()
    a, b = socket.socketpair()
    fd = os.dup(a.fileno())
    try:
        with pytest.raises(TypeError, match="_SSLSocket"):
            transport_type(object(), fd, None, {})
        os.fstat(fd)  # refused before it took the descriptor: still the caller's
    finally:
        os.close(fd)
        a.close()
        b.close()


def _client_flights(server: ssl.SSLContext, client: ssl.SSLContext, groups: bytes | None) -> int:
    """How many flights the upstream login's client (`TLSClient`) sends to complete a TLS
    1.3 handshake with `server`, after `prefer_groups(groups)` (None: not called); negative
    when that refused the list."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(incoming, outgoing, server_side=True)
    peer = TLSClient(client, "localhost")
    refused = groups is not None and not tlstransport.prefer_groups(peer.ssl_object, groups)
    flight, flights = peer.handshake(), 1
    while not peer.handshake_done:
        incoming.write(flight)
        with contextlib.suppress(ssl.SSLWantReadError):
            srv.do_handshake()
        flight, flights = peer.handshake(outgoing.read()), flights + 1
    return -flights if refused else flights


@pytest.fixture(scope="module")
def server_of_curve(tmp_path_factory):
    ca, cert, key = make_dev_ca(tmp_path_factory.mktemp("curves"))

    def make(curve: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        server.set_ecdh_curve(curve)  # as PostgreSQL's ssl_ecdh_curve does
        return server, ssl.create_default_context(cafile=str(ca))

    return make


def test_upstream_logins_offer_postgresqls_default_group_first(server_of_curve):
    # PostgreSQL accepts only its ssl_ecdh_curve, prime256v1 unless set. OpenSSL's client
    # leads with an X25519 key share, which made every upstream login take a
    # HelloRetryRequest round trip: a second ClientHello before the Finished.
    server, client = server_of_curve("prime256v1")
    groups = tlstransport.upstream_groups(client)
    assert groups is not None and groups.startswith(b"P-256:")
    assert _client_flights(server, client, None) == 3
    assert _client_flights(server, client, groups) == 2
    # A server set to X25519 still gets it, after the retry.
    server, client = server_of_curve("X25519")
    assert _client_flights(server, client, None) == 2
    assert _client_flights(server, client, groups) == 3


def _client_hello(context: ssl.SSLContext, groups: bytes | None = None) -> bytes:
    """The ClientHello `context` makes, after `prefer_groups(groups)` when given."""
    outgoing = ssl.MemoryBIO()
    probe = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    if groups is not None:
        assert tlstransport.prefer_groups(probe, groups)
    with contextlib.suppress(ssl.SSLWantReadError):
        probe.do_handshake()
    return outgoing.read()


def test_the_upstream_login_offers_the_contexts_groups_reordered_never_others(
    server_of_curve,
):
    _, client = server_of_curve("prime256v1")
    default = tlstransport.offered_groups(_client_hello(client))
    assert default is not None and 23 in default and default[0] != 23
    # The same groups, P-256 (23) first, the others in the context's order.
    groups = tlstransport.upstream_groups(client)
    assert groups is not None
    moved = [23, *(g for g in default if g != 23)]
    assert tlstransport.offered_groups(_client_hello(client, groups)) == moved
    # A context narrowed to groups without P-256 (as a host's crypto policy may do) keeps
    # them: nothing is added back, nothing reordered.
    narrowed = ssl.create_default_context()
    narrowed.set_ecdh_curve("secp384r1")
    assert tlstransport.upstream_groups(narrowed) is None
    assert tlstransport.offered_groups(_client_hello(narrowed)) == [24]
    # A context that cannot make a ClientHello at all: no groups to give, nothing raised
    # (the login's own handshake reports what is wrong with it).
    broken = ssl.create_default_context()
    broken.minimum_version = ssl.TLSVersion.TLSv1_3
    broken.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        _client_hello(broken)
    assert tlstransport.upstream_groups(broken) is None


def test_offered_groups_reads_the_groups_openssl_sends():
    context = ssl.create_default_context()
    for names, points in (
        (b"P-384:X25519", [24, 29]),
        (b"P-256", [23]),
        (b"ffdhe2048:P-521:X448", [256, 25, 30]),
    ):
        assert tlstransport.offered_groups(_client_hello(context, names)) == points


def test_offered_groups_refuses_anything_but_one_whole_client_hello():
    hello = _client_hello(ssl.create_default_context())
    assert tlstransport.offered_groups(hello)
    for cut in range(len(hello)):  # every truncation
        assert tlstransport.offered_groups(hello[:cut]) is None
    assert tlstransport.offered_groups(hello + b"\x16") is None  # a record's start after it
    assert tlstransport.offered_groups(b"\x17" + hello[1:]) is None  # not a handshake record
    assert tlstransport.offered_groups(hello[:5] + b"\x02" + hello[6:]) is None  # ServerHello


def test_p256_first_moves_p256_and_only_names_what_it_knows():
    assert tlstransport.p256_first([29, 23, 30, 256]) == b"P-256:X25519:X448:ffdhe2048"
    assert tlstransport.p256_first([0x11EC, 29, 23]) == b"P-256:X25519MLKEM768:X25519"
    assert tlstransport.p256_first([23, 29]) is None  # leads already
    assert tlstransport.p256_first([29, 24]) is None  # not offered: not added
    assert tlstransport.p256_first([29, 0x9999, 23]) is None  # a group it cannot name back


def test_upstream_groups_keep_the_hosts_openssl_policy(tmp_path):
    # A host's OpenSSL configuration (a system crypto policy) narrows the groups every
    # context offers; the upstream login reorders that list and adds nothing to it.
    conf = tmp_path / "openssl.cnf"
    probe = (
        "import ssl\n"
        "from guard.broker.proxy import tlstransport as t\n"
        "c = ssl.create_default_context()\n"
        "print(t.upstream_groups(c))\n"
    )
    for policy, expected in (
        ("X448:P-384:P-256", "b'P-256:X448:P-384'"),
        ("X25519:P-384", "None"),
    ):
        conf.write_text(
            "openssl_conf = openssl_init\n[openssl_init]\nssl_conf = ssl_sect\n"
            "[ssl_sect]\nsystem_default = system_default_sect\n"
            f"[system_default_sect]\nGroups = {policy}\n"
        )
        env = {**os.environ, "OPENSSL_CONF": str(conf)}
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected, out.stderr


def test_a_group_list_openssl_refuses_changes_nothing(server_of_curve):
    server, client = server_of_curve("prime256v1")
    # Refused (-), and the handshake is the context's own: the retry is still there.
    assert _client_flights(server, client, b"P-256:no-such-group") == -3
    assert not tlstransport.prefer_groups(object(), b"P-256")  # type: ignore[arg-type]
