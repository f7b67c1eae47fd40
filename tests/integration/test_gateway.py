"""Protocol paths through the real gateway, each compared with PostgreSQL's own behaviour.

A session is opened through the broker API with a real ID token from the dev IdP; clients
then connect straight to the gateway with the session user and secret.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from tests.fix_stack import Stack, gateway_connect

pytestmark = pytest.mark.integration

MASKED_SSN = "***-**-6789"


@pytest.fixture(scope="module")
def session(dev_stack: Stack):
    body, headers = dev_stack.open_session()
    yield body
    dev_stack.end_session(body["session_id"], headers)


connect = gateway_connect  # the name the protocol and compatibility tests import


def test_wrong_secret_is_refused(session):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect({**session, "password": "wrong"})


def test_wrong_database_is_refused(session):
    with pytest.raises(psycopg.OperationalError, match="this session is for database"):
        connect({**session, "database": "postgres"})


def test_extended_protocol_text_and_binary_masked(session):
    with connect(session) as conn:
        assert (
            conn.execute("SELECT ssn FROM customers WHERE id = %s", (1,)).fetchone()[0]
            == MASKED_SSN
        )
        cur = conn.cursor(binary=True)
        assert cur.execute("SELECT ssn, email FROM customers WHERE id = %s", (1,)).fetchone() == (
            MASKED_SSN,
            "a***@example.com",
        )
        # Named prepared statement executed several times (psycopg prepares after 5 uses).
        for _ in range(7):
            row = conn.execute(
                "SELECT ssn FROM customers WHERE id = %s", (1,), prepare=True
            ).fetchone()
            assert row[0] == MASKED_SSN


def test_pipeline_mode_with_refusal_keeps_postgres_semantics(session):
    with connect(session) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="deny-ddl"):
            with conn.pipeline():
                conn.execute("SELECT 1")
                conn.execute("DROP TABLE products")
                conn.execute("SELECT 2")
        # As with PostgreSQL itself: the implicit transaction is aborted until rollback.
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 3")
        conn.rollback()
        assert conn.execute("SELECT 3").fetchone()[0] == 3


def test_refusal_inside_transaction_aborts_it_like_postgres(session):
    with connect(session) as conn:
        conn.execute("BEGIN")
        conn.execute("UPDATE products SET rate = rate WHERE id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE products")
        # PostgreSQL semantics: the transaction is now aborted.
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_multi_statement_string_refused_as_a_whole(session):
    with connect(session, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM products").fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO products (name, kind, rate) VALUES ('x', 'y', 1); DROP TABLE products"
            )
        assert conn.execute("SELECT count(*) FROM products").fetchone()[0] == before


def test_server_side_cursor_and_copy(session):
    with connect(session) as conn:
        with conn.cursor(name="c1") as cur:
            cur.itersize = 10
            cur.execute("SELECT id, ssn FROM customers ORDER BY id")
            rows = cur.fetchmany(25)
        assert len(rows) == 25 and rows[0][1] == MASKED_SSN
        with conn.cursor().copy("COPY products TO STDOUT") as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
        assert data.count(b"\n") >= 5


def test_copy_of_protected_table_never_returns_raw_values(session):
    with connect(session) as conn:
        try:
            with conn.cursor().copy("COPY customers TO STDOUT") as copy:
                data = b"".join(bytes(chunk) for chunk in copy)
        except psycopg.Error:
            return  # refused: acceptable
        assert b"123-45-6789" not in data


def test_base_table_spelling_reads_the_masking_view(session):
    # The gateway points it at guard_masked (tests/integration/test_redirect.py has every
    # spelling); the session role still may not read the base table (tests/masking).
    with connect(session) as conn:
        row = conn.execute("SELECT ssn FROM public.customers WHERE id = 1").fetchone()
    assert row[0] == MASKED_SSN


def test_derived_use_refused(session):
    with connect(session) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="ssn"):
            conn.execute("SELECT upper(ssn) FROM customers").fetchone()


def test_cancel_request_reaches_upstream(session):
    with connect(session) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - start < 10
        timer.join()


def test_session_end_closes_live_connections(dev_stack: Stack):
    body, headers = dev_stack.open_session()
    conn = connect(body)
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    assert dev_stack.end_session(body["session_id"], headers).status_code == 204
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg.OperationalError):
        connect(body)


def test_session_refused_for_user_without_group(dev_stack: Stack):
    token = dev_stack.guard("dev", "token", "mallory").stdout.strip()
    response = dev_stack.request_session(token)
    assert response.status_code == 403
    assert "demo" in response.json()["message"]


def test_bad_token_is_401(dev_stack: Stack):
    response = dev_stack.api(
        "POST",
        "/v1/sessions",
        json={"target": "demo"},
        headers={"Authorization": "Bearer not.a.token"},
    )
    assert response.status_code == 401


def test_tls_verify_full_against_the_dev_ca(dev_stack: Stack, session):
    conn = psycopg.connect(
        host=session["gateway_host"],
        port=session["gateway_port"],
        user=session["user"],
        password=session["password"],
        dbname=session["database"],
        sslmode="verify-full",
        sslrootcert=dev_stack.status["gateway_ca"],
        connect_timeout=10,
    )
    with conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0] == MASKED_SSN


def test_session_response_announces_tls(session):
    assert session["gateway_tls"] is True


def test_with_hold_scroll_cursor_and_default_deny_of_listen(session):
    with connect(session, autocommit=True) as conn:
        conn.execute(
            "DECLARE h SCROLL CURSOR WITH HOLD FOR SELECT id, ssn FROM customers ORDER BY id"
        )
        assert conn.execute("FETCH ABSOLUTE 1 FROM h").fetchone() == (1, MASKED_SSN)
        assert conn.execute("FETCH PRIOR FROM h").fetchone() is None
        conn.execute("CLOSE h")
        # The demo policy allows no LISTEN/NOTIFY (a channel that can carry values out):
        # anything no rule allows is refused, naming the default rule.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="default-deny"):
            conn.execute("LISTEN guard_test")
