"""A gateway in miniature for the kill -9 test: K connections through real `Pump`s, one
durable `JsonlAuditSink` (group commit), in-memory transports.

    python -m tests.audit.crash_writer LOG K [journal]

With `journal`, the sink has no fsync and writes through its journal (`audit.journal`),
flushed every 20 ms as the broker flushes every 200 ms, and statements are answered at
once (no group commit).

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
import signal
import subprocess
import sys
from pathlib import Path

from guard.broker.audit.sink import JsonlAuditSink
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.parser import FrontendParser
from guard.broker.proxy.core import Pump
from guard.broker.proxy.gate import Gate
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


def start(k: int, sink: JsonlAuditSink, loop: asyncio.AbstractEventLoop, *, later: bool) -> Pump:
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
    pump = Pump(connection(gate=gate, audit_answers_later=later), client, upstream, audit=sink)
    pump.start(b"", b"")
    send_next()
    send_next()
    return pump


async def flush_forever(sink: JsonlAuditSink) -> None:
    while True:
        await asyncio.sleep(0.02)
        sink.flush()


async def main(path: Path, k: int, journal: bool) -> None:
    if journal:
        sink = JsonlAuditSink(path, journal=True, checkpoint_every=50)
    else:
        sink = JsonlAuditSink(path, fsync=True, checkpoint_every=50)
    loop = asyncio.get_running_loop()
    pumps = [start(i, sink, loop, later=not journal) for i in range(k)]
    flushing = loop.create_task(flush_forever(sink))
    await asyncio.gather(flushing, *(p.done for p in pumps))  # never: killed first


def kill_repeatedly(path: Path, env: dict[str, str], *extra: str) -> set[str]:
    """Start this writer on `path` and SIGKILL it three times, at different moments (50,
    400, 1500 acknowledgements), restarting on the same log; what it acknowledged. After
    each kill the log must verify, but for a last line cut off mid-write."""
    from tests.audit.audit_logs import verify

    root = Path(__file__).resolve().parents[2]
    acked: set[str] = set()
    for wanted in (50, 400, 1500):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.audit.crash_writer", str(path), "8", *extra],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        got = 0
        for line in proc.stdout:
            acked.add(line.decode().strip())
            got += 1
            if got >= wanted:
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
        acked.update(rest.decode().split())  # acknowledged before the kill landed
        assert got >= wanted, err.decode()
        # Killed: the records after the last checkpoint are unsigned, but the chain holds.
        # A kill that lands inside a write of more than a page may leave that write's
        # line cut off (the kernel stops copying at a fatal signal): its statements were
        # never forwarded (they waited for the fsync after it) or are in the journal, and
        # the next open cuts it.
        report = verify(path)
        assert report.ok or (
            report.damage is not None
            and report.damage.kind == "truncated"
            and report.damage.line == report.lines
        ), report
    return acked


def recorded_aliases(path: Path) -> set[str]:
    """The statements (`s<k>_<i>`) that have a record in the log at `path`."""
    from tests.audit.audit_logs import body

    return {
        body(line)["statement"].rsplit(" ", 1)[1]
        for line in path.read_bytes().splitlines()
        if body(line)["kind"] == "statement"
    }


if __name__ == "__main__":
    journal = sys.argv[3:] == ["journal"]
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), journal))
