"""The message dataclasses: immutability, helpers, the public names, the error type."""

from __future__ import annotations

import dataclasses

import pytest

import guard.broker.pgwire as pgwire
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.errors import ClientProtocolError, ProtocolError, ServerProtocolError
from guard.broker.pgwire.parser import NEED_DATA, BackendParser

MESSAGE_CLASSES = [
    obj
    for obj in vars(m).values()
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == m.__name__
]


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_messages_are_frozen_and_slotted(cls: type) -> None:
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert "__slots__" in vars(cls)
    assert "__dict__" not in vars(cls)


def test_instances_have_no_dict() -> None:
    # Including the ErrorResponse/NoticeResponse accessor mixin.
    assert not hasattr(m.ErrorResponse(()), "__dict__")
    assert not hasattr(m.DataRow(()), "__dict__")


def test_messages_are_hashable_values() -> None:
    a = m.Bind("p", "s", (1,), (b"x", None), (0,))
    assert a == m.Bind("p", "s", (1,), (b"x", None), (0,))
    assert len({a, m.Bind("p", "s", (1,), (b"x", None), (0,))}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.portal = "q"  # type: ignore[misc]


def test_startup_message_helpers() -> None:
    msg = m.StartupMessage(m.PROTOCOL_3_2, (("user", "bob"), ("database", "db"), ("user", "eve")))
    assert (msg.major, msg.minor) == (3, 2)
    assert msg.get("user") == "eve"  # the last one wins, as in the server
    assert msg.get("options") is None
    assert msg.get("options", "") == ""
    assert msg.as_dict() == {"user": "eve", "database": "db"}
    assert hash(msg) == hash(m.StartupMessage(196610, msg.params))


def test_error_response_build_and_properties() -> None:
    err = m.ErrorResponse.build("42501", "guard: denied", detail="why", hint="ask")
    assert err.fields == (
        ("S", "ERROR"),
        ("V", "ERROR"),
        ("C", "42501"),
        ("M", "guard: denied"),
        ("D", "why"),
        ("H", "ask"),
    )
    assert (err.severity, err.sqlstate, err.message, err.detail, err.hint) == (
        "ERROR",
        "42501",
        "guard: denied",
        "why",
        "ask",
    )
    bare = m.ErrorResponse.build("08P01", "x", severity="FATAL")
    assert bare.detail is None and bare.hint is None and bare.severity == "FATAL"


def test_severity_prefers_the_nonlocalized_field() -> None:
    localized = m.ErrorResponse((("S", "FEHLER"), ("V", "ERROR"), ("C", "42P01"), ("M", "x")))
    assert localized.severity == "ERROR"
    old_server = m.ErrorResponse((("S", "FATAL"), ("C", "28P01"), ("M", "x")))
    assert old_server.severity == "FATAL"
    assert m.ErrorResponse(()).message == "" and m.ErrorResponse(()).sqlstate == ""


def test_notice_response_has_the_same_accessors() -> None:
    notice = m.NoticeResponse.build("01000", "careful", hint="h")
    assert (notice.severity, notice.sqlstate, notice.message, notice.hint) == (
        "NOTICE",
        "01000",
        "careful",
        "h",
    )


@pytest.mark.parametrize("cls", [ClientProtocolError, ServerProtocolError])
def test_protocol_errors_become_fatal_error_responses(cls: type[ProtocolError]) -> None:
    err = cls("invalid message length 2")
    assert isinstance(err, ProtocolError)
    assert err.sqlstate == "08P01"
    assert err.message == str(err) == "invalid message length 2"
    response = err.to_error_response()
    assert (response.severity, response.sqlstate, response.message) == (
        "FATAL",
        "08P01",
        "invalid message length 2",
    )
    parser = BackendParser()
    parser.feed(encode(response))
    assert parser.next_message() == response


def test_tag_constants_are_the_documented_bytes() -> None:
    assert m.TAG_DATA_ROW == ord("D") == m.TAG_DESCRIBE
    assert m.TAG_ROW_DESCRIPTION == ord("T")
    assert m.TAG_READY_FOR_QUERY == ord("Z")
    assert m.TAG_PASSWORD_MESSAGE == m.TAG_SASL_RESPONSE == ord("p")
    assert m.PROTOCOL_3_0 == 196608 and m.PROTOCOL_3_2 == 196610
    assert (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE, m.CANCEL_REQUEST_CODE) == (
        80877103,
        80877104,
        80877102,
    )
    assert m.TAG_COPY_DATA in m.FRONTEND_TAGS and m.TAG_COPY_DATA in m.BACKEND_TAGS


def test_public_names_are_listed_and_reexported() -> None:
    public = {n for n in vars(m) if not n.startswith("_")} - {
        "annotations",
        "dataclass",
        "TypeAlias",
    }
    assert public == set(m.__all__)
    for name in [
        *m.__all__,
        "FrontendParser",
        "BackendParser",
        "encode",
        "NEED_DATA",
        "ScramServer",
        "ScramClient",
        "ProtocolError",
        "decode_frontend",
    ]:
        assert hasattr(pgwire, name), name
    assert set(pgwire.__all__) <= set(dir(pgwire))


def test_need_data_is_a_named_singleton() -> None:
    assert repr(NEED_DATA) == str(NEED_DATA) == "NEED_DATA"
    assert pgwire.NEED_DATA is NEED_DATA
