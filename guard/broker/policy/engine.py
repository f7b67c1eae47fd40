"""Policy evaluation: statement analysis + principal + target -> `Verdict` (pure, fast).

Imports only the stdlib and the `policy`/`sql` models; no I/O, no mutable state, nothing
cached per principal, so one `CompiledPolicy` serves every session concurrently.

Semantics (IAM-style, independent of rule order):

1. The target must exist and the principal must be in its `connect_groups`.
2. Built-in guardrails (`policy.guardrails`) are checked first; policy cannot override them.
3. Rules apply when their `targets` include the target (or are not given) and their `groups`
   share a group with the principal (or are not given).
4. Any applicable **deny** rule whose conditions all hold -> DENY. Conditions are
   *triggers*: `operations` overlaps the statement's, `reads`/`writes` name a relation it
   reads/writes, `functions` names a function it calls.
5. Else any applicable **require_approval** rule whose conditions hold -> REQUIRE_APPROVAL.
6. Else ALLOW only if *every* operation of the statement is covered by an applicable
   **allow** rule: the rule lists that operation (or lists none) and its `reads`/`writes`/
   `functions`, when given, are upper bounds: every relation the statement reads/writes and
   every function it calls must be listed (so `writes: [public.products]` never lets a
   statement that also writes customers through). `INSERT ... SELECT` needs insert and read.
7. Otherwise DENY with rule id `default-deny`; an empty rule set denies everything.

When several rules of the deciding kind match, the first in file order names the verdict.
An ALLOW verdict lists the protected columns the statement returns (they are masked by the
database views and by the stream check).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from guard.broker.identity.principal import Principal
from guard.broker.policy import guardrails
from guard.broker.policy.model import (
    ApprovalRequirement,
    ColumnId,
    Effect,
    Rule,
    Target,
    Verdict,
    through_views,
)
from guard.broker.sql.model import Analysis, ColumnContext, Operation, StatementAnalysis

__all__ = [
    "ApprovalRequirement",
    "ColumnId",
    "CompiledPolicy",
    "Effect",
    "Rule",
    "Target",
    "Verdict",
]


def _triggers(rule: Rule, statement: StatementAnalysis) -> bool:
    """Deny/approval matching: every given condition touches the statement."""
    if rule.operations is not None and rule.operations.isdisjoint(statement.operations):
        return False
    if rule.reads is not None and not rule.reads.matching(statement.relations_read):
        return False
    if rule.writes is not None and not rule.writes.matching(statement.relations_written):
        return False
    if rule.functions is not None and not any(
        rule.functions.matches(f) for f in statement.functions
    ):
        return False
    return True


def _covers(rule: Rule, operation: Operation, statement: StatementAnalysis) -> bool:
    """Allow matching: the operation is listed and the statement stays within the lists."""
    if rule.operations is not None and operation not in rule.operations:
        return False
    if rule.reads is not None and not (
        statement.relations_read and all(map(rule.reads.matches, statement.relations_read))
    ):
        return False
    if rule.writes is not None and not (
        statement.relations_written and all(map(rule.writes.matches, statement.relations_written))
    ):
        return False
    if rule.functions is not None and not (
        statement.functions and all(map(rule.functions.matches, statement.functions))
    ):
        return False
    return True


def _coverage(allows: list[Rule], statement: StatementAnalysis) -> tuple[list[str], list[str]]:
    """(ids of the covering allow rules, names of the operations none covers).

    Operations are taken in order; each one's first covering rule is listed, once.
    """
    covering: list[str] = []
    uncovered: list[str] = []
    for operation in sorted(statement.operations):
        rule_ids = [r.id for r in allows if _covers(r, operation, statement)]
        if rule_ids:
            if rule_ids[0] not in covering:
                covering.append(rule_ids[0])
        else:
            uncovered.append(operation.value)
    return covering, uncovered


def masked_columns(statement: StatementAnalysis, target: Target) -> tuple[ColumnId, ...]:
    """Protected columns the statement returns as output (to be masked)."""
    found: set[ColumnId] = set()
    for use in statement.columns:
        if use.context is not ColumnContext.OUTPUT:
            continue
        for relation in use.candidates:
            for table in target.protected_tables_for(relation):
                if use.column == "*":
                    found.update(table.columns.values())
                elif use.column in table.columns:
                    found.add(table.columns[use.column])
    return tuple(sorted(found))


class CompiledPolicy:
    """An immutable, validated policy. Build it with `policy.compile.load_policy`."""

    __slots__ = ("version", "targets", "rules", "_by_target")

    def __init__(self, *, version: int, targets: Mapping[str, Target], rules: Sequence[Rule]):
        self.version = version
        self.targets: Mapping[str, Target] = MappingProxyType(dict(targets))
        self.rules: tuple[Rule, ...] = tuple(rules)
        # Per target and effect, the rules that can apply there (file order kept).
        by_target: dict[str, dict[Effect, tuple[Rule, ...]]] = {}
        for name in self.targets:
            mine = [r for r in self.rules if r.targets is None or name in r.targets]
            by_target[name] = {e: tuple(r for r in mine if r.effect is e) for e in Effect}
        self._by_target = MappingProxyType(by_target)

    def can_connect(self, principal: Principal, target_name: str) -> Verdict:
        target = self.targets.get(target_name)
        if target is None:
            return Verdict(
                Effect.DENY, "guardrail:unknown-target", f'guard: unknown target "{target_name}"'
            )
        if principal.groups.isdisjoint(target.connect_groups):
            return _not_a_member(
                "guardrail:connect",
                f'{principal.label} may not connect to target "{target_name}"',
                target.connect_groups,
            )
        return Verdict(Effect.ALLOW, f"target:{target_name}", "connection allowed")

    def can_unmask(self, principal: Principal, target_name: str) -> Verdict:
        """Whether `principal` may ask for an unmasked session on the target: ALLOW, or
        REQUIRE_APPROVAL (with the approval it needs), or DENY with the reason."""
        connect = self.can_connect(principal, target_name)
        if not connect.allowed:
            return connect
        access = self.targets[target_name].unmasked
        if access is None:
            return Verdict(
                Effect.DENY,
                "guardrail:unmasked",
                f'guard: target "{target_name}" allows no unmasked sessions'
                " (its policy has no unmasked_access)",
            )
        if principal.groups.isdisjoint(access.groups):
            return _not_a_member(
                "guardrail:unmasked",
                f'{principal.label} may not read "{target_name}" unmasked',
                access.groups,
            )
        if access.approval is not None:
            approvers = ", ".join(sorted(access.approval.approver_groups))
            return Verdict(
                Effect.REQUIRE_APPROVAL,
                "unmasked-access",
                f'guard: an unmasked session on "{target_name}" needs approval by'
                f" {access.approval.approvals_required} member(s) of {approvers}",
                approval=access.approval,
            )
        return Verdict(Effect.ALLOW, "unmasked-access", "unmasked access allowed")

    def evaluate(
        self,
        principal: Principal,
        target_name: str,
        statement: StatementAnalysis,
        *,
        unmasked: bool = False,
    ) -> Verdict:
        connect = self.can_connect(principal, target_name)
        if not connect.allowed:
            return connect
        target = self.targets[target_name]
        statement = through_views(statement)
        tripped = guardrails.check(statement, target, unmasked=unmasked)
        if tripped is not None:
            return tripped
        rules = self._by_target[target_name]
        groups = principal.groups
        for rule in rules[Effect.DENY]:
            if rule.applies_to(target_name, groups) and _triggers(rule, statement):
                reason = rule.description or "denied by policy"
                return guardrails.refusal(rule.id, reason)
        for rule in rules[Effect.REQUIRE_APPROVAL]:
            if rule.applies_to(target_name, groups) and _triggers(rule, statement):
                return self._approval(rule, statement, target)
        allows = [r for r in rules[Effect.ALLOW] if r.applies_to(target_name, groups)]
        covering, uncovered = _coverage(allows, statement)
        if uncovered or not statement.operations:
            what = ", ".join(uncovered) or "this statement"
            return guardrails.refusal(
                "default-deny",
                f'no policy rule allows {what} for {principal.label} on target "{target_name}"',
            )
        return Verdict(
            Effect.ALLOW,
            ",".join(covering),
            f"allowed by {', '.join(covering)}",
            masked_columns=masked_columns(statement, target),
        )

    def evaluate_analysis(
        self,
        principal: Principal,
        target_name: str,
        analysis: Analysis,
        *,
        unmasked: bool = False,
    ) -> tuple[Verdict, ...]:
        """One verdict per statement; a parse error gives a single deny. `unmasked`: the
        session reads protected columns raw (see `guardrails.check`)."""
        if analysis.error is not None:
            return (
                guardrails.refusal(
                    "guardrail:unparseable", f"guard cannot parse this SQL: {analysis.error}"
                ),
            )
        return tuple(
            self.evaluate(principal, target_name, s, unmasked=unmasked) for s in analysis.statements
        )

    @staticmethod
    def _approval(rule: Rule, statement: StatementAnalysis, target: Target) -> Verdict:
        if rule.reads is not None:
            tables = sorted({str(r) for r in rule.reads.matching(statement.relations_read)})
            what = "reading " + ", ".join(_qualified(t, rule) for t in tables)
        elif rule.writes is not None:
            tables = sorted({str(r) for r in rule.writes.matching(statement.relations_written)})
            what = "writing " + ", ".join(_qualified(t, rule) for t in tables)
        else:
            what = "this statement"
        approvers = ", ".join(sorted(rule.approval.approver_groups)) if rule.approval else "?"
        return Verdict(
            Effect.REQUIRE_APPROVAL,
            rule.id,
            f'guard: {what} requires approval (rule "{rule.id}") by a member of {approvers}',
            masked_columns=masked_columns(statement, target),
            approval=rule.approval,
        )


def _not_a_member(rule_id: str, what: str, groups: frozenset[str]) -> Verdict:
    return Verdict(
        Effect.DENY,
        rule_id,
        f"guard: {what} (requires membership in one of: {', '.join(sorted(groups))})",
    )


def _qualified(name: str, rule: Rule) -> str:
    """Name a matched relation as the policy does (schema-qualified)."""
    if "." in name:
        return name
    tables = (rule.reads.tables if rule.reads else frozenset()) | (
        rule.writes.tables if rule.writes else frozenset()
    )
    schemas = sorted(s for s, t in tables if t == name)
    return f"{schemas[0]}.{name}" if schemas else name
