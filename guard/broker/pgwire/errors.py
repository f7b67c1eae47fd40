"""Errors of the wire codec: one base, one subclass per side that can send garbage.

`ClientProtocolError` means the client broke the protocol (the gateway answers with a FATAL
ErrorResponse and hangs up); `ServerProtocolError` means the database did (the gateway must
not relay anything further). Both carry SQLSTATE 08P01 (protocol_violation), as PostgreSQL
reports framing errors.

Imports only the stdlib and `messages` from this package.
"""

from __future__ import annotations

from .messages import ErrorResponse

SQLSTATE_PROTOCOL_VIOLATION = "08P01"


class ProtocolError(Exception):
    """Malformed, oversized or out-of-place protocol input."""

    sqlstate: str = SQLSTATE_PROTOCOL_VIOLATION

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_error_response(self) -> ErrorResponse:
        # FATAL: after a framing error message boundaries are lost, so the connection ends.
        return ErrorResponse.build(self.sqlstate, self.message, severity="FATAL")


class ClientProtocolError(ProtocolError):
    """The client (frontend) sent bytes that are not a valid protocol message here."""


class ServerProtocolError(ProtocolError):
    """The server (backend) sent bytes that are not a valid protocol message here."""
