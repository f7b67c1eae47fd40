"""The compiled connection core (`proxy._cconnection`, Cython) against its reference
(`proxy.connection`): the same traffic gives the same commands and the same audit records,
whatever the traffic (the session fuzzer's garbage, reordering and segmentation included).
And `proxy.core` runs the twin only when it was built from the connection.py beside it."""

from __future__ import annotations

import itertools
import logging
import os
import re
import types
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from guard.broker.audit.sink import MemoryAuditSink
from guard.broker.masking.strategies import get_strategy
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.proxy import connection as reference
from guard.broker.proxy import core
from guard.broker.proxy import names as names_reference
from guard.broker.proxy import pump as pump_reference
from guard.broker.proxy.commands import (
    CloseConnection,
    Command,
    EndApproval,
    Log,
    RequestApproval,
    SendToClient,
    SendToServer,
)
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.proxy.protected import ProtectedColumnMap
from guard.broker.proxy.state import State
from tests import playbook
from tests.proxy.test_session_fuzz import chunk, server_chunk

try:
    from guard.broker.proxy import _cconnection
except ImportError:  # no Cython or no compiler at install time
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            "guard.broker.proxy._cconnection was not built (CI=true: a failure)", pytrace=False
        )
    pytest.skip("guard.broker.proxy._cconnection was not built", allow_module_level=True)

# Fresh random names the gateway makes: its poison statement's nonce
# (`connection._poison_sql`) and a held statement's approval request id.
_NONCE = re.compile(rb"guard_refused_[0-9a-f]{8}")
_REQUEST = re.compile(rb"(request |approve )[0-9a-f]{12}")


def _seen(cmd: Any) -> tuple[Any, ...]:
    """What a command says, with the random names made comparable."""
    if isinstance(cmd, SendToServer | SendToClient):
        data = _NONCE.sub(b"guard_refused_*", bytes(cmd.data))
        return (type(cmd).__name__, _REQUEST.sub(rb"\1*", data))
    if isinstance(cmd, Log):
        return ("Log", cmd.level, _REQUEST.sub(rb"\1*", cmd.message.encode()))
    if isinstance(cmd, CloseConnection):
        return ("Close", cmd.reason)
    if isinstance(cmd, RequestApproval):
        return ("RequestApproval", cmd.protocol, tuple(cmd.seqs), cmd.decision.hold)
    if isinstance(cmd, EndApproval):
        return ("EndApproval",)
    raise AssertionError(f"a command the core should not give here: {cmd!r}")


def _holds_nothing_as_its_parsers_say(conn: Any) -> None:
    """The core frames a read itself while its note says the parser holds nothing: the note
    must be the parser's own answer (or a read would be framed without what came before
    it), and so must `partial_message`, which the shell times incomplete messages by."""
    assert conn._front_empty == (conn._frontend.buffered == 0)
    assert conn._back_empty == (conn._backend.buffered == 0)
    relaying = conn.state is State.RELAYING
    assert conn.partial_message == (relaying and conn._frontend.buffered > 0)


def _event(driver: playbook.Driver, side: str, data: bytes) -> list[Command]:
    """What the shell tells the core besides bytes (an approval's outcome, the end of its
    grant, a timer, an EOF), done as the shell would."""
    conn = driver.connection
    if side == "approve" or side == "deny":
        held = conn.held_request
        if held is None or conn.awaiting_approval is None:
            return []
        error = None if side == "approve" else m.ErrorResponse.build("42501", "denied")
        decided = ApprovalDecided(held, side == "approve", error, per_statement=data == b"1")
        return driver._shell(conn.approval_decided(decided))
    if side == "grant ended":
        held = conn.held_request
        return [] if held is None else driver._shell(conn.approval_ended(held))
    if side == "idle":
        return driver._shell(conn.idle_for(float(data)))
    if side == "incomplete":
        return driver._shell(conn.incomplete_for(float(data)))
    return driver._shell(conn.client_eof() if side == "client eof" else conn.server_eof())


