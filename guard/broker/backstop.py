"""A target's database backstop against the live catalog: the statements, applying them,
and checking them as the issued role would see them (issue 16, DESIGN §3).

Does I/O: psycopg on the target's admin connection (`targets.<name>.admin_dsn_file`). The
SQL itself comes from `masking.objects` (pure); this module reads the catalog facts it
needs, finds the views that read protected data (their masked twins), and checks what is
there. `check` only reads the catalog (no locks beyond catalog reads), so the broker runs it
before it issues credentials for a target: a session must not start on a database whose
masking has drifted (a view dropped by a migration, a grant added by hand).

Checks, each the attack it stops when it fails:
* no protected column and no gated table is readable by the session group (directly, or
  through PUBLIC): the raw value, and pg_stats' histograms of it;
* each protected/gated table has its masking view: owned by guard's owner role, readable
  by the session group, the table's columns in order, each protected column an expression
  (never the bare column), a gated table's view a security barrier calling the approval
  check;
* each view of the target that reads protected data has its masked twin, and no twin reads
  a protected base table;
* no SECURITY DEFINER function outside the allow-list runs with the rights of a role that
  can read protected data while the session group may execute it (`customer_ssn()`);
* the session group may not create temporary tables (a place to copy raw values to).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guard.broker.errors import DependencyUnavailable, NotFound
from guard.broker.masking.objects import (
    GROUP_ROLE,
    MASKED_SCHEMA,
    OWNER_ROLE,
    TWIN_COMMENT_PREFIX,
    UNMASKED_ROLE,
    UNMASKED_SCHEMA,
    TableColumns,
    ViewTwin,
    backstop_sql,
    qualified,
    twin_original,
)
from guard.broker.sql.redirect import redirect

if TYPE_CHECKING:
    import psycopg

    from guard.broker.policy.engine import CompiledPolicy
    from guard.broker.policy.model import Target
    from guard.broker.settings import TargetSettings

log = logging.getLogger(__name__)

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_TABLES = """
SELECT n.nspname, c.relname FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'guard_masked', 'guard_unmasked')
  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
ORDER BY 1, 2
"""
# Views and materialized views that read the given tables, directly or through other views,
# shallowest first (a twin is created after the twins it reads), with their definitions.
# pg_get_viewdef qualifies every relation not visible on the search_path: run with only
# pg_catalog on it, every user relation comes out schema-qualified, ready for redirection.
_DEPENDENT_VIEWS = """
WITH RECURSIVE base(oid) AS (
  SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n
    ON n.oid = c.relnamespace
  WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
), deps(oid, depth) AS (
  SELECT r.ev_class, 1 FROM pg_catalog.pg_depend d
  JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
  WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass
    AND d.refclassid = 'pg_catalog.pg_class'::regclass
    AND d.refobjid IN (SELECT oid FROM base) AND r.ev_class <> d.refobjid
  UNION
  SELECT r.ev_class, deps.depth + 1 FROM deps
  JOIN pg_catalog.pg_depend d ON d.refobjid = deps.oid
   AND d.classid = 'pg_catalog.pg_rewrite'::regclass
   AND d.refclassid = 'pg_catalog.pg_class'::regclass
  JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
  WHERE r.ev_class <> deps.oid AND deps.depth < 32
)
SELECT n.nspname, c.relname, pg_catalog.pg_get_viewdef(c.oid), max(deps.depth) AS depth
FROM deps JOIN pg_catalog.pg_class c ON c.oid = deps.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'guard_masked', 'guard_unmasked')
GROUP BY c.oid, n.nspname, c.relname
ORDER BY depth, 1, 2
"""
# SECURITY DEFINER functions the session group may execute whose owner can read a protected
# column or a gated table (a superuser can read everything): each returns what its owner
# reads, to anyone who calls it.
_DEFINER_FUNCTIONS = """
SELECT p.oid::pg_catalog.regprocedure::text
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.prosecdef
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'guard_masked')
  AND pg_catalog.has_function_privilege(%(group)s, p.oid, 'EXECUTE')
  AND (EXISTS (SELECT 1 FROM unnest(%(cols_t)s::text[], %(cols_c)s::text[]) AS x(t, c)
               WHERE pg_catalog.has_column_privilege(p.proowner, x.t, x.c, 'SELECT'))
       OR EXISTS (SELECT 1 FROM unnest(%(gated)s::text[]) AS g(t)
               WHERE pg_catalog.has_table_privilege(p.proowner, g.t, 'SELECT')))
