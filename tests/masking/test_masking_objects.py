"""masking.objects: the generated database backstop (pure SQL text; PG runs it in integration)."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from guard.broker.masking.objects import (
    TableColumns,
    ViewTwin,
    approved_role_name,
    approved_roles,
    backstop_sql,
    creation_statements,
    quote_ident,
    quote_literal,
    revocation_statements,
    twin_original,
)
from guard.broker.policy.compile import load_policy, load_policy_file

REPO_POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"

FACTS = {
    ("public", "customers"): TableColumns(
        "public",
        "customers",
        (
            ("id", "integer"),
            ("full_name", "text"),
            ("ssn", "character varying(11)"),
            ("email", "text"),
            ("dob", "date"),
            ("phone", "text"),
        ),
    ),
    ("public", "accounts"): TableColumns(
        "public",
        "accounts",
        (("id", "integer"), ("customer_id", "integer"), ("account_number", "character(12)")),
    ),
    ("public", "transactions"): TableColumns(
        "public",
        "transactions",
        (("id", "bigint"), ("account_id", "integer"), ("amount", "numeric")),
    ),
    ("public", "products"): TableColumns(
        "public", "products", (("id", "integer"), ("name", "text"), ("price", "numeric"))
    ),
}
ALL = [
    ("public", "accounts"),
    ("public", "customers"),
    ("public", "products"),
    ("public", "transactions"),
]


@pytest.fixture(scope="module")
def target():
    return load_policy_file(REPO_POLICY).targets["demo"]


@pytest.fixture(scope="module")
def statements(target):
    return backstop_sql(target, FACTS, all_tables=ALL)


def find(statements: list[str], *needles: str) -> list[str]:
    return [s for s in statements if all(n in s for n in needles)]


def test_deterministic(target, statements):
    assert backstop_sql(target, FACTS, all_tables=ALL) == statements


def test_roles_created_idempotently_and_nologin(statements):
    for role in ("guard_masked_owner", "guard_session"):
        (create,) = find(statements, "CREATE ROLE", f'"{role}"')
        assert create.startswith("DO $guard$")
        assert f"rolname = '{role}'" in create and "IF NOT EXISTS" in create
        assert f'ALTER ROLE "{role}" NOLOGIN NOSUPERUSER' in "\n".join(statements)
    assert not [s for s in statements if s.startswith("CREATE ROLE")]


def test_approval_role_per_gated_table(statements):
    (create,) = find(statements, "CREATE ROLE", '"guard_approved_transactions"')
    assert create.startswith("DO $guard$") and "IF NOT EXISTS" in create
    assert "rolname = 'guard_approved_transactions'" in create
    assert (
        'ALTER ROLE "guard_approved_transactions" NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE'
        " NOREPLICATION NOBYPASSRLS" in statements
    )
    # only gated tables get one, and it exists before the gate function and views
    assert len(find(statements, "CREATE ROLE", "guard_approved_")) == 1
    (function,) = find(statements, "CREATE OR REPLACE FUNCTION")
    assert statements.index(create) < statements.index(function)
    # it is granted nothing: membership alone passes the gate
    assert not find(statements, "GRANT", 'TO "guard_approved_')


def test_no_gated_table_no_approval_objects(target):
    policy = load_policy(
        "version: 1\ntargets:\n  t:\n    connect_groups: [g]\n"
        "    session_ttl: {default: 1h, max: 1h}\n    protected_columns: {s.t.x: redact}\n"
    )
    facts = {("s", "t"): TableColumns("s", "t", (("x", "text"),))}
    statements = backstop_sql(policy.targets["t"], facts, all_tables=[("s", "t")])
    assert not find(statements, "guard_approved_")
    assert not find(statements, "require_approval")


def _gated_policy(*tables: str):
    reads = ", ".join(repr(t) for t in tables)
    return load_policy(
        "version: 1\ntargets:\n  t:\n    connect_groups: [g]\n"
        "    session_ttl: {default: 1h, max: 1h}\n"
        "rules:\n  - id: gate\n    effect: require_approval\n"
        f"    when: {{reads: [{reads}]}}\n"
        "    approval: {approver_groups: [leads], window: 10m}\n"
    ).targets["t"]


def test_approval_roles_sorted_and_odd_names_quoted():
    target = _gated_policy("s.b", 'Odd-S.Tx"log', "s.a")
    assert approved_roles(target) == [
        'guard_approved_Tx"log',
        "guard_approved_a",
        "guard_approved_b",
    ]
    facts = {k: TableColumns(*k, (("x", "text"),)) for k in target.gated_tables}
    statements = backstop_sql(target, facts, all_tables=sorted(facts))
    (create,) = find(statements, "CREATE ROLE", "Tx")
    assert 'CREATE ROLE "guard_approved_Tx""log" NOLOGIN' in create
    assert "rolname = 'guard_approved_Tx\"log'" in create


def test_gated_tables_sharing_a_cut_role_name_are_refused():
    long = "x" * 60
    target = _gated_policy(f"s.{long}a", f"s.{long}b")
    facts = {k: TableColumns(*k, (("x", "text"),)) for k in target.gated_tables}
    with pytest.raises(ValueError, match="share the role guard_approved_x"):
        backstop_sql(target, facts, all_tables=sorted(facts))


def test_a_dotted_schema_of_a_gated_table_is_refused():
    # the policy schema forbids dots; a Target built otherwise must not reach the gate,
    # whose function takes what follows the first dot as the table
    target = dataclasses.replace(_gated_policy("s.t"), gated_tables=frozenset({("a.b", "t")}))
    with pytest.raises(ValueError, match="dot"):
        approved_roles(target)


def test_schema_owned_by_owner_and_closed_to_public(statements):
    assert (
        'CREATE SCHEMA IF NOT EXISTS "guard_masked" AUTHORIZATION "guard_masked_owner"'
        in statements
    )
    assert 'ALTER SCHEMA "guard_masked" OWNER TO "guard_masked_owner"' in statements
    assert 'REVOKE ALL ON SCHEMA "guard_masked" FROM PUBLIC' in statements
    assert 'GRANT USAGE ON SCHEMA "guard_masked", "public" TO "guard_session"' in statements


def test_owner_reads_protected_and_gated_base_tables(statements):
    for table in ("customers", "accounts", "transactions"):
        assert f'GRANT SELECT ON TABLE "public"."{table}" TO "guard_masked_owner"' in statements
        assert f'REVOKE ALL ON TABLE "public"."{table}" FROM PUBLIC' in statements
    assert not find(statements, '"public"."products"', "guard_masked_owner")


def test_masked_view_same_columns_same_order(statements):
    (view,) = find(statements, 'CREATE VIEW "guard_masked"."customers"')
    assert "security_invoker" not in view and "security_barrier" not in view
    assert "WHERE" not in view.split("FROM")[-1]
    assert view.rstrip().endswith('FROM "public"."customers"')
    columns = view.split("\nSELECT ", 1)[1].split("\nFROM ", 1)[0].split(",\n       ")
    assert len(columns) == 6
    assert columns[0] == '"id"' and columns[1] == '"full_name"' and columns[5] == '"phone"'
    assert columns[2].endswith('AS "ssn"') and "'***-**-'" in columns[2]
    assert columns[3].endswith('AS "email"') and "split_part" in columns[3]
    assert columns[4].endswith('AS "dob"') and "make_date" in columns[4]
    (accounts,) = find(statements, 'CREATE VIEW "guard_masked"."accounts"')
    assert "repeat('*'" in accounts and accounts.count(" AS ") == 1


def test_views_recreated_owned_and_granted(statements):
    for table in ("customers", "accounts", "transactions"):
        view = f'"guard_masked"."{table}"'
        drop = statements.index(f"DROP VIEW IF EXISTS {view} CASCADE")
        (create,) = find(statements, f"CREATE VIEW {view}")
        assert statements.index(create) == drop + 1
        assert f'ALTER VIEW {view} OWNER TO "guard_masked_owner"' in statements
        assert f'GRANT SELECT ON {view} TO "guard_session"' in statements


def test_gate_view_and_function(statements):
    (gate,) = find(statements, 'CREATE VIEW "guard_masked"."transactions"')
    assert "WITH (security_barrier)" in gate
    assert gate.rstrip().endswith(
        """WHERE "guard_masked".require_approval('public.transactions')"""
    )
    (function,) = find(statements, "CREATE OR REPLACE FUNCTION")
    assert "ERRCODE = '42501'" in function
    assert "requires approval" in function
    assert "pg_has_role(current_user, approved, 'MEMBER')" in function
    assert "'guard_approved_'" in function
    assert "SET search_path = pg_catalog, pg_temp" in function
    fn = '"guard_masked".require_approval(text)'
    assert f"REVOKE ALL ON FUNCTION {fn} FROM PUBLIC" in statements
    assert f'GRANT EXECUTE ON FUNCTION {fn} TO "guard_session"' in statements
    # the function exists before the view that calls it
    assert statements.index(function) < statements.index(gate)


def test_column_grants_exclude_protected_columns(statements):
    (grant,) = find(statements, "GRANT SELECT (", '"public"."customers"')
    assert grant == (
        'GRANT SELECT ("id", "full_name", "phone") ON TABLE "public"."customers" TO "guard_session"'
    )
    # REVOKE ALL first: it also drops column grants an earlier policy left behind
    revoke = 'REVOKE ALL ON TABLE "public"."customers" FROM "guard_session"'
    assert statements.index(revoke) < statements.index(grant)
    (grant,) = find(statements, "GRANT SELECT (", '"public"."accounts"')
    assert '"account_number"' not in grant and '"customer_id"' in grant


def test_gated_base_table_gets_nothing(statements):
    assert 'REVOKE ALL ON TABLE "public"."transactions" FROM "guard_session"' in statements
    granted = [s for s in statements if s.startswith("GRANT") and '"public"."transactions"' in s]
    assert granted == ['GRANT SELECT ON TABLE "public"."transactions" TO "guard_masked_owner"']


def test_other_tables_get_select_and_dml_and_sequences(statements):
    assert (
        'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "public"."products" TO "guard_session"'
        in statements
    )
    (sequences,) = find(statements, "GRANT USAGE, SELECT ON SEQUENCE")
    assert 'to_regclass(\'"public"."products"\')' in sequences
    assert "customers" not in sequences


def test_hardening(statements):
    text = "\n".join(statements)
    assert "REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC" in text
    assert 'REVOKE CREATE ON SCHEMA "public" FROM PUBLIC, "guard_session"' in statements
    (functions,) = find(statements, "REVOKE EXECUTE ON FUNCTION")
    for name in (
        "lo\\_",
        "loread",
        "pg_read_file",
        "pg_read_binary_file",
        "pg_stat_file",
        "pg_ls_dir",
        "pg\\_ls\\_",
        "dblink",
    ):
        assert name in functions


def test_database_name_parameter(target):
    statements = backstop_sql(target, FACTS, all_tables=ALL, database="Demo DB")
    assert 'REVOKE TEMPORARY ON DATABASE "Demo DB" FROM PUBLIC' in statements


def test_every_create_is_idempotent(statements):
    for statement in statements:
        head = statement.lstrip().split("\n", 1)[0]
        if head.startswith("CREATE VIEW"):
            continue  # preceded by DROP VIEW IF EXISTS (checked above)
        if head.startswith("CREATE"):
            assert "IF NOT EXISTS" in head or "OR REPLACE" in head, head


def test_custom_role_and_schema_names(target):
    statements = backstop_sql(
        target,
        FACTS,
        all_tables=ALL,
        schema_owner_role="Owner",
        group_role="sess",
        masked_schema="masked",
    )
    text = "\n".join(statements)
    assert 'CREATE VIEW "masked"."customers"' in text
    assert 'TO "sess"' in text and 'TO "Owner"' in text
    assert "guard_session" not in text and "guard_masked_owner" not in text


def test_odd_identifiers_are_quoted():
    policy = load_policy(
        textwrap.dedent(
            """\
            version: 1
            targets:
              t:
                connect_groups: [g]
                session_ttl: {default: 1h, max: 1h}
                protected_columns:
                  Sales.Client Data.Tax "Id": redact
            """
        )
    )
    facts = {
        ("Sales", "Client Data"): TableColumns(
            "Sales", "Client Data", (("Id", "int"), ('Tax "Id"', "text"))
        )
    }
    statements = backstop_sql(policy.targets["t"], facts, all_tables=[("Sales", "Client Data")])
    (view,) = find(statements, "CREATE VIEW")
    assert 'CREATE VIEW "guard_masked"."Client Data" AS' in view
    assert '("Tax ""Id""") IS NULL' in view and 'AS "Tax ""Id"""' in view
    assert 'FROM "Sales"."Client Data"' in view
    assert 'GRANT SELECT ("Id") ON TABLE "Sales"."Client Data" TO "guard_session"' in statements


