"""The deterministic demo bank database `demo`: same rows on every run.

Generated with `random.Random(42)` from small embedded name lists and loaded with COPY.
Customer 1 is a fixed, known row (`CUSTOMER_1`: Alice Anderson, SSN 123-45-6789) that
tests rely on, and owns account 1. Also creates the objects the security contract names:
the owner-rights view `v_customer_contacts` (reads the protected `email` column with its
owner's rights) and the SECURITY DEFINER server function `customer_ssn(int)`.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql

FIRST = [
    "Alice",
    "Bob",
    "Carol",
    "David",
    "Erin",
    "Frank",
    "Grace",
    "Heidi",
    "Ivan",
    "Judy",
    "Karl",
    "Laura",
    "Mallory",
    "Niaj",
    "Olivia",
    "Peggy",
    "Quentin",
    "Rupert",
    "Sybil",
    "Trent",
    "Uma",
    "Victor",
    "Walter",
    "Xena",
    "Yusuf",
    "Zoe",
]
LAST = [
    "Anderson",
    "Baker",
    "Clark",
    "Diaz",
    "Evans",
    "Foster",
    "Garcia",
    "Hughes",
    "Iqbal",
    "Jones",
    "Khan",
    "Lopez",
    "Miller",
    "Nguyen",
    "Owens",
    "Patel",
    "Quinn",
    "Reyes",
    "Smith",
    "Turner",
    "Usman",
    "Vargas",
    "Wong",
    "Young",
    "Zhang",
]
DOMAINS = ["example.com", "example.org", "mail.example.net"]
PRODUCTS = [
    ("Everyday Checking", "checking", 0.01),
    ("Premier Checking", "checking", 0.05),
    ("Basic Savings", "savings", 0.50),
    ("High-Yield Savings", "savings", 4.10),
    ("12-Month CD", "cd", 4.75),
    ("24-Month CD", "cd", 4.50),
    ("Platinum Card", "credit", 21.99),
    ("Cashback Card", "credit", 24.49),
    ("Auto Loan", "loan", 6.90),
    ("Home Equity Line", "loan", 8.25),
]
MEMOS = [
    "grocery",
    "payroll",
    "rent",
    "utilities",
    "atm withdrawal",
    "transfer",
    "coffee",
    "online purchase",
    "refund",
    "interest",
]

SCHEMA = """
CREATE TABLE customers (
    id serial PRIMARY KEY, full_name text NOT NULL, ssn text NOT NULL UNIQUE,
    email text NOT NULL, dob date NOT NULL, phone text NOT NULL);
CREATE TABLE accounts (
    id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers(id),
    account_number text NOT NULL UNIQUE, balance numeric(12,2) NOT NULL);
CREATE TABLE transactions (
    id serial PRIMARY KEY, account_id int NOT NULL REFERENCES accounts(id),
    amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL, memo text);
CREATE TABLE products (
    id serial PRIMARY KEY, name text NOT NULL, kind text NOT NULL, rate numeric(5,2) NOT NULL);
CREATE VIEW v_customer_contacts AS SELECT full_name, email, phone FROM customers;
CREATE FUNCTION customer_ssn(customer int) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    AS 'SELECT ssn FROM public.customers WHERE id = customer';
"""

N_CUSTOMERS, N_ACCOUNTS, N_TRANSACTIONS = 1000, 1500, 5000

# (id, full_name, ssn, email, dob, phone): the stable row tests and the tour rely on.
CUSTOMER_1 = (
    1,
    "Alice Anderson",
    "123-45-6789",
    "alice.anderson@example.com",
    date(1985, 4, 12),
    "555-0100",
)


def rows(seed: int = 42) -> dict[str, list[tuple]]:
    """All demo rows by table, in COPY column order; the same on every call."""
    rnd = random.Random(seed)
    customers, seen_ssn = [CUSTOMER_1], {CUSTOMER_1[2]}
    for i in range(2, N_CUSTOMERS + 1):
        first, last = rnd.choice(FIRST), rnd.choice(LAST)
        while True:
            ssn = f"{rnd.randint(100, 899):03d}-{rnd.randint(1, 99):02d}-{rnd.randint(1, 9999):04d}"
            if ssn not in seen_ssn:
                seen_ssn.add(ssn)
                break
        email = f"{first.lower()}.{last.lower()}{i}@{rnd.choice(DOMAINS)}"
        dob = date(1940, 1, 1) + timedelta(days=rnd.randint(0, 365 * 62))
        customers.append((i, f"{first} {last}", ssn, email, dob, f"555-{rnd.randint(0, 9999):04d}"))
    accounts, seen_acct = [], set()
    for i in range(1, N_ACCOUNTS + 1):
        cust = 1 if i == 1 else rnd.randint(1, N_CUSTOMERS)
        while True:
            number = f"{rnd.randint(10**11, 10**12 - 1)}"
            if number not in seen_acct:
                seen_acct.add(number)
                break
        accounts.append((i, cust, number, round(rnd.uniform(-500, 250_000), 2)))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    transactions = [
        (
            i,
            rnd.randint(1, N_ACCOUNTS),
            round(rnd.uniform(-2_000, 5_000), 2),
            start + timedelta(minutes=rnd.randint(0, 300 * 24 * 60)),
            rnd.choice(MEMOS),
        )
        for i in range(1, N_TRANSACTIONS + 1)
    ]
    products = [(i, n, k, r) for i, (n, k, r) in enumerate(PRODUCTS, start=1)]
    return {
        "customers": customers,
        "accounts": accounts,
        "transactions": transactions,
        "products": products,
    }


def create_demo_database(admin_dsn: str, dbname: str = "demo") -> None:
    """Create `dbname` (dropping an old one) and load the demo schema and rows.

    `admin_dsn` is a superuser DSN for any existing database (usually `postgres`).
    """
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    db_dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=dbname)
    with psycopg.connect(db_dsn) as conn:
        conn.execute(SCHEMA)
        for table, data in rows().items():
            with conn.cursor().copy(
                sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(table))
            ) as cp:
                for row in data:
                    cp.write_row(row)
            conn.execute(
                sql.SQL("SELECT setval(pg_get_serial_sequence({}, 'id'), {})").format(
                    sql.Literal(table), sql.Literal(len(data))
                )
            )
        conn.commit()
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")