def _drive(conn: Any, steps: list[tuple[str, list[bytes]]], inline: bool) -> tuple:
    """Feed `steps` to `conn` (each side's bytes as the reads they come in; an event's
    argument alone), with the shell's audit duties done at once (failing while a step says
    so); everything it said, and the audit records. `inline`: statement records go through
    the core's `recorder` (None while the sink fails, so the core pauses for a WriteAudit
    then, which fails), as the pump's sink hot path does, and result records through its
    `result_recorder`, which declines every other call (those come as RecordResults, as
    without it)."""
    audit = MemoryAuditSink()
    if inline:
        conn.recorder = lambda records: None if audit.fail else audit.append_statements(records)
        calls = itertools.count()

        def result_recorder(results: list[tuple[Any, ...]]) -> bool:
            if next(calls) % 2 or audit.fail:  # a failing sink's hot path declines
                return False
            audit.append_results(results)
            return True

        conn.result_recorder = result_recorder
    driver = playbook.Driver(conn, audit)
    said: list[tuple[Any, ...]] = []
    for side, pieces in steps:
        if side == "audit":
            audit.fail = pieces[0] == b"fail"
            continue
        if side in ("c", "s"):
            feed = driver.from_client if side == "c" else driver.from_server
            for piece in pieces:
                said += [_seen(c) for c in feed(piece)]
                _holds_nothing_as_its_parsers_say(conn)
        else:
            said += [_seen(c) for c in _event(driver, side, pieces[0])]
            _holds_nothing_as_its_parsers_say(conn)
        said.append(("state", int(conn.state), driver.closed))
    records = [{k: v for k, v in r.items() if k != "time"} for r in audit.records]
    return said, records


