"""Name resolution for column lineage: scopes, range entries and the shape of derived tables.

Imports only the stdlib and `sql.model`. No catalog is available, so resolution is
conservative: whenever the analyser cannot tell which base column a name denotes, it answers
with more candidates, never fewer.

A *source* is `(column, candidate base relations)`: the base column a value may come from
('*' = any column of those relations). Every reference resolves to a set of sources:

* a base relation `customers c` resolves `c.ssn` to `('ssn', {customers})`; with a column
  alias list (`customers AS x(a, b, c)`) a renamed name maps to `('*', {customers})`,
  because without the catalog we cannot know which original column sits at that position;
* a subquery, CTE or VALUES alias has a `Shape`: its output columns with the sources each
  was computed from. `s.x` resolves through the shape to the base columns behind `x`, so an
  outer `upper(x)` is DERIVED use of `customers.ssn` even though the name `ssn` never
  appears outside the subquery. `*` inside a derived table passes names through to the
  relations it expands; a name the shape does not know resolves to all its sources;
* a function in FROM (generate_series, XMLTABLE, JSON_TABLE ...) has no base sources: its
  arguments were already classified as DERIVED where they appear.

An unqualified name resolves as PostgreSQL resolves it (`Scope.resolve_column`): in the
innermost query level that has a FROM item with that column, else the next level out. An
entry *has* a column (True), *lacks* it (False: a derived table whose output names are all
known), or *may* have it (None: a base relation or a function, whose columns only the
catalog knows). A level whose entries only may have the name does not stop the search: the
name may as well come from further out, so every candidate on the way is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from .model import RelationRef

Source = tuple[str, frozenset[RelationRef]]
Sources = frozenset[Source]
NO_SOURCES: Sources = frozenset()


def union(parts: Iterable[Sources]) -> Sources:
    """Union of an iterable of source sets."""
    out: set[Source] = set()
    for part in parts:
        out |= part
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Out:
    """One named output column of a derived table and where its value comes from."""

    name: str | None
    sources: Sources


@dataclass(frozen=True, slots=True)
class Star:
    """A `*` / `t.*` item of a derived table's target list: expands the given entries."""

    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class Shape:
    """Output columns of a subquery/CTE/VALUES; `exact` = positions are known."""

    items: tuple[Out | Star, ...]
    exact: bool = True

    def all_sources(self) -> Sources:
        parts: list[Sources] = []
        for item in self.items:
            if isinstance(item, Out):
                parts.append(item.sources)
            else:
                parts.extend(e.whole_row() for e in item.entries)
        return union(parts)

    def has(self, name: str) -> bool | None:
        """Whether the shape has an output column `name`: True, False, or None (unknown)."""
        answer: bool | None = False
        for item in self.items:
            if isinstance(item, Out):
                if item.name == name:
                    return True
                if item.name is None:
                    answer = None  # a name the analyser cannot figure: could be this one
            else:
                for entry in item.entries:
                    found = entry.has(name)
                    if found:
                        return True
                    if found is None:
                        answer = None
        return answer if self.exact else None

    def lookup(self, name: str) -> Sources:
        named = [i.sources for i in self.items if isinstance(i, Out) and i.name == name]
        if named:
            return union(named)
        # Otherwise: a column a `*` expands, from the entries that have or may have it (one
        # that surely lacks it adds nothing).
        parts = [
            e.resolve(name)
            for item in self.items
            if isinstance(item, Star)
            for e in item.entries
            if e.has(name) is not False
        ]
        if parts and all(isinstance(i, Star) or i.name is not None for i in self.items):
            return union(parts)  # (a column found may well have no base sources: a literal)
        # A name the shape does not expose (a PostgreSQL error, or field notation calling a
        # function on the whole row, `s.row_to_json`), or one an output column whose name
        # the analyser did not figure may have: assume it may be any of its values.
        return union(parts) | self.all_sources()

    def positional(self, index: int) -> Sources:
        if self.exact and all(isinstance(i, Out) for i in self.items[: index + 1]):
            if index < len(self.items):
                item = self.items[index]
                assert isinstance(item, Out)
                return item.sources
            return NO_SOURCES
        return self.all_sources()

    def renamed(self, colnames: tuple[str, ...]) -> Shape:
        """The shape seen through a column alias list (`AS s(a, b)`, `WITH c(a, b)`)."""
        if not colnames:
            return self
        if self.exact and all(isinstance(i, Out) for i in self.items):
            items: list[Out | Star] = []
            for index, item in enumerate(self.items):
                assert isinstance(item, Out)
                name = colnames[index] if index < len(colnames) else item.name
                items.append(Out(name, item.sources))
            return Shape(tuple(items), exact=True)
        every = self.all_sources()
        renamed: list[Out | Star] = [Out(name, every) for name in colnames]
        return Shape(tuple(renamed) + self.items, exact=False)

    @staticmethod
    def set_operation(left: Shape, right: Shape) -> Shape:
        """UNION/INTERSECT/EXCEPT: column i comes from column i of either branch."""
        if (
            left.exact
            and right.exact
            and len(left.items) == len(right.items)
            and all(isinstance(i, Out) for i in left.items + right.items)
        ):
            # Every item is an Out (tested just above); cast says so to the type checker.
            lefts = cast("tuple[Out, ...]", left.items)
            rights = cast("tuple[Out, ...]", right.items)
            merged = tuple(
                Out(lo.name, lo.sources | ro.sources) for lo, ro in zip(lefts, rights, strict=True)
            )
            return Shape(merged, exact=True)
        return Shape((Out(None, left.all_sources() | right.all_sources()),), exact=False)


