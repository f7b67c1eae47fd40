"""psycopg 3 through the real gateway, each case compared with the same statements sent
directly to PostgreSQL (admin DSN) or with the masked form for protected columns."""

from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal

import psycopg
import pytest

from tests.fix_stack import Stack, denying_approvals
from tests.integration.test_gateway import (
    connect,
    session,  # noqa: F401 - module-scoped fixture
)

pytestmark = pytest.mark.integration
MASKED_SSN = "***-**-6789"


@pytest.fixture(scope="module")
def gconn(session):  # noqa: F811
    with connect(session, autocommit=True) as conn:
        yield conn


QUERIES = [
    ("SELECT id, name, kind, rate FROM products ORDER BY id", ()),
    ("SELECT id, customer_id, balance FROM accounts WHERE id <= %s ORDER BY id", (40,)),
    ("SELECT full_name, phone FROM customers WHERE id BETWEEN %s AND %s ORDER BY id", (1, 25)),
    ("SELECT array_agg(name ORDER BY id), max(rate), count(*) FROM products", ()),
]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_text_and_binary_cursors_equal_direct(dev_stack: Stack, gconn, binary):
    cur = gconn.cursor(binary=binary)
    for sql, params in QUERIES:
        assert cur.execute(sql, params).fetchall() == dev_stack.direct(sql, params), sql
    assert cur.execute("SELECT ssn, email FROM customers WHERE id = %s", (1,)).fetchone() == (
        MASKED_SSN,
        "a***@example.com",
    )


def test_pipeline_many_statements(dev_stack: Stack, gconn):
    with gconn.pipeline():
        curs = []
        for i in range(1, 41):
            cur = gconn.cursor()
            cur.execute("SELECT id, name, rate FROM products WHERE id = %s", (i % 10 + 1,))
            curs.append((i % 10 + 1, cur))
        ssn_cur = gconn.cursor()
        ssn_cur.execute("SELECT ssn FROM customers WHERE id = %s", (1,))
    expected = {
        r[0]: r for r in dev_stack.direct("SELECT id, name, rate FROM products ORDER BY id")
    }
    for pid, cur in curs:
        assert cur.fetchone() == expected[pid]
    assert ssn_cur.fetchone() == (MASKED_SSN,)


def test_server_side_cursors(dev_stack: Stack, session):  # noqa: F811
    sql = "SELECT id, balance FROM accounts ORDER BY id"
    expected = dev_stack.direct(sql)
    with connect(session) as conn:
        with conn.cursor(name="ss_plain") as cur:
            cur.itersize = 100
            cur.execute(sql)
            assert list(cur) == expected
        with conn.cursor(name="ss_scroll", scrollable=True) as cur:
            cur.execute(sql)
            cur.scroll(100, mode="absolute")
            assert cur.fetchone() == expected[100]
            cur.scroll(-51)
            assert cur.fetchone() == expected[50]
        conn.commit()
        with conn.cursor(name="ss_hold", withhold=True, scrollable=True) as cur:
            cur.execute("SELECT id, ssn FROM customers ORDER BY id")
            conn.commit()  # a WITH HOLD cursor survives the commit
            assert cur.fetchmany(3)[0] == (1, MASKED_SSN)
            cur.scroll(0, mode="absolute")
            assert cur.fetchone() == (1, MASKED_SSN)


