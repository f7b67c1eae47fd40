"""Compatibility through the real gateway: asyncpg, SQLAlchemy and psql meta-commands,
each compared with the same statements sent directly to PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from tests.fix_stack import Stack
from tests.integration.test_gateway import session  # noqa: F401 - module-scoped fixture

pytestmark = pytest.mark.integration
MASKED_SSN = "***-**-6789"


def test_asyncpg_prepared_binary_copy_and_refusal(dev_stack: Stack, session):  # noqa: F811
    import asyncpg

    from tests.integration.test_compat_asyncpg import gw

    async def scenario():
        conn = await gw(dev_stack, session, tls=True)
        try:
            stmt = await conn.prepare(
                "SELECT id, name, rate FROM products WHERE id <= $1 ORDER BY id"
            )
            for _ in range(5):
                rows = [tuple(r) for r in await stmt.fetch(5)]
            assert await conn.fetchval("SELECT ssn FROM customers WHERE id = $1", 1) == MASKED_SSN
            balances = await conn.fetch("SELECT id, balance FROM accounts ORDER BY id LIMIT 20")
            out = bytearray()

            async def sink(chunk: bytes) -> None:
                out.extend(chunk)

            await conn.copy_from_query("SELECT id, name FROM products ORDER BY id", output=sink)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="deny-ddl"):
                async with conn.transaction():
                    await conn.execute("DROP TABLE products")
            assert await conn.fetchval("SELECT 1") == 1
            try:
                await asyncio.wait_for(conn.fetch("SELECT pg_sleep(10)"), 0.5)
            except TimeoutError:
                pass
            assert await conn.fetchval("SELECT 2") == 2
            return rows, [tuple(r) for r in balances], bytes(out)
        finally:
            await conn.close()

    rows, balances, copied = asyncio.run(scenario())
    assert rows == dev_stack.direct("SELECT id, name, rate FROM products WHERE id <= 5 ORDER BY id")
    assert balances == dev_stack.direct("SELECT id, balance FROM accounts ORDER BY id LIMIT 20")
    expected = "".join(
        f"{i}\t{n}\n" for i, n in dev_stack.direct("SELECT id, name FROM products ORDER BY id")
    )
    assert copied.decode() == expected


def test_sqlalchemy_core_and_reflection(dev_stack: Stack, session):  # noqa: F811
    import sqlalchemy as sa

    from tests.integration.test_compat_sqlalchemy import gateway_url

    url = gateway_url(session, sslmode="verify-full", sslrootcert=dev_stack.status["gateway_ca"])
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, name FROM products WHERE id <= :n ORDER BY id"), {"n": 3}
            ).all()
            assert [tuple(r) for r in rows] == dev_stack.direct(
                "SELECT id, name FROM products WHERE id <= 3 ORDER BY id"
            )
            ssn = conn.execute(sa.text("SELECT ssn FROM customers WHERE id = 1")).scalar_one()
            assert ssn == MASKED_SSN
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE products SET rate = rate WHERE id = :i"), {"i": 1})
        meta = sa.MetaData()
        meta.reflect(engine, only=["products"])
        assert [c.name for c in meta.tables["products"].columns] == ["id", "name", "kind", "rate"]
    finally:
        engine.dispose()


def test_psql_copy_gset_gexec_expanded(dev_stack: Stack, session):  # noqa: F811
    env = dev_stack.libpq_env(session)
    script = "\n".join(
        [
            r"\copy (SELECT id, name FROM products ORDER BY id) to stdout",
            r"SELECT count(*) AS n FROM products \gset",
            r"\echo products=:n",
            r"SELECT 'SELECT count(*) FROM accounts' \gexec",
            r"\x on",
            r"SELECT full_name, ssn FROM customers WHERE id = 1;",
            r"\d products",
        ]
    )
    out = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", "-"],
        input=script,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    expected_copy = "".join(
        f"{i}\t{n}\n" for i, n in dev_stack.direct("SELECT id, name FROM products ORDER BY id")
    )
    assert out.stdout.startswith(expected_copy)
    (products,) = dev_stack.direct("SELECT count(*) FROM products")[0]
    assert f"products={products}" in out.stdout
    (accounts,) = dev_stack.direct("SELECT count(*) FROM accounts")[0]
    assert f" {accounts}\n" in out.stdout
    assert f"ssn       | {MASKED_SSN}" in out.stdout
    assert "123-45-6789" not in out.stdout
    assert 'Table "public.products"' in out.stdout