def _run(
    build: type,
    steps: list[tuple[str, bytes]],
    split: int,
    holds: bool,
    eager: bool,
    inline: bool = False,
) -> tuple:
    """`_drive` a connection of `build` (the playbook's), each side's bytes read `split`
    at a time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(playbook, "GatewayConnection", build)
        conn = playbook.connection(holds=holds, audit_answers_later=eager)
    reads = [
        (side, [data[i : i + split] for i in range(0, len(data), split)])
        if side in ("c", "s")
        else (side, [data])
        for side, data in steps
    ]
    return _drive(conn, reads, inline)


# A statement the policy holds for approval (with holds on), so approvals get decided.
_HELD = ("c", encode(m.Query("SELECT * FROM transactions")))
_ANSWER = (
    "s",
    b"".join(
        encode(x)
        for x in (m.RowDescription(()), m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I"))
    ),
)
_step = st.one_of(
    st.just(_HELD),
    chunk.map(lambda c: ("c", c)),
    server_chunk.map(lambda c: ("s", c)),
    st.sampled_from(
        [
            ("audit", b"fail"),
            ("audit", b"ok"),
            ("approve", b"1"),
            ("approve", b"0"),
            ("deny", b"1"),
            ("grant ended", b""),
            ("idle", b"3600"),
            ("incomplete", b"120"),
            ("client eof", b""),
            ("server eof", b""),
        ]
    ),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_step, max_size=16),
    st.integers(min_value=1, max_value=48),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
@example([_HELD, ("deny", b"1"), _HELD, ("approve", b"0")], 48, True, False, False)
@example([_HELD, ("approve", b"1"), _ANSWER, ("grant ended", b""), _HELD], 7, True, True, True)
def test_the_compiled_core_says_what_the_reference_says(steps, split, holds, eager, inline):
    assert _run(_cconnection.GatewayConnection, steps, split, holds, eager, inline) == _run(
        reference.GatewayConnection, steps, split, holds, eager, inline
    )


def _relayed(said: list[tuple[Any, ...]]) -> tuple[bytes, bytes, list[tuple[Any, ...]]]:
    """What reached each side, as byte streams (how it was cut into writes aside), and
    everything else the core said."""
    up = b"".join(x[1] for x in said if x[0] == "SendToServer")
    down = b"".join(x[1] for x in said if x[0] == "SendToClient")
    rest = [x for x in said if x[0] not in ("SendToServer", "SendToClient", "state")]
    return up, down, rest


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, max_size=16), st.integers(min_value=1, max_value=48), st.booleans())
def test_statements_recorded_at_once_relay_what_paused_ones_relay(steps, split, holds):
    # The recorders only save the pause and the RecordResults: the same bytes reach each
    # side, the same records are written, and the same approvals, logs and closes happen.
    paused, records = _run(reference.GatewayConnection, steps, split, holds, False)
    at_once, records_at_once = _run(reference.GatewayConnection, steps, split, holds, False, True)
    assert _relayed(at_once) == _relayed(paused)
    assert records_at_once == records


class _General(reference.GatewayConnection):
    """The reference without its express lane: every read takes the general path."""

    def _express_request(self, data: bytes) -> None:
        return None

    def _express_answer(self, data: bytes) -> bool:
        return False


_SELECT_1 = ("c", encode(m.Query("SELECT 1")))
_ONE_ROW = (
    "s",
    b"".join(
        encode(x)
        for x in (
            m.RowDescription((m.FieldDescription("?column?", 0, 0, 23, 4, -1, 0),)),
            m.DataRow((b"1",)),
            m.CommandComplete("SELECT 1"),
            m.ReadyForQuery(b"I"),
        )
    ),
)


def _extended(described: str = "") -> tuple[str, bytes]:
    """The unnamed statement parsed, bound, a portal described (the one run, by default)
    and run: pgbench -M extended."""
    batch = (
        m.Parse("", "SELECT 1", ()),
        m.Bind("", "", (), (), ()),
        m.Describe(b"P", described),
        m.Execute("", 0),
        m.Sync(),
    )
    return ("c", playbook.wire(*batch))


# The extended protocol's steady states: a statement parsed, bound, described and run,
# and a prepared one bound and run (-M prepared), with their answers.
_EXTENDED = _extended()
_PREPARE = ("c", playbook.wire(m.Parse("s1", "SELECT 1", ()), m.Sync()))
_PREPARED = ("c", playbook.wire(m.Bind("", "s1", (), (), ()), m.Execute("", 0), m.Sync()))
_ROW = playbook.wire(m.DataRow((b"1",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
_EXTENDED_ROW = (
    "s",
    playbook.wire(m.ParseComplete(), m.BindComplete()) + _ONE_ROW[1],
)
_PREPARED_ROW = ("s", playbook.wire(m.BindComplete()) + _ROW)
# A server out of step: a RowDescription of a masked column nobody asked for (its mask
# plan then applies to the rows that follow), and a ReadyForQuery without a Sync.
_STRAY_MASKED_T = (
    "s",
    encode(m.RowDescription((playbook.field("ssn", playbook.CUSTOMERS_OID, playbook.SSN_ATTNUM),))),
)
_ERROR_READY = (
    "s",
    playbook.wire(m.ErrorResponse.build("42P01", "no such table"), m.ReadyForQuery(b"I")),
)
_UNSYNCED = ("c", _EXTENDED[1][: -len(encode(m.Sync()))] + encode(m.Flush()))
_PREPARE_DONE = ("s", playbook.wire(m.ParseComplete(), m.ReadyForQuery(b"I")))
# The client lane's other cases: a prepared statement described; one bound while another
# is parsed; a statement nobody prepared; another portal run than the one bound; rows to
# mask; a statement held for approval; another portal described.
_BOUND = (m.Bind("", "s1", (), (), ()),)
_RUN = (m.Execute("", 0), m.Sync())
_PARSED_AND_BOUND = (
    "c",
    playbook.wire(m.Parse("s2", "SELECT name FROM products", ()), *_BOUND, *_RUN),
)
# Statements prepared under a name, then bound and run: one held for approval, and one
# with a column to mask, its result asked for in binary (the Bind's formats matter).
_PREPARE_HELD = ("c", playbook.wire(m.Parse("h1", "SELECT * FROM transactions", ()), m.Sync()))
_RUN_HELD = ("c", playbook.wire(m.Bind("", "h1", (), (), ()), *_RUN))
_PREPARE_MASKED = ("c", playbook.wire(m.Parse("m1", "SELECT ssn FROM customers", ()), m.Sync()))
_SSN = playbook.field("ssn", playbook.CUSTOMERS_OID, playbook.SSN_ATTNUM, type_oid=20)  # int8
_MASKED_DESCRIBED = (
    "s",
    playbook.wire(
        m.ParseComplete(),
        m.ParameterDescription(()),
        m.RowDescription((_SSN,)),
        m.ReadyForQuery(b"I"),
    ),
)
_RUN_MASKED = ("c", playbook.wire(m.Bind("", "m1", (), (), (1,)), *_RUN))
_MASKED_ROW = (
    "s",
    playbook.wire(
        m.BindComplete(),
        m.DataRow(((123456789).to_bytes(8, "big"),)),
        m.CommandComplete("SELECT 1"),
        m.ReadyForQuery(b"I"),
    ),
)
_extended_cases = st.sampled_from(
    [
        ("c", playbook.wire(*_BOUND, m.Describe(b"S", "s1"), *_RUN)),
        _PARSED_AND_BOUND,
        ("c", playbook.wire(m.Bind("", "nope", (), (), ()), *_RUN)),
        ("c", playbook.wire(m.Bind("p1", "s1", (), (), ()), m.Execute("p2", 0), m.Sync())),
        (
            "c",
            playbook.wire(
                m.Parse("", "SELECT ssn FROM customers", ()),
                m.Bind("", "", (), (), ()),
                m.Describe(b"P", ""),
                *_RUN,
            ),
        ),
        ("c", playbook.wire(m.Parse("", "SELECT * FROM transactions", ()), *_BOUND, *_RUN)),
        _extended(described="p9"),
        _PREPARE_HELD,
        _RUN_HELD,
        _PREPARE_MASKED,
        _RUN_MASKED,
    ]
)

# Runs of the steady states (a plain Query, its answer; the extended protocol's), between
# anything else.
_steady = st.lists(
    st.one_of(
        st.lists(st.sampled_from([_SELECT_1, _ONE_ROW]), min_size=2, max_size=6),
        st.lists(st.sampled_from([_EXTENDED, _EXTENDED_ROW]), min_size=2, max_size=6),
        st.lists(
            st.sampled_from([_PREPARE, _PREPARE_DONE, _PREPARED, _PREPARED_ROW]),
            min_size=2,
            max_size=8,
        ),
        st.lists(
            st.one_of(
                st.sampled_from([_PREPARE, _PREPARE_DONE, _PREPARED_ROW, _EXTENDED_ROW]),
                _extended_cases,
            ),
            min_size=2,
            max_size=8,
        ),
        st.lists(_step, min_size=1, max_size=3),
    ),
    max_size=5,
).map(lambda runs: [step for run in runs for step in run])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _steady,
    st.integers(min_value=1, max_value=128),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
@example([_SELECT_1, _ONE_ROW, _SELECT_1, _ONE_ROW, _SELECT_1, _ONE_ROW], 64, False, False, True)
@example([_EXTENDED, _EXTENDED_ROW] * 3, 128, False, False, True)
@example([_PREPARE, _PREPARE_DONE, *[_PREPARED, _PREPARED_ROW] * 3], 128, False, False, True)
@example(
    [_EXTENDED, _EXTENDED_ROW, _EXTENDED, _STRAY_MASKED_T, _EXTENDED_ROW], 128, False, False, True
)
@example(
    [_EXTENDED, _EXTENDED_ROW, _UNSYNCED, _EXTENDED, _EXTENDED_ROW, _EXTENDED_ROW],
    128,
    False,
    False,
    True,
)
@example([_SELECT_1, _ONE_ROW, _SELECT_1, ("audit", b"fail"), _SELECT_1], 64, False, False, True)
@example([_PREPARE_HELD, _PREPARE_DONE, _RUN_HELD, _PREPARED_ROW], 128, True, False, True)
@example(
    [_PREPARE, _PREPARE_DONE, *[_PARSED_AND_BOUND, _EXTENDED_ROW] * 2], 128, False, False, True
)
@example([_PREPARE_MASKED, _MASKED_DESCRIBED, _RUN_MASKED, _MASKED_ROW], 128, False, False, True)
@example([_SELECT_1, _SELECT_1, _ONE_ROW, _ONE_ROW, _HELD, _SELECT_1], 64, True, True, False)
# The extended transaction kept in `_tx` while its answer is out: a watchdog's idle check, a
# request pipelined behind it, an error for an answer, the client's EOF.
@example([_EXTENDED, _EXTENDED_ROW, _EXTENDED, ("idle", b"3600")], 128, False, False, True)
@example(
    [_PREPARE, _PREPARE_DONE, _PREPARED, _PREPARED, _PREPARED_ROW, _PREPARED_ROW, _SELECT_1],
    128,
    False,
    False,
    True,
)
@example([_EXTENDED, _EXTENDED_ROW, _EXTENDED, _ERROR_READY, _EXTENDED], 128, False, False, True)
@example(
    [_EXTENDED, _EXTENDED_ROW, _EXTENDED, ("client eof", b""), _EXTENDED_ROW],
    128,
    False,
    False,
    True,
)
def test_the_express_lane_says_what_the_general_path_says(steps, split, holds, eager, inline):
    # The steady state's short cuts (`_express_request`) give the commands and records the
    # general path gives, whatever came before (pauses, refusals, failing audit, garbage).
    assert _run(reference.GatewayConnection, steps, split, holds, eager, inline) == _run(
        _General, steps, split, holds, eager, inline
    )


def _recording(build: type) -> tuple[Any, MemoryAuditSink]:
    """A connection of `build` whose records go to a memory sink as the pump's hot path
    takes them (at once, without a WriteAudit or a RecordResults)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(playbook, "GatewayConnection", build)
        conn = playbook.connection()
    audit = MemoryAuditSink()
    conn.recorder = audit.append_statements
    conn.result_recorder = lambda results: audit.append_results(results) or True
    return conn, audit


