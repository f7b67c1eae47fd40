"""sql column lineage: unqualified names resolve in PostgreSQL's scopes (issue 16).

An unqualified column belongs to the innermost query level whose FROM has a relation with
that column, then the next level out; a CTE column is exactly the CTE query's output column
at that position (its alias list renames by position), and a recursive CTE's is that column
of its non-recursive and recursive terms. Without the catalog a base relation *may* have any
column, so the search keeps it as a candidate and goes on outward: never fewer candidates
than PostgreSQL could pick.
"""

from __future__ import annotations

import pytest

from guard.broker.sql.analyze import ColumnContext, analyze
from tests.sql.test_sql_lineage import DER, OUT, PRED, C, contexts_of, uses

P = frozenset({"products"})


# --- the issue's case: recursive CTE with a scalar subquery in the recursive term ---------

ISSUE_QUERY = (
    "WITH RECURSIVE t(n, ssn) AS (SELECT 1, ssn FROM customers WHERE id = 1"
    " UNION ALL SELECT n + 1, ssn FROM t WHERE n < (SELECT max(id) FROM products"
    " WHERE price > 0)) SELECT ssn FROM t"
)


def test_scalar_subquery_in_recursive_term_resolves_innermost():
    found = uses(ISSUE_QUERY)
    assert contexts_of(ISSUE_QUERY) == {OUT}
    assert ("id", P, PRED) in found  # max(id) is products.id, not a column of t
    assert ("price", P, PRED) in found
    assert ("id", C, PRED) in found  # WHERE id = 1 of the non-recursive term


def test_recursive_cte_without_alias_list():
    sql = (
        "WITH RECURSIVE t AS (SELECT 1 AS n, ssn FROM customers UNION ALL"
        " SELECT n + 1, ssn FROM t WHERE n < (SELECT count(*) FROM products"
        " WHERE name <> '')) SELECT ssn FROM t"
    )
    assert contexts_of(sql) == {OUT}
    assert ("name", P, PRED) in uses(sql)


def test_recursive_cte_unnamed_constant_column():
    # `SELECT 1, ssn`: the first column is "?column?", so `price` cannot be a column of t.
    sql = (
        "WITH RECURSIVE t AS (SELECT 1, ssn FROM customers UNION ALL SELECT 2, ssn FROM t"
        " WHERE EXISTS (SELECT 1 FROM products WHERE price > 0)) SELECT ssn FROM t"
    )
    assert contexts_of(sql) == {OUT}


def test_recursive_cte_columns_moving_between_positions_are_followed():
    # After two iterations c holds the ssn: the fixpoint must not stop at the first pass
    # whose set of sources (over all columns) did not grow.
    sql = (
        "WITH RECURSIVE t(a, b, c) AS (SELECT ssn, '1', '2' FROM customers UNION ALL"
        " SELECT c, a, b FROM t) SELECT upper(c) FROM t"
    )
    assert DER in contexts_of(sql)


def test_recursive_term_predicate_on_protected_column_stays_refused():
    sql = (
        "WITH RECURSIVE t(n, s) AS (SELECT 1, ssn FROM customers UNION ALL"
        " SELECT n + 1, s FROM t WHERE s LIKE '1%') SELECT n FROM t"
    )
    assert PRED in contexts_of(sql)
    swapped = (
        "WITH RECURSIVE t AS (SELECT ssn AS a, '1' AS b FROM customers UNION ALL"
        " SELECT b, a FROM t WHERE b = 'x') SELECT a FROM t"
    )
    assert PRED in contexts_of(swapped)


def test_recursive_cte_order_by_protected_column_stays_refused():
    sql = (
        "WITH RECURSIVE t(n, s) AS (SELECT 1, ssn FROM customers UNION ALL"
        " SELECT n + 1, s FROM t WHERE n < 3) SELECT s FROM t ORDER BY s"
    )
    assert PRED in contexts_of(sql)


# --- CTE alias lists --------------------------------------------------------------------


