"""approvals.grants: the database-enforced grant of `guard_approved_<table>`, for real.

A role set up like an OpenBao-issued session role (LOGIN, member of `guard_session`,
search_path = guard_masked, public) reads the demo's gated `transactions` through its gate
view: 42501 before the grant, rows after it, 42501 again after the revoke, on one live
connection (the session's), with `pg_auth_members` checked at each step.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from guard.broker.approvals.grants import DatabaseGrants, MemoryGrants, approved_roles
from guard.broker.errors import DependencyUnavailable
from guard.broker.policy.compile import load_policy, load_policy_file
from guard.broker.settings import TargetSettings
from guard.devstack.backstop import apply_backstop
from tests.fix_pg import role_login as login

POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"
APPROVED = "guard_approved_transactions"
integration = pytest.mark.integration


# --- pure parts -----------------------------------------------------------------------------


def test_approved_roles_from_qualified_names():
    assert approved_roles(["public.transactions", "public.transactions"]) == [APPROVED]
    assert approved_roles(['Odd Schema.Tx "log"', "a.b.c"]) == [
        'guard_approved_Tx "log"',
        "guard_approved_b.c",  # the table is what follows the first dot, as in the gate
    ]
    assert approved_roles([]) == []


def test_memory_grants_records_calls_and_memberships():
    grants = MemoryGrants()

    async def scenario() -> None:
        await grants.grant("demo", "r1", ["public.transactions"])
        assert grants.held == {("demo", "r1", APPROVED)}
        await grants.revoke("demo", "r1", ["public.transactions"])
        await grants.revoke("demo", "r1", ["public.transactions"])
        await grants.close()

    asyncio.run(scenario())
    assert grants.held == set() and grants.closed
    assert [c[0] for c in grants.calls] == ["grant", "revoke", "revoke"]
    assert grants.calls[0] == ("grant", "demo", "r1", ("public.transactions",))
    grants.error = DependencyUnavailable("down")
    with pytest.raises(DependencyUnavailable):
        asyncio.run(grants.grant("demo", "r1", ["public.transactions"]))


# --- against PostgreSQL -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(pg_cluster):
    apply_backstop(pg_cluster.admin_dsn("demo"), load_policy_file(POLICY).targets["demo"])
    return pg_cluster


def admin(pg, dbname: str = "demo") -> psycopg.Connection:
    dsn = psycopg.conninfo.make_conninfo(pg.admin_dsn("postgres"), dbname=dbname)
    return psycopg.connect(dsn, autocommit=True)


def create_session_role(pg, name: str, password: str) -> None:
    """Like OpenBao's creation_statements: LOGIN, no attributes, IN ROLE guard_session."""
    role = sql.Identifier(name)
    with admin(pg) as conn:
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} WITH LOGIN PASSWORD {} NOSUPERUSER NOCREATEDB NOCREATEROLE"
                " NOREPLICATION NOBYPASSRLS INHERIT IN ROLE guard_session"
            ).format(role, sql.Literal(password))
        )
        conn.execute(sql.SQL("ALTER ROLE {} SET search_path = guard_masked, public").format(role))


def drop_role(pg, name: str) -> None:
    with admin(pg) as conn:
        conn.execute(
            sql.SQL(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = {}"
            ).format(sql.Literal(name))
        )
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def session_role(demo) -> Iterator[tuple[str, str]]:
    name, password = f"v-token-guard-{secrets.token_hex(4)}", secrets.token_hex(16)
    create_session_role(demo, name, password)
    yield name, password
    drop_role(demo, name)


def memberships(pg, member: str) -> list[str]:
    with admin(pg) as conn:
        rows = conn.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s ORDER BY 1",
            (member,),
        ).fetchall()
    return [r for (r,) in rows]


def dsn_file(tmp_path: Path, dsn: str, name: str = "grants-dsn") -> Path:
    path = tmp_path / name
    path.write_text(dsn + "\n")
    path.chmod(0o600)
    return path


def target_settings(path: Path | None, *, grants: Path | None = None) -> TargetSettings:
    return TargetSettings(
        database="demo", openbao_role="guard-test", admin_dsn_file=path, grants_dsn_file=grants
    )


