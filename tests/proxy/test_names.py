"""What the client's statement and portal names mean, through the connection and alone.

A Parse, Bind or Close changes a name when it is forwarded; PostgreSQL may skip it (a
failed pipeline) or refuse it. These tests drive the core with `tests.playbook.make()` (the
audit answered as the shell does) and check that every Execute is decided, masked and
recorded as what PostgreSQL actually runs; the last ones test `NameTables` on its own.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from guard.broker.pgwire import messages as m
from guard.broker.proxy import names as names_module
from guard.broker.proxy.commands import SendToServer
from tests.playbook import CUSTOMERS_OID, SSN_ATTNUM, field, make, to_client, to_server, wire


def test_statement_text_is_decoded_in_the_client_encoding():
    proxy, audit = make()
    proxy.from_server(wire(m.ParameterStatus("client_encoding", "LATIN1")))
    text = "SELECT 'café' FROM products\0".encode("latin-1")
    raw = b"Q" + (4 + len(text)).to_bytes(4, "big") + text
    sent = proxy.from_client(raw)
    data = b"".join(bytes(c.data) for c in sent if isinstance(c, SendToServer))
    assert data == raw  # forwarded byte for byte; PostgreSQL converts it
    assert audit.records[-1]["verdict"] == "allow"


def test_mask_plans_follow_the_description_not_a_reused_object():
    # Mask plans are cached per description. A statement described (with unprotected
    # columns) before the description cache was cleared keeps its description; once it is
    # closed it is freed, and CPython may hand its address to the next description of the
    # same size. A plan cached by id() would then be the old "nothing to mask"; plans live
    # on the description object they belong to.
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


def test_portal_names_from_the_client_are_bounded_and_a_forgotten_one_does_not_run(
    monkeypatch,
):
    proxy, audit = make()
    # The bound is read by the name tables the core runs on (`_cnames` with the twin).
    monkeypatch.setattr(sys.modules[type(proxy.connection.names).__module__], "MAX_PORTALS", 3)
    sql = "SELECT full_name FROM customers WHERE id = $1"
    binds = [m.Bind(f"p{i}", "s", (), (b"1",), ()) for i in range(5)]
    proxy.from_client(wire(m.Parse("s", sql, ()), *binds))
    assert list(proxy.connection.names.portals) == ["p2", "p3", "p4"]  # the oldest went first
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


def _compiled_names() -> ModuleType | None:
    try:
        from guard.broker.proxy import _cnames
    except ImportError:  # not built: the reference alone (CI fails in test_core_twins)
        return None
    return _cnames


# The reference and its twin (names.py compiled; the compiled core runs on it).
BUILDS = [names_module, *filter(None, [_compiled_names()])]


@pytest.mark.parametrize("names", BUILDS, ids=lambda module: module.__name__)
def test_name_tables_roll_back_newest_first(names):
    tables = names.NameTables()
    first = names.Prepared(decision=None, records=())
    second = names.Prepared(decision=None, records=())
    tables.parse("s", first)
    undo_parse = tables.parse("s", second)
    undo_bind = tables.bind("p", names.Portal(second, ()))
    undo_close = tables.close(b"S", "s")
    assert "s" not in tables.statements and tables.portals["p"].prepared is second
    for undo in (undo_close, undo_bind, undo_parse):  # as a failed pipeline undoes them
        tables.rollback(undo)
    assert tables.statements == {"s": first} and tables.portals == {}
    assert undo_bind == (tables.portals, "p", names.GONE)


@pytest.mark.parametrize("names", BUILDS, ids=lambda module: module.__name__)
def test_a_failed_parse_or_bind_of_the_unnamed_name_leaves_none(names):
    tables = names.NameTables()
    undo = tables.parse("", names.Prepared(decision=None, records=()))
    tables.forget_unnamed(undo)
    assert tables.statements == {}
    named = tables.parse("s", names.Prepared(decision=None, records=()))
    tables.forget_unnamed(named)
    assert list(tables.statements) == ["s"]
