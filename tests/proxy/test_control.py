"""The broker ↔ gateway worker control channel, how a gateway routes cancels between
workers, and what the broker takes from a worker (it parses clients' bytes, so it is
trusted with its own sessions and nothing more): over a real socketpair, no broker."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from datetime import UTC, datetime

import pytest

from guard.broker.approvals.service import HeldStatement, Requester
from guard.broker.audit.sink import AuditUnavailable, MemoryAuditSink
from guard.broker.credentials.issuer import IssuedCredentials
from guard.broker.identity.principal import Principal
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.scram import make_verifier
from guard.broker.policy.model import ApprovalRequirement
from guard.broker.proxy.control import MAX_FRAME, Channel, ControlClosed, RemoteError, frame
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.proxy.listener import Gateway
from guard.broker.proxy.supervisor import WORKER_GLOBALS, GatewayWorkers
from guard.broker.sessions import Session
from guard.broker.settings import GatewaySettings, TargetSettings
from tests.playbook import POLICY


async def _pair(**right) -> tuple[Channel, Channel, list[asyncio.Task]]:
    a, b = socket.socketpair()
    left = Channel(*await asyncio.open_connection(sock=a), name="left")
    other = Channel(*await asyncio.open_connection(sock=b), name="right", **right)
    tasks = [asyncio.ensure_future(left.serve()), asyncio.ensure_future(other.serve())]
    return left, other, tasks


def test_calls_are_answered_in_any_order_and_notices_arrive_in_order():
    async def main():
        seen: list[int] = []
        release = asyncio.Event()

        async def slow(x):
            await release.wait()
            return x * 2

        async def fast(x):
            return x + 1

        left, _right, tasks = await _pair(
            calls={"slow": slow, "fast": fast}, notices={"n": seen.append}
        )
        slow_call = asyncio.ensure_future(left.call("slow", 21))
        assert await left.call("fast", 1) == 2  # not stuck behind the slow one
        for i in range(3):
            left.notify("n", i)
        release.set()
        assert await slow_call == 42
        await asyncio.sleep(0.05)
        left.close()
        await asyncio.gather(*tasks)
        return seen

    assert asyncio.run(main()) == [0, 1, 2]


def test_a_failing_or_unknown_call_raises_the_message_on_the_caller_side():
    async def main():
        async def boom():
            raise ValueError("no such session")

        left, _right, tasks = await _pair(calls={"boom": boom})
        with pytest.raises(RemoteError, match="ValueError: no such session"):
            await left.call("boom")
        with pytest.raises(RemoteError, match="unknown call 'nope'"):
            await left.call("nope")
        left.close()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_waiting_calls_fail_when_the_other_side_goes_and_later_calls_too():
    async def main():
        async def never():
            await asyncio.Event().wait()

        left, right, tasks = await _pair(calls={"never": never})
        waiting = asyncio.ensure_future(left.call("never"))
        await asyncio.sleep(0.05)
        right.close()  # the worker (or broker) is gone
        with pytest.raises(ControlClosed):
            await waiting
        await asyncio.gather(*tasks)
        with pytest.raises(ControlClosed):
            await left.call("never")
        left.notify("dropped")  # no raise: a notice to a closed channel is dropped

    asyncio.run(main())


def test_an_oversized_frame_closes_the_channel_without_reading_it():
    async def main():
        a, b = socket.socketpair()
        channel = Channel(*await asyncio.open_connection(sock=a))
        b.sendall(struct.pack(">I", MAX_FRAME + 1))
        async with asyncio.timeout(5):
            await channel.serve()
        b.close()
        return channel.closed

    assert asyncio.run(main())


class _NoSessions:
    async def find(self, user):
        return None

    def is_live(self, session):
        return False

    async def admit(self, session, handle):
        raise AssertionError("nobody is admitted")

    def release(self, session, handle):
        raise AssertionError("nobody is admitted")


async def _no_protected_map(target, conn):
    raise AssertionError("no login gets this far")


@pytest.mark.parametrize(("index", "process_id", "forwarded"), [(1, 1, True), (1, 2, False)])
def test_a_cancel_for_another_workers_key_is_forwarded_and_its_own_is_not(
    index, process_id, forwarded
):
    """Worker `index` of 2 owns process ids with (pid - 1) % 2 == index."""

    async def main():
        sent: list[tuple[int, bytes]] = []

        async def forward(pid: int, key: bytes) -> None:
            sent.append((pid, key))

        gateway = Gateway(
            directory=_NoSessions(),
            policy=POLICY,
            audit=MemoryAuditSink(),
            protected_map=_no_protected_map,
            worker=(index, 2),
            forward_cancel=forward,
        )
        _host, port = await gateway.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(encode(m.CancelRequest(process_id, b"\x01\x02\x03\x04")))
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # a cancel is never answered
            writer.close()
        finally:
            await gateway.close()
        return sent

    sent = asyncio.run(main())
    assert sent == ([(process_id, b"\x01\x02\x03\x04")] if forwarded else [])


def test_gateway_workers_setting_takes_a_count_or_auto():
    assert GatewaySettings(workers="auto").worker_count() >= 1
    assert GatewaySettings(workers=3).worker_count() == 3
    assert GatewaySettings().worker_count() == len(os.sched_getaffinity(0))  # auto
    assert GatewaySettings(workers=1).worker_count() == 1
    for bad in (0, 65, "many"):
        with pytest.raises(ValueError):
            GatewaySettings(workers=bad)


class _Boom:
    """A pickle that runs a command when loaded (the attack a restricted end refuses)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_restricted_end_refuses_a_frame_naming_a_callable_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    async def main():
        a, b = socket.socketpair()
        broker = Channel(
            *await asyncio.open_connection(sock=a), allowed=WORKER_GLOBALS, name="broker"
        )
        b.sendall(frame(("notice", "release", (_Boom(str(marker)),))))
        async with asyncio.timeout(5):
            await broker.serve()  # returns: the channel closed on the frame
        b.close()
        return broker.closed

    assert asyncio.run(main())
    assert not marker.exists()