@pytest.mark.parametrize("build", [reference.GatewayConnection, _cconnection.GatewayConnection])
def test_the_express_lanes_relay_a_plain_query_and_its_answer_as_they_were_read(build):
    # What makes the steady state cheap, and the test above not vacuous: each read itself
    # goes on (no framed copies), the Query recorded first, once the decision's records
    # exist, and the answer's result recorded, once its caches hold its messages.
    conn, audit = _recording(build)
    query = encode(m.Query("SELECT 1"))
    for run in range(3):
        read = bytes(bytearray(query))  # a fresh object each time, as a socket gives
        (cmd,) = conn.from_client(read)
        assert type(cmd) is SendToServer and cmd.data == query
        assert (cmd.data is read) == (run > 0)  # the first one made the records
        answer = bytes(bytearray(_ONE_ROW[1]))
        (cmd,) = conn.from_server(answer)
        assert type(cmd) is SendToClient and cmd.data == answer
        assert (cmd.data is answer) == (run > 0)  # the first one filled the caches
        assert [r["kind"] for r in audit.records] == ["statement", "result"] * (run + 1)
    assert conn.idle


@pytest.mark.parametrize("build", [reference.GatewayConnection, _cconnection.GatewayConnection])
def test_the_express_lanes_relay_an_extended_request_as_it_was_read(build):
    # pgbench -M extended's request, and -M prepared's after its Parse (which made the
    # decision's records): the read itself goes upstream, the Execute recorded first, and
    # the answer comes back as read once its caches hold its messages; the name tables
    # hold what the general path leaves in them.
    conn, audit = _recording(build)
    (cmd,) = conn.from_client(_PREPARE[1])
    conn.from_server(_PREPARE_DONE[1])
    for run in range(4):
        for request, answer in ((_EXTENDED[1], _EXTENDED_ROW[1]), (_PREPARED[1], _PREPARED_ROW[1])):
            read = bytes(bytearray(request))
            if run == 3:  # the shell's call: the read itself, for it to write
                assert conn.relay_from_client(read) is read
                read = bytes(bytearray(answer))
                assert conn.relay_from_server(read) is read
                continue
            (cmd,) = conn.from_client(read)
            assert type(cmd) is SendToServer and cmd.data == request
            assert cmd.data is read
            assert (
                conn.names.portals[""].prepared
                is conn.names.statements["" if request is _EXTENDED[1] else "s1"]
            )
            read = bytes(bytearray(answer))
            (cmd,) = conn.from_server(read)
            assert type(cmd) is SendToClient and cmd.data == answer
            assert (cmd.data is read) == (run > 0 or request is _PREPARED[1])
    kinds = [r["kind"] for r in audit.records]
    assert kinds == ["statement", "result"] * 8
    assert conn.idle


