"""The asyncio shell (`proxy.pump`): executes the core's commands in order, and nothing else.

In-memory transports stand in for sockets; the core is the real one (`tests.playbook`).
What is checked: statement records are in the audit log before the bytes of their statement
are written upstream, a failed write refuses the statement, with a durable log (group
commit) a statement waits for its batch's answer and the client's next ones queue behind it,
connections writing together share one fsync, an unknown command is a crash
that ends the connection (never ignored), half-close, the idle watchdog, and that the end
of a connection says why.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from guard.broker.audit.sink import AuditUnavailable, JsonlAuditSink, MemoryAuditSink
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import BackendParser, FrontendParser
from guard.broker.proxy.commands import SendToServer
from guard.broker.proxy.core import Pump  # the build that runs: the compiled twin when built
from tests.playbook import connection, field, wire

# The twin's module has its own exception classes: the one the running build raises.
UnknownCommand = sys.modules[Pump.__module__].UnknownCommand


class FakeTransport(asyncio.Transport):
    """Records writes; `events` is shared so the order across transports and the audit
    log can be asserted."""

    def __init__(self, name: str, events: list, *, ssl: bool = False) -> None:
        super().__init__()
        self.name, self.events, self.ssl = name, events, ssl
        self.closed = self.eof_written = False
        self.reading = True
        self.protocol: asyncio.Protocol | None = None
        self.calls: list[int] = []  # per write or writelines call: how many pieces

    def write(self, data) -> None:
        self.events.append((self.name, bytes(data)))
        self.calls.append(1)

    def writelines(self, pieces) -> None:
        self.events.append((self.name, b"".join(bytes(piece) for piece in pieces)))
        self.calls.append(len(pieces))

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return object() if name == "sslcontext" and self.ssl else default

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class RecordingSink(MemoryAuditSink):
    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    def append_statements(self, records):
        seqs = super().append_statements(records)
        self.events.append(("audit", seqs))
        return seqs


def messages(events, name, parser) -> list:
    parser.feed(b"".join(data for who, data in events if who == name))
    return list(parser.messages())


def pump_for(*, idle_timeout=None, client_ssl=False, conn=None):
    events: list = []
    client = FakeTransport("client", events, ssl=client_ssl)
    upstream = FakeTransport("upstream", events)
    audit = RecordingSink(events)
    pump = Pump(conn or connection(), client, upstream, audit=audit, idle_timeout=idle_timeout)
    pump.start(b"", b"")
    return pump, client, upstream, audit, events


def test_records_are_written_before_their_statement_goes_upstream():
    async def main():
        pump, client, upstream, audit, events = pump_for()
        client.protocol.data_received(wire(m.Query("SELECT 1"), m.Query("SELECT 2")))
        return events, audit

    events, audit = asyncio.run(main())
    assert events[:2] == [("audit", [1]), ("audit", [2])]
    assert events[2][0] == "upstream"
    sent = messages(events, "upstream", FrontendParser(expect_startup=False))
    assert sent == [m.Query("SELECT 1"), m.Query("SELECT 2")]
    assert [r["verdict"] for r in audit.records] == ["allow", "allow"]


def test_a_reads_pieces_go_to_the_client_in_one_writelines():
    # A bulk result's row split across reads: the next read's output is that row, then the
    # run after it (not copied into one buffer). A write each would be a send each on a TLS
    # client leg: the client woken for one row's record, then again for the rest.
    async def main():
        pump, client, upstream, audit, events = pump_for()
        client.protocol.data_received(wire(m.Query("SELECT 1")))
        rows = [m.DataRow((b"%06d" % i + b"x" * 200,)) for i in range(700)]
        answer = wire(
            m.RowDescription((field("n"),)),
            *rows,
            m.CommandComplete("SELECT 700"),
            m.ReadyForQuery(b"I"),
        )
        split = len(answer) // 2 + 50  # inside a row
        upstream.protocol.data_received(answer[:split])
        before = len(client.calls)
        upstream.protocol.data_received(answer[split:])
        return client.calls[before:], events

    calls, events = asyncio.run(main())
    assert len(calls) == 1 and calls[0] > 1  # one writelines of the pieces
    got = messages(events, "client", BackendParser())
    assert got[1:-2] == [m.DataRow((b"%06d" % i + b"x" * 200,)) for i in range(700)]
    assert got[-1] == m.ReadyForQuery(b"I")


def test_an_unwritable_audit_log_refuses_the_statement():
    async def main():
        pump, client, upstream, audit, events = pump_for()
        audit.fail = True
        client.protocol.data_received(wire(m.Query("SELECT 1")))
        return events

    events = asyncio.run(main())
    (sent,) = messages(events, "upstream", FrontendParser(expect_startup=False))
    assert sent.sql.startswith("guard_refused_")  # the statement itself never went


def test_an_unknown_command_is_a_crash_that_ends_the_connection(caplog):
    class Odd:
        pass

    async def main():
        pump, client, upstream, audit, events = pump_for()
        with pytest.raises(UnknownCommand):
            pump.run([Odd()])  # type: ignore[list-item]
        # The core gives the shell a command it does not know (the core is compiled:
        # its methods cannot be replaced, so the side's feed is).
        pump._client_side.feed = lambda data: [SendToServer(data), Odd()]
        client.protocol.data_received(b"x")
        return pump, client, upstream

    with caplog.at_level(logging.ERROR, logger="guard.proxy"):
        pump, client, upstream = asyncio.run(main())
    assert pump.done.done() and client.closed and upstream.closed
    assert pump.end_reason.startswith("internal error in the gateway shell")
    assert "connection c1" in caplog.text and "UnknownCommand" in caplog.text


def test_the_core_logs_through_the_shell(caplog):
    from tests.playbook import CUSTOMERS_OID, SSN_ATTNUM, field

    async def main():
        pump, client, upstream, audit, events = pump_for()
        client.protocol.data_received(wire(m.Query("SELECT ssn FROM customers")))
        upstream.protocol.data_received(
            wire(m.RowDescription((field("ssn", CUSTOMERS_OID, SSN_ATTNUM),)))
        )

    with caplog.at_level(logging.WARNING, logger="guard.proxy"):
        asyncio.run(main())
    assert "masking objects may have drifted" in caplog.text


def test_half_close_keeps_a_plain_client_open_for_the_answers():
    async def main():
        pump, client, upstream, audit, events = pump_for()
        client.protocol.data_received(wire(m.Query("SELECT 1")))
        keep_open = client.protocol.eof_received()
        answer = wire(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
        upstream.protocol.data_received(answer)
        delivered = messages(events, "client", BackendParser())
        upstream.protocol.eof_received()
        return pump, keep_open, delivered, events

    pump, keep_open, delivered, events = asyncio.run(main())
    assert keep_open is True
    sent = messages(events, "upstream", FrontendParser(expect_startup=False))
    assert sent == [m.Query("SELECT 1"), m.Terminate()]  # PostgreSQL is told, after it
    assert delivered == [m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")]
    assert pump.end_reason == "the client closed its side"


def test_an_ssl_client_cannot_half_close():
    async def main():
        pump, client, upstream, audit, events = pump_for(client_ssl=True)
        return client.protocol.eof_received()

    assert asyncio.run(main()) is False


def test_the_idle_watchdog_ends_an_idle_connection_only():
    async def main():
        pump, client, upstream, audit, events = pump_for(idle_timeout=0.05)
        client.protocol.data_received(wire(m.Query("SELECT pg_sleep(1)")))
        await asyncio.sleep(0.2)
        busy = pump.done.done()  # the statement is still running: not idle
        upstream.protocol.data_received(wire(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
        await asyncio.wait_for(pump.done, 5)
        return busy, pump, events

    busy, pump, events = asyncio.run(main())
    assert busy is False
    last = messages(events, "client", BackendParser())[-1]
    assert last.sqlstate == "57P05" and last.severity == "FATAL"
    assert pump.end_reason.startswith("idle for")


def test_the_idle_watchdog_counts_quiet_from_the_last_read(monkeypatch):
    # A read marks the connection active; the watchdog, looking every IDLE_STEP, takes the
    # mark as activity at that look. So a connection that keeps talking is never ended,
    # and an idle one ends no sooner than idle_timeout after its last read (and within a
    # step of it: the bound here is generous, for a loaded machine).
    monkeypatch.setattr(sys.modules[Pump.__module__], "IDLE_STEP", 0.05)

    async def main():
        loop = asyncio.get_running_loop()
        pump, client, upstream, audit, events = pump_for(idle_timeout=0.3)
        for _ in range(8):  # 0.8 s of statements, each answered: well past idle_timeout
            client.protocol.data_received(wire(m.Query("SELECT 1")))
            upstream.protocol.data_received(
                wire(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
            )
            last_read = loop.time()
            await asyncio.sleep(0.1)
            assert not pump.done.done()
        await asyncio.wait_for(pump.done, 5)
        return loop.time() - last_read, pump

    quiet, pump = asyncio.run(main())
    assert 0.3 <= quiet < 1.5
    assert pump.end_reason.startswith("idle for")


class FakeDesk:
    """An approval desk that records what the pump asks of it and answers when told."""

    def __init__(self) -> None:
        self.withdrawn: list[tuple[str, str]] = []
        self.ended: list[str] = []
        self.answer: asyncio.Future | None = None
        self.held: list[str] = []

    async def hold(self, command):
        self.held.append(command.request_id)
        self.answer = asyncio.get_running_loop().create_future()
        return await self.answer

    async def end(self, request_id: str) -> None:
        self.ended.append(request_id)

    def withdraw(self, request_id: str, reason: str) -> None:
        self.withdrawn.append((request_id, reason))


def _holding_pump(desk: FakeDesk):
    events: list = []
    client, upstream = FakeTransport("client", events), FakeTransport("upstream", events)
    pump = Pump(
        connection(holds=True),
        client,
        upstream,
        audit=RecordingSink(events),
        approvals=desk,
    )
    pump.start(b"", b"")
    return pump, client, upstream, events


def test_a_disconnect_withdraws_the_held_statements_request():
    async def main():
        desk = FakeDesk()
        pump, client, upstream, events = _holding_pump(desk)
        client.protocol.data_received(wire(m.Query("SELECT * FROM transactions")))
        await asyncio.sleep(0)
        assert desk.held and pump.connection.awaiting_approval == desk.held[0]
        assert not messages(events, "upstream", FrontendParser(expect_startup=False))
        client.protocol.connection_lost(None)
        return desk

    desk = asyncio.run(main())
    (request_id, reason) = desk.withdrawn[0]
    assert request_id == desk.held[0] and "connection ended" in reason


def test_an_approved_statement_runs_and_its_grant_ends_before_the_next():
    from guard.broker.proxy.events import ApprovalDecided

    async def main():
        desk = FakeDesk()
        pump, client, upstream, events = _holding_pump(desk)
        client.protocol.data_received(
            wire(m.Query("SELECT * FROM transactions"), m.Query("SELECT 1"))
        )
        await asyncio.sleep(0)
        desk.answer.set_result(ApprovalDecided(desk.held[0], approved=True))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        sent_while_running = messages(events, "upstream", FrontendParser(expect_startup=False))
        upstream.protocol.data_received(wire(m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))
        for _ in range(3):
            await asyncio.sleep(0)
        return desk, sent_while_running, events

    desk, sent_while_running, events = asyncio.run(main())
    assert sent_while_running == [m.Query("SELECT * FROM transactions")]  # SELECT 1 waits
    assert desk.ended == desk.held
    sent = messages(events, "upstream", FrontendParser(expect_startup=False))
    assert sent == [m.Query("SELECT * FROM transactions"), m.Query("SELECT 1")]


def test_a_message_left_incomplete_is_cut_off_after_the_message_timeout():
    async def main():
        events: list = []
        client, upstream = FakeTransport("client", events), FakeTransport("upstream", events)
        pump = Pump(
            connection(), client, upstream, audit=RecordingSink(events), message_timeout=0.05
        )
        pump.start(b"", b"")
        client.protocol.data_received(encode(m.Query("SELECT 1"))[:6])  # never finished
        await asyncio.wait_for(pump.done, 5)
        return pump, events

    pump, events = asyncio.run(main())
    fatal = messages(events, "client", BackendParser())[-1]
    assert fatal.sqlstate == "08P01" and fatal.severity == "FATAL"
    assert pump.end_reason.startswith("message incomplete")
    assert not messages(events, "upstream", FrontendParser(expect_startup=False))


def test_a_client_is_not_read_while_its_queue_behind_a_held_statement_is_full():
    from guard.broker.proxy.events import ApprovalDecided
    from guard.broker.proxy.pump import QUEUE_LIMIT

    async def main():
        desk = FakeDesk()
        pump, client, upstream, events = _holding_pump(desk)
        client.protocol.data_received(wire(m.Query("SELECT * FROM transactions")))
        await asyncio.sleep(0)
        chunk = wire(m.Query("SELECT 1")) * 4096
        while client.reading:
            client.protocol.data_received(chunk)  # what a client sends while held
        queued = pump.connection.queued_client_bytes
        desk.answer.set_result(ApprovalDecided(desk.held[0], approved=False))
        for _ in range(3):
            await asyncio.sleep(0)
        return client, queued

    client, queued = asyncio.run(main())
    assert QUEUE_LIMIT < queued < QUEUE_LIMIT + 2 * len(wire(m.Query("SELECT 1"))) * 4096
    assert client.reading  # read again once the held statement was settled


# --- durable log: group commit -------------------------------------------------------------


class FakeGroupCommit:
    """Holds what the pump hands over until the test answers it."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.pending: list = []

    def submit(self, records, done, loop) -> None:
        assert loop is asyncio.get_running_loop()
        self.events.append(("submitted", len(records)))
        self.pending.append((records, done))

    def answer(self, result) -> None:
        records, done = self.pending.pop(0)
        self.events.append(("committed", result))
        done(result)


