"""The CLI's loopback relay: a local PostgreSQL endpoint that lives as long as the session.

asyncio only; moves bytes and decides nothing (policy, masking and audit happen in the
broker's gateway). Listens on 127.0.0.1 with an ephemeral port, so only local processes can
reach it, and each accepted connection gets its own connection to the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib

_CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()  # backpressure: a slow reader slows the sender
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


class LoopbackRelay:
    def __init__(self, gateway_host: str, gateway_port: int) -> None:
        self.gateway_host = gateway_host
        self.gateway_port = gateway_port
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            greader, gwriter = await asyncio.open_connection(self.gateway_host, self.gateway_port)
        except OSError:
            cwriter.close()
            return
        self._conns.update((cwriter, gwriter))
        try:
            await asyncio.gather(_pipe(creader, gwriter), _pipe(greader, cwriter))
        finally:
            for w in (cwriter, gwriter):
                self._conns.discard(w)
                w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