def test_a_restricted_end_takes_the_approval_calls_values():
    got: list = []

    async def hold(request_id, requester, held):
        got.append((request_id, requester, held))
        return "decided"

    async def main():
        worker, broker, tasks = await _pair(calls={"hold": hold}, allowed=WORKER_GLOBALS)
        answer = await worker.call("hold", "r1", REQUESTER, HELD)
        worker.close()
        await asyncio.gather(*tasks)
        return answer

    assert asyncio.run(main()) == "decided"
    assert got == [("r1", REQUESTER, HELD)]


ALICE = Principal("https://idp.test", "alice-sub", frozenset({"engineers"}), "alice")
REQUESTER = Requester("s1", "demo", ALICE, "INC-1", "v-role", datetime(2026, 1, 1, tzinfo=UTC))
HELD = HeldStatement(
    "rule", ApprovalRequirement(frozenset({"leads"}), 1, None), "SELECT $1", "fp", ((None, "t"),)
)


def _session(session_id: str) -> Session:
    return Session(
        id=session_id,
        principal=ALICE,
        target="demo",
        upstream=TargetSettings(database="demo", openbao_role="r"),
        user=f"guard_{session_id}",
        verifier=make_verifier("secret"),
        credentials=IssuedCredentials("v-" + session_id, "pw", "lease", datetime.now(UTC)),
        expires_at=datetime.now(UTC),
        reason="broker's own reason",
    )


def test_a_worker_holds_statements_only_for_its_sessions_and_as_the_broker_knows_them():
    class Approvals:
        holding_targets = frozenset({"demo"})

        def __init__(self):
            self.held, self.ended, self.withdrawn = [], [], []

        async def hold(self, request_id, requester, held):
            self.held.append(requester)
            return ApprovalDecided(request_id, approved=True, per_statement=True)

        async def end_statement(self, request_id):
            self.ended.append(request_id)

        def withdraw(self, request_id, reason):
            self.withdrawn.append(request_id)

    approvals = Approvals()
    workers = GatewayWorkers(
        count=2,
        settings=None,  # type: ignore[arg-type]  # not started: only the call handlers run
        policy=POLICY,
        policy_text="",
        sessions=None,  # type: ignore[arg-type]
        approvals=approvals,  # type: ignore[arg-type]
        audit=MemoryAuditSink(),
    )
    mine, other = workers._workers
    mine.admitted[1] = (_session("s1"), None)  # type: ignore[assignment]
    forged = Requester("s1", "demo", ALICE, "forged", "postgres", REQUESTER.expires_at)

    async def main():
        calls = workers._calls(other)
        with pytest.raises(PermissionError):  # s1 has no connection on the other worker
            await calls["hold"]("r0", forged, HELD)
        decided = await workers._calls(mine)["hold"]("r1", forged, HELD)
        await calls["end_statement"]("r1")  # not the other worker's to end
        workers._notices(other)["withdraw"]("r1", "x")
        await workers._calls(mine)["end_statement"]("r1")
        return decided

    assert asyncio.run(main()).approved
    (requester,) = approvals.held
    # The broker's session speaks, not the worker: its role and reason, not the forged ones.
    assert (requester.role, requester.reason) == ("v-s1", "broker's own reason")
    assert approvals.ended == ["r1"] and approvals.withdrawn == []


