"""Every legitimate spelling of a protected table reads masked rows through the gateway
(issue 16, SECURITY-CONTRACT §2.1): schema-qualified, quoted and U& names, 3-part column
references, TABLE, ONLY, COPY t TO, TABLESAMPLE, and reads after the client changes its
own search_path. Before redirection each of these was `permission denied` (the backstop);
now each succeeds, masked, and no raw value comes back on any path tried here.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.fix_stack import Stack, gateway_connect

pytestmark = pytest.mark.integration

RAW_SSN = "123-45-6789"
MASKED_SSN = "***-**-6789"
MASKED_ACCOUNT_SUFFIX = "9012"


@pytest.fixture(scope="module")
def session(dev_stack: Stack):
    body, headers = dev_stack.open_session()
    yield body
    dev_stack.end_session(body["session_id"], headers)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT ssn FROM public.customers WHERE id = 1",
        'SELECT ssn FROM "public"."customers" WHERE id = 1',
        'SELECT ssn FROM U&"\\0070ublic".customers WHERE id = 1',
        "SELECT ssn FROM U&\"p!0075blic\" UESCAPE '!'.U&\"customer!0073\" UESCAPE '!' WHERE id = 1",
        "SELECT ssn FROM demo.public.customers WHERE id = 1",
        "SELECT public.customers.ssn FROM public.customers WHERE id = 1",
        "SELECT demo.public.customers.ssn FROM public.customers WHERE id = 1",
        "SELECT c.ssn FROM ONLY public.customers c WHERE c.id = 1",
        "SELECT x.ssn FROM (TABLE public.customers) x WHERE x.id = 1",
        "SELECT ssn FROM public.customers JOIN public.accounts a ON a.customer_id = customers.id"
        " WHERE customers.id = 1 LIMIT 1",
        "SELECT (c).ssn FROM public.customers c WHERE id = 1",
        "WITH t AS (SELECT * FROM public.customers) SELECT ssn FROM t WHERE id = 1",
        "SELECT ssn FROM public.customers WHERE id = 1 UNION ALL SELECT name FROM products"
        " WHERE false",
    ],
    ids=[
        "qualified",
        "quoted",
        "unicode-escape",
        "uescape",
        "catalog-qualified",
        "three-part-column",
        "four-part-column",
        "only",
        "table-statement",
        "join",
        "whole-row-field",
        "cte",
        "union",
    ],
)
def test_every_spelling_reads_masked(session, sql):
    with gateway_connect(session) as conn:
        simple = conn.execute(sql, prepare=False).fetchone()[0]
        extended = conn.execute(sql, (), prepare=True).fetchone()[0]
    assert simple == MASKED_SSN
    assert extended == MASKED_SSN


def test_whole_row_of_a_qualified_table_is_masked(session):
    with gateway_connect(session) as conn:
        row = conn.execute("SELECT c::text FROM public.customers c WHERE id = 1").fetchone()[0]
    assert MASKED_SSN in row and RAW_SSN not in row


def test_copy_of_a_protected_table_to_stdout_is_masked(session):
    with gateway_connect(session) as conn, conn.cursor() as cur:
        for sql in (
            "COPY public.customers (id, ssn) TO STDOUT",
            "COPY customers TO STDOUT",
            'COPY "public".customers (ssn) TO STDOUT WITH (FORMAT csv)',
        ):
            with cur.copy(sql) as copy:
                data = b"".join(bytes(block) for block in copy)
            assert MASKED_SSN.encode() in data, sql
            assert RAW_SSN.encode() not in data, sql


@pytest.mark.parametrize("method", ["BERNOULLI", "SYSTEM"])
def test_tablesample_returns_a_masked_sample(session, method):
    with gateway_connect(session) as conn:
        full = conn.execute(
            f"SELECT count(*) FROM customers TABLESAMPLE {method} (100)"
        ).fetchone()[0]
        every = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
        assert full == every  # 100 %: every row
        rows = conn.execute(
            f"SELECT c.ssn FROM public.customers AS c TABLESAMPLE {method} (%s) REPEATABLE (7)",
            (50,),
        ).fetchall()
    assert 0 < len(rows) < every
    assert all(r[0].startswith("***-**-") for r in rows)


@pytest.mark.parametrize(
    "change",
    [
        "SET search_path = public",
        "SET search_path TO public, pg_catalog",
        "SET search_path = ''",
        'SET SESSION search_path = "$user", public',
        "SELECT set_config('search_path', 'public', false)",
        "SELECT pg_catalog.set_config('search_path', '', false)",
    ],
)
def test_a_client_search_path_keeps_the_masking_views_first(session, change):
    with gateway_connect(session) as conn:
        conn.execute(change)
        path = conn.execute("SHOW search_path").fetchone()[0]
        assert path.startswith("guard_masked")
        qualified = conn.execute("SELECT ssn FROM public.customers WHERE id = 1").fetchone()[0]
        assert qualified == MASKED_SSN
        plain = conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0]
        assert plain == MASKED_SSN


def test_set_local_search_path_in_a_transaction(session):
    with gateway_connect(session) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL search_path = public")
            assert conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0] == (
                MASKED_SSN
            )


def test_a_computed_search_path_is_refused_with_what_to_do(session):
    with gateway_connect(session) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="literal value"):
            conn.execute("SELECT set_config('search_path', %s, false)", ("public",))


def test_writes_are_never_redirected(session):
    # The policy decides writes on the base table (engineers may not write customers).
    with gateway_connect(session) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE public.customers SET phone = '0' WHERE id = 1")


def test_a_read_of_a_protected_table_in_an_update_source_is_masked(session):
    # products may be written by engineers; the FROM reads customers through the view.
    with gateway_connect(session) as conn:
        with conn.transaction():
            cur = conn.execute(
                "UPDATE products p SET name = p.name FROM public.customers c"
                " WHERE c.id = 1 AND p.id = 1 RETURNING c.ssn"
            )
            assert cur.fetchone()[0] == MASKED_SSN
            raise psycopg.Rollback()
