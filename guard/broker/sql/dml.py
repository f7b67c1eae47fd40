"""Data-modifying statements: INSERT, UPDATE, DELETE and MERGE (also inside WITH).

Imports only the stdlib and the `sql` package (pglast underneath).

Values written (INSERT ... SELECT/VALUES, UPDATE SET, MERGE actions) are WRITE_SOURCE:
copying a protected value into another table would take it out of the policy's reach. The
target of UPDATE/DELETE/MERGE is also *read* (its rows are found by reading them), and so
is an INSERT target with RETURNING or ON CONFLICT. UPDATE/DELETE whose WHERE is missing or
references no column, and MERGE WHEN MATCHED UPDATE/DELETE without an AND condition, are
flagged: they hit every row.
"""

from __future__ import annotations

from typing import Any

from . import model as m
from .expressions import Unsupported
from .lineage import OPAQUE, Entry, Scope, Shape
from .model import ColumnContext as Ctx
from .model import Operation as Op
from .nodes import Body, Node, iter_list, unwrap, walk
from .walker import QueryWalker


def restricts(where: Node | None) -> bool:
    """Whether a WHERE clause can restrict rows at all.

    `WHERE true`, `WHERE 1 = 1` or `WHERE $1` reference no column and pick every row, so an
    UPDATE/DELETE with them is as unrestricted as one with no WHERE (`WHERE CURRENT OF c`
    picks one row and counts as restricting).
    """
    if where is None:
        return False
    return any(kind in ("ColumnRef", "CurrentOfExpr") for kind, _ in walk(*where))