_VIEW_OID = 16500  # a masking view whose column 2 is a masked column
_VIEW_ROWS = 2


def _answer(*fields: Any, rows: int = 1, width: int = 4) -> bytes:
    return playbook.wire(
        m.RowDescription(tuple(fields)),
        *[m.DataRow((b"x" * width,) * len(fields))] * rows,
        m.CommandComplete(f"SELECT {rows}"),
        m.ReadyForQuery(b"I"),
    )


def _said_with_view_columns(build: type) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """Traffic the fuzzers' connection cannot make: results of masking views (counted
    cells), a masked base column whose rows come in two reads (the plan carried over),
    and a row over the connection's size limit."""
    protected = ProtectedColumnMap(
        {(playbook.CUSTOMERS_OID, playbook.SSN_ATTNUM): get_strategy("ssn_last4")}
    )
    protected.view_columns = frozenset({(_VIEW_OID, 2)})
    gate = playbook.alice_gate()
    conn = build(gate, protected=protected, client_user="guard_s1", max_message_size=512)
    audit = MemoryAuditSink()
    driver = playbook.Driver(conn, audit)
    conn.recorder = audit.append_statements
    conn.result_recorder = lambda results: audit.append_results(results) or True
    viewed = playbook.field("ssn", _VIEW_OID, 2)
    masked = playbook.field("ssn", playbook.CUSTOMERS_OID, playbook.SSN_ATTNUM)
    plain = playbook.field("n", 16600, 1)
    answer = _answer(masked, rows=_VIEW_ROWS)  # its CommandComplete seen before
    first_row = 1 + int.from_bytes(answer[1:5], "big")  # after the RowDescription
    split = first_row + 1 + int.from_bytes(answer[first_row + 1 : first_row + 5], "big")
    bound = playbook.wire(m.ParseComplete(), m.BindComplete())
    first_view_row = 1 + int.from_bytes(_answer(viewed, plain)[1:5], "big")
    steps = [
        *[("c", encode(m.Query("SELECT 1"))), ("s", _answer(viewed, plain, rows=_VIEW_ROWS))] * 3,
        ("c", encode(m.Query("SELECT 1"))),
        ("s", answer[:split]),
        ("s", answer[split:]),
        # The extended protocol: the described portal's view columns, three times.
        *[_EXTENDED, ("s", bound + _answer(viewed, plain, rows=_VIEW_ROWS))] * 3,
        # Another portal described than the one run: the run counts its own (none).
        _extended(described="p9"),
        ("s", bound + _answer(viewed, rows=_VIEW_ROWS)),
        # A statement with a masked column, prepared (the gateway describes it itself),
        # then run twice without a Describe: its rows are masked by the statement's plan.
        ("c", playbook.wire(m.Parse("m1", "SELECT ssn FROM customers", ()), m.Sync())),
        (
            "s",
            playbook.wire(
                m.ParseComplete(),
                m.ParameterDescription(()),
                m.RowDescription((masked,)),
                m.ReadyForQuery(b"I"),
            ),
        ),
        *[
            ("c", playbook.wire(m.Bind("", "m1", (), (), ()), m.Execute("", 0), m.Sync())),
            ("s", playbook.wire(m.BindComplete()) + answer[first_row:]),
        ]
        * 2,
        # A statement described by name, then run without a Describe: the run counts the
        # view columns the statement's description holds.
        ("c", playbook.wire(m.Parse("v1", "SELECT 1", ()), m.Sync())),
        ("s", playbook.wire(m.ParseComplete(), m.ReadyForQuery(b"I"))),
        *[
            (
                "c",
                playbook.wire(
                    m.Bind("", "v1", (), (), ()), m.Describe(b"S", "v1"), m.Execute("", 0), m.Sync()
                ),
            ),
            (
                "s",
                playbook.wire(m.BindComplete(), m.ParameterDescription(()))
                + _answer(viewed, plain, rows=_VIEW_ROWS),
            ),
            ("c", playbook.wire(m.Bind("", "v1", (), (), ()), m.Execute("", 0), m.Sync())),
            (
                "s",
                playbook.wire(m.BindComplete())
                + _answer(viewed, plain, rows=_VIEW_ROWS)[first_view_row:],
            ),
        ]
        * 2,
        ("c", encode(m.Query("SELECT 1"))),
        ("s", _answer(plain, rows=2, width=600)),
    ]
    said: list[tuple[Any, ...]] = []
    for side, data in steps:
        feed = driver.from_client if side == "c" else driver.from_server
        said += [_seen(c) for c in feed(data)]
        said.append(("state", int(conn.state)))
    return said, [{k: v for k, v in r.items() if k != "time"} for r in audit.records]


