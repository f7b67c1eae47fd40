"""Signals on the session path, on the real stack: `guard exec` forwards SIGTERM and SIGHUP
to its child and returns the child's status; `guard connect --print-env` lasts until
SIGTERM or SIGINT; either way the session ends and its database role is revoked.

`guard exec` waits for its child without asyncio (issue 13: start-up time), so these pin
the behaviour the event loop's signal handlers used to give.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fix_stack import GUARD, Stack, gateway_connect

pytestmark = pytest.mark.integration

CHILD = """
import pathlib, signal, sys, time
import psycopg
with psycopg.connect() as conn:  # the database role behind the session
    role = conn.execute("SELECT current_user").fetchone()[0]
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append("TERM"))
signal.signal(signal.SIGHUP, lambda *_: got.append("HUP"))
pathlib.Path(sys.argv[1]).write_text(role)
deadline = time.monotonic() + 60
while len(got) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
sys.exit(40 + len(got) if got == ["HUP", "TERM"] else 99)
"""


@pytest.fixture
def alice(dev_stack: Stack) -> Stack:
    result = dev_stack.guard("dev", "login", "alice")
    assert result.returncode == 0, result.stderr
    return dev_stack


def wait_for(path: Path, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 60
    while not path.exists() or not path.read_text():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    return path.read_text()


def role_gone(stack: Stack, role: str) -> bool:
    deadline = time.monotonic() + 10
    while stack.direct("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_exec_forwards_sigterm_and_sighup_and_returns_the_childs_status(alice: Stack, tmp_path):
    ready = tmp_path / "role"
    proc = subprocess.Popen(
        [*GUARD, "exec", "--db", "demo", "--", sys.executable, "-c", CHILD, str(ready)],
        env=alice.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        role = wait_for(ready, proc)
        assert alice.direct("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 42, (out, err)  # the child's own status, both signals seen
    assert "Traceback" not in err
    assert role_gone(alice, role), "the session's role outlived guard exec"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_print_env_lasts_until_a_signal_then_ends_the_session(alice: Stack, sig):
    proc = subprocess.Popen(
        [*GUARD, "connect", "demo", "--print-env"],
        env=alice.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        exports = {}
        while "PGSSLROOTCERT" not in exports:  # the last line (the stack has a CA)
            line = proc.stdout.readline()
            assert line, proc.communicate()
            key, _, value = line.removeprefix("export ").strip().partition("=")
            exports[key] = value
        env = {k: v.strip("'") for k, v in exports.items()}
        # The exported variables are all a client needs (here: psycopg, as in the tests
        # that get a session from the API).
        client_session = {
            "gateway_host": env["PGHOST"],
            "gateway_port": env["PGPORT"],
            "user": env["PGUSER"],
            "password": env["PGPASSWORD"],
            "database": env["PGDATABASE"],
            "gateway_ca": env["PGSSLROOTCERT"],
        }
        assert env["PGSSLMODE"] == "verify-full"
        with gateway_connect(client_session) as conn:
            role = conn.execute("SELECT current_user").fetchone()[0]
        assert proc.poll() is None  # the session lasts while nothing interrupts it
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert role_gone(alice, role)
