"""asyncpg through the real gateway, each case compared with the same statements sent
directly to PostgreSQL (admin DSN) or with the masked form for protected columns."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import uuid
from decimal import Decimal

import psycopg
import pytest

from tests.fix_stack import Stack, denying_approvals
from tests.integration.test_gateway import session  # noqa: F401 - module-scoped fixture

asyncpg = pytest.importorskip("asyncpg")

pytestmark = pytest.mark.integration
MASKED_SSN = "***-**-6789"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def gateway_tls(stack: Stack) -> ssl.SSLContext:
    """Verified TLS to the gateway (certificate chain to the dev CA, and the host name)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(stack.status["gateway_ca"])
    return ctx


async def gw(stack: Stack, sess: dict, tls: bool = True):
    """asyncpg through the gateway; always verified TLS (the gateway refuses plaintext;
    `tls` stays for callers that pass it)."""
    assert tls, "the gateway serves verified TLS only"
    return await asyncpg.connect(**gw_params(sess), ssl=gateway_tls(stack), timeout=10)


def gw_params(sess: dict) -> dict:
    """asyncpg's connection arguments for the gateway of session `sess`."""
    return {
        "host": sess["gateway_host"],
        "port": sess["gateway_port"],
        "user": sess["user"],
        "password": sess["password"],
        "database": sess["database"],
    }


def test_connect_over_verified_tls(dev_stack: Stack, session):  # noqa: F811
    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            used_ssl = conn._transport.get_extra_info("sslcontext") is not None
            return (
                used_ssl,
                await conn.fetchval("SELECT count(*) FROM products"),
                await conn.fetchval("SELECT ssn FROM customers WHERE id = $1", 1),
            )
        finally:
            await conn.close()

    used_ssl, count, ssn = run(scenario())
    assert used_ssl is True
    assert count == dev_stack.direct("SELECT count(*) FROM products")[0][0]
    assert ssn == MASKED_SSN


def test_prepared_statements_many_times(dev_stack: Stack, session):  # noqa: F811
    sql = "SELECT id, name, kind, rate FROM products WHERE id <= $1 ORDER BY id"

    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            stmt = await conn.prepare(sql)
            results = []
            for n in range(1, 11):
                results.append((n, [tuple(r) for r in await stmt.fetch(n)]))
            row = await stmt.fetchrow(3)
            val = await (await conn.prepare("SELECT name FROM products WHERE id = $1")).fetchval(2)
            ssn_stmt = await conn.prepare("SELECT ssn FROM customers WHERE id = $1")
            ssns = [await ssn_stmt.fetchval(1) for _ in range(8)]
            return results, tuple(row), val, ssns
        finally:
            await conn.close()

    results, row, val, ssns = run(scenario())
    for n, rows in results:
        assert rows == dev_stack.direct(sql.replace("$1", "%s"), (n,))
    assert row == dev_stack.direct(sql.replace("$1", "%s"), (3,))[0]
    assert val == dev_stack.direct("SELECT name FROM products WHERE id = 2")[0][0]
    assert ssns == [MASKED_SSN] * 8


def test_binary_codecs_equal_direct(dev_stack: Stack, session):  # noqa: F811
    queries = [
        "SELECT id, rate, name FROM products ORDER BY id",
        "SELECT id, customer_id, balance FROM accounts ORDER BY id LIMIT 50",
        "SELECT array_agg(name ORDER BY id), array_agg(id ORDER BY id) FROM products",
        "SELECT c.full_name, c.phone, a.balance FROM customers c "
        "JOIN accounts a ON a.customer_id = c.id ORDER BY a.id LIMIT 20",
        "SELECT sum(balance), count(*) FROM accounts",
    ]
    roundtrip = "SELECT $1::int, $2::numeric, $3::date, $4::timestamptz, $5::text[], $6::bigint[]"
    args = (
        42,
        Decimal("12345.67"),
        dt.date(1999, 12, 31),
        dt.datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=dt.UTC),
        ["a", "b,c", None, 'q"x'],
        [1, 2**40],
    )

    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            out = [[tuple(r) for r in await conn.fetch(q)] for q in queries]
            rt = tuple(await conn.fetchrow(roundtrip, *args))
            masked = tuple(
                await conn.fetchrow("SELECT ssn, email, dob FROM customers WHERE id = $1", 1)
            )
            acct = await conn.fetchval("SELECT account_number FROM accounts WHERE id = 1")
            return out, rt, masked, acct
        finally:
            await conn.close()

    out, rt, masked, acct = run(scenario())
    for q, rows in zip(queries, out, strict=True):
        direct = dev_stack.direct(q)
        # psycopg returns lists for arrays, like asyncpg.
        assert rows == direct, q
    assert rt == args
    raw = dev_stack.direct("SELECT ssn, email, dob FROM customers WHERE id = 1")[0]
    assert masked[0] == MASKED_SSN and masked[0][-4:] == raw[0][-4:]
    assert masked[1] == raw[1][0] + "***@" + raw[1].split("@")[1]
    assert masked[2] == dt.date(raw[2].year, 1, 1)
    raw_acct = dev_stack.direct("SELECT account_number FROM accounts WHERE id = 1")[0][0]
    assert acct != raw_acct and acct.endswith(raw_acct[-4:]) and set(acct[:-4]) == {"*"}