def test_the_express_lanes_count_and_mask_as_the_general_path():
    said, records = _said_with_view_columns(_General)
    assert _said_with_view_columns(reference.GatewayConnection) == (said, records)
    assert _said_with_view_columns(_cconnection.GatewayConnection) == (said, records)
    results = [r for r in records if r["kind"] == "result"]
    assert [r["view_masked_cells"] for r in results[:3]] == [_VIEW_ROWS] * 3
    assert results[3]["masked_cells"] == _VIEW_ROWS
    assert [r["view_masked_cells"] for r in results[4:8]] == [_VIEW_ROWS] * 3 + [0]
    assert [r["masked_cells"] for r in results[8:10]] == [_VIEW_ROWS] * 2
    assert [r["view_masked_cells"] for r in results[10:14]] == [_VIEW_ROWS] * 4
    assert said[-1] == ("state", int(State.CLOSED))  # the row over the limit


def test_the_twin_is_built_with_its_declarations():
    # connection.pxd was applied (setup.py's include_path): an extension type whose fields
    # are C slots, not a plain class with a __dict__, which is what makes the twin faster.
    assert _cconnection.GatewayConnection.__dictoffset__ == 0
    assert not hasattr(_cconnection.GatewayConnection, "_flush")  # a C method


def test_the_twin_runs_unless_pure_python_is_asked():
    pure = os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0")
    expected = reference.GatewayConnection if pure else _cconnection.GatewayConnection
    assert core.GatewayConnection is expected
    assert core.COMPILED is not pure


