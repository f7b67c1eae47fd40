"""What an analysed SQL statement is: operations, relations, column lineage, flags.

Pure value types (frozen, slotted dataclasses and string enums) shared by the analyser and by
the policy engine. Imports only the stdlib: no parser, no I/O.

Identifiers are stored the way PostgreSQL folds them: unquoted names lowercased, quoted names
kept verbatim, `U&"..."` escapes decoded. The parser does the folding, so `"Customers"` and
`customers` are different relations here exactly as they are in the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Operation(StrEnum):
    """The kinds of effect a statement has; policies allow or deny these by name."""

    READ = "read"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    MERGE = "merge"
    DDL = "ddl"
    DCL = "dcl"
    TRANSACTION = "transaction"
    SESSION = "session"
    COPY = "copy"
    CALL = "call"
    DO = "do"
    EXPLAIN = "explain"
    PREPARE = "prepare"
    EXECUTE = "execute"
    LISTEN = "listen"
    NOTIFY = "notify"
    FUNCTION = "function"  # protocol-level fast-path FunctionCall
    UTILITY = "utility"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RelationRef:
    """A base relation as written in the statement (schema is None when unqualified)."""

    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


class ColumnContext(StrEnum):
    """How a column's value is used; only OUTPUT is a plain, maskable read.

    OUTPUT        the value itself leaves as a result column: a bare column, `*`, `t.*`, a
                  whole-row reference, `(c).col` or `c::text` in the top-level target list or
                  RETURNING (or passed through a subquery/CTE to such a place).
    DERIVED       the value feeds an expression, function, cast or aggregate: the result is
                  computed from it, so masking the output cell cannot hide it.
    PREDICATE     the value decides which rows come back or in which order (WHERE, JOIN ON,
                  HAVING, ORDER BY, GROUP BY, window PARTITION/ORDER, DISTINCT ON, LIMIT):
                  an oracle even when the value itself is never returned.
    WRITE_SOURCE  the value is copied into a table (INSERT ... SELECT, UPDATE SET, CREATE
                  TABLE AS): it would escape to a place the policy does not protect.
    """

    OUTPUT = "output"
    DERIVED = "derived"
    PREDICATE = "predicate"
    WRITE_SOURCE = "write_source"


@dataclass(frozen=True, slots=True)
class ColumnUse:
    """One use of a column; `column` is '*' for `*`, `t.*` and whole-row references.

    `candidates` are the base relations the reference could resolve to: the aliased relation
    when qualified; when not, PostgreSQL's search, level by level from the innermost query
    outward, stopping at the first level where some FROM item surely has the column (every
    item that may have it along the way stays a candidate: tables may have any column
    without the catalog); and, when the reference goes through a subquery, CTE or VALUES
    alias, the base relations behind that output column.
    """

    column: str
    candidates: frozenset[RelationRef]
    context: ColumnContext


@dataclass(frozen=True, slots=True)
class StatementAnalysis:
    """Everything the policy engine needs to know about one statement.

    `fail_closed` is set when the statement contains something the analyser does not model;
    such a statement must be refused. `object_name` names the prepared statement (PREPARE,
    EXECUTE, DEALLOCATE) or cursor (DECLARE, FETCH, MOVE, CLOSE) the statement acts on.
    `normalized` is the text with constants replaced by $n (for audit records).
    """

    text: str
    command: str
    operations: frozenset[Operation]
    relations_read: frozenset[RelationRef]
    relations_written: frozenset[RelationRef]
    columns: tuple[ColumnUse, ...]
    functions: frozenset[str]
    flags: frozenset[str]
    fail_closed: str | None
    fingerprint: str
    object_name: str | None = None
    normalized: str = ""


@dataclass(frozen=True, slots=True)
class Analysis:
    """The analysis of a query string; with `error` set, no statement of it may run."""

    statements: tuple[StatementAnalysis, ...]
    error: str | None = None


# Flags set by the analyser (the policy engine's guardrails key on these names).
FLAG_ROLE_SWITCH = "role_switch"
FLAG_SET_SEARCH_PATH = "set_search_path"
FLAG_ALTER_SYSTEM = "alter_system"
FLAG_TRUNCATE = "truncate"
FLAG_DYNAMIC_SQL = "dynamic_sql"
FLAG_EXECUTE_PREPARED = "execute_prepared"
FLAG_DECLARE_CURSOR = "declare_cursor"
FLAG_CURSOR_FETCH = "cursor_fetch"
FLAG_CURSOR_CLOSE = "cursor_close"
FLAG_COPY_TO_STDOUT = "copy_to_stdout"
FLAG_COPY_FROM_STDIN = "copy_from_stdin"
FLAG_COPY_FILE = "copy_file"
FLAG_COPY_PROGRAM = "copy_program"
FLAG_UPDATE_WITHOUT_WHERE = "update_without_where"
FLAG_DELETE_WITHOUT_WHERE = "delete_without_where"
FLAG_MERGE_UNRESTRICTED = "merge_unrestricted_update_delete"
FLAG_EXPLAIN_ANALYZE = "explain_analyze"
FLAG_FAST_PATH = "fast_path"
FLAG_LOCK = "lock"
FLAG_SESSION_RESET = "session_reset"
