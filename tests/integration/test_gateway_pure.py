"""The gateway with every compiled part off (`GUARD_PURE_PYTHON=1`: the references run):
uvloop's TLS transport toward the client, `proxy.tlslayer` toward PostgreSQL, the
pure-Python core, shell and sink. The rest of the suite runs the builds, where TLS records
move in C (`proxy._ctls`); this keeps the path a machine without a compiler takes working
end to end: login, masking, and large traffic both ways."""

from __future__ import annotations

import pytest

from tests.fix_stack import DEMO_POLICY, Stack, gateway_connect, stack_with_policy
from tests.integration.test_gateway import MASKED_SSN

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pure_stack(dev_stack: Stack, tmp_path_factory):
    home = tmp_path_factory.mktemp("guard-home-pure")
    with stack_with_policy(
        dev_stack, home, DEMO_POLICY.read_text(), env={"GUARD_PURE_PYTHON": "1"}
    ) as stack:
        yield stack


def test_the_pure_python_gateway_serves_a_session(pure_stack: Stack):
    body, headers = pure_stack.open_session()
    try:
        with gateway_connect(body) as conn:
            assert conn.execute("SELECT ssn FROM customers WHERE id = %s", (1,)).fetchone() == (
                MASKED_SSN,
            )
            # Megabytes both ways: records split across reads, flow control on both legs.
            (size,) = conn.execute("SELECT length(%s)", ("x" * 3_000_000,)).fetchone()
            assert size == 3_000_000
            rows = conn.execute("SELECT repeat('y', 1000) FROM generate_series(1, 5000)").fetchall()
            assert rows == [("y" * 1000,)] * 5000
    finally:
        pure_stack.end_session(body["session_id"], headers)