ORDER BY 1
"""


@dataclass(frozen=True, slots=True)
class Drift:
    """One way the database differs from what the policy needs: the object, the problem."""

    object: str
    problem: str

    def __str__(self) -> str:
        return f"{self.object}: {self.problem}"


@dataclass(frozen=True, slots=True)
class Facts:
    """What the backstop is built from, read from the live catalog."""

    tables: dict[tuple[str, str], TableColumns]
    all_tables: list[tuple[str, str]]
    database: str
    twins: list[ViewTwin]
    untwinned: list[str]  # views reading protected data whose twin could not be made
    definer_functions: list[str]
    # The raw twins of `guard_unmasked` (the same views, read through the raw views), when
    # the policy allows unmasked sessions.
    unmasked_twins: list[ViewTwin]


def _column_lists(target: Target) -> dict[str, list[str]]:
    cols = sorted(target.protected_columns)
    return {
        "cols_t": [qualified(c.schema, c.table) for c in cols],
        "cols_c": [c.column for c in cols],
        "gated": [qualified(s, t) for s, t in sorted(target.gated_tables)],
    }


def dependent_views(
    conn: psycopg.Connection[Any], special: frozenset[tuple[str, str]]
) -> list[tuple[Any, ...]]:
    """The views and materialized views that read `special` relations, shallowest first,
    with their definitions fully qualified (one catalog read serves every twin schema)."""
    if not special:
        return []
    schemas, names = zip(*sorted(special), strict=True)
    with _qualified_names(conn):
        return _rows(conn, _DEPENDENT_VIEWS, (list(schemas), list(names)))


def view_twins(
    views: list[tuple[Any, ...]],
    special: frozenset[tuple[str, str]],
    masked: str = MASKED_SCHEMA,
) -> tuple[list[ViewTwin], list[str]]:
    """The twins in schema `masked` of `views` (`dependent_views`), and the views that get
    none (their definition could not be redirected: they stay unreadable, fail closed)."""
    twins: list[ViewTwin] = []
    untwinned: list[str] = []
    redirected = frozenset(special)
    for schema, name, definition, _depth in views:
        result = redirect(definition, redirected, masked)
        if result is None or result.refusal is not None:
            untwinned.append(f"{schema}.{name}")
            continue
        twins.append(ViewTwin(schema, name, result.text))
        redirected |= {(schema, name)}  # views of this view read its twin
    return twins, untwinned


def definer_functions(conn: psycopg.Connection[Any], target: Target) -> list[str]:
    # Before the first apply the group does not exist yet: PUBLIC's rights are its own then.
    params = {"group": GROUP_ROLE if _group_exists(conn) else "public", **_column_lists(target)}
    with _qualified_names(conn):  # regprocedure text fully qualified
        return [row[0] for row in _rows(conn, _DEFINER_FUNCTIONS, params)]


@contextlib.contextmanager
def _qualified_names(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Only pg_catalog on the search_path, for this transaction's catalog reads inside:
    pg_get_viewdef and regprocedure text then qualify every user relation and function."""
    conn.execute("SET LOCAL search_path = pg_catalog")
    try:
        yield
    finally:
        conn.execute("RESET search_path")


def _group_exists(conn: psycopg.Connection[Any]) -> bool:
    return bool(_rows(conn, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (GROUP_ROLE,)))


def read_facts(conn: psycopg.Connection[Any], target: Target) -> Facts:
    tables = {}
    for schema, table in sorted(target.masked_tables()):
        cols = conn.execute(_COLUMNS, (schema, table)).fetchall()
        tables[(schema, table)] = TableColumns(schema, table, tuple((n, t) for n, t in cols))
    all_tables = [(s, t) for s, t in conn.execute(_TABLES).fetchall()]
    special = target.masked_tables()
    views = dependent_views(conn, special)
    twins, untwinned = view_twins(views, special)
    raw_twins: list[ViewTwin] = []
    if target.unmasked is not None:
        raw_twins, _ = view_twins(views, special, UNMASKED_SCHEMA)
    return Facts(
        tables=tables,
        all_tables=all_tables,
        database=conn.info.dbname,
        twins=twins,
        untwinned=untwinned,
        definer_functions=definer_functions(conn, target),
        unmasked_twins=raw_twins,
    )


