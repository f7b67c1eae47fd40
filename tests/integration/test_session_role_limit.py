"""The database backs the per-session connection limit: the role OpenBao issues for a
session has `CONNECTION LIMIT` = the target's `max_connections_per_session`, so one session
cannot use up max_connections even past the gateway (finding 5 of the hardening issue)."""

from __future__ import annotations

import time

import psycopg
import psycopg.sql
import pytest

from guard.broker.policy.compile import load_policy_file
from tests.fix_stack import DEMO_POLICY, Stack, stack_with_policy
from tests.integration.test_gateway import connect

pytestmark = pytest.mark.integration


def _issued_role(session: dict) -> str:
    """The database role OpenBao issued for `session` (the gateway's user name is not it)."""
    with connect(session) as conn:
        return str(conn.execute("SELECT current_user").fetchone()[0])


def _connlimit(stack: Stack, role: str) -> int:
    ((limit,),) = stack.direct("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,))
    return int(limit)


def test_the_session_role_has_the_policys_default_limit(dev_stack: Stack):
    expected = load_policy_file(dev_stack.status["policy_file"]).targets["demo"]
    assert expected.max_connections_per_session == 20  # the demo policy uses the default
    body, headers = dev_stack.open_session()
    try:
        assert _connlimit(dev_stack, _issued_role(body)) == expected.max_connections_per_session
    finally:
        dev_stack.end_session(body["session_id"], headers)


def test_the_session_role_has_the_targets_limit_and_postgres_enforces_it(
    dev_stack: Stack, tmp_path
):
    text = DEMO_POLICY.read_text().replace(
        "    connect_groups:", "    max_connections_per_session: 3\n    connect_groups:", 1
    )
    with stack_with_policy(dev_stack, tmp_path / "home", text) as stack:
        body, headers = stack.open_session()
        try:
            role = _issued_role(body)
            assert _connlimit(stack, role) == 3
            # The gateway bypassed: straight at PostgreSQL as the issued role (its password
            # set here by the admin, standing in for leaked credentials), PostgreSQL itself
            # stops the fourth connection.
            with psycopg.connect(stack.admin_dsn, autocommit=True) as admin:
                admin.execute(
                    psycopg.sql.SQL("ALTER ROLE {} PASSWORD 'leaked-for-the-test'").format(
                        psycopg.sql.Identifier(role)
                    )
                )
            deadline = time.monotonic() + 5  # the gateway's upstream backend has gone
            while stack.direct("SELECT 1 FROM pg_stat_activity WHERE usename = %s", (role,)):
                assert time.monotonic() < deadline, "the gateway's backend outlived its client"
                time.sleep(0.05)
            upstream = psycopg.conninfo.conninfo_to_dict(stack.admin_dsn)
            direct = {**upstream, "user": role, "password": "leaked-for-the-test"}
            held = [psycopg.connect(**direct, connect_timeout=10) for _ in range(3)]
            try:
                with pytest.raises(psycopg.OperationalError, match="too many connections"):
                    psycopg.connect(**direct, connect_timeout=10)
            finally:
                for conn in held:
                    conn.close()
        finally:
            stack.end_session(body["session_id"], headers)
