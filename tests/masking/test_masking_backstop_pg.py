"""The backstop applied to a real cluster: the gate of an approval-gated table.

A session-like role (LOGIN, in `guard_session`) meets 42501 on the demo's gated
`transactions`; made a member of `guard_approved_transactions` it reads the rows through
the gate view (still not the base table, and protected columns elsewhere stay masked).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from guard.broker.masking.objects import approved_role_name
from guard.broker.policy.compile import load_policy_file
from guard.devstack.backstop import apply_backstop
from tests.fix_pg import role_login

pytestmark = pytest.mark.integration
POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"
APPROVED = approved_role_name("transactions")


@pytest.fixture(scope="module")
def demo(pg_cluster):
    target = load_policy_file(POLICY).targets["demo"]
    apply_backstop(pg_cluster.admin_dsn("demo"), target)
    apply_backstop(pg_cluster.admin_dsn("demo"), target)  # idempotent
    return pg_cluster


@pytest.fixture
def member(demo) -> Iterator[tuple[str, str]]:
    name, password = f"v-backstop-{secrets.token_hex(4)}", secrets.token_hex(16)
    role = sql.Identifier(name)
    with psycopg.connect(demo.admin_dsn("demo"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE guard_session").format(
                role, sql.Literal(password)
            )
        )
        conn.execute(sql.SQL("ALTER ROLE {} SET search_path = guard_masked, public").format(role))
    yield name, password
    with psycopg.connect(demo.admin_dsn("demo"), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
            (name,),
        )
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))


def admin_run(pg, statement: sql.Composable) -> None:
    with psycopg.connect(pg.admin_dsn("demo"), autocommit=True) as conn:
        conn.execute(statement)


def test_approval_role_exists_without_attributes(demo):
    with psycopg.connect(demo.admin_dsn("demo")) as conn:
        row = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication,"
            " rolbypassrls FROM pg_roles WHERE rolname = %s",
            (APPROVED,),
        ).fetchone()
    assert row == (False, False, False, False, False, False)


def test_gate_opens_for_members_only(demo, member):
    name, password = member
    grant = sql.SQL("GRANT {} TO {}").format(sql.Identifier(APPROVED), sql.Identifier(name))
    revoke = sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(APPROVED), sql.Identifier(name))
    with role_login(demo, name, password) as session:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            session.execute("SELECT count(*) FROM transactions")
        assert info.value.diag.message_primary == "reading public.transactions requires approval"
        assert info.value.diag.sqlstate == "42501"
        admin_run(demo, grant)
        assert session.execute("SELECT count(*) FROM transactions").fetchone() == (5000,)
        # the base table stays closed, and approval of transactions unmasks nothing
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            session.execute("SELECT count(*) FROM public.transactions")
        ssn = session.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()
        assert ssn == ("***-**-6789",)
        admin_run(demo, revoke)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="requires approval"):
            session.execute("SELECT count(*) FROM transactions")
