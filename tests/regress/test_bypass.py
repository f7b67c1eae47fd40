"""Bypass regressions: every attempt here must be refused before a byte reaches upstream.

This file only grows. Each entry is a statement the security contract (§3, §4) says must
not take effect, sent over both the simple and the extended protocol through the real
relay state machine, demo policy and analyser. Add the spelling of every new bypass found.
"""

from __future__ import annotations

import pytest

from guard.broker.pgwire import messages as m
from tests.playbook import make, to_server, wire

ATTEMPTS = [
    # DDL / DCL in many spellings
    "DROP TABLE customers",
    "drop /* hidden */ table customers",
    'DROP TABLE "customers"',
    "CREATE TEMP TABLE t AS SELECT * FROM customers",
    "SELECT * INTO newtab FROM products",
    "CREATE VIEW v AS SELECT ssn FROM customers",
    "GRANT SELECT ON customers TO PUBLIC",
    "ALTER SYSTEM SET log_statement = 'none'",
    "COMMENT ON TABLE products IS 'x'",
    "TRUNCATE products",
    "EXPLAIN ANALYZE DROP TABLE products",
    "BEGIN; DROP TABLE products; COMMIT",
    "SAVEPOINT a; DROP TABLE products",
    "PREPARE p AS DELETE FROM products",
    # role switching
    "SET ROLE postgres",
    "SET LOCAL ROLE postgres",
    'SET "role" = postgres',
    "RESET ROLE",
    "SET SESSION AUTHORIZATION postgres",
    "SELECT set_config('role', 'postgres', false)",
    "SELECT set_config('session_authorization', 'postgres', false)",
    "ALTER ROLE CURRENT_USER SUPERUSER",
    # server files, programs, large objects, dblink
    "COPY products TO PROGRAM 'id'",
    "COPY products FROM '/etc/passwd'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_ls_dir('.')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_from_bytea(0, 'x')",
    "SELECT dblink('dbname=demo', 'select 1')",
    # dynamic SQL
    "DO $$ BEGIN EXECUTE 'DROP TABLE products'; END $$",
    "SELECT query_to_xml('select ssn from customers', true, true, '')",
    # unrestricted writes
    "UPDATE products SET rate = 0",
    "DELETE FROM products",
    "DELETE FROM products -- WHERE id = 1",
    "UPDATE products SET name = 'WHERE id = 1'",
    "WITH d AS (DELETE FROM products RETURNING *) SELECT * FROM d",
    "MERGE INTO products p USING products s ON p.id = s.id WHEN MATCHED THEN DELETE",
    # gated table
    "SELECT * FROM transactions",
    "SELECT * FROM public.transactions",
    'SELECT * FROM "transactions"',
    "TABLE transactions",
    "WITH t AS (SELECT * FROM transactions) SELECT count(*) FROM t",
    "SELECT a.id FROM accounts a JOIN transactions t ON t.account_id = a.id",
    "COPY transactions TO STDOUT",
    "DECLARE c CURSOR FOR SELECT * FROM transactions",
    # derived / oracle uses of protected columns
    "SELECT upper(ssn) FROM customers",
    "SELECT ssn::bytea FROM customers",
    "SELECT md5(ssn) FROM customers",
    "SELECT id FROM customers WHERE ssn = '123-45-6789'",
    "SELECT id FROM customers ORDER BY ssn LIMIT 1",
    "SELECT string_agg(ssn, ',') FROM customers",
    "INSERT INTO products (name, kind, rate) SELECT ssn, 'x', 1 FROM customers",
    "SELECT public.customer_ssn(1)",
    # NOTIFY in function form: values leave to any listener outside guard
    "NOTIFY leak, 'x'",
    "SELECT pg_notify('leak', 'hello')",
    "SELECT pg_catalog.pg_notify('leak', full_name) FROM customers WHERE id = 1",
    "SELECT id FROM products WHERE pg_notify('leak', name) IS NULL",
    # unparseable input never passes
    "SELEC 1",
]


@pytest.mark.parametrize("sql", ATTEMPTS)
def test_simple_protocol_refuses(sql):
    proxy, audit = make()
    sent = to_server(proxy.from_client(wire(m.Query(sql))))
    assert len(sent) == 1 and sent[0].sql.startswith("guard_refused_"), sent
    assert any(r["verdict"] != "allow" for r in audit.records)


@pytest.mark.parametrize("sql", ATTEMPTS)
def test_extended_protocol_refuses(sql):
    proxy, _ = make()
    sent = to_server(
        proxy.from_client(
            wire(m.Parse("s", sql, ()), m.Bind("", "s", (), (), ()), m.Execute("", 0), m.Sync())
        )
    )
    assert sent[0].query.startswith("guard_refused_"), sent
    assert sql not in repr(sent)