def test_a_worker_tells_its_broker_when_its_audit_log_fails_and_when_it_recovers(tmp_path):
    """The flush loop every gateway process runs reports each change of its sink's
    health once (the broker's /v1/health names a worker whose log cannot be written)."""
    from guard.broker.health import WatchedAuditSink, flush_audit_forever

    class Flaky:
        def __init__(self):
            self.fail = False

        def flush(self):
            if self.fail:
                raise AuditUnavailable("disk full")

    inner = Flaky()
    watched = WatchedAuditSink(inner)  # type: ignore[arg-type]
    heard: list[str | None] = []

    async def main():
        task = asyncio.ensure_future(
            flush_audit_forever(watched, on_change=heard.append, interval=0.01)
        )
        await asyncio.sleep(0.05)
        inner.fail = True  # the flush itself fails and records why
        await asyncio.sleep(0.05)
        inner.fail = False
        watched.last_error = None  # a later write succeeded
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert heard == ["disk full", None]


def test_a_worker_keeps_a_sessions_scram_keys_across_its_logins_and_no_longer():
    """Each `find` brings a fresh snapshot over the channel; the worker's directory keeps
    one ScramKeys per session for its logins (PBKDF2 once per session, not per
    connection), gets none of the broker's key material, and lets them go when the
    broker ends one of the session's connections there or the session expires."""
    from datetime import timedelta

    from guard.broker.proxy.worker import RemoteDirectory

    live, soon = _session("s1"), _session("s2")
    live.expires_at = datetime.now(UTC) + timedelta(hours=1)
    soon.expires_at = datetime.now(UTC) + timedelta(seconds=0.2)
    live.upstream_scram.derive("pw", b"salt" * 4, 1)  # the broker's own logins' keys
    by_user = {s.user: s for s in (live, soon)}

    class Sessions:
        def by_user(self, user):
            return by_user.get(user)

    workers = GatewayWorkers(
        count=1,
        settings=None,  # type: ignore[arg-type]  # not started: only the call handlers run
        policy=POLICY,
        policy_text="",
        sessions=Sessions(),  # type: ignore[arg-type]
        approvals=None,  # type: ignore[arg-type]
        audit=MemoryAuditSink(),
    )
    (worker,) = workers._workers

    async def main():
        broker, channel, tasks = await _pair()
        broker.calls = workers._calls(worker)
        broker.calls["admit"] = lambda session_id, key: _none()
        directory = RemoteDirectory(channel)
        first, again = await directory.find("guard_s1"), await directory.find("guard_s1")
        assert first is not again and first is not live  # snapshots, as the channel makes
        assert first.upstream_scram is again.upstream_scram
        assert first.upstream_scram._derived == {}  # no key material crossed the channel
        other = await directory.find("guard_s2")
        assert other.upstream_scram is not first.upstream_scram

        # The broker ends s1 through one of its connections here: its keys go with it.
        class Handle:
            def close(self, reason):
                self.reason = reason

        handle = Handle()
        await directory.admit(first, handle)  # type: ignore[arg-type]
        directory.close(1, "session ended")
        assert handle.reason == "session ended"
        assert (await directory.find("guard_s1")).upstream_scram is not first.upstream_scram
        # s2 expires: the next find, for anyone, forgets its keys.
        kept = other.upstream_scram
        await asyncio.sleep(0.3)
        await directory.find("guard_s1")
        assert "s2" not in directory._scram and "s1" in directory._scram
        assert (await directory.find("guard_s2")).upstream_scram is not kept
        for task in tasks:
            task.cancel()

    async def _none():
        return None

    asyncio.run(main())
