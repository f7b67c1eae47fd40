"""PostgreSQL wire protocol 3.0 messages as frozen, slotted dataclasses.

One class per message of the frontend/backend protocol, named as in the PostgreSQL docs
("Message Formats"), plus the one-byte type tags as integer constants: the proxy's hot path
compares `frame.tag` against these without decoding anything.

Pure data: no I/O and no parsing here (see `parser` and `encoder`). Imports only the
stdlib; nothing from guard or any third-party package, because `policy` and `masking`
import this module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

# --------------------------------------------------------------------------- tags
# Frontend (client → server). 'd' and 'c' (CopyData, CopyDone) go both ways.
TAG_BIND = ord("B")
TAG_CLOSE = ord("C")
TAG_COPY_DATA = ord("d")
TAG_COPY_DONE = ord("c")
TAG_COPY_FAIL = ord("f")
TAG_DESCRIBE = ord("D")
TAG_EXECUTE = ord("E")
TAG_FLUSH = ord("H")
TAG_FUNCTION_CALL = ord("F")
TAG_PARSE = ord("P")
TAG_QUERY = ord("Q")
TAG_SYNC = ord("S")
TAG_TERMINATE = ord("X")
# 'p' carries PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse alike; only
# the authentication exchange tells them apart (see FrontendParser.expect_password).
TAG_PASSWORD_MESSAGE = ord("p")
TAG_SASL_INITIAL_RESPONSE = TAG_PASSWORD_MESSAGE
TAG_SASL_RESPONSE = TAG_PASSWORD_MESSAGE
TAG_GSS_RESPONSE = TAG_PASSWORD_MESSAGE
# Startup-phase packets (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) carry no
# type byte; their frames use this tag.
TAG_UNTAGGED = 0

# Backend (server → client).
TAG_AUTHENTICATION = ord("R")
TAG_BACKEND_KEY_DATA = ord("K")
TAG_BIND_COMPLETE = ord("2")
TAG_CLOSE_COMPLETE = ord("3")
TAG_COMMAND_COMPLETE = ord("C")
TAG_COPY_IN_RESPONSE = ord("G")
TAG_COPY_OUT_RESPONSE = ord("H")
TAG_COPY_BOTH_RESPONSE = ord("W")
TAG_DATA_ROW = ord("D")
TAG_EMPTY_QUERY_RESPONSE = ord("I")
TAG_ERROR_RESPONSE = ord("E")
TAG_FUNCTION_CALL_RESPONSE = ord("V")
TAG_NEGOTIATE_PROTOCOL_VERSION = ord("v")
TAG_NO_DATA = ord("n")
TAG_NOTICE_RESPONSE = ord("N")
TAG_NOTIFICATION_RESPONSE = ord("A")
TAG_PARAMETER_DESCRIPTION = ord("t")
TAG_PARAMETER_STATUS = ord("S")
TAG_PARSE_COMPLETE = ord("1")
TAG_PORTAL_SUSPENDED = ord("s")
TAG_READY_FOR_QUERY = ord("Z")
TAG_ROW_DESCRIPTION = ord("T")

FRONTEND_TAGS = frozenset({
    TAG_BIND, TAG_CLOSE, TAG_COPY_DATA, TAG_COPY_DONE, TAG_COPY_FAIL, TAG_DESCRIBE,
    TAG_EXECUTE, TAG_FLUSH, TAG_FUNCTION_CALL, TAG_PARSE, TAG_QUERY, TAG_SYNC,
    TAG_TERMINATE, TAG_PASSWORD_MESSAGE,
})
BACKEND_TAGS = frozenset({
    TAG_AUTHENTICATION, TAG_BACKEND_KEY_DATA, TAG_BIND_COMPLETE, TAG_CLOSE_COMPLETE,
    TAG_COMMAND_COMPLETE, TAG_COPY_DATA, TAG_COPY_DONE, TAG_COPY_IN_RESPONSE,
    TAG_COPY_OUT_RESPONSE, TAG_COPY_BOTH_RESPONSE, TAG_DATA_ROW, TAG_EMPTY_QUERY_RESPONSE,
    TAG_ERROR_RESPONSE, TAG_FUNCTION_CALL_RESPONSE, TAG_NEGOTIATE_PROTOCOL_VERSION,
    TAG_NO_DATA, TAG_NOTICE_RESPONSE, TAG_NOTIFICATION_RESPONSE, TAG_PARAMETER_DESCRIPTION,
    TAG_PARAMETER_STATUS, TAG_PARSE_COMPLETE, TAG_PORTAL_SUSPENDED, TAG_READY_FOR_QUERY,
    TAG_ROW_DESCRIPTION,
})

# --------------------------------------------------------------------------- codes
# Request codes of the untagged startup packets (the Int32 after the length).
PROTOCOL_3_0 = 3 << 16  # 196608
PROTOCOL_3_2 = (3 << 16) | 2  # 196610
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

# Authentication request codes (the Int32 after the 'R' header).
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Field codes of ErrorResponse / NoticeResponse.
FIELD_SEVERITY = "S"  # localized
FIELD_SEVERITY_NONLOCALIZED = "V"  # since 9.6; what programs should compare
FIELD_SQLSTATE = "C"
FIELD_MESSAGE = "M"
FIELD_DETAIL = "D"
FIELD_HINT = "H"

Fields: TypeAlias = tuple[tuple[str, str], ...]


# =========================================================================== frontend
# ---- startup phase (untagged)
@dataclass(frozen=True, slots=True)
class StartupMessage:
    """`protocol` is the full version number (196608 = 3.0); `params` keeps the order sent."""

    protocol: int
    params: tuple[tuple[str, str], ...]

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    def get(self, key: str, default: str | None = None) -> str | None:
        # Last one wins, as in the server's startup packet processing.
        found = default
        for name, value in self.params:
            if name == key:
                found = value
        return found

    def as_dict(self) -> dict[str, str]:
        return dict(self.params)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """`secret_key` is bytes: 4 bytes in protocol 3.0, up to 256 in 3.2."""

    process_id: int
    secret_key: bytes


# ---- simple and extended query
@dataclass(frozen=True, slots=True)
class Query:
    sql: str


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    query: str
    param_types: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Describe:
    kind: bytes  # b"S" (prepared statement) or b"P" (portal)
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int = 0  # 0: no limit


@dataclass(frozen=True, slots=True)
class Close:
    kind: bytes  # b"S" or b"P"
    name: str


@dataclass(frozen=True, slots=True)
class Sync:
    pass


@dataclass(frozen=True, slots=True)
class Flush:
    pass


@dataclass(frozen=True, slots=True)
class Terminate:
    pass


@dataclass(frozen=True, slots=True)
class FunctionCall:
    function_oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int


# ---- COPY (CopyData and CopyDone are sent by both sides)
@dataclass(frozen=True, slots=True)
class CopyData:
    data: bytes


@dataclass(frozen=True, slots=True)
class CopyDone:
    pass


@dataclass(frozen=True, slots=True)
class CopyFail:
    message: str


# ---- the 'p' family
@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """Cleartext or "md5…" password, without the NUL terminator (the encoder adds it)."""

    password: bytes


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None  # None is sent as length -1


@dataclass(frozen=True, slots=True)
class SASLResponse:
    data: bytes


@dataclass(frozen=True, slots=True)
class GSSResponse:
    data: bytes


# =========================================================================== backend
# ---- authentication ('R')
@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    salt: bytes  # 4 bytes


@dataclass(frozen=True, slots=True)
class AuthenticationGSS:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue:
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    mechanisms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    data: bytes


# ---- session state
@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """`secret_key` is bytes: 4 bytes in protocol 3.0, up to 256 in 3.2."""

    process_id: int
    secret_key: bytes


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: bytes  # b"I" idle, b"T" in a transaction, b"E" in a failed transaction


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: tuple[str, ...]


# ---- results
@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription (not a message by itself)."""

    name: str
    table_oid: int  # 0 unless the column is a plain table column
    column_attnum: int
    type_oid: int
    type_size: int
    type_modifier: int
    format_code: int  # 0 text, 1 binary


