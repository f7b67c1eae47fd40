"""The sans-IO gateway core, as exact dialogues: events in, every command out, in order.

No sockets: the real codec, analyser and demo policy (see `tests.playbook`). Each test says
what the client sends, what the audit log and upstream answer, and the exact commands that
must come out of each event — nothing more, nothing in another order. In particular every
statement's `WriteAudit` comes out, and is answered, before the command that forwards it.
"""

from __future__ import annotations

from typing import Any

import pytest

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.proxy.commands import Log
from guard.broker.proxy.connection import State
from guard.broker.proxy.gate import Gate
from tests.playbook import (
    ALICE,
    CUSTOMERS_OID,
    DOB_ATTNUM,
    DRIFT,
    POLICY,
    SSN_ATTNUM,
    Audit,
    AuditFailed,
    AuditWritten,
    ClientEOF,
    ClientSends,
    Close,
    Decided,
    Error,
    GrantEnded,
    GrantEnds,
    Held,
    IdleFor,
    IncompleteFor,
    Logged,
    Notice,
    Placeholder,
    Playbook,
    Results,
    ServerEOF,
    ServerSends,
    ToClient,
    ToServer,
    connection,
    field,
    make,
    poison,
    wire,
)

READY = m.ReadyForQuery(b"I")
SSN = field("ssn", CUSTOMERS_OID, SSN_ATTNUM)


def test_allowed_query_is_recorded_before_it_is_forwarded():
    sql = "SELECT full_name FROM customers WHERE id = 1"
    names = m.RowDescription((field("full_name"),))
    row = m.DataRow((b"Alice Anderson",))
    assert (
        Playbook()
        >> ClientSends(m.Query(sql))
        << Audit(
            {
                "kind": "statement",
                "verdict": "allow",
                "principal": "alice-sub",
                "protocol": "simple",
                "statement": "SELECT full_name FROM customers WHERE id = $1",  # no literal
            }
        )
        >> AuditWritten()
        << ToServer(m.Query(sql))
        >> ServerSends(names, row, m.CommandComplete("SELECT 1"), READY)
        << ToClient(names, row, m.CommandComplete("SELECT 1"), READY)
        << Results({"statement_seq": 1, "outcome": "ok", "command_tag": "SELECT", "rows": 1})
    )


def test_refused_query_is_replaced_by_poison_and_error_swapped():
    p = poison()
    assert (
        Playbook()
        >> ClientSends(m.Query("DROP TABLE customers"))
        << Audit({"verdict": "deny", "rule": "deny-ddl"})
        >> AuditWritten()
        << ToServer(m.Query(p))  # never the client's statement
        >> ServerSends(m.ErrorResponse.build("42601", "syntax error"), READY)
        << ToClient(Error("42501", "deny-ddl"), READY)
    )


def test_gated_table_refusal_mentions_approval():
    assert (
        Playbook()
        >> ClientSends(m.Query("SELECT * FROM transactions"))
        << Audit({"verdict": "require_approval"})
        >> AuditWritten()
        << ToServer(m.Query(poison()))
        >> ServerSends(m.ErrorResponse.build("42601", "syntax error"), READY)
        << ToClient(Error("42501", "approval"), READY)
    )


