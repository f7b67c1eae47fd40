"""Ctrl-C through `guard connect`: psql → loopback relay → TLS → gateway → PostgreSQL.

psql's SIGINT handler sends a CancelRequest on a new connection to the loopback relay,
which must carry it to the gateway (over verified TLS) so the running query is cancelled.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.fix_stack import GUARD, Stack
from tests.integration.test_compat_psql import interrupt_once_running

pytestmark = pytest.mark.integration

QUERY = "SELECT pg_sleep(30)"


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
    interrupt_once_running(proc, dev_stack, QUERY)