class DurableSink(MemoryAuditSink):
    def __init__(self, events: list) -> None:
        super().__init__()
        self.group_commit = FakeGroupCommit(events)


def durable_pump():
    events: list = []
    client, upstream = FakeTransport("client", events), FakeTransport("upstream", events)
    sink = DurableSink(events)
    pump = Pump(connection(), client, upstream, audit=sink)
    pump.start(b"", b"")
    return pump, client, upstream, sink.group_commit, events


def test_with_a_durable_log_a_statement_waits_for_its_batch():
    def upstream_sent(events):
        return messages(events, "upstream", FrontendParser(expect_startup=False))

    async def main():
        pump, client, upstream, group, events = durable_pump()
        client.protocol.data_received(wire(m.Query("SELECT 1")))
        client.protocol.data_received(wire(m.Query("SELECT 2")))  # queues behind it
        assert events == [("submitted", 1)]  # nothing upstream yet
        group.answer([1])
        # SELECT 1 may go now (the core may also hold it to join SELECT 2's write);
        # SELECT 2 was handed over and waits for its own batch.
        assert events[2] == ("submitted", 1)
        assert m.Query("SELECT 2") not in upstream_sent(events)
        group.answer([2])
        return events

    events = asyncio.run(main())
    assert upstream_sent(events) == [m.Query("SELECT 1"), m.Query("SELECT 2")]