def test_refused_parse_in_pipeline_keeps_order_and_discards_until_sync():
    # The allowed statement is recorded at its Execute, the refusal at its Parse; the
    # portal bound from the refused statement is refused too (26000), never run.
    refused_parse, stray_name, stray_text = poison(), poison(), poison()
    assert (
        Playbook()
        >> ClientSends(
            m.Parse("", "SELECT 1", ()),
            m.Bind("", "", (), (), ()),
            m.Execute("", 0),
            m.Parse("s2", "DELETE FROM products", ()),
            m.Bind("", "s2", (), (), ()),
            m.Execute("", 0),
            m.Sync(),
        )
        << Audit({"verdict": "allow", "protocol": "extended"})
        >> AuditWritten()
        << Audit({"verdict": "deny", "rule": "guardrail:delete-without-where"})
        >> AuditWritten()
        << ToServer(
            m.Parse("", "SELECT 1", ()),
            m.Bind("", "", (), (), ()),
            m.Execute("", 0),
            m.Parse("s2", refused_parse, ()),
            m.Bind("", "s2", (), (), ()),
            m.Parse(stray_name, stray_text, ()),
            m.Sync(),
        )
        >> ServerSends(
            m.ParseComplete(),
            m.BindComplete(),
            m.DataRow((b"1",)),
            m.CommandComplete("SELECT 1"),
            m.ErrorResponse.build("42601", "syntax error"),
            READY,
        )
        << ToClient(
            m.ParseComplete(),
            m.BindComplete(),
            m.DataRow((b"1",)),
            m.CommandComplete("SELECT 1"),
            Error("42501", "delete-without-where"),
            READY,
        )
        << Results({"statement_seq": 1, "outcome": "ok", "rows": 1})
    )


def test_protected_base_column_in_stream_is_masked_text():
    sql = "SELECT full_name, ssn FROM customers"
    columns = m.RowDescription((field("full_name", CUSTOMERS_OID, 2), SSN))
    assert (
        Playbook()
        >> ClientSends(m.Query(sql))
        << Audit({"verdict": "allow", "masked_columns": ["public.customers.ssn"]})
        >> AuditWritten()
        << ToServer(m.Query(sql))
        >> ServerSends(
            columns,
            m.DataRow((b"Alice Anderson", b"123-45-6789")),
            m.DataRow((b"Bob", None)),
            m.CommandComplete("SELECT 2"),
            READY,
        )
        << DRIFT  # the database should have masked it: the stream check did
        << ToClient(
            columns,
            m.DataRow((b"Alice Anderson", b"***-**-6789")),
            m.DataRow((b"Bob", None)),  # NULL stays NULL, row count unchanged
            m.CommandComplete("SELECT 2"),
            READY,
        )
        << Results({"rows": 2, "masked_cells": 1})
    )


def test_extended_execute_without_describe_is_masked_binary():
    # The gateway asks for the statement's description itself, and swallows the answer
    # the client never asked for; rows of the Execute are masked in binary format. The
    # second time the text's decision is cached: it is still described (its Parse does not
    # take the steady state's short cut, `Decision.extended_records`).
    sql = "SELECT ssn, dob FROM customers WHERE id = $1"
    dob_2001_07_04 = (366 + 31 + 28 + 31 + 30 + 31 + 30 + 3).to_bytes(4, "big", signed=True)
    dob_2001_01_01 = (366).to_bytes(4, "big", signed=True)
    dob = field("dob", CUSTOMERS_OID, DOB_ATTNUM, type_oid=1082)
    playbook = Playbook()
    for _ in range(2):
        _describes_and_masks(playbook, sql, dob, dob_2001_07_04, dob_2001_01_01)


def _describes_and_masks(
    playbook: Playbook, sql: str, dob: Any, dob_2001_07_04: bytes, dob_2001_01_01: bytes
) -> None:
    assert (
        playbook
        >> ClientSends(
            m.Parse("", sql, ()), m.Bind("", "", (), (b"1",), (1,)), m.Execute("", 0), m.Sync()
        )
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(
            m.Parse("", sql, ()),
            m.Describe(b"S", ""),
            m.Bind("", "", (), (b"1",), (1,)),
            m.Execute("", 0),
            m.Sync(),
        )
        >> ServerSends(
            m.ParseComplete(),
            m.ParameterDescription((23,)),
            m.RowDescription((SSN, dob)),
            m.BindComplete(),
            m.DataRow((b"123-45-6789", dob_2001_07_04)),
            m.CommandComplete("SELECT 1"),
            READY,
        )
        << ToClient(
            m.ParseComplete(),
            m.BindComplete(),
            m.DataRow((b"***-**-6789", dob_2001_01_01)),
            m.CommandComplete("SELECT 1"),
            READY,
        )
        << Results({"rows": 1, "masked_cells": 2})
    )


