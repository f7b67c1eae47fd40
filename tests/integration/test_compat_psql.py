"""psql 15 through the real gateway (sslmode=verify-full with the dev CA), each
meta-command's output compared with the same script run directly (admin DSN)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import psycopg
import psycopg.sql
import pytest

from tests.fix_stack import Stack, denying_approvals
from tests.integration.test_gateway import session  # noqa: F401 - module-scoped fixture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("psql") is None, reason="psql not on PATH"),
]
MASKED_SSN = "***-**-6789"


@pytest.fixture(scope="module")
def gw_env(dev_stack: Stack, session):  # noqa: F811
    return dev_stack.libpq_env(session)


def psql(env: dict, *args: str, script: str | None = None, dsn: str | None = None, timeout=60):
    cmd = ["psql", "-X", "-q", *([dsn] if dsn else []), *args]
    if script is not None:
        cmd += ["-f", "-"]
    return subprocess.run(
        cmd, input=script, env=env, capture_output=True, text=True, timeout=timeout
    )


def both(dev_stack: Stack, gw_env: dict, *args: str, script: str | None = None):
    gw = psql(gw_env, *args, script=script)
    dr = psql(
        {k: v for k, v in os.environ.items() if not k.startswith("PG")},
        *args,
        script=script,
        dsn=dev_stack.admin_dsn,
    )
    return gw, dr


def test_copy_to_stdout_equals_direct(dev_stack: Stack, gw_env):
    gw, dr = both(
        dev_stack,
        gw_env,
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        r"\copy products to stdout",
        "-c",
        r"\copy (SELECT id, balance FROM accounts ORDER BY id) to stdout with (format csv)",
    )
    assert gw.returncode == 0, gw.stderr
    assert dr.returncode == 0, dr.stderr
    assert gw.stdout == dr.stdout
    assert (
        gw.stdout.count("\n")
        == dev_stack.direct("SELECT count(*) FROM products")[0][0]
        + dev_stack.direct("SELECT count(*) FROM accounts")[0][0]
    )


def test_gexec_and_gset_echo(dev_stack: Stack, gw_env):
    script = "\n".join(
        [
            r"SELECT 'SELECT count(*) FROM products' \gexec",
            r"SELECT format('SELECT max(rate) FROM products WHERE kind = %L', kind)"
            r" FROM products GROUP BY kind ORDER BY kind \gexec",
            r"SELECT count(*) AS n, max(id) AS top FROM accounts \gset",
            r"\echo accounts=:n top=:top",
            r"SELECT ssn AS masked FROM customers WHERE id = 1 \gset",
            r"\echo ssn=:masked",
        ]
    )
    gw = psql(gw_env, "-v", "ON_ERROR_STOP=1", "-A", "-t", script=script)
    assert gw.returncode == 0, gw.stderr
    n, top = dev_stack.direct("SELECT count(*), max(id) FROM accounts")[0]
    per_kind = [
        str(r[0])
        for r in dev_stack.direct("SELECT max(rate) FROM products GROUP BY kind ORDER BY kind")
    ]
    (count,) = dev_stack.direct("SELECT count(*) FROM products")[0]
    assert gw.stdout.splitlines() == [
        str(count),
        *per_kind,
        f"accounts={n} top={top}",
        f"ssn={MASKED_SSN}",
    ]


def test_expanded_output_of_masked_row(dev_stack: Stack, gw_env):
    script = "\\x on\nSELECT id, full_name, ssn, email, phone FROM customers WHERE id = 1;\n"
    gw = psql(gw_env, "-v", "ON_ERROR_STOP=1", script=script)
    assert gw.returncode == 0, gw.stderr
    full_name, email, phone = dev_stack.direct(
        "SELECT full_name, email, phone FROM customers WHERE id = 1"
    )[0]
    fields = {
        k.strip(): v.strip()
        for k, _, v in (line.partition("|") for line in gw.stdout.splitlines() if "|" in line)
    }
    assert fields == {
        "id": "1",
        "full_name": full_name,
        "ssn": MASKED_SSN,
        "email": email[0] + "***@" + email.split("@")[1],
        "phone": phone,
    }
    assert "-[ RECORD 1 ]" in gw.stdout
    assert "123-45-6789" not in gw.stdout


def test_watch_repeats(dev_stack: Stack, gw_env):
    # psql 15's \watch has no iteration count: run it under `timeout` and count outputs.
    env = dict(gw_env)
    cmd = [
        "timeout",
        "-s",
        "INT",
        "3.5",
        "psql",
        "-X",
        "-A",
        "-t",
        "-f",
        "-",
    ]
    out = subprocess.run(
        cmd,
        input="SELECT count(*) FROM products \\watch 1\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    (count,) = dev_stack.direct("SELECT count(*) FROM products")[0]
    values = [line for line in out.stdout.splitlines() if line.strip() == str(count)]
    assert len(values) >= 2, (out.stdout, out.stderr)
    assert "ERROR" not in out.stderr


def test_describe_products_equals_direct(dev_stack: Stack, gw_env):
    gw, dr = both(dev_stack, gw_env, "-v", "ON_ERROR_STOP=1", "-c", r"\d products")
    assert gw.returncode == 0, gw.stderr
    assert gw.stdout == dr.stdout
    assert 'Table "public.products"' in gw.stdout
    gw, dr = both(dev_stack, gw_env, "-v", "ON_ERROR_STOP=1", "-c", r"\dt")
    assert gw.returncode == 0, gw.stderr
    assert "products" in gw.stdout


def test_multi_statement_with_refusal(dev_stack: Stack, gw_env):
    (before,) = dev_stack.direct("SELECT count(*) FROM products")[0]
    # One -c string = one simple Query message: refused as a whole, nothing runs.
    whole = psql(
        gw_env,
        "-v",
        "VERBOSITY=verbose",
        "-A",
        "-t",
        "-c",
        "SELECT count(*) FROM products; DROP TABLE products; SELECT 2",
    )
    assert whole.returncode != 0
    assert "42501" in whole.stderr and "deny-ddl" in whole.stderr
    assert whole.stdout.strip() == ""
    # Separate -c options: psql carries on after the refused one (no ON_ERROR_STOP).
    sep = psql(
        gw_env,
        "-A",
        "-t",
        "-c",
        "SELECT count(*) FROM products",
        "-c",
        "DROP TABLE products",
        "-c",
        "SELECT ssn FROM customers WHERE id = 1",
    )
    assert "deny-ddl" in sep.stderr
    assert sep.stdout.splitlines() == [str(before), MASKED_SSN]
    assert dev_stack.direct("SELECT count(*) FROM products")[0][0] == before
    # With ON_ERROR_STOP psql stops at the refusal and exits 3, as against PostgreSQL.
    with denying_approvals(dev_stack):  # held for approval, then denied
        stop = psql(
            gw_env,
            "-v",
            "ON_ERROR_STOP=1",
            "-A",
            "-t",
            script="SELECT 1;\nSELECT * FROM transactions LIMIT 1;\nSELECT 2;\n",
        )
    assert stop.returncode == 3
    assert "approval" in stop.stderr
    assert stop.stdout.splitlines() == ["1"]


def _running(stack: Stack, query: str) -> bool:
    return bool(
        stack.direct(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query = "
            + psycopg.sql.quote(query),
        )
    )


def interrupt_once_running(proc: subprocess.Popen, stack: Stack, query: str) -> None:
    """SIGINT `proc` (psql, or what runs it) once `query` runs upstream: it must end with
    57014 within 10 s, exit 1 as psql does, and leave nothing running."""
    try:
        start = time.monotonic()
        while not _running(stack, query):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - start < 20, "the query never started upstream"
            time.sleep(0.1)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "57014" in err and "canceling statement due to user request" in err, (out, err)
    assert proc.returncode == 1, (proc.returncode, out, err)  # psql's exit status
    assert elapsed < 10
    assert not _running(stack, query)


def test_ctrl_c_cancels_the_running_query(dev_stack: Stack, gw_env):
    # psql's SIGINT handler sends a CancelRequest (libpq PQcancel, on a new plain
    # connection) with the gateway-issued key; the gateway must route it upstream.
    query = "SELECT pg_sleep(30)"
    proc = subprocess.Popen(
        ["psql", "-X", "-v", "VERBOSITY=verbose", "-c", query],
        env=gw_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    interrupt_once_running(proc, dev_stack, query)
    # The same libpq setup connects and runs statements again afterwards.
    again = psql(gw_env, "-A", "-t", "-c", "SELECT 41 + 1")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "42"


def test_lo_import_fast_path_is_refused_and_named_in_the_audit(dev_stack: Stack, gw_env, tmp_path):
    # psql's \lo_import reads the file client-side and writes it with libpq's fast-path
    # FunctionCalls (lo_creat/lo_open/lowrite): large objects sit outside every table and
    # its masks, so the security contract refuses them whatever the policy.
    source = tmp_path / "payload.txt"
    source.write_text("123-45-6789\n")
    (before,) = dev_stack.direct("SELECT count(*) FROM pg_largeobject_metadata")[0]
    out = psql(gw_env, "-v", "VERBOSITY=verbose", "-c", f"\\lo_import {source}")
    assert out.returncode != 0
    assert "42501" in out.stderr and "fast-path" in out.stderr
    assert dev_stack.direct("SELECT count(*) FROM pg_largeobject_metadata")[0][0] == before
    refused = [
        r
        for r in dev_stack.audit_records()
        if r.get("protocol") == "fast-path" and r.get("rule") == "guardrail:fast-path"
    ]
    assert refused and refused[-1]["statement"].startswith("<fast-path function call oid=")
    # The OIDs guard names are the catalog's own (pinned built-ins).
    from guard.broker.sql.analyze import FAST_PATH_FUNCTIONS

    catalog = dict(
        dev_stack.direct(
            "SELECT oid::int, 'pg_catalog.' || proname FROM pg_proc WHERE oid = ANY(%s)",
            (list(FAST_PATH_FUNCTIONS),),
        )
    )
    assert catalog == FAST_PATH_FUNCTIONS
    named = {r["statement"].split()[-1].rstrip(">") for r in refused}
    assert named <= set(FAST_PATH_FUNCTIONS.values())
