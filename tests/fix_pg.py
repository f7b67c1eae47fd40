"""Session fixtures: a throwaway PostgreSQL cluster with the demo database, and OpenBao.

Skip with a reason when the server binaries are missing, except under CI=true, where a
missing PostgreSQL or OpenBao is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guard.devstack.openbao import OpenBaoDevServer, find_bao
from guard.devstack.postgres import PostgresCluster, find_pg_bindir


def require(name: str, present: bool) -> None:
    if present:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{name} is not available (CI=true: a failure, not a skip)")
    pytest.skip(f"{name} is not available")


@pytest.fixture(scope="session")
def pg_cluster():
    require("PostgreSQL", find_pg_bindir() is not None)
    from guard.devstack.demo_data import create_demo_database

    cluster = PostgresCluster().start()
    try:
        create_demo_database(cluster.admin_dsn())
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def openbao(tmp_path_factory):
    require("OpenBao", find_bao() is not None)
    server = OpenBaoDevServer().start(Path(tmp_path_factory.mktemp("openbao")))
    try:
        yield server
    finally:
        server.stop()