def test_unwritable_audit_refuses_the_statement_and_the_connection_goes_on():
    playbook = Playbook()
    assert (
        playbook
        >> ClientSends(m.Query("SELECT 1"))
        << Audit({"verdict": "allow"})
        >> AuditFailed()
        << ToServer(m.Query(poison()))
        >> ServerSends(m.ErrorResponse.build("42601", "syntax error"), READY)
        << ToClient(Error("58030", "audit"), READY)
        >> ClientSends(m.Query("SELECT 2"))
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query("SELECT 2"))
    )
    assert playbook.connection.state is State.RELAYING


def test_messages_behind_a_statement_awaiting_its_record_queue_behind_it():
    # While the audit write is out the connection is PAUSED: later client messages are
    # neither decided nor forwarded, server traffic is relayed, and nothing of the paused
    # statement goes upstream. The queue is worked through, in order, once it resumes.
    notice = m.NoticeResponse.build("01000", "checkpoint soon")
    playbook = Playbook()
    assert (
        playbook
        >> ClientSends(m.Query("SELECT 1"), m.Query("SELECT 2"))
        << Audit({"statement": "SELECT $1"})
        >> ClientSends(m.Query("SELECT 3"))
        >> ServerSends(notice)
        << ToClient(notice)
    )
    assert playbook.connection.state is State.PAUSED
    assert (
        playbook
        >> AuditWritten()
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query("SELECT 1"), m.Query("SELECT 2"), m.Query("SELECT 3"))
    )
    assert playbook.connection.state is State.RELAYING
    assert [r["seq"] for r in playbook.audit] == [1, 2, 3]


def test_a_failed_write_refuses_only_its_own_statement():
    assert (
        Playbook()
        >> ClientSends(m.Query("SELECT 1"), m.Query("SELECT 2"))
        << Audit({"verdict": "allow"})
        >> AuditFailed()
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query(poison()), m.Query("SELECT 2"))
    )


def test_fast_path_function_call_is_recorded_and_refused():
    assert (
        Playbook()
        >> ClientSends(m.FunctionCall(764, (), (), 0))
        << Audit({"rule": "guardrail:fast-path", "protocol": "fast-path", "verdict": "deny"})
        >> AuditWritten()
        << ToServer(m.Query(poison()))
    )


@pytest.mark.parametrize(
    "garbage", [b"Q\x00\x00\x00\x02", b"?\x00\x00\x00\x04", b"p\x00\x00\x00\x08abcd"]
)
def test_malformed_client_message_is_fatal_and_forwards_nothing(garbage):
    assert (
        Playbook()
        >> ClientSends(garbage)
        << ToClient(Error("08P01", severity="FATAL"))
        << Close("client protocol error")
    )


def test_messages_before_a_malformed_one_are_acted_on_first():
    assert (
        Playbook()
        >> ClientSends(m.Query("SELECT 1"), b"?\x00\x00\x00\x04")
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query("SELECT 1"))
        << ToClient(Error("08P01", severity="FATAL"))
        << Close("client protocol error")
    )


def test_bind_with_bad_names_is_a_protocol_error_not_a_crash():
    bad = b"B" + (4 + 4).to_bytes(4, "big") + b"\xff\x00s\x00"
    assert (
        Playbook()
        >> ClientSends(bad)
        << ToClient(Error("08P01", severity="FATAL"))
        << Close("client protocol error")
    )


def test_a_malformed_server_message_is_fatal():
    assert (
        Playbook()
        >> ServerSends(b"C\x00\x00\x00\x02")  # a length shorter than the length word
        << ToClient(Error("08P01", "database sent a malformed message", severity="FATAL"))
        << Close("server protocol error")
    )


def test_session_authorization_shows_the_session_user():
    assert (
        Playbook()
        >> ServerSends(m.ParameterStatus("session_authorization", "v-token-xyz"))
        << ToClient(m.ParameterStatus("session_authorization", "guard_s1"))
    )


