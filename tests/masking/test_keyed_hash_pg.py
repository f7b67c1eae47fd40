"""keyed_hash on a real cluster: deterministic and joinable digests that a session cannot
reproduce (issue 16). The key is readable by the masking views' owner only; there is no
function a session could call to hash a candidate value (PostgreSQL checks EXECUTE against
the caller even inside a view, so a hashing function would be an oracle)."""

from __future__ import annotations

import secrets

import psycopg
import pytest
from psycopg import sql

from guard.broker.backstop import apply, check
from guard.broker.policy.compile import load_policy

pytestmark = pytest.mark.integration

POLICY = """
version: 1
targets:
  kh:
    connect_groups: [g]
    session_ttl: {default: 1h, max: 1h}
    protected_columns: {public.people.ssn: keyed_hash, public.cards.holder_ssn: keyed_hash}
"""


@pytest.fixture(scope="module")
def database(pg_cluster):
    name = f"kh_{secrets.token_hex(4)}"
    with psycopg.connect(pg_cluster.admin_dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = pg_cluster.admin_dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE people (id int PRIMARY KEY, ssn text)")
        conn.execute("CREATE TABLE cards (id int PRIMARY KEY, holder_ssn text)")
        conn.execute("INSERT INTO people VALUES (1, '123-45-6789'), (2, '987-65-4321'), (3, NULL)")
        conn.execute("INSERT INTO cards VALUES (10, '123-45-6789')")
    target = load_policy(POLICY).targets["kh"]
    with psycopg.connect(dsn) as conn:
        apply(conn, target)
        apply(conn, target)  # idempotent: the key stays
        assert check(conn, target) == []
    probe = f"kh_probe_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} IN ROLE guard_session").format(sql.Identifier(probe)))
    yield dsn, probe
    with psycopg.connect(pg_cluster.admin_dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(probe)))


def as_session(dsn: str, role: str, query: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        return conn.execute(query).fetchall()


def test_digests_are_deterministic_joinable_and_keep_null(database):
    dsn, role = database
    people = dict(as_session(dsn, role, "SELECT id, ssn FROM guard_masked.people"))
    assert people[3] is None
    assert people[1].startswith("kh:") and len(people[1]) == 27
    assert people[1] != people[2]
    (card,) = as_session(dsn, role, "SELECT holder_ssn FROM guard_masked.cards")
    assert card[0] == people[1]  # the same value hashes alike in every column: joinable
    joined = as_session(
        dsn,
        role,
        "SELECT p.id FROM guard_masked.people p JOIN guard_masked.cards c ON c.holder_ssn = p.ssn",
    )
    assert joined == [(1,)]


def test_a_session_can_neither_read_the_key_nor_reproduce_a_digest(database):
    dsn, role = database
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_session(dsn, role, "SELECT key FROM guard_masked.mask_key")
    (digest,) = as_session(dsn, role, "SELECT ssn FROM guard_masked.people WHERE id = 1")[0]
    # Unkeyed SHA-256 and MD5 of the value, the oracle a session could compute, differ.
    (plain,) = as_session(
        dsn, role, "SELECT 'kh:' || left(encode(sha256('123-45-6789'::bytea), 'hex'), 24)"
    )[0]
    assert plain != digest
    definition = as_session(dsn, role, "SELECT pg_get_viewdef('guard_masked.people')")[0][0]
    with psycopg.connect(dsn) as admin:
        (key,) = admin.execute("SELECT encode(key, 'hex') FROM guard_masked.mask_key").fetchone()
    assert len(key) == 64 and key not in definition  # the key is not in the view's source
    # The keyed form, computed with the key, is what the view shows: no other ingredient.
    with psycopg.connect(dsn) as admin:
        (expected,) = admin.execute(
            "SELECT 'kh:' || left(encode(sha256(decode(%s, 'hex') || "
            "convert_to('123-45-6789', 'UTF8')), 'hex'), 24)",
            (key,),
        ).fetchone()
    assert expected == digest


def test_the_key_survives_a_reapply(database, pg_cluster):
    dsn, role = database
    before = as_session(dsn, role, "SELECT ssn FROM guard_masked.people WHERE id = 1")
    with psycopg.connect(dsn) as conn:
        apply(conn, load_policy(POLICY).targets["kh"])
    assert as_session(dsn, role, "SELECT ssn FROM guard_masked.people WHERE id = 1") == before


def test_check_reports_a_readable_or_missing_key(database):
    dsn, _role = database
    target = load_policy(POLICY).targets["kh"]
    with psycopg.connect(dsn) as conn:
        conn.execute("GRANT SELECT ON guard_masked.mask_key TO guard_session")
        assert [str(d) for d in check(conn, target)] == [
            "guard_masked.mask_key: guard_session may read keyed_hash's key"
        ]
        conn.rollback()
        conn.execute("DROP TABLE guard_masked.mask_key CASCADE")
        assert "guard_masked.mask_key: keyed_hash's key is missing" in [
            str(d) for d in check(conn, target)
        ]
        conn.rollback()
