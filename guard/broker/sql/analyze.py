"""SQL text -> `Analysis`: the entry point of the `sql` package (pure, no I/O).

Imports only pglast and the stdlib (through the `sql` modules). Parsing uses
`pglast.parser.parse_sql_json` and walks the JSON tree: parse + json.loads measured ~8 us
where `pglast.parse_sql` (Python AST) takes ~45 us for `SELECT abalance FROM
pgbench_accounts WHERE aid = $1`, and the whole analysis (~40 us) costs about what
parse_sql alone does. Results are cached by exact text in a bounded LRU (~0.1 us per hit)
because the same statements repeat on the proxy hot path.

pglast 8 parses with PostgreSQL 18's grammar; the server may be older. Syntax the server
does not know simply fails there, and newer keywords (e.g. MERGE ... RETURNING) are analysed
like any other statement.

Guarantees the policy engine relies on:

* unparseable text gives `Analysis(statements=(), error=...)`: nothing of it may run;
* every statement of a multi-statement string is analysed separately, with its own text
  (sliced at the parser's byte offsets) and fingerprint;
* a statement containing anything the walker does not model has `fail_closed` set, and so
  has one in which any column reference, function call or relation was not reached by the
  walk (a completeness check over the whole tree, so an unmodelled field cannot hide one);
* comments and string literals never count as SQL (the parser sees tokens, not text), so a
  `WHERE` hidden in a comment does not make an UPDATE restricted.
"""

from __future__ import annotations

import json
from functools import lru_cache

from pglast import parser

from .fingerprint import fingerprint, normalize
from .model import (
    FLAG_FAST_PATH,
    Analysis,
    ColumnContext,
    ColumnUse,
    Operation,
    RelationRef,
    StatementAnalysis,
)
from .nodes import unwrap
from .statements import analyze_statement

__all__ = [
    "Analysis",
    "ColumnContext",
    "ColumnUse",
    "Operation",
    "RelationRef",
    "StatementAnalysis",
    "analyze",
    "cache_clear",
    "cache_info",
    "fast_path_analysis",
    "normalize",
]

CACHE_SIZE = 8192
# Longer texts (bulk INSERT ... VALUES) are analysed every time rather than pinned in memory.
MAX_CACHED_TEXT = 64 * 1024


def _analyze(sql: str) -> Analysis:
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except parser.ParseError as exc:
        return Analysis(statements=(), error=str(exc))
    except RecursionError:
        return Analysis(statements=(), error="statement is nested too deeply to analyse")
    except Exception as exc:  # e.g. text that cannot be encoded: refuse, never guess
        return Analysis(statements=(), error=f"cannot parse statement: {type(exc).__name__}")
    raw = sql.encode("utf-8")
    statements: list[StatementAnalysis] = []
    for item in tree.get("stmts", []):
        start = int(item.get("stmt_location", 0))
        length = int(item.get("stmt_len", 0))  # 0 = up to the end of the string
        text = raw[start : start + length if length else None].decode("utf-8", "replace")
        text = text.strip()
        node = unwrap(item.get("stmt"))
        if node is None:
            continue
        statements.append(analyze_statement(node, text, fingerprint(text), normalize(text)))
    return Analysis(statements=tuple(statements))


_cached = lru_cache(maxsize=CACHE_SIZE)(_analyze)


def analyze(sql: str) -> Analysis:
    """Analyse a query string (one or more statements); cached by exact text."""
    if len(sql) > MAX_CACHED_TEXT:
        return _analyze(sql)
    return _cached(sql)


def cache_info() -> object:
    return _cached.cache_info()


def cache_clear() -> None:
    _cached.cache_clear()


# The built-in functions libpq calls through the fast path (its large-object API), by their
# pinned OIDs, which are the same in every PostgreSQL release that has them. Naming them lets
# the audit record say which call was refused; any other OID stays a bare number.
FAST_PATH_FUNCTIONS: dict[int, str] = {
    715: "pg_catalog.lo_create",
    764: "pg_catalog.lo_import",
    765: "pg_catalog.lo_export",
    767: "pg_catalog.lo_import",
    952: "pg_catalog.lo_open",
    953: "pg_catalog.lo_close",
    954: "pg_catalog.loread",
    955: "pg_catalog.lowrite",
    956: "pg_catalog.lo_lseek",
    957: "pg_catalog.lo_creat",
    958: "pg_catalog.lo_tell",
    964: "pg_catalog.lo_unlink",
    1004: "pg_catalog.lo_truncate",
    3170: "pg_catalog.lo_lseek64",
    3171: "pg_catalog.lo_tell64",
    3172: "pg_catalog.lo_truncate64",
}


def fast_path_analysis(function_oid: int) -> StatementAnalysis:
    """The analysis of a protocol-level FunctionCall (fast path), e.g. psql's \\lo_import.

    There is no SQL text, only a function OID. libpq's fast-path callers are its
    large-object functions, which the security contract refuses whatever the policy, and any
    other OID cannot be mapped to a function without the catalog: the policy engine's
    `guardrail:fast-path` refuses every call. Known OIDs are named for the audit record.
    """
    name = FAST_PATH_FUNCTIONS.get(function_oid)
    # No literal in it: the audit record's (normalized) statement says which call it was.
    text = f"<fast-path function call oid={function_oid}{f' {name}' if name else ''}>"
    return StatementAnalysis(
        text=text,
        command="FunctionCall",
        operations=frozenset({Operation.FUNCTION}),
        relations_read=frozenset(),
        relations_written=frozenset(),
        columns=(),
        functions=frozenset({name}) if name else frozenset(),
        flags=frozenset({FLAG_FAST_PATH}),
        fail_closed=None,
        fingerprint="",
        object_name=str(function_oid),
        normalized=text,
    )