def test_copy_both_is_refused():
    assert (
        Playbook()
        >> ServerSends(m.CopyBothResponse(0, ()))
        << ToClient(Error("42501", "replication", severity="FATAL"))
        << Close("CopyBothResponse")
    )


def test_multi_statement_string_refused_whole_and_each_recorded():
    assert (
        Playbook()
        >> ClientSends(m.Query("SELECT 1; DROP TABLE products"))
        << Audit(
            {"verdict": "deny", "rule": "guard:refused-with-batch"},
            {"verdict": "deny", "rule": "deny-ddl"},
        )
        >> AuditWritten()
        << ToServer(m.Query(poison()))
    )


def test_multibyte_client_only_encodings_are_refused():
    assert (
        Playbook()
        >> ServerSends(m.ParameterStatus("client_encoding", "SJIS"))
        << ToClient(Error("0A000", "SJIS", severity="FATAL"))
        << Close("client_encoding")
    )


def test_each_execute_of_a_suspended_portal_has_its_result():
    # Execute with a row limit: PortalSuspended ends this Execute (outcome "suspended");
    # the next Execute of the same portal is recorded and answered on its own.
    sql = "SELECT full_name FROM customers"
    bound = (m.Parse("s", sql, ()), m.Bind("p", "s", (), (), ()), m.Execute("p", 1), m.Sync())
    first = (m.ParseComplete(), m.BindComplete(), m.DataRow((b"Alice Anderson",)))
    suspended = (m.PortalSuspended(), m.ReadyForQuery(b"T"))
    rest = (m.DataRow((b"Bob Brown",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"T"))
    assert (
        Playbook()
        >> ClientSends(*bound)
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(*bound)
        >> ServerSends(*first, *suspended)
        << ToClient(*first, *suspended)
        << Results({"statement_seq": 1, "outcome": "suspended", "rows": None})
        >> ClientSends(m.Execute("p", 0), m.Sync())
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Execute("p", 0), m.Sync())
        >> ServerSends(*rest)
        << ToClient(*rest)
        << Results({"statement_seq": 2, "outcome": "ok", "rows": 1})
    )


def test_an_odd_command_tag_from_the_server_is_recorded_without_a_row_count():
    sql = "SELECT full_name FROM customers WHERE id = 1"
    assert (
        Playbook()
        >> ClientSends(m.Query(sql))
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query(sql))
        >> ServerSends(m.CommandComplete("SELECT ²"), READY)
        << ToClient(m.CommandComplete("SELECT ²"), READY)
        << Results({"outcome": "ok", "rows": None})
    )


def test_an_execute_whose_records_fail_is_refused_in_band():
    sql = "SELECT name FROM products WHERE id = $1"
    parsed = (m.Parse("s", sql, ()), m.Sync())
    assert (
        Playbook()
        >> ClientSends(*parsed)
        << ToServer(*parsed)  # nothing runs at Parse: nothing is recorded yet
        >> ServerSends(m.ParseComplete(), READY)
        << ToClient(m.ParseComplete(), READY)
        >> ClientSends(m.Bind("", "s", (), (b"1",), ()), m.Execute("", 0), m.Sync())
        << Audit({"verdict": "allow", "protocol": "extended"})
        >> AuditFailed()
        << ToServer(m.Bind("", "s", (), (b"1",), ()), m.Parse("", poison(), ()), m.Sync())
        >> ServerSends(m.BindComplete(), m.ErrorResponse.build("42601", "syntax error"), READY)
        << ToClient(m.BindComplete(), Error("58030", "audit"), READY)
    )


# ------------------------------------------------------------------ ending a connection
def test_terminate_is_forwarded_and_ends_the_connection():
    playbook = Playbook()
    assert (
        playbook
        >> ClientSends(m.Terminate())
        << ToServer(m.Terminate())
        << Close("client terminated")
        >> ClientSends(m.Query("SELECT 1"))
        >> ServerSends(READY)
    )
    assert playbook.connection.state is State.CLOSED


