"""The throwaway PostgreSQL cluster and the deterministic demo bank database."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import psycopg
import pytest

from guard.devstack import stack
from guard.devstack.demo_data import CUSTOMER_1, rows
from guard.devstack.postgres import MISSING_HINT, PostgresCluster, find_pg_bindir
from tests.fix_pg import require

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_demo_rows_are_deterministic():
    first, second = rows(), rows()
    assert first == second
    assert first["customers"][0] == CUSTOMER_1
    assert CUSTOMER_1[1:5] == (
        "Alice Anderson",
        "123-45-6789",
        "alice.anderson@example.com",
        date(1985, 4, 12),
    )
    assert [len(first[t]) for t in ("customers", "accounts", "transactions", "products")] == [
        1000,
        1500,
        5000,
        10,
    ]
    assert first["accounts"][0][1] == 1  # account 1 belongs to customer 1


def test_cluster_runs_on_loopback_with_scram(pg_cluster):
    assert pg_cluster.host == "127.0.0.1" and pg_cluster.port > 0
    assert pg_cluster.pid and pg_cluster.data_dir.is_dir()
    with psycopg.connect(pg_cluster.admin_dsn("postgres")) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('listen_addresses', 'password_encryption', 'fsync')"
            ).fetchall()
        )
        assert conn.execute("SELECT current_setting('is_superuser')").fetchone()[0] == "on"
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "password_encryption": "scram-sha-256",
        "fsync": "off",
    }
    wrong = pg_cluster.admin_dsn("postgres").replace(
        f"password={pg_cluster.admin_password}", "password=wrong"
    )
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)


def test_demo_database_loaded(pg_cluster):
    with psycopg.connect(pg_cluster.admin_dsn("demo")) as conn:
        counts = {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("customers", "accounts", "transactions", "products")
        }
        assert counts == {"customers": 1000, "accounts": 1500, "transactions": 5000, "products": 10}
        alice = conn.execute(
            "SELECT id, full_name, ssn, email, dob, phone FROM customers WHERE id = 1"
        ).fetchone()
        assert alice == CUSTOMER_1
        assert conn.execute(
            "SELECT bool_and(ssn ~ '^\\d{3}-\\d{2}-\\d{4}$') FROM customers"
        ).fetchone()[0]
        assert conn.execute(
            "SELECT bool_and(account_number ~ '^\\d{12}$') FROM accounts"
        ).fetchone()[0]
        assert conn.execute("SELECT customer_ssn(1)").fetchone()[0] == "123-45-6789"
        assert conn.execute(
            "SELECT email FROM v_customer_contacts WHERE full_name = 'Alice Anderson'"
        ).fetchone()[0] == ("alice.anderson@example.com")
        # Sequences continue after the loaded ids; statistics exist (ANALYZE ran).
        assert conn.execute("SELECT nextval('customers_id_seq')").fetchone()[0] == 1001
        conn.rollback()
        stats = conn.execute(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND tablename = %s",
            ("customers",),
        )
        assert stats.fetchone()[0] > 0


def test_demo_data_is_the_same_in_the_database(pg_cluster):
    with psycopg.connect(pg_cluster.admin_dsn("demo")) as conn:
        got = conn.execute("SELECT md5(string_agg(ssn || email, ',' ORDER BY id)) FROM customers")
        expected = conn.execute(
            "SELECT md5(%s)", (",".join(r[2] + r[3] for r in rows()["customers"]),)
        )
        assert got.fetchone() == expected.fetchone()


def test_stop_removes_the_temporary_cluster():
    require("PostgreSQL", find_pg_bindir() is not None, MISSING_HINT)
    with PostgresCluster().start() as cluster:
        base, pid = cluster.base_dir, cluster.pid
        assert base is not None and base.name.startswith("guard-pg-") and pid
    assert not base.exists()
    assert not stack.alive(pid)  # gone (at most a zombie waiting for init to reap it)
    cluster.stop()  # idempotent


def test_packaged_default_policy_is_the_repo_policy():
    # `guard dev up` outside a checkout falls back to the copy shipped in the package.
    assert stack.PACKAGED_POLICY.read_text() == (REPO / "policies.yaml").read_text()
