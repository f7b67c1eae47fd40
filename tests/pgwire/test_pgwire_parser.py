"""Framing: the startup phase, limits, malformed input, garbage fuzzing, buffering."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode, encode_many
from guard.broker.pgwire.errors import ClientProtocolError, ProtocolError, ServerProtocolError
from guard.broker.pgwire.parser import (
    MAX_MESSAGE_SIZE,
    MAX_STARTUP_PACKET_SIZE,
    NEED_DATA,
    BackendParser,
    Frame,
    FrontendParser,
    decode_backend,
    decode_frontend,
)

STARTUP = m.StartupMessage(m.PROTOCOL_3_0, (("user", "alice"), ("database", "app")))


def _tagged(tag: bytes, body: bytes, length: int | None = None) -> bytes:
    return tag + struct.pack("!i", len(body) + 4 if length is None else length) + body


def _untagged(code: int, rest: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("!ii", 8 + len(rest) if length is None else length, code) + rest


# ---------------------------------------------------------------------- startup phase
def test_ssl_request_then_startup_then_tagged_messages() -> None:
    parser = FrontendParser()
    assert parser.expecting_startup
    parser.feed(encode(m.SSLRequest()))
    assert parser.next_message() == m.SSLRequest()
    assert parser.expecting_startup  # the client now sends TLS or its StartupMessage
    assert parser.next_message() is NEED_DATA
    parser.feed(encode(STARTUP) + encode(m.Query("select 1")))
    frame = parser.next_frame()
    assert isinstance(frame, Frame) and frame.tag == m.TAG_UNTAGGED == 0
    assert bytes(frame.body) == encode(STARTUP)[4:]
    assert decode_frontend(frame) == STARTUP
    assert not parser.expecting_startup
    assert parser.next_message() == m.Query("select 1")


def test_gssenc_then_ssl_are_each_allowed_once() -> None:
    parser = FrontendParser()
    parser.feed(encode(m.GSSENCRequest()) + encode(m.SSLRequest()) + encode(STARTUP))
    assert list(parser.messages()) == [m.GSSENCRequest(), m.SSLRequest(), STARTUP]


@pytest.mark.parametrize("request_", [m.SSLRequest(), m.GSSENCRequest()])
def test_a_repeated_encryption_request_is_refused(request_: m.Message) -> None:
    parser = FrontendParser()
    parser.feed(encode(request_) * 2)
    assert parser.next_message() == request_
    with pytest.raises(ClientProtocolError, match="already negotiated"):
        parser.next_message()


def test_bytes_pipelined_behind_an_ssl_request_are_visible() -> None:
    # CVE-2021-23214: plaintext queued behind SSLRequest must not be read as if it had come
    # through TLS; the caller can see it and refuse.
    parser = FrontendParser()
    parser.feed(encode(m.SSLRequest()) + encode(STARTUP))
    assert parser.next_message() == m.SSLRequest()
    assert parser.buffered == len(encode(STARTUP))
    assert parser.unconsumed() == encode(STARTUP)
    assert parser.buffered == len(encode(STARTUP))  # unconsumed() does not consume


def test_cancel_request_ends_the_conversation() -> None:
    parser = FrontendParser()
    parser.feed(encode(m.CancelRequest(4242, b"\x01\x02\x03\x04")))
    assert parser.next_message() == m.CancelRequest(4242, b"\x01\x02\x03\x04")
    assert parser.next_message() is NEED_DATA
    parser.feed(encode(m.Query("select 1")))
    with pytest.raises(ClientProtocolError, match="after CancelRequest"):
        parser.next_frame()


def test_cancel_request_with_a_protocol_3_2_long_key() -> None:
    key = bytes(range(32))
    parser = FrontendParser()
    parser.feed(encode(m.CancelRequest(7, key)))
    assert parser.next_message() == m.CancelRequest(7, key)


@pytest.mark.parametrize("key_size", [0, 3, 257])
def test_cancel_keys_outside_4_to_256_bytes_are_refused(key_size: int) -> None:
    parser = FrontendParser()
    parser.feed(_untagged(m.CANCEL_REQUEST_CODE, struct.pack("!i", 1) + b"k" * key_size))
    with pytest.raises(ClientProtocolError, match="CancelRequest"):
        parser.next_frame()
    with pytest.raises(ValueError, match="cancel key"):
        encode(m.CancelRequest(1, b"k" * key_size))


def test_protocol_3_2_startup_keeps_its_minor_version() -> None:
    parser = FrontendParser()
    parser.feed(encode(m.StartupMessage(m.PROTOCOL_3_2, (("user", "bob"),))))
    msg = parser.next_message()
    assert isinstance(msg, m.StartupMessage)
    assert (msg.protocol, msg.minor, msg.get("user")) == (196610, 2, "bob")


@pytest.mark.parametrize("version", [(2, 0), (4, 0), (1234, 5690)])
def test_other_protocol_versions_are_refused(version: tuple[int, int]) -> None:
    parser = FrontendParser()
    parser.feed(_untagged((version[0] << 16) | version[1], b"user\x00x\x00\x00"))
    with pytest.raises(ClientProtocolError, match="unsupported frontend protocol"):
        parser.next_frame()


def test_an_oversized_startup_packet_is_refused_from_its_header() -> None:
    parser = FrontendParser()
    parser.feed(struct.pack("!ii", MAX_STARTUP_PACKET_SIZE + 5, m.PROTOCOL_3_0))
    with pytest.raises(ClientProtocolError, match="10004"):
        parser.next_frame()


def test_the_largest_startup_packet_is_accepted() -> None:
    value = "x" * (MAX_STARTUP_PACKET_SIZE - 4 - len("options") - 3)
    data = encode(m.StartupMessage(m.PROTOCOL_3_0, (("options", value),)))
    assert len(data) == MAX_STARTUP_PACKET_SIZE + 4
    parser = FrontendParser()
    parser.feed(data)
    assert isinstance(parser.next_message(), m.StartupMessage)


@pytest.mark.parametrize("length", [-1, 0, 4, 7])
def test_startup_lengths_below_eight_are_refused(length: int) -> None:
    parser = FrontendParser()
    parser.feed(struct.pack("!ii", length, m.PROTOCOL_3_0))
    with pytest.raises(ClientProtocolError, match="startup packet length"):
        parser.next_frame()


def test_a_tagged_message_during_startup_is_refused() -> None:
    parser = FrontendParser()
    parser.feed(encode(m.Query("select 1")))  # 'Q\0\0\0' read as a length: far too large
    with pytest.raises(ClientProtocolError):
        parser.next_frame()


@pytest.mark.parametrize(
    "rest",
    [
        b"user\x00alice\x00",  # no terminator
        b"user\x00alice",  # value without NUL
        b"user\x00alice\x00\x00extra",  # bytes after the terminator
        b"us\xffer\x00alice\x00\x00",  # not UTF-8
        b"",  # nothing at all
    ],
)
def test_malformed_startup_messages(rest: bytes) -> None:
    parser = FrontendParser()
    parser.feed(_untagged(m.PROTOCOL_3_0, rest))
    with pytest.raises(ClientProtocolError, match="malformed startup"):
        parser.next_message()


def test_encryption_requests_have_exactly_eight_bytes() -> None:
    parser = FrontendParser()
    parser.feed(_untagged(m.SSL_REQUEST_CODE, b"\x00\x00\x00\x00"))
    with pytest.raises(ClientProtocolError, match="encryption request"):
        parser.next_frame()


# ---------------------------------------------------------------------- tagged framing
def test_an_oversized_message_is_refused_from_its_header() -> None:
    parser = BackendParser(max_message_size=1024)
    parser.feed(b"D" + struct.pack("!i", 1025))
    with pytest.raises(ServerProtocolError) as info:
        parser.next_frame()
    assert "1025" in info.value.message and "1024" in info.value.message


def test_a_message_at_the_limit_is_accepted() -> None:
    parser = FrontendParser(expect_startup=False, max_message_size=1024)
    data = encode(m.CopyData(b"x" * 1020))
    assert len(data) == 1 + 1024  # the length word counts itself, not the type byte
    parser.feed(data)
    assert parser.next_message() == m.CopyData(b"x" * 1020)


def test_the_default_limit_is_named() -> None:
    assert MAX_MESSAGE_SIZE == 64 * 1024 * 1024
    parser = FrontendParser(expect_startup=False)
    parser.feed(b"d" + struct.pack("!i", MAX_MESSAGE_SIZE + 1))
    with pytest.raises(ClientProtocolError, match="exceeds the limit"):
        parser.next_frame()
    with pytest.raises(ValueError):
        BackendParser(max_message_size=3)


@pytest.mark.parametrize("length", [-(2**31), -1, 0, 3])
def test_lengths_below_four_are_refused(length: int) -> None:
    for parser in (FrontendParser(expect_startup=False), BackendParser()):
        parser.feed(b"d" + struct.pack("!i", length))
        with pytest.raises(ProtocolError, match="invalid message length"):
            parser.next_frame()


def test_unknown_tags_are_refused_per_side() -> None:
    client = FrontendParser(expect_startup=False)
    client.feed(encode(m.ReadyForQuery(b"I")))  # a backend message from a client
    with pytest.raises(ClientProtocolError, match="unknown frontend message type b'Z'"):
        client.next_frame()
    server = BackendParser()
    server.feed(encode(m.Query("x")))  # a frontend message from a server
    with pytest.raises(ServerProtocolError, match="unknown backend message type b'Q'"):
        server.next_frame()
    server = BackendParser()
    server.feed(b"\x00\x00\x00\x00\x04")
    with pytest.raises(ServerProtocolError, match=r"b'\\x00'"):
        server.next_frame()


def test_frame_exposes_tag_raw_and_body() -> None:
    data = encode(m.DataRow((b"1", None)))
    parser = BackendParser()
    parser.feed(data)
    frame = parser.next_frame()
    assert isinstance(frame, Frame)
    assert frame.tag == m.TAG_DATA_ROW
    assert bytes(frame.raw) == data
    assert bytes(frame.body) == data[5:]
    assert isinstance(frame.raw, memoryview) and frame.raw.readonly


def test_large_messages_in_small_chunks_are_not_copied_per_chunk() -> None:
    payload = b"x" * (8 * 1024 * 1024)
    data = encode(m.CopyData(payload)) + encode(m.CopyDone())
    parser = FrontendParser(expect_startup=False)
    started = time.perf_counter()
    frames: list[Frame] = []
    for i in range(0, len(data), 1024):
        parser.feed(data[i : i + 1024])
        frames.extend(parser.frames())
    # A quadratic buffer would copy ~32 GB here; a linear one copies a few MB.
    assert time.perf_counter() - started < 5
    assert [f.tag for f in frames] == [m.TAG_COPY_DATA, m.TAG_COPY_DONE]
    assert decode_frontend(frames[0]) == m.CopyData(payload)


def test_unconsumed_returns_the_tail_for_a_handover() -> None:
    tail = encode(m.Query("select 2"))
    parser = FrontendParser()
    parser.feed(encode(STARTUP) + tail[:3])
    parser.feed(tail[3:])
    assert parser.next_message() == STARTUP
    assert parser.unconsumed() == tail
    session = FrontendParser(expect_startup=False)
    session.feed(parser.unconsumed())
    assert session.next_message() == m.Query("select 2")


def test_feed_accepts_bytearray_and_memoryview_and_ignores_empty_chunks() -> None:
    data = encode_many([m.ParseComplete(), m.BindComplete()])
    parser = BackendParser()
    parser.feed(b"")
    parser.feed(bytearray(data[:3]))
    parser.feed(memoryview(data)[3:])
    assert list(parser.messages()) == [m.ParseComplete(), m.BindComplete()]


# ---------------------------------------------------------------------- malformed bodies
FRONTEND_MALFORMED = [
    _tagged(b"Q", b"select 1"),  # missing NUL
    _tagged(b"Q", b"select\xff\x00"),  # not UTF-8
    _tagged(b"Q", b"a\x00b\x00"),  # trailing bytes
    _tagged(b"P", b"s\x00q\x00\x00\x05\x00\x00\x00\x17"),  # 5 types announced, 1 sent
    _tagged(b"B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # length -2
    _tagged(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09ab\x00\x00"),  # value overruns
    _tagged(b"D", b"X\x00"),  # neither S nor P
    _tagged(b"D", b""),
    _tagged(b"E", b"\x00\x00\x00"),  # truncated Int32
    _tagged(b"S", b"\x00"),  # Sync has no body
    _tagged(b"F", b"\x00\x00"),
    _tagged(b"p", b"pass"),  # PasswordMessage without NUL
    _tagged(b"p", b"pa\x00ss\x00"),  # two strings
]


@pytest.mark.parametrize("data", FRONTEND_MALFORMED, ids=lambda d: repr(d[:12]))
def test_malformed_frontend_bodies_raise_client_protocol_errors(data: bytes) -> None:
    parser = FrontendParser(expect_startup=False)
    parser.feed(data)
    assert isinstance(parser.next_frame(), Frame)  # framing is fine, the body is not
    parser = FrontendParser(expect_startup=False)
    parser.feed(data)
    with pytest.raises(ClientProtocolError, match="malformed"):
        parser.next_message()


BACKEND_MALFORMED = [
    _tagged(b"Z", b"X"),  # transaction status
    _tagged(b"Z", b"II"),
    _tagged(b"D", b"\x7f\xff"),  # 32767 columns announced, none sent
    _tagged(b"D", b"\x00\x01\xff\xff\xff\xf0"),  # length -16
    _tagged(b"T", b"\x00\x01col\x00\x00\x00"),  # field truncated
    _tagged(b"R", b"\x00\x00\x00\x63"),  # unknown authentication code 99
    _tagged(b"R", b"\x00\x00\x00\x05\x01\x02"),  # MD5 salt too short
    _tagged(b"R", b"\x00\x00\x00\x0aSCRAM-SHA-256\x00"),  # SASL list without terminator
    _tagged(b"R", b""),
    _tagged(b"K", b"\x00\x00\x00\x01\x02"),  # cancel key of 1 byte
    _tagged(b"E", b"SERROR\x00"),  # no final terminator
    _tagged(b"E", b"\xc3ERROR\x00\x00"),  # non-ASCII field code
    _tagged(b"v", b"\x00\x00\x00\x00\x7f\xff\xff\xff"),  # huge count
    _tagged(b"G", b""),
    _tagged(b"V", b"\xff\xff\xff\xfe"),
    _tagged(b"A", b"\x00\x00\x00\x01ch\x00"),  # payload missing
    _tagged(b"C", b"SELECT\xff\x00"),
]


@pytest.mark.parametrize("data", BACKEND_MALFORMED, ids=lambda d: repr(d[:12]))
def test_malformed_backend_bodies_raise_server_protocol_errors(data: bytes) -> None:
    parser = BackendParser()
    parser.feed(data)
    frame = parser.next_frame()
    assert isinstance(frame, Frame)
    with pytest.raises(ServerProtocolError, match="malformed"):
        decode_backend(frame)


def test_decode_with_an_unknown_password_kind_is_a_caller_bug() -> None:
    parser = FrontendParser(expect_startup=False)
    parser.feed(encode(m.PasswordMessage(b"x")))
    frame = parser.next_frame()
    assert isinstance(frame, Frame)
    with pytest.raises(ValueError, match="password message kind"):
        decode_frontend(frame, password_kind="ldap")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- garbage fuzzing
def _drain(parser: FrontendParser | BackendParser) -> None:
    try:
        while parser.next_message() is not NEED_DATA:
            pass
    except ProtocolError as err:
        # Whatever the error says must itself be sendable to the client.
        assert encode(err.to_error_response())


@settings(max_examples=500, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=64), max_size=6),
    expect_startup=st.booleans(),
    password_kind=st.sampled_from(["password", "sasl_initial", "sasl", "gss"]),
)
def test_garbage_to_the_frontend_parser(
    chunks: list[bytes], expect_startup: bool, password_kind: str
) -> None:
    parser = FrontendParser(expect_startup=expect_startup, max_message_size=4096)
    parser.expect_password(password_kind)  # type: ignore[arg-type]
    for chunk in chunks:
        parser.feed(chunk)
        _drain(parser)


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=6))
def test_garbage_to_the_backend_parser(chunks: list[bytes]) -> None:
    parser = BackendParser(max_message_size=4096)
    for chunk in chunks:
        parser.feed(chunk)
        _drain(parser)


VALID_CLIENT_STREAM = encode(STARTUP) + encode_many(
    [
        m.Parse("s", "select $1::int", (23,)),
        m.Bind("", "s", (0,), (b"1",), (0,)),
        m.Describe(b"P", ""),
        m.Execute("", 0),
        m.Sync(),
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    position=st.integers(0, len(VALID_CLIENT_STREAM) - 1),
    byte=st.integers(0, 255),
    cut=st.integers(0, len(VALID_CLIENT_STREAM)),
)
def test_mutated_and_truncated_client_streams(position: int, byte: int, cut: int) -> None:
    data = bytearray(VALID_CLIENT_STREAM)
    data[position] = byte
    parser = FrontendParser()
    parser.feed(bytes(data[:cut]))
    _drain(parser)


# ------------------------------------------------------- drain(): the relay's framing
def _split(parser: FrontendParser | BackendParser, chunks: list[bytes]):
    """Feed chunk by chunk; (every framed message's bytes, the error that ended it or None)."""
    out: list[bytes] = []
    for chunk in chunks:
        parser.feed(chunk)
        try:
            while (frame := parser.next_frame()) is not NEED_DATA:
                out.append(bytes(frame.raw))
        except ProtocolError as err:
            return out, str(err)
    return out, None


def _drained(parser: FrontendParser | BackendParser, chunks: list[bytes], run_tags: bytes):
    """The same through drain(), with its runs split back into messages."""
    out: list[bytes] = []
    for chunk in chunks:
        parser.feed(chunk)
        views, error = parser.drain()
        for view in views:
            raw = bytes(view)
            pos = 0
            while pos < len(raw):
                (length,) = struct.unpack_from("!i", raw, pos + 1)
                out.append(raw[pos : pos + 1 + length])
                # Only run types are joined, and only same-type messages into one run.
                assert pos == 0 or raw[pos] == raw[0] and chr(raw[0]) in run_tags.decode()
                pos += 1 + length
        if error is not None:
            # The same error comes again: a caller cannot skip over the bad message.
            assert str(parser.drain()[1]) == str(error)
            return out, str(error)
    return out, None


_LIMIT = 256

# Streams built from whole messages (runs of rows and COPY data among them) and a byte or
# two of damage, cut into arbitrary chunks, so that framing, joining queued chunks, runs and
# every error path come up.
_BACKEND_PIECES = [
    _tagged(b"D", b"\x00\x01\x00\x00\x00\x01x"),
    _tagged(b"D", b"\x00\x00"),
    _tagged(b"d", b"a,b\n"),
    _tagged(b"C", b"SELECT 2\x00"),
    _tagged(b"Z", b"I"),
    _tagged(b"D", b"\x00" * 200),
    _tagged(b"D", b"\x00" * 300),  # over the test's limit, and whole in the buffer
    b"D\x00\x00\x00\x02",  # length below four
    b"?\x00\x00\x00\x04",  # unknown type
    b"D\x7f\x00\x00\x00",  # over the limit
]
_FRONTEND_PIECES = [
    _tagged(b"Q", b"select 1\x00"),
    _tagged(b"D", b"Ps\x00"),
    _tagged(b"d", b"1\t2\n"),
    _tagged(b"d", b"x" * 200),
    _tagged(b"d", b"x" * 300),  # over the limit
    _tagged(b"S", b""),
    b"D\x00\x00\x00\x01",
    b"\x00\x00\x00\x00\x08",
]


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# (parser, message pieces its streams are built from, the types it joins into runs)
_SIDES = {
    "backend": (lambda: BackendParser(max_message_size=_LIMIT), _BACKEND_PIECES, b"Dd"),
    "frontend": (
        lambda: FrontendParser(expect_startup=False, max_message_size=_LIMIT),
        _FRONTEND_PIECES,
        b"d",
    ),
}


@settings(max_examples=400, deadline=None)
@given(
    side=st.sampled_from(sorted(_SIDES)),
    pieces=st.lists(st.integers(0, 100), max_size=12),
    cuts=st.lists(st.integers(0, 4000), max_size=6),
)
def test_drain_frames_exactly_what_next_frame_does(side, pieces, cuts) -> None:
    parser, stream_pieces, runs = _SIDES[side]
    data = b"".join(stream_pieces[i % len(stream_pieces)] for i in pieces)
    chunks = _cut(data, cuts)
    assert _drained(parser(), chunks, runs) == _split(parser(), chunks)


def test_drain_joins_a_run_of_rows_into_one_view() -> None:
    rows = [_tagged(b"D", b"\x00\x01\x00\x00\x00\x01" + bytes([48 + i])) for i in range(5)]
    parser = BackendParser()
    parser.feed(b"".join(rows) + _tagged(b"C", b"SELECT 5\x00") + rows[0][:3])
    views, error = parser.drain()
    assert error is None
    assert [bytes(v) for v in views] == [b"".join(rows), _tagged(b"C", b"SELECT 5\x00")]
    assert parser.buffered == 3  # the incomplete message waits for more


def test_drain_is_for_the_tagged_phase() -> None:
    with pytest.raises(RuntimeError, match="startup"):
        FrontendParser().drain()
