"""The demo database is deterministic and matches what the tour and tests rely on."""

from __future__ import annotations

import psycopg
import pytest

from guard.devstack.demo_data import rows

pytestmark = pytest.mark.integration


def test_demo_rows_are_deterministic():
    assert rows() == rows()
    first = rows()["customers"][0]
    assert first[1:4] == ("Alice Anderson", "123-45-6789", "alice.anderson@example.com")


def test_demo_database_loaded(pg_cluster):
    with psycopg.connect(pg_cluster.admin_dsn("demo")) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == 1000
        assert conn.execute("SELECT count(*) FROM accounts").fetchone()[0] == 1500
        assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] == 5000
        assert conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0] == "123-45-6789"
        assert (
            conn.execute("SELECT count(DISTINCT length(account_number)) FROM accounts").fetchone()[
                0
            ]
            == 1
        )
