"""A gateway in miniature for the kill -9 test: K connections through real `Pump`s, one
durable `JsonlAuditSink` (group commit), in-memory transports.

    python -m tests.audit.crash_writer LOG K

Each connection sends `SELECT 1 AS s<k>_<i>` for i = 0, 1, 2, …, two at a time; the fake
database answers each at once, and the client sends its next statement when one was
forwarded.
Every statement the pump forwards upstream is acknowledged on stdout (`s<k>_<i>`, one line,
written with os.write so a SIGKILL cannot lose a buffered acknowledgement), after the
forward: an acknowledgement means the statement reached the database's socket. It runs
until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from guard.broker.audit.sink import JsonlAuditSink
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.parser import FrontendParser
from guard.broker.proxy.gate import Gate
from guard.broker.proxy.pump import Pump
from tests.playbook import ALICE, POLICY, connection, wire

ANSWER = wire(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))


class Transport(asyncio.Transport):
    def __init__(self, on_write) -> None:
        super().__init__()
        self.on_write = on_write
        self.protocol: asyncio.Protocol | None = None
        self.closed = False

    def write(self, data) -> None:
        self.on_write(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return default

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def start(k: int, sink: JsonlAuditSink, loop: asyncio.AbstractEventLoop) -> Pump:
    counter = iter(range(1 << 62))
    parser = FrontendParser(expect_startup=False)

    def send_next() -> None:
        client.protocol.data_received(wire(m.Query(f"SELECT 1 AS s{k}_{next(counter)}")))

    def upstream_write(data: bytes) -> None:
        parser.feed(data)
        for msg in parser.messages():
            if isinstance(msg, m.Query):
                alias = msg.sql.rsplit(" ", 1)[1]
                os.write(1, alias.encode() + b"\n")  # forwarded: acknowledge
                loop.call_soon(upstream.protocol.data_received, ANSWER)
                loop.call_soon(send_next)

    client = Transport(lambda data: None)
    upstream = Transport(upstream_write)
    gate = Gate(
        policy=POLICY, target="demo", principal=ALICE, session_id="s1", connection_id=f"c{k}"
    )
    # As the listener builds it over a durable sink: recorded statements go upstream at
    # once, not with the next one's bytes. Two statements in flight per connection (a
    # pipeline), so one is forwarded while the next one's record waits for its fsync.
    pump = Pump(connection(gate=gate, audit_answers_later=True), client, upstream, audit=sink)
    pump.start(b"", b"")
    send_next()
    send_next()
    return pump


async def main(path: Path, k: int) -> None:
    sink = JsonlAuditSink(path, fsync=True, checkpoint_every=50)
    loop = asyncio.get_running_loop()
    pumps = [start(i, sink, loop) for i in range(k)]
    await asyncio.gather(*(p.done for p in pumps))  # never: killed first


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
