"""Expressions and column references: context of each use, and the sources of each value.

Imports only the stdlib and the `sql` package (pglast underneath).

Column context rule (see `model.ColumnContext`): every expression position has a context.
A bare column (or `*`, a whole-row reference, `(c).col`, `c::text`) directly in a target
list takes the target list's context; anything nested in an operator, function, cast,
aggregate or CASE is DERIVED, and everything under WHERE/ON/HAVING/ORDER BY/GROUP BY/window
clauses/DISTINCT ON/LIMIT is PREDICATE. Every expression also returns the base sources its
value is computed from, which is how derived tables pass lineage outward (`lineage.Shape`).

An unqualified column resolves level by level as PostgreSQL does (`Scope.resolve_column`);
a name that is both a column and a FROM alias (`SELECT c FROM customers c`) is recorded as
both: PostgreSQL prefers the column, but without the catalog guard cannot tell.

Anything not modelled raises `Unsupported`: the statement fails closed.
"""

from __future__ import annotations

from . import model as m
from .lineage import NO_SOURCES, Entry, Scope, Shape, Sources
from .lineage import union as _union
from .model import ColumnContext as Ctx
from .model import Operation as Op
from .nodes import (
    CONSTANT_NODES,
    DYNAMIC_SQL_FUNCTIONS,
    DYNAMIC_SQL_TWO_ARG,
    GENERIC_EXPR_NODES,
    ROLE_SETTINGS,
    Body,
    Node,
    children,
    iter_list,
    name_list,
    string_value,
    unwrap,
)


class Unsupported(Exception):
    """The statement contains something the analyser does not model (fail closed)."""


def derive(ctx: Ctx) -> Ctx:
    """Context of a value nested inside an expression that sits in `ctx`."""
    return Ctx.PREDICATE if ctx is Ctx.PREDICATE else Ctx.DERIVED


