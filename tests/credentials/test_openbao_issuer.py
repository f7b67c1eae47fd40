"""OpenBao database secrets engine, for real: issue, log in, cut lease, revoke."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from guard.broker.credentials.fake import FakeIssuer
from guard.broker.credentials.issuer import CredentialsUnavailable
from guard.broker.credentials.openbao import OpenBaoIssuer
from guard.broker.fakes import FakeComponentWarning
from guard.broker.masking.objects import creation_statements, revocation_statements
from guard.broker.policy.compile import load_policy_file
from guard.devstack.backstop import apply_backstop
from guard.devstack.openbao import configure_database_target

pytestmark = pytest.mark.integration
POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"


@pytest.fixture(scope="module")
def issuer(pg_cluster, openbao):
    apply_backstop(pg_cluster.admin_dsn("demo"), load_policy_file(POLICY).targets["demo"])
    configure_database_target(
        openbao.client(),
        connection_name="demo-test",
        role_name="guard-test",
        host=pg_cluster.host,
        port=pg_cluster.port,
        database="demo",
        admin_user=pg_cluster.admin_user,
        admin_password=pg_cluster.admin_password,
        creation_statements=creation_statements(),
        revocation_statements=revocation_statements(),
    )
    return OpenBaoIssuer(openbao.addr, openbao.token)


def login(pg, creds):
    return psycopg.connect(
        host=pg.host,
        port=pg.port,
        dbname="demo",
        user=creds.username,
        password=creds.password,
        connect_timeout=5,
    )


def test_issued_role_reads_masked_and_lease_is_cut(issuer, pg_cluster, openbao):
    creds = issuer.issue("guard-test", 120)
    assert "password" not in repr(creds) and creds.password not in repr(creds)
    lease = openbao.client().sys.read_lease(lease_id=creds.lease_id)
    assert 0 < lease["data"]["ttl"] <= 120  # the role's default is 1h: cut to the session
    with login(pg_cluster, creds) as conn:
        assert conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0] == "***-**-6789"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT ssn FROM public.customers WHERE id = 1")
    issuer.revoke(creds.lease_id)


def test_revoke_terminates_backends_and_drops_role(issuer, pg_cluster):
    creds = issuer.issue("guard-test", 120)
    live = login(pg_cluster, creds)
    assert live.execute("SELECT 1").fetchone()[0] == 1
    issuer.revoke(creds.lease_id)
    with pytest.raises(psycopg.OperationalError):
        live.execute("SELECT 1")  # the backend was terminated, not just the role dropped
    live.close()
    with pytest.raises(psycopg.OperationalError):
        login(pg_cluster, creds)
    with psycopg.connect(pg_cluster.admin_dsn("demo")) as admin:
        assert (
            admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (creds.username,)).fetchone()
            is None
        )


def test_unreachable_openbao_is_a_clear_error_without_the_token():
    token = "s.super-secret-token-value"
    issuer = OpenBaoIssuer("http://127.0.0.1:9", token, timeout=1.0)
    with pytest.raises(CredentialsUnavailable) as info:
        issuer.issue("guard-test", 60)
    assert "unreachable" in info.value.message and "127.0.0.1:9" in info.value.message
    assert token not in str(info.value) + (info.value.hint or "")


def test_unknown_role_is_a_clear_error(issuer):
    with pytest.raises(CredentialsUnavailable, match="no-such-role"):
        issuer.issue("no-such-role", 60)


def test_fake_issuer_warns():
    with pytest.warns(FakeComponentWarning):
        FakeIssuer()