def test_client_half_close_lets_its_last_statement_finish():
    # EOF from the client: its requests still run, PostgreSQL is told the client
    # terminated after them, and the answers reach the client until the database closes.
    sql = "SELECT name FROM products"
    playbook = Playbook()
    assert (
        playbook
        >> ClientSends(m.Query(sql))
        << Audit({"verdict": "allow"})
        >> ClientEOF()
        >> AuditWritten()
        << ToServer(m.Query(sql), m.Terminate())
        >> ServerSends(m.CommandComplete("SELECT 0"), READY)
        << ToClient(m.CommandComplete("SELECT 0"), READY)
        << Results({"outcome": "ok", "rows": 0})
    )
    assert playbook.connection.state is State.HALF_CLOSED
    assert playbook >> ClientSends(m.Query("SELECT 1")) >> ServerEOF() << Close("client closed")
    assert playbook.connection.state is State.CLOSED


def test_idle_connection_is_ended_and_a_busy_one_is_not():
    sql = "SELECT pg_sleep(60)"
    playbook = Playbook()
    assert (
        playbook
        >> ClientSends(m.Query(sql))
        << Audit({"verdict": "allow"})
        >> IdleFor(900)  # paused for its record: waiting, not idle
        >> AuditWritten()
        << ToServer(m.Query(sql))
        >> IdleFor(900)  # the statement runs: not idle either
        >> ServerSends(m.CommandComplete("SELECT 1"), READY)
        << ToClient(m.CommandComplete("SELECT 1"), READY)
        << Results({"outcome": "ok"})
        >> IdleFor(900)
        << ToClient(Error("57P05", "900 s idle", severity="FATAL"))
        << Close("idle")
    )


@pytest.mark.parametrize("later", [False, True], ids=["answered-at-once", "group-commit"])
def test_a_recorded_statement_waits_for_the_next_ones_record_only_when_that_is_free(later):
    """Two statements sent together. A shell that answers WriteAudit at once lets the
    first statement's bytes join the second's in one write. With group commit the answer
    comes after an fsync, so the first goes as soon as its own record is written, not one
    fsync later. Never before its record: that is the contract either way."""
    first, second = m.Query("SELECT 1"), m.Query("SELECT 2")
    playbook = Playbook(connection(audit_answers_later=later))
    playbook >> ClientSends(first, second) << Audit({"verdict": "allow"}) >> AuditWritten()
    if later:
        playbook << ToServer(first) << Audit({"verdict": "allow"})
        assert playbook >> AuditWritten() << ToServer(second)
    else:
        playbook << Audit({"verdict": "allow"})
        assert playbook >> AuditWritten() << ToServer(first, second)


def test_a_message_left_incomplete_ends_the_connection_and_a_whole_one_does_not():
    whole = m.Query("SELECT 1")
    raw = encode(m.Query("SELECT 2"))
    playbook = Playbook()
    assert (
        playbook
        >> ClientSends(whole)
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(whole)
        >> IncompleteFor(60)  # nothing partial: nothing happens
        >> ClientSends(raw[:7])  # the start of a message, its end never comes
    )
    assert playbook.connection.partial_message
    assert (
        playbook
        >> IncompleteFor(60)
        << ToClient(Error("08P01", "incomplete for 60 s", severity="FATAL"))
        << Close("incomplete")
    )


# ------------------------------------------------------------------ internal errors
class _BrokenGate(Gate):
    """The demo gate, with a bug in serializing records."""

    def statement_records(self, decision, protocol):
        raise RuntimeError("bug")