def _allowed_then_refused(allowed: str, *refused: str) -> None:
    """`allowed` is forwarded as it is; each of `refused`, sent after it, is not."""
    proxy, _ = make()
    assert to_server(proxy.from_client(wire(m.Query(allowed)))) == [m.Query(allowed)]
    proxy.from_server(wire(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    for sql in refused:
        sent = to_server(proxy.from_client(wire(m.Query(sql))))
        assert sent[0].sql.startswith("guard_refused_"), sql
        proxy.from_server(wire(m.ErrorResponse.build("42601", "x"), m.ReadyForQuery(b"I")))


def test_literal_sensitive_statements_are_decided_on_their_exact_text():
    # The gate reuses decisions of a statement's normalized form only when they allow; a
    # harmless spelling must not open the door for a dangerous one of the same shape.
    _allowed_then_refused(
        "SELECT set_config('application_name', 'report', false)",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT set_config('session_authorization', 'postgres', false)",
    )


def test_inlined_literals_share_one_allow_decision():
    proxy, audit = make()
    for i in range(3):
        sql = f"SELECT full_name FROM customers WHERE id = {i}"
        assert to_server(proxy.from_client(wire(m.Query(sql)))) == [m.Query(sql)]
        proxy.from_server(wire(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    statements = [r["statement"] for r in audit.records if r["kind"] == "statement"]
    assert statements == ["SELECT full_name FROM customers WHERE id = $1"] * 3


def test_positional_sort_does_not_share_an_allowed_decision():
    # ORDER BY 1 (an unprotected column) is allowed; ORDER BY 2 sorts by ssn, an oracle.
    # Inlined constants share a decision through the normalized text, which must keep
    # sort and group positions as they are.
    _allowed_then_refused(
        "SELECT id, ssn FROM customers ORDER BY 1",
        "SELECT id, ssn FROM customers ORDER BY 2",
        "SELECT ssn, id FROM customers GROUP BY 1, 2 ORDER BY 1",
    )


def _statements(audit) -> list[dict]:
    return [r for r in audit.records if r["kind"] == "statement"]


def test_execute_of_a_sql_prepared_statement_is_not_forwarded_unrecorded():
    # PREPARE (allowed) creates a statement in the namespace protocol Bind uses. guard never
    # saw it Parsed, so an Execute of it would run with no decision and no audit record
    # (and around the guardrail that refuses SQL-level EXECUTE).
    proxy, audit = make()
    proxy.from_client(wire(m.Query("PREPARE x AS SELECT full_name FROM customers")))
    proxy.from_server(
        wire(m.CommandComplete("PREPARE"), m.ReadyForQuery(b"I")),
    )
    before = len(_statements(audit))
    cmds = proxy.from_client(wire(m.Bind("", "x", (), (), ()), m.Execute("", 0), m.Sync()))
    assert not any(isinstance(x, m.Execute) for x in to_server(cmds))
    assert len(_statements(audit)) == before


def test_execute_after_a_refused_reparse_does_not_run_the_old_statement_unrecorded():
    # A refused Parse of an existing name fails upstream, which keeps the old statement;
    # guard forgot it. Executing the name must not run it without a record.
    proxy, audit = make()
    proxy.from_client(
        wire(m.Parse("s", "SELECT full_name FROM customers", ()), m.Sync()),
    )
    proxy.from_server(wire(m.ParseComplete(), m.ReadyForQuery(b"I")))
    cmds = proxy.from_client(wire(m.Parse("s", "DROP TABLE customers", ()), m.Sync()))
    poison = to_server(cmds)[0]
    proxy.from_server(
        wire(m.ErrorResponse.build("42601", f"syntax error: {poison.query}"), m.ReadyForQuery(b"I"))
    )
    before = len(_statements(audit))
    cmds = proxy.from_client(wire(m.Bind("", "s", (), (), ()), m.Execute("", 0), m.Sync()))
    sent = to_server(cmds)
    executes = [x for x in sent if isinstance(x, m.Execute)]
    assert not executes or len(_statements(audit)) > before


def test_execute_of_a_portal_keeps_the_statement_it_was_bound_to():
    # Closing a statement leaves its portals working upstream; the portal's Execute is
    # still recorded, as the statement it was bound from.
    proxy, audit = make()
    sql = "SELECT full_name FROM customers"
    proxy.from_client(
        wire(m.Parse("s", sql, ()), m.Bind("p", "s", (), (), ()), m.Close(b"S", "s"), m.Sync())
    )
    proxy.from_server(
        wire(m.ParseComplete(), m.BindComplete(), m.CloseComplete(), m.ReadyForQuery(b"T"))
    )
    cmds = proxy.from_client(wire(m.Execute("p", 0), m.Sync()))
    assert m.Execute("p", 0) in to_server(cmds)
    assert _statements(audit)[-1]["statement"] == sql
