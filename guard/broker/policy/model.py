"""Compiled policy values: verdicts, targets, rules and their matching (pure, immutable).

Imports only the stdlib and `sql.model`. Everything here is built once by `policy.compile`
and only read afterwards, so evaluation can share it across sessions and threads.

Relation matching is conservative on purpose: a statement's unqualified `customers` may
resolve to any schema through search_path, so it matches a policy's `public.customers`
(and any other `<schema>.customers`). Names compare exactly as PostgreSQL stores them
(lowercase unless created quoted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from guard.broker.sql.model import Operation, RelationRef, StatementAnalysis

# The schemas of the database backstop (`masking.objects` creates them): each relation
# there is a view standing for the protected or gated table of the same name.
MASKED_SCHEMA = "guard_masked"
UNMASKED_SCHEMA = "guard_unmasked"
BACKSTOP_SCHEMAS = frozenset({MASKED_SCHEMA, UNMASKED_SCHEMA})


def policy_ref(relation: RelationRef) -> RelationRef:
    """`relation` as the policy matches it: a view of the backstop's schemas is its table,
    in whichever schema (unqualified, so it matches conservatively). Spelling
    `guard_masked.accounts` must not step around a rule on `public.accounts`, and
    `guard_unmasked.customers.ssn` is still a protected column to the guardrails."""
    if relation.schema in BACKSTOP_SCHEMAS:
        return RelationRef(None, relation.name)
    return relation


def through_views(statement: StatementAnalysis) -> StatementAnalysis:
    """`statement` with its relations (and its columns' candidate relations) as
    `policy_ref` makes them; the same object when it names no backstop view."""
    if not any(r.schema in BACKSTOP_SCHEMAS for r in statement.relations_read) and not any(
        r.schema in BACKSTOP_SCHEMAS for r in statement.relations_written
    ):
        return statement
    return replace(
        statement,
        relations_read=frozenset(map(policy_ref, statement.relations_read)),
        relations_written=frozenset(map(policy_ref, statement.relations_written)),
        columns=tuple(
            replace(use, candidates=frozenset(map(policy_ref, use.candidates)))
            for use in statement.columns
        ),
    )


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


@dataclass(frozen=True, slots=True, order=True)
class ColumnId:
    """A protected base column, e.g. public.customers.ssn."""

    schema: str
    table: str
    column: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"

    @property
    def short(self) -> str:
        """`customers.ssn`: how messages name the column."""
        return f"{self.table}.{self.column}"


@dataclass(frozen=True, slots=True)
class ApprovalRequirement:
    approver_groups: frozenset[str]
    approvals_required: int
    window_seconds: int | None  # None: the approval covers one statement


@dataclass(frozen=True, slots=True)
class UnmaskedAccess:
    """Who may ask for a session that reads the target's protected columns raw, whether
    approvers must agree first, and how long such a session may last at most."""

    groups: frozenset[str]
    approval: ApprovalRequirement | None
    max_ttl_seconds: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision on one statement (or connection); `message` is client-facing."""

    effect: Effect
    rule_id: str
    message: str
    masked_columns: tuple[ColumnId, ...] = ()
    approval: ApprovalRequirement | None = None

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW


@dataclass(frozen=True, slots=True)
class TableSet:
    """Schema-qualified tables named by a rule, indexed by table name for matching."""

    tables: frozenset[tuple[str, str]]
    _by_name: Mapping[str, frozenset[str]] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def of(cls, tables: Iterable[tuple[str, str]]) -> TableSet:
        tables = tuple(tables)
        by_name: dict[str, set[str]] = {}
        for schema, table in tables:
            by_name.setdefault(table, set()).add(schema)
        frozen = {name: frozenset(schemas) for name, schemas in by_name.items()}
        return cls(frozenset(tables), frozen)

    def matches(self, relation: RelationRef) -> bool:
        schemas = self._by_name.get(relation.name)
        return schemas is not None and (relation.schema is None or relation.schema in schemas)

    def matching(self, relations: Iterable[RelationRef]) -> list[RelationRef]:
        return [r for r in relations if self.matches(r)]


@dataclass(frozen=True, slots=True)
class FunctionSet:
    """Function names named by a rule: `name` (any schema) or `schema.name`."""

    names: frozenset[str]

    def matches(self, function: str) -> bool:
        if function in self.names:
            return True
        schema, _, base = function.rpartition(".")
        if base in self.names:  # a bare policy name matches in every schema
            return True
        # An unqualified call may resolve to any schema's function of that name.
        return not schema and any(n.rpartition(".")[2] == base for n in self.names)


@dataclass(frozen=True, slots=True)
class ProtectedTable:
    schema: str
    table: str
    columns: Mapping[str, ColumnId]


@dataclass(frozen=True, slots=True)
class Target:
    """A database target: who may connect, for how long, and what it protects."""

    name: str
    description: str
    connect_groups: frozenset[str]
    default_ttl_seconds: int
    max_ttl_seconds: int
    protected_columns: Mapping[ColumnId, str]  # column -> mask strategy name
    gated_tables: frozenset[tuple[str, str]]
    # At most this many database connections per session: the issued role's CONNECTION
    # LIMIT, and the gateway's own count of a session's connections.
    max_connections_per_session: int = 20
    # Sessions last no longer than their holder's ID token unless a fresh one comes.
    reauthenticate: bool = False
    # `guard exec` extends its session while its program runs, up to the maximum.
    auto_extend: bool = False
    # Sessions that read protected columns raw (`--unmasked`); None: none may.
    unmasked: UnmaskedAccess | None = None
    _protected_by_name: Mapping[str, tuple[ProtectedTable, ...]] = field(
        repr=False, compare=False, default_factory=dict
    )

    def protected_tables_for(self, relation: RelationRef) -> tuple[ProtectedTable, ...]:
        """Protected tables `relation` may denote (every schema when it is unqualified)."""
        found = self._protected_by_name.get(relation.name, ())
        if relation.schema is None:
            return found
        return tuple(t for t in found if t.schema == relation.schema)

    def masked_tables(self) -> frozenset[tuple[str, str]]:
        """(schema, table) of every table with a view in the masking schema: the protected
        tables (masking views) and the gated ones (gate views)."""
        return frozenset({(c.schema, c.table) for c in self.protected_columns}) | self.gated_tables

    def session_ttl(self, requested_seconds: int | None = None) -> int:
        """The TTL to grant: the request (or the default), never above the maximum."""
        wanted = self.default_ttl_seconds if requested_seconds is None else requested_seconds
        return max(1, min(wanted, self.max_ttl_seconds))


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule. None for a condition means "not given" (matches everything)."""

    id: str
    description: str
    effect: Effect
    targets: frozenset[str] | None
    groups: frozenset[str] | None
    operations: frozenset[Operation] | None
    reads: TableSet | None
    writes: TableSet | None
    functions: FunctionSet | None
    approval: ApprovalRequirement | None

    def applies_to(self, target: str, groups: frozenset[str]) -> bool:
        return (self.targets is None or target in self.targets) and (
            self.groups is None or not self.groups.isdisjoint(groups)
        )
