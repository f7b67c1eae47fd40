"""The whole compiled stack against the whole reference, through a connection.

`test_core_twins` runs the compiled core and the reference core on the same scanners, and
tests/pgwire compares each compiled scanner with its reference on its own. This runs what
production runs (`_cconnection` on `_cframe` and `_cshape`) against the reference core on
the pure scanners (`speedups` swapped for `pgwire.parser`, `pgwire.encoder` and
`sql.shape`, what GUARD_PURE_PYTHON=1 selects), on server answers with bulk DataRow runs
of masked, masking-view and plain columns among ErrorResponse, NoticeResponse,
ParameterStatus (client_encoding changes included) and NotificationResponse, malformed
rows and garbage, every read cut at arbitrary offsets (inside headers too), with approval
holds, audit failures and both ways of recording. Commands, states and audit records
must be the same. (Found nothing in 16,000 examples over two seeds when written.)
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.broker.masking.strategies import get_strategy
from guard.broker.pgwire import encoder as encoder_module
from guard.broker.pgwire import messages as m
from guard.broker.pgwire import parser as parser_module
from guard.broker.pgwire.encoder import encode
from guard.broker.proxy import connection as reference
from guard.broker.proxy import gate as gate_module
from guard.broker.proxy.protected import ProtectedColumnMap
from guard.broker.sql import shape as shape_module
from tests import playbook
from tests.proxy.test_core_twins import _drive
from tests.proxy.test_session_fuzz import chunk

_cconnection = pytest.importorskip("guard.broker.proxy._cconnection")

VIEW_OID = 16500
C = playbook.CUSTOMERS_OID
SSN, DOB = playbook.SSN_ATTNUM, playbook.DOB_ATTNUM

FIELDS = st.sampled_from(
    [
        playbook.field("ssn", C, SSN),
        playbook.field("ssn", C, SSN, fmt=1),
        playbook.field("ssn", C, SSN, type_oid=20, fmt=1),
        playbook.field("dob", C, DOB, type_oid=1082),
        playbook.field("dob", C, DOB, type_oid=1082, fmt=1),
        playbook.field("v", VIEW_OID, 2),
        playbook.field("v1", VIEW_OID, 1),
        playbook.field("id", 0, 0, type_oid=23),
        playbook.field("n", 16600, 1),
    ]
)
VALUE = st.one_of(
    st.none(),
    st.sampled_from(
        [
            b"123-45-6789",
            b"1990-01-02",
            b"",
            b"\xff\xfe",
            (123456789).to_bytes(8, "big"),
            b"\x00\x00\x1f\x40",
            b"x" * 70,
            "é".encode(),
            b"\x00",
        ]
    ),
    st.binary(max_size=12),
)


def _msg(tag: bytes, body: bytes, length: int | None = None) -> bytes:
    return tag + struct.pack("!i", len(body) + 4 if length is None else length) + body


ROW = st.lists(VALUE, max_size=4).map(lambda vs: encode(m.DataRow(tuple(vs))))
BAD_ROW = st.one_of(
    st.binary(max_size=10).map(lambda b: _msg(b"D", b)),
    st.tuples(ROW, st.integers(0, 12), st.binary(min_size=1, max_size=3)).map(
        lambda t: t[0][: 5 + t[1]] + t[2] + t[0][5 + t[1] + len(t[2]) :]
    ),
)
INTERJECTION = st.sampled_from(
    [
        encode(m.NoticeResponse.build("01000", "notice")),
        encode(m.ErrorResponse.build("22012", "division by zero")),
        encode(m.ErrorResponse.build("57P01", "terminating", severity="FATAL")),
        encode(m.ParameterStatus("client_encoding", "UTF8")),
        encode(m.ParameterStatus("client_encoding", "LATIN1")),
        encode(m.ParameterStatus("client_encoding", "SJIS")),
        encode(m.ParameterStatus("application_name", "x")),
        encode(m.NotificationResponse(42, "chan", "payload")),
        encode(m.ReadyForQuery(b"I")),
        encode(m.ReadyForQuery(b"E")),
        encode(m.CommandComplete("SELECT 3")),
        encode(m.PortalSuspended()),
        encode(m.EmptyQueryResponse()),
    ]
)


# What comes between an answer's head and its end: mostly runs of rows (the same row
# repeated, as a bulk result, or distinct ones), some interjections, a little damage.
ROWS = st.one_of(
    st.tuples(ROW, st.integers(1, 120)).map(lambda t: t[0] * t[1]),
    st.lists(ROW, max_size=20).map(b"".join),
)
PART = st.one_of(
    ROWS,
    ROWS,
    ROWS,
    INTERJECTION,
    BAD_ROW,
    st.binary(max_size=8),
)


@st.composite
def answer(draw: st.DrawFn) -> bytes:
    fields = tuple(draw(st.lists(FIELDS, min_size=0, max_size=4)))
    out = [] if draw(st.integers(0, 9)) == 0 else [encode(m.RowDescription(fields))]
    if draw(st.booleans()):
        out.insert(0, encode(m.BindComplete()))
        if draw(st.booleans()):
            out.insert(0, encode(m.ParseComplete()))
    out += draw(st.lists(PART, max_size=4))
    if draw(st.integers(0, 4)):
        out.append(encode(m.CommandComplete("SELECT 1")))
    if draw(st.integers(0, 4)):
        out.append(encode(m.ReadyForQuery(draw(st.sampled_from([b"I", b"T", b"E"])))))
    return b"".join(out)


QUERIES = st.sampled_from(
    [
        "SELECT ssn FROM customers",
        "SELECT ssn, dob FROM customers",
        "SELECT id, ssn FROM customers",
        "SELECT 1",
        "SELECT * FROM transactions",
        "SELECT name FROM products WHERE id = 42",
        "SELECT name FROM products WHERE id = 43",
    ]
)
REQUEST = st.one_of(
    QUERIES.map(lambda q: encode(m.Query(q))),
    st.tuples(QUERIES, st.sampled_from(["", "s1"]), st.booleans(), st.booleans()).map(
        lambda t: playbook.wire(
            m.Parse(t[1], t[0], ()),
            m.Bind("", t[1], (), (), (1,) if t[2] else ()),
            *((m.Describe(b"P", ""),) if t[3] else ()),
            m.Execute("", 0),
            m.Sync(),
        )
    ),
    st.sampled_from(["", "s1"]).map(
        lambda n: playbook.wire(m.Bind("", n, (), (), ()), m.Execute("", 0), m.Sync())
    ),
    st.integers(0, 9).flatmap(
        lambda k: chunk if k == 0 else QUERIES.map(lambda q: encode(m.Query(q)))
    ),
)


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    if not data:
        return [data]
    mode = draw(st.integers(0, 3))
    if mode == 0:
        return [data]
    if mode == 1:
        size = draw(st.integers(1, 9))
        return [data[i : i + size] for i in range(0, len(data), size)]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12))))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


EVENTS = st.sampled_from(
    [
        ("audit", b"fail"),
        ("audit", b"ok"),
        ("approve", b"1"),
        ("deny", b"1"),
        ("idle", b"3600"),
        ("incomplete", b"120"),
        ("server eof", b""),
    ]
)


@st.composite
def session(draw: st.DrawFn) -> list[tuple[str, list[bytes]]]:
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        k = draw(st.integers(0, 12))
        if k == 0:
            side, data = draw(EVENTS)
            steps.append((side, [data]))
            continue
        req = draw(REQUEST)
        steps.append(("c", draw(cut(req))))
        if k > 1:
            ans = draw(answer())
            steps.append(("s", draw(cut(ans))))
    return steps


def _connection(build: type, limit: int | None, holds: bool, eager: bool):
    protected = ProtectedColumnMap(
        {(C, SSN): get_strategy("ssn_last4"), (C, DOB): get_strategy("year_only")}
    )
    protected.view_columns = frozenset({(VIEW_OID, 2)})
    gate = playbook.alice_gate()
    return build(
        gate,
        protected=protected,
        client_user="guard_s1",
        max_message_size=limit,
        holds=holds,
        audit_answers_later=eager,
    )


def _run(build, steps, limit, holds, eager, inline) -> tuple:
    return _drive(_connection(build, limit, holds, eager), steps, inline)


def _pure_run(*args) -> tuple:
    with pytest.MonkeyPatch.context() as patch:
        for name in (
            "cstring_body",
            "execute_portal",
            "parse_statement",
            "bind_names",
            "describe_target",
            "extended_request",
            "data_rows",
        ):
            patch.setattr(reference, name, getattr(parser_module, name))
        patch.setattr(reference, "scan", None)
        patch.setattr(reference, "data_row", encoder_module.data_row)
        patch.setattr(reference, "join_small", encoder_module.join_small)
        patch.setattr(reference, "literal_shape", shape_module.literal_shape)
        patch.setattr(gate_module, "literal_shape", shape_module.literal_shape)
        return _run(reference.GatewayConnection, *args)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    session(),
    st.sampled_from([None, None, 64, 300]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_compiled_stack_equals_pure_stack_on_cut_bulk_answers(steps, limit, holds, eager, inline):
    compiled = _run(_cconnection.GatewayConnection, steps, limit, holds, eager, inline)
    assert compiled == _pure_run(steps, limit, holds, eager, inline)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(session(), st.sampled_from([None, 64]), st.booleans(), st.booleans(), st.booleans())
def test_reference_core_on_compiled_scan_equals_pure_stack(steps, limit, holds, eager, inline):
    # Localizes a failure of the one above: the scanners alone, same core.
    a = _run(reference.GatewayConnection, steps, limit, holds, eager, inline)
    assert a == _pure_run(steps, limit, holds, eager, inline)
