"""Fuzzing the relay: garbage, truncation and reordering never crash it, never forward an
unframed byte, and never let a statement skip the gate.

Every example checks the same invariants, whether or not the connection ended:

* the bytes sent to the server, joined, are whole framed frontend messages, and those sent
  to the client whole framed backend messages (no partial or unframed byte either way);
* every Query/Parse reaching the server is a text the gate decided and allowed, or the
  gateway's own poison; no FunctionCall reaches the server;
* every Execute reaching the server runs a portal bound (in the forwarded stream) from a
  statement whose forwarded Parse the gate allowed;
* after the relay closes the connection it forwards nothing more;
* each example finishes within a time bound.
"""

from __future__ import annotations

import re
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import BackendParser, FrontendParser
from guard.broker.proxy.commands import CloseConnection, SendToClient, SendToServer
from tests.playbook import CUSTOMERS_OID, DOB_ATTNUM, SSN_ATTNUM, make

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
    "COPY products FROM STDIN",
    "SELECT ssn, dob FROM customers",
    "guard_refused_00000000",  # looks like the gateway's poison, but comes from the client
]
NAMES = ["", "s1", "s2"]
PORTALS = ["", "p1", "p2"]
POISON = re.compile(rb"guard_refused_[0-9a-f]{8}")
EXAMPLE_BOUND_S = 2.0

valid_message = st.one_of(
    st.sampled_from(STATEMENTS).map(m.Query),
    st.builds(m.Parse, st.sampled_from(NAMES), st.sampled_from(STATEMENTS), st.just(())),
    st.builds(
        m.Bind,
        st.sampled_from(PORTALS),
        st.sampled_from(NAMES),
        st.just(()),
        st.just(()),
        st.sampled_from([(), (0,), (1,), (0, 1)]),
    ),
    st.builds(m.Execute, st.sampled_from(PORTALS), st.sampled_from([0, 1])),
    st.builds(m.Describe, st.just(b"S"), st.sampled_from(NAMES)),
    st.builds(m.Describe, st.just(b"P"), st.sampled_from(PORTALS)),
    st.builds(m.Close, st.just(b"S"), st.sampled_from(NAMES)),
    st.builds(m.Close, st.just(b"P"), st.sampled_from(PORTALS)),
    st.just(m.Sync()),
    st.just(m.Flush()),
    st.builds(m.CopyData, st.binary(max_size=16)),
    st.just(m.CopyDone()),
    st.builds(m.CopyFail, st.sampled_from(["", "client gave up"])),
    st.builds(
        m.FunctionCall,
        st.sampled_from([764, 952, 1]),
        st.just((0,)),
        st.just((b"x",)),
        st.sampled_from([0, 1]),
    ),
    st.just(m.Terminate()),
)
# A coherent extended-protocol batch, so that Executes of bound portals are common.
batch = st.tuples(
    st.sampled_from(NAMES),
    st.sampled_from(STATEMENTS),
    st.sampled_from(PORTALS),
    st.booleans(),
).map(
    lambda t: b"".join(
        encode(x)
        for x in (
            m.Parse(t[0], t[1], ()),
            m.Bind(t[2], t[0], (), (), (1,) if t[3] else ()),
            m.Describe(b"P", t[2]),
            m.Execute(t[2], 0),
            m.Sync(),
        )
    )
)
chunk = st.one_of(valid_message.map(encode), batch, st.binary(max_size=40))

_field = st.builds(
    m.FieldDescription,
    st.sampled_from(["ssn", "dob", "x"]),
    st.sampled_from([0, CUSTOMERS_OID]),
    st.sampled_from([0, SSN_ATTNUM, DOB_ATTNUM]),
    st.sampled_from([23, 25, 1082]),
    st.just(-1),
    st.just(-1),
    st.sampled_from([0, 1]),
)
backend_message = st.one_of(
    st.sampled_from(
        [
            m.ParseComplete(),
            m.BindComplete(),
            m.CloseComplete(),
            m.NoData(),
            m.EmptyQueryResponse(),
            m.PortalSuspended(),
            m.CopyDone(),
            m.CommandComplete("SELECT 1"),
            m.CommandComplete("UPDATE 2"),
            m.CommandComplete("COPY"),
            m.ReadyForQuery(b"I"),
            m.ReadyForQuery(b"T"),
            m.ReadyForQuery(b"E"),
            m.ParameterDescription((23,)),
            m.ParameterStatus("client_encoding", "UTF8"),
            m.ParameterStatus("client_encoding", "LATIN1"),
            m.ParameterStatus("client_encoding", "SJIS"),
            m.ParameterStatus("session_authorization", "guard_s1_role"),
            m.NotificationResponse(42, "chan", "payload"),
            m.FunctionCallResponse(b"1"),
            m.CopyInResponse(0, (0,)),
            m.CopyOutResponse(0, (0,)),
            m.CopyBothResponse(0, ()),
            m.ErrorResponse.build("42601", "syntax error"),
            m.ErrorResponse.build("57P01", "terminating", severity="FATAL"),
            m.NoticeResponse.build("01000", "notice"),
        ]
    ),
    st.builds(m.RowDescription, st.lists(_field, max_size=3).map(tuple)),
    st.builds(
        m.DataRow,
        st.lists(st.one_of(st.none(), st.binary(max_size=12)), max_size=3).map(tuple),
    ),
    st.builds(m.CopyData, st.binary(max_size=16)),
)
# A whole result of protected columns (exercises masking): description, rows, completion.
result = st.tuples(
    st.lists(_field, min_size=1, max_size=3),
    st.lists(st.lists(st.one_of(st.none(), st.binary(max_size=12)), max_size=3), max_size=3),
).map(
    lambda t: b"".join(
        encode(x)
        for x in (
            m.RowDescription(tuple(t[0])),
            *(m.DataRow(tuple(row)) for row in t[1]),
            m.CommandComplete(f"SELECT {len(t[1])}"),
            m.ReadyForQuery(b"I"),
        )
    )
)
server_chunk = st.one_of(backend_message.map(encode), result, st.binary(max_size=40))


