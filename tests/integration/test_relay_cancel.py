"""Ctrl-C through `guard connect`: psql → loopback relay → TLS → gateway → PostgreSQL.

psql's SIGINT handler sends a CancelRequest on a new connection to the loopback relay,
which must carry it to the gateway (over verified TLS) so the running query is cancelled.
"""

from __future__ import annotations

import signal
import subprocess
import time

import psycopg
import pytest

from tests.fix_stack import GUARD, Stack

pytestmark = pytest.mark.integration

QUERY = "SELECT pg_sleep(30)"


def _running(stack: Stack) -> bool:
    return bool(
        stack.direct(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query = "
            + psycopg.sql.quote(QUERY)
        )
    )


def test_sigint_cancels_the_running_query_through_the_relay(dev_stack: Stack):
    login = dev_stack.guard("dev", "login", "alice")
    assert login.returncode == 0, login.stderr
    # stdin is not a terminal, so guard forwards the SIGINT it gets to psql, as a
    # terminal's Ctrl-C would deliver it to psql directly.
    proc = subprocess.Popen(
        [*GUARD, "connect", "demo", "--", "-X", "-v", "VERBOSITY=verbose", "-c", QUERY],
        env=dev_stack.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        start = time.monotonic()
        while not _running(dev_stack):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - start < 20, "pg_sleep never started upstream"
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
    assert not _running(dev_stack)
