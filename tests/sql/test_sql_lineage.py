"""sql column lineage: the context of each column use and the base relations behind it."""

from __future__ import annotations

import pytest

from guard.broker.sql.analyze import ColumnContext, analyze

OUT = ColumnContext.OUTPUT
DER = ColumnContext.DERIVED
PRED = ColumnContext.PREDICATE
WRITE = ColumnContext.WRITE_SOURCE


def uses(sql: str) -> set[tuple[str, frozenset[str], ColumnContext]]:
    analysis = analyze(sql)
    assert analysis.error is None, analysis.error
    (statement,) = analysis.statements
    assert statement.fail_closed is None, statement.fail_closed
    return {
        (u.column, frozenset(str(c) for c in u.candidates), u.context) for u in statement.columns
    }


def contexts_of(sql: str, column: str = "ssn", table: str = "customers") -> set[ColumnContext]:
    """Contexts in which `table.column` (or '*' of table) is used."""
    return {
        ctx
        for col, cands, ctx in uses(sql)
        if col in (column, "*") and any(c.rpartition(".")[2] == table for c in cands)
    }


C = frozenset({"customers"})

# Plain reads: the protected value leaves only as itself -> only OUTPUT.
PLAIN_READS = [
    "SELECT ssn FROM customers",
    # Contract 2.1: GROUP BY a bare protected column groups by the masked value (view).
    "SELECT ssn, count(*) FROM customers GROUP BY ssn",
    "SELECT count(*) FROM customers GROUP BY ssn",
    "SELECT full_name, ssn FROM customers LIMIT 3",
    "SELECT c.ssn FROM customers c",
    "SELECT customers.ssn FROM customers",
    "SELECT public.customers.ssn FROM public.customers",
    'SELECT "ssn" FROM "customers"',
    'SELECT U&"\\0073sn" FROM customers',
    "SELECT SSN FROM CUSTOMERS",
    "SELECT ssn AS x FROM customers",
    "SELECT * FROM customers",
    "SELECT c.* FROM customers c",
    "TABLE customers",
    "SELECT * FROM ONLY customers",
    "SELECT * FROM customers TABLESAMPLE BERNOULLI (50)",
    "SELECT c FROM customers c",
    "SELECT c::text FROM customers c",
    "SELECT c.*::text FROM customers c",
    "SELECT (c).ssn FROM customers c",
    "SELECT (c.*).ssn FROM customers c",
    "SELECT DISTINCT ssn FROM customers",
    "SELECT * FROM customers AS x(a, b, c)",
    "SELECT x FROM (SELECT ssn AS x FROM customers) s",
    "SELECT s.* FROM (SELECT ssn FROM customers) s",
    "SELECT * FROM (SELECT * FROM customers) s",
    "WITH c AS (SELECT ssn FROM customers) SELECT ssn FROM c",
    "WITH c(a) AS (SELECT ssn FROM customers) SELECT a FROM c",
    "WITH products AS (SELECT * FROM customers) SELECT * FROM products",
    "SELECT ssn FROM customers UNION SELECT name FROM products",
    "SELECT name FROM products UNION ALL SELECT ssn FROM customers",
    "SELECT * FROM products p, LATERAL (SELECT ssn FROM customers c WHERE c.id = p.id) x",
    "SELECT (SELECT ssn FROM customers WHERE id = 1)",
    "SELECT * FROM customers c JOIN accounts a ON a.customer_id = c.id",
    "SELECT ssn FROM customers WHERE id = $1",
    "SELECT v.*, ssn FROM (VALUES (1)) AS v(x), customers",
    "UPDATE customers SET full_name = 'x' WHERE id = 1 RETURNING ssn",
    "DELETE FROM customers WHERE id = 1 RETURNING *",
    "INSERT INTO customers (full_name) VALUES ('x') RETURNING customers.*",
    "WITH d AS (DELETE FROM customers WHERE id = 1 RETURNING ssn) SELECT ssn FROM d",
    "COPY customers TO STDOUT",
    "COPY customers (id, ssn) TO STDOUT",
    "COPY (SELECT ssn FROM customers) TO STDOUT",
    "DECLARE cur CURSOR WITH HOLD FOR SELECT * FROM customers",
    "PREPARE p AS SELECT ssn FROM customers WHERE id = $1",
    "EXPLAIN ANALYZE SELECT ssn FROM customers",
    "SELECT count(*), (SELECT ssn FROM customers LIMIT 1) FROM products",
    "SELECT 1 FROM customers WHERE EXISTS (SELECT ssn FROM customers)",
]


