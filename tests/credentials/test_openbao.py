"""OpenBao database secrets engine, for real: issue, log in, cut the lease, revoke.

The role's creation/revocation statements are the masking module's, as `guard dev up`
uses them, so the issued role is a member of `guard_session` and sees masked data.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from guard.broker.credentials.fake import FakeComponentWarning, FakeIssuer
from guard.broker.credentials.issuer import CredentialIssuer, CredentialsUnavailable
from guard.broker.credentials.openbao import OpenBaoIssuer
from guard.broker.masking.objects import creation_statements, revocation_statements
from guard.broker.policy.compile import load_policy_file
from guard.devstack.backstop import apply_backstop
from guard.devstack.openbao import configure_database_target

pytestmark = pytest.mark.integration
POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"
ROLE = "guard-test"


def configure(pg_cluster, openbao, **overrides) -> None:
    args = dict(
        connection_name="demo-test",
        role_name=ROLE,
        host=pg_cluster.host,
        port=pg_cluster.port,
        database="demo",
        admin_user=pg_cluster.admin_user,
        admin_password=pg_cluster.admin_password,
        creation_statements=creation_statements(),
        revocation_statements=revocation_statements(),
    )
    configure_database_target(openbao.client(), **{**args, **overrides})


@pytest.fixture(scope="module")
def issuer(pg_cluster, openbao) -> OpenBaoIssuer:
    apply_backstop(pg_cluster.admin_dsn("demo"), load_policy_file(POLICY).targets["demo"])
    configure(pg_cluster, openbao)
    configure(pg_cluster, openbao)  # idempotent: the mount exists, config/role rewritten
    return OpenBaoIssuer(openbao.addr, openbao.token)


def login(pg, creds) -> psycopg.Connection:
    return psycopg.connect(
        host=pg.host,
        port=pg.port,
        dbname="demo",
        user=creds.username,
        password=creds.password,
        connect_timeout=5,
    )


def role_exists(pg, name: str) -> bool:
    with psycopg.connect(pg.admin_dsn("demo")) as admin:
        found = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    return found is not None


def test_issued_role_logs_in_reads_masked_and_lease_is_cut(issuer, pg_cluster, openbao):
    creds = issuer.issue(ROLE, 120)
    assert creds.password not in repr(creds) and "password" not in repr(creds)
    assert creds.expires_at.tzinfo is not None
    lease = openbao.client().sys.read_lease(lease_id=creds.lease_id)  # sys/leases/lookup
    assert 0 < lease["data"]["ttl"] <= 120  # the role's default is 1h: cut to the session
    with login(pg_cluster, creds) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == creds.username
        assert conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0] == "***-**-6789"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT ssn FROM public.customers WHERE id = 1")
    issuer.revoke(creds.lease_id)


def test_short_ttl_is_honoured_exactly(issuer, openbao):
    creds = issuer.issue(ROLE, 30)
    try:
        assert 0 < openbao.client().sys.read_lease(lease_id=creds.lease_id)["data"]["ttl"] <= 30
    finally:
        issuer.revoke(creds.lease_id)


def test_a_session_longer_than_the_roles_default_gets_a_lease_as_long(issuer, pg_cluster, openbao):
    """The role's default_ttl is 1h: a 3h session's lease is renewed to 3h (the role's
    max_ttl is 24h), and the role's VALID UNTIL moves with it; a day and more is cut to
    the role's max_ttl, said by the lease, not an error."""
    creds = issuer.issue(ROLE, 3 * 3600)
    try:
        ttl = openbao.client().sys.read_lease(lease_id=creds.lease_id)["data"]["ttl"]
        assert 3 * 3600 - 60 < ttl <= 3 * 3600
        with psycopg.connect(pg_cluster.admin_dsn("demo")) as admin:
            (valid_until,) = admin.execute(
                "SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (creds.username,)
            ).fetchone()
        assert abs((valid_until - creds.expires_at).total_seconds()) < 60
    finally:
        issuer.revoke(creds.lease_id)
    capped = issuer.issue(ROLE, 48 * 3600)
    try:
        ttl = openbao.client().sys.read_lease(lease_id=capped.lease_id)["data"]["ttl"]
        assert 23 * 3600 < ttl <= 24 * 3600
    finally:
        issuer.revoke(capped.lease_id)


def test_revoke_terminates_backends_and_drops_role(issuer, pg_cluster):
    creds = issuer.issue(ROLE, 120)
    live = login(pg_cluster, creds)
    assert live.execute("SELECT 1").fetchone()[0] == 1
    issuer.revoke(creds.lease_id)
    with pytest.raises(psycopg.OperationalError):
        live.execute("SELECT 1")  # the backend was terminated, not just the role dropped
    live.close()
    with pytest.raises(psycopg.OperationalError):
        login(pg_cluster, creds)
    assert not role_exists(pg_cluster, creds.username)


def test_unreachable_openbao_is_a_clear_error_without_the_token():
    token = "s.super-secret-token-value"
    issuer = OpenBaoIssuer("http://127.0.0.1:9", token, timeout=1.0)
    assert token not in repr(issuer)
    with pytest.raises(CredentialsUnavailable) as info:
        issuer.issue(ROLE, 60)
    err = info.value
    assert "unreachable" in err.message and "127.0.0.1:9" in err.message
    assert "running" in (err.hint or "")
    assert (err.http_status, err.sqlstate) == (503, "08006")
    assert token not in f"{err} {err.message} {err.hint}"
    with pytest.raises(CredentialsUnavailable, match="unreachable"):
        issuer.revoke("database/creds/x/y")


def test_bad_token_says_to_check_the_token(openbao):
    issuer = OpenBaoIssuer(openbao.addr, "not-a-valid-token")
    with pytest.raises(CredentialsUnavailable) as info:
        issuer.issue(ROLE, 60)
    assert "token" in (info.value.hint or "")
    assert "not-a-valid-token" not in f"{info.value.message} {info.value.hint}"


def test_unknown_role_is_a_clear_error(issuer):
    with pytest.raises(CredentialsUnavailable, match="no-such-role"):
        issuer.issue("no-such-role", 60)


def test_dev_server_token_is_private_and_not_logged(openbao):
    assert openbao.token_file.stat().st_mode & 0o777 == 0o600
    assert openbao.token_file.read_text() == openbao.token
    assert openbao.token not in openbao.log_file.read_text()


def test_fake_issuer_warns_and_fits_the_protocol():
    with pytest.warns(FakeComponentWarning, match="unit tests only"):
        fake = FakeIssuer()
    issuer: CredentialIssuer = fake
    creds = issuer.issue("r", 60)
    assert creds.password not in repr(creds)
    issuer.revoke(creds.lease_id)
    assert fake.revoked == [creds.lease_id] and not fake.active
