"""Run a child process inside a guard session: session → loopback relay → child → teardown.

Shared by `guard connect` (psql) and `guard exec` (any program). One `asyncio.run` at the
boundary; the session is ended (gateway connections closed, lease revoked) whatever way
the child ends, and the child's exit status comes back unchanged (128+N for signal N,
127 when the program does not exist, 126 when it cannot be executed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from urllib.parse import quote

from guard.broker.api.schemas import SessionCreated
from guard.cli.client import BrokerClient
from guard.cli.tunnel import LoopbackRelay, client_tls_context

# Variables removed from the child's environment: the identity token could open further
# sessions, and libpq service/options variables could point the client somewhere else.
SCRUBBED_ENV = (
    "GUARD_ID_TOKEN",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGHOSTADDR",
    "PGOPTIONS",
    "PGPASSFILE",
    "PGREQUIRESSL",
)


def session_env(created: SessionCreated, port: int) -> dict[str, str]:
    """libpq variables and DATABASE_URL for a client of the loopback relay."""
    url = (
        f"postgresql://{quote(created.user, safe='')}:{quote(created.password, safe='')}"
        f"@127.0.0.1:{port}/{quote(created.database, safe='')}?sslmode=disable"
    )
    return {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(port),
        "PGUSER": created.user,
        "PGPASSWORD": created.password,
        "PGDATABASE": created.database,
        # Loopback is plain; the relay speaks to the gateway (TLS for remote gateways).
        "PGSSLMODE": "disable",
        "DATABASE_URL": url,
    }


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(extra)
    return env


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def _run_child(argv: Sequence[str], env: dict[str, str]) -> int:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=env)
    except FileNotFoundError:
        print(f"guard: {argv[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"guard: {argv[0]}: permission denied", file=sys.stderr)
        return 126
    loop = asyncio.get_running_loop()
    interactive = sys.stdin.isatty()

    def forward(sig: int) -> None:
        # A terminal's Ctrl-C already reaches the child (same foreground process group);
        # sending it again would interrupt twice. Signals sent to guard alone are forwarded.
        if sig == signal.SIGINT and interactive:
            return
        if proc.returncode is None:
            proc.send_signal(sig)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in handled:
        loop.add_signal_handler(sig, forward, sig)
    try:
        return exit_status(await proc.wait())
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _in_session(
    client: BrokerClient,
    created: SessionCreated,
    argv: Sequence[str] | None,
    on_ready: Callable[[dict[str, str]], None] | None,
    gateway_ca_file: str | None,
) -> int:
    tls = client_tls_context(gateway_ca_file) if created.gateway_tls else None
    relay = LoopbackRelay(created.gateway_host, created.gateway_port, tls)
    try:
        port = await relay.start()
        env = session_env(created, port)
        if on_ready is not None:
            on_ready(env)
        if argv is None:
            # --print-env: serve until interrupted.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            return 0
        return await _run_child(argv, child_environment(env))
    finally:
        await relay.close()
        await asyncio.to_thread(client.end_session, created.session_id)


def run_in_session(
    *,
    broker_url: str,
    token: str,
    target: str,
    reason: str,
    ttl_seconds: int | None,
    argv: Sequence[str] | None,
    on_ready: Callable[[dict[str, str]], None] | None = None,
    gateway_ca_file: str | None = None,
) -> int:
    client = BrokerClient(broker_url, token)
    try:
        created = client.create_session(target, reason=reason, ttl_seconds=ttl_seconds)
        try:
            return asyncio.run(_in_session(client, created, argv, on_ready, gateway_ca_file))
        except KeyboardInterrupt:
            client.end_session(created.session_id)
            return 130
    finally:
        client.close()
