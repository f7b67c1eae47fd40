"""The newcomer's path on the real stack: dev login → exec → connect → refusal → audit.

Drives the `guard` CLI as a user would (subprocesses), against real PostgreSQL, OpenBao,
the dev OIDC provider and the broker started by `guard dev up`.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from tests.fix_stack import Stack, denying_approvals

pytestmark = pytest.mark.integration

RAW_SSN = "123-45-6789"  # customer 1 of the deterministic demo data
MASKED_SSN = "***-**-6789"

JOB = textwrap.dedent(
    """
    import json, os, sys
    import psycopg
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        ssn = conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0]
        names = [r[0] for r in conn.execute("SELECT full_name FROM customers ORDER BY id LIMIT 3")]
        role = conn.execute("SELECT current_user").fetchone()[0]
        ssl = conn.pgconn.ssl_in_use
    with psycopg.connect() as conn:  # plain libpq PG* variables work too
        count = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
    print(json.dumps({"ssn": ssn, "names": names, "role": role, "count": count, "ssl": ssl,
                      "env": {k: v for k, v in os.environ.items()
                              if k.startswith(("PG", "DATABASE_URL", "GUARD"))}}))
    sys.exit(7)
    """
)


@pytest.fixture(scope="module")
def alice(dev_stack: Stack) -> Stack:
    result = dev_stack.guard("dev", "login", "alice")
    assert result.returncode == 0, result.stderr
    return dev_stack


def test_exec_masks_and_passes_exit_code(alice: Stack, tmp_path):
    import json

    job = tmp_path / "job.py"
    job.write_text(JOB)
    result = alice.guard("exec", "--db", "demo", "--", sys.executable, str(job))
    assert result.returncode == 7, result.stderr
    out = json.loads(result.stdout)
    assert out["ssn"] == MASKED_SSN
    assert out["names"][0] == "Alice Anderson"
    assert out["count"] >= 1000
    env = out["env"]
    # The child reaches the gateway itself, over TLS verified against the dev CA: no
    # loopback relay in between.
    gateway_host, gateway_port = alice.status["gateway"].rsplit(":", 1)
    assert (env["PGHOST"], env["PGPORT"]) == (gateway_host, gateway_port)
    assert env["PGSSLMODE"] == "verify-full" and out["ssl"] is True
    assert "sslmode=verify-full" in env["DATABASE_URL"]
    assert env["PGUSER"].startswith("guard_")
    assert "GUARD_ID_TOKEN" not in env
    # The child holds only the session secret: it is not a database credential. Neither
    # the gateway user nor the secret logs in to PostgreSQL directly.
    upstream = psycopg.conninfo.conninfo_to_dict(alice.admin_dsn)
    for user in (env["PGUSER"], out["role"]):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                host=upstream["host"],
                port=upstream["port"],
                dbname="demo",
                user=user,
                password=env["PGPASSWORD"],
                connect_timeout=5,
            )
    # The session ended with the child: the issued role was revoked (dropped).
    with psycopg.connect(alice.admin_dsn) as admin:
        assert (
            admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (out["role"],)).fetchone()
            is None
        )
    assert RAW_SSN not in result.stdout + result.stderr


def test_connect_psql_masks_and_refuses_ddl(alice: Stack):
    result = alice.guard(
        "connect",
        "demo",
        "--",
        "-X",
        "-A",
        "-t",
        "-c",
        "SELECT full_name, ssn FROM customers ORDER BY id LIMIT 3",
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.strip().splitlines()]
    assert len(rows) == 3
    assert rows[0] == ["Alice Anderson", MASKED_SSN]
    assert all(r[1].startswith("***-**-") for r in rows)

    refused = alice.guard("connect", "demo", "--", "-X", "-c", "DROP TABLE customers")
    assert refused.returncode != 0
    assert "deny-ddl" in refused.stderr
    with psycopg.connect(alice.admin_dsn) as admin:
        assert admin.execute("SELECT to_regclass('public.customers')").fetchone()[0] is not None

    with denying_approvals(alice):  # held for approval, then denied
        gated = alice.guard(
            "connect", "demo", "--", "-X", "-c", "SELECT * FROM transactions LIMIT 1"
        )
    assert gated.returncode != 0
    assert "approval" in gated.stderr


def test_audit_has_one_record_per_statement_before_results(alice: Stack):
    before = len(alice.audit_records())
    sql = "SELECT 1; SELECT count(*) FROM products; DROP TABLE products"
    result = alice.guard("connect", "demo", "--", "-X", "-c", sql)
    assert result.returncode != 0
    records = alice.audit_records()[before:]
    statements = [r for r in records if r["kind"] == "statement"]
    assert len(statements) == 3
    assert {r["principal"] for r in statements} == {statements[0]["principal"]}
    assert statements[0]["principal"]  # the IdP subject of alice
    assert "engineers" in statements[0]["groups"]
    assert [r["verdict"] for r in statements][-1] == "deny"
    assert statements[-1]["rule"] == "deny-ddl"
    # Audit text is normalized: a literal typed by the client is not stored.
    probe = alice.guard(
        "connect",
        "demo",
        "--",
        "-X",
        "-c",
        f"SELECT full_name FROM customers WHERE phone = '{RAW_SSN}'",
    )
    assert probe.returncode == 0, probe.stderr
    # The probe's record is in the file (read after a flush), without the value it used.
    assert any("phone" in r.get("statement", "") for r in alice.audit_records())
    assert RAW_SSN not in alice.audit_path.read_text()


def test_audit_chain_verifies(alice: Stack):
    from guard.broker.audit.chain import verify_lines

    report = verify_lines(alice.audit_path.read_bytes().splitlines())
    assert report.ok, report
    assert report.records > 0


def test_dev_token_for_ci(alice: Stack, tmp_path):
    token = alice.guard("dev", "token", "ci")
    assert token.returncode == 0, token.stderr
    id_token = token.stdout.strip()
    assert id_token.count(".") == 2
    job = tmp_path / "ci.py"
    job.write_text(
        "import psycopg, os\n"
        "print(psycopg.connect(os.environ['DATABASE_URL']).execute("
        "'select count(*) from products').fetchone()[0])\n"
    )
    tokfile = tmp_path / "tok"
    tokfile.write_text(id_token)
    result = alice.guard(
        "exec", "--db", "demo", "--id-token-file", str(tokfile), "--", sys.executable, str(job)
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 0


def test_exec_command_not_found_returns_127(alice: Stack):
    result = alice.guard("exec", "--db", "demo", "--", "/nonexistent/program")
    assert result.returncode == 127


def test_exec_child_killed_by_signal_returns_128_plus_n(alice: Stack):
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    result = alice.guard("exec", "--db", "demo", "--", sys.executable, "-c", code)
    assert result.returncode == 128 + 15


def test_policy_check_reports_yaml_paths(alice: Stack, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntargets: {}\nrules:\n  - id: x\n    effect: maybe\n")
    result = alice.guard("policy", "check", str(bad))
    assert result.returncode == 1
    assert "rules[0].effect" in result.stdout
    repo_policy = Path(__file__).resolve().parents[2] / "policies.yaml"
    ok = alice.guard("policy", "check", str(repo_policy))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_proxy_serves_a_plain_local_port_for_clients_without_tls(alice: Stack):
    import os
    import signal
    import subprocess

    from tests.fix_stack import GUARD

    proxy = subprocess.Popen(
        [*GUARD, "proxy", "demo", "--reason", "GUI tool"],
        env=alice.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        env = {}
        while len(env) < 6:
            line = proxy.stdout.readline()
            assert line, proxy.stderr.read()
            key, _, value = line.removeprefix("export ").strip().partition("=")
            env[key] = value.strip("'")
        assert env["PGHOST"] == "127.0.0.1" and env["PGSSLMODE"] == "disable"
        with psycopg.connect(
            host=env["PGHOST"],
            port=env["PGPORT"],
            user=env["PGUSER"],
            password=env["PGPASSWORD"],
            dbname=env["PGDATABASE"],
            sslmode="disable",
            connect_timeout=10,
        ) as conn:
            ssn = conn.execute("SELECT ssn FROM customers WHERE id = 1").fetchone()[0]
        assert ssn == MASKED_SSN
    finally:
        os.kill(proxy.pid, signal.SIGINT)
        assert proxy.wait(30) == 0
