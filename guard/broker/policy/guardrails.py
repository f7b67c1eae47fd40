"""Built-in guardrails: refusals no policy can override, checked before any rule.

Imports only the stdlib and the `policy`/`sql` models. Each guardrail is a deny with id
`guardrail:<name>` and a message telling the client what was refused and why. They cover
what the contract says must never take effect whatever the policy (role switching, server
files, large objects, dblink, unrestricted UPDATE/DELETE/MERGE, ...) and what guard cannot
see into (dynamic SQL, the fast path, SQL-level EXECUTE), plus derived use of protected
columns, which masking of output cells cannot make safe.

Function names are matched on their last component in any schema: a function with a
dangerous name in a user schema is refused too, which is the conservative error.
"""

from __future__ import annotations

from collections.abc import Iterator

from guard.broker.policy.model import ColumnId, Effect, Target, Verdict
from guard.broker.sql import model as sql
from guard.broker.sql.model import ColumnContext, Operation, StatementAnalysis
from guard.broker.sql.nodes import DYNAMIC_SQL_FUNCTIONS

# Server-side file access (read files, list directories, stat files as the server user).
SERVER_FILE_FUNCTIONS = frozenset(
    {"pg_read_file", "pg_read_binary_file", "pg_stat_file", "pg_ls_dir", "pg_logdir_ls"}
)
SERVER_FILE_PREFIXES = ("pg_ls_", "pg_file_")  # pg_ls_waldir/logdir/tmpdir..., adminpack
# Large objects live outside every table: a copy of a protected value there is unprotected.
LARGE_OBJECT_FUNCTIONS = frozenset({"loread", "lowrite"})
LARGE_OBJECT_PREFIXES = ("lo_",)
# dblink opens a second connection that guard does not see.
DBLINK_PREFIXES = ("dblink",)

DERIVED_CONTEXTS = frozenset(
    {ColumnContext.DERIVED, ColumnContext.PREDICATE, ColumnContext.WRITE_SOURCE}
)
_CONTEXT_WORDS = {
    ColumnContext.DERIVED: "an expression",
    ColumnContext.PREDICATE: "a filter, join, sort or grouping",
    ColumnContext.WRITE_SOURCE: "a value written to a table",
}


# In an unmasked session (`Target.unmasked`), protected values may feed expressions only in
# a statement that reads and calls nothing but these built-ins: pure functions of their
# arguments. A user function, a write or a notification could carry a raw value to a table
# or a listener that masked sessions read; a copy into a table is refused in any case.
UNMASKED_DERIVED_FUNCTIONS = frozenset(
    """
    lower upper initcap trim btrim ltrim rtrim lpad rpad substr substring left right length
    char_length octet_length replace translate reverse split_part strpos position
    starts_with concat concat_ws format regexp_replace regexp_match regexp_matches
    regexp_like regexp_count regexp_substr md5 sha256 to_char to_date to_number
    to_timestamp date_trunc date_part extract age abs round trunc floor ceil ceiling mod
    count min max sum avg array_agg string_agg bool_and bool_or every nullif greatest
    least row_number rank dense_rank lag lead first_value last_value now current_date
    """.split()
)
_UNMASKED_PURE_OPERATIONS = frozenset({Operation.READ, Operation.EXPLAIN, Operation.COPY})


_UNMASKED_WORDS = {
    ColumnContext.DERIVED: "used in a statement that writes or calls a function other than"
    " a pure built-in",
    ColumnContext.WRITE_SOURCE: "copied into a table",
}


def refusal(rule_id: str, reason: str) -> Verdict:
    return Verdict(Effect.DENY, rule_id, f'guard: statement refused by rule "{rule_id}": {reason}')


def _base(function: str) -> str:
    return function.rpartition(".")[2]


def _matching(
    functions: frozenset[str], names: frozenset[str], prefixes: tuple[str, ...]
) -> str | None:
    for function in sorted(functions):
        base = _base(function)
        if base in names or base.startswith(prefixes):
            return function
    return None


def derived_protected_uses(
    statement: StatementAnalysis, target: Target
) -> Iterator[tuple[ColumnId, ColumnContext]]:
    """Protected columns the statement uses other than as plain output.

    A keyed_hash column may also decide rows (WHERE, JOIN ON, GROUP BY, ORDER BY): the
    view hands out keyed digests, so a filter compares digests and learns nothing a read
    does not show, and equality joins on the digest are what the strategy is for."""
    for use in statement.columns:
        if use.context not in DERIVED_CONTEXTS:
            continue
        joinable = use.context is ColumnContext.PREDICATE
        for relation in use.candidates:
            for table in target.protected_tables_for(relation):
                if use.column == "*":
                    columns = list(table.columns.values())
                elif use.column in table.columns:
                    columns = [table.columns[use.column]]
                else:
                    continue
                for column in columns:
                    if joinable and target.protected_columns.get(column) == "keyed_hash":
                        continue
                    yield column, use.context


