"""Apply the database backstop of a policy target (masking views, group role, revokes).

Reads the catalog facts `masking.objects.backstop_sql` needs (column names and types of the
protected and gated tables, the list of base tables) and runs the generated statements as
the target's admin in one transaction. Used by `guard dev up` and the tests; the later
masking work turns this into plan/apply/self-check for any target.
"""

from __future__ import annotations

import psycopg

from guard.broker.masking.objects import TableColumns, backstop_sql
from guard.broker.policy.engine import Target

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
        statements = backstop_sql(target, facts, all_tables=all_tables, database=database)
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    return statements
