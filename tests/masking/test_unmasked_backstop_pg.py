"""Unmasked access in a real cluster: guard_unmasked's raw views, who reads them, and the
check that holds them to the policy.

A session-like role (LOGIN, VALID UNTIL, in `guard_session`) reads masked values; given
`guard_unmasked` (what the broker grants an unmasked session) it reads raw values through
the raw views, by unqualified name on the unmasked search_path and by schema; the base
columns stay closed, a gated table's raw view still asks for approval, and without the
role `guard_unmasked.customers` is `permission denied`. Own database, so the other
backstop tests' `demo` is not touched.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from guard.broker import backstop
from guard.broker.masking.objects import UNMASKED_ROLE, session_search_path
from guard.broker.policy.compile import load_policy_file
from guard.devstack.backstop import apply_backstop
from guard.devstack.demo_data import create_demo_database
from tests.fix_pg import role_login

pytestmark = pytest.mark.integration
POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"
DB = "demo_unmasked"


@pytest.fixture(scope="module")
def target():
    demo = load_policy_file(POLICY).targets["demo"]
    assert demo.unmasked is not None  # the demo policy lets fraud investigators ask
    return demo


@pytest.fixture(scope="module")
def cluster(pg_cluster, target):
    create_demo_database(pg_cluster.admin_dsn("postgres"), DB)
    apply_backstop(pg_cluster.admin_dsn(DB), target)
    return pg_cluster


def admin(cluster, statement, params=None):
    with psycopg.connect(cluster.admin_dsn(DB), autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


@pytest.fixture
def session_role(cluster) -> Iterator[tuple[str, str]]:
    """A role as OpenBao issues one: LOGIN until tomorrow, in guard_session."""
    name, password = f"v-unmasked-{secrets.token_hex(4)}", secrets.token_hex(16)
    role = sql.Identifier(name)
    admin(
        cluster,
        sql.SQL(
            "CREATE ROLE {} LOGIN PASSWORD {} VALID UNTIL 'tomorrow' IN ROLE guard_session"
        ).format(role, sql.Literal(password)),
    )
    admin(cluster, sql.SQL("ALTER ROLE {} SET search_path = guard_masked, public").format(role))
    yield name, password
    admin(
        cluster,
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
        (name,),
    )
    admin(cluster, sql.SQL("DROP ROLE IF EXISTS {}").format(role))


def connect(cluster, role: tuple[str, str], *, unmasked: bool) -> psycopg.Connection:
    # The gateway sets session_search_path(unmasked=True) in the startup packet; libpq's
    # options take it without the quotes and the space.
    path = session_search_path(unmasked=True).replace('"', "").replace(" ", "")
    options = {"options": f"-c search_path={path}"} if unmasked else {}
    return role_login(cluster, *role, DB, **options)


def test_the_unmasked_role_reads_raw_and_nothing_more(cluster, session_role):
    raw_ssn = admin(cluster, "SELECT ssn FROM public.customers WHERE id = 1")[0][0]
    with connect(cluster, session_role, unmasked=False) as masked:
        assert masked.execute("SELECT ssn FROM customers WHERE id = 1").fetchone() != (raw_ssn,)
        # Without the role, the raw views are closed however they are spelled.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            masked.execute("SELECT ssn FROM guard_unmasked.customers")
    admin(
        cluster,
        sql.SQL("GRANT {} TO {}").format(
            sql.Identifier(UNMASKED_ROLE), sql.Identifier(session_role[0])
        ),
    )
    with connect(cluster, session_role, unmasked=True) as raw:
        assert raw.execute("SELECT ssn FROM customers WHERE id = 1").fetchone() == (raw_ssn,)
        assert raw.execute(
            "SELECT ssn FROM guard_unmasked.customers WHERE ssn = %s", (raw_ssn,)
        ).fetchone() == (raw_ssn,)
        # The view of the target that reads protected columns: its raw twin.
        twin = raw.execute("SELECT email FROM v_customer_contacts LIMIT 1").fetchone()
        assert twin is not None and "***" not in twin[0]
        # The base columns stay closed: the raw views are the one way to them.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            raw.execute("SELECT ssn FROM public.customers")
    with connect(cluster, session_role, unmasked=True) as raw:
        # A gated table's raw view is still a gate: unmasked does not mean approved.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="requires approval"):
            raw.execute("SELECT count(*) FROM transactions")


def test_check_passes_with_a_session_member_and_flags_what_would_unmask_others(
    cluster, target, session_role
):
    role = sql.Identifier(session_role[0])
    unmasked = sql.Identifier(UNMASKED_ROLE)
    with psycopg.connect(cluster.admin_dsn(DB)) as conn:
        assert backstop.check(conn, target) == []
    admin(cluster, sql.SQL("GRANT {} TO {}").format(unmasked, role))
    with psycopg.connect(cluster.admin_dsn(DB)) as conn:
        assert backstop.check(conn, target) == []  # an issued session role may hold it
    standing = f"reporting_{secrets.token_hex(3)}"
    admin(cluster, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(standing)))
    try:
        admin(cluster, sql.SQL("GRANT {} TO {}").format(unmasked, sql.Identifier(standing)))
        admin(cluster, sql.SQL("GRANT {} TO guard_session").format(unmasked))
        admin(cluster, "GRANT SELECT ON guard_unmasked.accounts TO PUBLIC")
        with psycopg.connect(cluster.admin_dsn(DB)) as conn:
            drifts = {str(d) for d in backstop.check(conn, target)}
        assert f"{standing}: a standing member of guard_unmasked (not an issued session role)" in (
            drifts
        )
        assert "guard_session: is a member of guard_unmasked: every session reads raw" in drifts
        assert "guard_unmasked.accounts: readable without guard_unmasked" in drifts
    finally:
        admin(cluster, sql.SQL("REVOKE {} FROM guard_session").format(unmasked))
        admin(cluster, sql.SQL("DROP ROLE {}").format(sql.Identifier(standing)))
        apply_backstop(cluster.admin_dsn(DB), target)
    with psycopg.connect(cluster.admin_dsn(DB)) as conn:
        assert backstop.check(conn, target) == []


def test_taking_unmasked_access_out_of_the_policy_drops_the_raw_views(cluster, target):
    without = dataclasses.replace(target, unmasked=None)
    try:
        with psycopg.connect(cluster.admin_dsn(DB)) as conn:
            drifts = [str(d) for d in backstop.check(conn, without)]
        assert drifts == ["guard_unmasked: the policy allows no unmasked session, yet it exists"]
        apply_backstop(cluster.admin_dsn(DB), without)
        assert admin(cluster, "SELECT to_regnamespace('guard_unmasked')") == [(None,)]
        with psycopg.connect(cluster.admin_dsn(DB)) as conn:
            assert backstop.check(conn, without) == []
            assert [str(d) for d in backstop.check(conn, target)] == [
                "guard_unmasked: the schema of unmasked access is missing"
            ]
    finally:
        apply_backstop(cluster.admin_dsn(DB), target)
    with psycopg.connect(cluster.admin_dsn(DB)) as conn:
        assert backstop.check(conn, target) == []
