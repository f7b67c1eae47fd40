"""One session cannot exhaust the database: the gateway counts a session's connections
against the target's `max_connections_per_session` (finding 5 of the hardening issue: 196
connections of one session used up PostgreSQL's max_connections)."""

from __future__ import annotations

import psycopg
import pytest

from tests.fix_stack import DEMO_POLICY, Stack, gateway_connect, stack_with_policy

pytestmark = pytest.mark.integration


def test_a_sessions_connections_stop_at_its_limit_and_others_still_connect(
    dev_stack: Stack, tmp_path
):
    text = DEMO_POLICY.read_text().replace(
        "    connect_groups:", "    max_connections_per_session: 2\n    connect_groups:", 1
    )
    with stack_with_policy(dev_stack, tmp_path / "home", text) as stack:
        first, _ = stack.open_session("alice")
        second, _ = stack.open_session("alice")

        held = [gateway_connect(first), gateway_connect(first)]
        with pytest.raises(psycopg.OperationalError, match="already has 2 connections"):
            gateway_connect(first)
        with gateway_connect(second) as other:  # another session is not affected
            assert other.execute("SELECT 1").fetchone() == (1,)
        held.pop().close()
        with gateway_connect(first) as again:  # a slot is free again once one closed
            assert again.execute("SELECT 1").fetchone() == (1,)
        for conn in held:
            conn.close()
