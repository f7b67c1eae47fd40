"""The `policies.yaml` document: its shape and field-level checks (pydantic v2).

Imports pydantic, the stdlib, `sql.model` and `masking.strategies` (for strategy names).
Models are strict (`"1"` is not 1, `yes` is not a string), frozen and reject unknown keys,
so a typo such as `effct:` or `group:` is an error instead of a silently ignored condition.
Cross-field rules (unique rule ids, approval only on require_approval rules, known target
names, TTL ordering, column ids) are checked in `policy.compile`, which also turns errors
into YAML paths.

Example (see the repository's policies.yaml):

    version: 1
    targets:
      demo:
        connect_groups: [engineers]
        session_ttl: {default: 1h, max: 8h}
        max_connections_per_session: 20   # the default; the issued role's CONNECTION LIMIT
        protected_columns: {public.customers.ssn: ssn_last4}
    rules:
      - id: deny-ddl
        effect: deny
        when: {operations: [ddl, dcl]}
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from guard.broker.masking.strategies import STRATEGIES, get_strategy
from guard.broker.sql.model import Operation

SUPPORTED_VERSION = 1
DEFAULT_MAX_CONNECTIONS_PER_SESSION = 20

MASK_STRATEGIES = frozenset(STRATEGIES)

_DURATION = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TABLE = re.compile(r"^[^.\s]+\.[^.\s]+$")
_FUNCTION = re.compile(r"^([^.\s]+\.)?[^.\s]+$")
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def duration_seconds(text: str) -> int:
    """`30s`, `15m`, `1h`, `8h`, `1d` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit s, m, h or d (e.g. 15m)"
        )
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _duration(text: str) -> str:
    duration_seconds(text)
    return text


def _operation(name: str) -> str:
    if name not in Operation._value2member_map_ or name == Operation.UNKNOWN:
        known = ", ".join(o.value for o in Operation if o is not Operation.UNKNOWN)
        raise ValueError(f"unknown operation {name!r}; known operations: {known}")
    return name


def _table(name: str) -> str:
    if not _TABLE.match(name):
        raise ValueError(f"table {name!r} must be schema-qualified, e.g. public.transactions")
    return name


def _function(name: str) -> str:
    if not _FUNCTION.match(name):
        raise ValueError(f"function {name!r} must be `name` or `schema.name`")
    return name.lower()


def _strategy(name: str) -> str:
    if name.startswith("fixed:"):
        try:
            get_strategy(name)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from exc
        return name
    if name not in MASK_STRATEGIES:
        known = ", ".join([*sorted(MASK_STRATEGIES), "fixed:<value>"])
        raise ValueError(f"unknown mask strategy {name!r}; known strategies: {known}")
    return name


def _yaml_null(value: object) -> object:
    # `ssn: null` (or an empty value) parses as YAML null: it can only mean the null strategy.
    return "null" if value is None else value


def _rule_id(value: str) -> str:
    if not _RULE_ID.match(value) or value.startswith("guardrail:") or value == "default-deny":
        raise ValueError(
            f"invalid rule id {value!r}: use letters, digits, '-', '_' or '.'"
            " (ids starting with 'guardrail:' and 'default-deny' are reserved)"
        )
    return value


Duration = Annotated[str, AfterValidator(_duration)]
OperationName = Annotated[str, AfterValidator(_operation)]
TableName = Annotated[str, AfterValidator(_table)]
FunctionName = Annotated[str, AfterValidator(_function)]
StrategyName = Annotated[str, BeforeValidator(_yaml_null), AfterValidator(_strategy)]
GroupName = Annotated[str, Field(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SessionTTL(_Model):
    default: Duration
    max: Duration
    # A session lasts no longer than its holder's ID token unless the CLI presents a fresh
    # one (it refreshes the login in the background): an offboarded user, or one removed
    # from the groups, loses the session when the IdP refuses. Off by default: a CI job's
    # token cannot be refreshed.
    reauthenticate: bool = False
    # `guard exec` extends its session while its program runs (each time by the default,
    # up to `max` from the session's start) instead of letting the TTL cut it off.
    auto_extend: bool = False


class ApprovalSpec(_Model):
    approver_groups: list[GroupName] = Field(min_length=1)
    approvals_required: int = Field(default=1, ge=1, le=10)
    # With a window, an approval covers the rule's statements in that session for that
    # long; without one, exactly the one statement that was held.
    window: Duration | None = None


class UnmaskedAccessSpec(_Model):
    """Sessions that read protected columns raw, asked for explicitly (`--unmasked` with a
    reason) by a member of `groups`; with `approval`, only once approvers said yes."""

    groups: list[GroupName] = Field(min_length=1)
    approval: ApprovalSpec | None = None
    # An unmasked session lasts at most this long, and never past session_ttl.max.
    max_ttl: Duration | None = None


class TargetSpec(_Model):
    description: str = ""
    connect_groups: list[GroupName] = Field(min_length=1)
    session_ttl: SessionTTL
    protected_columns: dict[str, StrategyName] = Field(default_factory=dict)
    # Database connections one session may hold at once: the issued role's CONNECTION
    # LIMIT, so one session cannot use up the server's max_connections.
    max_connections_per_session: int = Field(
        default=DEFAULT_MAX_CONNECTIONS_PER_SESSION, ge=1, le=10_000
    )
    unmasked_access: UnmaskedAccessSpec | None = None


class WhenSpec(_Model):
    operations: list[OperationName] | None = Field(default=None, min_length=1)
    reads: list[TableName] | None = Field(default=None, min_length=1)
    writes: list[TableName] | None = Field(default=None, min_length=1)
    functions: list[FunctionName] | None = Field(default=None, min_length=1)


class RuleSpec(_Model):
    id: Annotated[str, AfterValidator(_rule_id)]
    description: str = ""
    effect: Literal["allow", "deny", "require_approval"]
    targets: list[str] | None = Field(default=None, min_length=1)
    groups: list[GroupName] | None = Field(default=None, min_length=1)
    when: WhenSpec = WhenSpec()
    approval: ApprovalSpec | None = None


class PolicyDocument(_Model):
    version: int
    targets: dict[str, TargetSpec] = Field(min_length=1)
    rules: list[RuleSpec] = Field(default_factory=list)