def assert_gated(conn: psycopg.Connection, relation: str = "transactions") -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="requires approval"):
        conn.execute(f"SELECT count(*) FROM {relation}")


@integration
def test_backstop_creates_the_approval_role_without_attributes(demo):
    with admin(demo) as conn:
        row = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication,"
            " rolbypassrls, rolinherit FROM pg_roles WHERE rolname = %s",
            (APPROVED,),
        ).fetchone()
        privileges = conn.execute(
            "SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = %s",
            (APPROVED,),
        ).fetchone()
    assert row is not None and not any(row[:6])
    assert privileges == (0,)  # it only marks who may pass the gate


@integration
def test_grant_opens_the_gate_and_revoke_closes_it(demo, session_role, tmp_path):
    name, password = session_role
    grants = DatabaseGrants({"demo": target_settings(dsn_file(tmp_path, demo.admin_dsn("demo")))})
    with login(demo, name, password) as session:
        assert_gated(session)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            session.execute("SELECT count(*) FROM public.transactions")
        assert memberships(demo, name) == ["guard_session"]

        async def grant() -> None:
            try:
                await grants.grant("demo", name, ["public.transactions"])
                await grants.grant("demo", name, ["public.transactions"])  # again: no error
            finally:
                await grants.close()

        asyncio.run(grant())
        assert memberships(demo, name) == [APPROVED, "guard_session"]
        # the live session reads through the gate view (the base table stays closed)
        assert session.execute("SELECT count(*) FROM transactions").fetchone() == (5000,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            session.execute("SELECT count(*) FROM public.transactions")

        async def revoke() -> None:
            try:
                await grants.revoke("demo", name, ["public.transactions"])
                await grants.revoke("demo", name, ["public.transactions"])  # idempotent
            finally:
                await grants.close()

        asyncio.run(revoke())
        assert memberships(demo, name) == ["guard_session"]
        assert_gated(session)


@integration
def test_reapplying_the_backstop_keeps_a_live_grant(demo, session_role, tmp_path):
    name, password = session_role
    grants = DatabaseGrants({"demo": target_settings(dsn_file(tmp_path, demo.admin_dsn("demo")))})

    async def scenario(action: str) -> None:
        try:
            await getattr(grants, action)("demo", name, ["public.transactions"])
        finally:
            await grants.close()

    asyncio.run(scenario("grant"))
    apply_backstop(demo.admin_dsn("demo"), load_policy_file(POLICY).targets["demo"])
    assert APPROVED in memberships(demo, name)
    with login(demo, name, password) as session:
        assert session.execute("SELECT count(*) FROM transactions").fetchone() == (5000,)
    asyncio.run(scenario("revoke"))
    assert APPROVED not in memberships(demo, name)


@integration
def test_revoke_without_a_membership_or_a_role_is_fine(demo, session_role, tmp_path):
    name, _ = session_role
    grants = DatabaseGrants({"demo": target_settings(dsn_file(tmp_path, demo.admin_dsn("demo")))})

    async def scenario() -> None:
        try:
            await grants.revoke("demo", name, ["public.transactions"])  # never granted
            await grants.revoke("demo", "v-token-gone-long-ago", ["public.transactions"])
            # one table's approval role missing: the other membership still goes
            await grants.grant("demo", name, ["public.transactions"])
            await grants.revoke("demo", name, ["public.transactions", "public.no_such_table"])
            assert APPROVED not in memberships(demo, name)
            await grants.grant("demo", name, [])  # nothing to do, no connection needed
        finally:
            await grants.close()

    asyncio.run(scenario())


@integration
def test_grant_to_a_missing_role_says_what_to_do(demo, tmp_path):
    grants = DatabaseGrants({"demo": target_settings(dsn_file(tmp_path, demo.admin_dsn("demo")))})

    async def scenario(tables: list[str]) -> None:
        try:
            await grants.grant("demo", "v-token-gone-long-ago", tables)
        finally:
            await grants.close()

    with pytest.raises(DependencyUnavailable) as info:
        asyncio.run(scenario(["public.transactions"]))
    assert "does not exist" in info.value.message and "backstop" in (info.value.hint or "")


@integration
def test_odd_role_and_table_names_are_quoted(pg_cluster, tmp_path):
    database = 'grants "odd" db'
    with admin(pg_cluster, "postgres") as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    schema, table = "Odd-Schema", "Tx\"log';--"
    base = sql.Identifier(schema, table)
    with admin(pg_cluster, database) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {} (id int, amount numeric)").format(base))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 10), (2, 20)").format(base))
    policy = load_policy(
        "version: 1\ntargets:\n  odd:\n    connect_groups: [g]\n"
        "    session_ttl: {default: 1h, max: 1h}\n"
        "rules:\n  - id: gate\n    effect: require_approval\n"
        "    when: {reads: ['Odd-Schema.Tx\"log'';--']}\n"
        "    approval: {approver_groups: [leads], window: 10m}\n"
    )
    odd_table = f"{schema}.{table}"
    assert policy.targets["odd"].gated_tables == {(schema, table)}
    dsn = psycopg.conninfo.make_conninfo(pg_cluster.admin_dsn("postgres"), dbname=database)
    apply_backstop(dsn, policy.targets["odd"])
    name, password = 'v-o\'dd "role"; --', secrets.token_hex(16)
    create_session_role(pg_cluster, name, password)
    gate = sql.Identifier("guard_masked", table).as_string()
    grants = DatabaseGrants({"odd": target_settings(dsn_file(tmp_path, dsn))})

    async def scenario(action: str) -> None:
        try:
            await getattr(grants, action)("odd", name, [odd_table])
        finally:
            await grants.close()

    try:
        with login(pg_cluster, name, password, database) as session:
            assert_gated(session, gate)
            asyncio.run(scenario("grant"))
            assert f"guard_approved_{table}" in memberships(pg_cluster, name)
            assert session.execute(f"SELECT sum(amount) FROM {gate}").fetchone() == (30,)
            asyncio.run(scenario("revoke"))
            asyncio.run(scenario("revoke"))
            assert memberships(pg_cluster, name) == ["guard_session"]
            assert_gated(session, gate)
    finally:
        drop_role(pg_cluster, name)


