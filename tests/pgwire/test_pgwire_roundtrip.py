"""Hypothesis: decode(encode(msg)) == msg for every message type, streams split anywhere
parse the same, and a well-framed message with an arbitrary body decodes to something
that re-encodes to exactly the same bytes, or is refused with a ProtocolError."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import _ENCODERS, encode, encode_many
from guard.broker.pgwire.errors import ProtocolError
from guard.broker.pgwire.parser import (
    NEED_DATA,
    BackendParser,
    Frame,
    FrontendParser,
    decode_backend,
    decode_frontend,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------- field strategies
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
name = text.filter(bool)
blob = st.binary(max_size=40)
nul_free = blob.filter(lambda b: b"\x00" not in b)
maybe_blob = st.none() | blob
i16 = st.integers(-(2**15), 2**15 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
formats = st.lists(i16, max_size=4).map(tuple)
oids = st.lists(u32, max_size=4).map(tuple)
values = st.lists(maybe_blob, max_size=4).map(tuple)
kind = st.sampled_from([b"S", b"P"])
cancel_key = st.binary(min_size=4, max_size=256)
copy_format = st.integers(0, 1)
field_code = st.characters(min_codepoint=1, max_codepoint=0x7F)
fields = st.lists(st.tuples(field_code, text), max_size=6).map(tuple)

FRONTEND: dict[type, st.SearchStrategy[m.Message]] = {
    m.Query: st.builds(m.Query, text),
    m.Parse: st.builds(m.Parse, text, text, oids),
    m.Bind: st.builds(m.Bind, text, text, formats, values, formats),
    m.Describe: st.builds(m.Describe, kind, text),
    m.Execute: st.builds(m.Execute, text, i32),
    m.Close: st.builds(m.Close, kind, text),
    m.Sync: st.just(m.Sync()),
    m.Flush: st.just(m.Flush()),
    m.Terminate: st.just(m.Terminate()),
    m.FunctionCall: st.builds(m.FunctionCall, u32, formats, values, i16),
    m.CopyData: st.builds(m.CopyData, blob),
    m.CopyDone: st.just(m.CopyDone()),
    m.CopyFail: st.builds(m.CopyFail, text),
}
STARTUP: dict[type, st.SearchStrategy[m.Message]] = {
    m.StartupMessage: st.builds(
        m.StartupMessage,
        st.integers(0, 0xFFFF).map(lambda minor: (3 << 16) | minor),
        st.lists(st.tuples(name, text), max_size=5).map(tuple),
    ),
    m.SSLRequest: st.just(m.SSLRequest()),
    m.GSSENCRequest: st.just(m.GSSENCRequest()),
    m.CancelRequest: st.builds(m.CancelRequest, i32, cancel_key),
}
PASSWORD: dict[type, tuple[str, st.SearchStrategy[m.Message]]] = {
    m.PasswordMessage: ("password", st.builds(m.PasswordMessage, nul_free)),
    m.SASLInitialResponse: ("sasl_initial", st.builds(m.SASLInitialResponse, text, maybe_blob)),
    m.SASLResponse: ("sasl", st.builds(m.SASLResponse, blob)),
    m.GSSResponse: ("gss", st.builds(m.GSSResponse, blob)),
}
field_description = st.builds(m.FieldDescription, text, u32, i16, u32, i16, i32, i16)
BACKEND: dict[type, st.SearchStrategy[m.Message]] = {
    m.AuthenticationOk: st.just(m.AuthenticationOk()),
    m.AuthenticationKerberosV5: st.just(m.AuthenticationKerberosV5()),
    m.AuthenticationCleartextPassword: st.just(m.AuthenticationCleartextPassword()),
    m.AuthenticationMD5Password: st.builds(
        m.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)
    ),
    m.AuthenticationGSS: st.just(m.AuthenticationGSS()),
    m.AuthenticationGSSContinue: st.builds(m.AuthenticationGSSContinue, blob),
    m.AuthenticationSSPI: st.just(m.AuthenticationSSPI()),
    m.AuthenticationSASL: st.builds(m.AuthenticationSASL, st.lists(name, max_size=3).map(tuple)),
    m.AuthenticationSASLContinue: st.builds(m.AuthenticationSASLContinue, blob),
    m.AuthenticationSASLFinal: st.builds(m.AuthenticationSASLFinal, blob),
    m.BackendKeyData: st.builds(m.BackendKeyData, i32, cancel_key),
    m.ParameterStatus: st.builds(m.ParameterStatus, text, text),
    m.ReadyForQuery: st.builds(m.ReadyForQuery, st.sampled_from([b"I", b"T", b"E"])),
    m.NegotiateProtocolVersion: st.builds(
        m.NegotiateProtocolVersion, i32, st.lists(text, max_size=3).map(tuple)
    ),
    m.RowDescription: st.builds(
        m.RowDescription, st.lists(field_description, max_size=3).map(tuple)
    ),
    m.DataRow: st.builds(m.DataRow, values),
    m.CommandComplete: st.builds(m.CommandComplete, text),
    m.EmptyQueryResponse: st.just(m.EmptyQueryResponse()),
    m.ParseComplete: st.just(m.ParseComplete()),
    m.BindComplete: st.just(m.BindComplete()),
    m.CloseComplete: st.just(m.CloseComplete()),
    m.NoData: st.just(m.NoData()),
    m.ParameterDescription: st.builds(m.ParameterDescription, oids),
    m.PortalSuspended: st.just(m.PortalSuspended()),
    m.FunctionCallResponse: st.builds(m.FunctionCallResponse, maybe_blob),
    m.CopyInResponse: st.builds(m.CopyInResponse, copy_format, formats),
    m.CopyOutResponse: st.builds(m.CopyOutResponse, copy_format, formats),
    m.CopyBothResponse: st.builds(m.CopyBothResponse, copy_format, formats),
    m.CopyData: st.builds(m.CopyData, blob),
    m.CopyDone: st.just(m.CopyDone()),
    m.NotificationResponse: st.builds(m.NotificationResponse, i32, text, text),
    m.ErrorResponse: st.builds(m.ErrorResponse, fields),
    m.NoticeResponse: st.builds(m.NoticeResponse, fields),
}

ALL_MESSAGE_CLASSES = {
    obj
    for obj in vars(m).values()
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj is not m.FieldDescription
}


def test_every_message_type_has_a_strategy_and_an_encoder() -> None:
    covered = set(FRONTEND) | set(STARTUP) | set(PASSWORD) | set(BACKEND)
    assert covered == ALL_MESSAGE_CLASSES
    assert set(_ENCODERS) == ALL_MESSAGE_CLASSES


def _decode_all(parser: FrontendParser | BackendParser, data: bytes) -> list[object]:
    parser.feed(data)
    out = []
    while (msg := parser.next_message()) is not NEED_DATA:
        out.append(msg)
    assert parser.buffered == 0
    return out


@pytest.mark.parametrize("cls", list(FRONTEND), ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_frontend_round_trip(cls: type, data: st.DataObject) -> None:
    msg = data.draw(FRONTEND[cls])
    assert _decode_all(FrontendParser(expect_startup=False), encode(msg)) == [msg]


@pytest.mark.parametrize("cls", list(STARTUP), ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_startup_round_trip(cls: type, data: st.DataObject) -> None:
    msg = data.draw(STARTUP[cls])
    assert _decode_all(FrontendParser(), encode(msg)) == [msg]


@pytest.mark.parametrize("cls", list(PASSWORD), ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_password_family_round_trip(cls: type, data: st.DataObject) -> None:
    kind, strategy = PASSWORD[cls]
    msg = data.draw(strategy)
    parser = FrontendParser(expect_startup=False)
    parser.expect_password(kind)  # type: ignore[arg-type]
    assert _decode_all(parser, encode(msg)) == [msg]


@pytest.mark.parametrize("cls", list(BACKEND), ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_backend_round_trip(cls: type, data: st.DataObject) -> None:
    msg = data.draw(BACKEND[cls])
    assert _decode_all(BackendParser(), encode(msg)) == [msg]


# ---------------------------------------------------------------------- streams
backend_stream = st.lists(st.one_of(*BACKEND.values()), min_size=1, max_size=6)
frontend_stream = st.lists(st.one_of(*FRONTEND.values()), min_size=1, max_size=6)


def _frames(parser: FrontendParser | BackendParser, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        parser.feed(chunk)
        out.extend(parser.frames())
    return out


def _raw(frames: list[Frame]) -> list[tuple[int, bytes]]:
    return [(f.tag, bytes(f.raw)) for f in frames]


@settings(max_examples=60, deadline=None)
@given(msgs=backend_stream)
def test_a_stream_split_at_every_boundary_gives_the_same_frames(msgs: list[m.Message]) -> None:
    data = encode_many(msgs)
    whole = _raw(_frames(BackendParser(), [data]))
    assert [bytes(raw) for _, raw in whole] == [encode(x) for x in msgs]
    for cut in range(len(data) + 1):
        assert _raw(_frames(BackendParser(), [data[:cut], data[cut:]])) == whole
    assert _raw(_frames(BackendParser(), [data[i : i + 1] for i in range(len(data))])) == whole


@settings(max_examples=40, deadline=None)
@given(msgs=frontend_stream, cuts=st.lists(st.integers(0, 400), max_size=6))
def test_frames_stay_valid_after_later_feeds(msgs: list[m.Message], cuts: list[int]) -> None:
    # Startup packet first, then tagged messages, fed in arbitrary chunks; frames handed out
    # early must still show their bytes after everything else has been fed.
    startup = m.StartupMessage(m.PROTOCOL_3_0, (("user", "u"),))
    data = encode(startup) + encode_many(msgs)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [bytearray(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    parser = FrontendParser()
    frames = _frames(parser, [bytes(c) for c in chunks])
    for chunk in chunks:  # the caller reusing its read buffers must not matter either
        chunk[:] = b"\xff" * len(chunk)
    assert [bytes(f.raw) for f in frames] == [encode(startup), *map(encode, msgs)]
    assert [decode_frontend(f) for f in frames[1:]] == msgs


# ---------------------------------------------------------------------- canonical decoding
def _framed(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + struct.pack("!i", len(body) + 4) + body


@settings(max_examples=600, deadline=None)
@given(tag=st.sampled_from(sorted(m.BACKEND_TAGS)), body=st.binary(max_size=48))
def test_backend_bodies_decode_canonically_or_are_refused(tag: int, body: bytes) -> None:
    parser = BackendParser()
    parser.feed(_framed(tag, body))
    frame = parser.next_frame()
    assert isinstance(frame, Frame)
    try:
        msg = decode_backend(frame)
    except ProtocolError:
        return
    assert encode(msg) == bytes(frame.raw)


@settings(max_examples=600, deadline=None)
@given(
    tag=st.sampled_from(sorted(m.FRONTEND_TAGS)),
    body=st.binary(max_size=48),
    password_kind=st.sampled_from(["password", "sasl_initial", "sasl", "gss"]),
)
def test_frontend_bodies_decode_canonically_or_are_refused(
    tag: int, body: bytes, password_kind: str
) -> None:
    parser = FrontendParser(expect_startup=False)
    parser.feed(_framed(tag, body))
    frame = parser.next_frame()
    assert isinstance(frame, Frame)
    try:
        msg = decode_frontend(frame, password_kind=password_kind)  # type: ignore[arg-type]
    except ProtocolError:
        return
    assert encode(msg) == bytes(frame.raw)


@settings(max_examples=300, deadline=None)
@given(
    code=st.sampled_from([196608, 196610, 80877102, 80877103, 80877104]),
    rest=st.binary(max_size=40),
)
def test_startup_bodies_decode_canonically_or_are_refused(code: int, rest: bytes) -> None:
    parser = FrontendParser()
    parser.feed(struct.pack("!ii", 8 + len(rest), code) + rest)
    try:
        msg = parser.next_message()
    except ProtocolError:
        return
    assert msg is not NEED_DATA
    assert encode(msg) == struct.pack("!ii", 8 + len(rest), code) + rest