class DmlWalker(QueryWalker):
    """Adds the data-modifying statements; `query` dispatches every query kind."""

    # --- queries -------------------------------------------------------------------------

    def query(self, node: Node | None, scope: Scope, ctx: Ctx) -> Shape:
        if node is None:
            return OPAQUE
        kind, body = node
        if kind == "SelectStmt":
            return self.select(body, scope, ctx)
        if kind == "InsertStmt":
            return self.insert(body, scope, ctx)
        if kind == "UpdateStmt":
            return self.update(body, scope, ctx)
        if kind == "DeleteStmt":
            return self.delete(body, scope, ctx)
        if kind == "MergeStmt":
            return self.merge(body, scope, ctx)
        raise Unsupported(f"{kind} used as a query is not modelled")

    # --- DML -----------------------------------------------------------------------------

    def target_relation(self, body: Body) -> tuple[m.RelationRef, Entry]:
        rv = body.get("relation") or {}
        self.seen.add(id(rv))
        relation = m.RelationRef(rv.get("schemaname"), rv.get("relname", ""))
        self.written.add(relation)
        visible = (rv.get("alias") or {}).get("aliasname", relation.name)
        return relation, Entry(visible, relation=relation)

    def insert(self, body: Body, outer: Scope, ctx: Ctx) -> Shape:
        scope = Scope(parent=outer)
        self.with_clause(body.get("withClause"), scope)
        self.operations.add(Op.INSERT)
        relation, target = self.target_relation(body)
        # Values inserted are copied into the table: WRITE_SOURCE. They cannot see the target.
        self.query(unwrap(body.get("selectStmt")), scope, Ctx.WRITE_SOURCE)
        scope.entries.append(target)
        conflict = body.get("onConflictClause")
        if conflict:
            self.read.add(relation)
            inner = Scope(scope, [Entry("excluded", relation=relation)])
            infer = conflict.get("infer") or {}
            for _, elem in iter_list(infer.get("indexElems")):
                if elem.get("name"):
                    self.emit(frozenset({(elem["name"], frozenset({relation}))}), Ctx.PREDICATE)
                self.expr(unwrap(elem.get("expr")), inner, Ctx.PREDICATE)
            self.expr(unwrap(infer.get("whereClause")), inner, Ctx.PREDICATE)
            if conflict.get("action") == "ONCONFLICT_UPDATE":
                self.operations.add(Op.UPDATE)
                self.set_targets(conflict.get("targetList"), inner)
            self.expr(unwrap(conflict.get("whereClause")), inner, Ctx.PREDICATE)
        return self.returning(body, scope, relation, ctx)

    def update(self, body: Body, outer: Scope, ctx: Ctx) -> Shape:
        scope = Scope(parent=outer)
        self.with_clause(body.get("withClause"), scope)
        self.operations.add(Op.UPDATE)
        relation, target = self.target_relation(body)
        self.read.add(relation)  # rows are found by reading them
        scope.entries.append(target)
        self.from_clause(body.get("fromClause"), scope)
        self.set_targets(body.get("targetList"), scope)
        where = unwrap(body.get("whereClause"))
        if not restricts(where):
            self.flags.add(m.FLAG_UPDATE_WITHOUT_WHERE)
        self.expr(where, scope, Ctx.PREDICATE)
        return self.returning(body, scope, relation, ctx)

    def delete(self, body: Body, outer: Scope, ctx: Ctx) -> Shape:
        scope = Scope(parent=outer)
        self.with_clause(body.get("withClause"), scope)
        self.operations.add(Op.DELETE)
        relation, target = self.target_relation(body)
        self.read.add(relation)
        scope.entries.append(target)
        self.from_clause(body.get("usingClause"), scope)
        where = unwrap(body.get("whereClause"))
        if not restricts(where):
            self.flags.add(m.FLAG_DELETE_WITHOUT_WHERE)
        self.expr(where, scope, Ctx.PREDICATE)
        return self.returning(body, scope, relation, ctx)

    def merge(self, body: Body, outer: Scope, ctx: Ctx) -> Shape:
        scope = Scope(parent=outer)
        self.with_clause(body.get("withClause"), scope)
        self.operations.add(Op.MERGE)
        relation, target = self.target_relation(body)
        self.read.add(relation)
        scope.entries.append(target)
        source = body.get("sourceRelation")
        if source:
            self.from_clause([source], scope)
        self.expr(unwrap(body.get("joinCondition")), scope, Ctx.PREDICATE)
        commands = {"CMD_UPDATE": Op.UPDATE, "CMD_DELETE": Op.DELETE, "CMD_INSERT": Op.INSERT}
        for _, clause in iter_list(body.get("mergeWhenClauses")):
            op = commands.get(clause.get("commandType", ""))
            if op is not None:
                self.operations.add(op)
            condition = unwrap(clause.get("condition"))
            matched = clause.get("matchKind") != "MERGE_WHEN_NOT_MATCHED_BY_TARGET"
            if matched and op in (Op.UPDATE, Op.DELETE) and condition is None:
                # WHEN MATCHED THEN UPDATE/DELETE with no AND: every joined row is hit
                # (with `ON true`, the whole table).
                self.flags.add(m.FLAG_MERGE_UNRESTRICTED)
            self.expr(condition, scope, Ctx.PREDICATE)
            if op is Op.UPDATE:
                self.set_targets(clause.get("targetList"), scope)
            for value in iter_list(clause.get("values")):
                self.expr(value, scope, Ctx.WRITE_SOURCE, bare=True)
        return self.returning(body, scope, relation, ctx)

    def set_targets(self, targets: Any, scope: Scope) -> None:
        for _, target in iter_list(targets):
            self.expr(unwrap(target.get("val")), scope, Ctx.WRITE_SOURCE, bare=True)
            for item in iter_list(target.get("indirection")):
                self.expr(item, scope, Ctx.DERIVED)

    def returning(self, body: Body, scope: Scope, relation: m.RelationRef, ctx: Ctx) -> Shape:
        clause = body.get("returningClause")
        if not clause:
            return Shape(())
        self.read.add(relation)
        shape, _ = self.target_list(clause.get("exprs"), scope, ctx)
        return shape
