"""The gateway listener before a session is proven: what an unauthenticated client can hold.

A real `Gateway` on loopback with no sessions (every login is a stranger's), raw sockets as
clients. Checked: one deadline for the whole login, a cap on connections still logging in,
and a small limit on any message before authentication (PostgreSQL's own are a few KiB),
so a stranger cannot park megabytes on the gateway.
"""

from __future__ import annotations

import asyncio
import struct

from guard.broker.audit.sink import MemoryAuditSink
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import NEED_DATA, BackendParser
from guard.broker.proxy.listener import AUTH_MESSAGE_LIMIT, Gateway
from tests.playbook import POLICY


class NoSessions:
    def by_user(self, user: str) -> None:
        return None

    def is_live(self, session: object) -> bool:
        return False


async def _no_protected_map(target, conn):  # never reached: nobody logs in
    raise AssertionError("no login should get this far")


async def _gateway(**kwargs) -> tuple[Gateway, int]:
    gateway = Gateway(
        sessions=NoSessions(),  # type: ignore[arg-type]
        policy=POLICY,
        audit=MemoryAuditSink(),
        protected_map=_no_protected_map,
        **kwargs,
    )
    _host, port = await gateway.start("127.0.0.1", 0)
    return gateway, port


async def _messages(reader: asyncio.StreamReader, timeout: float = 10) -> list:
    """Every message until the gateway closes the connection."""
    parser, out = BackendParser(), []
    async with asyncio.timeout(timeout):
        while data := await reader.read(65536):
            parser.feed(data)
            while (msg := parser.next_message()) is not NEED_DATA:
                out.append(msg)
    return out


def _startup(user: str = "guard_nobody") -> bytes:
    return encode(m.StartupMessage(196608, (("user", user), ("database", "demo"))))


def test_a_client_that_says_nothing_is_closed_at_the_login_deadline():
    async def main():
        gateway, port = await _gateway(login_timeout=0.2)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            got = await _messages(reader)
            writer.close()
            return got
        finally:
            await gateway.close()

    (fatal,) = asyncio.run(main())
    assert fatal.severity == "FATAL" and fatal.sqlstate == "08P01"
    assert "did not finish within 0.2 s" in fatal.message


def test_connections_still_logging_in_are_capped():
    async def main():
        gateway, port = await _gateway(max_logging_in=2, login_timeout=5)
        try:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await asyncio.sleep(0.1)  # both are in their login
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            got = await _messages(reader, timeout=5)
            writer.close()
            for _r, w in held:
                w.close()
            return got
        finally:
            await gateway.close()

    (fatal,) = asyncio.run(main())
    assert fatal.sqlstate == "53300" and "logging in" in fatal.message


def test_a_huge_message_before_authentication_is_refused_at_its_header():
    async def main():
        gateway, port = await _gateway(login_timeout=5)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_startup())
            parser = BackendParser()
            while not isinstance(msg := parser.next_message(), m.AuthenticationSASL):
                if msg is NEED_DATA:
                    parser.feed(await reader.read(65536))
            # A SASLInitialResponse announcing 64 MiB; only its header is ever sent.
            writer.write(b"p" + struct.pack("!i", 64 * 1024 * 1024 - 1) + b"SCRAM-SHA-256\0")
            got = await _messages(reader, timeout=5)
            writer.close()
            return got
        finally:
            await gateway.close()

    (fatal,) = asyncio.run(main())
    assert fatal.severity == "FATAL" and fatal.sqlstate == "28P01"
    assert AUTH_MESSAGE_LIMIT <= 64 * 1024