def test_an_internal_error_fails_the_connection_closed():
    # Like h11's ERROR state: the client gets FATAL, nothing of the failing call leaves,
    # the operator log names the connection, and nothing more is relayed either way.
    gate = _BrokenGate(
        policy=POLICY, target="demo", principal=ALICE, session_id="s1", connection_id="c9"
    )
    playbook = Playbook(connection(gate=gate))
    assert (
        playbook
        >> ClientSends(m.Query("SELECT 1"))
        << Logged("error", "connection c9")
        << ToClient(Error("XX000", "internal error", severity="FATAL"))
        << Close("internal error (RuntimeError)")
        >> ClientSends(m.Query("SELECT 2"))
        >> ServerSends(READY)
        >> ClientEOF()
        >> IdleFor(900)
    )
    assert playbook.connection.state is State.FAILED


def test_a_failure_while_masking_leaks_no_row():
    class Exploding:
        def mask_text(self, value: bytes) -> bytes:
            raise ValueError("bug")

    conn = connection()
    conn.protected = {(CUSTOMERS_OID, SSN_ATTNUM): Exploding()}  # type: ignore[dict-item]
    sql = "SELECT ssn FROM customers"
    assert (
        Playbook(conn)
        >> ClientSends(m.Query(sql))
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query(sql))
        >> ServerSends(m.RowDescription((SSN,)), m.DataRow((b"123-45-6789",)))
        << DRIFT
        << Logged("error", "internal error")
        << ToClient(Error("XX000", severity="FATAL"))
        << Close("internal error (ValueError)")
    )


def test_a_protected_column_in_a_stream_is_logged_as_drift():
    sql = "SELECT ssn FROM customers"
    assert (
        Playbook()
        >> ClientSends(m.Query(sql))
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query(sql))
        >> ServerSends(m.RowDescription((SSN,)))
        << Logged("warning", "may have drifted", "session s1")
        << ToClient(m.RowDescription((SSN,)))
    )


def test_drift_is_logged_once_per_connection_and_audited_every_time():
    # A drifted database must not flood the operator log with a line per statement; the
    # audit still counts the cells the gateway masked in each result.
    sql = "SELECT ssn FROM customers"
    proxy, audit = make()
    said = []
    for _ in range(3):
        said += proxy.from_client(wire(m.Query(sql)))
        said += proxy.from_server(
            wire(
                m.RowDescription((SSN,)),
                m.DataRow((b"123-45-6789",)),
                m.CommandComplete("SELECT 1"),
                m.ReadyForQuery(b"I"),
            )
        )
    logs = [c for c in said if isinstance(c, Log)]
    assert len(logs) == 1 and "drifted" in logs[0].message
    results = [r for r in audit.records if r.get("kind") == "result"]
    assert [r["masked_cells"] for r in results] == [1, 1, 1]


# ------------------------------------------------------------------ held for approval
TX_SQL = "SELECT id, amount FROM transactions WHERE account_id = 1"
TX_COLUMNS = m.RowDescription((field("id"), field("amount")))
TX_ROW = m.DataRow((b"7", b"12.50"))
RULE = "transactions-need-approval"


def _held_playbook():
    return Playbook(connection(holds=True))


def test_a_statement_that_needs_approval_is_held_then_runs_once_approved():
    # The client is told the request id and who can approve; nothing of the statement is
    # forwarded; a statement sent behind it waits; once approved the statement runs, its
    # grant ends with it, and only then does the queued statement run.
    request = Placeholder(r"[0-9a-f]{12}")
    playbook = _held_playbook()
    assert (
        playbook
        >> ClientSends(m.Query(TX_SQL))
        << Audit({"verdict": "require_approval", "rule": RULE})
        >> AuditWritten()
        << ToClient(Notice("requires approval", "security-leads", "guard approve"))
        << Held(request, RULE)
        >> ClientSends(m.Query("SELECT 1"))
        >> IdleFor(900)  # waiting for people is not idle
    )
    assert playbook.connection.state is State.PAUSED
    assert playbook.connection.held_request == request.value
    rows = (TX_COLUMNS, TX_ROW, m.CommandComplete("SELECT 1"), READY)
    assert (
        playbook
        >> Decided(request, approved=True)
        << ToServer(m.Query(TX_SQL))
        >> ServerSends(*rows)
        << ToClient(*rows)
        << Results({"statement_seq": 1, "outcome": "ok", "rows": 1})
        << GrantEnds(request)
        >> GrantEnded(request)
        << Audit({"verdict": "allow", "statement": "SELECT $1"})
        >> AuditWritten()
        << ToServer(m.Query("SELECT 1"))
    )
    assert playbook.connection.held_request is None


