"""Wire schemas of the broker's HTTP API, shared by the broker and the CLI.

Imports pydantic only: the CLI imports this module and nothing else from `guard.broker`.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionCreate(_Model):
    target: str = Field(min_length=1, max_length=128)
    reason: str = Field(default="", max_length=1000)
    ttl_seconds: int | None = Field(default=None, ge=60, le=7 * 24 * 3600)


class SessionCreated(_Model):
    """What a client needs to reach the gateway. `password` is the per-session gateway
    secret (SCRAM-verified by the gateway), never the database credential."""

    session_id: str
    gateway_host: str
    gateway_port: int
    gateway_tls: bool = False
    database: str
    user: str
    password: str
    expires_at: datetime
    principal: str


class SessionInfo(_Model):
    session_id: str
    target: str
    principal: str
    expires_at: datetime
    status: str
    connections: int = 0


class ErrorBody(_Model):
    error: str
    message: str
    hint: str | None = None
