"""The broker API's answers on the session path, read with the standard library.

`guard exec` and `guard connect` read two bodies: `SessionCreated` and `ErrorBody`
(`guard.broker.api.schemas`). Importing pydantic and building those models costs
~150 ms at start-up here, so the CLI reads them into frozen dataclasses with strict type
checks instead; a test holds these to the broker's models (same names, types and
defaults), so the contract cannot drift. Other commands (approvals) still use the
broker's models: they are not on the path of every session.

Imports only the standard library.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from datetime import datetime
from typing import Any, get_type_hints


def _check(value: Any, kind: Any, name: str) -> Any:
    """`value` as `kind` (str, int, float, bool, datetime, or one of them | None);
    ValueError naming the field otherwise. JSON numbers are not coerced from strings, and
    a bool is not an int: the broker's models would not accept them either."""
    options = [k for k in getattr(kind, "__args__", (kind,)) if k is not type(None)]
    if value is None and len(options) < len(getattr(kind, "__args__", (kind,))):
        return None  # an optional field sent as null
    kind = options[0]
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


def _read(cls: Any, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"not a {cls.__name__} object")
    hints = get_type_hints(cls)
    values = {}
    for spec in fields(cls):
        if spec.name in data:
            values[spec.name] = _check(data[spec.name], hints[spec.name], spec.name)
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise ValueError(f"field {spec.name!r} is missing")
    return cls(**values)


@dataclass(frozen=True)
class SessionCreated:
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

    @classmethod
    def from_json(cls, data: Any) -> SessionCreated:
        """ValueError when `data` is not one."""
        created: SessionCreated = _read(cls, data)
        return created

    def __repr__(self) -> str:
        return f"SessionCreated(session_id={self.session_id!r}, user={self.user!r}, …)"


@dataclass(frozen=True)
class ErrorBody:
    """A broker error (`schemas.ErrorBody`): what went wrong and what to do."""

    error: str
    message: str
    hint: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> ErrorBody:
        body: ErrorBody = _read(cls, data)
        return body