class ExpressionWalker:
    """Accumulates what one statement reads, writes, calls and how it uses columns."""

    def __init__(self) -> None:
        self.operations: set[Op] = set()
        self.read: set[m.RelationRef] = set()
        self.written: set[m.RelationRef] = set()
        self.columns: dict[m.ColumnUse, None] = {}  # insertion-ordered set
        self.functions: set[str] = set()
        self.flags: set[str] = set()
        self.object_name: str | None = None
        # id() of every ColumnRef/FuncCall/RangeVar body handled, for the completeness check
        # in `statements`: a reference the walk never reached must not pass unseen.
        self.seen: set[int] = set()

    # --- recording -----------------------------------------------------------------------

    def emit(self, sources: Sources, ctx: Ctx) -> None:
        if not sources:
            return
        by_column: dict[str, set[m.RelationRef]] = {}
        for column, candidates in sources:
            if candidates:
                by_column.setdefault(column, set()).update(candidates)
        for column, merged in by_column.items():
            self.columns[m.ColumnUse(column, frozenset(merged), ctx)] = None

    def note_function(self, body: Body) -> None:
        """Record a function call and the flags some built-in functions imply."""
        self.seen.add(id(body))
        parts = name_list(body.get("funcname"))
        self.functions.add(".".join(parts).lower())
        base = parts[-1].lower()
        args = list(iter_list(body.get("args")))
        if base == "set_config":
            # set_config('role', ...) is SET ROLE in function form; a setting name that is
            # not a literal could be anything, so it counts as a role switch.
            setting = self._setting_name(args)
            if setting is None or setting in ROLE_SETTINGS:
                self.flags.add(m.FLAG_ROLE_SWITCH)
            if setting is None or setting == "search_path":
                self.flags.add(m.FLAG_SET_SEARCH_PATH)
        if base in DYNAMIC_SQL_FUNCTIONS or (base in DYNAMIC_SQL_TWO_ARG and len(args) == 2):
            self.flags.add(m.FLAG_DYNAMIC_SQL)

    @staticmethod
    def _setting_name(args: list[Node]) -> str | None:
        """The literal setting name of a set_config call, or None if it is not a literal."""
        node: Node | None = None
        for kind, body in args:
            if kind == "NamedArgExpr" and body.get("name") == "setting_name":
                node = unwrap(body.get("arg"))
        if node is None and args and args[0][0] != "NamedArgExpr":
            node = args[0]  # positional arguments always come first
        value = string_value(node)
        return value.lower() if value is not None else None

    # --- provided by the query walker ----------------------------------------------------

    def query(self, node: Node | None, scope: Scope, ctx: Ctx) -> Shape:
        raise NotImplementedError

    def select(self, body: Body, outer: Scope, ctx: Ctx) -> Shape:
        raise NotImplementedError

    def window(self, body: Body, scope: Scope) -> None:
        for key in ("partitionClause", "orderClause"):
            for item in iter_list(body.get(key)):
                self.expr(item, scope, Ctx.PREDICATE)
        for key in ("startOffset", "endOffset"):
            self.expr(unwrap(body.get(key)), scope, Ctx.PREDICATE)

    # --- expressions ---------------------------------------------------------------------

    def expr(  # noqa: C901 - flat dispatch on the node kind, run for every expression node
        self, node: Node | None, scope: Scope, ctx: Ctx, bare: bool = False
    ) -> Sources:
        """Walk an expression in `ctx`; returns the base sources its value derives from."""
        if node is None:
            return NO_SOURCES
        kind, body = node
        if kind == "ColumnRef":
            return self.column_ref(body, scope, ctx if bare else derive(ctx))
        if kind in CONSTANT_NODES:
            return NO_SOURCES
        if kind == "FuncCall":
            return self.func_call(body, scope, derive(ctx))
        if kind == "TypeCast":
            arg = unwrap(body.get("arg"))
            if bare and arg is not None and arg[0] == "ColumnRef" and self.whole_row(arg[1], scope):
                # `c::text` of a whole row prints the (masked) row: still OUTPUT.
                return self.column_ref(arg[1], scope, derive(ctx), whole_ctx=ctx)
            return self.expr(arg, scope, derive(ctx))
        if kind == "A_Indirection":
            return self.indirection(body, scope, ctx, bare)
        if kind == "SubLink":
            return self.sublink(body, scope, ctx, bare)
        if kind == "MultiAssignRef":  # UPDATE t SET (a, b) = (SELECT ...)
            return self.expr(unwrap(body.get("source")), scope, ctx, bare)
        if kind == "SelectStmt":  # JSON_ARRAY(SELECT ...)
            return self.select(body, scope, derive(ctx)).all_sources()
        if kind == "SortBy":
            return self.expr(unwrap(body.get("node")), scope, Ctx.PREDICATE)
        if kind == "WindowDef":
            self.window(body, scope)
            return NO_SOURCES
        if kind in GENERIC_EXPR_NODES:
            inner = derive(ctx)
            return _union(self.expr(child, scope, inner) for child in children(kind, body))
        raise Unsupported(f"expression node {kind} is not modelled")

    def func_call(self, body: Body, scope: Scope, ctx: Ctx) -> Sources:
        self.note_function(body)
        sources = _union(self.expr(arg, scope, ctx) for arg in iter_list(body.get("args")))
        for item in iter_list(body.get("agg_order")):  # string_agg(x ORDER BY ssn)
            self.expr(item, scope, Ctx.PREDICATE)
        self.expr(unwrap(body.get("agg_filter")), scope, Ctx.PREDICATE)
        if body.get("over"):
            self.window(body["over"], scope)
        return sources

    def sublink(self, body: Body, scope: Scope, ctx: Ctx, bare: bool) -> Sources:
        link = body.get("subLinkType")
        self.expr(unwrap(body.get("testexpr")), scope, derive(ctx))
        if link == "EXISTS_SUBLINK":
            inner = Ctx.OUTPUT  # EXISTS never looks at the values its subquery selects
        elif link == "EXPR_SUBLINK" and bare:
            inner = ctx  # a scalar subquery standing alone passes its value through
        else:
            inner = derive(ctx)
        shape = self.query(unwrap(body.get("subselect")), scope, inner)
        return NO_SOURCES if link == "EXISTS_SUBLINK" else shape.all_sources()

    def indirection(self, body: Body, scope: Scope, ctx: Ctx, bare: bool) -> Sources:
        arg = unwrap(body.get("arg"))
        steps = [step for step in (unwrap(i) for i in body.get("indirection") or ()) if step]
        first = steps[0] if steps else None
        field_ctx = ctx if bare and len(steps) == 1 else derive(ctx)
        if arg is not None and arg[0] == "ColumnRef" and first and first[0] == "String":
            sources = self.field_select(arg[1], str(first[1].get("sval", "")), scope, field_ctx)
        elif arg is not None and arg[0] == "ColumnRef" and first and first[0] == "A_Star":
            sources = self.column_ref(arg[1], scope, field_ctx, whole_ctx=field_ctx)
        else:
            sources = self.expr(arg, scope, derive(ctx))
        for step in steps:
            if step[0] == "A_Indices":
                self.expr(step, scope, derive(ctx))
        return sources

    # --- column references ---------------------------------------------------------------

    def star_entries(self, node: Node | None, scope: Scope) -> tuple[Entry, ...] | None:
        """The entries `*` / `t.*` expands, or None when `node` is not a star reference."""
        if node is None or node[0] != "ColumnRef":
            return None
        names = name_list(node[1].get("fields"))
        if names[-1] != "*":
            return None
        if len(names) == 1:
            return tuple(scope.entries)
        return tuple(scope.find_qualified(names[:-1]) or scope.all_entries())

    @staticmethod
    def whole_row(body: Body, scope: Scope) -> bool:
        names = name_list(body.get("fields"))
        return names[-1] == "*" or (len(names) == 1 and bool(scope.find_alias(names[0])))

    def column_ref(
        self, body: Body, scope: Scope, ctx: Ctx, whole_ctx: Ctx | None = None
    ) -> Sources:
        """Resolve a ColumnRef; a bare name that is also a FROM alias is both a column and
        a whole-row reference (PostgreSQL prefers the column), so both are recorded."""
        self.seen.add(id(body))
        names = name_list(body.get("fields"))
        row_ctx = whole_ctx or ctx
        if names[-1] == "*":
            entries = self.star_entries(("ColumnRef", body), scope) or ()
            sources = _union(e.whole_row() for e in entries)
            self.emit(sources, row_ctx)
            return sources
        if len(names) == 1:
            sources = scope.resolve_column(names[0])
            self.emit(sources, ctx)
            rows = _union(e.whole_row() for e in scope.find_alias(names[0]))
            self.emit(rows, row_ctx)
            return sources | rows
        qualified = scope.find_qualified(names[:-1]) or scope.all_entries()
        sources = _union(e.resolve(names[-1]) for e in qualified)
        self.emit(sources, ctx)
        return sources

    def field_select(self, body: Body, field: str, scope: Scope, ctx: Ctx) -> Sources:
        """`(c).ssn`, `(c.*).ssn` or `(compositecol).field`."""
        self.seen.add(id(body))
        names = name_list(body.get("fields"))
        if names[-1] == "*":
            entries = self.star_entries(("ColumnRef", body), scope) or ()
            sources = _union(e.resolve(field) for e in entries)
            self.emit(sources, ctx)
            return sources
        if len(names) == 1:
            rows = _union(e.resolve(field) for e in scope.find_alias(names[0]))
            self.emit(rows, ctx)
            column = scope.resolve_column(names[0])
            self.emit(column, ctx)
            return rows | column
        return self.column_ref(body, scope, ctx)
