"""The floor: what a do-nothing uvloop byte relay costs per pgbench transaction.

    .venv/bin/python bench/floor_relay.py [--seconds 6] [--clients 8] [--rounds 2]

Starts the demo stack's PostgreSQL (`guard dev up`) and runs pgbench -S (simple) with N
clients through relays that copy bytes between each client and its own upstream connection
(no parsing, no decisions, no audit), in the same run as direct and pgbouncer:

- `plain`: plain TCP on both legs (the kernel's and the event loop's share alone);
- `tls`: verified TLS on both legs through uvloop's TLS transport (the client's SSLRequest
  answered, then `loop.start_tls`; toward PostgreSQL the same); the client leg's SSL
  objects are `tlslayer.DirectSSLObject`, as the gateway's;
- `bio`: guard's gateway's plumbing before `proxy._ctls` (and without its build): uvloop's
  TLS transport toward the client, and `proxy.tlslayer` (memory BIOs over a plain
  transport) toward PostgreSQL;
- `bio2`: memory BIOs on both legs;
- `c`: guard's gateway's plumbing now: the handshakes over memory BIOs, then the records
  moved by C on both legs (`proxy.tlstransport.adopt`, `proxy._ctls`);

and pgbouncer with TLS on both legs (`client_tls_sslmode`, `server_tls_sslmode =
verify-full`).

Prints tps, the relay's and pgbouncer's CPU µs per transaction and the ratio to pgbouncer.
Anything guard's gateway spends above the `c` relay (`bio` without the `_ctls` build) is
its own work per statement (framing, decisions, audit), and that relay's ratio to
pgbouncer is the most guard's gateway can reach with its present plumbing: the ceiling
for issue 13's goal.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    _per_tx,
    admin_env,
    app_env,
    cpu_times,
    demo_stack,
    libpq_env,
    pgbench,
    sh,
    start_pgbouncer,
)

from guard.broker.proxy import tlstransport  # noqa: E402
from guard.broker.proxy.tlslayer import DirectSSLObject, TLSClient, TLSClosed  # noqa: E402
from guard.devstack.postgres import free_port  # noqa: E402

SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")


class Side(asyncio.Protocol):
    """One end of a relayed connection: copies what it receives to its peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early = b""
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send = transport.write  # what the peer calls with the bytes it relays

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early += data  # the TLS negotiation's bytes, or bytes before relaying
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)
        else:
            self.peer.send(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class BioSide(Side):
    """A relay end that may speak TLS (`negotiate`): through uvloop's TLS transport, or
    through `proxy.tlslayer`'s record layer over memory BIOs on the plain transport, as
    guard's gateway does upstream. Without TLS, or before it, a plain `Side`."""

    tls: TLSClient | None = None

    async def wait_for(self, size: int) -> bytes:
        """The next `size` or more bytes the peer sends before relaying starts."""
        loop = asyncio.get_running_loop()
        while len(self.early) < size:
            self.waiter = loop.create_future()
            await self.waiter
        data, self.early, self.waiter = self.early, b"", None
        return data

    async def negotiate(
        self, ctx: ssl.SSLContext, *, server_side: bool, bio: bool, in_c: bool = False
    ) -> None:
        """The client's SSLRequest answered (client leg) or ours sent (upstream leg), then
        TLS over the same transport: uvloop's, or memory BIOs when `bio` (records then
        moved by C when `in_c`)."""
        if not server_side:
            self.transport.write(SSL_REQUEST)
        answer = await self.wait_for(len(SSL_REQUEST) if server_side else 1)
        assert answer == (SSL_REQUEST if server_side else b"S"), answer
        if server_side:
            self.transport.write(b"S")
        hostname = None if server_side else self.transport.get_extra_info("peername")[0]
        if not bio:
            self.transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, ctx, server_side=server_side, server_hostname=hostname
            )
            self.send = self.transport.write
            return
        tls = TLSClient(ctx, hostname, server_side=server_side)
        self.transport.write(tls.handshake())
        while not tls.handshake_done:
            self.transport.write(tls.handshake(await self.wait_for(1)))
        if in_c:
            adopted = tlstransport.adopt(self.transport, tls.ssl_object)
            assert adopted is not None, "proxy._ctls is not built"
            adopted.set_protocol(self)
            self.transport, self.send = adopted, adopted.write
            adopted.resume_reading()  # records that came with the handshake come first
            return
        self.tls = tls
        self.early = tls.decrypt()  # what came with the handshake's last flight
        write, encrypt = self.transport.write, tls.encrypt
        self.send = lambda data: write(encrypt(data))

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            super().data_received(data)
            return
        try:
            plain = self.tls.decrypt(data)
        except TLSClosed:
            self.transport.close()
            return
        if self.peer is None:
            self.early += plain  # the client's first messages, while upstream connects
        elif plain:
            self.peer.send(plain)


