"""Playbook tests of the sans-IO proxy: bytes in, the exact command dialogue out.

No sockets: the real codec, analyser, demo policy and an in-memory audit sink. Each test
says what the client sends, what upstream answers, and what must (and must not) happen.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.broker.audit.sink import MemoryAuditSink
from guard.broker.identity.principal import Principal
from guard.broker.masking.strategies import get_strategy
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import BackendParser, FrontendParser
from guard.broker.policy.compile import load_policy_file
from guard.broker.proxy.commands import CloseConnection, SendToClient, SendToServer
from guard.broker.proxy.gate import Gate
from guard.broker.proxy.session import ProxyConnection

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "policies.yaml")
ALICE = Principal(issuer="https://idp.test", subject="alice-sub", groups=frozenset({"engineers"}))
CUSTOMERS_OID, SSN_ATTNUM, DOB_ATTNUM = 16400, 3, 5


def make(
    audit: MemoryAuditSink | None = None, protected: bool = True
) -> tuple[ProxyConnection, MemoryAuditSink]:
    audit = audit or MemoryAuditSink()
    gate = Gate(
        policy=POLICY,
        target="demo",
        principal=ALICE,
        audit=audit,
        session_id="s1",
        connection_id="c1",
    )
    pmap = (
        {
            (CUSTOMERS_OID, SSN_ATTNUM): get_strategy("ssn_last4"),
            (CUSTOMERS_OID, DOB_ATTNUM): get_strategy("year_only"),
        }
        if protected
        else {}
    )
    return ProxyConnection(gate, protected=pmap, client_user="guard_s1"), audit


def to_server(cmds) -> list:
    data = b"".join(bytes(c.data) for c in cmds if isinstance(c, SendToServer))
    p = FrontendParser(expect_startup=False)
    p.feed(data)
    return list(p.messages())


def to_client(cmds) -> list:
    data = b"".join(bytes(c.data) for c in cmds if isinstance(c, SendToClient))
    p = BackendParser()
    p.feed(data)
    return list(p.messages())


def wire(*msgs) -> bytes:
    return b"".join(encode(x) for x in msgs)


def field(name: str, table: int = 0, attnum: int = 0, type_oid: int = 25, fmt: int = 0):
    return m.FieldDescription(name, table, attnum, type_oid, -1, -1, fmt)


def test_allowed_query_is_recorded_before_it_is_forwarded():
    proxy, audit = make()
    cmds = proxy.from_client(wire(m.Query("SELECT full_name FROM customers WHERE id = 1")))
    assert to_server(cmds) == [m.Query("SELECT full_name FROM customers WHERE id = 1")]
    assert to_client(cmds) == []
    # The record exists at the moment the statement is handed on.
    assert len(audit.records) == 1
    rec = audit.records[0]
    assert rec["verdict"] == "allow" and rec["principal"] == "alice-sub"
    assert rec["statement"].endswith("id = $1")  # literal normalized away

    back = proxy.from_server(
        wire(
            m.RowDescription((field("full_name"),)),
            m.DataRow((b"Alice Anderson",)),
            m.CommandComplete("SELECT 1"),
            m.ReadyForQuery(b"I"),
        )
    )
    assert [type(x) for x in to_client(back)] == [
        m.RowDescription,
        m.DataRow,
        m.CommandComplete,
        m.ReadyForQuery,
    ]
    result = audit.records[1]
    assert result["kind"] == "result" and result["rows"] == 1 and result["statement_seq"] == 1


def test_refused_query_is_replaced_by_poison_and_error_swapped():
    proxy, audit = make()
    cmds = proxy.from_client(wire(m.Query("DROP TABLE customers")))
    sent = to_server(cmds)
    assert len(sent) == 1 and isinstance(sent[0], m.Query)
    assert sent[0].sql.startswith("guard_refused_")  # never the client's statement
    assert audit.records[0]["verdict"] == "deny" and audit.records[0]["rule"] == "deny-ddl"
    upstream_error = m.ErrorResponse.build("42601", f'syntax error at or near "{sent[0].sql}"')
    back = to_client(proxy.from_server(wire(upstream_error, m.ReadyForQuery(b"I"))))
    assert isinstance(back[0], m.ErrorResponse)
    assert back[0].sqlstate == "42501" and "deny-ddl" in back[0].message
    assert back[1] == m.ReadyForQuery(b"I")


def test_gated_table_refusal_mentions_approval():
    proxy, _ = make()
    cmds = proxy.from_client(wire(m.Query("SELECT * FROM transactions")))
    poison = to_server(cmds)[0]
    back = to_client(
        proxy.from_server(
            wire(m.ErrorResponse.build("42601", "syntax error"), m.ReadyForQuery(b"I"))
        )
    )
    assert poison.sql.startswith("guard_refused_")
    assert "approval" in back[0].message


def test_refused_parse_in_pipeline_keeps_order_and_discards_until_sync():
    proxy, audit = make()
    cmds = proxy.from_client(
        wire(
            m.Parse("", "SELECT 1", ()),
            m.Bind("", "", (), (), ()),
            m.Execute("", 0),
            m.Parse("s2", "DELETE FROM products", ()),
            m.Bind("", "s2", (), (), ()),
            m.Execute("", 0),
            m.Sync(),
        )
    )
    sent = to_server(cmds)
    assert sent[3].name == "s2" and sent[3].query.startswith("guard_refused_")
    assert isinstance(sent[-1], m.Sync)
    back = to_client(
        proxy.from_server(
            wire(
                m.ParseComplete(),
                m.BindComplete(),
                m.DataRow((b"1",)),
                m.CommandComplete("SELECT 1"),
                m.ErrorResponse.build("42601", "syntax error"),
                m.ReadyForQuery(b"I"),
            )
        )
    )
    assert [type(x) for x in back] == [
        m.ParseComplete,
        m.BindComplete,
        m.DataRow,
        m.CommandComplete,
        m.ErrorResponse,
        m.ReadyForQuery,
    ]
    assert "delete-without-where" in back[4].message
    kinds = [(r["kind"], r.get("verdict")) for r in audit.records]
    # The refusal is recorded at Parse; the allowed statement at its Execute.
    assert ("statement", "deny") in kinds and ("statement", "allow") in kinds


def test_protected_base_column_in_stream_is_masked_text():
    proxy, audit = make()
    proxy.from_client(wire(m.Query("SELECT full_name, ssn FROM customers")))
    back = to_client(
        proxy.from_server(
            wire(
                m.RowDescription(
                    (field("full_name", CUSTOMERS_OID, 2), field("ssn", CUSTOMERS_OID, SSN_ATTNUM))
                ),
                m.DataRow((b"Alice Anderson", b"123-45-6789")),
                m.DataRow((b"Bob", None)),
                m.CommandComplete("SELECT 2"),
                m.ReadyForQuery(b"I"),
            )
        )
    )
    assert back[1].values == (b"Alice Anderson", b"***-**-6789")
    assert back[2].values == (b"Bob", None)  # NULL stays NULL, row count unchanged
    assert audit.records[-1]["masked_cells"] == 1


def test_extended_execute_without_describe_is_masked_binary():
    proxy, _ = make()
    cmds = proxy.from_client(
        wire(
            m.Parse("", "SELECT ssn, dob FROM customers WHERE id = $1", ()),
            m.Bind("", "", (), (b"1",), (1,)),
            m.Execute("", 0),
            m.Sync(),
        )
    )
    sent = to_server(cmds)
    # The gateway asks for the statement's description itself...
    assert m.Describe(b"S", "") in sent
    dob_2001_07_04 = (366 + 31 + 28 + 31 + 30 + 31 + 30 + 3).to_bytes(4, "big", signed=True)
    back = to_client(
        proxy.from_server(
            wire(
                m.ParseComplete(),
                m.ParameterDescription((23,)),
                m.RowDescription(
                    (
                        field("ssn", CUSTOMERS_OID, SSN_ATTNUM),
                        field("dob", CUSTOMERS_OID, DOB_ATTNUM, type_oid=1082),
                    )
                ),
                m.BindComplete(),
                m.DataRow((b"123-45-6789", dob_2001_07_04)),
                m.CommandComplete("SELECT 1"),
                m.ReadyForQuery(b"I"),
            )
        )
    )
    # ...and swallows the answer the client never asked for.
    assert [type(x) for x in back] == [
        m.ParseComplete,
        m.BindComplete,
        m.DataRow,
        m.CommandComplete,
        m.ReadyForQuery,
    ]
    ssn, dob = back[2].values
    assert ssn == b"***-**-6789"
    assert dob == (366).to_bytes(4, "big", signed=True)  # 2001-01-01


def test_unwritable_audit_refuses_the_statement():
    audit = MemoryAuditSink()
    audit.fail = True
    proxy, _ = make(audit)
    sent = to_server(proxy.from_client(wire(m.Query("SELECT 1"))))
    assert sent[0].sql.startswith("guard_refused_")
    back = to_client(
        proxy.from_server(
            wire(m.ErrorResponse.build("42601", "syntax error"), m.ReadyForQuery(b"I"))
        )
    )
    assert back[0].sqlstate == "58030" and "audit" in back[0].message


def test_fast_path_function_call_is_refused():
    proxy, audit = make()
    sent = to_server(proxy.from_client(wire(m.FunctionCall(764, (), (), 0))))
    assert isinstance(sent[0], m.Query) and sent[0].sql.startswith("guard_refused_")
    assert audit.records[0]["rule"] == "guardrail:fast-path"


@pytest.mark.parametrize(
    "garbage", [b"Q\x00\x00\x00\x02", b"?\x00\x00\x00\x04", b"p\x00\x00\x00\x08abcd"]
)
def test_malformed_client_message_is_fatal_and_forwards_nothing(garbage):
    proxy, audit = make()
    cmds = proxy.from_client(garbage)
    assert not [c for c in cmds if isinstance(c, SendToServer)]
    assert isinstance(cmds[-1], CloseConnection)
    err = to_client(cmds)[0]
    assert err.severity == "FATAL" and err.sqlstate == "08P01"
    assert audit.records == []


def test_session_authorization_shows_the_session_user():
    proxy, _ = make()
    back = to_client(
        proxy.from_server(wire(m.ParameterStatus("session_authorization", "v-token-xyz")))
    )
    assert back == [m.ParameterStatus("session_authorization", "guard_s1")]


def test_copy_both_is_refused():
    proxy, _ = make()
    cmds = proxy.from_server(wire(m.CopyBothResponse(0, ())))
    assert isinstance(cmds[-1], CloseConnection)
    assert to_client(cmds)[0].severity == "FATAL"


def test_multi_statement_string_refused_whole_and_each_recorded():
    proxy, audit = make()
    sent = to_server(proxy.from_client(wire(m.Query("SELECT 1; DROP TABLE products"))))
    assert sent[0].sql.startswith("guard_refused_")
    assert [r["verdict"] for r in audit.records] == ["deny", "deny"]
    assert [r["rule"] for r in audit.records] == ["guard:refused-with-batch", "deny-ddl"]


def test_bind_with_bad_names_is_a_protocol_error_not_a_crash():
    proxy, _ = make()
    bad = b"B" + (4 + 4).to_bytes(4, "big") + b"\xff\x00s\x00"
    cmds = proxy.from_client(bad)
    assert isinstance(cmds[-1], CloseConnection)
    assert to_client(cmds)[0].sqlstate == "08P01"


def test_statement_text_is_decoded_in_the_client_encoding():
    proxy, audit = make()
    proxy.from_server(wire(m.ParameterStatus("client_encoding", "LATIN1")))
    text = "SELECT 'café' FROM products\0".encode("latin-1")
    raw = b"Q" + (4 + len(text)).to_bytes(4, "big") + text
    sent = proxy.from_client(raw)
    data = b"".join(bytes(c.data) for c in sent if isinstance(c, SendToServer))
    assert data == raw  # forwarded byte for byte; PostgreSQL converts it
    assert audit.records[-1]["verdict"] == "allow"


def test_multibyte_client_only_encodings_are_refused():
    proxy, _ = make()
    cmds = proxy.from_server(wire(m.ParameterStatus("client_encoding", "SJIS")))
    assert isinstance(cmds[-1], CloseConnection)
    err = to_client(cmds)[0]
    assert err.severity == "FATAL" and "SJIS" in err.message


def test_each_execute_of_a_suspended_portal_has_its_result():
    # Execute with a row limit: PortalSuspended ends this Execute (outcome "suspended");
    # the next Execute of the same portal is recorded and answered on its own.
    proxy, audit = make()
    sql = "SELECT full_name FROM customers"
    proxy.from_client(
        wire(m.Parse("s", sql, ()), m.Bind("p", "s", (), (), ()), m.Execute("p", 1), m.Sync())
    )
    back = proxy.from_server(
        wire(
            m.ParseComplete(),
            m.BindComplete(),
            m.DataRow((b"Alice Anderson",)),
            m.PortalSuspended(),
            m.ReadyForQuery(b"T"),
        )
    )
    assert [type(x) for x in to_client(back)][-2:] == [m.PortalSuspended, m.ReadyForQuery]
    proxy.from_client(wire(m.Execute("p", 0), m.Sync()))
    proxy.from_server(
        wire(m.DataRow((b"Bob Brown",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"T"))
    )
    statements = [r for r in audit.records if r["kind"] == "statement"]
    results = [r for r in audit.records if r["kind"] == "result"]
    assert len(statements) == 2
    assert [(r["statement_seq"], r["outcome"], r["rows"]) for r in results] == [
        (statements[0]["seq"], "suspended", None),
        (statements[1]["seq"], "ok", 1),
    ]


def test_mask_plan_cache_is_not_fooled_by_a_reused_object_id():
    # Mask plans are cached per fields tuple. A statement described (with unprotected
    # columns) before the description cache was cleared keeps its fields; once it is
    # closed they are freed, and CPython hands their address to the next fields tuple of
    # the same size. A plan cached by id() alone would then be the old "nothing to mask".
    proxy, _ = make()
    sql = "SELECT full_name, ssn, dob FROM customers"
    proxy.from_client(wire(m.Parse("s1", sql, ()), m.Describe(b"S", "s1"), m.Sync()))
    unprotected = tuple(field(name, 777, i + 2) for i, name in enumerate(("a", "b", "c")))
    proxy.from_server(
        wire(
            m.ParseComplete(),
            m.ParameterDescription(()),
            m.RowDescription(unprotected),
            m.ReadyForQuery(b"I"),
        )
    )
    del unprotected
    for i in range(300):  # enough distinct descriptions to clear the description cache
        proxy.from_client(wire(m.Query("SELECT full_name FROM customers")))
        proxy.from_server(
            wire(
                m.RowDescription((field(f"c{i}", 1000 + i, 1),)),
                m.CommandComplete("SELECT 0"),
                m.ReadyForQuery(b"I"),
            )
        )
    proxy.from_client(wire(m.Bind("", "s1", (), (), ()), m.Execute("", 0), m.Sync()))
    proxy.from_server(
        wire(
            m.BindComplete(),
            m.DataRow((b"a", b"b", b"c")),
            m.CommandComplete("SELECT 1"),
            m.ReadyForQuery(b"I"),
        )
    )
    protected_fields = (
        field("full_name", CUSTOMERS_OID, 2),
        field("ssn", CUSTOMERS_OID, SSN_ATTNUM),
        field("x", 777, 4),
    )
    described = wire(
        m.ParseComplete(),
        m.ParameterDescription(()),
        m.RowDescription(protected_fields),
        m.ReadyForQuery(b"I"),
    )
    row = wire(
        m.BindComplete(),
        m.DataRow((b"Alice", b"123-45-6789", b"c")),
        m.CommandComplete("SELECT 1"),
        m.ReadyForQuery(b"I"),
    )
    del protected_fields
    proxy.from_client(wire(m.Close(b"S", "s1"), m.Sync()))  # frees s1's fields
    proxy.from_server(wire(m.CloseComplete(), m.ReadyForQuery(b"I")))
    proxy.from_client(wire(m.Parse("s2", sql, ()), m.Describe(b"S", "s2"), m.Sync()))
    proxy.from_server(described)
    proxy.from_client(wire(m.Bind("", "s2", (), (), ()), m.Execute("", 0), m.Sync()))
    back = to_client(proxy.from_server(row))
    assert back[1].values == (b"Alice", b"***-**-6789", b"c")


def test_description_reaches_the_statement_it_describes_when_the_name_is_reparsed():
    # The unnamed statement is parsed again while a portal bound from the first one is
    # still to run: the first statement's description (from the gateway's own Describe)
    # belongs to it, so that portal's rows are masked.
    proxy, _ = make()
    proxy.from_client(
        wire(
            m.Parse("", "SELECT ssn FROM customers", ()),
            m.Bind("p", "", (), (), ()),
            m.Parse("", "SELECT 1", ()),
            m.Execute("p", 0),
            m.Sync(),
        )
    )
    back = to_client(
        proxy.from_server(
            wire(
                m.ParseComplete(),
                m.ParameterDescription(()),
                m.RowDescription((field("ssn", CUSTOMERS_OID, SSN_ATTNUM),)),
                m.BindComplete(),
                m.ParseComplete(),
                m.DataRow((b"123-45-6789",)),
                m.CommandComplete("SELECT 1"),
                m.ReadyForQuery(b"I"),
            )
        )
    )
    assert back[3].values == (b"***-**-6789",)


def test_an_odd_command_tag_from_the_server_is_recorded_without_a_row_count():
    proxy, audit = make()
    proxy.from_client(wire(m.Query("SELECT full_name FROM customers WHERE id = 1")))
    back = proxy.from_server(wire(m.CommandComplete("SELECT ²"), m.ReadyForQuery(b"I")))
    assert [type(x) for x in to_client(back)] == [m.CommandComplete, m.ReadyForQuery]
    assert audit.records[-1]["kind"] == "result" and audit.records[-1]["rows"] is None


def test_portal_names_from_the_client_are_bounded_and_a_forgotten_one_does_not_run(
    monkeypatch,
):
    from guard.broker.proxy import session

    monkeypatch.setattr(session, "_MAX_PORTALS", 3)
    proxy, audit = make()
    sql = "SELECT full_name FROM customers WHERE id = $1"
    binds = [m.Bind(f"p{i}", "s", (), (b"1",), ()) for i in range(5)]
    proxy.from_client(wire(m.Parse("s", sql, ()), *binds))
    assert list(proxy._portals) == ["p2", "p3", "p4"]  # the oldest went first
    sent = to_server(proxy.from_client(wire(m.Execute("p0", 0), m.Sync())))
    assert isinstance(sent[0], m.Parse) and sent[0].query.startswith("guard_refused_")
    assert not [r for r in audit.records if r["kind"] == "statement"]  # nothing ran
    sent = to_server(proxy.from_client(wire(m.Execute("p4", 0), m.Sync())))
    assert sent == [m.Execute("p4", 0), m.Sync()]


@pytest.mark.parametrize("name", ["s1", ""])
def test_a_parse_upstream_refuses_leaves_the_name_as_it_was(name):
    # Parse of a name that already exists fails upstream (42P05) and the old statement
    # stays: executing the name runs the old text, and that is what the audit must say.
    # An unnamed statement is dropped before parsing: after a failed Parse there is none,
    # and executing it is refused (26000), never recorded as the text that failed.
    proxy, audit = make()
    old, new = "SELECT name FROM products", "SELECT id FROM products"
    proxy.from_client(wire(m.Parse(name, old, ()), m.Sync()))
    proxy.from_server(wire(m.ParseComplete(), m.ReadyForQuery(b"I")))
    proxy.from_client(wire(m.Parse(name, new, ()), m.Sync()))
    if name:
        refused = m.ErrorResponse.build("42P05", f'prepared statement "{name}" already exists')
    else:  # the unnamed statement is replaced, so only a failing text makes the Parse fail
        refused = m.ErrorResponse.build("42703", 'column "id" does not exist')
    proxy.from_server(wire(refused, m.ReadyForQuery(b"I")))
    cmds = proxy.from_client(wire(m.Bind("", name, (), (), ()), m.Execute("", 0), m.Sync()))
    executed = [r for r in audit.records if r.get("kind") == "statement"]
    if name:
        assert [type(x) for x in to_server(cmds)] == [m.Bind, m.Execute, m.Sync]
        assert executed[-1]["statement"] == old
    else:
        assert m.Execute not in [type(x) for x in to_server(cmds)]
        assert executed == []


def test_names_changed_by_messages_a_failed_pipeline_skipped_keep_their_old_meaning():
    # PostgreSQL skips everything after an error up to Sync: a re-Parse of s1 there never
    # happens, so s1 is still the masked SSN query. An Execute of it without Describe must
    # be masked by the gateway and recorded as that text, not as the skipped one.
    proxy, audit = make()
    ssn_text = "SELECT ssn FROM customers WHERE id = $1"
    proxy.from_client(wire(m.Parse("s1", ssn_text, ()), m.Sync()))
    ssn_field = m.RowDescription((field("ssn", CUSTOMERS_OID, SSN_ATTNUM),))
    proxy.from_server(
        wire(
            m.ParseComplete(),
            m.ParameterDescription((23,)),
            ssn_field,  # the gateway's own Describe of s1, swallowed
            m.ReadyForQuery(b"I"),
        )
    )
    failing = proxy.from_client(
        wire(
            m.Bind("", "s1", (), (b"1",), ()),
            m.Execute("", 0),
            m.Parse("s1", "SELECT name FROM products", ()),
            m.Bind("p1", "s1", (), (), ()),
            m.Close(b"S", "s1"),
            m.Sync(),
        )
    )
    assert m.Parse("s1", "SELECT name FROM products", ()) in to_server(failing)
    cancelled = m.ErrorResponse.build("57014", "canceling statement due to user request")
    proxy.from_server(wire(m.BindComplete(), cancelled, m.ReadyForQuery(b"I")))

    cmds = proxy.from_client(
        wire(m.Bind("", "s1", (), (b"1",), ()), m.Execute("", 0), m.Execute("p1", 0), m.Sync())
    )
    statements = [r for r in audit.records if r.get("kind") == "statement"]
    assert statements[-1]["statement"] == ssn_text  # s1 was neither re-parsed nor closed
    # p1 was never bound upstream: its Execute is refused, not run as something else.
    assert [type(x) for x in to_server(cmds)] == [m.Bind, m.Execute, m.Parse, m.Sync]
    back = to_client(
        proxy.from_server(
            wire(
                m.BindComplete(),
                m.DataRow((b"123-45-6789",)),
                m.CommandComplete("SELECT 1"),
                m.ErrorResponse.build("42601", "syntax error"),
                m.ReadyForQuery(b"I"),
            )
        )
    )
    rows = [x for x in back if isinstance(x, m.DataRow)]
    assert rows == [m.DataRow((b"***-**-6789",))]
    assert [x.sqlstate for x in back if isinstance(x, m.ErrorResponse)] == ["26000"]