@pytest.mark.parametrize("sql", PLAIN_READS)
def test_plain_reads_are_output_only(sql):
    assert contexts_of(sql) == {OUT}


DERIVED = [
    "SELECT upper(ssn) FROM customers",
    "SELECT lower(c.ssn) FROM customers c",
    "SELECT ssn || '' FROM customers",
    "SELECT ssn::bytea FROM customers",
    "SELECT ssn::text FROM customers",
    "SELECT CAST(ssn AS bigint) FROM customers",
    "SELECT substr(ssn, 1, 3) FROM customers",
    "SELECT reverse(ssn) FROM customers",
    "SELECT translate(ssn, '0123456789', 'abcdefghij') FROM customers",
    "SELECT md5(ssn) FROM customers",
    "SELECT encode(sha256(ssn::bytea), 'hex') FROM customers",
    "SELECT format('%s', ssn) FROM customers",
    "SELECT concat(ssn) FROM customers",
    "SELECT min(ssn) FROM customers",
    "SELECT max(ssn) OVER () FROM customers",
    "SELECT array_agg(ssn) FROM customers",
    "SELECT string_agg(ssn, ',') FROM customers",
    "SELECT json_agg(c) FROM customers c",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT to_json(c.*) FROM customers c",
    "SELECT to_jsonb(c) -> 'ssn' FROM customers c",
    "SELECT c::text || '' FROM customers c",
    "SELECT (c).ssn || '' FROM customers c",
    "SELECT CASE WHEN ssn LIKE '1%' THEN 1 END FROM customers",
    "SELECT 1 / (left(ssn, 3) = '123')::int FROM customers",
    "SELECT ssn = '123-45-6789' FROM customers",
    "SELECT ARRAY[ssn] FROM customers",
    "SELECT ROW(ssn) FROM customers",
    "SELECT ARRAY(SELECT ssn FROM customers)",
    "SELECT upper((SELECT ssn FROM customers LIMIT 1))",
    "SELECT set_config('x.y', ssn, false) FROM customers",
    "SELECT pg_notify('chan', ssn) FROM customers",
    "SELECT xmlelement(name x, ssn) FROM customers",
    "SELECT JSON_OBJECT('k': ssn) FROM customers",
    "SELECT jsonb_path_query(to_jsonb(c), '$.ssn') FROM customers c",
    "SELECT upper(x) FROM (SELECT ssn AS x FROM customers) s",
    "SELECT upper(s.x) FROM (SELECT * FROM (SELECT ssn AS x FROM customers) i) s",
    "WITH c AS (SELECT ssn FROM customers) SELECT upper(ssn) FROM c",
    "WITH c(a) AS (SELECT ssn FROM customers) SELECT upper(a) FROM c",
    "WITH c AS (SELECT * FROM customers) SELECT md5(c.ssn) FROM c",
    "SELECT upper(u) FROM (SELECT name AS u FROM products UNION SELECT ssn FROM customers) s",
    "SELECT upper(x) FROM (VALUES ((SELECT ssn FROM customers LIMIT 1))) v(x)",
    "SELECT upper(column1) FROM (VALUES ((SELECT ssn FROM customers LIMIT 1))) v",
    "SELECT upper(a) FROM customers AS x(a, b, c)",
    "SELECT * FROM customers c, LATERAL unnest(ARRAY[c.ssn]) u",
    "SELECT * FROM customers c, json_each(row_to_json(c)) j",
    "WITH RECURSIVE r(x) AS (SELECT ssn FROM customers UNION SELECT upper(x) FROM r)"
    " SELECT x FROM r",
    "WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT ssn FROM customers)"
    " SELECT upper(ssn) FROM a",
    "WITH RECURSIVE r AS (SELECT ssn FROM customers) SEARCH DEPTH FIRST BY ssn SET o"
    " SELECT o FROM r",
    "SELECT 'x' || ssn FROM customers UNION SELECT name FROM products",
    "EXPLAIN SELECT upper(ssn) FROM customers",
]


@pytest.mark.parametrize("sql", DERIVED)
def test_derived_uses(sql):
    assert DER in contexts_of(sql)


