"""Table tests: known wire bytes (as psql/libpq and the server send them) ⇄ dataclasses."""

from __future__ import annotations

import pytest

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import NEED_DATA, BackendParser, FrontendParser

# Bytes as psql/libpq and the server send them, laid out field by field from the
# "Message Formats" page (the length word counts itself but not the type byte).
STARTUP = (
    b"\x00\x00\x00\x29"  # length 41
    b"\x00\x03\x00\x00"  # protocol 3.0
    b"user\x00postgres\x00database\x00postgres\x00\x00"
)

FRONTEND_STARTUP_CASES = [
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", m.SSLRequest()),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x30", m.GSSENCRequest()),
    (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\xde\xad\xbe\xef",
        m.CancelRequest(12345, b"\xde\xad\xbe\xef"),
    ),
    (STARTUP, m.StartupMessage(196608, (("user", "postgres"), ("database", "postgres")))),
]

FRONTEND_CASES = [
    (b"Q\x00\x00\x00\x0dselect 1\x00", m.Query("select 1")),
    (
        b"P\x00\x00\x00\x17s1\x00select $1\x00\x00\x01\x00\x00\x00\x17",
        m.Parse("s1", "select $1", (23,)),
    ),
    (
        b"B\x00\x00\x00\x1a\x00s1\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x0242\xff\xff\xff\xff"
        b"\x00\x00",
        m.Bind("", "s1", (0,), (b"42", None), ()),
    ),
    (b"D\x00\x00\x00\x06P\x00", m.Describe(b"P", "")),
    (b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00", m.Execute("", 0)),
    (b"C\x00\x00\x00\x08Ss1\x00", m.Close(b"S", "s1")),
    (b"S\x00\x00\x00\x04", m.Sync()),
    (b"H\x00\x00\x00\x04", m.Flush()),
    (b"X\x00\x00\x00\x04", m.Terminate()),
    (b"d\x00\x00\x00\x081\t2\n", m.CopyData(b"1\t2\n")),
    (b"c\x00\x00\x00\x04", m.CopyDone()),
    (b"f\x00\x00\x00\x09nope\x00", m.CopyFail("nope")),
    (
        b"F\x00\x00\x00\x15\x00\x00\x04\xd2\x00\x01\x00\x01\x00\x01\x00\x00\x00\x01\x07\x00\x01",
        m.FunctionCall(1234, (1,), (b"\x07",), 1),
    ),
]

PASSWORD_CASES = [
    ("password", b"p\x00\x00\x00\x0bsecret\x00", m.PasswordMessage(b"secret")),
    (
        "sasl_initial",
        b"p\x00\x00\x00\x1fSCRAM-SHA-256\x00\x00\x00\x00\x09n,,n=,r=x",
        m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=x"),
    ),
    ("sasl", b"p\x00\x00\x00\x07c=b", m.SASLResponse(b"c=b")),
    ("gss", b"p\x00\x00\x00\x06\x01\x02", m.GSSResponse(b"\x01\x02")),
]

BACKEND_CASES = [
    (b"R\x00\x00\x00\x08\x00\x00\x00\x00", m.AuthenticationOk()),
    (b"R\x00\x00\x00\x08\x00\x00\x00\x03", m.AuthenticationCleartextPassword()),
    (
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04",
        m.AuthenticationMD5Password(b"\x01\x02\x03\x04"),
    ),
    (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
        m.AuthenticationSASL(("SCRAM-SHA-256",)),
    ),
    (b"R\x00\x00\x00\x0b\x00\x00\x00\x0br=x", m.AuthenticationSASLContinue(b"r=x")),
    (b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=x", m.AuthenticationSASLFinal(b"v=x")),
    (b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00", m.ParameterStatus("client_encoding", "UTF8")),
    (
        b"K\x00\x00\x00\x0c\x00\x00\x30\x39\xde\xad\xbe\xef",
        m.BackendKeyData(12345, b"\xde\xad\xbe\xef"),
    ),
    (b"Z\x00\x00\x00\x05I", m.ReadyForQuery(b"I")),
    (
        # psql's "select 1": one int4 column "?column?", text format.
        b"T\x00\x00\x00\x21\x00\x01?column?\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17"
        b"\x00\x04\xff\xff\xff\xff\x00\x00",
        m.RowDescription((m.FieldDescription("?column?", 0, 0, 23, 4, -1, 0),)),
    ),
    (b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011", m.DataRow((b"1",))),
    (b"D\x00\x00\x00\x0a\x00\x01\xff\xff\xff\xff", m.DataRow((None,))),
    (b"C\x00\x00\x00\x0dSELECT 1\x00", m.CommandComplete("SELECT 1")),
    (b"I\x00\x00\x00\x04", m.EmptyQueryResponse()),
    (b"1\x00\x00\x00\x04", m.ParseComplete()),
    (b"2\x00\x00\x00\x04", m.BindComplete()),
    (b"3\x00\x00\x00\x04", m.CloseComplete()),
    (b"n\x00\x00\x00\x04", m.NoData()),
    (b"s\x00\x00\x00\x04", m.PortalSuspended()),
    (b"t\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x19", m.ParameterDescription((25,))),
    (b"G\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00", m.CopyInResponse(0, (0, 0))),
    (b"H\x00\x00\x00\x09\x01\x00\x01\x00\x01", m.CopyOutResponse(1, (1,))),
    (b"W\x00\x00\x00\x07\x00\x00\x00", m.CopyBothResponse(0, ())),
    (b"V\x00\x00\x00\x0a\x00\x00\x00\x02hi", m.FunctionCallResponse(b"hi")),
    (b"V\x00\x00\x00\x08\xff\xff\xff\xff", m.FunctionCallResponse(None)),
    (b"A\x00\x00\x00\x0e\x00\x00\x00\x07ch\x00hi\x00", m.NotificationResponse(7, "ch", "hi")),
    (
        b"v\x00\x00\x00\x1d\x00\x00\x00\x00\x00\x00\x00\x01_pq_.compression\x00",
        m.NegotiateProtocolVersion(0, ("_pq_.compression",)),
    ),
    (
        # What the server sends for a wrong password (file/line/routine fields included).
        b"E\x00\x00\x00\x63SFATAL\x00VFATAL\x00C28P01\x00"
        b'Mpassword authentication failed for user "bob"\x00'
        b"Fauth.c\x00L323\x00Rauth_failed\x00\x00",
        m.ErrorResponse(
            (
                ("S", "FATAL"),
                ("V", "FATAL"),
                ("C", "28P01"),
                ("M", 'password authentication failed for user "bob"'),
                ("F", "auth.c"),
                ("L", "323"),
                ("R", "auth_failed"),
            )
        ),
    ),
    (
        b"N\x00\x00\x00\x21SNOTICE\x00C00000\x00Mhello there\x00\x00",
        m.NoticeResponse((("S", "NOTICE"), ("C", "00000"), ("M", "hello there"))),
    ),
]


def _single(parser: FrontendParser | BackendParser, data: bytes) -> object:
    parser.feed(data)
    msg = parser.next_message()
    assert parser.next_message() is NEED_DATA
    assert parser.buffered == 0
    return msg


@pytest.mark.parametrize(("data", "msg"), FRONTEND_STARTUP_CASES, ids=lambda v: type(v).__name__)
def test_startup_packets(data: bytes, msg: m.Message) -> None:
    assert _single(FrontendParser(), data) == msg
    assert encode(msg) == data


@pytest.mark.parametrize(("data", "msg"), FRONTEND_CASES, ids=lambda v: type(v).__name__)
def test_frontend_messages(data: bytes, msg: m.Message) -> None:
    assert _single(FrontendParser(expect_startup=False), data) == msg
    assert encode(msg) == data


@pytest.mark.parametrize(("kind", "data", "msg"), PASSWORD_CASES, ids=lambda v: str(v)[:20])
def test_password_family(kind: str, data: bytes, msg: m.Message) -> None:
    parser = FrontendParser(expect_startup=False)
    parser.expect_password(kind)  # type: ignore[arg-type]
    assert _single(parser, data) == msg
    assert encode(msg) == data


@pytest.mark.parametrize(("data", "msg"), BACKEND_CASES, ids=lambda v: type(v).__name__)
def test_backend_messages(data: bytes, msg: m.Message) -> None:
    assert _single(BackendParser(), data) == msg
    assert encode(msg) == data


def test_a_whole_simple_query_exchange() -> None:
    server = b"".join(data for data, _ in BACKEND_CASES[9:13]) + b"Z\x00\x00\x00\x05I"
    parser = BackendParser()
    parser.feed(server)
    assert [type(x).__name__ for x in parser.messages()] == [
        "RowDescription",
        "DataRow",
        "DataRow",
        "CommandComplete",
        "ReadyForQuery",
    ]


def test_the_same_p_bytes_decode_by_the_expected_kind() -> None:
    data = b"p\x00\x00\x00\x07c=b"
    parser = FrontendParser(expect_startup=False)
    parser.expect_password("sasl")
    parser.feed(data)
    assert parser.next_message() == m.SASLResponse(b"c=b")
    parser.expect_password("gss")
    parser.feed(data)
    assert parser.next_message() == m.GSSResponse(b"c=b")
    with pytest.raises(ValueError):
        parser.expect_password("kerberos")  # type: ignore[arg-type]
