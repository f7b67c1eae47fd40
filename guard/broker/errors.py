"""Domain errors of the broker, each carrying its HTTP status and PostgreSQL SQLSTATE.

Imports only the stdlib. Adapters translate foreign exceptions (hvac, httpx, PyJWT,
pglast) into these in one place each; the API and the gateway map them at the edge.
"""

from __future__ import annotations


class GuardError(Exception):
    http_status = 500
    sqlstate = "XX000"
    code = "internal_error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class Unauthenticated(GuardError):
    http_status = 401
    sqlstate = "28000"
    code = "unauthenticated"


class Forbidden(GuardError):
    http_status = 403
    sqlstate = "42501"
    code = "forbidden"


class BadRequest(GuardError):
    http_status = 400
    sqlstate = "22023"
    code = "bad_request"


class Conflict(GuardError):
    """The thing asked about is no longer in a state that allows it (a decided request)."""

    http_status = 409
    sqlstate = "55000"
    code = "conflict"


class NotFound(GuardError):
    http_status = 404
    sqlstate = "42704"
    code = "not_found"


class DependencyUnavailable(GuardError):
    """An IdP, OpenBao or the database could not be reached: fail closed, say which."""

    http_status = 503
    sqlstate = "08006"
    code = "dependency_unavailable"
