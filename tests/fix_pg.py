"""Session fixture `pg_cluster`: a throwaway PostgreSQL cluster with the demo database.

Skips with a reason when the server binaries are missing, except under CI=true, where a
missing PostgreSQL is a failure. `require` is shared with the other real-service fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from guard.devstack.postgres import MISSING_HINT, PostgresCluster, find_pg_bindir


def role_login(pg: PostgresCluster, name: str, password: str, dbname: str = "demo", **kwargs):
    """An autocommit psycopg connection to the cluster as role `name` (a session-like role
    a test made), for what that role may and may not read."""
    import psycopg

    return psycopg.connect(
        host=pg.host,
        port=pg.port,
        dbname=dbname,
        user=name,
        password=password,
        connect_timeout=5,
        autocommit=True,
        **kwargs,
    )


def require(name: str, present: bool, hint: str) -> None:
    """Skip (or, with CI=true, fail) when a real service needed by a test is missing."""
    if present:
        return
    message = f"{name} is not available: {hint}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a failure, not a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    require("PostgreSQL", find_pg_bindir() is not None, MISSING_HINT)
    from guard.devstack.demo_data import create_demo_database

    with PostgresCluster().start() as cluster:
        create_demo_database(cluster.admin_dsn("postgres"), "demo")
        yield cluster