def frames(data: bytes, parser) -> list:
    """The frames of `data`; fails unless it is nothing but whole framed messages."""
    parser.feed(data)
    out = list(parser.frames())  # raises on an unframed byte (bad type or length)
    assert parser.buffered == 0, "sent bytes that are not a whole message"
    return out


class SpyGate:
    """The real gate, remembering every text it decided, as the bytes the client sent (in
    the connection's encoding at that moment), and whether it allowed it."""

    def __init__(self, proxy) -> None:
        self._gate = proxy.gate
        self._proxy = proxy
        self.decided: dict[bytes, bool] = {}

    def decide(self, sql: str):
        decision = self._gate.decide(sql)
        allowed = decision.refusal is None
        key = sql.encode(self._proxy.codec)
        # The same bytes decided both ways would leave the forwarding check ambiguous.
        assert self.decided.setdefault(key, allowed) == allowed
        return decision

    def __getattr__(self, name: str):
        return getattr(self._gate, name)


def spied():
    proxy, audit = make()
    proxy.gate = SpyGate(proxy)
    return proxy, audit


def check_invariants(proxy, cmds: list) -> None:
    closes = [i for i, c in enumerate(cmds) if isinstance(c, CloseConnection)]
    if closes:
        assert closes == [len(cmds) - 1], "commands after CloseConnection"
    to_client = b"".join(bytes(c.data) for c in cmds if isinstance(c, SendToClient))
    frames(to_client, BackendParser())
    to_server = b"".join(bytes(c.data) for c in cmds if isinstance(c, SendToServer))
    decided: dict[bytes, bool] = proxy.gate.decided
    # Names as sent (bytes): statement → whether its forwarded Parse was allowed; portal →
    # whether the statement it was bound from was.
    statements: dict[bytes, bool] = {}
    portals: dict[bytes, bool] = {}
    for frame in frames(to_server, FrontendParser(expect_startup=False)):
        tag, body = chr(frame.tag), bytes(frame.body)
        assert tag != "F", "a fast-path FunctionCall reached the server"
        if tag in "QP":
            name, text = (b"", body.split(b"\0")[0]) if tag == "Q" else body.split(b"\0")[:2]
            if text in decided:
                assert decided[text], f"forwarded a refused statement: {text!r}"
                ok = True
            else:
                assert POISON.fullmatch(text), f"forwarded an undecided statement: {text!r}"
                ok = False
            if tag == "P":
                statements[name] = ok
        elif tag == "B":
            portal, statement = body.split(b"\0")[:2]
            portals[portal] = statements.get(statement, False)
        elif tag == "C":
            (statements if body[:1] == b"S" else portals).pop(body[1:-1], None)
        elif tag == "E":
            portal = body[:-5]  # name, NUL, Int32 row limit
            assert portals.get(portal), (
                f"executed portal {portal!r} not bound from an allowed Parse"
            )


def run(proxy, steps, split: int) -> list:
    """Feed (side, bytes) steps in `split`-byte segments until the relay closes."""
    cmds: list = []
    for side, data in steps:
        feed = proxy.from_client if side == "c" else proxy.from_server
        for i in range(0, len(data), split):  # arbitrary TCP segmentation
            cmds += feed(data[i : i + split])
            if proxy.closed:
                # Closed: whatever else arrives, from either side, goes nowhere.
                assert proxy.from_client(encode(m.Query("SELECT 1"))) == []
                assert proxy.from_server(encode(m.ReadyForQuery(b"I"))) == []
                return cmds
    return cmds


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunk, max_size=12), st.integers(min_value=1, max_value=64))
def test_garbage_and_reordered_input_never_skips_the_gate(chunks, split):
    start = time.monotonic()
    proxy, _audit = spied()
    cmds = run(proxy, [("c", b"".join(chunks))], split)
    check_invariants(proxy, cmds)
    assert time.monotonic() - start < EXAMPLE_BOUND_S


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(chunk.map(lambda c: ("c", c)), server_chunk.map(lambda c: ("s", c)))),
    st.integers(min_value=1, max_value=32),
)
def test_interleaved_client_and_server_traffic_keeps_every_invariant(steps, split):
    start = time.monotonic()
    proxy, _audit = spied()
    cmds = run(proxy, steps, split)
    check_invariants(proxy, cmds)
    assert time.monotonic() - start < EXAMPLE_BOUND_S


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=32))
def test_garbage_from_server_never_crashes_the_relay(data, split):
    start = time.monotonic()
    proxy, _ = spied()
    steps = [("c", encode(m.Query("SELECT 1"))), ("s", data)]
    cmds = run(proxy, steps, split)
    check_invariants(proxy, cmds)
    if proxy.closed:
        # A framing error ends the connection with a FATAL error, nothing half-sent.
        assert isinstance(cmds[-1], CloseConnection)
        assert not any(isinstance(c, SendToServer) for c in cmds[1:])
    assert time.monotonic() - start < EXAMPLE_BOUND_S
