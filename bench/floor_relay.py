"""The floor: what a do-nothing uvloop byte relay costs per pgbench transaction.

    .venv/bin/python bench/floor_relay.py [--seconds 6] [--clients 8]

Starts the demo stack's PostgreSQL (`guard dev up`), a relay that copies bytes between
each client and its own upstream connection (plain TCP both sides, no parsing, no TLS, no
audit), and runs pgbench -S through it; prints tps and the relay's CPU µs per
transaction. Anything guard's gateway spends above this number is its own work (upstream
TLS, framing, decisions, audit), so this is the floor a Python gateway can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import _per_tx, admin_env, cpu_times, demo_stack, pgbench, sh  # noqa: E402

from guard.devstack.postgres import free_port  # noqa: E402


class Side(asyncio.Protocol):
    """One end of a relayed connection: copies what it receives to its peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early += data
        else:
            self.peer.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


def relay(upstream_host: str, upstream_port: int, listen_port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()

        class Client(Side):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                loop.create_task(self.connect())

            async def connect(self) -> None:
                upstream = Side()
                upstream.peer, self.peer = self, upstream
                await loop.create_connection(lambda: upstream, upstream_host, upstream_port)
                if self.early:
                    upstream.transport.write(self.early)

        await loop.create_server(Client, "127.0.0.1", listen_port)
        await asyncio.Event().wait()

    uvloop.run(main())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    with demo_stack() as (_env, status):
        admin = psycopg.conninfo.conninfo_to_dict(status["upstream_dsn"])
        pg_env = admin_env(status, sslmode="disable")
        sh(["pgbench", "-i", "-q", "-s", "10"], env=pg_env)
        port = free_port()
        relay_argv = ["--relay", admin["host"], str(admin["port"]), str(port)]
        proc = subprocess.Popen([sys.executable, __file__, *relay_argv])
        try:
            time.sleep(1.0)
            relay_env = {**pg_env, "PGHOST": "127.0.0.1", "PGPORT": str(port)}
            before = cpu_times(proc.pid)
            tps, n = pgbench(relay_env, ["-S", "-M", "simple"], args.seconds, args.clients)
            user, system = _per_tx(before, cpu_times(proc.pid), n)
            direct, _ = pgbench(pg_env, ["-S", "-M", "simple"], args.seconds, args.clients)
        finally:
            proc.kill()
        print(
            f"-S simple: direct {direct:.0f} tps, relay {tps:.0f} tps, relay "
            f"{user + system:.1f} µs/tx ({system:.1f} system)"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--relay":
        relay(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
