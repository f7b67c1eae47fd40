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
    # Any positive duration: the policy's session_ttl.max caps it (and says so in
    # `SessionCreated.ttl_notice`); the upper bound only keeps the number sane.
    ttl_seconds: int | None = Field(default=None, ge=1, le=366 * 24 * 3600)
    # The client will send POST /v1/sessions/{id}/heartbeat every
    # `SessionCreated.heartbeat_interval_seconds`; the broker ends the session when they
    # stop for its grace period. Without it the session lasts until its TTL or its end
    # (until a first heartbeat turns the check on).
    heartbeat: bool = False
    # Read protected columns raw (the policy's `unmasked_access`; a reason is required).
    # The session may open masked with `unmask_state` "pending" until approvers decide.
    unmasked: bool = False


class SessionCreated(_Model):
    """What a client needs to reach the gateway. `password` is the per-session gateway
    secret (SCRAM-verified by the gateway), never the database credential."""

    session_id: str
    gateway_host: str
    gateway_port: int
    gateway_tls: bool = False
    # PEM of the CA that signed the gateway's certificate, when the broker is told it: the
    # client verifies the gateway with it (sslmode=verify-full) and needs nothing else.
    gateway_ca_pem: str | None = None
    database: str
    user: str
    password: str
    expires_at: datetime
    principal: str
    # Bearer secret for this session's heartbeat and end (DELETE /v1/sessions/{id}): they
    # then never depend on the ID token still being valid. The broker keeps its hash only.
    session_token: str | None = None
    # Set when the session was opened with `heartbeat`: how often to send one, and how
    # long the broker waits without one before it ends the session.
    heartbeat_interval_seconds: float | None = None
    heartbeat_grace_seconds: float | None = None
    # Why the session is shorter than asked: the policy's maximum, or the lease's.
    ttl_notice: str | None = None
    # Set when the target requires reauthentication: the session ends at this time unless
    # a fresh ID token comes first (POST /v1/sessions/{id}/reauth).
    login_expires_at: datetime | None = None
    # The target's policy lets `guard exec` extend the session while its program runs
    # (POST /v1/sessions/{id}/extend, up to the maximum).
    auto_extend: bool = False
    # Unmasked access, when asked for (see `SessionInfo`).
    unmask_state: str = ""
    unmask_request: str | None = None
    unmask_detail: str = ""


class SessionInfo(_Model):
    session_id: str
    target: str
    principal: str
    expires_at: datetime
    status: str
    connections: int = 0
    # When the session ends unless a heartbeat comes first (None: no heartbeat expected).
    heartbeat_deadline: datetime | None = None
    # Who holds it (issuer's subject) and why they said they need it.
    subject: str = ""
    reason: str = ""
    # When it ends unless a fresh ID token comes (None: its target requires none).
    login_expires_at: datetime | None = None
    # Unmasked access: "" not asked; "pending" approval request `unmask_request` is open;
    # "granted" connections made from then on read protected columns raw; "denied",
    # "expired", "withdrawn", "failed": it stays masked, `unmask_detail` says why.
    unmask_state: str = ""
    unmask_request: str | None = None
    unmask_detail: str = ""


class SessionExtend(_Model):
    """`POST /v1/sessions/{id}/extend`: last this long from now (None: the target's
    default), at most the policy's session_ttl.max from the session's start."""

    ttl_seconds: int | None = Field(default=None, ge=1, le=366 * 24 * 3600)


class SessionExtended(SessionInfo):
    # Why the session got less than asked (the policy's maximum, the lease's), if it did.
    notice: str | None = None


class SessionReauth(_Model):
    """`POST /v1/sessions/{id}/reauth`: a fresh ID token of the session's holder."""

    id_token: str = Field(min_length=1, max_length=16384, repr=False)


class Identity(_Model):
    """`GET /v1/me`: the caller as the broker sees it (from its verified ID token)."""

    principal: str  # label: display name, else subject
    subject: str
    issuer: str
    groups: list[str]
    # In one of the broker's `sessions.auditor_groups`: may list and revoke every session.
    auditor: bool = False
    # The trusted issuer entry that admitted the token, and whether it is a person's
    # login or a CI job's token (`workload`).
    via: str = ""
    kind: str = "person"


class TargetInfo(_Model):
    """`GET /v1/targets`: one policy target, and whether the caller may open a session."""

    name: str
    allowed: bool
    why_not: str | None = None
    default_ttl_seconds: int
    max_ttl_seconds: int
    # Whether the caller may ask for an unmasked session there: "yes", "after approval",
    # or "" (no).
    unmasked: str = ""


class BackstopReport(_Model):
    """`GET /v1/targets/{name}/backstop` and its `apply` (auditors): how the target's
    database differs from what the policy needs (`drift`, empty when in place) and, for a
    plan, what `apply` would change (`-- ` comment lines, one per object) and the
    statements it runs (for an apply: the statements it ran)."""

    target: str
    drift: list[str]
    statements: list[str] | None = None


class PolicyCatalogCheck(_Model):
    """`POST /v1/targets/{name}/policy-check` (auditors): a candidate policies.yaml, whose
    target of that name is checked against the target's live catalog before it is deployed."""

    policy: str = Field(max_length=1_000_000)


class PolicyCatalogReport(_Model):
    target: str
    problems: list[str]


class SessionRevoke(_Model):
    """`POST /v1/sessions/revoke` (auditors): end every session matching all the given
    selectors (at least one), with the reason recorded."""

    session_id: str | None = Field(default=None, min_length=1, max_length=64)
    subject: str | None = Field(default=None, min_length=1, max_length=256)
    target: str | None = Field(default=None, min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=1000)


class SessionsRevoked(_Model):
    session_ids: list[str]


class ErrorBody(_Model):
    error: str
    message: str
    hint: str | None = None


# ---------------------------------------------------------------- approvals
class ApprovalVote(BaseModel):
    """One person's decision on a request."""

    # What the broker sends may grow: an older CLI ignores fields it does not know.
    model_config = ConfigDict(extra="ignore")

    approver: str  # label (display name, else subject)
    approver_groups: list[str]
    approve: bool
    comment: str = ""
    at: datetime


class ApprovalInfo(BaseModel):
    """An approval request as reviewers and requesters see it.

    `statement` is the normalized text (literals replaced by $n): no typed value, so no
    value that touches a protected column, reaches a reviewer's screen.
    """

    model_config = ConfigDict(extra="ignore")

    id: str
    state: str  # pending | approved | denied | expired | withdrawn
    state_reason: str = ""
    target: str
    session_id: str
    requester: str
    requester_groups: list[str]
    session_reason: str = ""
    statement: str
    tables: list[str]
    rule: str
    approver_groups: list[str]
    approvals_required: int
    window_seconds: int | None = None
    # What an approval lets happen: "statement" (a held statement, or the rule's
    # statements for `window_seconds`), or "unmasked" (the whole session reads protected
    # columns raw).
    kind: str = "statement"
    votes: list[ApprovalVote] = []
    created_at: datetime
    expires_at: datetime
    # For the caller: whether they may decide it now, and if not, why.
    can_decide: bool = False
    why_not: str | None = None


class ApprovalDecide(_Model):
    """Body of POST /v1/approvals/{id}/approve (comment) or /deny (reason, required)."""

    comment: str = Field(default="", max_length=1000)
