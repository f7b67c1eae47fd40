"""sql.analyze: statement kinds, operations, relations, functions, flags, fail-closed."""

from __future__ import annotations

import pytest

from guard.broker.sql.analyze import (
    Operation,
    RelationRef,
    analyze,
    cache_clear,
    cache_info,
    fast_path_analysis,
)
from guard.broker.sql.model import FLAG_FAST_PATH

Op = Operation


def one(sql: str):
    analysis = analyze(sql)
    assert analysis.error is None, analysis.error
    assert len(analysis.statements) == 1
    return analysis.statements[0]


def rel(name: str, schema: str | None = None) -> RelationRef:
    return RelationRef(schema, name)


# --- operations ---------------------------------------------------------------------------

OPERATIONS = [
    ("SELECT 1", {Op.READ}),
    ("SELECT * FROM products", {Op.READ}),
    ("TABLE products", {Op.READ}),
    ("VALUES (1), (2)", {Op.READ}),
    ("INSERT INTO products (name) VALUES ('x')", {Op.INSERT}),
    ("INSERT INTO products DEFAULT VALUES", {Op.INSERT}),
    ("INSERT INTO products SELECT * FROM staging", {Op.INSERT, Op.READ}),
    (
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = excluded.a",
        {Op.INSERT, Op.UPDATE},
    ),
    ("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING", {Op.INSERT}),
    ("UPDATE products SET price = 1 WHERE id = 2", {Op.UPDATE}),
    (
        "UPDATE products p SET price = s.price FROM staging s WHERE s.id = p.id",
        {Op.UPDATE, Op.READ},
    ),
    ("DELETE FROM products WHERE id = 1", {Op.DELETE}),
    ("DELETE FROM products USING staging s WHERE s.id = products.id", {Op.DELETE, Op.READ}),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.x THEN UPDATE SET a = s.a"
        " WHEN NOT MATCHED THEN INSERT (id) VALUES (s.id)",
        {Op.MERGE, Op.UPDATE, Op.INSERT, Op.READ},
    ),
    ("CREATE TABLE x (a int)", {Op.DDL}),
    ("CREATE TEMP TABLE x (a int)", {Op.DDL}),
    ("DROP TABLE customers", {Op.DDL}),
    ("ALTER TABLE customers ADD COLUMN x int", {Op.DDL}),
    ("CREATE INDEX ON customers (ssn)", {Op.DDL}),
    ("CREATE VIEW v AS SELECT 1", {Op.DDL}),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$", {Op.DDL}),
    ("CREATE EXTENSION dblink", {Op.DDL}),
    ("CREATE SCHEMA s", {Op.DDL}),
    ("CREATE DATABASE d", {Op.DDL}),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", {Op.DDL}),
    ("COMMENT ON TABLE t IS 'x'", {Op.DDL}),
    ("TRUNCATE products", {Op.DDL}),
    ("VACUUM products", {Op.DDL}),
    ("ANALYZE products", {Op.DDL}),
    ("LOAD 'plpgsql'", {Op.DDL}),
    ("ALTER SYSTEM SET work_mem = '1GB'", {Op.DDL}),
    ("SELECT * INTO newt FROM products", {Op.DDL, Op.READ}),
    ("CREATE TABLE t2 AS SELECT * FROM products", {Op.DDL, Op.READ}),
    ("CREATE MATERIALIZED VIEW mv AS SELECT 1", {Op.DDL, Op.READ}),
    ("GRANT SELECT ON customers TO public", {Op.DCL}),
    ("REVOKE SELECT ON customers FROM public", {Op.DCL}),
    ("CREATE ROLE x", {Op.DCL}),
    ("ALTER ROLE x SUPERUSER", {Op.DCL}),
    ("ALTER USER x SET search_path = a", {Op.DCL}),
    ("GRANT admin TO me", {Op.DCL}),
    ("DROP ROLE x", {Op.DCL}),
    ("BEGIN", {Op.TRANSACTION}),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", {Op.TRANSACTION}),
    ("COMMIT", {Op.TRANSACTION}),
    ("ROLLBACK", {Op.TRANSACTION}),
    ("SAVEPOINT s1", {Op.TRANSACTION}),
    ("RELEASE SAVEPOINT s1", {Op.TRANSACTION}),
    ("ROLLBACK TO SAVEPOINT s1", {Op.TRANSACTION}),
    ("SET CONSTRAINTS ALL DEFERRED", {Op.TRANSACTION}),
    ("SET statement_timeout = 0", {Op.SESSION}),
    ("SET DateStyle = 'SQL, DMY'", {Op.SESSION}),
    ("SHOW search_path", {Op.SESSION}),
    ("RESET work_mem", {Op.SESSION}),
    ("DISCARD ALL", {Op.SESSION}),
    ("COPY products TO STDOUT", {Op.COPY, Op.READ}),
    ("COPY products FROM STDIN", {Op.COPY, Op.INSERT}),
    ("COPY (SELECT 1) TO STDOUT", {Op.COPY, Op.READ}),
    ("CALL do_things(1)", {Op.CALL}),
    ("DO $$ BEGIN END $$", {Op.DO}),
    ("EXPLAIN SELECT * FROM products", {Op.EXPLAIN}),
    ("EXPLAIN (ANALYZE) SELECT * FROM products", {Op.EXPLAIN, Op.READ}),
    ("EXPLAIN ANALYZE DELETE FROM products WHERE id = 1", {Op.EXPLAIN, Op.DELETE}),
    ("EXPLAIN (ANALYZE false) DELETE FROM products WHERE id = 1", {Op.EXPLAIN}),
    ("EXPLAIN (ANALYZE off, VERBOSE) DELETE FROM products WHERE id = 1", {Op.EXPLAIN}),
    ("EXPLAIN (ANALYZE 0) DELETE FROM products WHERE id = 1", {Op.EXPLAIN}),
    ("EXPLAIN (ANALYZE 1) DELETE FROM products WHERE id = 1", {Op.EXPLAIN, Op.DELETE}),
    ("EXPLAIN (ANALYZE 'yes') DELETE FROM products WHERE id = 1", {Op.EXPLAIN, Op.DELETE}),
    ("EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1", {Op.EXPLAIN, Op.DDL, Op.READ}),
    ("PREPARE p AS SELECT * FROM products", {Op.PREPARE, Op.READ}),
    ("PREPARE p(int) AS DELETE FROM t WHERE id = $1", {Op.PREPARE, Op.DELETE}),
    ("EXECUTE p(1)", {Op.EXECUTE}),
    ("DEALLOCATE p", {Op.UTILITY}),
    ("DEALLOCATE ALL", {Op.UTILITY}),
    ("DECLARE c CURSOR FOR SELECT * FROM products", {Op.READ}),
    ("DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT 1", {Op.READ}),
    ("FETCH 10 FROM c", {Op.UTILITY}),
    ("MOVE NEXT IN c", {Op.UTILITY}),
    ("CLOSE c", {Op.UTILITY}),
    ("CLOSE ALL", {Op.UTILITY}),
    ("LISTEN chan", {Op.LISTEN}),
    ("UNLISTEN *", {Op.SESSION}),
    ("NOTIFY chan, 'hi'", {Op.NOTIFY}),
    ("LOCK TABLE products IN SHARE MODE", {Op.UTILITY}),
    ("CHECKPOINT", {Op.DDL}),
    ("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d", {Op.DELETE, Op.READ}),
    ("WITH u AS (UPDATE t SET a = 1 WHERE id = 1 RETURNING *) SELECT 1", {Op.UPDATE, Op.READ}),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i", {Op.INSERT, Op.READ}),
]


