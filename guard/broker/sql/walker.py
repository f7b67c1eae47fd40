"""Queries: SELECT with its clauses, set operations, VALUES, WITH and FROM items.

Imports only the stdlib and the `sql` package (pglast underneath).

The target-list context is OUTPUT at the top level and in RETURNING, WRITE_SOURCE under
INSERT ... SELECT / VALUES, UPDATE SET and CREATE TABLE AS, and, for a scalar subquery, the
context the subquery itself sits in (see `expressions`).

Subqueries, CTEs and VALUES in FROM are walked with OUTPUT for their own bare target columns;
that is sound because every outer reference to them resolves through their `Shape` to the
base columns behind it and is recorded again in the outer reference's own context. So
`SELECT upper(x) FROM (SELECT ssn AS x FROM customers) s` records `ssn` both as OUTPUT
(inside) and as DERIVED (outside), and the DERIVED use decides.

ORDER BY 1 and ORDER BY <output alias> sort by an output column, so the expression behind
it is recorded as PREDICATE too, and so are the outputs of INTERSECT/EXCEPT (they filter by
comparing values). UNION, like DISTINCT, stays OUTPUT: it only removes duplicate rows.
"""

from __future__ import annotations

from typing import Any

from . import model as m
from .expressions import ExpressionWalker, Unsupported
from .lineage import NO_SOURCES, OPAQUE, Entry, Out, Scope, Shape, Star
from .lineage import union as _union
from .model import ColumnContext as Ctx
from .model import Operation as Op
from .nodes import Body, Node, children, iter_list, name_list, string_value, unwrap

Target = tuple[str | None, Node | None]
_RECURSIVE_PASSES = 5


# Expressions PostgreSQL's FigureColname cannot name: their output column is "?column?".
_UNNAMED = frozenset({"A_Const", "ParamRef", "BoolExpr", "NullTest", "BooleanTest"})


def _figure_name(node: Node | None) -> str | None:
    """The output column name PostgreSQL gives an unnamed target (FigureColname, simplified).

    None means "not figured here": lineage then treats the column as possibly having any
    name, so a simplification can only cost precision, never hide a use.
    """
    if node is None:
        return None
    kind, body = node
    if kind == "ColumnRef":
        last = name_list(body.get("fields"))[-1]
        return None if last == "*" else last
    if kind == "FuncCall":
        return name_list(body.get("funcname"))[-1]
    if kind in _UNNAMED:
        return "?column?"
    if kind == "A_Expr":
        return "nullif" if body.get("kind") == "AEXPR_NULLIF" else "?column?"
    if kind == "TypeCast":
        # The argument's name when it has a strong one, else the type's (left unfigured).
        name = _figure_name(unwrap(body.get("arg")))
        return None if name == "?column?" else name
    if kind == "A_Indirection":
        names = [string_value(unwrap(i)) for i in body.get("indirection") or ()]
        named = [n for n in names if n is not None]
        return named[-1] if named else _figure_name(unwrap(body.get("arg")))
    return None


def _placeholder(cte: Body) -> Shape:
    """A recursive CTE before its first pass: its column names, no sources.

    The names are the alias list or else those of the first (non-recursive) term's targets,
    which is where PostgreSQL takes them from; OPAQUE when a `*` hides them.
    """
    names: list[str | None] = list(name_list(cte.get("aliascolnames")))
    if not names:
        node = unwrap(cte.get("ctequery"))
        if node is None or node[0] != "SelectStmt":
            return OPAQUE
        body = node[1]
        while body.get("op", "SETOP_NONE") != "SETOP_NONE" and body.get("larg"):
            body = body["larg"]
        if body.get("valuesLists"):
            first = unwrap(body["valuesLists"][0])
            width = len(first[1].get("items", [])) if first and first[0] == "List" else 0
            names = [f"column{i + 1}" for i in range(width)]
        for _, target in iter_list(body.get("targetList")):
            value = unwrap(target.get("val"))
            if value is not None and value[0] == "ColumnRef":
                if name_list(value[1].get("fields"))[-1] == "*":
                    return OPAQUE
            names.append(target.get("name") or _figure_name(value))
    return Shape(tuple(Out(name, NO_SOURCES) for name in names))


