"""The broker API's answers on the session path, read with the standard library.

`guard exec` and `guard connect` read two bodies: `SessionCreated` and `ErrorBody`
(`guard.broker.api.schemas`). Importing pydantic and building those models costs
~150 ms at start-up here, so the CLI reads them into records (`cli.record`) with strict
type checks instead; a test holds these to the broker's models (same names, types and
defaults), so the contract cannot drift. Other commands (approvals) still use the
broker's models: they are not on the path of every session.

Imports only the standard library.
"""

from __future__ import annotations

from datetime import datetime

from guard.cli.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from typing import Any

# The field types a wire record may use, by the name its annotation gives them. The
# annotations are strings (postponed evaluation); reading them with `typing.get_type_hints`
# would import `typing` on every session's path, so `_kinds` reads the two forms used
# here, `T` and `T | None`, and refuses any other when the module is imported.
_TYPES: dict[str, type] = {t.__name__: t for t in (str, int, float, bool, datetime)}


def _kinds(cls: Any) -> dict[str, tuple[type, bool]]:
    """Each field of `cls`: (its type, whether null is allowed)."""
    kinds = {}
    for name in cls._fields:
        parts = [part.strip() for part in cls.__annotations__[name].split("|")]
        optional = "None" in parts
        named = [part for part in parts if part != "None"]
        if len(named) != 1 or named[0] not in _TYPES:
            raise TypeError(f"{cls.__name__}.{name}: a wire field is one of {sorted(_TYPES)}")
        kinds[name] = (_TYPES[named[0]], optional)
    return kinds


def _check(value: Any, kind: type, optional: bool, name: str) -> Any:
    """`value` as `kind` (str, int, float, bool, datetime), None when `optional`;
    ValueError naming the field otherwise. JSON numbers are not coerced from strings, and
    a bool is not an int: the broker's models would not accept them either."""
    if value is None and optional:
        return None  # an optional field sent as null
    checked = _CHECKS.get(kind, lambda v: v if isinstance(v, kind) else None)(value)
    if checked is None:
        raise ValueError(f"field {name!r} is not a {kind.__name__}")
    return checked


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    return float(value)


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


_CHECKS: dict[Any, Any] = {
    int: lambda v: _number(v, int),
    float: lambda v: _number(v, float),
    datetime: _timestamp,
}


def _read(cls: Any, kinds: dict[str, tuple[type, bool]], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"not a {cls.__name__} object")
    values = {}
    for name, (kind, optional) in kinds.items():
        if name in data:
            values[name] = _check(data[name], kind, optional, name)
        elif name not in cls._defaults:
            raise ValueError(f"field {name!r} is missing")
    return cls(**values)


class SessionCreated(Record):
    """What `POST /v1/sessions` answers (`schemas.SessionCreated`). Holds the session's
    secrets: never printed or logged (`repr` hides them)."""

    session_id: str
    gateway_host: str
    gateway_port: int
    database: str
    user: str
    password: str
    expires_at: datetime
    principal: str
    gateway_tls: bool = False
    gateway_ca_pem: str | None = None
    session_token: str | None = None
    heartbeat_interval_seconds: float | None = None
    heartbeat_grace_seconds: float | None = None
    ttl_notice: str | None = None
    login_expires_at: datetime | None = None
    auto_extend: bool = False
    unmask_state: str = ""
    unmask_request: str | None = None
    unmask_detail: str = ""

    @classmethod
    def from_json(cls, data: Any) -> SessionCreated:
        """ValueError when `data` is not one."""
        created: SessionCreated = _read(cls, _SESSION_CREATED, data)
        return created

    def __repr__(self) -> str:
        return f"SessionCreated(session_id={self.session_id!r}, user={self.user!r}, …)"


class ErrorBody(Record):
    """A broker error (`schemas.ErrorBody`): what went wrong and what to do."""

    error: str
    message: str
    hint: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> ErrorBody:
        body: ErrorBody = _read(cls, _ERROR_BODY, data)
        return body


_SESSION_CREATED = _kinds(SessionCreated)
_ERROR_BODY = _kinds(ErrorBody)