@pytest.mark.parametrize(("sql", "expected"), OPERATIONS)
def test_operations(sql, expected):
    statement = one(sql)
    assert statement.fail_closed is None
    assert statement.operations == frozenset(expected)


def test_command_is_the_node_name():
    assert one("DROP TABLE t").command == "DropStmt"
    assert one("select 1").command == "SelectStmt"
    assert one("COPY t TO STDOUT").command == "CopyStmt"


# --- relations ----------------------------------------------------------------------------


def test_relations_read_and_written():
    s = one("INSERT INTO public.archive SELECT * FROM customers c JOIN accounts a ON a.id = c.id")
    assert s.relations_written == {rel("archive", "public")}
    assert s.relations_read == {rel("customers"), rel("accounts")}


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ('SELECT * FROM "Customers"', rel("Customers")),
        ("SELECT * FROM CUSTOMERS", rel("customers")),
        ('SELECT * FROM "public"."customers"', rel("customers", "public")),
        ('SELECT * FROM U&"\\0063ustomers"', rel("customers")),
        ("SELECT * FROM U&\"!0063ustomers\" UESCAPE '!'", rel("customers")),
        ("SELECT * FROM ONLY customers", rel("customers")),
        ("SELECT * FROM customers TABLESAMPLE SYSTEM (50)", rel("customers")),
        ("SELECT * FROM mydb.public.customers", rel("customers", "public")),
        ("SELECT/**/*/**/FROM/* c */customers", rel("customers")),
        ("SELECT * FROM -- comment\n customers", rel("customers")),
        ("TABLE transactions", rel("transactions")),
        ("SELECT 1 WHERE EXISTS (SELECT 1 FROM transactions)", rel("transactions")),
        ("SELECT (SELECT max(amount) FROM transactions)", rel("transactions")),
        (
            "SELECT * FROM a, LATERAL (SELECT * FROM transactions t WHERE t.id = a.id) x",
            rel("transactions"),
        ),
        ("SELECT 1 FROM a JOIN transactions USING (id)", rel("transactions")),
        ("SELECT id FROM products UNION SELECT id FROM transactions", rel("transactions")),
        ("WITH x AS (SELECT * FROM transactions) SELECT * FROM x", rel("transactions")),
        (
            "WITH RECURSIVE r AS (SELECT 1 UNION SELECT 1 FROM transactions) SELECT * FROM r",
            rel("transactions"),
        ),
        ("DECLARE c CURSOR FOR SELECT * FROM transactions", rel("transactions")),
        ("COPY transactions TO STDOUT", rel("transactions")),
        ("COPY (SELECT * FROM transactions) TO STDOUT", rel("transactions")),
        ("PREPARE p AS SELECT * FROM transactions", rel("transactions")),
        ("EXPLAIN SELECT * FROM transactions", rel("transactions")),
        ("UPDATE transactions SET amount = 0 WHERE id = 1", rel("transactions")),
        ("DELETE FROM transactions WHERE id = 1", rel("transactions")),
        (
            "SELECT * FROM json_to_record((SELECT row_to_json(t) FROM transactions t LIMIT 1))"
            " AS x(a int)",
            rel("transactions"),
        ),
    ],
)
def test_relation_reads_in_every_spelling(sql, expected):
    assert expected in one(sql).relations_read