OPAQUE = Shape((), exact=False)


@dataclass(frozen=True, slots=True)
class Entry:
    """A FROM item visible under `alias`: a base relation, a derived table, or a function."""

    alias: str
    relation: RelationRef | None = None
    shape: Shape | None = None
    colnames: tuple[str, ...] = ()

    def resolve(self, column: str) -> Sources:
        if self.relation is not None:
            if column in self.colnames:
                return frozenset({("*", frozenset({self.relation}))})
            return frozenset({(column, frozenset({self.relation}))})
        if self.shape is not None:
            return self.shape.lookup(column)
        return NO_SOURCES

    def has(self, name: str) -> bool | None:
        """Whether the entry has a column `name`: True, False or None (only the catalog knows)."""
        if self.shape is not None:
            return self.shape.has(name)
        return True if name in self.colnames else None

    def whole_row(self) -> Sources:
        if self.relation is not None:
            return frozenset({("*", frozenset({self.relation}))})
        if self.shape is not None:
            return self.shape.all_sources()
        return NO_SOURCES


@dataclass(slots=True)
class Scope:
    """One query level: its FROM entries and WITH names, chained to the enclosing level."""

    parent: Scope | None = None
    entries: list[Entry] = field(default_factory=list)
    ctes: dict[str, Shape] = field(default_factory=dict)

    def find_cte(self, name: str) -> Shape | None:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return scope.ctes[name]
            scope = scope.parent
        return None

    def resolve_column(self, name: str) -> Sources:
        """Sources of an unqualified column `name`, searched level by level as PostgreSQL does.

        At each level every entry that has or may have the column is a candidate; the search
        stops at the first level where some entry surely has it (PostgreSQL takes that level,
        or reports an ambiguity). Entries that surely lack it are skipped.
        """
        parts: list[Sources] = []
        scope: Scope | None = self
        while scope is not None:
            settled = False
            for entry in scope.entries:
                found = entry.has(name)
                if found is False:
                    continue
                parts.append(entry.resolve(name))
                settled = settled or found is True
            if settled:
                break
            scope = scope.parent
        return union(parts)

    def without_entries(self, keep: int = 0) -> Scope:
        """The same query level seen from a non-LATERAL FROM item: the level's WITH names and
        its first `keep` entries (an UPDATE/DELETE/MERGE target), not its other FROM items."""
        return Scope(self.parent, self.entries[:keep], self.ctes)

    def all_entries(self) -> list[Entry]:
        out: list[Entry] = []
        scope: Scope | None = self
        while scope is not None:
            out.extend(scope.entries)
            scope = scope.parent
        return out

    def find_alias(self, name: str) -> list[Entry]:
        """Entries visible as `name`, nearest query level first (as PostgreSQL searches)."""
        scope: Scope | None = self
        while scope is not None:
            found = [e for e in scope.entries if e.alias == name]
            if found:
                return found
            scope = scope.parent
        return []

    def find_qualified(self, qualifier: list[str]) -> list[Entry]:
        """Entries named by `t` or `schema.t` (or `db.schema.t`) in `t.col` / `t.*`."""
        if len(qualifier) == 1:
            return self.find_alias(qualifier[0])
        schema, table = qualifier[-2], qualifier[-1]
        scope: Scope | None = self
        while scope is not None:
            found = [
                e
                for e in scope.entries
                if e.relation is not None
                and e.relation.name == table
                and e.relation.schema in (None, schema)
            ]
            if found:
                return found
            scope = scope.parent
        return []