def test_copy_to_and_copy_from_stdin(dev_stack: Stack, session):  # noqa: F811
    tag = f"compat-psycopg-copy-{uuid.uuid4().hex[:8]}"
    rows = [(f"{tag}-{i}", "test", Decimal(f"{i}.50")) for i in range(5)]

    def copy_out(conn, sql):
        with conn.cursor().copy(sql) as cp:
            return b"".join(bytes(c) for c in cp)

    with psycopg.connect(dev_stack.admin_dsn) as admin:
        expected_out = copy_out(admin, "COPY products TO STDOUT")
        expected_csv = copy_out(
            admin, "COPY (SELECT id, name FROM products) TO STDOUT (FORMAT csv)"
        )
    try:
        with connect(session, autocommit=True) as conn:
            assert copy_out(conn, "COPY products TO STDOUT") == expected_out
            assert (
                copy_out(conn, "COPY (SELECT id, name FROM products) TO STDOUT (FORMAT csv)")
                == expected_csv
            )
            with conn.cursor().copy("COPY products (name, kind, rate) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
            got = conn.execute(
                "SELECT name, kind, rate FROM products WHERE name LIKE %s ORDER BY name",
                (tag + "%",),
            ).fetchall()
            assert got == rows
            assert (
                dev_stack.direct(
                    "SELECT name, kind, rate FROM products WHERE name LIKE %s ORDER BY name",
                    (tag + "%",),
                )
                == rows
            )
            deleted = conn.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",))
            assert deleted.rowcount == len(rows)
    finally:
        with psycopg.connect(dev_stack.admin_dsn) as admin:
            admin.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",))
    assert dev_stack.direct("SELECT count(*) FROM products WHERE name LIKE %s", (tag + "%",)) == [
        (0,)
    ]


def test_cancel_safe_during_pg_sleep(session):  # noqa: F811
    with connect(session, autocommit=True) as conn:
        if not hasattr(conn, "cancel_safe"):
            pytest.skip("psycopg < 3.2 has no cancel_safe()")
        errors: list[BaseException] = []

        def cancel():
            time.sleep(0.5)
            try:
                conn.cancel_safe(timeout=5)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        t = threading.Thread(target=cancel)
        t.start()
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        t.join()
        assert not errors
        assert time.monotonic() - start < 5
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_executemany(dev_stack: Stack, session):  # noqa: F811
    tag = f"compat-psycopg-em-{uuid.uuid4().hex[:8]}"
    try:
        with connect(session) as conn:
            cur = conn.cursor()
            cur.executemany(
                "INSERT INTO products (name, kind, rate) VALUES (%s, 'test', %s)",
                [(f"{tag}-{i}", Decimal(i)) for i in range(6)],
            )
            cur.executemany(
                "UPDATE products SET rate = rate + %s WHERE name = %s",
                [(Decimal("0.5"), f"{tag}-{i}") for i in range(6)],
            )
            cur.executemany(
                "SELECT id, rate FROM products WHERE name = %s",
                [(f"{tag}-{i}",) for i in range(3)],
                returning=True,
            )
            returned = []
            while True:
                returned.append(cur.fetchone()[1])
                if not cur.nextset():
                    break
            conn.commit()
        assert returned == [Decimal("0.5"), Decimal("1.5"), Decimal("2.5")]
        assert [
            r[0]
            for r in dev_stack.direct(
                "SELECT rate FROM products WHERE name LIKE %s ORDER BY name",
                (tag + "%",),
            )
        ] == [Decimal(i) + Decimal("0.5") for i in range(6)]
    finally:
        with psycopg.connect(dev_stack.admin_dsn) as admin:
            admin.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",))


def test_nested_savepoints_with_refusal(dev_stack: Stack, session):  # noqa: F811
    tag = f"compat-psycopg-sp-{uuid.uuid4().hex[:8]}"
    try:
        with connect(session) as conn:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO products (name, kind, rate) VALUES (%s, 'test', 1)", (tag + "-a",)
                )
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO products (name, kind, rate) VALUES (%s, 'test', 1)",
                        (tag + "-b",),
                    )
                    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="deny-ddl"):
                        with conn.transaction():
                            conn.execute(
                                "INSERT INTO products (name, kind, rate) VALUES (%s, 'test', 1)",
                                (tag + "-c",),
                            )
                            conn.execute("DROP TABLE products")
                    # Rolled back to the inner savepoint: the transaction is usable again.
                    assert conn.execute("SELECT 1").fetchone() == (1,)
                    # Held for approval inside the transaction, then denied: the error
                    # rolls back to the savepoint like any other.
                    with denying_approvals(dev_stack):
                        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="approval"):
                            with conn.transaction():
                                conn.execute("SELECT count(*) FROM transactions")
                names = conn.execute(
                    "SELECT name FROM products WHERE name LIKE %s ORDER BY name", (tag + "%",)
                ).fetchall()
                assert names == [(tag + "-a",), (tag + "-b",)]
        assert dev_stack.direct(
            "SELECT name FROM products WHERE name LIKE %s ORDER BY name", (tag + "%",)
        ) == [(tag + "-a",), (tag + "-b",)]
    finally:
        with psycopg.connect(dev_stack.admin_dsn) as admin:
            admin.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",))