def test_missing_facts_and_columns_fail_loudly(target):
    facts = dict(FACTS)
    del facts[("public", "transactions")]
    with pytest.raises(ValueError, match="public.transactions"):
        backstop_sql(target, facts, all_tables=ALL)
    facts = dict(FACTS)
    facts[("public", "customers")] = TableColumns("public", "customers", (("id", "int"),))
    with pytest.raises(ValueError, match="dob, email, ssn"):
        backstop_sql(target, facts, all_tables=ALL)


def test_same_table_name_in_two_schemas_is_refused():
    policy = load_policy(
        textwrap.dedent(
            """\
            version: 1
            targets:
              t:
                connect_groups: [g]
                session_ttl: {default: 1h, max: 1h}
                protected_columns: {a.t.x: redact, b.t.x: redact}
            """
        )
    )
    facts = {(s, "t"): TableColumns(s, "t", (("x", "text"),)) for s in ("a", "b")}
    with pytest.raises(ValueError, match="share a name"):
        backstop_sql(policy.targets["t"], facts, all_tables=list(facts))


def test_fully_protected_table_gets_no_column_grant():
    policy = load_policy(
        "version: 1\ntargets:\n  t:\n    connect_groups: [g]\n"
        "    session_ttl: {default: 1h, max: 1h}\n    protected_columns: {s.t.x: null}\n"
    )
    facts = {("s", "t"): TableColumns("s", "t", (("x", "text"),))}
    statements = backstop_sql(policy.targets["t"], facts, all_tables=[("s", "t")])
    assert not find(statements, "GRANT SELECT (")
    assert '(CASE WHEN false THEN ("x") END) AS "x"' in "\n".join(statements)