def test_cte_name_shadows_table_and_alias_does_not_hide_base():
    assert (
        one("WITH customers AS (SELECT 1 AS ssn) SELECT ssn FROM customers").relations_read == set()
    )
    assert one("SELECT * FROM customers AS products").relations_read == {rel("customers")}
    # a non-recursive CTE does not see itself: the inner reference is the table
    s = one("WITH t AS (SELECT * FROM t) SELECT * FROM t")
    assert s.relations_read == {rel("t")}


def test_insert_target_read_only_with_returning_or_conflict():
    assert one("INSERT INTO t VALUES (1)").relations_read == set()
    assert one("INSERT INTO t VALUES (1) RETURNING *").relations_read == {rel("t")}
    assert one("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING").relations_read == {rel("t")}


def test_truncate_and_ctas_targets_are_written():
    assert one("TRUNCATE a, s.b").relations_written == {rel("a"), rel("b", "s")}
    assert one("CREATE TABLE x AS SELECT 1").relations_written == {rel("x")}
    assert one("SELECT 1 INTO TEMP y").relations_written == {rel("y")}


# --- functions ----------------------------------------------------------------------------


def test_functions_collected_everywhere():
    s = one(
        "SELECT lower(a), pg_catalog.upper(b), count(*) FILTER (WHERE f1(c)) OVER (ORDER BY f2(d))"
        " FROM generate_series(1, 2) g, t WHERE f3(x) AND x IN (SELECT f4(y) FROM u)"
        " ORDER BY f5(z) LIMIT f6()"
    )
    assert {
        "lower",
        "pg_catalog.upper",
        "count",
        "f1",
        "f2",
        "f3",
        "f4",
        "f5",
        "f6",
        "generate_series",
    } <= s.functions