@integration
def test_a_role_with_admin_option_is_enough(demo, session_role, tmp_path):
    name, _ = session_role
    grantor, password = f"guard-grants-{secrets.token_hex(3)}", secrets.token_hex(16)
    with admin(demo) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(grantor), sql.Literal(password)
            )
        )
    plain = psycopg.conninfo.make_conninfo(demo.admin_dsn("demo"), user=grantor, password=password)
    # admin_dsn_file points nowhere useful: grants_dsn_file wins
    settings = target_settings(
        tmp_path / "missing", grants=dsn_file(tmp_path, plain, "grants-role-dsn")
    )
    grants = DatabaseGrants({"demo": settings})

    async def scenario(action: str) -> None:
        try:
            await getattr(grants, action)("demo", name, ["public.transactions"])
        finally:
            await grants.close()

    try:
        with pytest.raises(DependencyUnavailable) as info:
            asyncio.run(scenario("grant"))  # no ADMIN OPTION yet
        assert "ADMIN OPTION" in (info.value.hint or "")
        assert password not in f"{info.value.message} {info.value.hint}"
        with admin(demo) as conn:
            conn.execute(
                sql.SQL("GRANT {} TO {} WITH ADMIN OPTION").format(
                    sql.Identifier(APPROVED), sql.Identifier(grantor)
                )
            )
        asyncio.run(scenario("grant"))
        assert APPROVED in memberships(demo, name)
        asyncio.run(scenario("revoke"))
        assert APPROVED not in memberships(demo, name)
    finally:
        drop_role(demo, grantor)


@integration
def test_reconnects_once_when_the_connection_broke(demo, session_role, tmp_path):
    name, _ = session_role
    grants = DatabaseGrants({"demo": target_settings(dsn_file(tmp_path, demo.admin_dsn("demo")))})

    async def scenario() -> None:
        try:
            await grants.grant("demo", name, ["public.transactions"])
            with admin(demo) as conn:
                killed = conn.execute(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                    " WHERE application_name = 'guard-broker-grants'"
                ).fetchall()
            assert killed and all(ok for (ok,) in killed)
            await grants.revoke("demo", name, ["public.transactions"])
        finally:
            await grants.close()

    asyncio.run(scenario())
    assert APPROVED not in memberships(demo, name)