def test_a_failed_batch_refuses_the_statement(caplog):
    async def main():
        pump, client, upstream, group, events = durable_pump()
        client.protocol.data_received(wire(m.Query("SELECT 1")))
        with caplog.at_level(logging.ERROR, logger="guard.proxy"):
            group.answer(AuditUnavailable("cannot write audit log /x: [Errno 28] No space"))
        return events

    events = asyncio.run(main())
    (sent,) = messages(events, "upstream", FrontendParser(expect_startup=False))
    assert sent.sql.startswith("guard_refused_")  # the statement itself never went
    assert "statement refused (connection c1)" in caplog.text


def test_an_answer_after_the_connection_ended_forwards_nothing():
    async def main():
        pump, client, upstream, group, events = durable_pump()
        client.protocol.data_received(wire(m.Query("SELECT 1")))
        client.protocol.connection_lost(None)
        group.answer([1])
        return events

    events = asyncio.run(main())
    assert not messages(events, "upstream", FrontendParser(expect_startup=False))


def test_connections_writing_together_share_one_fsync(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, fsync=True)

    async def main():
        events: list = []
        pumps = []
        for _ in range(3):
            client, upstream = FakeTransport("client", events), FakeTransport("upstream", events)
            pump = Pump(connection(), client, upstream, audit=sink)
            pump.start(b"", b"")
            pumps.append((client, upstream))
        for client, _ in pumps:  # one event-loop iteration
            client.protocol.data_received(wire(m.Query("SELECT 1")))
        assert not events  # nothing forwarded before the batch's fsync
        for _ in range(10_000):
            if len(events) == 3:
                break
            await asyncio.sleep(0.001)
        return events, path.read_bytes().count(b'"kind":"statement"')

    events, written = asyncio.run(main())
    assert [who for who, _ in events] == ["upstream"] * 3 and written == 3
    assert sink.group_commit is not None
    assert (sink.group_commit.batches, sink.group_commit.records) == (1, 3)
    sink.close()