def test_function_names_lowercased_and_qualified():
    assert one("SELECT \"Lo_Import\"(1), PG_READ_FILE('x'), public.F()").functions == {
        "lo_import",
        "pg_read_file",
        "public.f",
    }


def test_call_records_procedure():
    assert one("CALL s.proc(1)").functions == {"s.proc"}


def test_functions_inside_ddl_are_collected():
    s = one("CREATE TABLE x (a text DEFAULT pg_read_file('/etc/passwd'))")
    assert "pg_read_file" in s.functions


# --- flags --------------------------------------------------------------------------------

FLAGS = [
    ("SET ROLE admin", "role_switch"),
    ("SET LOCAL ROLE admin", "role_switch"),
    ('SET "role" = admin', "role_switch"),
    ('SET "role" TO admin', "role_switch"),
    ("SET SESSION ROLE admin", "role_switch"),
    ("set role none", "role_switch"),
    ("RESET ROLE", "role_switch"),
    ("SET SESSION AUTHORIZATION postgres", "role_switch"),
    ("RESET SESSION AUTHORIZATION", "role_switch"),
    ("SET session_authorization = postgres", "role_switch"),
    ("SELECT set_config('role', 'admin', false)", "role_switch"),
    ("SELECT pg_catalog.set_config('ROLE', 'admin', false)", "role_switch"),
    ("SELECT set_config('session_authorization', 'x', true)", "role_switch"),
    (
        "SELECT set_config(setting_name => 'role', new_value => 'x', is_local => false)",
        "role_switch",
    ),
    ("SELECT set_config(lower('ROLE'), 'admin', false)", "role_switch"),
    ("SELECT set_config(x, 'admin', false) FROM t", "role_switch"),
    ("ALTER ROLE me SUPERUSER", "role_switch"),
    ("ALTER USER me SET role = admin", "role_switch"),
    ("SET search_path = public", "set_search_path"),
    ("SET SCHEMA 'public'", "set_search_path"),
    ("SET LOCAL search_path TO evil, public", "set_search_path"),
    ("SELECT set_config('search_path', 'evil', false)", "set_search_path"),
    ("RESET ALL", "set_search_path"),
    ("DISCARD ALL", "set_search_path"),
    ("ALTER SYSTEM SET log_statement = 'none'", "alter_system"),
    ("ALTER SYSTEM RESET ALL", "alter_system"),
    ("TRUNCATE t", "truncate"),
    ("COPY t TO STDOUT", "copy_to_stdout"),
    ("COPY t FROM STDIN", "copy_from_stdin"),
    ("COPY t TO '/tmp/x'", "copy_file"),
    ("COPY t FROM '/etc/passwd'", "copy_file"),
    ("COPY (SELECT 1) TO '/tmp/x'", "copy_file"),
    ("COPY t TO PROGRAM 'sh -c id'", "copy_program"),
    ("COPY t FROM PROGRAM 'id'", "copy_program"),
    ("DO $$ BEGIN PERFORM 1; END $$", "dynamic_sql"),
    ("DO LANGUAGE plpgsql $body$ BEGIN DELETE FROM t; END $body$", "dynamic_sql"),
    ("SELECT query_to_xml('select * from customers', true, true, '')", "dynamic_sql"),
    ("SELECT table_to_xml('customers', true, true, '')", "dynamic_sql"),
    ("SELECT * FROM ts_stat('select v from t')", "dynamic_sql"),
    ("SELECT ts_rewrite('a'::tsquery, 'select q, s from aliases')", "dynamic_sql"),
    ("SELECT cursor_to_xml('c', 10, true, true, '')", "dynamic_sql"),
    ("SELECT database_to_xml(true, true, '')", "dynamic_sql"),
    ("EXECUTE p", "execute_prepared"),
    ("EXPLAIN EXECUTE p(1)", "execute_prepared"),
    ("CREATE TABLE x AS EXECUTE p", "execute_prepared"),
    ("DECLARE c CURSOR FOR SELECT 1", "declare_cursor"),
    ("FETCH ALL c", "cursor_fetch"),
    ("MOVE LAST IN c", "cursor_fetch"),
    ("CLOSE c", "cursor_close"),
    ("LOCK products", "lock"),
    ("UPDATE t SET a = 1", "update_without_where"),
    ("UPDATE t SET a = 1 /* WHERE id = 1 */", "update_without_where"),
    ("UPDATE t SET a = 'WHERE id = 1'", "update_without_where"),
    ("UPDATE t SET a = 1 -- WHERE id = 1", "update_without_where"),
    ("UPDATE t SET a = 1 WHERE true", "update_without_where"),
    ("UPDATE t SET a = 1 WHERE 1 = 1", "update_without_where"),
    ("UPDATE t SET a = 1 WHERE $1", "update_without_where"),
    ("UPDATE t SET a = u.a FROM u", "update_without_where"),
    ("DELETE FROM t", "delete_without_where"),
    ("DELETE FROM t USING u", "delete_without_where"),
    ("delete from t -- where id = 1", "delete_without_where"),
    ("DELETE FROM t WHERE (SELECT true)", "delete_without_where"),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT count(*) FROM d", "delete_without_where"),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT 1", "update_without_where"),
    ("PREPARE p AS DELETE FROM t", "delete_without_where"),
    ("EXPLAIN ANALYZE DELETE FROM t", "delete_without_where"),
    ("EXPLAIN DELETE FROM t", "delete_without_where"),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "delete_without_where"),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "merge_unrestricted_update_delete",
    ),
    (
        "MERGE INTO t USING s ON true WHEN MATCHED THEN UPDATE SET a = 1",
        "merge_unrestricted_update_delete",
    ),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.keep THEN UPDATE SET a = 1"
        " WHEN MATCHED THEN DELETE",
        "merge_unrestricted_update_delete",
    ),
    (
        "WITH x AS (SELECT 1) MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE"
        " THEN DELETE",
        "merge_unrestricted_update_delete",
    ),
]