PREDICATES = [
    "SELECT 1 FROM customers WHERE ssn = '123-45-6789'",
    "SELECT 1 FROM customers WHERE ssn LIKE '1%'",
    "SELECT 1 FROM customers WHERE ssn ~ '^1'",
    "SELECT 1 FROM customers WHERE md5(ssn) = md5('x')",
    "SELECT 1 FROM customers c JOIN accounts a ON a.ref = c.ssn",
    "SELECT 1 FROM accounts a JOIN customers c USING (ssn)",
    "SELECT 1 FROM customers NATURAL JOIN other",
    "SELECT count(*) FROM customers GROUP BY left(ssn, 1)",
    "SELECT ssn, count(*) FROM customers GROUP BY 1",
    "SELECT count(*) FROM customers GROUP BY ROLLUP (ssn)",
    "SELECT count(*) FROM customers HAVING max(ssn) > '5'",
    "SELECT * FROM customers ORDER BY ssn",
    "SELECT * FROM customers ORDER BY ssn LIMIT 1 OFFSET 3",
    "SELECT ssn FROM customers ORDER BY 1",
    "SELECT * FROM customers ORDER BY 3",
    "SELECT ssn AS x FROM customers ORDER BY x",
    "SELECT id FROM customers c ORDER BY c",
    "SELECT DISTINCT ON (ssn) id FROM customers",
    "SELECT rank() OVER (ORDER BY ssn) FROM customers",
    "SELECT count(*) OVER (PARTITION BY ssn) FROM customers",
    "SELECT count(*) OVER w FROM customers WINDOW w AS (ORDER BY ssn)",
    "SELECT string_agg(full_name, ',' ORDER BY ssn) FROM customers",
    "SELECT count(*) FILTER (WHERE ssn > '5') FROM customers",
    "SELECT 1 FROM products WHERE name IN (SELECT ssn FROM customers)",
    "SELECT 1 FROM products WHERE EXISTS (SELECT 1 FROM customers WHERE ssn = '1')",
    "SELECT 1 WHERE (SELECT ssn FROM customers LIMIT 1) = 'x'",
    "SELECT 1 FROM products LIMIT (SELECT length(ssn) FROM customers LIMIT 1)",
    "SELECT x FROM (SELECT ssn AS x FROM customers) s WHERE x > '5'",
    "WITH c AS (SELECT ssn FROM customers) SELECT 1 FROM c ORDER BY ssn",
    "SELECT ssn FROM customers UNION SELECT name FROM products ORDER BY 1",
    "SELECT ssn FROM customers UNION SELECT name FROM products ORDER BY ssn",
    "SELECT ssn FROM customers INTERSECT SELECT '123-45-6789'",
    "SELECT '123-45-6789' EXCEPT SELECT ssn FROM customers",
    "SELECT ssn FROM customers EXCEPT ALL SELECT name FROM products",
    "UPDATE products SET price = 1 WHERE name = (SELECT ssn FROM customers LIMIT 1)",
    "UPDATE customers SET full_name = 'x' WHERE ssn = '123-45-6789'",
    "DELETE FROM customers WHERE ssn LIKE '1%'",
    "DELETE FROM products p USING customers c WHERE c.ssn = p.name",
    "MERGE INTO products p USING customers c ON p.name = c.ssn WHEN MATCHED AND p.id = 1"
    " THEN DELETE",
    "COPY customers FROM STDIN WHERE ssn > '5'",
    "INSERT INTO customers (id) VALUES (1) ON CONFLICT (ssn) DO NOTHING",
    "EXPLAIN SELECT * FROM customers WHERE ssn = '1'",
    "SELECT 1 FROM customers c WHERE (c).ssn = '1'",
    "SELECT 1 FROM customers c WHERE c::text LIKE '%1%'",
    "SELECT 1 FROM customers c WHERE row_to_json(c)::text LIKE '%1%'",
]


@pytest.mark.parametrize("sql", PREDICATES)
def test_predicate_uses(sql):
    assert PRED in contexts_of(sql)


WRITES = [
    "INSERT INTO products (name) SELECT ssn FROM customers",
    "INSERT INTO products SELECT * FROM customers",
    "INSERT INTO products (name) VALUES ((SELECT ssn FROM customers LIMIT 1))",
    "INSERT INTO products SELECT * FROM (SELECT ssn FROM customers) s",
    "INSERT INTO products (name) SELECT ssn FROM customers UNION SELECT 'x'",
    "UPDATE products SET name = c.ssn FROM customers c WHERE c.id = products.id",
    "UPDATE products SET name = (SELECT ssn FROM customers LIMIT 1) WHERE id = 1",
    "UPDATE customers SET full_name = ssn WHERE id = 1",
    "CREATE TABLE copy AS SELECT ssn FROM customers",
    "CREATE TEMP TABLE copy AS SELECT * FROM customers",
    "SELECT * INTO TEMP copy FROM customers",
    "CREATE MATERIALIZED VIEW mv AS SELECT ssn FROM customers",
    "CREATE VIEW v AS SELECT ssn FROM customers",
    "MERGE INTO products p USING customers c ON p.id = c.id WHEN NOT MATCHED THEN"
    " INSERT (name) VALUES (c.ssn)",
    "MERGE INTO products p USING customers c ON p.id = c.id WHEN MATCHED AND p.id > 0 THEN"
    " UPDATE SET name = c.ssn",
    "INSERT INTO products (id, name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE"
    " SET name = (SELECT ssn FROM customers LIMIT 1)",
]


