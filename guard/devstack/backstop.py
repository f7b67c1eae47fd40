"""Apply the database backstop of a policy target (masking views, twins, group role,
revokes) for `guard dev up` and the tests: `broker.backstop.apply` on an admin DSN."""

from __future__ import annotations

import psycopg

from guard.broker.backstop import apply
from guard.broker.policy.engine import Target


def apply_backstop(admin_dsn: str, target: Target) -> list[str]:
    """Create or refresh the target's backstop objects; returns the statements run."""
    with psycopg.connect(admin_dsn) as conn:
        return apply(conn, target)