@pytest.mark.parametrize(("sql", "flag"), FLAGS)
def test_flags(sql, flag):
    assert flag in one(sql).flags


NOT_FLAGGED = [
    ("SET work_mem = '64MB'", "role_switch"),
    ("SET application_name = 'role'", "role_switch"),
    ("SELECT set_config('work_mem', '64MB', false)", "role_switch"),
    ("SELECT set_config('application_name', 'x', false)", "set_search_path"),
    ("RESET ALL", "role_switch"),  # role and session_authorization are GUC_NO_RESET_ALL
    ("UPDATE t SET a = 1 WHERE id = 1", "update_without_where"),
    ("UPDATE t SET a = 1 WHERE CURRENT OF c", "update_without_where"),
    ("DELETE FROM t WHERE id IN (SELECT id FROM u)", "delete_without_where"),
    ("DELETE FROM t WHERE CURRENT OF c", "delete_without_where"),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.gone THEN DELETE",
        "merge_unrestricted_update_delete",
    ),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
        "merge_unrestricted_update_delete",
    ),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DO NOTHING",
        "merge_unrestricted_update_delete",
    ),
    ("SELECT ts_rewrite('a'::tsquery, 'a'::tsquery, 'b'::tsquery)", "dynamic_sql"),
    ("SELECT 'DO $$ BEGIN END $$'", "dynamic_sql"),
    ("SELECT 1 -- SET ROLE admin", "role_switch"),
]


@pytest.mark.parametrize(("sql", "flag"), NOT_FLAGGED)
def test_not_flagged(sql, flag):
    assert flag not in one(sql).flags


