"""The relay's hot-path promises, asserted on the sans-IO relay: statement analysis runs once
per statement text (and per normalized shape for inlined literals) and never per Execute of a
prepared statement; result rows that need no masking pass byte-identical and undecoded, as
one slice per run; rows that do need masking are decoded, and only they."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from guard.broker.pgwire import encoder as encoder_module
from guard.broker.pgwire import messages as m
from guard.broker.pgwire import parser as parser_module
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.errors import ProtocolError
from guard.broker.pgwire.parser import bind_names
from guard.broker.proxy import connection as connection_module
from guard.broker.proxy import gate as gate_module
from guard.broker.proxy.commands import SendToClient, SendToServer
from guard.broker.sql import shape
from tests import playbook
from tests.playbook import (
    CUSTOMERS_OID,
    SSN_ATTNUM,
    field,
    make,
    to_client,
    wire,
)

SELECT = "SELECT id, name FROM products WHERE id = $1"


@pytest.fixture
def analyses(monkeypatch) -> list[str]:
    """Every statement text the gate analyses (the real analyser still answers)."""
    seen: list[str] = []
    real = gate_module.analyze

    def counting(sql: str):
        seen.append(sql)
        return real(sql)

    monkeypatch.setattr(gate_module, "analyze", counting)
    return seen


@pytest.fixture
def pure_core(monkeypatch) -> None:
    """The tests' connections are the reference build: what these tests count or swap is
    looked up in `proxy.connection`'s globals, which the compiled twin does not read."""
    monkeypatch.setattr(playbook, "GatewayConnection", connection_module.GatewayConnection)


@pytest.fixture
def row_decodes(monkeypatch, pure_core) -> list[int]:
    """Tags of the server messages the relay decodes."""
    seen: list[int] = []
    real = connection_module.decode_backend

    def counting(frame):
        seen.append(frame.tag)
        return real(frame)

    # Rows to mask are split and decoded in one call per run (compiled, or the reference).
    real_rows = connection_module.data_rows

    def counting_rows(run):
        rows, fault = real_rows(run)
        seen.extend([m.TAG_DATA_ROW] * (len(rows) + (fault is not None)))
        return rows, fault

    monkeypatch.setattr(connection_module, "decode_backend", counting)
    monkeypatch.setattr(connection_module, "data_rows", counting_rows)
    return seen


def _rows(n: int) -> list[m.DataRow]:
    return [m.DataRow((str(i).encode(), f"product é {i}".encode(), None)) for i in range(n)]


def test_prepared_statement_is_analysed_at_parse_only(analyses):
    proxy, audit = make()
    proxy.from_client(wire(m.Parse("s1", SELECT, ()), m.Sync()))
    proxy.from_server(wire(m.ParseComplete(), m.ReadyForQuery(b"I")))
    for i in range(50):
        proxy.from_client(
            wire(m.Bind("", "s1", (), (str(i).encode(),), ()), m.Execute("", 0), m.Sync())
        )
        proxy.from_server(
            wire(
                m.BindComplete(),
                m.DataRow((b"1", b"x")),
                m.CommandComplete("SELECT 1"),
                m.ReadyForQuery(b"I"),
            )
        )
    assert analyses == [SELECT]
    # ...while every Execute still has its own statement record and result.
    executes = [r for r in audit.records if r.get("kind") == "statement"]
    assert len(executes) == 50


def test_repeated_text_is_analysed_once_and_inlined_literals_once_per_shape(analyses):
    proxy, _ = make()
    for i in range(30):
        proxy.from_client(wire(m.Query(f"SELECT name FROM products WHERE id = {i}")))
        proxy.from_server(wire(m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))
        proxy.from_client(wire(m.Parse("", SELECT, ()), m.Sync()))
        proxy.from_server(wire(m.ParseComplete(), m.ReadyForQuery(b"I")))
    assert analyses.count(SELECT) == 1
    # The thirty literal texts share the analysis of their normalized shape.
    assert analyses.count("SELECT name FROM products WHERE id = $1") == 1
    assert len(analyses) == 2


def test_a_redirected_shape_with_inlined_literals_is_analysed_once(analyses):
    proxy, _ = make()
    forwarded = []
    for i in range(30):
        sent = proxy.from_client(wire(m.Query(f"SELECT ssn FROM public.customers WHERE id = {i}")))
        forwarded += [c.data for c in sent if isinstance(c, SendToServer)]
        proxy.from_server(wire(m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))
    assert analyses == ["SELECT ssn FROM public.customers WHERE id = $1"]
    # Each text still goes out redirected with its own literal.
    assert len(forwarded) == 30
    for i, data in enumerate(forwarded):
        assert f"FROM guard_masked.customers WHERE id = {i}\x00".encode() in data


_INLINED = [
    "SELECT name FROM products WHERE id = {}",
    "SELECT ssn FROM public.customers WHERE id = {};",  # redirected to the masking view
    "UPDATE products SET name = name WHERE id = -{}",
    "SELECT name FROM products ORDER BY 1 LIMIT {}",  # libpg_query's alone (a LIMIT)
]