def statements(
    conn: psycopg.Connection[Any],
    target: Target,
    *,
    definer_allowed: Sequence[str] = (),
    facts: Facts | None = None,
) -> list[str]:
    """What `apply` runs, from the policy and the live catalog (raises ValueError when the
    policy names a table or column the database lacks). `facts`: already read."""
    if facts is None:
        facts = read_facts(conn, target)
    revoke = [f for f in facts.definer_functions if f not in definer_allowed]
    return backstop_sql(
        target,
        facts.tables,
        all_tables=facts.all_tables,
        database=facts.database,
        view_twins=facts.twins,
        unmasked_twins=facts.unmasked_twins,
        revoke_functions=revoke,
    )


def apply(
    conn: psycopg.Connection[Any], target: Target, *, definer_allowed: Sequence[str] = ()
) -> list[str]:
    """Create or refresh the backstop in one transaction; the statements run."""
    with conn.transaction():
        planned = statements(conn, target, definer_allowed=definer_allowed)
        for statement in planned:
            conn.execute(statement)  # type: ignore[arg-type]  # generated SQL text
    return planned


# What the backstop governs, as (object, property, value): the guard roles, every relation
# of the masking schema and the protected/gated tables (kind, owner, rights, options, a
# view's definition), the rights on those tables' columns, and who may execute which
# SECURITY DEFINER function. Names, never OIDs: a view re-created the same compares equal.
_STATE = """
SELECT 'role ' || r.rolname, 'login', r.rolcanlogin::text
FROM pg_catalog.pg_roles r WHERE r.rolname IN (%(owner)s, %(group)s, %(unmasked_role)s)
UNION ALL
SELECT 'relation ' || n.nspname || '.' || c.relname, p.name, p.value
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace,
LATERAL (VALUES ('kind', c.relkind::text),
                ('owner', pg_catalog.pg_get_userbyid(c.relowner)::text),
                ('rights', coalesce(c.relacl::text, '-')),
                ('options', coalesce(c.reloptions::text, '-')),
                ('definition', CASE WHEN c.relkind = 'v'
                                    THEN pg_catalog.pg_get_viewdef(c.oid) ELSE '-' END)
        ) AS p(name, value)
WHERE n.nspname IN (%(masked)s, %(unmasked)s)
   OR (n.nspname, c.relname) IN (SELECT * FROM unnest(%(schemas)s::text[], %(tables)s::text[]))
UNION ALL
SELECT 'column ' || n.nspname || '.' || c.relname || '.' || a.attname, 'rights',
       coalesce(a.attacl::text, '-')
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND (n.nspname, c.relname) IN (SELECT * FROM unnest(%(schemas)s::text[], %(tables)s::text[]))
UNION ALL
SELECT 'function ' || p.oid::pg_catalog.regprocedure::text, 'rights', coalesce(p.proacl::text, '-')
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
"""


def _state(conn: psycopg.Connection[Any], target: Target) -> dict[str, dict[str, str]]:
    special = sorted(target.masked_tables())
    params = {
        "owner": OWNER_ROLE,
        "group": GROUP_ROLE,
        "masked": MASKED_SCHEMA,
        "unmasked": UNMASKED_SCHEMA,
        "unmasked_role": UNMASKED_ROLE,
        "schemas": [schema for schema, _ in special],
        "tables": [table for _, table in special],
    }
    state: dict[str, dict[str, str]] = {}
    for key, name, value in _rows(conn, _STATE, params):
        state.setdefault(key, {})[name] = value
    return state


def plan_changes(
    conn: psycopg.Connection[Any],
    target: Target,
    *,
    definer_allowed: Sequence[str] = (),
    facts: Facts | None = None,
) -> tuple[list[str], list[str]]:
    """What an apply would change, object by object (`+` created, `-` removed, `~` the
    properties that change), and its statements: they run in a transaction rolled back, and
    the catalog is compared before and after. Waits at most 5 s for a lock (a masking view
    in use by a long query) and then fails rather than block sessions."""
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL lock_timeout = '5s'")
        before = _state(conn, target)
        planned = statements(conn, target, definer_allowed=definer_allowed, facts=facts)
        for statement in planned:
            conn.execute(statement)  # type: ignore[arg-type]  # generated SQL text
        after = _state(conn, target)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old is None:
            changes.append(f"+ {key}")
        elif new is None:
            changes.append(f"- {key}")
        elif old != new:
            changed = [
                f"{name} {_short(old.get(name))} → {_short(new.get(name))}"
                for name in sorted(old.keys() | new.keys())
                if old.get(name) != new.get(name)
            ]
            changes.append(f"~ {key}: {'; '.join(changed)}")
    return changes, planned


