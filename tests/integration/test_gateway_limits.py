"""What an authenticated client can hold on the gateway (finding 6 of the hardening issue:
a 64 MiB Query started after login and never finished held ~52 MiB with no timeout).

A broker of its own (the dev stack's config, a short message timeout), a real session and
a raw TLS socket that logs in, announces a huge Query, sends a part of it, and stops.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from tests.integration.test_gateway_startup import Wire, _rss_kib
from tests.integration.test_sessions_lifecycle import (  # noqa: F401 - fixture
    start_broker,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_a_message_started_after_login_and_never_finished_is_cut_off(start_broker):  # noqa: F811
    broker = start_broker(gateway={"message_timeout_seconds": 1.0})
    created, _headers = broker.open()
    before = _rss_kib(broker.proc.pid)
    wire = Wire("127.0.0.1", broker.config["gateway"]["port"])
    wire.start_tls(broker.stack.status["gateway_ca"])
    wire.login(created)
    started = time.monotonic()
    wire.send(b"Q" + struct.pack("!i", 64 * 1024 * 1024) + b"SELECT '" + b"x" * (8 << 20))
    fatal = wire.fatal()  # within the message timeout, not when the client gives up
    assert fatal.sqlstate == "08P01" and "incomplete" in fatal.message
    assert time.monotonic() - started < 30
    grown_mib = (_rss_kib(broker.proc.pid) - before) / 1024
    assert grown_mib < 48, f"the broker grew {grown_mib:.0f} MiB"
    wire.sock.close()

    def ended() -> list[str]:
        return [
            r["detail"]
            for r in broker.audit()
            if r.get("kind") == "session" and r.get("event") == "connection_ended"
        ]

    # The end is recorded once the connection is torn down, a moment after the FATAL.
    wait_for("the connection's end in the audit", lambda: any("incomplete" in d for d in ended()))
    assert Path(broker.config["audit"]["path"]).exists()