@integration
def test_a_blocked_grant_times_out_and_the_next_one_works(demo, session_role, tmp_path):
    name, _ = session_role
    path = dsn_file(tmp_path, demo.admin_dsn("demo"))
    grants = DatabaseGrants({"demo": target_settings(path)}, timeout=1.0)

    async def scenario() -> None:
        try:
            with admin(demo) as blocker:
                with blocker.transaction():
                    blocker.execute("LOCK TABLE pg_catalog.pg_auth_members IN SHARE MODE")
                    started = time.perf_counter()
                    with pytest.raises(DependencyUnavailable) as info:
                        await grants.grant("demo", name, ["public.transactions"])
                    assert time.perf_counter() - started < 3
                    assert "timeout" in info.value.message or "timed out" in info.value.message
            await grants.grant("demo", name, ["public.transactions"])
            assert APPROVED in memberships(demo, name)
            await grants.revoke("demo", name, ["public.transactions"])
        finally:
            await grants.close()

    asyncio.run(scenario())


@integration
def test_configuration_and_connection_errors_never_show_the_password(demo, tmp_path):
    async def attempt(grants: DatabaseGrants, target: str = "demo") -> DependencyUnavailable:
        try:
            await grants.grant(target, "someone", ["public.transactions"])
        except DependencyUnavailable as exc:
            return exc
        finally:
            await grants.close()
        raise AssertionError("no error")

    err = asyncio.run(attempt(DatabaseGrants({}), "nowhere"))
    assert "unknown target 'nowhere'" in err.message
    err = asyncio.run(attempt(DatabaseGrants({"demo": target_settings(None)})))
    assert "no DSN" in err.message and "grants_dsn_file" in (err.hint or "")
    err = asyncio.run(attempt(DatabaseGrants({"demo": target_settings(tmp_path / "absent")})))
    assert "cannot read the DSN file" in err.message
    secret = "pw-" + secrets.token_hex(8)
    for dsn in (
        demo.admin_dsn("demo").replace(f"password={demo.admin_password}", f"password={secret}"),
        f"host=127.0.0.1 port=9 user=x password={secret} connect_timeout=2",
        f"postgresql://x:{secret}@127.0.0.1:9/demo",
        f"host=127.0.0.1 password={secret} broken",  # unparseable
    ):
        path = dsn_file(tmp_path, dsn)
        err = asyncio.run(attempt(DatabaseGrants({"demo": target_settings(path)})))
        assert "cannot connect" in err.message, err.message
        assert secret not in f"{err} {err.message} {err.hint}", err.message


@integration
def test_grant_and_revoke_on_the_warm_connection_are_fast(demo, session_role, tmp_path, capsys):
    name, _ = session_role
    grants = DatabaseGrants({"demo": target_settings(dsn_file(tmp_path, demo.admin_dsn("demo")))})
    tables = ["public.transactions"]

    async def scenario() -> tuple[list[float], list[float]]:
        granting, revoking = [], []
        try:
            await grants.grant("demo", name, tables)  # opens the connection
            await grants.revoke("demo", name, tables)
            for _ in range(50):
                started = time.perf_counter()
                await grants.grant("demo", name, tables)
                middle = time.perf_counter()
                await grants.revoke("demo", name, tables)
                granting.append(middle - started)
                revoking.append(time.perf_counter() - middle)
        finally:
            await grants.close()
        return granting, revoking

    granting, revoking = asyncio.run(scenario())
    ms = {
        "grant p50": statistics.median(granting) * 1000,
        "revoke p50": statistics.median(revoking) * 1000,
        "grant max": max(granting) * 1000,
    }
    with capsys.disabled():
        print("\n" + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    assert ms["grant p50"] < 50 and ms["revoke p50"] < 50
    assert APPROVED not in memberships(demo, name)
