"""Byte pump for an authenticated connection: asyncio Protocols, no per-message tasks.

After the handshake the gateway hands both transports to a `Pump`: bytes from either side
go straight into the sans-IO `ProxyConnection`, and the commands it returns are written at
once. Backpressure is the transports' own: when one side's write buffer passes its high-water
mark, reading from the other side pauses until it drains, so a slow client throttles the
upstream and memory per connection stays bounded. Upstream TLS, when on, is the sans-IO
`proxy.tlslayer` over the plain transport (a third of the cost of an SSL transport).
Decides nothing.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from guard.broker.proxy.commands import CloseConnection, Command, SendToClient, SendToServer
from guard.broker.proxy.session import ProxyConnection
from guard.broker.proxy.tlslayer import TLSClient, TLSClosed

log = logging.getLogger("guard.proxy")

# Per-direction write buffer bounds (bytes) before the opposite side stops being read.
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18


class _Side(asyncio.Protocol):
    def __init__(self, pump: Pump, feed: Callable[[bytes], list[Command]]) -> None:
        self.pump = pump
        self.feed = feed
        self.other: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        self.pump.run(self.feed(data))

    def eof_received(self) -> bool:
        self.pump.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pump.close()

    def pause_writing(self) -> None:
        # This side cannot take more: stop reading the side that produces for it.
        if self.other is not None:
            self.other.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and not self.other.is_closing():
            self.other.resume_reading()


class Pump:
    def __init__(
        self,
        proxy: ProxyConnection,
        client: asyncio.Transport,
        server: asyncio.Transport,
        *,
        tls: TLSClient | None = None,
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.tls = tls
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._client_side = _Side(self, proxy.from_client)
        self._server_side = _Side(self, proxy.from_server if tls is None else self._from_tls)
        self._to_server = server.write if tls is None else self._to_tls
        self._client_side.other = server  # client can't keep up → stop reading server
        self._server_side.other = client

    def start(self, client_pending: bytes, server_pending: bytes) -> None:
        for transport, side in ((self.client, self._client_side), (self.server, self._server_side)):
            transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
            transport.set_protocol(side)
        # Bytes the handshake readers had already buffered come first, in order.
        if client_pending:
            self.run(self.proxy.from_client(client_pending))
        if server_pending:
            self.run(self.proxy.from_server(server_pending))
        for transport in (self.client, self.server):
            if not transport.is_closing() and not transport.is_reading():
                transport.resume_reading()

    def _from_tls(self, data: bytes) -> list[Command]:
        assert self.tls is not None
        try:
            plain = self.tls.decrypt(data)
        except TLSClosed:
            return [CloseConnection("the database ended TLS")]
        except ssl.SSLError as exc:
            # A record that does not decrypt may be tampering: nothing of it is relayed.
            log.warning("upstream TLS error, closing the connection: %s", exc.reason or exc)
            return [CloseConnection("upstream TLS error")]
        reply = self.tls.pending_output()
        if reply:
            self.server.write(reply)
        return self.proxy.from_server(plain) if plain else []

    def _to_tls(self, data: bytes | memoryview) -> None:
        assert self.tls is not None
        self.server.write(self.tls.encrypt(data))

    def run(self, commands: list[Command]) -> None:
        for cmd in commands:
            kind = cmd.__class__
            if kind is SendToServer:
                self._to_server(cmd.data)  # type: ignore[union-attr]
            elif kind is SendToClient:
                self.client.write(cmd.data)  # type: ignore[union-attr]
            elif kind is CloseConnection:
                self.close()
                return

    def close(self) -> None:
        for transport in (self.client, self.server):
            if not transport.is_closing():
                transport.close()
        if not self.done.done():
            self.done.set_result(None)