def _unmasked_derived(
    statement: StatementAnalysis, derived: list[tuple[ColumnId, ColumnContext]]
) -> list[tuple[ColumnId, ColumnContext]]:
    """The derived uses an unmasked session may still not make (see
    UNMASKED_DERIVED_FUNCTIONS): every copy into a table; filters, joins and sorting
    decide rows only, so they pass; expressions pass in a pure read of pure built-ins."""
    pure = (
        statement.operations <= _UNMASKED_PURE_OPERATIONS
        and not statement.relations_written
        and all(
            _base(f) in UNMASKED_DERIVED_FUNCTIONS and f.rpartition(".")[0] in ("", "pg_catalog")
            for f in statement.functions
        )
    )
    return [
        (column, context)
        for column, context in derived
        if context is ColumnContext.WRITE_SOURCE or (context is ColumnContext.DERIVED and not pure)
    ]


def check(  # noqa: C901 - an ordered flat table of guardrails; the first one tripped wins
    statement: StatementAnalysis, target: Target, *, unmasked: bool = False
) -> Verdict | None:
    """The first guardrail the statement trips, or None. In an `unmasked` session the
    protected columns read raw, and derived use is refused only where a raw value could
    leave guard's sight (`_unmasked_derived`)."""
    flags = statement.flags
    if statement.fail_closed is not None:
        return refusal(
            "guardrail:unanalysable",
            f"guard cannot analyse this statement safely ({statement.fail_closed})",
        )
    if Operation.FUNCTION in statement.operations or sql.FLAG_FAST_PATH in flags:
        return refusal(
            "guardrail:fast-path",
            "fast-path function calls (e.g. psql \\lo_import) are not allowed; use SQL",
        )
    if sql.FLAG_ROLE_SWITCH in flags:
        return refusal(
            "guardrail:role-switch",
            "changing the role or session authorization (SET ROLE, SET SESSION AUTHORIZATION,"
            " set_config('role', ...), ALTER ROLE) is not allowed through guard",
        )
    if sql.FLAG_ALTER_SYSTEM in flags:
        return refusal("guardrail:alter-system", "ALTER SYSTEM is not allowed through guard")
    if sql.FLAG_COPY_FILE in flags or sql.FLAG_COPY_PROGRAM in flags:
        return refusal(
            "guardrail:server-copy",
            "COPY to or from a server file or program is not allowed; use COPY ... STDIN/STDOUT",
        )
    functions = statement.functions
    if found := _matching(functions, SERVER_FILE_FUNCTIONS, SERVER_FILE_PREFIXES):
        return refusal(
            "guardrail:server-file-access", f"server file access ({found}) is not allowed"
        )
    if found := _matching(functions, frozenset(), DBLINK_PREFIXES):
        return refusal("guardrail:dblink", f"dblink ({found}) is not allowed")
    if found := _matching(functions, LARGE_OBJECT_FUNCTIONS, LARGE_OBJECT_PREFIXES):
        return refusal(
            "guardrail:large-object", f"large object functions ({found}) are not allowed"
        )
    dynamic = _matching(functions, DYNAMIC_SQL_FUNCTIONS, ())
    if sql.FLAG_DYNAMIC_SQL in flags or dynamic:
        if dynamic:
            what = f"{dynamic}() runs SQL given as a string"
        elif Operation.DO in statement.operations:
            what = "a DO block runs PL/pgSQL"
        else:
            what = "this statement runs SQL given as a string"
        return refusal(
            "guardrail:dynamic-sql",
            f"{what}, which guard cannot analyse; send the statements themselves",
        )
    if sql.FLAG_EXECUTE_PREPARED in flags:
        return refusal(
            "guardrail:sql-execute",
            "SQL-level EXECUTE of a prepared statement is not supported;"
            " use protocol-level prepared statements (your driver's prepare/execute)",
        )
    if sql.FLAG_UPDATE_WITHOUT_WHERE in flags:
        return refusal(
            "guardrail:update-without-where", "UPDATE without a WHERE clause is not allowed"
        )
    if sql.FLAG_DELETE_WITHOUT_WHERE in flags:
        return refusal(
            "guardrail:delete-without-where", "DELETE without a WHERE clause is not allowed"
        )
    if sql.FLAG_MERGE_UNRESTRICTED in flags:
        return refusal(
            "guardrail:merge-unrestricted",
            "MERGE ... WHEN MATCHED THEN UPDATE/DELETE needs an AND condition restricting it",
        )
    derived = sorted(set(derived_protected_uses(statement, target)))
    if derived and unmasked:
        derived = _unmasked_derived(statement, derived)
        if derived:
            shorts = sorted({c.short for c, _ in derived})
            return refusal(
                "guardrail:unmasked-copy",
                f"{', '.join(shorts)} read unmasked may not be {_UNMASKED_WORDS[derived[0][1]]}"
                ": a raw protected value must not reach a table, a notification or a"
                " function guard cannot see into. Read it, filter or sort by it, or use"
                " built-in functions on it in a plain SELECT",
            )
        return None
    if derived:
        column, context = derived[0]
        shorts = sorted({c.short for c, _ in derived})
        noun = "protected column" if len(shorts) == 1 else "protected columns"
        verb = "is" if len(shorts) == 1 else "are"
        return refusal(
            "guardrail:protected-column-derived",
            f"{noun} {', '.join(shorts)} {verb} used in {_CONTEXT_WORDS[context]}; derived use of"
            " protected columns (expressions, functions, casts, aggregates, filters, sorting,"
            " grouping, copies) is refused until deeper masking lands. Selecting the column"
            " itself returns its masked value",
        )
    return None
