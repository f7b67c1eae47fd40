"""Fuzzing the relay: garbage, truncation and reordering never crash it, never forward an
unframed byte, and never let a statement skip the gate."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import FrontendParser
from guard.broker.proxy.commands import SendToServer
from tests.proxy.test_session_playbook import make

STATEMENTS = [
    "SELECT 1",
    "DROP TABLE customers",
    "SELECT ssn FROM customers",
    "SELECT upper(ssn) FROM customers",
    "DELETE FROM products",
    "SELECT * FROM transactions",
    "BEGIN",
    "COMMIT",
    "UPDATE products SET rate = 1 WHERE id = 2",
    "garbage (((",
    "SELECT 1; DROP TABLE products",
    "COPY products TO PROGRAM 'id'",
]

valid_message = st.one_of(
    st.sampled_from(STATEMENTS).map(m.Query),
    st.tuples(st.sampled_from(["", "s1"]), st.sampled_from(STATEMENTS)).map(
        lambda t: m.Parse(t[0], t[1], ())
    ),
    st.just(m.Bind("", "s1", (), (), ())),
    st.just(m.Execute("", 0)),
    st.just(m.Describe(b"S", "s1")),
    st.just(m.Sync()),
    st.just(m.Flush()),
    st.just(m.FunctionCall(764, (), (), 0)),
)
chunk = st.one_of(valid_message.map(encode), st.binary(max_size=40))


def forwarded_messages(cmds) -> list:
    data = b"".join(bytes(c.data) for c in cmds if isinstance(c, SendToServer))
    parser = FrontendParser(expect_startup=False)
    parser.feed(data)
    msgs = list(parser.messages())
    assert parser.buffered == 0, "forwarded bytes that are not a whole message"
    return msgs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunk, max_size=12), st.integers(min_value=1, max_value=64))
def test_garbage_and_reordered_input_never_skips_the_gate(chunks, split):
    proxy, _audit = make()
    stream = b"".join(chunks)
    cmds = []
    for i in range(0, len(stream), split):  # arbitrary TCP segmentation
        cmds += proxy.from_client(stream[i : i + split])
        if proxy.closed:
            break
    for msg in forwarded_messages(cmds):
        text = (
            msg.sql if isinstance(msg, m.Query) else msg.query if isinstance(msg, m.Parse) else None
        )
        if text is None or text.startswith("guard_refused_"):
            continue
        assert proxy.gate.decide(text).allowed, f"forwarded a refused statement: {text!r}"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=32))
def test_garbage_from_server_never_crashes_the_relay(data, split):
    from guard.broker.proxy.commands import CloseConnection, SendToClient

    proxy, _ = make()
    proxy.from_client(encode(m.Query("SELECT 1")))
    for i in range(0, len(data), split):
        cmds = proxy.from_server(data[i : i + split])
        if any(isinstance(c, CloseConnection) for c in cmds):
            # A framing error ends the connection with a FATAL error, nothing half-sent.
            assert isinstance(cmds[-1], CloseConnection)
            assert all(isinstance(c, SendToClient | CloseConnection) for c in cmds)
            break