def test_listen_notify_refused_by_demo_policy(dev_stack: Stack, session):  # noqa: F811
    """The demo policy allows no LISTEN/NOTIFY (default deny): both are refused through
    the gateway with 42501 naming the default rule, and the connections stay usable. A
    notification sent directly is therefore never delivered to a gateway client."""
    with (
        connect(session, autocommit=True) as listener,
        connect(session, autocommit=True) as notifier,
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="default-deny"):
            listener.execute("LISTEN guard_compat")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="default-deny"):
            notifier.execute("NOTIFY guard_compat, 'x'")
        with psycopg.connect(dev_stack.admin_dsn, autocommit=True) as admin:
            admin.execute("NOTIFY guard_compat, 'direct'")
        assert list(listener.notifies(timeout=0.5)) == []
        assert listener.execute("SELECT 1").fetchone() == (1,)
        assert notifier.execute("SELECT 2").fetchone() == (2,)


def _latin1_roundtrip(conn: psycopg.Connection):
    conn.execute("SET client_encoding TO 'LATIN1'")
    assert conn.info.encoding == "iso8859-1"
    row = conn.execute("SELECT 'café'::text, name FROM products WHERE id = 1").fetchone()
    conn.execute("RESET client_encoding")
    return row


def test_ascii_queries_after_set_client_encoding(dev_stack: Stack, session):  # noqa: F811
    with connect(session, autocommit=True) as conn:
        conn.execute("SET client_encoding TO 'LATIN1'")
        got = conn.execute("SELECT id, name FROM products ORDER BY id").fetchall()
        conn.execute("RESET client_encoding")
    assert got == dev_stack.direct("SELECT id, name FROM products ORDER BY id")


def test_non_utf8_client_encoding_like_direct(dev_stack: Stack, session):  # noqa: F811
    with psycopg.connect(dev_stack.admin_dsn, autocommit=True) as admin:
        expected = _latin1_roundtrip(admin)
    with connect(session, autocommit=True) as conn:
        assert _latin1_roundtrip(conn) == expected
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_binary_copy_from_and_prepared_pipeline(dev_stack: Stack, gconn):
    tag = f"compat-psycopg-bin-{uuid.uuid4().hex[:8]}"
    try:
        with gconn.cursor().copy(
            "COPY products (name, kind, rate) FROM STDIN (FORMAT binary)"
        ) as cp:
            cp.set_types(["text", "text", "numeric"])
            for i in range(3):
                cp.write_row((f"{tag}-{i}", "test", Decimal(f"{i}.75")))
        assert dev_stack.direct(
            "SELECT name, rate FROM products WHERE name LIKE %s ORDER BY name",
            (tag + "%",),
        ) == [(f"{tag}-{i}", Decimal(f"{i}.75")) for i in range(3)]
        expected = dict(dev_stack.direct("SELECT id, name FROM products"))
        for _ in range(2):  # second round runs the server-prepared statements
            with gconn.pipeline():
                curs = [
                    (
                        i % 10 + 1,
                        gconn.execute(
                            "SELECT name FROM products WHERE id = %s", (i % 10 + 1,), prepare=True
                        ),
                    )
                    for i in range(20)
                ]
            assert [c.fetchone()[0] for _, c in curs] == [expected[pid] for pid, _ in curs]
        assert gconn.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",)).rowcount == 3
    finally:
        with psycopg.connect(dev_stack.admin_dsn) as admin:
            admin.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",))
