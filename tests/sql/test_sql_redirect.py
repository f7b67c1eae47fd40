"""`sql.redirect`: reads of protected tables spliced to the masking views, exactly.

Each case is the client's text and the text forwarded; the gateway tests (tests/integration/
test_redirect.py) show PostgreSQL reading them masked. A redirected text is checked to
analyse like the original: the same operations and columns, its protected relations now
the masking views.
"""

from __future__ import annotations

import pytest

from guard.broker.sql.analyze import analyze
from guard.broker.sql.redirect import redirect

PROTECTED = frozenset({("public", "customers"), ("public", "accounts")})
MASKED = "guard_masked"


def forwarded(sql: str) -> str | None:
    result = redirect(sql, PROTECTED, MASKED)
    assert result is None or result.refusal is None
    return None if result is None else result.text


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM public.customers", "SELECT * FROM guard_masked.customers"),
        (
            'SELECT c.ssn, public.customers.ssn FROM "public"."customers" c',
            "SELECT c.ssn, customers.ssn FROM guard_masked.customers c",
        ),
        ('SELECT * FROM U&"\\0070ublic".accounts', "SELECT * FROM guard_masked.accounts"),
        (
            "SELECT * FROM x, U&\"p!0075blic\" UESCAPE '!'.customers",
            "SELECT * FROM x, guard_masked.customers",
        ),
        ("TABLE public.customers", "TABLE guard_masked.customers"),
        ("SELECT 1 FROM demo.public.customers", "SELECT 1 FROM guard_masked.customers"),
        (
            "SELECT * FROM ONLY public.accounts a JOIN public.customers USING (id)",
            "SELECT * FROM ONLY guard_masked.accounts a JOIN guard_masked.customers USING (id)",
        ),
        (
            "SELECT ssn FROM customers TABLESAMPLE SYSTEM (10) REPEATABLE (1)",
            "SELECT ssn FROM (SELECT * FROM customers WHERE pg_catalog.random() * 100 < (10))"
            " AS customers",
        ),
        (
            "SELECT x.ssn FROM public.customers x TABLESAMPLE BERNOULLI ($1)",
            "SELECT x.ssn FROM (SELECT * FROM guard_masked.customers"
            " WHERE pg_catalog.random() * 100 < ($1)) x",
        ),
        (
            "COPY public.customers (id, ssn) TO STDOUT",
            "COPY (SELECT id, ssn FROM guard_masked.customers) TO STDOUT",
        ),
        ("COPY customers TO STDOUT", "COPY (SELECT * FROM customers) TO STDOUT"),
        (
            "SELECT 'é'; SELECT 'ü' || full_name FROM public.customers",
            "SELECT 'é'; SELECT 'ü' || full_name FROM guard_masked.customers",
        ),
        ("SET search_path = public", "SET search_path = guard_masked, public"),
        ("SET LOCAL search_path TO ''", "SET LOCAL search_path TO guard_masked, ''"),
        (
            "SELECT set_config('search_path', 'a, b', false)",
            "SELECT set_config('search_path', E'guard_masked, a, b', false)",
        ),
        (
            "SELECT pg_catalog.set_config('SEARCH_PATH', '', true)",
            "SELECT pg_catalog.set_config('SEARCH_PATH', E'guard_masked', true)",
        ),
        (
            "UPDATE products SET name = 'x' FROM public.customers c WHERE c.id = products.id",
            "UPDATE products SET name = 'x' FROM guard_masked.customers c WHERE c.id = products.id",
        ),
        (
            "DELETE FROM products USING public.accounts a WHERE a.id = products.id",
            "DELETE FROM products USING guard_masked.accounts a WHERE a.id = products.id",
        ),
    ],
)
def test_reads_are_spliced_to_the_masking_views(sql, expected):
    assert forwarded(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM customers",  # the search_path finds the view already
        "SELECT * FROM other.customers",
        "SELECT * FROM products",
        "WITH customers AS (SELECT 1 AS ssn) SELECT ssn FROM customers",
        "UPDATE public.customers SET phone = '1' WHERE id = 1",  # writes: the policy decides
        "INSERT INTO public.customers (id) SELECT 1",
        "DELETE FROM public.customers WHERE id = 1",
        "COPY public.customers FROM STDIN",
        "SET search_path TO guard_masked, public",
        "SET search_path TO DEFAULT",
        "RESET search_path",
        "SELECT set_config('search_path', 'guard_masked, public', false)",
        "SELECT set_config('application_name', 'public', false)",
        "SELECT 'public.customers'",  # a string is not a name
        "SELECT 1 -- FROM public.customers",
        "not sql at all FROM public.customers",
    ],
)
def test_nothing_else_is_touched(sql):
    assert forwarded(sql) is None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT set_config('search_path', $1, false)",
        "SELECT set_config('search_path', current_setting('x'), false)",
    ],
)
def test_a_computed_search_path_is_refused(sql):
    result = redirect(sql, PROTECTED, MASKED)
    assert result is not None and result.refusal and "literal" in result.refusal


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT public.customers.ssn, c.email FROM public.customers JOIN public.accounts c"
        " ON c.customer_id = customers.id WHERE customers.id = $1",
        "WITH t AS (SELECT * FROM public.customers) SELECT ssn FROM t",
        "SELECT * FROM public.customers c, LATERAL (SELECT * FROM public.accounts a"
        " WHERE a.customer_id = c.id) x",
    ],
)
def test_a_redirected_statement_analyses_like_the_original(sql):
    text = forwarded(sql)
    assert text is not None
    before, after = analyze(sql).statements[0], analyze(text).statements[0]
    assert before.operations == after.operations
    assert [(c.column, c.context) for c in before.columns] == [
        (c.column, c.context) for c in after.columns
    ]
    assert {r.name for r in before.relations_read} == {r.name for r in after.relations_read}
    assert {r.schema for r in after.relations_read} <= {MASKED, None}


def test_the_relations_redirected_are_named():
    result = redirect(
        "SELECT * FROM public.customers, public.accounts, customers TABLESAMPLE SYSTEM (1)",
        PROTECTED,
        MASKED,
    )
    assert result is not None
    assert set(result.relations) == {"public.customers", "public.accounts", "*.customers"}
