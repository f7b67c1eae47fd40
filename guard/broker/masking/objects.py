"""The database backstop (DESIGN.md section 3) generated from a compiled policy target.

Pure: builds SQL text from a `policy` `Target` plus catalog facts passed in; runs nothing.
Imports only the stdlib, `masking.strategies` and `policy.model` (the schema names).

What the statements set up, and the attack each part stops:

* `guard_masked_owner` (NOLOGIN) owns schema `guard_masked` and reads the protected base
  tables; its **plain** views (never security_invoker, which would check the session role's
  own rights) return protected columns only through mask expressions.
* `guard_session` (NOLOGIN) is the group every issued session role joins. It gets SELECT on
  the views, column-level SELECT on the *unprotected* columns of protected tables (so
  `public.customers.ssn` spelled any way is `permission denied`, and pg_stats hides the
  protected columns' histograms), nothing on gated base tables, and plain SELECT/DML on
  every other table (the gateway's policy still decides what runs).
* A gated table gets a `security_barrier` gate view whose WHERE calls
  `guard_masked.require_approval('<schema>.<table>')`: it raises SQLSTATE 42501 "reading ...
  requires approval" unless the current role is in `guard_approved_<table>`, so a spelling
  the gateway missed errors instead of reading ungated rows. That role is created here
  (NOLOGIN, no attributes, no privileges); the broker grants it to a session role for
  exactly an approval's scope (`approvals.grants`) and revokes it afterwards.
* Partitions and inheritance children of protected/gated tables get no privileges at all,
  so they cannot be read around the views.
* Unmasked access, when the policy allows it (`unmasked_access`): schema `guard_unmasked`
  holds a raw view of each protected/gated table (a gated one still a gate view) and raw
  twins, readable only by the NOLOGIN role `guard_unmasked`, which the broker grants to
  one session's role for that session (the role is dropped with the lease). Nothing else
  changes: the base columns stay unreadable, so the raw views are the one way to them,
  and a session without the role reads the masked schema as before. Without
  `unmasked_access` the schema is dropped (the role, shared by every database of the
  cluster, stays, with no rights here).
* Hardening: no TEMP (a temp table could hold copied raw values), no CREATE in the schemas,
  EXECUTE revoked from PUBLIC on large-object, server-file and dblink functions.

Every statement is idempotent (IF [NOT] EXISTS, DO blocks checking the catalog, CREATE OR
REPLACE, GRANT/REVOKE): the list can be re-applied after any policy change. Views are
dropped and re-created because CREATE OR REPLACE VIEW cannot change a column's type when a
strategy changes; run the list in one transaction so sessions never see a missing view.
The caller passes base tables only: views of the target run with their owner's rights and
are never granted as-is. A view or materialized view that reads a protected or gated table
gets a masked twin instead (`ViewTwin`, `view_twin_sql`): the same name and columns in the
masking schema, its query reading the masking views, so it reads masked as a table does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guard.broker.masking.strategies import get_strategy

# The schema names are the policy's (a view there stands for its table: `policy_ref`).
from guard.broker.policy.model import MASKED_SCHEMA as MASKED_SCHEMA
from guard.broker.policy.model import UNMASKED_SCHEMA as UNMASKED_SCHEMA

if TYPE_CHECKING:
    from guard.broker.policy.model import Target

OWNER_ROLE = "guard_masked_owner"
GROUP_ROLE = "guard_session"
# Unmasked access (`Target.unmasked`): raw views of the protected/gated tables (gates kept)
# and raw twins, in UNMASKED_SCHEMA, readable only by this role, which the broker grants
# to one session role for that session's life.
UNMASKED_ROLE = "guard_unmasked"
# A session role's CONNECTION LIMIT when none is given: the policy's default
# `max_connections_per_session`.
DEFAULT_CONNECTION_LIMIT = 20
APPROVED_ROLE_PREFIX = "guard_approved_"
_DOLLAR = "$guard$"
_NAMEDATALEN = 64

# Functions whose EXECUTE is revoked from PUBLIC: large objects (a copy there is outside
# every table), server files, dblink (a connection guard does not see). Matched by name in
# every schema, so only functions that exist are touched.
_REVOKED_FUNCTIONS_SQL = (
    "p.proname LIKE 'lo\\_%' OR p.proname IN ('loread', 'lowrite')"
    " OR p.proname IN ('pg_read_file', 'pg_read_binary_file', 'pg_stat_file', 'pg_ls_dir')"
    " OR p.proname LIKE 'pg\\_ls\\_%' OR p.proname LIKE 'pg\\_file\\_%'"
    " OR p.proname LIKE 'dblink%'"
)


@dataclass(frozen=True, slots=True)
class TableColumns:
    """Catalog facts about one table: its columns (name, SQL type) in attnum order."""

    schema: str
    table: str
    columns: tuple[tuple[str, str], ...]


def quote_ident(name: str) -> str:
    """Always-quoted identifier ("Foo" stays Foo, embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A string literal that reads the same whatever standard_conforming_strings is."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def approved_role_name(table: str) -> str:
    """`guard_approved_<table>`, cut to 63 bytes as PostgreSQL cuts identifiers."""
    raw = (APPROVED_ROLE_PREFIX + table).encode("utf-8")[: _NAMEDATALEN - 1]
    return raw.decode("utf-8", "ignore")


def _do(body: str) -> str:
    if _DOLLAR in body:
        raise ValueError(f"identifier contains the reserved sequence {_DOLLAR}")
    return f"DO {_DOLLAR}\nBEGIN\n{body}\nEND\n{_DOLLAR}"


def _ensure_role(role: str) -> list[str]:
    return [
        _do(
            f"  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = "
            f"{quote_literal(role)}) THEN\n    CREATE ROLE {quote_ident(role)} NOLOGIN;\n  END IF;"
        ),
        # A pre-existing role of that name must not keep LOGIN or any bypass attribute.
        f"ALTER ROLE {quote_ident(role)} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
        " NOREPLICATION NOBYPASSRLS",
    ]


def _gate_objects(target: Target, schema: str, owner: str, group: str) -> list[str]:
    """The approval roles (one per gated table) and the gate function; none if nothing is gated.

    `guard_approved_<table>` is NOLOGIN with no attributes and no privileges: it only marks
    who may read through the gate view. The broker GRANTs it to a session role for the
    approved scope and REVOKEs it afterwards; re-applying the backstop keeps memberships.
    """
    if not target.gated_tables:
        return []
    out: list[str] = []
    for role in approved_roles(target):
        out += _ensure_role(role)
    return out + _approval_function(schema, owner, group)


def approved_roles(target: Target) -> list[str]:
    """`guard_approved_<table>` of every gated table, sorted.

    Raises ValueError when the gate function could not name a table's role as the broker
    does (a dot in the schema name: it takes what follows the first dot as the table), or
    when two gated tables would share a role (names cut to 63 bytes), since an approval
    for one would then open the other.
    """
    roles: dict[str, tuple[str, str]] = {}
    for schema, table in sorted(target.gated_tables):
        if "." in schema:
            raise ValueError(
                f"gated table {schema}.{table}: a schema name with a dot is not supported"
            )
        role = approved_role_name(table)
        if role in roles:
            other = ".".join(roles[role])
            raise ValueError(f"gated tables {other} and {schema}.{table} share the role {role}")
        roles[role] = (schema, table)
    return sorted(roles)


def _approval_function(schema: str, owner: str, group: str) -> list[str]:
    fn = f"{quote_ident(schema)}.require_approval(text)"
    return [
        f"""CREATE OR REPLACE FUNCTION {quote_ident(schema)}.require_approval(relation text)
RETURNS boolean LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS {_DOLLAR}
DECLARE
  -- guard_approved_<table>, cut to 63 bytes by the cast as any identifier is.
  approved name :=
    ({quote_literal(APPROVED_ROLE_PREFIX)} || substr(relation, strpos(relation, '.') + 1))::name;
BEGIN
  -- Members of guard_approved_<table> (granted when an approval is decided) read through.
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = approved) THEN
    IF pg_catalog.pg_has_role(current_user, approved, 'MEMBER') THEN
      RETURN true;
    END IF;
  END IF;
  RAISE EXCEPTION USING ERRCODE = '42501',
    MESSAGE = format('reading %s requires approval', relation),
    HINT = 'Ask for approval through guard.';
END
{_DOLLAR}""",
        f"ALTER FUNCTION {fn} OWNER TO {quote_ident(owner)}",
        f"REVOKE ALL ON FUNCTION {fn} FROM PUBLIC",
        f"GRANT EXECUTE ON FUNCTION {fn} TO {quote_ident(group)}",
    ]


def _view(
    facts: TableColumns,
    masks: Mapping[str, str],
    gated: bool,
    schema: str,
    owner: str,
    group: str,
    gate_schema: str | None = None,
) -> list[str]:
    view = qualified(schema, facts.table)
    items = []
    for column, _type in facts.columns:
        strategy = masks.get(column)
        if strategy is None:
            items.append(quote_ident(column))
        else:
            expression = get_strategy(strategy).sql_expression(quote_ident(column))
            items.append(f"{expression} AS {quote_ident(column)}")
    label = quote_literal(f"{facts.schema}.{facts.table}")
    options = " WITH (security_barrier)" if gated else ""
    gate = quote_ident(gate_schema or schema)  # where require_approval() lives
    where = f"\nWHERE {gate}.require_approval({label})" if gated else ""
    select = ",\n       ".join(items)
    return [
        # CASCADE: the masked twins of views that read this one are dropped with it and
        # re-created after (`view_twin_sql`), in the same transaction.
        f"DROP VIEW IF EXISTS {view} CASCADE",
        f"CREATE VIEW {view}{options} AS\nSELECT {select}\n"
        f"FROM {qualified(facts.schema, facts.table)}{where}",
        f"ALTER VIEW {view} OWNER TO {quote_ident(owner)}",
        f"GRANT SELECT ON {view} TO {quote_ident(group)}",
    ]


# A masked twin's comment: what the gateway reads to redirect the original's qualified name.
TWIN_COMMENT_PREFIX = "guard: masked twin of "


@dataclass(frozen=True, slots=True)
class ViewTwin:
    """A view (or materialized view) of the target that reads protected or gated tables,
    and its definition with those reads pointed at the masking schema (`sql.redirect` on
    `pg_get_viewdef` under an empty search_path): the twin's query."""

    schema: str
    name: str
    definition: str


def view_twin_sql(
    twin: ViewTwin,
    *,
    schema_owner_role: str = OWNER_ROLE,
    group_role: str = GROUP_ROLE,
    masked_schema: str = MASKED_SCHEMA,
) -> list[str]:
    """A masked twin: a plain view of the same name and columns in the masking schema,
    owned by the owner role (it reads the masking views with their rights, never the
    protected base columns), readable by the session group; a materialized view's twin is
    a plain view too (its stored rows hold raw values). The comment names the original,
    as JSON, for the gateway's redirection of its qualified name."""
    view = qualified(masked_schema, twin.name)
    body = twin.definition.strip().rstrip(";")
    label = json.dumps({"schema": twin.schema, "name": twin.name})
    return [
        f"DROP VIEW IF EXISTS {view} CASCADE",
        f"CREATE VIEW {view} AS\n{body}",
        f"ALTER VIEW {view} OWNER TO {quote_ident(schema_owner_role)}",
        f"GRANT SELECT ON {view} TO {quote_ident(group_role)}",
        f"COMMENT ON VIEW {view} IS {quote_literal(TWIN_COMMENT_PREFIX + label)}",
    ]


def twin_original(comment: str | None) -> tuple[str, str] | None:
    """The (schema, name) a masking-schema view is the twin of, from its comment."""
    if not comment or not comment.startswith(TWIN_COMMENT_PREFIX):
        return None
    try:
        data = json.loads(comment[len(TWIN_COMMENT_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    schema, name = data.get("schema"), data.get("name")
    return (schema, name) if isinstance(schema, str) and isinstance(name, str) else None


def _special_tables(
    target: Target, tables: Mapping[tuple[str, str], TableColumns], masked_schema: str
) -> tuple[dict[tuple[str, str], dict[str, str]], list[tuple[str, str]]]:
    """The masks per table (column -> strategy) and the protected or gated tables, sorted.

    Raises ValueError when the catalog facts lack a table or column the policy names, or
    when two of the tables would get views of the same name in the masked schema.
    """
    masks: dict[tuple[str, str], dict[str, str]] = {}
    for column_id, strategy in target.protected_columns.items():
        get_strategy(strategy)
        masks.setdefault((column_id.schema, column_id.table), {})[column_id.column] = strategy
    special = sorted(target.masked_tables())
    for key in special:
        facts = tables.get(key)
        if facts is None:
            raise ValueError(f"no catalog facts for {key[0]}.{key[1]}")
        missing = set(masks.get(key, {})) - {name for name, _ in facts.columns}
        if missing:
            raise ValueError(f"{key[0]}.{key[1]} has no column(s) {', '.join(sorted(missing))}")
    names = [table for _, table in special]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"two protected/gated tables share a name in {masked_schema}: {clashes}")
    return masks, special


def backstop_sql(
    target: Target,
    tables: Mapping[tuple[str, str], TableColumns],
    *,
    all_tables: Sequence[tuple[str, str]],
    database: str | None = None,
    schema_owner_role: str = OWNER_ROLE,
    group_role: str = GROUP_ROLE,
    masked_schema: str = MASKED_SCHEMA,
    view_twins: Sequence[ViewTwin] = (),
    unmasked_twins: Sequence[ViewTwin] = (),
    revoke_functions: Sequence[str] = (),
) -> list[str]:
    """Statements (run by an admin, in order) that build the target's database backstop.

    `tables` must describe every protected and gated table; `all_tables` lists the target's
    base tables (relkind r/p). `database` defaults to current_database() at run time.
    Raises ValueError when the policy names a table or column the catalog facts lack: a
    typo must not leave the real column unprotected.
    """
    masks, special = _special_tables(target, tables, masked_schema)
    owner, group = quote_ident(schema_owner_role), quote_ident(group_role)
    out: list[str] = [*_ensure_role(schema_owner_role), *_ensure_role(group_role)]
    # The masked schema: owned by the owner role, invisible to everyone but the group.
    out += [
        f"CREATE SCHEMA IF NOT EXISTS {quote_ident(masked_schema)} AUTHORIZATION {owner}",
        f"ALTER SCHEMA {quote_ident(masked_schema)} OWNER TO {owner}",
        f"REVOKE ALL ON SCHEMA {quote_ident(masked_schema)} FROM PUBLIC",
    ]
    for schema, table in special:
        # A PUBLIC grant on a protected/gated table would reach every session role.
        out.append(f"REVOKE ALL ON TABLE {qualified(schema, table)} FROM PUBLIC")
        out.append(f"GRANT SELECT ON TABLE {qualified(schema, table)} TO {owner}")
    out += _gate_objects(target, masked_schema, schema_owner_role, group_role)
    if "keyed_hash" in target.protected_columns.values():
        out += _mask_key(schema_owner_role, group_role)
    for key in special:
        out += _view(
            tables[key],
            masks.get(key, {}),
            key in target.gated_tables,
            masked_schema,
            schema_owner_role,
            group_role,
        )
    schemas = sorted({s for s, _ in all_tables} | {s for s, _ in special})
    out.append(
        f"GRANT USAGE ON SCHEMA {', '.join(quote_ident(s) for s in [masked_schema, *schemas])}"
        f" TO {group}"
    )
    for schema, table in special:
        # Column privileges only on unprotected columns; REVOKE ALL first also removes
        # column grants left from an earlier policy. Gated tables get nothing at all.
        out.append(f"REVOKE ALL ON TABLE {qualified(schema, table)} FROM {group}")
        if (schema, table) in target.gated_tables:
            continue
        open_columns = [
            c for c, _ in tables[(schema, table)].columns if c not in masks[(schema, table)]
        ]
        if open_columns:
            cols = ", ".join(quote_ident(c) for c in open_columns)
            out.append(f"GRANT SELECT ({cols}) ON TABLE {qualified(schema, table)} TO {group}")
    plain = [t for t in dict.fromkeys(all_tables) if t not in set(special)]
    for schema, table in plain:
        out.append(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {qualified(schema, table)} TO {group}"
        )
    if plain:
        out.append(_sequence_grants(plain, group_role))
    out += _twins(view_twins, plain, schema_owner_role, group_role, masked_schema)
    out += _unmasked_objects(
        target, tables, special, unmasked_twins, schema_owner_role, masked_schema
    )
    if special:
        out.append(_revoke_descendants(special, group_role))
    out += _hardening(schemas, database, group_role)
    # SECURITY DEFINER functions whose owner reads protected data (`customer_ssn(int)`):
    # each would hand raw values to any caller. Given as regprocedure text (already quoted).
    out += [f"REVOKE EXECUTE ON FUNCTION {fn} FROM PUBLIC, {group}" for fn in revoke_functions]
    return out


def _unmasked_objects(
    target: Target,
    tables: Mapping[tuple[str, str], TableColumns],
    special: Sequence[tuple[str, str]],
    twins: Sequence[ViewTwin],
    owner: str,
    masked_schema: str,
) -> list[str]:
    """The raw views of `guard_unmasked` (see the module), or its removal when the policy
    allows no unmasked session: an apply after `unmasked_access` is taken out leaves no
    way to raw values behind."""
    schema = quote_ident(UNMASKED_SCHEMA)
    if target.unmasked is None:
        return [f"DROP SCHEMA IF EXISTS {schema} CASCADE"]
    out = [
        *_ensure_role(UNMASKED_ROLE),
        f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {quote_ident(owner)}",
        f"ALTER SCHEMA {schema} OWNER TO {quote_ident(owner)}",
        f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA {schema} TO {quote_ident(UNMASKED_ROLE)}",
    ]
    for key in special:
        gated = key in target.gated_tables
        out += _view(tables[key], {}, gated, UNMASKED_SCHEMA, owner, UNMASKED_ROLE, masked_schema)
    for twin in twins:
        out += view_twin_sql(
            twin, schema_owner_role=owner, group_role=UNMASKED_ROLE, masked_schema=UNMASKED_SCHEMA
        )
    return out


def _mask_key(owner: str, group: str) -> list[str]:
    """keyed_hash's key (`strategies.KEY_TABLE`): created once, 256 random bits (hashed
    from two gen_random_uuid(), which use the server's strong random source), kept across
    applies (a new key would change every digest), readable by the owner role alone."""
    table = qualified(MASKED_SCHEMA, "mask_key")
    return [
        f"CREATE TABLE IF NOT EXISTS {table}"
        " (id int PRIMARY KEY CHECK (id = 1), key bytea NOT NULL)",
        f"ALTER TABLE {table} OWNER TO {quote_ident(owner)}",
        f"REVOKE ALL ON TABLE {table} FROM PUBLIC, {quote_ident(group)}",
        f"INSERT INTO {table} SELECT 1, pg_catalog.sha256(pg_catalog.convert_to("
        "pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text, 'UTF8'))"
        " ON CONFLICT (id) DO NOTHING",
    ]


def _twins(
    view_twins: Sequence[ViewTwin],
    plain: Sequence[tuple[str, str]],
    owner: str,
    group: str,
    masked_schema: str,
) -> list[str]:
    if not view_twins:
        return []
    out = []
    if plain:
        # The twins run with the owner's rights: it reads the masking views (its own) and
        # the plain tables a view may join, which every session may read anyway.
        tables = ", ".join(qualified(s, t) for s, t in plain)
        out.append(f"GRANT SELECT ON TABLE {tables} TO {quote_ident(owner)}")
    for twin in view_twins:
        out += view_twin_sql(
            twin, schema_owner_role=owner, group_role=group, masked_schema=masked_schema
        )
    return out


def _revoke_descendants(tables: Sequence[tuple[str, str]], group_role: str) -> str:
    """No direct access to partitions/inheritance children of protected or gated tables.

    `SELECT * FROM customers_2024` (a partition) would otherwise read raw values, or rows of
    a gated table, around the views; this runs after the plain grants, which a caller's
    list of all tables may have given them.
    """
    regclasses = ", ".join(f"to_regclass({quote_literal(qualified(s, t))})" for s, t in tables)
    return _do(
        "  DECLARE child regclass;\n  BEGIN\n"
        "    FOR child IN WITH RECURSIVE d(oid) AS (\n"
        "        SELECT i.inhrelid FROM pg_catalog.pg_inherits i\n"
        f"        WHERE i.inhparent = ANY (ARRAY[{regclasses}]::oid[])\n"
        "        UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i\n"
        "        JOIN d ON i.inhparent = d.oid)\n"
        "      SELECT d.oid::regclass FROM d\n"
        "    LOOP\n"
        f"      EXECUTE format('REVOKE ALL ON TABLE %s FROM PUBLIC, %I', child,"
        f" {quote_literal(group_role)});\n"
        "    END LOOP;\n  END;"
    )


def _sequence_grants(tables: Sequence[tuple[str, str]], group_role: str) -> str:
    """USAGE/SELECT on sequences owned by (serial/identity columns of) the DML tables."""
    regclasses = ", ".join(f"to_regclass({quote_literal(qualified(s, t))})" for s, t in tables)
    return _do(
        "  DECLARE seq regclass;\n  BEGIN\n"
        "    FOR seq IN SELECT d.objid::regclass FROM pg_catalog.pg_depend d\n"
        "        JOIN pg_catalog.pg_class c ON c.oid = d.objid AND c.relkind = 'S'\n"
        "        WHERE d.classid = 'pg_catalog.pg_class'::regclass\n"
        "          AND d.refclassid = 'pg_catalog.pg_class'::regclass\n"
        "          AND d.deptype IN ('a', 'i')\n"
        f"          AND d.refobjid = ANY (ARRAY[{regclasses}]::oid[])\n"
        "    LOOP\n"
        f"      EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO %I', seq,"
        f" {quote_literal(group_role)});\n"
        "    END LOOP;\n  END;"
    )


def _hardening(schemas: Sequence[str], database: str | None, group_role: str) -> list[str]:
    group = quote_ident(group_role)
    if database is not None:
        temp = [
            f"REVOKE TEMPORARY ON DATABASE {quote_ident(database)} FROM PUBLIC",
            f"REVOKE TEMPORARY ON DATABASE {quote_ident(database)} FROM {group}",
        ]
    else:
        temp = [
            _do(
                "  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC',"
                " current_database());\n"
                "  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM %I',"
                f" current_database(), {quote_literal(group_role)});"
            )
        ]
    create = [f"REVOKE CREATE ON SCHEMA {quote_ident(s)} FROM PUBLIC, {group}" for s in schemas]
    functions = _do(
        "  DECLARE fn regprocedure;\n  BEGIN\n"
        "    FOR fn IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p\n"
        f"        WHERE {_REVOKED_FUNCTIONS_SQL}\n"
        "    LOOP\n"
        "      EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', fn);\n"
        "    END LOOP;\n  END;"
    )
    return [*temp, *create, functions]


def session_search_path(*, unmasked: bool = False) -> str:
    """A session role's search_path: the masking views first (the raw views for an
    unmasked session), so unqualified names of protected tables resolve there."""
    return f"{quote_ident(UNMASKED_SCHEMA if unmasked else MASKED_SCHEMA)}, public"


def creation_statements(
    group_role: str = GROUP_ROLE,
    masked_schema: str = MASKED_SCHEMA,
    *,
    connection_limit: int = DEFAULT_CONNECTION_LIMIT,
) -> list[str]:
    """OpenBao database role `creation_statements` for a session role.

    The role can log in until the lease expires, has no attributes of its own and inherits
    only the group role; its default search_path puts the masked views first, so an
    unqualified `customers` is the masked view (the gateway keeps it first). It may hold
    at most `connection_limit` connections (the target's `max_connections_per_session`),
    so one session cannot use up the server's max_connections even past the gateway.
    """
    if isinstance(connection_limit, bool) or not isinstance(connection_limit, int):
        raise TypeError("connection_limit must be an int")
    if connection_limit < 1:
        raise ValueError("connection_limit must be at least 1")
    return [
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}'"
        " VALID UNTIL '{{expiration}}' NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
        f" NOBYPASSRLS INHERIT CONNECTION LIMIT {connection_limit}"
        f" IN ROLE {quote_ident(group_role)}",
        f'ALTER ROLE "{{{{name}}}}" SET search_path = {quote_ident(masked_schema)}, public',
    ]


def revocation_statements(group_role: str = GROUP_ROLE) -> list[str]:
    """OpenBao `revocation_statements`: cut access, end the sessions, drop the role.

    Revoking the group (and guard_unmasked) first makes an open session lose its privileges
    at its next statement; pg_terminate_backend then ends it (waiting up to 5 s for it to
    exit, because OpenBao's own revoke does not end open sessions); owned objects are
    reassigned/dropped so DROP ROLE cannot fail on dependencies. Safe to run again after a
    partial run.
    """
    return [
        _do(
            "  IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{{name}}') THEN\n"
            f'    REVOKE {quote_ident(group_role)} FROM "{{{{name}}}}";\n'
            # An unmasked session's raw access goes first too, not only at DROP ROLE.
            "    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname ="
            f" {quote_literal(UNMASKED_ROLE)}) THEN\n"
            f'      REVOKE {quote_ident(UNMASKED_ROLE)} FROM "{{{{name}}}}";\n'
            "    END IF;\n"
            "  END IF;"
        ),
        "SELECT pg_catalog.pg_terminate_backend(pid, 5000) FROM pg_catalog.pg_stat_activity"
        " WHERE usename = '{{name}}'",
        _do(
            "  IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{{name}}') THEN\n"
            '    REASSIGN OWNED BY "{{name}}" TO CURRENT_USER;\n'
            '    DROP OWNED BY "{{name}}";\n'
            "  END IF;"
        ),
        'DROP ROLE IF EXISTS "{{name}}"',
    ]
