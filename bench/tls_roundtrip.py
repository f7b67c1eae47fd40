"""CPU cost of one request/response round trip on the gateway's upstream hop, four ways.

    .venv/bin/python bench/tls_roundtrip.py

A uvloop client ping-pongs 61-byte requests and 100-byte replies with a server in another
process: over plain TCP, over uvloop's SSL transport, over plain TCP with TLS done by
`proxy.tlslayer` (memory BIOs), and with `tlslayer`'s handshake and then the records moved
by C (`proxy.tlstransport.adopt`), which is what the gateway uses where it is built. Prints
the client's CPU µs per round trip (each mode's second run: the first TLS run in a process
pays one-time set-up); the difference to plain is what TLS costs the gateway per statement.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import ssl
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guard.broker.proxy import tlstransport  # noqa: E402
from guard.broker.proxy.tlslayer import TLSClient  # noqa: E402
from guard.devstack.tls import make_dev_ca  # noqa: E402

REQUEST, REPLY, ROUNDS = b"Q" + b"x" * 60, b"D" * 100, 20_000


def serve(ports, cert: str | None, key: str | None) -> None:
    async def main() -> None:
        context = None
        if cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)

        class Echo(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                self.transport.write(REPLY)

        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, ssl=context)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.sleep(3600)

    uvloop.run(main())


async def ping_pong(  # noqa: C901 - the timed protocol closes over this run's counter and futures
    port: int, mode: str, ca: str
) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    handshaken = loop.create_future()
    context = ssl.create_default_context(cafile=ca)
    tls = TLSClient(context, "localhost") if mode in ("tlslayer", "ctls") else None
    count = 0

    class Client(asyncio.Protocol):
        in_c = False  # the records move in C (mode "ctls", once handshaken)

        def connection_made(self, transport):
            self.transport = transport
            if tls is None:
                handshaken.set_result(None)
            else:
                transport.write(tls.handshake())

        def send(self):
            plain = tls is None or self.in_c
            self.transport.write(REQUEST if plain else tls.encrypt(REQUEST))

        def data_received(self, data):
            nonlocal count
            if tls is not None:
                if not tls.handshake_done:
                    out = tls.handshake(data)
                    if out:
                        self.transport.write(out)
                    if tls.handshake_done:
                        if mode == "ctls":
                            adopted = tlstransport.adopt(self.transport, tls.ssl_object)
                            assert adopted is not None, "proxy._ctls is not built"
                            adopted.set_protocol(self)
                            self.transport, self.in_c = adopted, True
                            adopted.resume_reading()
                        handshaken.set_result(None)
                    return
                if not self.in_c and not tls.decrypt(data):
                    return
            count += 1
            if count >= ROUNDS:
                done.set_result(None)
            else:
                self.send()

    ssl_arg = context if mode == "uvloop-ssl" else None
    transport, protocol = await loop.create_connection(
        Client, "127.0.0.1", port, ssl=ssl_arg, server_hostname="localhost" if ssl_arg else None
    )
    await handshaken
    start = time.process_time()
    protocol.send()
    await done
    transport.close()
    return (time.process_time() - start) / ROUNDS * 1e6


def main() -> None:
    ca, cert, key = (str(p) for p in make_dev_ca(Path(tempfile.mkdtemp()) / "ca"))
    results = {}
    # Each mode twice, in turn, keeping the second: the first TLS run of a process pays a
    # one-time cost (OpenSSL's lazy initialisation) that made whichever mode ran first look
    # ~30 µs dearer.
    for mode in ("plain", "uvloop-ssl", "tlslayer", "ctls") * 2:
        ports: multiprocessing.Queue = multiprocessing.Queue()
        tls_server = mode != "plain"
        server = multiprocessing.Process(
            target=serve, args=(ports, cert if tls_server else None, key), daemon=True
        )
        server.start()
        try:
            results[mode] = uvloop.run(ping_pong(ports.get(timeout=10), mode, ca))
        finally:
            server.kill()
    for mode, us in results.items():
        extra = us - results["plain"]
        print(f"{mode:<11} {us:6.1f} µs CPU per round trip ({extra:+.1f} µs vs plain)")


if __name__ == "__main__":
    main()