@dataclass(frozen=True, slots=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    pass


@dataclass(frozen=True, slots=True)
class ParseComplete:
    pass


@dataclass(frozen=True, slots=True)
class BindComplete:
    pass


@dataclass(frozen=True, slots=True)
class CloseComplete:
    pass


@dataclass(frozen=True, slots=True)
class NoData:
    pass


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    type_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    pass


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    result: bytes | None


@dataclass(frozen=True, slots=True)
class CopyInResponse:
    format: int  # overall: 0 text, 1 binary
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyOutResponse:
    format: int
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyBothResponse:
    format: int
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    process_id: int
    channel: str
    payload: str


# ---- errors and notices
class _FieldsView:
    """Accessors shared by ErrorResponse and NoticeResponse (mixin; holds no state)."""

    __slots__ = ()
    fields: Fields

    def get(self, code: str) -> str | None:
        for key, value in self.fields:
            if key == code:
                return value
        return None

    @property
    def severity(self) -> str:
        # 'V' is never localized, so compare against it when the server sent it.
        return self.get(FIELD_SEVERITY_NONLOCALIZED) or self.get(FIELD_SEVERITY) or ""

    @property
    def sqlstate(self) -> str:
        return self.get(FIELD_SQLSTATE) or ""

    @property
    def message(self) -> str:
        return self.get(FIELD_MESSAGE) or ""

    @property
    def detail(self) -> str | None:
        return self.get(FIELD_DETAIL)

    @property
    def hint(self) -> str | None:
        return self.get(FIELD_HINT)


def _build_fields(
    sqlstate: str, message: str, severity: str, detail: str | None, hint: str | None
) -> Fields:
    fields = [
        (FIELD_SEVERITY, severity),
        (FIELD_SEVERITY_NONLOCALIZED, severity),
        (FIELD_SQLSTATE, sqlstate),
        (FIELD_MESSAGE, message),
    ]
    if detail is not None:
        fields.append((FIELD_DETAIL, detail))
    if hint is not None:
        fields.append((FIELD_HINT, hint))
    return tuple(fields)


@dataclass(frozen=True, slots=True)
class ErrorResponse(_FieldsView):
    fields: Fields

    @classmethod
    def build(
        cls,
        sqlstate: str,
        message: str,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
    ) -> ErrorResponse:
        return cls(_build_fields(sqlstate, message, severity, detail, hint))


@dataclass(frozen=True, slots=True)
class NoticeResponse(_FieldsView):
    fields: Fields

    @classmethod
    def build(
        cls,
        sqlstate: str,
        message: str,
        *,
        severity: str = "NOTICE",
        detail: str | None = None,
        hint: str | None = None,
    ) -> NoticeResponse:
        return cls(_build_fields(sqlstate, message, severity, detail, hint))


# =========================================================================== unions
StartupPacket: TypeAlias = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest
PasswordFamily: TypeAlias = PasswordMessage | SASLInitialResponse | SASLResponse | GSSResponse
FrontendMessage: TypeAlias = (
    StartupPacket
    | PasswordFamily
    | Query | Parse | Bind | Describe | Execute | Close | Sync | Flush | Terminate
    | FunctionCall | CopyData | CopyDone | CopyFail
)
Authentication: TypeAlias = (
    AuthenticationOk | AuthenticationKerberosV5 | AuthenticationCleartextPassword
    | AuthenticationMD5Password | AuthenticationGSS | AuthenticationGSSContinue
    | AuthenticationSSPI | AuthenticationSASL | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)
BackendMessage: TypeAlias = (
    Authentication
    | BackendKeyData | ParameterStatus | ReadyForQuery | NegotiateProtocolVersion
    | RowDescription | DataRow | CommandComplete | EmptyQueryResponse | ParseComplete
    | BindComplete | CloseComplete | NoData | ParameterDescription | PortalSuspended
    | FunctionCallResponse | CopyInResponse | CopyOutResponse | CopyBothResponse
    | CopyData | CopyDone | NotificationResponse | ErrorResponse | NoticeResponse
)
Message: TypeAlias = FrontendMessage | BackendMessage

# Everything above is public; tests/pgwire checks that this list stays complete.
__all__ = [
    "TAG_BIND", "TAG_CLOSE", "TAG_COPY_DATA", "TAG_COPY_DONE", "TAG_COPY_FAIL", "TAG_DESCRIBE",
    "TAG_EXECUTE", "TAG_FLUSH", "TAG_FUNCTION_CALL", "TAG_PARSE", "TAG_QUERY", "TAG_SYNC",
    "TAG_TERMINATE", "TAG_PASSWORD_MESSAGE", "TAG_SASL_INITIAL_RESPONSE", "TAG_SASL_RESPONSE",
    "TAG_GSS_RESPONSE", "TAG_UNTAGGED", "TAG_AUTHENTICATION", "TAG_BACKEND_KEY_DATA",
    "TAG_BIND_COMPLETE", "TAG_CLOSE_COMPLETE", "TAG_COMMAND_COMPLETE", "TAG_COPY_IN_RESPONSE",
    "TAG_COPY_OUT_RESPONSE", "TAG_COPY_BOTH_RESPONSE", "TAG_DATA_ROW",
    "TAG_EMPTY_QUERY_RESPONSE", "TAG_ERROR_RESPONSE", "TAG_FUNCTION_CALL_RESPONSE",
    "TAG_NEGOTIATE_PROTOCOL_VERSION", "TAG_NO_DATA", "TAG_NOTICE_RESPONSE",
    "TAG_NOTIFICATION_RESPONSE", "TAG_PARAMETER_DESCRIPTION", "TAG_PARAMETER_STATUS",
    "TAG_PARSE_COMPLETE", "TAG_PORTAL_SUSPENDED", "TAG_READY_FOR_QUERY", "TAG_ROW_DESCRIPTION",
    "FRONTEND_TAGS", "BACKEND_TAGS", "PROTOCOL_3_0", "PROTOCOL_3_2", "CANCEL_REQUEST_CODE",
    "SSL_REQUEST_CODE", "GSSENC_REQUEST_CODE", "AUTH_OK", "AUTH_KERBEROS_V5",
    "AUTH_CLEARTEXT_PASSWORD", "AUTH_MD5_PASSWORD", "AUTH_GSS", "AUTH_GSS_CONTINUE",
    "AUTH_SSPI", "AUTH_SASL", "AUTH_SASL_CONTINUE", "AUTH_SASL_FINAL", "FIELD_SEVERITY",
    "FIELD_SEVERITY_NONLOCALIZED", "FIELD_SQLSTATE", "FIELD_MESSAGE", "FIELD_DETAIL",
    "FIELD_HINT", "Fields", "StartupMessage", "SSLRequest", "GSSENCRequest", "CancelRequest",
    "Query", "Parse", "Bind", "Describe", "Execute", "Close", "Sync", "Flush", "Terminate",
    "FunctionCall", "CopyData", "CopyDone", "CopyFail", "PasswordMessage",
    "SASLInitialResponse", "SASLResponse", "GSSResponse", "AuthenticationOk",
    "AuthenticationKerberosV5", "AuthenticationCleartextPassword", "AuthenticationMD5Password",
    "AuthenticationGSS", "AuthenticationGSSContinue", "AuthenticationSSPI",
    "AuthenticationSASL", "AuthenticationSASLContinue", "AuthenticationSASLFinal",
    "BackendKeyData", "ParameterStatus", "ReadyForQuery", "NegotiateProtocolVersion",
    "FieldDescription", "RowDescription", "DataRow", "CommandComplete", "EmptyQueryResponse",
    "ParseComplete", "BindComplete", "CloseComplete", "NoData", "ParameterDescription",
    "PortalSuspended", "FunctionCallResponse", "CopyInResponse", "CopyOutResponse",
    "CopyBothResponse", "NotificationResponse", "ErrorResponse", "NoticeResponse",
    "StartupPacket", "PasswordFamily", "FrontendMessage", "Authentication", "BackendMessage",
    "Message",
]