def _statement_records(shape) -> tuple[list[dict], list[bytes]]:
    """The statement records and forwarded bytes of the _INLINED texts, with the gate's
    normalization `shape` (seq and time left out: they differ run to run)."""
    forwarded: list[bytes] = []
    original = gate_module.literal_shape
    gate_module.literal_shape = shape
    try:
        proxy, audit = make()
        for i in range(3):
            for text in _INLINED:
                sent = proxy.from_client(wire(m.Query(text.format(i + 7))))
                forwarded += [bytes(c.data) for c in sent if isinstance(c, SendToServer)]
                proxy.from_server(wire(m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))
    finally:
        gate_module.literal_shape = original
    records = [
        {k: v for k, v in r.items() if k not in ("seq", "time")}
        for r in audit.records
        if r.get("kind") == "statement"
    ]
    return records, forwarded


def test_the_literal_shape_changes_no_decision_record_or_forwarded_byte():
    assert _statement_records(shape.literal_shape) == _statement_records(lambda text: None)


def test_plain_inlined_literals_skip_libpg_querys_normalization(monkeypatch):
    calls: list[str] = []
    real = gate_module.normalize
    monkeypatch.setattr(gate_module, "literal_shape", shape.literal_shape)
    monkeypatch.setattr(gate_module, "normalize", lambda sql: calls.append(sql) or real(sql))
    proxy, audit = make()
    for i in range(5):
        proxy.from_client(wire(m.Query(f"SELECT name FROM products WHERE id = {i};")))
        proxy.from_server(wire(m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))
    assert calls == []
    statements = [r["statement"] for r in audit.records if r.get("kind") == "statement"]
    assert statements == ["SELECT name FROM products WHERE id = $1"] * 5


def test_fresh_inlined_literals_do_not_fill_the_decision_cache(monkeypatch):
    # pgbench -M simple sends a new key every time: caching each exact text would only
    # churn the cache. Texts that cost more to decide again stay cached: those only
    # libpg_query normalizes, and redirected ones (their forwarded text is refilled).
    monkeypatch.setattr(gate_module, "literal_shape", shape.literal_shape)
    calls: list[str] = []
    real = gate_module.normalize
    monkeypatch.setattr(gate_module, "normalize", lambda sql: calls.append(sql) or real(sql))
    proxy, _ = make()
    cache = proxy.gate.decisions
    texts = {
        "plain": "SELECT name FROM products WHERE id = {};",
        "libpg_query's": "SELECT name FROM products ORDER BY 1 LIMIT {}",
        "redirected": "SELECT ssn FROM public.customers WHERE id = {};",
    }
    for i in range(40):
        for text in texts.values():
            proxy.from_client(wire(m.Query(text.format(i + 1))))
            proxy.from_server(wire(m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))
    cached = set(cache)
    assert not any(texts["plain"].format(i + 1) in cached for i in range(40))
    assert all(texts["libpg_query's"].format(i + 1) in cached for i in range(40))
    assert all(texts["redirected"].format(i + 1) in cached for i in range(40))
    # A cached text is not normalized again.
    before = len(calls)
    proxy.from_client(wire(m.Query(texts["libpg_query's"].format(1))))
    assert len(calls) == before


# Statement texts with a literal: allowed, refused, redirected to a masking view, and
# held for approval under the test policy, so every way decide answers is met.
_TEXTS = (
    "SELECT name FROM products WHERE id = {}",
    "SELECT name FROM products ORDER BY 1 LIMIT {}",
    "SELECT ssn FROM public.customers WHERE id = {}",
    "SELECT * FROM transactions WHERE id = {}",
    "DELETE FROM customers WHERE id = {}",
    "SELECT set_config('role', 'r{}', false)",
    "DROP TABLE t{}",
)


@given(st.lists(st.tuples(st.sampled_from(_TEXTS), st.integers(0, 30)), max_size=24))
def test_the_cores_cached_decision_is_the_one_decide_gives(texts):
    # The compiled core answers a statement from the gate's caches without calling decide
    # (`connection._decision`): the exact text's decision, or the one its shape shares.
    # It must be decide's own answer, and only allowed, unredirected ones are shared.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(gate_module, "literal_shape", shape.literal_shape)
    monkeypatch.setattr(connection_module, "literal_shape", shape.literal_shape)
    try:
        gate = playbook.connection().gate
        for text, literal in texts:
            sql = text.format(literal)
            found = connection_module._decision(gate, gate.decisions, gate.shared, sql)
            assert found is gate.decide(sql)
        assert set(gate.shared) <= set(gate.decisions)
        for decision in gate.shared.values():
            assert decision.refusal is None and decision.verdicts
            assert decision.forward_sql is None and decision.hold is None
    finally:
        monkeypatch.undo()