def test_cte_alias_list_maps_by_position():
    base = "WITH c(a, b) AS (SELECT ssn, full_name FROM customers) "
    assert contexts_of(base + "SELECT upper(b) FROM c") == {OUT}
    assert ("full_name", C, DER) in uses(base + "SELECT upper(b) FROM c")
    assert DER in contexts_of(base + "SELECT upper(a) FROM c")


def test_cte_alias_list_swapping_names():
    base = "WITH c(full_name, ssn) AS (SELECT ssn, full_name FROM customers) "
    assert contexts_of(base + "SELECT lower(ssn) FROM c") == {OUT}
    assert DER in contexts_of(base + "SELECT lower(full_name) FROM c")
    assert PRED in contexts_of(base + "SELECT 1 FROM c WHERE full_name = 'x'")


def test_cte_alias_list_shorter_than_the_columns():
    base = "WITH c(x) AS (SELECT ssn, full_name FROM customers) "
    assert DER in contexts_of(base + "SELECT upper(x) FROM c")
    assert contexts_of(base + "SELECT upper(full_name) FROM c") == {OUT}


# --- CTEs shadowing table names ---------------------------------------------------------


def test_cte_shadowing_a_table_name():
    sql = (
        "WITH products AS (SELECT id, ssn AS name FROM customers) SELECT upper(name) FROM products"
    )
    assert DER in contexts_of(sql)


def test_inner_cte_shadowing_a_table_without_the_column_resolves_outward():
    # The inner `customers` is the CTE (no ssn): PostgreSQL takes ssn from the outer level.
    sql = (
        "SELECT (WITH customers AS (SELECT 1 AS id) SELECT max(ssn) FROM customers) FROM customers"
    )
    assert DER in contexts_of(sql)


def test_inner_cte_shadowing_an_outer_cte():
    sql = (
        "WITH c AS (SELECT ssn FROM customers) "
        "SELECT (WITH c AS (SELECT 'x' AS ssn) SELECT upper(ssn) FROM c) FROM c"
    )
    assert contexts_of(sql) == {OUT}


# --- LATERAL and non-LATERAL subqueries in FROM -----------------------------------------


def test_lateral_subquery_sees_earlier_from_items():
    assert DER in contexts_of("SELECT l.x FROM customers c, LATERAL (SELECT upper(c.ssn) AS x) l")
    found = uses("SELECT p.* FROM customers c, LATERAL (SELECT ssn FROM products) p")
    assert ("ssn", frozenset({"products", "customers"}), OUT) in found


def test_non_lateral_subquery_skips_earlier_from_items():
    # `ssn` in z cannot see s (not LATERAL): PostgreSQL takes customers.ssn from outside.
    sql = "SELECT (SELECT 1 FROM (SELECT 1 AS ssn) s, (SELECT upper(ssn)) z) FROM customers"
    assert DER in contexts_of(sql)
    lateral = (
        "SELECT (SELECT 1 FROM (SELECT 1 AS ssn) s, LATERAL (SELECT upper(ssn)) z) FROM customers"
    )
    assert contexts_of(lateral) == set()


def test_lateral_in_join_sees_left_side():
    sql = "SELECT x FROM customers c JOIN LATERAL (SELECT upper(c.ssn) AS x) l ON true"
    assert DER in contexts_of(sql)


def test_join_on_does_not_see_other_from_items():
    sql = (
        "SELECT (SELECT 1 FROM (SELECT 1 AS ssn) s, (SELECT 1 AS a) a"
        " JOIN (SELECT 2 AS b) b ON ssn = 'x') FROM customers"
    )
    assert PRED in contexts_of(sql)


# --- correlated references --------------------------------------------------------------


def test_correlated_scalar_subquery_resolves_outward():
    found = uses("SELECT (SELECT max(price) FROM products WHERE name = ssn) FROM customers")
    assert ("ssn", frozenset({"products", "customers"}), PRED) in found


def test_correlated_reference_past_a_derived_table_without_the_column():
    sql = "SELECT (SELECT upper(ssn) FROM (SELECT 1 AS id) x) FROM customers"
    assert ("ssn", C, DER) in uses(sql)