def test_the_shells_twin_is_built_with_its_declarations_and_runs_unless_pure_python_is_asked():
    from guard.broker.proxy import _cpump

    # pump.pxd was applied: extension types, a side's pump typed, the per-read methods C.
    assert _cpump.Pump.__dictoffset__ == 0 and _cpump._Side.__dictoffset__ == 0
    assert not hasattr(_cpump.Pump, "_write_audit")  # a C method
    pure = os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0")
    assert core.Pump is (pump_reference.Pump if pure else _cpump.Pump)
    assert core.PUMP_COMPILED is not pure


def test_the_cores_twin_runs_on_the_name_tables_twin():
    from guard.broker.proxy import _cnames

    # names.pxd was applied (extension types, `parse` and `bind` C methods), and the
    # core's twin is built against it (setup.py rewrites its import in the twin's copy
    # only; connection.pxd cimports its types, to read their fields as C members).
    assert _cnames.Prepared.__dictoffset__ == 0 and _cnames.NameTables.__dictoffset__ == 0
    for build, tables in (
        (_cconnection.GatewayConnection, _cnames.NameTables),
        (reference.GatewayConnection, names_reference.NameTables),
    ):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(playbook, "GatewayConnection", build)
            assert type(playbook.connection().names) is tables


@pytest.mark.parametrize(
    "reference_module, name, source",
    [
        (reference, "guard.broker.proxy._cconnection", "connection.py"),
        (pump_reference, "guard.broker.proxy._cpump", "pump.py"),
        (names_reference, "guard.broker.proxy._cnames", "names.py"),
    ],
)
def test_a_twin_built_from_another_source_is_not_run(
    monkeypatch, caplog, reference_module, name, source
):
    stale = types.SimpleNamespace(SOURCE_SHA256="0" * 64)
    monkeypatch.setattr(core, "compiled_module", lambda name: stale)
    with caplog.at_level(logging.WARNING, logger="guard.proxy"):
        assert core._twin(reference_module, name, "core") is None
    assert f"built from another proxy/{source}" in caplog.text
    assert "./scripts/bootstrap" in caplog.text


def test_a_twin_built_from_the_source_beside_it_is_run(monkeypatch):
    monkeypatch.setattr(core, "compiled_module", lambda name: _cconnection)
    assert core._twin(reference, "guard.broker.proxy._cconnection", "core") is _cconnection


def test_without_the_source_to_check_it_against_the_twin_is_not_run(monkeypatch, tmp_path):
    monkeypatch.setattr(core, "compiled_module", lambda name: _cconnection)
    missing = types.SimpleNamespace(__file__=str(tmp_path / "connection.py"))
    assert core._twin(missing, "guard.broker.proxy._cconnection", "core") is None  # type: ignore[arg-type]