def relay(
    upstream_host: str, upstream_port: int, listen_port: int, mode: str, tls_dir: str | None
) -> None:
    """Serve the relay on listen_port until killed. Modes: "plain"; "tls" (uvloop's TLS
    transport on both legs); "bio" (uvloop's toward the client, memory BIOs upstream, as
    guard's gateway had it); "bio2" (memory BIOs on both legs); "c" (records moved by C on
    both legs, as guard's gateway has them). TLS uses the dev stack's
    CA and the gateway's certificate in `tls_dir`."""
    import uvloop

    server_ctx = client_ctx = None
    if tls_dir is not None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(f"{tls_dir}/gateway.pem", f"{tls_dir}/gateway-key.pem")
        server_ctx.sslobject_class = DirectSSLObject  # as the gateway's (service.py)
        client_ctx = ssl.create_default_context(cafile=f"{tls_dir}/ca.pem")

    async def main() -> None:
        loop = asyncio.get_running_loop()

        class Client(BioSide):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                loop.create_task(self.connect())

            async def connect(self) -> None:
                if mode != "plain":
                    await self.negotiate(
                        server_ctx, server_side=True, bio=mode in ("bio2", "c"), in_c=mode == "c"
                    )
                upstream = BioSide()
                await loop.create_connection(lambda: upstream, upstream_host, upstream_port)
                if mode != "plain":
                    await upstream.negotiate(
                        client_ctx, server_side=False, bio=mode != "tls", in_c=mode == "c"
                    )
                upstream.peer, self.peer = self, upstream
                if self.early:
                    upstream.send(self.early)

        await loop.create_server(Client, "127.0.0.1", listen_port)
        await asyncio.Event().wait()

    uvloop.run(main())


def measure(
    pid: int, env: dict[str, str], seconds: int, clients: int
) -> tuple[float, float, float]:
    """tps of pgbench -S simple through a process, and its (user, system) µs/tx."""
    before = cpu_times(pid)
    tps, n = pgbench(env, ["-S", "-M", "simple"], seconds, clients)
    user, system = _per_tx(before, cpu_times(pid), n)
    return tps, user, system


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians")
    args = ap.parse_args()
    with demo_stack() as (_env, status):
        admin = psycopg.conninfo.conninfo_to_dict(status["upstream_dsn"])
        host, port = admin["host"], int(admin["port"])
        tls_dir = str(Path(status["gateway_ca"]).parent)
        sh(["pgbench", "-i", "-q", "-s", "10"], env=admin_env(status, sslmode="disable"))
        # Every path logs in as the same plain application role (run.app_env).
        direct = app_env(status, sslmode="verify-full")
        user, password = direct["PGUSER"], direct["PGPASSWORD"]
        procs: dict[str, subprocess.Popen] = {}
        envs: dict[str, dict[str, str]] = {}
        try:
            for name in ("plain", "tls", "bio", "bio2", "c"):
                tls = None if name == "plain" else tls_dir
                listen = free_port()
                argv = [sys.executable, __file__, "--relay", host, str(port), str(listen), name]
                procs[name] = subprocess.Popen([*argv, *([tls] if tls else [])])
                mode = "verify-full" if tls else "disable"
                envs[name] = libpq_env(
                    "127.0.0.1",
                    listen,
                    user,
                    password,
                    sslmode=mode,
                    rootcert=status["gateway_ca"] if tls else "",
                )
            pgb, pgb_port, pgb_dir = start_pgbouncer(
                host, port, user, password, status["gateway_ca"]
            )
            procs["pgbouncer"] = pgb
            pids = {name: proc.pid for name, proc in procs.items()}
            # pgbouncer runs under runuser: its own pid is the one holding its config file.
            pids["pgbouncer"] = int(sh(["pgrep", "-n", "-f", f"pgbouncer {pgb_dir}"]).stdout)
            envs["pgbouncer"] = libpq_env(
                "127.0.0.1",
                pgb_port,
                user,
                password,
                sslmode="verify-full",
                rootcert=status["gateway_ca"],
            )
            for e in (*envs.values(), direct):
                e["PGGSSENCMODE"] = "disable"
            # A relay that terminates TLS cannot pass PostgreSQL's SCRAM channel binding on
            # (the client binds to the relay's certificate); guard's gateway logs clients in
            # itself for that reason.
            for name in ("tls", "bio", "bio2", "c"):
                envs[name]["PGCHANNELBINDING"] = "disable"
            time.sleep(1.0)
            runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in procs}
            direct_tps: list[float] = []
            for _ in range(args.rounds):
                direct_tps.append(
                    pgbench(direct, ["-S", "-M", "simple"], args.seconds, args.clients)[0]
                )
                for name, pid in pids.items():
                    runs[name].append(measure(pid, envs[name], args.seconds, args.clients))
        finally:
            for proc in procs.values():
                proc.terminate()  # runuser passes it on to pgbouncer
    pgb_tps = statistics.median(r[0] for r in runs["pgbouncer"])
    print(
        f"-S simple, {args.clients} clients, median of {args.rounds} interleaved rounds; "
        f"direct (TLS) {statistics.median(direct_tps):.0f} tps"
    )
    print(f"{'path':<26} {'tps':>7} {'/pgbouncer':>10} {'µs/tx':>7} {'(sys)':>6}")
    for name, label in (
        ("plain", "relay, plain both legs"),
        ("tls", "relay, TLS both legs"),
        ("bio", "relay, TLS, upstream BIO"),
        ("bio2", "relay, TLS, BIO both legs"),
        ("c", "relay, TLS records in C"),
        ("pgbouncer", "pgbouncer, TLS both legs"),
    ):
        tps = statistics.median(r[0] for r in runs[name])
        user = statistics.median(r[1] for r in runs[name])
        system = statistics.median(r[2] for r in runs[name])
        print(f"{label:<26} {tps:7.0f} {tps / pgb_tps:10.2f} {user + system:7.1f} {system:6.1f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (6, 7) and sys.argv[1] == "--relay":
        tls = sys.argv[6] if len(sys.argv) == 7 else None
        relay(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], tls)
    else:
        sys.exit(main())