# --- OpenBao role statements ----------------------------------------------------------------


def test_creation_statements():
    create, search_path = creation_statements()
    for placeholder in ("{{name}}", "{{password}}", "{{expiration}}"):
        assert placeholder in create
    assert create.startswith("CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}'")
    assert "VALID UNTIL '{{expiration}}'" in create
    for attribute in ("NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE", "NOREPLICATION", "NOBYPASSRLS"):
        assert attribute in create
    assert create.endswith('IN ROLE "guard_session"')
    assert search_path == 'ALTER ROLE "{{name}}" SET search_path = "guard_masked", public'
    assert creation_statements("g", "m")[1].endswith('"m", public')


def test_creation_statements_limit_the_roles_connections():
    # The policy's default max_connections_per_session, unless the caller passes the
    # target's value: one session cannot use up max_connections, gateway or not.
    assert "CONNECTION LIMIT 20 " in creation_statements()[0]
    assert "CONNECTION LIMIT 3 " in creation_statements(connection_limit=3)[0]


@pytest.mark.parametrize("limit", [0, -1, "5", 2.5, True, None])
def test_creation_statements_refuse_a_bad_connection_limit(limit):
    with pytest.raises((TypeError, ValueError)):
        creation_statements(connection_limit=limit)


def test_revocation_statements_order():
    statements = revocation_statements()
    text = "\n".join(statements)
    assert statements[-1] == 'DROP ROLE IF EXISTS "{{name}}"'
    terminate = next(i for i, s in enumerate(statements) if "pg_terminate_backend" in s)
    reassign = next(i for i, s in enumerate(statements) if "REASSIGN OWNED" in s)
    revoke = next(i for i, s in enumerate(statements) if 'REVOKE "guard_session"' in s)
    assert revoke < terminate < reassign < len(statements) - 1
    assert "usename = '{{name}}'" in statements[terminate]
    assert 'DROP OWNED BY "{{name}}"' in text


