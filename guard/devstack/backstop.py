"""Apply the database backstop of a policy target (masking views, group role, revokes).

Reads the catalog facts `masking.objects.backstop_sql` needs (column names and types of the
protected and gated tables, the list of base tables) and runs the generated statements as
the target's admin in one transaction. Used by `guard dev up` and the tests; the later
masking work turns this into plan/apply/self-check for any target.
"""

from __future__ import annotations

import psycopg

from guard.broker.masking.objects import MASKED_SCHEMA, TableColumns, ViewTwin, backstop_sql
from guard.broker.policy.engine import Target
from guard.broker.sql.redirect import redirect

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_TABLES = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'guard_masked')
  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
ORDER BY 1, 2
"""


# Views and materialized views that read the given tables, directly or through other views,
# shallowest first (a twin is created after the twins it reads), with their definitions.
# pg_get_viewdef qualifies every relation not visible on the search_path: run with only
# pg_catalog on it, every user relation comes out schema-qualified, ready for redirection.
_DEPENDENT_VIEWS = """
WITH RECURSIVE base(oid) AS (
  SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
), deps(oid, depth) AS (
  SELECT r.ev_class, 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
  WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
    AND d.refobjid IN (SELECT oid FROM base) AND r.ev_class <> d.refobjid
  UNION
  SELECT r.ev_class, deps.depth + 1 FROM deps
  JOIN pg_depend d ON d.refobjid = deps.oid
   AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
  JOIN pg_rewrite r ON r.oid = d.objid
  WHERE r.ev_class <> deps.oid AND deps.depth < 32
)
SELECT n.nspname, c.relname, pg_get_viewdef(c.oid), max(deps.depth) AS depth
FROM deps JOIN pg_class c ON c.oid = deps.oid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'guard_masked')
GROUP BY c.oid, n.nspname, c.relname
ORDER BY depth, 1, 2
"""


def view_twins(
    conn: psycopg.Connection, special: set[tuple[str, str]], masked_schema: str = MASKED_SCHEMA
) -> tuple[list[ViewTwin], list[str]]:
    """The masked twins of the views that read `special` tables, and the views that get
    none (their definition could not be redirected: they stay unreadable, fail closed)."""
    if not special:
        return [], []
    schemas, names = zip(*sorted(special), strict=True)
    conn.execute("SET LOCAL search_path = pg_catalog")
    rows = conn.execute(_DEPENDENT_VIEWS, (list(schemas), list(names))).fetchall()
    conn.execute("RESET search_path")
    twins: list[ViewTwin] = []
    skipped: list[str] = []
    redirected = frozenset(special)
    for schema, name, definition, _depth in rows:
        result = redirect(definition, redirected, masked_schema)
        if result is None or result.refusal is not None:
            skipped.append(f"{schema}.{name}")
            continue
        twins.append(ViewTwin(schema, name, result.text))
        redirected |= {(schema, name)}  # views of this view read its twin
    return twins, skipped


def apply_backstop(admin_dsn: str, target: Target) -> list[str]:
    """Create or refresh the target's backstop objects; returns the statements run."""
    with psycopg.connect(admin_dsn) as conn:
        wanted = {(c.schema, c.table) for c in target.protected_columns} | set(target.gated_tables)
        facts = {}
        for schema, table in sorted(wanted):
            cols = conn.execute(_COLUMNS, (schema, table)).fetchall()
            facts[(schema, table)] = TableColumns(schema, table, tuple((n, t) for n, t in cols))
        all_tables = [(s, t) for s, t in conn.execute(_TABLES).fetchall()]
        database = conn.info.dbname
        twins, _skipped = view_twins(conn, wanted)
        statements = backstop_sql(
            target, facts, all_tables=all_tables, database=database, view_twins=twins
        )
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    return statements