def test_unmasked_rows_pass_byte_identical_and_undecoded(row_decodes):
    proxy, _ = make()
    proxy.from_client(wire(m.Query("SELECT id, name, sku FROM products")))
    description = m.RowDescription((field("id"), field("name"), field("sku")))
    rows = wire(*_rows(2000))
    reply = wire(description) + rows + wire(m.CommandComplete("SELECT 2000"), m.ReadyForQuery(b"I"))
    sent: list[bytes] = []
    # Arbitrary read boundaries, as TCP delivers them: rows split across reads.
    for start in range(0, len(reply), 7001):
        sent += [
            bytes(c.data)
            for c in proxy.from_server(reply[start : start + 7001])
            if isinstance(c, SendToClient)
        ]
    assert b"".join(sent) == reply
    assert m.TAG_DATA_ROW not in row_decodes
    # Rows leave as runs, not one write per row.
    assert len(sent) < 2000 // 50


def test_only_rows_with_a_protected_column_are_decoded(row_decodes):
    proxy, _ = make()
    proxy.from_client(wire(m.Query("SELECT id, ssn FROM customers")))
    description = m.RowDescription((field("id"), field("ssn", CUSTOMERS_OID, SSN_ATTNUM)))
    rows = [m.DataRow((str(i).encode(), b"123-45-6789")) for i in range(20)]
    cmds = proxy.from_server(
        wire(description, *rows, m.CommandComplete("SELECT 20"), m.ReadyForQuery(b"I"))
    )
    got = [x for x in to_client(cmds) if isinstance(x, m.DataRow)]
    assert [r.values[1] for r in got] == [b"***-**-6789"] * 20
    assert [r.values[0] for r in got] == [str(i).encode() for i in range(20)]
    assert row_decodes.count(m.TAG_DATA_ROW) == 20
    assert not [c for c in cmds if isinstance(c, SendToServer)]


def test_the_row_description_cache_is_bounded_in_bytes():
    # A client can make the server describe ever new, wide results: the decoded
    # descriptions kept per connection stay within a byte budget, not only a count.
    proxy, _ = make()
    for i in range(40):
        wide = m.RowDescription(tuple(field(f"c{i}_{n}_" + "x" * 60) for n in range(1600)))
        proxy.from_client(wire(m.Query("SELECT 1")))
        proxy.from_server(wire(wide, m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))
        described = proxy.connection._described
        assert sum(map(len, described)) <= connection_module._DESCRIBED_CACHE_BYTES
    assert described  # still caching


NAMES = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=700
)


@given(NAMES, NAMES, st.lists(st.binary(max_size=3000), max_size=3))
@example("p" * 600, "é" * 400, [b"x" * 2000])  # the second name ends past the window
def test_bind_names_read_from_the_front_agree_with_the_encoder(portal, statement, params):
    # The relay reads a Bind's two names from a window at its front, or the whole body
    # when they are longer (non-ASCII names of 700 characters cross it).
    raw = encode(m.Bind(portal, statement, (), tuple(params), ()))
    assert bind_names(memoryview(raw)) == (portal, statement)


@pytest.mark.parametrize(
    "names",
    [b"portal-only", b"p\x00no-terminator", b"\xff\x00s\x00", b"p\x00\xc3\x00", b"x" * 2000],
)
def test_malformed_bind_names_are_a_protocol_error(names):
    with pytest.raises(ProtocolError):
        bind_names(memoryview(b"B" + struct.pack("!i", len(names) + 4) + names))


# A masked run's rows: well-formed (NULL ssn too), or now and then one whose body is not.
_MASKED_ROW = st.one_of(
    st.builds(
        lambda i, ssn: encode(m.DataRow((str(i).encode(), ssn))),
        st.integers(0, 99),
        st.one_of(st.none(), st.sampled_from([b"123-45-6789", b"", b"\xff\xfe"])),
    ),
    st.binary(max_size=10).map(lambda body: b"D" + struct.pack("!i", len(body) + 4) + body),
)


def _masked_relay(rows: list[bytes]) -> list[object]:
    proxy, _ = make()
    proxy.from_client(wire(m.Query("SELECT id, ssn FROM customers")))
    description = m.RowDescription((field("id"), field("ssn", CUSTOMERS_OID, SSN_ATTNUM)))
    reply = wire(description) + b"".join(rows) + wire(m.CommandComplete("SELECT 1"))
    return [
        (type(c).__name__, bytes(c.data) if isinstance(c, SendToClient) else None)
        for c in proxy.from_server(reply)
    ] + [proxy.connection.state]


@given(st.lists(_MASKED_ROW, max_size=6))
def test_masked_rows_relay_alike_compiled_and_pure(rows):
    # The rows before a malformed one are masked and relayed, then the connection ends
    # with the reference's error: the compiled split and build change none of it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(playbook, "GatewayConnection", connection_module.GatewayConnection)
        compiled = _masked_relay(rows)
        patch.setattr(connection_module, "data_rows", parser_module.data_rows)
        patch.setattr(connection_module, "data_row", encoder_module.data_row)
        pure = _masked_relay(rows)
    assert compiled == pure
    assert b"123-45-6789" not in b"".join(data for _, data in compiled[:-1] if data)