# --- helpers ------------------------------------------------------------------------------


def test_quoting():
    assert quote_ident('a"b') == '"a""b"'
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("a\\b'") == "E'a\\\\b'''"


def test_approved_role_name_truncated_like_postgres():
    assert approved_role_name("transactions") == "guard_approved_transactions"
    long = approved_role_name("x" * 100)
    assert len(long.encode()) == 63
    multibyte = approved_role_name("é" * 40)
    assert len(multibyte.encode()) <= 63 and multibyte.startswith("guard_approved_é")


def test_partitions_and_children_of_special_tables_are_revoked(statements):
    (block,) = find(statements, "pg_inherits")
    assert "REVOKE ALL ON TABLE %s FROM PUBLIC, %I" in block
    for table in ("customers", "accounts", "transactions"):
        assert f'to_regclass(\'"public"."{table}"\')' in block
    assert "products" not in block
    # after the plain grants a caller's list of all tables may have given the children
    plain = statements.index(
        'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "public"."products" TO "guard_session"'
    )
    assert statements.index(block) > plain


def test_view_twins_come_last_owned_granted_and_labelled(target):
    twin = ViewTwin("public", "v_contacts", " SELECT email FROM guard_masked.customers;")
    statements = backstop_sql(target, FACTS, all_tables=ALL, view_twins=[twin])
    view = '"guard_masked"."v_contacts"'
    create = statements.index(f"CREATE VIEW {view} AS\nSELECT email FROM guard_masked.customers")
    assert statements[create - 1] == f"DROP VIEW IF EXISTS {view} CASCADE"
    # After every masking view it reads (their CASCADE drops would take it otherwise).
    last_table_view = max(
        i for i, s in enumerate(statements) if s.startswith('CREATE VIEW "guard_masked".')
    )
    assert create == last_table_view
    assert f'ALTER VIEW {view} OWNER TO "guard_masked_owner"' in statements
    assert f'GRANT SELECT ON {view} TO "guard_session"' in statements
    (comment,) = find(statements, f"COMMENT ON VIEW {view} IS ")
    label = comment.split(" IS ", 1)[1].strip("'")
    assert twin_original(label) == ("public", "v_contacts")
    # The owner may read the plain tables a view joins.
    assert any(
        s.startswith("GRANT SELECT ON TABLE") and "guard_masked_owner" in s for s in statements
    )