def test_a_denied_statement_gets_the_denial_and_the_session_goes_on():
    request = Placeholder(r"[0-9a-f]{12}")
    denial = m.ErrorResponse.build("42501", "guard: request denied by bob: not during the audit")
    assert (
        _held_playbook()
        >> ClientSends(m.Query(TX_SQL))
        << Audit({"verdict": "require_approval"})
        >> AuditWritten()
        << ToClient(Notice("guard approve"))
        << Held(request, RULE)
        >> Decided(request, approved=False, error=denial)
        << ToServer(m.Query(poison()))
        >> ServerSends(m.ErrorResponse.build("42601", "syntax error"), READY)
        << ToClient(Error("42501", "denied by bob", "not during the audit"), READY)
        >> ClientSends(m.Query("SELECT 2"))
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query("SELECT 2"))
    )


def test_a_held_execute_runs_with_a_flush_and_its_sync_waits_for_the_grants_end():
    request = Placeholder(r"[0-9a-f]{12}")
    parsed = (m.Parse("s", TX_SQL, ()), m.Bind("", "s", (), (), ()))
    done = (TX_ROW, m.CommandComplete("SELECT 1"))
    assert (
        _held_playbook()
        >> ClientSends(*parsed, m.Execute("", 0), m.Sync())
        << Audit({"verdict": "require_approval", "protocol": "extended"})
        >> AuditWritten()
        << ToServer(*parsed)  # what came before the held statement goes now
        << ToClient(Notice("guard approve"))
        << Held(request, RULE, protocol="extended")
        >> ServerSends(m.ParseComplete(), m.BindComplete())
        << ToClient(m.ParseComplete(), m.BindComplete())
        >> Decided(request, approved=True)
        << ToServer(m.Execute("", 0), m.Flush())
        >> ServerSends(*done)
        << ToClient(*done)
        << Results({"outcome": "ok", "rows": 1})
        << GrantEnds(request)
        >> GrantEnded(request)
        << ToServer(m.Sync())
        >> ServerSends(READY)
        << ToClient(READY)
    )


def test_a_window_approval_lets_the_queue_go_on_at_once():
    request = Placeholder(r"[0-9a-f]{12}")
    assert (
        _held_playbook()
        >> ClientSends(m.Query(TX_SQL), m.Query("SELECT 1"))
        << Audit({"verdict": "require_approval"})
        >> AuditWritten()
        << ToClient(Notice("guard approve"))
        << Held(request, RULE)
        >> Decided(request, approved=True, per_statement=False)
        << Audit({"verdict": "allow"})
        >> AuditWritten()
        << ToServer(m.Query(TX_SQL), m.Query("SELECT 1"))
    )


def test_a_decision_for_another_request_changes_nothing():
    request, other = Placeholder(r"[0-9a-f]{12}"), Placeholder()
    playbook = _held_playbook()
    assert (
        playbook
        >> ClientSends(m.Query(TX_SQL))
        << Audit({"verdict": "require_approval"})
        >> AuditWritten()
        << ToClient(Notice("guard approve"))
        << Held(request, RULE)
    )
    other.value, other.bound = "not-it", True
    assert playbook >> Decided(other, approved=True) >> GrantEnded(request)
    assert playbook.connection.state is State.PAUSED


def test_without_holds_a_statement_that_needs_approval_is_refused_at_parse():
    assert (
        Playbook()
        >> ClientSends(m.Parse("s", TX_SQL, ()), m.Sync())
        << Audit({"verdict": "require_approval"})
        >> AuditWritten()
        << ToServer(m.Parse("s", poison(), ()), m.Sync())
    )