def test_executemany_update_with_where(dev_stack: Stack, session):  # noqa: F811
    tag = f"compat-asyncpg-{uuid.uuid4().hex[:8]}"

    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            ids = [
                await conn.fetchval(
                    "INSERT INTO products (name, kind, rate) VALUES ($1, 'test', 1) RETURNING id",
                    f"{tag}-{i}",
                )
                for i in range(3)
            ]
            await conn.executemany(
                "UPDATE products SET rate = $1 WHERE id = $2",
                [(Decimal(f"{i + 2}.25"), pid) for i, pid in enumerate(ids)],
            )
            return ids
        finally:
            await conn.close()

    try:
        ids = run(scenario())
        rows = dev_stack.direct(
            "SELECT id, rate FROM products WHERE name LIKE %s ORDER BY id", (tag + "%",)
        )
        assert rows == [(pid, Decimal(f"{i + 2}.25")) for i, pid in enumerate(ids)]
    finally:
        with psycopg.connect(dev_stack.admin_dsn) as conn:
            conn.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",))


def test_copy_from_query_and_table_equal_direct(dev_stack: Stack, session):  # noqa: F811
    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            q, t, tb = bytearray(), bytearray(), bytearray()

            async def into(buf):
                async def sink(chunk: bytes) -> None:
                    buf.extend(chunk)

                return sink

            await conn.copy_from_query(
                "SELECT id, name, rate FROM products WHERE id <= $1 ORDER BY id",
                5,
                output=await into(q),
            )
            await conn.copy_from_table("products", output=await into(t))
            await conn.copy_from_table(
                "products", columns=["id", "name"], output=await into(tb), format="csv"
            )
            return bytes(q), bytes(t), bytes(tb)
        finally:
            await conn.close()

    q, t, tb = run(scenario())

    def direct_copy(sql: str) -> bytes:
        with psycopg.connect(dev_stack.admin_dsn) as conn:
            with conn.cursor().copy(sql) as cp:
                return b"".join(bytes(c) for c in cp)

    assert q == direct_copy(
        "COPY (SELECT id, name, rate FROM products WHERE id <= 5 ORDER BY id) TO STDOUT"
    )
    assert t == direct_copy("COPY products TO STDOUT")
    assert tb == direct_copy("COPY products (id, name) TO STDOUT (FORMAT csv)")


def test_transaction_refusal_then_rollback(dev_stack: Stack, session):  # noqa: F811
    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            tr = conn.transaction()
            await tr.start()
            assert await conn.fetchval("SELECT count(*) FROM products") > 0
            with pytest.raises(
                asyncpg.exceptions.InsufficientPrivilegeError, match="deny-ddl"
            ) as exc:
                await conn.execute("DROP TABLE products")
            assert exc.value.sqlstate == "42501"
            with pytest.raises(asyncpg.exceptions.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            await tr.rollback()
            assert not conn.is_in_transaction()
            # Refused outside an explicit transaction too, and the connection stays usable.
            # Held for approval, then denied (by the test's reviewer): an error in its place.
            with denying_approvals(dev_stack):
                with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="approval"):
                    await conn.fetch("SELECT * FROM transactions LIMIT 1")
            return await conn.fetchval("SELECT count(*) FROM products")
        finally:
            await conn.close()

    assert run(scenario()) == dev_stack.direct("SELECT count(*) FROM products")[0][0]


def test_cursor_iteration_in_transaction(dev_stack: Stack, session):  # noqa: F811
    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            async with conn.transaction():
                got = [
                    tuple(r)
                    async for r in conn.cursor(
                        "SELECT id, balance FROM accounts WHERE id <= $1 ORDER BY id",
                        120,
                        prefetch=17,
                    )
                ]
                cur = await conn.cursor("SELECT id, ssn FROM customers ORDER BY id")
                first = tuple(await cur.fetchrow())
                await cur.forward(9)
                ten = [tuple(r) for r in await cur.fetch(3)]
            return got, first, ten
        finally:
            await conn.close()

    got, first, ten = run(scenario())
    assert got == dev_stack.direct("SELECT id, balance FROM accounts WHERE id <= 120 ORDER BY id")
    assert first == (1, MASKED_SSN)
    assert [r[0] for r in ten] == [11, 12, 13]
    assert all(r[1].startswith("***-**-") for r in ten)


def test_cancelled_query_leaves_connection_usable(dev_stack: Stack, session):  # noqa: F811
    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.fetch("SELECT pg_sleep(10)"), 0.5)
            elapsed = loop.time() - start
            after = [await conn.fetchval("SELECT $1::int + 1", i) for i in range(3)]
            count = await conn.fetchval("SELECT count(*) FROM products")
            return elapsed, after, count
        finally:
            await conn.close()

    elapsed, after, count = run(scenario())
    assert elapsed < 5
    assert after == [1, 2, 3]
    assert count == dev_stack.direct("SELECT count(*) FROM products")[0][0]


def test_pool_reset_query_parts_other_than_unlisten_pass(dev_stack: Stack, session):  # noqa: F811
    async def scenario():
        conn = await gw(dev_stack, session)
        try:
            await conn.execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; RESET ALL;")
            return await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    assert run(scenario()) == 1


def test_pool_acquire_release_like_direct(dev_stack: Stack, session):  # noqa: F811
    async def use_pool(**connect_kwargs):
        pool = await asyncpg.create_pool(min_size=1, max_size=1, **connect_kwargs)
        try:
            return [await pool.fetchval("SELECT count(*) + $1 FROM products", i) for i in range(3)]
        finally:
            await pool.close()

    kw = psycopg.conninfo.conninfo_to_dict(dev_stack.admin_dsn)
    direct_result = run(
        use_pool(
            host=kw["host"],
            port=int(kw["port"]),
            user=kw["user"],
            password=kw["password"],
            database=kw["dbname"],
            ssl=False,
        )
    )
    gateway_result = run(use_pool(**gw_params(session), ssl=gateway_tls(dev_stack)))
    assert gateway_result == direct_result