def test_prepared_and_cursor_names():
    assert one("PREPARE fetch_user(int) AS SELECT 1").object_name == "fetch_user"
    assert one("EXECUTE fetch_user(1)").object_name == "fetch_user"
    assert one('DECLARE "Cur" CURSOR FOR SELECT 1').object_name == "Cur"
    assert one("FETCH 5 FROM cur").object_name == "cur"
    assert one("CLOSE cur").object_name == "cur"
    assert one("DEALLOCATE fetch_user").object_name == "fetch_user"


# --- multi-statement strings, parse errors, fail closed --------------------------------------


def test_multi_statement_text_sliced_per_statement():
    analysis = analyze(
        "SELECT 'é'; BEGIN;\nUPDATE products SET name='x' /* WHERE id=1 */ ;  COMMIT"
    )
    texts = [s.text for s in analysis.statements]
    assert texts == [
        "SELECT 'é'",
        "BEGIN",
        "UPDATE products SET name='x' /* WHERE id=1 */",
        "COMMIT",
    ]
    assert "update_without_where" in analysis.statements[2].flags
    assert all(s.fingerprint for s in analysis.statements)


def test_dollar_quoted_text_is_data_not_sql():
    s = one("SELECT $x$; DROP TABLE customers; $x$")
    assert s.operations == {Op.READ}
    assert one("SELECT $$ ' $$ FROM t").relations_read == {rel("t")}


def test_fingerprint_ignores_constants_and_normalized_hides_them():
    a, b = one("SELECT * FROM t WHERE id = 1"), one("select *  from t where id=2")
    assert a.fingerprint == b.fingerprint
    assert a.normalized == "SELECT * FROM t WHERE id = $1"
    assert "123-45-6789" not in one("SELECT 1 FROM t WHERE ssn = '123-45-6789'").normalized


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1",
        "SELECT 1 +",
        "EXPLAIN ANALYZE DROP TABLE customers",
        "SELECT 'unterminated",
        "SELECT 1; SELEC 2",
    ],
)
def test_parse_error_gives_no_statements(sql):
    analysis = analyze(sql)
    assert analysis.statements == ()
    assert analysis.error


def test_empty_and_comment_only_text():
    assert analyze("").statements == ()
    assert analyze("  -- nothing\n /* at all */ ;;").statements == ()
    assert analyze("").error is None


@pytest.mark.parametrize("depth", [300, 3000, 20000])
def test_deeply_nested_expression_fails_closed(depth):
    analysis = analyze("SELECT " + "f(" * depth + "1" + ")" * depth)
    assert analysis.error or analysis.statements[0].fail_closed


def test_long_chain_fails_closed_or_parses():
    sql = "SELECT " + " + ".join(["a"] * 5000) + " FROM t"
    analysis = analyze(sql)
    if analysis.error is None:
        s = analysis.statements[0]
        assert s.fail_closed is not None or s.columns


def test_unknown_statement_fails_closed(monkeypatch):
    from guard.broker.sql import nodes, statements
    from guard.broker.sql.statements import analyze_statement

    s = analyze_statement(("ImaginaryStmt", {}), "x", "")
    assert s.fail_closed and "ImaginaryStmt" in s.fail_closed
    assert Op.UNKNOWN in s.operations
    assert "ImaginaryStmt" not in nodes.DDL_NODES | set(statements._HANDLERS)


def test_unknown_expression_fails_closed():
    from guard.broker.sql.statements import analyze_statement

    node = (
        "SelectStmt",
        {"targetList": [{"ResTarget": {"val": {"Imaginary": {}}}}], "op": "SETOP_NONE"},
    )
    s = analyze_statement(node, "x", "")
    assert s.fail_closed and "Imaginary" in s.fail_closed


def test_cache_returns_same_object_and_is_bounded():
    cache_clear()
    first = analyze("SELECT 42")
    assert analyze("SELECT 42") is first
    assert cache_info().hits >= 1  # type: ignore[attr-defined]
    assert cache_info().maxsize == 8192  # type: ignore[attr-defined]