def _short(text: str | None, limit: int = 80) -> str:
    flat = " ".join((text or "(none)").split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


# -- check -------------------------------------------------------------------------------------


def _rows(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def _view_targets(definition: str) -> dict[str, bool]:
    """Output column name → whether it is a bare column reference, from a view's SQL."""
    from pglast import parser

    tree = json.loads(parser.parse_sql_json(definition))
    select = tree["stmts"][0]["stmt"]["SelectStmt"]
    out: dict[str, bool] = {}
    for item in select.get("targetList", []):
        target = item["ResTarget"]
        value = target.get("val", {})
        ref = value.get("ColumnRef")
        name = target.get("name")
        if name is None and ref is not None:
            name = ref["fields"][-1].get("String", {}).get("sval")
        if name is not None:
            out[name] = ref is not None
    return out


def _check_view(
    conn: psycopg.Connection[Any], facts: TableColumns, masked_columns: set[str], gated: bool
) -> list[Drift]:
    view = f"{MASKED_SCHEMA}.{facts.table}"
    row = _rows(
        conn,
        "SELECT c.oid, pg_catalog.pg_get_userbyid(c.relowner), c.relkind, c.reloptions,"
        " pg_catalog.pg_get_viewdef(c.oid),"
        " pg_catalog.has_table_privilege(%s, c.oid, 'SELECT')"
        " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (GROUP_ROLE, MASKED_SCHEMA, facts.table),
    )
    if not row:
        return [Drift(view, "the masking view is missing")]
    _oid, owner, kind, options, definition, readable = row[0]
    drifts = []
    if kind != "v":
        return [Drift(view, "is not a view")]
    if owner != OWNER_ROLE:
        drifts.append(Drift(view, f"is owned by {owner}, not {OWNER_ROLE}"))
    if not readable:
        drifts.append(Drift(view, f"{GROUP_ROLE} may not read it"))
    columns = _view_targets(definition)
    if list(columns) != [name for name, _ in facts.columns]:
        drifts.append(Drift(view, "its columns are not the table's"))
    for column in sorted(masked_columns):
        if columns.get(column, True):
            drifts.append(Drift(f"{view}.{column}", "is not masked (a bare column)"))
    if gated and (
        "security_barrier=true" not in (options or []) or "require_approval" not in definition
    ):
        drifts.append(Drift(view, "is not a security-barrier gate view"))
    return drifts


def check(
    conn: psycopg.Connection[Any],
    target: Target,
    *,
    definer_allowed: Sequence[str] = (),
    facts: Facts | None = None,
) -> list[Drift]:
    """How the database differs from what the policy needs, as the issued role would see
    it; empty when the backstop is in place. Reads the catalog only (`facts`: already
    read)."""
    if not _group_exists(conn):
        return [Drift(GROUP_ROLE, "the session group role is missing")]
    missing = catalog_problems(conn, target)
    if missing:
        return missing  # nothing else can be checked against names that do not exist
    drifts, masks = _check_base_tables(conn, target)
    if facts is None:
        facts = read_facts(conn, target)
    for key, table in sorted(facts.tables.items()):
        drifts += _check_view(conn, table, masks.get(key, set()), key in target.gated_tables)
    drifts += _check_twins(conn, facts, target.masked_tables())
    for function in facts.definer_functions:
        if function not in definer_allowed:
            drifts.append(
                Drift(
                    function,
                    "SECURITY DEFINER, its owner reads protected data, and sessions may execute it",
                )
            )
    (temp,) = _rows(
        conn,
        "SELECT pg_catalog.has_database_privilege(%s, pg_catalog.current_database(), 'TEMP')",
        (GROUP_ROLE,),
    )[0]
    if temp:
        drifts.append(Drift(facts.database, f"{GROUP_ROLE} may create temporary tables"))
    if "keyed_hash" in target.protected_columns.values():
        drifts += _check_key(conn)
    drifts += _check_unmasked(conn, target, facts)
    return drifts


# Who is a member of guard_unmasked, and whether each is an issued session role (it can
# log in and its password expires): any other member reads raw values outside a session.
_UNMASKED_MEMBERS = """
SELECT u.rolname, u.rolcanlogin AND u.rolvaliduntil IS NOT NULL
FROM pg_catalog.pg_auth_members m
JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
JOIN pg_catalog.pg_roles u ON u.oid = m.member
WHERE g.rolname = %s ORDER BY 1
"""


def _check_unmasked(conn: psycopg.Connection[Any], target: Target, facts: Facts) -> list[Drift]:
    """Unmasked access is what the policy says and no more: no raw schema when the policy
    allows no unmasked session; else its raw views in place, readable only through the
    unmasked role, which the session group is not in and only session roles hold."""
    (schema,) = _rows(conn, "SELECT pg_catalog.to_regnamespace(%s)::text", (UNMASKED_SCHEMA,))[0]
    if target.unmasked is None:
        if schema is not None:
            return [Drift(UNMASKED_SCHEMA, "the policy allows no unmasked session, yet it exists")]
        return []
    if schema is None:
        return [Drift(UNMASKED_SCHEMA, "the schema of unmasked access is missing")]
    (role,) = _rows(
        conn, "SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = %s", (UNMASKED_ROLE,)
    )[0]
    if not role:
        return [Drift(UNMASKED_ROLE, "the role of unmasked access is missing")]
    drifts = []
    (inherited,) = _rows(
        conn, "SELECT pg_catalog.pg_has_role(%s, %s, 'MEMBER')", (GROUP_ROLE, UNMASKED_ROLE)
    )[0]
    if inherited:
        drifts.append(Drift(GROUP_ROLE, f"is a member of {UNMASKED_ROLE}: every session reads raw"))
    for member, session_like in _rows(conn, _UNMASKED_MEMBERS, (UNMASKED_ROLE,)):
        if not session_like:
            drifts.append(
                Drift(member, f"a standing member of {UNMASKED_ROLE} (not an issued session role)")
            )
    for schema_name, table in sorted(facts.tables):
        drifts += _check_raw_view(conn, target, schema_name, table)
    return drifts


def _check_raw_view(
    conn: psycopg.Connection[Any], target: Target, schema_name: str, table: str
) -> list[Drift]:
    """One raw view of guard_unmasked: guard's own, readable only through the unmasked
    role, and still a gate where the table is gated."""
    view = f"{UNMASKED_SCHEMA}.{table}"
    row = _rows(
        conn,
        "SELECT pg_catalog.pg_get_userbyid(c.relowner),"
        " pg_catalog.has_table_privilege(%s, c.oid, 'SELECT'),"
        " pg_catalog.has_table_privilege('public', c.oid, 'SELECT'),"
        " pg_catalog.pg_get_viewdef(c.oid)"
        " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'v'",
        (GROUP_ROLE, UNMASKED_SCHEMA, table),
    )
    if not row:
        return [Drift(view, f"the raw view of {schema_name}.{table} is missing")]
    owner, group_reads, public_reads, definition = row[0]
    drifts = []
    if owner != OWNER_ROLE:
        drifts.append(Drift(view, f"is owned by {owner}, not {OWNER_ROLE}"))
    if group_reads or public_reads:
        drifts.append(Drift(view, f"readable without {UNMASKED_ROLE}"))
    if (schema_name, table) in target.gated_tables and "require_approval" not in definition:
        drifts.append(Drift(view, "is not a gate view (unmasked must not skip approval)"))
    return drifts


def _check_key(conn: psycopg.Connection[Any]) -> list[Drift]:
    """keyed_hash's key: present, and no session may read it (with it a session could hash
    candidate values and match them against the digests)."""
    key = f"{MASKED_SCHEMA}.mask_key"
    if _rows(conn, "SELECT pg_catalog.to_regclass(%s)", (key,))[0][0] is None:
        return [Drift(key, "keyed_hash's key is missing")]
    readable, rows = _rows(
        conn,
        f"SELECT pg_catalog.has_table_privilege(%s, %s, 'SELECT'), count(*) FROM {key}",
        (GROUP_ROLE, key),
    )[0]
    if not rows:
        return [Drift(key, "keyed_hash's key is missing")]
    if readable:
        return [Drift(key, f"{GROUP_ROLE} may read keyed_hash's key")]
    return []


def catalog_problems(conn: psycopg.Connection[Any], target: Target) -> list[Drift]:
    """The protected columns and gated tables the policy names that the database lacks (a
    typo there would leave the real column unprotected): `guard policy check --target`."""
    problems: list[Drift] = []
    columns: dict[tuple[str, str], set[str]] = {}
    for schema, table in sorted(target.masked_tables()):
        names = {name for name, _type in _rows(conn, _COLUMNS, (schema, table))}
        if not names:
            problems.append(Drift(f"{schema}.{table}", "no such table in the database"))
        columns[(schema, table)] = names
    for column in sorted(target.protected_columns):
        names = columns[(column.schema, column.table)]
        if names and column.column not in names:
            problems.append(Drift(str(column), "no such column in the database"))
    return problems


def _check_base_tables(
    conn: psycopg.Connection[Any], target: Target
) -> tuple[list[Drift], dict[tuple[str, str], set[str]]]:
    """Protected columns and gated tables the session group can read (it must not)."""
    drifts: list[Drift] = []
    masks: dict[tuple[str, str], set[str]] = {}
    for column in target.protected_columns:
        masks.setdefault((column.schema, column.table), set()).add(column.column)
        name = qualified(column.schema, column.table)
        (readable,) = _rows(
            conn,
            "SELECT pg_catalog.has_column_privilege(%s, %s, %s, 'SELECT')",
            (GROUP_ROLE, name, column.column),
        )[0]
        if readable:
            drifts.append(Drift(str(column), f"{GROUP_ROLE} may read the raw column"))
    for schema, table in sorted(target.gated_tables):
        (readable,) = _rows(
            conn,
            "SELECT pg_catalog.has_any_column_privilege(%s, %s, 'SELECT')",
            (GROUP_ROLE, qualified(schema, table)),
        )[0]
        if readable:
            drifts.append(Drift(f"{schema}.{table}", f"{GROUP_ROLE} may read the gated table"))
    return drifts, masks


# Masked twins (labelled views of the masking schema) whose query reads a protected or gated
# base table itself: a twin must read only the masking views, or it hands out raw values
# with its owner's rights.
_TWINS_READING_BASE = """
SELECT DISTINCT c.relname, bn.nspname || '.' || bt.relname
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_rewrite r ON r.ev_class = c.oid
JOIN pg_catalog.pg_depend d ON d.objid = r.oid
 AND d.classid = 'pg_catalog.pg_rewrite'::regclass
 AND d.refclassid = 'pg_catalog.pg_class'::regclass
JOIN pg_catalog.pg_class bt ON bt.oid = d.refobjid
JOIN pg_catalog.pg_namespace bn ON bn.oid = bt.relnamespace
WHERE n.nspname = %s AND c.relkind = 'v'
  AND pg_catalog.obj_description(c.oid, 'pg_class') LIKE %s
  AND (bn.nspname, bt.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
ORDER BY 1, 2
"""


def _check_twins(
    conn: psycopg.Connection[Any], facts: Facts, special: frozenset[tuple[str, str]]
) -> list[Drift]:
    drifts = [Drift(v, "reads protected data and has no masked twin") for v in facts.untwinned]
    ordered = sorted(special)
    for name, base in _rows(
        conn,
        _TWINS_READING_BASE,
        (
            MASKED_SCHEMA,
            TWIN_COMMENT_PREFIX + "%",  # the prefix holds no LIKE wildcard
            [schema for schema, _ in ordered],
            [table for _, table in ordered],
        ),
    ):
        drifts.append(Drift(f"{MASKED_SCHEMA}.{name}", f"a masked twin reads {base} itself"))
    rows = _rows(
        conn,
        "SELECT c.relname, pg_catalog.obj_description(c.oid, 'pg_class')"
        " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind = 'v'",
        (MASKED_SCHEMA,),
    )
    present = {twin_original(comment) for _name, comment in rows}
    for twin in facts.twins:
        if (twin.schema, twin.name) not in present:
            drifts.append(Drift(f"{twin.schema}.{twin.name}", "has no masked twin"))
    return drifts


def _as_comments(changes: list[str]) -> list[str]:
    """The plan's changes, as the SQL comments that open the statements it prints."""
    if not changes:
        return ["-- no change: the database already matches the policy"]
    return [f"-- {change}" for change in changes]


class BackstopMonitor:
    """Checks a target's backstop before the broker issues credentials for it.

    A passing check is trusted for `backstop_check_seconds`; a failing one is run again at
    the next open (it may have been repaired). A target without `admin_dsn_file` cannot be
    checked: said once in the log, and its sessions open as before.
    """

    def __init__(
        self,
        policy: CompiledPolicy,
        targets: Mapping[str, TargetSettings],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.targets = targets
        self.clock = clock
        self._passed: dict[str, float] = {}
        self._unchecked: set[str] = set()
        # Told the target's name after an apply (the in-process gateway re-reads the
        # masking views' OIDs; worker processes do within their cache's minute).
        self.on_applied: list[Callable[[str], None]] = []

    def _settings(self, name: str) -> TargetSettings:
        settings = self.targets.get(name)
        if name not in self.policy.targets or settings is None:
            raise NotFound(f"no target {name!r}", hint="`guard targets` lists them")
        if settings.admin_dsn_file is None:
            raise DependencyUnavailable(
                f"target {name} has no admin_dsn_file: the broker cannot read its catalog",
                hint="set targets.<name>.admin_dsn_file in the broker config",
            )
        return settings

    def _connect(self, settings: TargetSettings) -> psycopg.Connection[Any]:
        import psycopg

        assert settings.admin_dsn_file is not None
        dsn = settings.admin_dsn_file.read_text().strip()
        return psycopg.connect(dsn, connect_timeout=10)

    def _drifts(self, name: str, settings: TargetSettings) -> list[Drift]:
        with self._connect(settings) as conn:
            return check(
                conn, self.policy.targets[name], definer_allowed=settings.definer_functions_allowed
            )

    def catalog_problems(self, name: str, target: Target) -> list[Drift]:
        """`target` (a candidate policy's) against target `name`'s live catalog."""
        with self._connect(self._settings(name)) as conn:
            return catalog_problems(conn, target)

    def report(self, name: str, *, plan: bool = False) -> tuple[list[Drift], list[str] | None]:
        """The drift now, and with `plan` the statements `apply` would run (blocking I/O:
        call it in a thread)."""
        settings = self._settings(name)
        with self._connect(settings) as conn:
            target = self.policy.targets[name]
            allowed = settings.definer_functions_allowed
            facts = read_facts(conn, target)  # once, for the check and the plan
            drifts = check(conn, target, definer_allowed=allowed, facts=facts)
            planned = None
            if plan:
                changes, ran = plan_changes(conn, target, definer_allowed=allowed, facts=facts)
                planned = [*_as_comments(changes), *ran]
        if drifts:
            self._passed.pop(name, None)  # found drifted: no new session trusts an old pass
        return drifts, planned

    def apply(self, name: str) -> tuple[list[str], list[Drift]]:
        """Apply the backstop in one transaction; the statements run and the drift left."""
        settings = self._settings(name)
        allowed = settings.definer_functions_allowed
        with self._connect(settings) as conn:
            target = self.policy.targets[name]
            ran = apply(conn, target, definer_allowed=allowed)
            drifts = check(conn, target, definer_allowed=allowed)
        self._passed.pop(name, None)
        if not drifts:
            self._passed[name] = self.clock()
        return ran, drifts

    def applied(self, name: str) -> None:
        """Tell the gateway (`on_applied`) that `name`'s catalog changed; on the event loop,
        after `apply` returned from its thread (the hooks write to worker channels)."""
        for hook in self.on_applied:
            hook(name)

    async def __call__(self, name: str) -> None:
        settings = self.targets.get(name)
        if settings is None or settings.admin_dsn_file is None:
            if name not in self._unchecked:
                self._unchecked.add(name)
                log.warning("target %s has no admin_dsn_file: its backstop is not checked", name)
            return
        passed = self._passed.get(name)
        if passed is not None and self.clock() - passed < settings.backstop_check_seconds:
            return
        try:
            drifts = await asyncio.to_thread(self._drifts, name, settings)
        except Exception as exc:
            raise DependencyUnavailable(
                f"cannot check the database backstop of {name}: {type(exc).__name__}",
                hint="check the target database and the broker's admin_dsn_file",
            ) from exc
        if drifts:
            more = f" (and {len(drifts) - 1} more)" if len(drifts) > 1 else ""
            log.error("target %s: backstop drifted: %s", name, "; ".join(map(str, drifts)))
            raise DependencyUnavailable(
                f"the database backstop of {name} has drifted, so no session is opened on it:"
                f" {drifts[0]}{more}",
                hint=f"an operator runs `guard target check {name}` to see it all and "
                f"`guard target apply {name}` to restore it",
            )
        self._passed[name] = self.clock()
