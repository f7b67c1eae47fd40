"""Why the policy decides what it decides: `explain` for `guard policy explain` (pure).

Evaluates SQL for a set of groups on a target exactly as the gateway does
(`CompiledPolicy.evaluate_analysis` on `sql.analyze`), and adds what a reviewer and a
policy author need to read the verdict: whether the groups may connect at all, the
deciding rule(s) with their descriptions, what guard saw in the statement (operations,
relations, functions), the masked columns with their masks and, for `require_approval`,
who can approve, how many approvals and for how long.

Imports only the stdlib and the `policy`/`sql`/`identity.principal` models; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from guard.broker.identity.principal import Principal
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.policy.model import ApprovalRequirement, Effect, Verdict
from guard.broker.sql.analyze import analyze
from guard.broker.sql.model import StatementAnalysis

__all__ = [
    "ExplainError",
    "Explanation",
    "RuleRef",
    "StatementExplanation",
    "explain",
    "window_text",
]

# The issuer of the principal `explain` evaluates: no token is involved, only groups.
EXPLAIN_ISSUER = "guard:policy-explain"

DEFAULT_DENY = "default-deny"
_BUILT_IN = {
    DEFAULT_DENY: "Anything no allow rule covers is denied (a statement runs only if an allow"
    " rule covers every one of its operations)",
    "guardrail:connect": "Built-in: only the target's connect_groups may open a session",
    "guardrail:unknown-target": "Built-in: the target is not in the policy",
}
_GUARDRAIL = "Built-in guardrail: no policy rule can override it"


class ExplainError(ValueError):
    """Nothing to explain: unknown target, unparseable or empty SQL. `hint`: what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A rule that decided a verdict: a policy rule, a guardrail or `default-deny`."""

    id: str
    description: str
    built_in: bool


@dataclass(frozen=True, slots=True)
class StatementExplanation:
    statement: StatementAnalysis
    verdict: Verdict
    rules: tuple[RuleRef, ...]  # the deciding rule(s): several allow rules may cover one
    masks: tuple[tuple[str, str], ...]  # (masked column id, mask strategy)
    reasons: tuple[str, ...]

    @property
    def effect(self) -> Effect:
        return self.verdict.effect

    @property
    def approval(self) -> ApprovalRequirement | None:
        return self.verdict.approval

    def to_dict(self) -> dict[str, Any]:
        statement, verdict, approval = self.statement, self.verdict, self.verdict.approval
        return {
            "statement": statement.text,
            "verdict": verdict.effect.value,
            "rule": verdict.rule_id,
            "rules": [
                {"id": r.id, "description": r.description, "built_in": r.built_in}
                for r in self.rules
            ],
            "message": verdict.message,
            "reasons": list(self.reasons),
            "masked_columns": [{"column": c, "mask": m} for c, m in self.masks],
            "approval": None
            if approval is None
            else {
                "approver_groups": sorted(approval.approver_groups),
                "approvals_required": approval.approvals_required,
                "window_seconds": approval.window_seconds,
                "window": window_text(approval.window_seconds),
            },
            "analysis": {
                "command": statement.command,
                "operations": sorted(o.value for o in statement.operations),
                "reads": sorted(str(r) for r in statement.relations_read),
                "writes": sorted(str(r) for r in statement.relations_written),
                "functions": sorted(statement.functions),
            },
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    """Everything `guard policy explain` shows: the connection check, then each statement."""

    target: str
    user: str | None
    groups: frozenset[str]
    connect_groups: frozenset[str]
    connect: Verdict
    statements: tuple[StatementExplanation, ...]
    # Asked as an unmasked session (`--unmasked`): whether one may be had (ALLOW, or
    # REQUIRE_APPROVAL), or why not; the statements are then decided as in one.
    unmasked: Verdict | None = None

    @property
    def can_connect(self) -> bool:
        return self.connect.allowed

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "user": self.user,
            "groups": sorted(self.groups),
            "connect": {
                "allowed": self.connect.allowed,
                "connect_groups": sorted(self.connect_groups),
                "message": self.connect.message,
            },
            "statements": [s.to_dict() for s in self.statements],
            **(
                {
                    "unmasked": {
                        "effect": self.unmasked.effect.value,
                        "message": self.unmasked.message,
                    }
                }
                if self.unmasked is not None
                else {}
            ),
        }


def window_text(seconds: int | None) -> str:
    """`30m`, `1h`, `90s`; None (no window) is "one statement"."""
    if seconds is None:
        return "one statement"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def principal_for(groups: Iterable[str], user: str | None = None) -> Principal:
    """The principal the gateway would see for `user` (a label only) in `groups`."""
    groups = frozenset(g for g in groups if g)
    if user:
        label = user
    elif groups:
        label = "a member of " + ", ".join(sorted(groups))
    else:
        label = "a caller with no groups"
    return Principal(EXPLAIN_ISSUER, user or label, groups, display_name=label)


def explain(
    policy: CompiledPolicy,
    *,
    groups: Iterable[str],
    target: str,
    sql: str,
    user: str | None = None,
    unmasked: bool = False,
) -> Explanation:
    """Explain the verdict on each statement of `sql` for `groups` on `target` (`unmasked`:
    in an unmasked session, when the policy lets them have one).

    Raises `ExplainError` for an unknown target and for SQL that does not parse or holds
    no statement: there is no verdict to explain then (the gateway would refuse it).
    """
    if target not in policy.targets:
        known = ", ".join(sorted(policy.targets)) or "none"
        raise ExplainError(
            f'the policy has no target "{target}"', hint=f"targets in this policy: {known}"
        )
    principal = principal_for(groups, user)
    analysis = analyze(sql)
    if analysis.error is not None:
        raise ExplainError(
            f"cannot parse the SQL: {analysis.error}",
            hint="pass one or more complete SQL statements, quoted as one argument",
        )
    if not analysis.statements:
        raise ExplainError("the SQL holds no statement", hint='pass the statement, e.g. "SELECT 1"')
    connect = policy.can_connect(principal, target)
    unmask = policy.can_unmask(principal, target) if unmasked else None
    verdicts = policy.evaluate_analysis(
        principal,
        target,
        analysis,
        unmasked=unmask is not None and unmask.effect is not Effect.DENY,
    )
    spec = policy.targets[target]
    return Explanation(
        target=target,
        user=user,
        groups=principal.groups,
        connect_groups=spec.connect_groups,
        connect=connect,
        statements=tuple(
            _explain_one(policy, target, principal.groups, statement, verdict)
            for statement, verdict in zip(analysis.statements, verdicts, strict=True)
        ),
        unmasked=unmask,
    )


def _rules(policy: CompiledPolicy, rule_id: str) -> tuple[RuleRef, ...]:
    by_id = {rule.id: rule for rule in policy.rules}
    refs = []
    for part in rule_id.split(","):
        rule = by_id.get(part)
        if rule is not None:
            refs.append(RuleRef(rule.id, rule.description, built_in=False))
        elif part in _BUILT_IN:
            refs.append(RuleRef(part, _BUILT_IN[part], built_in=True))
        else:
            refs.append(RuleRef(part, _GUARDRAIL, built_in=True))
    return tuple(refs)


def _explain_one(
    policy: CompiledPolicy,
    target: str,
    groups: frozenset[str],
    statement: StatementAnalysis,
    verdict: Verdict,
) -> StatementExplanation:
    protected = policy.targets[target].protected_columns
    masks = tuple((str(c), protected.get(c, "?")) for c in verdict.masked_columns)
    rules = _rules(policy, verdict.rule_id)
    reasons: list[str] = []
    if verdict.effect is Effect.ALLOW:
        reasons.append(
            f"every operation ({', '.join(sorted(o.value for o in statement.operations))}) is"
            f" covered by {', '.join(r.id for r in rules)}"
        )
    elif verdict.effect is Effect.DENY:
        if verdict.rule_id == DEFAULT_DENY:
            reasons.append("no allow rule covers every operation of the statement")
        elif rules and rules[0].built_in:
            reasons.append(f"built-in guardrail {verdict.rule_id} (no policy can override it)")
        else:
            reasons.append(f"deny rule {verdict.rule_id} matches (any matching deny rule wins)")
    elif verdict.approval is not None:
        approval = verdict.approval
        approvers = ", ".join(sorted(approval.approver_groups))
        needed = approval.approvals_required
        who = (
            f"a member of {approvers} approves it"
            if needed == 1
            else f"{needed} different members of {approvers} approve it"
        )
        reasons.append(
            f"require_approval rule {verdict.rule_id} matches and no deny rule does: the"
            f" statement is held until {who}"
        )
        if not approval.approver_groups.isdisjoint(groups):
            reasons.append(
                "the requester is in an approver group but can never approve their own"
                " request: someone else must"
            )
        reasons.append(
            "an approval covers "
            + (
                f"the rule's statements in that session for {window_text(approval.window_seconds)}"
                if approval.window_seconds
                else "exactly this one statement"
            )
        )
    for column, mask in masks:
        reasons.append(f"{column} is protected: its values are returned masked ({mask})")
    return StatementExplanation(statement, verdict, rules, masks, tuple(reasons))
