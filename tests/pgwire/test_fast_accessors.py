"""The relay's fast accessors agree with the full decoders on every input: the same value
for a well-formed message, a protocol error for exactly the malformed ones."""

from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from guard.broker.pgwire.errors import ProtocolError
from guard.broker.pgwire.parser import (
    BackendParser,
    FrontendParser,
    cstring_body,
    decode_backend,
    decode_frontend,
    describe_target,
    execute_portal,
    parse_statement,
)

# Bodies built from the bytes that matter (NUL, kind letters, UTF-8 lead bytes) so that
# both well-formed and subtly malformed messages come up often.
BODIES = st.lists(
    st.sampled_from([b"\x00", b"S", b"P", b"a", b"\xc3\xa9", b"\xff", b"\x00\x00\x00\x05"]),
    max_size=8,
).map(b"".join)


def _frame(tag: bytes, body: bytes, *, backend: bool = False):
    parser = BackendParser() if backend else FrontendParser(expect_startup=False)
    parser.feed(tag + struct.pack("!i", len(body) + 4) + body)
    return parser.next_frame()


def _agree(fast, slow) -> None:
    try:
        expected = slow()
    except ProtocolError:
        expected = ProtocolError
    try:
        got = fast()
    except ProtocolError:
        got = ProtocolError
    assert got == expected


@given(BODIES)
def test_execute_portal(body):
    frame = _frame(b"E", body)
    _agree(lambda: execute_portal(frame.raw), lambda: decode_frontend(frame).portal)


@given(BODIES, st.sampled_from([b"D", b"C"]))
def test_describe_and_close_target(body, tag):
    frame = _frame(tag, body)
    what = "Describe" if tag == b"D" else "Close"
    _agree(
        lambda: describe_target(frame.raw, what),
        lambda: (lambda msg: (msg.kind, msg.name))(decode_frontend(frame)),
    )


@given(BODIES)
def test_query_text(body):
    frame = _frame(b"Q", body)
    _agree(lambda: cstring_body(frame.raw, "Query"), lambda: decode_frontend(frame).sql)


@given(BODIES)
def test_command_complete_tag(body):
    frame = _frame(b"C", body, backend=True)
    _agree(lambda: cstring_body(frame.raw, "CommandComplete"), lambda: decode_backend(frame).tag)


@given(BODIES)
@example(b"s\x00select $1\x00\x00\x01\x00\x00\x00\x17")  # one parameter type, well-formed
@example(b"s\x00select $1\x00\x00\x01\x00\x00\x00\x17\x00")  # one byte too many
@example(b"\x00\x00\x00\x00")  # unnamed, empty text, no types
def test_parse_name_and_text(body):
    frame = _frame(b"P", body)
    _agree(
        lambda: parse_statement(frame.raw),
        lambda: (lambda msg: (msg.name, msg.query))(decode_frontend(frame)),
    )
