"""SQLAlchemy 2 (postgresql+psycopg) through the real gateway, compared with the same
statements sent directly to PostgreSQL (admin DSN)."""

from __future__ import annotations

import uuid
from decimal import Decimal

import psycopg
import pytest

from tests.fix_stack import Stack
from tests.integration.test_gateway import session  # noqa: F401 - module-scoped fixture

sa = pytest.importorskip("sqlalchemy")
from sqlalchemy import orm  # noqa: E402

pytestmark = pytest.mark.integration
MASKED_SSN = "***-**-6789"


class Base(orm.DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]
    kind: orm.Mapped[str]
    rate: orm.Mapped[Decimal] = orm.mapped_column(sa.Numeric(5, 2))


def gateway_url(sess: dict, **query: str) -> sa.URL:
    """SQLAlchemy URL of the gateway for session `sess` (psycopg 3 driver)."""
    return sa.URL.create(
        "postgresql+psycopg",
        username=sess["user"],
        password=sess["password"],
        host=sess["gateway_host"],
        port=sess["gateway_port"],
        database=sess["database"],
        query=query,
    )


@pytest.fixture(scope="module")
def engine(dev_stack: Stack, session):  # noqa: F811
    url = gateway_url(session, sslmode="verify-full", sslrootcert=dev_stack.status["gateway_ca"])
    eng = sa.create_engine(url, pool_size=2)
    yield eng
    eng.dispose()


def test_orm_and_core_select_equal_direct(dev_stack: Stack, engine):
    expected = dev_stack.direct("SELECT id, name, kind, rate FROM products ORDER BY id")
    with orm.Session(engine) as s:
        got = [
            (p.id, p.name, p.kind, p.rate)
            for p in s.scalars(sa.select(Product).order_by(Product.id))
        ]
        assert got == expected
        assert s.get(Product, 3).name == expected[2][1]
    t = Product.__table__
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.id, t.c.rate).where(t.c.rate > 1).order_by(t.c.rate.desc(), t.c.id)
        ).all()
        assert [tuple(r) for r in rows] == dev_stack.direct(
            "SELECT id, rate FROM products WHERE rate > 1 ORDER BY rate DESC, id"
        )
        agg = conn.execute(sa.select(sa.func.count(), sa.func.sum(t.c.rate))).one()
        assert tuple(agg) == dev_stack.direct("SELECT count(*), sum(rate) FROM products")[0]


def test_text_with_bound_params(dev_stack: Stack, engine):
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT a.id, a.balance, c.full_name FROM accounts a JOIN customers c "
                "ON c.id = a.customer_id WHERE a.id BETWEEN :lo AND :hi ORDER BY a.id"
            ),
            {"lo": 10, "hi": 30},
        ).all()
        assert [tuple(r) for r in rows] == dev_stack.direct(
            "SELECT a.id, a.balance, c.full_name FROM accounts a JOIN customers c "
            "ON c.id = a.customer_id WHERE a.id BETWEEN 10 AND 30 ORDER BY a.id",
        )
        ssn = conn.execute(
            sa.text("SELECT ssn FROM customers WHERE id = :id"), {"id": 1}
        ).scalar_one()
        assert ssn == MASKED_SSN
        expanding = sa.text("SELECT name FROM products WHERE id IN :ids ORDER BY id").bindparams(
            sa.bindparam("ids", expanding=True)
        )
        names = conn.execute(expanding, {"ids": [1, 4, 7]}).scalars().all()
        assert names == [
            r[0]
            for r in dev_stack.direct("SELECT name FROM products WHERE id IN (1,4,7) ORDER BY id")
        ]


def test_insert_update_delete_in_transaction(dev_stack: Stack, engine):
    tag = f"compat-sqla-{uuid.uuid4().hex[:8]}"
    try:
        with orm.Session(engine) as s, s.begin():
            s.add_all([Product(name=f"{tag}-{i}", kind="test", rate=Decimal(i)) for i in range(3)])
            s.flush()
            ids = sorted(
                p.id for p in s.scalars(sa.select(Product).where(Product.name.like(tag + "%")))
            )
            s.execute(
                sa.update(Product).where(Product.name == f"{tag}-1").values(rate=Decimal("9.99"))
            )
            s.execute(sa.delete(Product).where(Product.name == f"{tag}-2"))
        assert dev_stack.direct(
            "SELECT id, name, rate FROM products WHERE name LIKE %s ORDER BY id",
            (tag + "%",),
        ) == [(ids[0], f"{tag}-0", Decimal(0)), (ids[1], f"{tag}-1", Decimal("9.99"))]
        # A refused statement inside a transaction rolls the whole unit of work back.
        with pytest.raises(sa.exc.ProgrammingError, match="deny-ddl"):
            with engine.begin() as conn:
                conn.execute(sa.delete(Product.__table__).where(Product.name == f"{tag}-0"))
                conn.execute(sa.text("DROP TABLE products"))
        assert len(dev_stack.direct("SELECT 1 FROM products WHERE name LIKE %s", (tag + "%",))) == 2
        with engine.begin() as conn:
            res = conn.execute(sa.delete(Product.__table__).where(Product.name.like(tag + "%")))
            assert res.rowcount == 2
    finally:
        with psycopg.connect(dev_stack.admin_dsn) as admin:
            admin.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",))


def test_reflection_of_products(dev_stack: Stack, engine):
    meta = sa.MetaData()
    meta.reflect(engine, only=["products"])
    gw = meta.tables["products"]
    direct_meta = sa.MetaData()
    direct_engine = sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dev_stack.admin_dsn)
    )
    try:
        direct_meta.reflect(direct_engine, only=["products"])
    finally:
        direct_engine.dispose()
    dt = direct_meta.tables["products"]
    assert [(c.name, str(c.type), c.nullable) for c in gw.columns] == [
        (c.name, str(c.type), c.nullable) for c in dt.columns
    ]
    assert [c.name for c in gw.primary_key] == [c.name for c in dt.primary_key] == ["id"]
    insp = sa.inspect(engine)
    assert "products" in insp.get_table_names()
    assert insp.get_pk_constraint("products")["constrained_columns"] == ["id"]
