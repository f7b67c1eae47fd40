"""What moving bulk TLS bytes through the gateway's transports costs, per MB.

    .venv/bin/python bench/tls_bulk_relay.py [--mb 400] [--chunk 8192] [--rounds 3]

A sender process writes `--mb` MB over verified TLS in `--chunk`-byte writes (PostgreSQL
sends a result in 8 KB writes); this process accepts it as the listener does
(`tlstransport.start_tls`, the records then moved by `proxy._ctls`) and relays every read
to a second adopted transport, whose far end, a sink process, reads it all over TLS. What
is printed is this process's CPU per MB relayed: two TLS legs' records, the sockets, and the
event loop, with none of the gateway's own work (no framing, decisions or audit). It is the
floor of the gateway's CPU on a bulk result, as `bench/floor_relay.py` is for pgbench's
transactions; run it from two clones to compare builds of `_ctls`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from guard.broker.proxy import tlstransport  # noqa: E402
from guard.devstack.tls import make_dev_ca  # noqa: E402


def sender(port: int, ca: Path, total: int, chunk: int) -> None:
    tls = ssl.create_default_context(cafile=str(ca))
    with tls.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
    ) as s:
        s.sendall(b"S")
        s.recv(1)  # the relay is ready: nothing reaches the handshake's stream reader
        data = os.urandom(chunk)
        for _ in range(total // chunk):
            s.sendall(data)
        s.recv(1)


def sink(port: int, ca: Path, total: int) -> None:
    tls = ssl.create_default_context(cafile=str(ca))
    with tls.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
    ) as s:
        s.sendall(b"K")
        got = 0
        while got < total:
            got += len(s.recv(1 << 16))
        s.sendall(b"d")


class Relay(asyncio.Protocol):
    """The sender's reads, written on to the sink's transport; its backpressure pauses the
    sender's, as the pump's does."""

    def __init__(self, out: asyncio.Transport) -> None:
        self.out = out

    def data_received(self, data: bytes) -> None:
        self.out.write(data)


class SinkSide(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None], source: asyncio.Transport) -> None:
        self.done, self.source = done, source

    def data_received(self, data: bytes) -> None:  # the sink's b"d": all of it arrived
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.source.pause_reading()

    def resume_writing(self) -> None:
        self.source.resume_reading()


async def accept(
    listener: socket.socket, server: ssl.SSLContext
) -> tuple[bytes, asyncio.Transport]:
    """One connection, handshaken and adopted as the listener's are: its first byte (who
    it is) and its transport."""
    loop = asyncio.get_running_loop()
    sock, _ = await loop.sock_accept(listener)
    made: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader, lambda _r, w: made.set_result(w))
    await loop.connect_accepted_socket(lambda: protocol, sock)
    writer = await made
    await tlstransport.start_tls(reader, writer, server)
    return await reader.readexactly(1), writer.transport  # type: ignore[return-value]


async def relay_once(total: int, chunk: int, ca: Path, cert: Path, key: Path) -> float:
    """CPU seconds of this thread per MB relayed, once."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    processes = [
        multiprocessing.Process(target=sink, args=(port, ca, total)),
        multiprocessing.Process(target=sender, args=(port, ca, total, chunk)),
    ]
    legs: dict[bytes, asyncio.Transport] = {}
    for process in processes:  # one at a time: each is known by its first byte anyway
        process.start()
        who, transport = await accept(listener, server)
        legs[who] = transport
    listener.close()
    source, out = legs[b"S"], legs[b"K"]
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    out.set_protocol(SinkSide(done, source))
    start = time.thread_time()
    source.set_protocol(Relay(out))
    source.write(b"g")
    await done
    cpu = time.thread_time() - start
    source.write(b"x")
    source.close()
    out.close()
    for process in processes:
        process.join()
    return cpu / (total >> 20)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--chunk", type=int, default=8192, help="the sender's write size")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not tlstransport.usable():
        print("proxy._ctls is not built (or GUARD_PURE_PYTHON is set): nothing to measure")
        return 1
    with tempfile.TemporaryDirectory(prefix="guard-bench-tls-") as d:
        ca, cert, key = make_dev_ca(Path(d))
        total = args.mb << 20
        cpu = [uvloop.run(relay_once(total, args.chunk, ca, cert, key)) for _ in range(args.rounds)]
    print(
        f"{args.mb} MB in {args.chunk}-byte writes, two adopted TLS transports: "
        f"{statistics.median(cpu) * 1e6:.0f} µs of CPU per MB relayed (median of "
        f"{args.rounds}: {', '.join(f'{c * 1e6:.0f}' for c in cpu)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