def test_derived_table_with_the_column_stops_the_search():
    # p surely has `ssn` (a literal): the outer customers.ssn is not a candidate.
    sql = (
        "SELECT 1 FROM customers c WHERE EXISTS"
        " (SELECT 1 FROM (SELECT 'x' AS ssn) p WHERE ssn = '1')"
    )
    assert contexts_of(sql) == set()


def test_base_relation_may_lack_the_column_so_outer_levels_stay_candidates():
    # Without the catalog, products may have no `id`: PostgreSQL would then take c.id.
    found = uses(
        "SELECT 1 FROM customers c WHERE EXISTS (SELECT 1 FROM (SELECT id FROM products) p"
        " WHERE id = 1)"
    )
    assert ("id", frozenset({"products", "customers"}), PRED) in found


def test_outer_scalar_subquery_on_protected_column_stays_refused():
    assert PRED in contexts_of("SELECT id FROM customers WHERE (SELECT ssn) = '1'")
    assert DER in contexts_of("SELECT (SELECT upper(ssn)) FROM customers")
    assert PRED in contexts_of(
        "SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM products WHERE name = ssn)"
    )


def test_unnamed_subquery_output_may_have_any_name():
    # FigureColname names a scalar-subquery target after its inner target ("ssn"); the
    # analyser does not, so the name stays possible rather than absent.
    sql = "SELECT upper(ssn) FROM (SELECT (SELECT ssn FROM customers LIMIT 1)) x"
    assert DER in contexts_of(sql)


@pytest.mark.parametrize(
    "sql",
    [
        ISSUE_QUERY,
        "SELECT (SELECT 1 FROM (SELECT 1 AS ssn) s, (SELECT upper(ssn)) z) FROM customers",
    ],
)
def test_policy_relevant_contexts_are_deterministic(sql):
    first = analyze(sql).statements[0].columns
    assert first == analyze(sql + " ").statements[0].columns
    assert all(isinstance(u.context, ColumnContext) for u in first)


# --- found by the PostgreSQL property test (test_sql_scoping_pg) ------------------------


def test_star_does_not_take_a_name_from_a_derived_table_without_it():
    # s.* expands a2 (which has c3) and a5 (only c6, from ssn): c3 is not the ssn.
    sql = (
        "SELECT c3 FROM (SELECT * FROM (SELECT id FROM customers) a2(c3),"
        " LATERAL (SELECT customers.ssn FROM customers) a5(c6)) s WHERE c3 > 0"
    )
    assert contexts_of(sql) == {OUT}


def test_column_found_through_star_may_have_no_sources():
    # n comes from a literal; finding it through `*` must not fall back to every column.
    sql = (
        "SELECT * FROM (WITH RECURSIVE r(n, a) AS (SELECT 1, ssn FROM customers"
        " UNION ALL SELECT n + 1, a FROM r WHERE n < 3) SELECT * FROM r) s WHERE n > 1"
    )
    assert contexts_of(sql) == {OUT}


def test_order_by_output_name_sorts_by_the_output_column():
    # PostgreSQL's SQL92 rule: ORDER BY / DISTINCT ON an output name is that output column.
    assert contexts_of("SELECT id AS ssn FROM customers ORDER BY ssn") == set()
    assert contexts_of("SELECT DISTINCT ON (ssn) id AS ssn FROM customers") == set()
    assert PRED in contexts_of("SELECT ssn AS x FROM customers ORDER BY x")
    assert PRED in contexts_of("SELECT id AS x FROM customers ORDER BY ssn")
    # GROUP BY prefers the input column.
    assert PRED in contexts_of("SELECT id AS ssn FROM customers GROUP BY ROLLUP (ssn)")


def test_name_a_derived_table_does_not_expose_may_be_any_of_its_values():
    # `s.f` may be f(s) (field notation); with an output whose name is not figured
    # (CASE is "case" only sometimes) every value of s stays a candidate.
    sql = "SELECT s.f FROM (SELECT ssn AS x, CASE WHEN true THEN 1 END FROM customers) s"
    assert contexts_of(sql) == {OUT}
    assert DER in contexts_of(
        "SELECT upper(s.f) FROM (SELECT ssn AS x, CASE WHEN true THEN 1 END FROM customers) s"
    )
