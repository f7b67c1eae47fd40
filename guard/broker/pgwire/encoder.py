"""Serialize protocol messages (both directions) to the bytes PostgreSQL expects.

`encode(msg)` looks the message's type up in a dict of encoder functions (one per message
class, no isinstance chain); `encode_many` joins several. For every message type
`decode(encode(msg)) == msg` (see parser.decode_frontend / decode_backend).

The encoder refuses what the parser would refuse rather than emit a malformed message: a NUL
inside a string field would end the string early and let the rest be read as further fields
(an injection), so it raises ValueError; out-of-range integers raise ValueError too.

Stdlib only (struct); never import guard or third-party packages here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any, Final

from . import messages as m

_PACK_HEADER: Final = struct.Struct("!Bi").pack  # type byte, Int32 length
_PACK_I: Final = struct.Struct("!i").pack
_PACK_U32: Final = struct.Struct("!I").pack
_PACK_U16: Final = struct.Struct("!H").pack
_PACK_H: Final = struct.Struct("!h").pack
_PACK_B: Final = struct.Struct("!B").pack
_PACK_II: Final = struct.Struct("!ii").pack
_PACK_FIELD: Final = struct.Struct("!IhIhih").pack  # RowDescription field after its name
_NULL: Final = _PACK_I(-1)


def encode(msg: m.Message) -> bytes:
    """The wire bytes of one message, header included."""
    try:
        encoder = _ENCODERS[type(msg)]
    except KeyError:
        raise TypeError(f"not a protocol message: {type(msg).__name__}") from None
    try:
        return encoder(msg)
    except struct.error as exc:  # an integer out of its wire range
        raise ValueError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def encode_many(msgs: Iterable[m.Message]) -> bytes:
    return b"".join(map(encode, msgs))


def data_row(values: tuple[bytes | None, ...] | list[bytes | None]) -> bytes:
    """The wire bytes of a DataRow of these values: encode(DataRow(tuple(values)))."""
    return encode(m.DataRow(tuple(values)))


def join_small(chunks: list[bytes | memoryview], limit: int) -> bytes | None:
    """The chunks (messages, runs of them) joined into one write; None when together they
    are over `limit` bytes (bulk rows are written as they are rather than copied)."""
    if sum(map(len, chunks)) > limit:
        return None
    return b"".join(chunks)


# ---- helpers
def _tagged(tag: int, body: bytes) -> bytes:
    return _PACK_HEADER(tag, len(body) + 4) + body


def _cstr(text: str) -> bytes:
    data = text.encode("utf-8")
    if b"\x00" in data:
        raise ValueError(f"NUL inside a protocol string: {text[:40]!r}")
    return data + b"\x00"


def _int16s(values: tuple[int, ...]) -> bytes:
    return _PACK_U16(len(values)) + struct.pack(f"!{len(values)}h", *values)


def _oids(values: tuple[int, ...]) -> bytes:
    return _PACK_U16(len(values)) + struct.pack(f"!{len(values)}I", *values)


def _values(values: tuple[bytes | None, ...]) -> bytes:
    parts = [_PACK_U16(len(values))]
    append = parts.append
    for value in values:
        if value is None:
            append(_NULL)
        else:
            append(_PACK_I(len(value)))
            append(value)
    return b"".join(parts)


def _nullable(value: bytes | None) -> bytes:
    return _NULL if value is None else _PACK_I(len(value)) + value


def _kind(kind: bytes) -> bytes:
    if kind != b"S" and kind != b"P":
        raise ValueError(f"invalid Describe/Close target {kind!r} (expected b'S' or b'P')")
    return kind


def _cancel_key(key: bytes) -> bytes:
    if not 4 <= len(key) <= 256:
        raise ValueError(f"cancel key of {len(key)} bytes (4..256 allowed)")
    return key


def _fields(fields: m.Fields) -> bytes:
    parts = []
    for code, value in fields:
        if len(code) != 1 or not "\x01" <= code <= "\x7f":
            raise ValueError(f"invalid error field code {code!r}")
        parts.append(code.encode("ascii") + _cstr(value))
    parts.append(b"\x00")
    return b"".join(parts)


def _fixed(data: bytes) -> Callable[[Any], bytes]:
    # Field-less messages are the same bytes every time.
    return lambda _msg: data


def _auth(code: int, extra: bytes = b"") -> bytes:
    return _tagged(m.TAG_AUTHENTICATION, _PACK_I(code) + extra)


# ---- frontend
def _startup(msg: m.StartupMessage) -> bytes:
    parts = [_PACK_I(msg.protocol)]
    for name, value in msg.params:
        if not name:  # an empty name is the list terminator
            raise ValueError("empty startup parameter name")
        parts.append(_cstr(name))
        parts.append(_cstr(value))
    parts.append(b"\x00")
    body = b"".join(parts)
    return _PACK_I(len(body) + 4) + body


def _cancel_request(msg: m.CancelRequest) -> bytes:
    key = _cancel_key(msg.secret_key)
    return _PACK_I(12 + len(key)) + _PACK_II(m.CANCEL_REQUEST_CODE, msg.process_id) + key


def _query(msg: m.Query) -> bytes:
    return _tagged(m.TAG_QUERY, _cstr(msg.sql))


def _parse(msg: m.Parse) -> bytes:
    return _tagged(m.TAG_PARSE, _cstr(msg.name) + _cstr(msg.query) + _oids(msg.param_types))


def _bind(msg: m.Bind) -> bytes:
    return _tagged(
        m.TAG_BIND,
        b"".join((
            _cstr(msg.portal),
            _cstr(msg.statement),
            _int16s(msg.param_formats),
            _values(msg.params),
            _int16s(msg.result_formats),
        )),
    )


def _describe(msg: m.Describe) -> bytes:
    return _tagged(m.TAG_DESCRIBE, _kind(msg.kind) + _cstr(msg.name))


def _close(msg: m.Close) -> bytes:
    return _tagged(m.TAG_CLOSE, _kind(msg.kind) + _cstr(msg.name))


def _execute(msg: m.Execute) -> bytes:
    return _tagged(m.TAG_EXECUTE, _cstr(msg.portal) + _PACK_I(msg.max_rows))


def _function_call(msg: m.FunctionCall) -> bytes:
    body = (
        _PACK_U32(msg.function_oid)
        + _int16s(msg.arg_formats)
        + _values(msg.args)
        + _PACK_H(msg.result_format)
    )
    return _tagged(m.TAG_FUNCTION_CALL, body)


def _copy_data(msg: m.CopyData) -> bytes:
    return _tagged(m.TAG_COPY_DATA, bytes(msg.data))


def _copy_fail(msg: m.CopyFail) -> bytes:
    return _tagged(m.TAG_COPY_FAIL, _cstr(msg.message))


def _password(msg: m.PasswordMessage) -> bytes:
    if b"\x00" in msg.password:
        raise ValueError("NUL inside a password")
    return _tagged(m.TAG_PASSWORD_MESSAGE, bytes(msg.password) + b"\x00")


def _sasl_initial(msg: m.SASLInitialResponse) -> bytes:
    return _tagged(m.TAG_PASSWORD_MESSAGE, _cstr(msg.mechanism) + _nullable(msg.data))


def _sasl(msg: m.SASLResponse | m.GSSResponse) -> bytes:
    return _tagged(m.TAG_PASSWORD_MESSAGE, bytes(msg.data))


# ---- backend
def _md5(msg: m.AuthenticationMD5Password) -> bytes:
    if len(msg.salt) != 4:
        raise ValueError(f"MD5 salt must be 4 bytes, not {len(msg.salt)}")
    return _auth(m.AUTH_MD5_PASSWORD, bytes(msg.salt))


def _sasl_mechanisms(msg: m.AuthenticationSASL) -> bytes:
    if not all(msg.mechanisms):  # an empty name is the list terminator
        raise ValueError("empty SASL mechanism name")
    return _auth(m.AUTH_SASL, b"".join(map(_cstr, msg.mechanisms)) + b"\x00")


def _backend_key_data(msg: m.BackendKeyData) -> bytes:
    return _tagged(m.TAG_BACKEND_KEY_DATA, _PACK_I(msg.process_id) + _cancel_key(msg.secret_key))


def _parameter_status(msg: m.ParameterStatus) -> bytes:
    return _tagged(m.TAG_PARAMETER_STATUS, _cstr(msg.name) + _cstr(msg.value))


def _ready_for_query(msg: m.ReadyForQuery) -> bytes:
    if msg.status not in (b"I", b"T", b"E"):
        raise ValueError(f"invalid transaction status {msg.status!r}")
    return _tagged(m.TAG_READY_FOR_QUERY, msg.status)


def _negotiate(msg: m.NegotiateProtocolVersion) -> bytes:
    body = _PACK_II(msg.newest_minor, len(msg.unrecognized)) + b"".join(
        map(_cstr, msg.unrecognized)
    )
    return _tagged(m.TAG_NEGOTIATE_PROTOCOL_VERSION, body)


def _row_description(msg: m.RowDescription) -> bytes:
    parts = [_PACK_U16(len(msg.fields))]
    for f in msg.fields:
        parts.append(_cstr(f.name))
        parts.append(
            _PACK_FIELD(
                f.table_oid, f.column_attnum, f.type_oid, f.type_size, f.type_modifier,
                f.format_code,
            )
        )
    return _tagged(m.TAG_ROW_DESCRIPTION, b"".join(parts))


def _data_row(msg: m.DataRow) -> bytes:
    return _tagged(m.TAG_DATA_ROW, _values(msg.values))


def _command_complete(msg: m.CommandComplete) -> bytes:
    return _tagged(m.TAG_COMMAND_COMPLETE, _cstr(msg.tag))


def _parameter_description(msg: m.ParameterDescription) -> bytes:
    return _tagged(m.TAG_PARAMETER_DESCRIPTION, _oids(msg.type_oids))


def _function_call_response(msg: m.FunctionCallResponse) -> bytes:
    return _tagged(m.TAG_FUNCTION_CALL_RESPONSE, _nullable(msg.result))


def _copy_response(tag: int) -> Callable[[Any], bytes]:
    def encode_copy(msg: m.CopyInResponse | m.CopyOutResponse | m.CopyBothResponse) -> bytes:
        return _tagged(tag, _PACK_B(msg.format) + _int16s(msg.column_formats))

    return encode_copy


def _notification(msg: m.NotificationResponse) -> bytes:
    body = _PACK_I(msg.process_id) + _cstr(msg.channel) + _cstr(msg.payload)
    return _tagged(m.TAG_NOTIFICATION_RESPONSE, body)


def _error_response(msg: m.ErrorResponse) -> bytes:
    return _tagged(m.TAG_ERROR_RESPONSE, _fields(msg.fields))


def _notice_response(msg: m.NoticeResponse) -> bytes:
    return _tagged(m.TAG_NOTICE_RESPONSE, _fields(msg.fields))


_ENCODERS: Final[dict[type, Callable[[Any], bytes]]] = {
    # frontend
    m.StartupMessage: _startup,
    m.SSLRequest: _fixed(_PACK_II(8, m.SSL_REQUEST_CODE)),
    m.GSSENCRequest: _fixed(_PACK_II(8, m.GSSENC_REQUEST_CODE)),
    m.CancelRequest: _cancel_request,
    m.Query: _query,
    m.Parse: _parse,
    m.Bind: _bind,
    m.Describe: _describe,
    m.Execute: _execute,
    m.Close: _close,
    m.Sync: _fixed(_tagged(m.TAG_SYNC, b"")),
    m.Flush: _fixed(_tagged(m.TAG_FLUSH, b"")),
    m.Terminate: _fixed(_tagged(m.TAG_TERMINATE, b"")),
    m.FunctionCall: _function_call,
    m.CopyData: _copy_data,
    m.CopyDone: _fixed(_tagged(m.TAG_COPY_DONE, b"")),
    m.CopyFail: _copy_fail,
    m.PasswordMessage: _password,
    m.SASLInitialResponse: _sasl_initial,
    m.SASLResponse: _sasl,
    m.GSSResponse: _sasl,
    # backend
    m.AuthenticationOk: _fixed(_auth(m.AUTH_OK)),
    m.AuthenticationKerberosV5: _fixed(_auth(m.AUTH_KERBEROS_V5)),
    m.AuthenticationCleartextPassword: _fixed(_auth(m.AUTH_CLEARTEXT_PASSWORD)),
    m.AuthenticationMD5Password: _md5,
    m.AuthenticationGSS: _fixed(_auth(m.AUTH_GSS)),
    m.AuthenticationGSSContinue: lambda msg: _auth(m.AUTH_GSS_CONTINUE, bytes(msg.data)),
    m.AuthenticationSSPI: _fixed(_auth(m.AUTH_SSPI)),
    m.AuthenticationSASL: _sasl_mechanisms,
    m.AuthenticationSASLContinue: lambda msg: _auth(m.AUTH_SASL_CONTINUE, bytes(msg.data)),
    m.AuthenticationSASLFinal: lambda msg: _auth(m.AUTH_SASL_FINAL, bytes(msg.data)),
    m.BackendKeyData: _backend_key_data,
    m.ParameterStatus: _parameter_status,
    m.ReadyForQuery: _ready_for_query,
    m.NegotiateProtocolVersion: _negotiate,
    m.RowDescription: _row_description,
    m.DataRow: _data_row,
    m.CommandComplete: _command_complete,
    m.EmptyQueryResponse: _fixed(_tagged(m.TAG_EMPTY_QUERY_RESPONSE, b"")),
    m.ParseComplete: _fixed(_tagged(m.TAG_PARSE_COMPLETE, b"")),
    m.BindComplete: _fixed(_tagged(m.TAG_BIND_COMPLETE, b"")),
    m.CloseComplete: _fixed(_tagged(m.TAG_CLOSE_COMPLETE, b"")),
    m.NoData: _fixed(_tagged(m.TAG_NO_DATA, b"")),
    m.PortalSuspended: _fixed(_tagged(m.TAG_PORTAL_SUSPENDED, b"")),
    m.ParameterDescription: _parameter_description,
    m.FunctionCallResponse: _function_call_response,
    m.CopyInResponse: _copy_response(m.TAG_COPY_IN_RESPONSE),
    m.CopyOutResponse: _copy_response(m.TAG_COPY_OUT_RESPONSE),
    m.CopyBothResponse: _copy_response(m.TAG_COPY_BOTH_RESPONSE),
    m.NotificationResponse: _notification,
    m.ErrorResponse: _error_response,
    m.NoticeResponse: _notice_response,
}