@pytest.mark.parametrize(
    "comment",
    [
        None,
        "",
        "some other comment",
        "guard: masked twin of not-json",
        'guard: masked twin of ["x"]',
    ],
)
def test_twin_original_ignores_other_comments(comment):
    assert twin_original(comment) is None


def test_unmasked_access_gets_raw_views_readable_only_by_its_role(target):
    assert target.unmasked is not None
    statements = backstop_sql(target, FACTS, all_tables=ALL)
    raw = '"guard_unmasked"."customers"'
    (create,) = find(statements, f"CREATE VIEW {raw} AS")
    assert '"ssn"' in create and "***" not in create and "overlay" not in create.lower()
    assert f'GRANT SELECT ON {raw} TO "guard_unmasked"' in statements
    assert not [s for s in statements if raw in s and "guard_session" in s]
    # A gated table's raw view is still a gate, calling the masking schema's function.
    (gate,) = find(statements, 'CREATE VIEW "guard_unmasked"."transactions"')
    assert 'WHERE "guard_masked".require_approval(' in gate and "security_barrier" in gate
    assert 'REVOKE ALL ON SCHEMA "guard_unmasked" FROM PUBLIC' in statements
    assert "DROP SCHEMA IF EXISTS" not in " ".join(statements)


def test_without_unmasked_access_the_raw_schema_is_dropped(target):
    statements = backstop_sql(dataclasses.replace(target, unmasked=None), FACTS, all_tables=ALL)
    assert 'DROP SCHEMA IF EXISTS "guard_unmasked" CASCADE' in statements
    assert not find(statements, 'CREATE VIEW "guard_unmasked"')


def test_revocation_takes_guard_unmasked_back_before_the_role_goes():
    first = revocation_statements()[0]
    assert 'REVOKE "guard_unmasked" FROM "{{name}}"' in first