@pytest.mark.parametrize("sql", WRITES)
def test_write_sources(sql):
    assert contexts_of(sql) & {WRITE, DER}
    assert WRITE in contexts_of(sql) or DER in contexts_of(sql)


def test_write_source_context_exact():
    assert ("ssn", C, WRITE) in uses("INSERT INTO products (name) SELECT ssn FROM customers")
    assert ("*", C, WRITE) in uses("INSERT INTO products SELECT * FROM customers")
    assert ("ssn", frozenset({"customers"}), WRITE) in uses(
        "UPDATE customers SET full_name = ssn WHERE id = 1"
    )


# --- candidates ---------------------------------------------------------------------------


def test_qualified_reference_resolves_to_its_alias_only():
    found = uses("SELECT c.ssn, a.number FROM customers c JOIN accounts a ON a.cid = c.id")
    assert ("ssn", C, OUT) in found
    assert ("number", frozenset({"accounts"}), OUT) in found
    assert ("cid", frozenset({"accounts"}), PRED) in found


def test_unqualified_reference_gets_every_relation_in_scope():
    found = uses("SELECT ssn FROM customers c JOIN accounts a ON true")
    assert ("ssn", frozenset({"customers", "accounts"}), OUT) in found


def test_correlated_reference_includes_outer_scope():
    found = uses("SELECT 1 FROM customers c WHERE EXISTS (SELECT 1 FROM accounts WHERE ssn = '1')")
    assert ("ssn", frozenset({"customers", "accounts"}), PRED) in found


def test_schema_qualified_candidates_keep_schema():
    found = uses("SELECT s.customers.ssn FROM s.customers")
    assert ("ssn", frozenset({"s.customers"}), OUT) in found


def test_star_expands_only_the_current_level():
    found = uses("SELECT * FROM products WHERE id IN (SELECT cid FROM customers)")
    assert ("*", frozenset({"products"}), OUT) in found
    assert not any(col == "*" and "customers" in c for col, c, _ in found)


def test_alias_column_list_makes_renamed_columns_unknown():
    found = uses("SELECT a, zzz FROM customers AS x(a, b)")
    assert ("*", C, OUT) in found  # `a` may be any column
    assert ("zzz", C, OUT) in found  # beyond the list: original names


def test_whole_row_and_column_of_same_name_both_recorded():
    found = uses("SELECT ssn FROM customers ssn")
    assert ("ssn", C, OUT) in found
    assert ("*", C, OUT) in found


def test_function_entries_have_no_base_columns():
    assert uses("SELECT g FROM generate_series(1, 3) g") == set()
    assert uses("SELECT x.a FROM json_to_record('{}') AS x(a int)") == set()


def test_dml_target_columns_are_not_uses():
    assert uses("UPDATE customers SET ssn = '1' WHERE id = 1") == {("id", C, PRED)}
    assert uses("INSERT INTO customers (ssn) VALUES ('1')") == set()


def test_on_conflict_excluded_is_the_target():
    found = uses(
        "INSERT INTO products (id, name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE"
        " SET name = excluded.name WHERE products.price > 0"
    )
    assert ("name", frozenset({"products"}), WRITE) in found
    assert ("price", frozenset({"products"}), PRED) in found
    assert ("id", frozenset({"products"}), PRED) in found


def test_outer_reference_through_cte_resolves_to_base_column():
    found = uses("WITH c AS (SELECT id, ssn AS s FROM customers) SELECT 1 FROM c WHERE s = 'x'")
    assert ("ssn", C, PRED) in found
    assert ("s", C, PRED) not in found


def test_join_alias_resolves_through():
    found = uses(
        "SELECT j.ssn FROM (customers c JOIN accounts a ON true) AS j WHERE upper(j.ssn) = ''"
    )
    assert ("ssn", frozenset({"customers", "accounts"}), PRED) in found


def test_uses_are_deduplicated_in_order():
    statement = analyze("SELECT ssn, ssn, ssn FROM customers").statements[0]
    assert len(statement.columns) == 1
