"""Take one part out of the gateway, for `bench/run.py --without PART` (never the product).

bench/run.py puts this directory first on PYTHONPATH with GUARD_BENCH_WITHOUT set, so
Python imports this module at start-up in every process of the demo stack; in the broker's
(and its gateway workers') it patches, before anything is served:

- `core`: the pump gets a connection core that relays the bytes both ways and does
  nothing else (no framing, analysis, policy, audit or masking): what guard's plumbing
  costs alone (uvloop's TLS to the client, `proxy.tlslayer` upstream, the pump).
- `audit`: statement records are answered with sequence numbers and not sealed or written,
  result records dropped; `statements` and `results`: only the one or the other.

The difference to a run without `--without` is what that part costs on the user's path.
Imports os and sys, and guard's proxy and health modules only in a broker process.
"""

from __future__ import annotations

import os
import sys

WITHOUT = {p for p in os.environ.get("GUARD_BENCH_WITHOUT", "").split(",") if p}


def _relaying_core(real_pump: type) -> type:
    from guard.broker.proxy.commands import CloseConnection, SendToClient, SendToServer
    from guard.broker.proxy.state import State

    class Relay:
        """Stands in for GatewayConnection after the login: bytes across, as they came."""

        partial_message = False
        queued_client_bytes = 0
        state = State.RELAYING
        held_request = None
        awaiting_approval = None

        def __init__(self, connection: object) -> None:
            self.gate = connection.gate  # type: ignore[attr-defined]

        def from_client(self, data: bytes) -> list:
            return [SendToServer(data)]

        def from_server(self, data: bytes) -> list:
            return [SendToClient(data)]

        # The pump's entry points: commands here, as before the core's express lanes
        # answered a read with the read itself (so `--without core` measures as it did).
        relay_from_client = from_client
        relay_from_server = from_server

        def client_eof(self) -> list:
            return [CloseConnection("client EOF")]

        server_eof = client_eof

        def idle_for(self, seconds: float) -> list:
            return []

        incomplete_for = idle_for

    def pump(connection: object, *args: object, **kwargs: object) -> object:
        return real_pump(Relay(connection), *args, **kwargs)

    return pump  # type: ignore[return-value]


def _patch() -> None:
    if "core" in WITHOUT:
        from guard.broker.proxy import core

        core.Pump = _relaying_core(core.Pump)  # before the listener imports it
    if WITHOUT & {"audit", "statements", "results"}:
        import itertools
        import types

        from guard.broker.health import WatchedAuditSink

        numbers = itertools.count(10**12)

        def statements(records: object) -> list[int]:
            return [next(numbers) for _ in records]  # type: ignore[attr-defined]

        def results(queued: object) -> bool:
            return True  # (the hot path's answer for "queued")

        no_statements = bool(WITHOUT & {"audit", "statements"})
        no_results = bool(WITHOUT & {"audit", "results"})
        if no_statements:
            WatchedAuditSink.append_statements = (  # type: ignore[method-assign]
                lambda self, records: statements(records)
            )
        if no_results:
            WatchedAuditSink.append_results = lambda self, results: None  # type: ignore[method-assign]
        real_hot_path = WatchedAuditSink.hot_path

        def hot_path(self: WatchedAuditSink) -> object:
            # The pump's hot path with the part taken out replaced and the other one
            # kept, each a plain attribute (no Python frame added to the part kept).
            real = real_hot_path(self)
            if real is None:
                return None
            return types.SimpleNamespace(
                statements=statements if no_statements else real.statements,
                results=results if no_results else real.results,
            )

        WatchedAuditSink.hot_path = hot_path  # type: ignore[method-assign]


if WITHOUT and any(arg.startswith("guard.broker") for arg in sys.orig_argv):
    _patch()
