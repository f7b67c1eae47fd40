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


# --- masked twins of views (found through pg_depend/pg_rewrite, no policy entry) ----------


RAW_EMAIL = "alice@example.com"
MASKED_EMAIL = "a***@example.com"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT email FROM v_customer_contacts WHERE full_name = 'Alice Anderson'",
        "SELECT email FROM public.v_customer_contacts WHERE full_name = 'Alice Anderson'",
        "SELECT v.email FROM \"public\".v_customer_contacts v WHERE v.full_name = 'Alice Anderson'",
        "SELECT upper(email) FROM v_customer_contacts WHERE full_name = 'Alice Anderson'",
    ],
)
def test_a_view_of_protected_columns_reads_masked_through_its_twin(session, sql):
    with gateway_connect(session) as conn:
        simple = conn.execute(sql, prepare=False).fetchone()[0]
        extended = conn.execute(sql, (), prepare=True).fetchone()[0]
    assert simple.lower() == MASKED_EMAIL and extended.lower() == MASKED_EMAIL


def test_views_of_views_and_materialized_views_get_twins(dev_stack: Stack):
    objects = [
        "CREATE VIEW public.v_alice AS SELECT * FROM public.v_customer_contacts"
        " WHERE full_name LIKE 'Alice%'",
        "CREATE MATERIALIZED VIEW public.mv_accounts AS"
        " SELECT a.id, a.account_number, c.ssn FROM accounts a JOIN customers c"
        " ON c.id = a.customer_id",
    ]
    with psycopg.connect(dev_stack.admin_dsn, autocommit=True) as admin:
        for statement in objects:
            admin.execute(statement)
    # Applied through the broker, as an operator does (`guard target apply`): the gateway
    # then reads the new views' OIDs at once (the cells it counts are found by OID).
    bob = {"GUARD_ID_TOKEN": dev_stack.guard("dev", "token", "bob").stdout.strip()}
    try:
        applied = dev_stack.guard("target", "plan", "demo", env=bob)
        assert 'CREATE VIEW "guard_masked"."v_alice"' in applied.stdout
        assert 'CREATE VIEW "guard_masked"."mv_accounts"' in applied.stdout
        applied = dev_stack.guard("target", "apply", "demo", env=bob)
        assert applied.returncode == 0, applied.stderr + applied.stdout
        body, headers = dev_stack.open_session()
        try:
            with gateway_connect(body) as conn:
                alice = conn.execute("SELECT email FROM v_alice").fetchone()[0]
                rows = conn.execute("SELECT account_number, ssn FROM mv_accounts").fetchall()
        finally:
            dev_stack.end_session(body["session_id"], headers)
        assert alice == MASKED_EMAIL
        assert rows and all(n.startswith("********") and s.startswith("***-**-") for n, s in rows)
    finally:
        with psycopg.connect(dev_stack.admin_dsn, autocommit=True) as admin:
            admin.execute("DROP MATERIALIZED VIEW public.mv_accounts")
            admin.execute("DROP VIEW public.v_alice")
        restored = dev_stack.guard("target", "apply", "demo", env=bob)
        assert restored.returncode == 0, restored.stderr + restored.stdout


def test_the_audit_says_how_each_protected_read_was_masked(dev_stack: Stack, session):
    marks = {
        # Literals are normalized away in the record: the aliases tell the statements apart.
        "view": "SELECT ssn AS view_mark FROM customers WHERE id = 1",
        "redirected": "SELECT ssn AS redirected_mark FROM public.customers WHERE id = 1",
        "twin": "SELECT email AS twin_mark FROM v_customer_contacts LIMIT 1",
    }
    with gateway_connect(session) as conn:
        for sql in marks.values():
            conn.execute(sql).fetchall()
    records = [r for r in dev_stack.audit_records() if r.get("kind") == "statement"]

    def masking_of(mark: str) -> list[str]:
        (record,) = [
            r
            for r in records
            if r.get("session_id") == session["session_id"] and mark in r["statement"]
        ]
        return record["masking"]

    assert masking_of("view_mark") == ["public.customers.ssn:view"]
    assert masking_of("redirected_mark") == ["public.customers.ssn:redirected"]
    assert masking_of("twin_mark") == ["public.v_customer_contacts:twin"]


# --- the redirected spellings over every protocol path -------------------------------------

SPELLINGS = [
    "SELECT ssn FROM public.customers WHERE id = 1",
    'SELECT public.customers.ssn FROM "public".customers WHERE id = 1',
    "SELECT ssn FROM customers TABLESAMPLE BERNOULLI (100) WHERE id = 1",
]


@pytest.mark.parametrize("sql", SPELLINGS)
def test_redirected_reads_over_binary_pipeline_and_cursors(session, sql):
    with gateway_connect(session) as conn:
        binary = conn.cursor(binary=True).execute(sql).fetchone()[0]
        with conn.pipeline():
            first = conn.execute(sql, prepare=True)
            second = conn.execute(sql, prepare=True)
        piped = [first.fetchone()[0], second.fetchone()[0]]
        with conn.transaction():
            conn.execute(f"DECLARE c SCROLL CURSOR WITH HOLD FOR {sql}")
        fetched = conn.execute("FETCH ALL FROM c").fetchall()
        conn.execute("CLOSE c")
        with conn.cursor(name="server_side") as named:
            named.execute(sql)
            server_side = named.fetchone()[0]
    assert binary == MASKED_SSN
    assert piped == [MASKED_SSN, MASKED_SSN]
    assert fetched == [(MASKED_SSN,)]
    assert server_side == MASKED_SSN


def test_redirected_reads_through_psql(dev_stack: Stack, session, tmp_path):
    import subprocess

    script = tmp_path / "q.sql"
    script.write_text(
        "SET search_path = public;\n"
        + "".join(f"{sql};\n" for sql in SPELLINGS)
        + "COPY public.customers (ssn) TO STDOUT;\n"
        + "SELECT 'SELECT ssn FROM public.customers WHERE id = 1' \\gexec\n"
    )
    env = dev_stack.libpq_env(session)
    out = subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-f", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(MASKED_SSN) >= len(SPELLINGS) + 2
    assert RAW_SSN not in out.stdout + out.stderr


def test_result_records_count_the_cells_the_views_masked(dev_stack: Stack, session):
    sql = "SELECT id, ssn, email AS counted_mark FROM customers WHERE id <= 3 ORDER BY id"
    with gateway_connect(session) as conn:
        conn.execute(sql, prepare=False).fetchall()  # simple protocol
        conn.execute(sql.replace("counted_mark", "counted_ext"), (), prepare=True).fetchall()
    import time

    deadline = time.monotonic() + 10
    while True:  # result records reach the file within the broker's flush interval
        records = dev_stack.audit_records()
        results = [r for r in records if r.get("kind") == "result"]
        if sum(r.get("view_masked_cells") == 6 for r in results) >= 2:
            break
        assert time.monotonic() < deadline, "the result records were not written"
        time.sleep(0.2)
    for mark in ("counted_mark", "counted_ext"):
        (statement,) = [
            r
            for r in records
            if r.get("kind") == "statement"
            and r.get("session_id") == session["session_id"]
            and mark in r["statement"]
        ]
        (result,) = [
            r
            for r in records
            if r.get("kind") == "result"
            and r.get("session_id") == session["session_id"]
            and r["statement_seq"] == statement["seq"]
        ]
        # 3 rows × 2 masked columns (ssn, email), masked by the view; none by the gateway.
        assert (result["rows"], result["view_masked_cells"], result["masked_cells"]) == (3, 6, 0)
