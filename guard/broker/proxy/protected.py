"""Which base columns of a target are protected, by (table OID, attribute number).

The gateway masks result columns by where they come from (RowDescription's table OID and
attribute number, never a column name, which any alias can change). The policy names
protected columns as schema.table.column; this module turns those names into OIDs with one
catalog query per target, run on the session's fresh upstream connection before the client
uses it, and caches the answer briefly so a re-created table is noticed.

The names travel as query parameters (extended protocol, text parameters typed `text`),
never spliced into SQL: a policy naming a column `o'brien` is a name, not an injection.
Does upstream I/O through `proxy.upstream`; no other I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from guard.broker.masking.objects import MASKED_SCHEMA, UNMASKED_SCHEMA, twin_original
from guard.broker.masking.strategies import MaskStrategy, get_strategy
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.proxy import upstream
from guard.broker.proxy.connection import ProtectedMap

# Protected-column OIDs are re-read after this long, so a re-created table is noticed.
PROTECTED_MAP_TTL = 60.0

_COLUMNS = (
    "SELECT c.oid, a.attnum, n.nspname, c.relname, a.attname "
    "FROM pg_catalog.pg_attribute a "
    "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE a.attnum > 0 AND NOT a.attisdropped "
    "AND (n.nspname, c.relname, a.attname) IN (VALUES {rows})"
)


# The masked twins of views (`masking.objects.view_twin_sql`): their comments name the
# originals, whose qualified names the gate points at the twins.
_TWINS = (
    "SELECT pg_catalog.obj_description(c.oid, 'pg_class') "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = $1 AND c.relkind = 'v'"
)


class ProtectedColumnMap(dict[tuple[int, int], MaskStrategy]):
    """The protected-column map; the masked columns of the masking views, by (view OID,
    attnum), which the result records count; and the views that have masked twins."""

    view_columns: frozenset[tuple[int, int]] = frozenset()
    twins: frozenset[tuple[str, str]] = frozenset()
    # The protected columns of guard_unmasked's raw views: an unmasked session's result
    # records count their cells (`unmasked_cells`).
    unmasked_columns: frozenset[tuple[int, int]] = frozenset()

    def for_unmasked(self) -> ProtectedColumnMap:
        """The map an unmasked session's connection uses: the same base columns (a raw
        base column in a result is still masked: drift), its cells counted from the raw
        views."""
        other = ProtectedColumnMap(self)
        other.view_columns = self.unmasked_columns
        other.twins = self.twins
        return other


def lookup_query(count: int) -> str:
    """The catalog query for `count` (schema, table, column) triples, as $1..$3n."""
    rows = ", ".join(f"(${3 * i + 1}, ${3 * i + 2}, ${3 * i + 3})" for i in range(count))
    return _COLUMNS.format(rows=rows)


class ProtectedColumns:
    """Per-target map of protected base columns by (table OID, attnum), cached briefly."""

    def __init__(self, policy: CompiledPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._cache: dict[str, tuple[float, ProtectedMap]] = {}

    def forget(self, target: str) -> None:
        """Drop the cached map of `target` (its backstop was just applied: new view OIDs)."""
        self._cache.pop(target, None)

    async def __call__(self, target: str, conn: upstream.UpstreamConnection) -> ProtectedMap:
        hit = self._cache.get(target)
        if hit is not None and self.clock() - hit[0] < PROTECTED_MAP_TTL:
            return hit[1]
        by_name: dict[tuple[str, str, str], MaskStrategy] = {
            (c.schema, c.table, c.column): get_strategy(strategy)
            for c, strategy in self.policy.targets[target].protected_columns.items()
        }
        result = ProtectedColumnMap()
        if by_name:
            # The base columns and, in the same query, their masking views' and raw views'
            # columns.
            views = [
                (schema, table, column)
                for schema in (MASKED_SCHEMA, UNMASKED_SCHEMA)
                for _schema, table, column in by_name
            ]
            triples = [*by_name, *views]
            params = [name for triple in triples for name in triple]
            rows = await upstream.query_rows(conn, lookup_query(len(triples)), params)
            columns: dict[str, set[tuple[int, int]]] = {
                MASKED_SCHEMA: set(),
                UNMASKED_SCHEMA: set(),
            }
            for oid, attnum, schema, table, column in rows:
                if None in (oid, attnum, schema, table, column):
                    raise upstream.UpstreamError("catalog query returned a NULL column")
                key = (schema.decode(), table.decode(), column.decode())  # type: ignore[union-attr]
                if key in by_name:
                    result[(int(oid), int(attnum))] = by_name[key]  # type: ignore[arg-type]
                else:
                    columns[key[0]].add((int(oid), int(attnum)))  # type: ignore[arg-type]
            result.view_columns = frozenset(columns[MASKED_SCHEMA])
            result.unmasked_columns = frozenset(columns[UNMASKED_SCHEMA])
            comments = await upstream.query_rows(conn, _TWINS, [MASKED_SCHEMA])
            originals = (twin_original(c.decode() if c else None) for (c,) in comments)
            result.twins = frozenset(o for o in originals if o is not None)
        self._cache[target] = (self.clock(), result)
        return result