def test_fast_path_analysis():
    s = fast_path_analysis(764)
    assert s.operations == {Op.FUNCTION}
    assert FLAG_FAST_PATH in s.flags
    assert s.object_name == "764"
    # libpq's large-object OIDs are named for the audit record; others stay numbers.
    assert s.functions == {"pg_catalog.lo_import"}
    assert "lo_import" in s.text
    assert fast_path_analysis(955).functions == {"pg_catalog.lowrite"}
    unknown = fast_path_analysis(99999)
    assert unknown.functions == frozenset() and unknown.text.endswith("oid=99999>")


def test_json_and_xml_expressions_are_modelled():
    s = one(
        "SELECT JSON_OBJECT('a': x), JSON_ARRAY(SELECT 1), json_arrayagg(x ORDER BY y), x IS JSON,"
        " JSON_VALUE(j, '$.a'), xmlelement(name e, xmlattributes(x AS a), y), xmlserialize(content"
        " z AS text), XMLPARSE(DOCUMENT '<a/>') FROM t,"
        " XMLTABLE('/r' PASSING d COLUMNS c int PATH 'c') xt,"
        " JSON_TABLE(j, '$' COLUMNS (c int PATH '$.c')) jt"
    )
    assert s.fail_closed is None


def test_many_expression_forms_are_modelled():
    s = one(
        'SELECT a COLLATE "C", CASE WHEN a THEN b ELSE c END, coalesce(a, b), greatest(a, b),'
        " nullif(a, b), current_user, a IS NULL, a IS NOT TRUE, arr[1:2], (x).y[1], row(a, b),"
        " ARRAY[1, 2], ARRAY(SELECT 1), $1::int, a BETWEEN 1 AND 2, a IS DISTINCT FROM b,"
        " a LIKE 'x' ESCAPE '!', a = ANY(ARRAY[1]), a IN (1, 2), f(VARIADIC ARRAY[1]),"
        " f(x => 1), interval '1 day', B'101', 1.5, NULL, grouping(a), sum(x) WITHIN GROUP"
        " (ORDER BY y), count(DISTINCT a), EXISTS (SELECT 1), a OPERATOR(pg_catalog.+) 1"
        " FROM t GROUP BY GROUPING SETS ((a), (b)), CUBE (c), ROLLUP (d), ()"
        " HAVING count(*) > 1 WINDOW w AS (PARTITION BY p ORDER BY o ROWS BETWEEN 1 PRECEDING"
        " AND CURRENT ROW) ORDER BY 1 DESC NULLS LAST LIMIT 5 OFFSET 1 FOR UPDATE SKIP LOCKED"
    )
    assert s.fail_closed is None


def test_completeness_check_fails_closed_on_unvisited_references():
    # column list subscripts of INSERT are not modelled: the ColumnRef `i` is never walked
    s = analyze("INSERT INTO t (a[i]) VALUES (1)").statements[0]
    assert s.fail_closed == "a ColumnRef in a InsertStmt was not analysed"


def test_completeness_check_catches_fields_the_walker_does_not_know():
    from guard.broker.sql.statements import analyze_statement

    # COPY options are not walked; a column reference hidden in one must not pass unseen
    body = {
        "relation": {"relname": "customers"},
        "options": [{"DefElem": {"defname": "x", "arg": {"ColumnRef": {"fields": []}}}}],
    }
    s = analyze_statement(("CopyStmt", body), "x", "")
    assert s.fail_closed == "a ColumnRef in a CopyStmt was not analysed"


def test_type_modifiers_are_not_column_references():
    s = one("SELECT '1'::numeric(ssn), 'x'::mytype(email) FROM customers")
    assert s.fail_closed is None and s.columns == ()


def test_unlisten_is_a_session_reset_not_a_listen():
    from guard.broker.sql.analyze import Operation, analyze

    (stmt,) = analyze("UNLISTEN *").statements
    assert stmt.operations == frozenset({Operation.SESSION})
    (listen,) = analyze("LISTEN ch").statements
    assert Operation.LISTEN in listen.operations