class QueryWalker(ExpressionWalker):
    """Walks SELECT statements and FROM clauses."""

    def select(self, body: Body, outer: Scope, ctx: Ctx) -> Shape:
        scope = Scope(parent=outer)
        self.with_clause(body.get("withClause"), scope)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            left = self.select(body.get("larg") or {}, scope, ctx)
            right = self.select(body.get("rarg") or {}, scope, ctx)
            shape = Shape.set_operation(left, right)
            if body["op"] != "SETOP_UNION":
                # INTERSECT/EXCEPT keep or drop rows by comparing the values of both sides:
                # `SELECT ssn FROM customers INTERSECT SELECT '123-45-6789'` is an oracle.
                self.emit(shape.all_sources(), Ctx.PREDICATE)
            self.ordering(body.get("sortClause"), scope, None, shape)
            self.limits(body, scope)
            return shape
        if body.get("valuesLists"):
            shape = self.values(body["valuesLists"], scope, ctx)
            self.ordering(body.get("sortClause"), scope, None, shape)
            self.limits(body, scope)
            return shape
        self.from_clause(body.get("fromClause"), scope)
        shape, targets = self.target_list(body.get("targetList"), scope, ctx)
        self.expr(unwrap(body.get("whereClause")), scope, Ctx.PREDICATE)
        self.expr(unwrap(body.get("havingClause")), scope, Ctx.PREDICATE)
        self.grouping(body.get("groupClause"), scope, targets)
        self.ordering(body.get("distinctClause"), scope, targets, None, True)  # DISTINCT: NIL
        for _, window in iter_list(body.get("windowClause")):
            self.window(window, scope)
        self.ordering(body.get("sortClause"), scope, targets, None, True)
        self.limits(body, scope)
        for _, lock in iter_list(body.get("lockingClause")):  # FOR UPDATE OF <aliases>
            self.seen.update(id(rv) for _, rv in iter_list(lock.get("lockedRels")))
        return shape

    def values(self, rows: list[Any], scope: Scope, ctx: Ctx) -> Shape:
        columns: list[set[tuple[str, frozenset[m.RelationRef]]]] = []
        for row in rows:
            node = unwrap(row)
            items = node[1].get("items", []) if node and node[0] == "List" else []
            for index, item in enumerate(items):
                if index == len(columns):
                    columns.append(set())
                columns[index] |= self.expr(unwrap(item), scope, ctx, bare=True)
        outs = tuple(Out(f"column{i + 1}", frozenset(s)) for i, s in enumerate(columns))
        return Shape(outs)

    def target_list(self, targets: Any, scope: Scope, ctx: Ctx) -> tuple[Shape, list[Target]]:
        items: list[Out | Star] = []
        named: list[Target] = []
        for _, target in iter_list(targets):
            value = unwrap(target.get("val"))
            name = target.get("name") or _figure_name(value)
            star = self.star_entries(value, scope)
            sources = self.expr(value, scope, ctx, bare=True)
            items.append(Star(star) if star is not None else Out(name, sources))
            named.append((name, value))
        return Shape(tuple(items)), named

    def with_clause(self, clause: Body | None, scope: Scope) -> None:
        if not clause:
            return
        ctes = [body for _, body in iter_list(clause.get("ctes"))]
        if clause.get("recursive"):
            self.recursive_ctes(ctes, scope)
        else:
            for cte in ctes:  # a later CTE sees the earlier ones, not itself
                scope.ctes[cte["ctename"]] = self.cte_shape(cte, scope)
        for cte in ctes:
            shape = scope.ctes[cte["ctename"]]
            # SEARCH ... SET col / CYCLE ... USING path output the listed columns' values.
            for key, field in (
                ("search_clause", "search_col_list"),
                ("cycle_clause", "cycle_col_list"),
            ):
                for column in name_list((cte.get(key) or {}).get(field)):
                    self.emit(shape.lookup(column), Ctx.DERIVED)

    def recursive_ctes(self, ctes: list[Body], scope: Scope) -> None:
        """WITH RECURSIVE, where every CTE sees every other one and itself.

        Iterates to a fixpoint so that a reference through a later or self-referencing CTE
        still reaches the base columns (one pass would resolve it to nothing). Each CTE
        starts as its column names with no sources (`_placeholder`), so that a pass never
        resolves one of its columns to an outer relation. The fixpoint compares whole shapes,
        column by column: sources that move between columns (`SELECT c, a, b FROM t`) keep
        the iteration going. Only the uses recorded by the settling pass are kept (the
        earlier ones saw unfinished shapes); a WITH that does not settle fails closed.
        """
        for cte in ctes:
            scope.ctes[cte["ctename"]] = _placeholder(cte)
        limit = _RECURSIVE_PASSES + len(ctes) + sum(len(s.items) for s in scope.ctes.values())
        for _ in range(limit):
            before = dict(scope.ctes)
            recorded = dict(self.columns)
            for cte in ctes:
                scope.ctes[cte["ctename"]] = self.cte_shape(cte, scope)
            if scope.ctes == before:
                return
            self.columns = recorded
        raise Unsupported("the column lineage of a WITH RECURSIVE does not settle")

    def cte_shape(self, cte: Body, scope: Scope) -> Shape:
        shape = self.query(unwrap(cte.get("ctequery")), scope, Ctx.OUTPUT)
        return shape.renamed(tuple(name_list(cte.get("aliascolnames"))))

    def grouping(self, items: Any, scope: Scope, targets: list[Target] | None) -> None:
        """GROUP BY: a bare column groups by the very value the output shows.

        The contract requires `GROUP BY ssn` to work with masked values: through the masking
        view the grouping key *is* the masked value, so a bare column is an OUTPUT use.
        Grouping by an expression, a position or a grouping set stays a PREDICATE (oracle).
        """
        for kind, body in iter_list(items):
            if kind == "ColumnRef":
                self.expr((kind, body), scope, Ctx.OUTPUT, bare=True)
            else:
                self.order_item((kind, body), scope, targets, None)

    def ordering(
        self,
        items: Any,
        scope: Scope,
        targets: list[Target] | None,
        shape: Shape | None,
        output_first: bool = False,
    ) -> None:
        for kind, body in iter_list(items):
            node = unwrap(body.get("node")) if kind == "SortBy" else (kind, body)
            self.order_item(node, scope, targets, shape, output_first)

    def order_item(
        self,
        node: Node | None,
        scope: Scope,
        targets: list[Target] | None,
        shape: Shape | None,
        output_first: bool = False,
    ) -> None:
        """One ORDER BY / DISTINCT ON / GROUP BY item (always a PREDICATE use).

        A bare name may be an output column. ORDER BY and DISTINCT ON (`output_first`) take
        an output column of that name before any input column (PostgreSQL's SQL92 rule), so
        then the name is not also resolved as an input column; GROUP BY prefers the input
        column, so there the name stays both.
        """
        if node is None:
            return
        kind, body = node
        if kind == "GroupingSet":
            for child in iter_list(body.get("content")):
                self.order_item(child, scope, targets, shape, output_first)
            return
        if kind == "A_Const" and "ival" in body:
            self.order_position(int(body["ival"].get("ival", 0)) - 1, scope, targets, shape)
            return
        if kind == "ColumnRef":
            names = name_list(body.get("fields"))
            if len(names) == 1:  # may name an output column (ORDER BY alias)
                matched = [value for name, value in targets or () if name == names[0]]
                for value in matched:
                    self.expr(value, scope, Ctx.PREDICATE)
                if shape is not None:
                    self.emit(shape.lookup(names[0]), Ctx.PREDICATE)
                if matched and output_first:
                    self.seen.add(id(body))
                    return
        self.expr(node, scope, Ctx.PREDICATE)

    def order_position(
        self, index: int, scope: Scope, targets: list[Target] | None, shape: Shape | None
    ) -> None:
        """ORDER BY 1 / GROUP BY 1 sort by an output column: an oracle on that column."""
        if targets is not None:
            # After a `*` positions are unknown without the catalog: take every target.
            star = any(self.star_entries(v, scope) is not None for _, v in targets)
            chosen = targets if star or index < 0 else targets[index : index + 1]
            for _, value in chosen:
                self.expr(value, scope, Ctx.PREDICATE, bare=True)
        if shape is not None:
            self.emit(shape.positional(index), Ctx.PREDICATE)

    def limits(self, body: Body, scope: Scope) -> None:
        self.expr(unwrap(body.get("limitCount")), scope, Ctx.PREDICATE)
        self.expr(unwrap(body.get("limitOffset")), scope, Ctx.PREDICATE)

    # --- FROM ----------------------------------------------------------------------------

    def from_clause(self, items: Any, scope: Scope) -> None:
        """Add the FROM items of a query level to `scope`, in order.

        A LATERAL subquery (and a function, XMLTABLE or JSON_TABLE, always lateral) sees the
        FROM items before it; any other subquery does not, so its unqualified names skip them
        and resolve further out (PostgreSQL's `p_lateral_only` items). Entries already in the
        scope (an UPDATE/DELETE/MERGE target) stay visible.
        """
        plain = scope.without_entries(len(scope.entries))
        for item in iter_list(items):
            scope.entries.extend(self.from_item(item, scope, plain))

    def from_item(self, node: Node, scope: Scope, plain: Scope) -> list[Entry]:
        """Entries of one FROM item; `scope` is what a LATERAL item sees, `plain` what any
        other subquery sees (the same level without the FROM items before this one)."""
        kind, body = node
        alias = body.get("alias") or {}
        colnames = tuple(name_list(alias.get("colnames")))
        if kind == "RangeVar":
            return [self.range_var(body, scope)]
        if kind == "RangeSubselect":
            visible = scope if body.get("lateral") else plain
            shape = self.query(unwrap(body.get("subquery")), visible, Ctx.OUTPUT)
            return [Entry(alias.get("aliasname", ""), shape=shape.renamed(colnames))]
        if kind == "JoinExpr":
            return self.join(body, scope, plain)
        if kind == "RangeFunction":
            self.range_function(body, scope)
            return [Entry(alias.get("aliasname", ""), colnames=colnames)]
        if kind == "RangeTableSample":
            entries = self.from_item(unwrap(body.get("relation")) or ("", {}), scope, plain)
            for item in iter_list(body.get("args")):
                self.expr(item, scope, Ctx.DERIVED)
            self.expr(unwrap(body.get("repeatable")), scope, Ctx.DERIVED)
            return entries
        if kind in ("RangeTableFunc", "JsonTable"):  # XMLTABLE / JSON_TABLE
            for child in children(kind, body):
                if child[0] != "Alias":
                    self.expr(child, scope, Ctx.DERIVED)
            return [Entry(alias.get("aliasname", ""))]
        raise Unsupported(f"FROM item {kind or 'NIL'} is not modelled")

    def range_function(self, body: Body, scope: Scope) -> None:
        """`FROM f(x)` / `ROWS FROM (f(x), g(y))`: each function call is a DERIVED use."""
        for item in body.get("functions") or ():
            pair = unwrap(item)
            items = pair[1].get("items", []) if pair and pair[0] == "List" else []
            if items:
                self.expr(unwrap(items[0]), scope, Ctx.DERIVED)

    def range_var(self, body: Body, scope: Scope) -> Entry:
        self.seen.add(id(body))
        name: str = body["relname"]
        schema = body.get("schemaname")
        alias = body.get("alias") or {}
        colnames = tuple(name_list(alias.get("colnames")))
        visible = alias.get("aliasname", name)
        if schema is None:
            cte = scope.find_cte(name)
            if cte is not None:
                return Entry(visible, shape=cte.renamed(colnames))
        relation = m.RelationRef(schema, name)
        self.read.add(relation)
        self.operations.add(Op.READ)
        return Entry(visible, relation=relation, colnames=colnames)

    def join(self, body: Body, scope: Scope, plain: Scope) -> list[Entry]:
        left = self.from_item(unwrap(body.get("larg")) or ("", {}), scope, plain)
        # A LATERAL right side sees the left side and the FROM items before the join.
        right = self.from_item(unwrap(body.get("rarg")) or ("", {}), Scope(scope, left), plain)
        entries = left + right
        # ON sees only the join's own items (and outer levels), not the other FROM items.
        inner = Scope(plain, list(entries))
        using = name_list(body.get("usingClause"))
        for column in using:
            self.emit(_union(e.resolve(column) for e in entries), Ctx.PREDICATE)
        if body.get("isNatural"):
            # NATURAL joins on every common column name, which only the catalog knows.
            self.emit(_union(e.whole_row() for e in entries), Ctx.PREDICATE)
        self.expr(unwrap(body.get("quals")), inner, Ctx.PREDICATE)
        out = list(entries)
        alias = body.get("alias")
        if alias:
            shape = Shape((Star(tuple(entries)),)).renamed(tuple(name_list(alias.get("colnames"))))
            out.append(Entry(alias.get("aliasname", ""), shape=shape))
        using_alias = body.get("join_using_alias")
        if using_alias:
            outs = tuple(Out(c, _union(e.resolve(c) for e in entries)) for c in using)
            out.append(Entry(using_alias.get("aliasname", ""), shape=Shape(outs)))
        return out
