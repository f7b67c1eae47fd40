"""A gateway worker process: the PG gateway on a shared port, asking the broker about sessions.

Started by `proxy.supervisor` (`python -m guard.broker.proxy.worker --control-fd N`), never
by hand: its first control frame (`hello`) carries the broker's settings, the policy text
the broker compiled, the address to listen on, its audit log and its index. It then runs
the same `listener.Gateway` as the broker's own process would, with `RemoteDirectory` and
`RemoteApprovals` in place of the session manager and the approval service, and its own
audit log (`supervisor.worker_audit_path`).

Fails closed: when the broker's channel closes (the broker stopped or died), the worker
ends every connection it relays and exits, since it could admit nobody. SIGINT is ignored
(a terminal's Ctrl-C reaches the whole process group; the broker stops the workers in
order); SIGTERM stops the worker as `stop` does.

Imports the gateway, the control channel and the audit sink; no session manager, no
credential issuer, no OpenBao token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import sys
from datetime import UTC, datetime
from typing import Any

from guard.broker.approvals.service import HeldStatement, Requester
from guard.broker.audit.sink import AuditUnavailable, JsonlAuditSink
from guard.broker.health import WatchedAuditSink, flush_audit_forever
from guard.broker.pgwire.scram import ScramKeys
from guard.broker.policy.compile import load_policy
from guard.broker.proxy.control import Channel, ControlClosed, read_frame
from guard.broker.proxy.directory import ENDED
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.proxy.tasks import spawn
from guard.broker.sessions import ConnectionHandle, Session

log = logging.getLogger("guard.gateway.worker")

DRAIN_TIMEOUT = 5.0  # at stop: how long relays may take to finish their last records


class RemoteDirectory:
    """`directory.SessionDirectory` answered by the broker over the control channel."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._keys = itertools.count(1)
        self._handles: dict[int, ConnectionHandle] = {}
        self._key_of: dict[ConnectionHandle, int] = {}
        # Each session's upstream SCRAM keys with its expiry, kept here across its
        # connections' logins, since every `find` answers with a fresh snapshot: PBKDF2
        # once per session in this worker. Dropped when the broker ends one of the
        # session's connections here, or once the session has expired.
        self._scram: dict[str, tuple[ScramKeys, datetime]] = {}
        self._session_of: dict[int, str] = {}

    async def find(self, user: str) -> Session | None:
        try:
            session: Session | None = await self.channel.call("find", user)
        except ControlClosed:
            return None  # no broker, no session: the login fails as for a stranger
        now = datetime.now(UTC)
        for sid in [sid for sid, (_, until) in self._scram.items() if until <= now]:
            del self._scram[sid]
        if session is not None:
            kept = self._scram.get(session.id)
            if kept is not None:
                session.upstream_scram = kept[0]
            self._scram[session.id] = (session.upstream_scram, session.expires_at)
        return session

    def is_live(self, session: Session) -> bool:
        # The snapshot's own view; `admit` asks the broker, which has the last word.
        return not session.ended and datetime.now(UTC) < session.expires_at

    async def admit(self, session: Session, handle: ConnectionHandle) -> str | None:
        key = next(self._keys)
        # Known before the broker answers, so a `close` right behind the answer finds it.
        self._handles[key], self._key_of[handle] = handle, key
        self._session_of[key] = session.id
        try:
            refused: str | None = await self.channel.call("admit", session.id, key)
        except ControlClosed:
            refused = ENDED
        if refused is not None:
            del self._handles[key], self._key_of[handle], self._session_of[key]
        return refused

    def release(self, session: Session, handle: ConnectionHandle) -> None:
        key = self._key_of.pop(handle, None)
        if key is not None:
            del self._handles[key], self._session_of[key]
            self.channel.notify("release", key)

    def close(self, key: int, reason: str) -> None:
        """The broker ended the connection's session."""
        sid = self._session_of.get(key)
        if sid is not None:
            self._scram.pop(sid, None)
        handle = self._handles.get(key)
        if handle is not None:
            handle.close(reason)


class RemoteApprovals:
    """`listener.GatewayApprovals` answered by the broker's approval service."""

    def __init__(self, channel: Channel, holding_targets: frozenset[str]) -> None:
        self.channel = channel
        self.holding_targets = holding_targets

    def holds_for(self, target: str) -> bool:
        return target in self.holding_targets

    async def hold(
        self, request_id: str, requester: Requester, held: HeldStatement
    ) -> ApprovalDecided:
        decided: ApprovalDecided = await self.channel.call("hold", request_id, requester, held)
        return decided

    async def end_statement(self, request_id: str) -> None:
        await self.channel.call("end_statement", request_id)

    def withdraw(self, request_id: str, reason: str) -> None:
        self.channel.notify("withdraw", request_id, reason)


async def serve(control_fd: int) -> None:
    from guard.broker.service import build_gateway  # the composition the broker uses

    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=control_fd))
    kind, hello = await read_frame(reader)
    if kind != "hello":
        raise ControlClosed(f"expected hello, got {kind!r}")
    settings = hello["settings"]
    index, count = hello["index"], hello["count"]
    policy = load_policy(hello["policy_text"], source=str(settings.policy_file))
    audit = WatchedAuditSink(
        JsonlAuditSink.from_settings(
            settings.audit.model_copy(
                update={
                    "path": hello["audit_path"],
                    "signing_key_file": hello["signing_key_file"],
                }
            )
        )
    )
    stop = asyncio.Event()
    channel = Channel(reader, writer, name="broker")
    directory = RemoteDirectory(channel)

    async def forward_cancel(process_id: int, secret_key: bytes) -> None:
        channel.notify("cancel", process_id, secret_key)

    gateway = build_gateway(
        settings,
        policy=policy,
        audit=audit,
        approvals=RemoteApprovals(channel, hello["holding_targets"]),
        directory=directory,
        worker=(index, count),
        forward_cancel=forward_cancel,
    )
    notices: dict[str, Any] = {
        "close": directory.close,
        "cancel": lambda pid, key: spawn(gateway.cancel(pid, key), name="forwarded cancel"),
        "stop": stop.set,
        "forget_catalog": gateway.forget_catalog,
    }
    channel.notices = notices
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    served = spawn(channel.serve(), name="control channel")
    served.add_done_callback(lambda _task: stop.set())
    host, port = hello["address"]
    await gateway.start(host, port, reuse_port=True)
    await channel.call("ready")
    log.info("gateway worker %d listening on %s:%s", index, host, port)
    flusher = spawn(
        flush_audit_forever(audit, on_change=lambda error: channel.notify("audit_health", error)),
        name="audit flush",
    )
    try:
        await stop.wait()
    finally:
        flusher.cancel()
        await gateway.close()  # no new connections
        gateway.close_connections("the gateway worker is stopping")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while gateway.relaying:
                    await asyncio.sleep(0.05)
        try:
            audit.close()
        except AuditUnavailable as exc:
            log.error("closing the audit log: %s", exc)
        channel.close()
        log.info("gateway worker %d stopped", index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guard-gateway-worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(args.control_fd))
    except (AuditUnavailable, ControlClosed, OSError) as exc:
        log.error("gateway worker cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
