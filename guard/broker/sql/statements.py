"""Top-level statements: what each kind of statement does, and how nested ones combine.

Imports only the stdlib and the `sql` package (pglast underneath). Queries and expressions
are walked by `dml.DmlWalker` (built on `walker` and `expressions`); this module adds
utility statements and wrappers:

* EXPLAIN ANALYZE runs its statement, so the inner operations apply; plain EXPLAIN only
  plans it, so it counts as EXPLAIN that reads the inner relations (lineage and flags kept:
  row estimates on a protected column are an oracle too).
* PREPARE ... AS stmt is analysed through stmt (operations of stmt plus PREPARE); SQL-level
  EXECUTE name is flagged `execute_prepared`: its statement is not in the text.
* DECLARE CURSOR is analysed through its query; FETCH/MOVE/CLOSE are UTILITY.
* COPY is COPY plus READ (TO) or INSERT (FROM) of the relation, or the operations of
  `COPY (query)`; where the data goes is a flag (`copy_to_stdout`, `copy_file`, ...).
* DDL and DCL are not modelled in detail: their operation decides; relations, function
  calls and column references anywhere inside are still collected (conservatively).
* Any other statement kind fails closed.
"""

from __future__ import annotations

from collections.abc import Callable

from . import model as m
from .dml import DmlWalker
from .expressions import Unsupported
from .lineage import Entry, Scope
from .model import ColumnContext as Ctx
from .model import Operation as Op
from .nodes import (
    DCL_NODES,
    DDL_NODES,
    ROLE_ALTERING_NODES,
    ROLE_SETTINGS,
    SESSION_NODES,
    TRANSACTION_NODES,
    Body,
    Node,
    first_unseen,
    iter_list,
    name_list,
    string_value,
    unwrap,
    walk,
)

# EXPLAIN option values PostgreSQL's parse_bool reads as false; anything else (including
# values it would reject) is treated as ANALYZE, the conservative reading.
_FALSE_WORDS = frozenset({"f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0"})


def _relation(rv: Body) -> m.RelationRef:
    return m.RelationRef(rv.get("schemaname"), rv.get("relname", ""))


# Node kinds whose every occurrence the walk must have handled (column uses, function calls,
# relations). TypeName is not descended into: identifiers there are type modifiers.
_TRACKED = frozenset({"ColumnRef", "FuncCall", "RangeVar"})


def _find_into(body: Body) -> Body | None:
    """The INTO clause of SELECT ... INTO, wherever the grammar attached it."""
    into: Body | None = body.get("intoClause")
    if into:
        return into
    for key in ("larg", "rarg"):
        if body.get(key):
            found = _find_into(body[key])
            if found is not None:
                return found
    return None


class StatementWalker(DmlWalker):
    """Analyses one top-level statement into the accumulators of `QueryWalker`."""

    def statement(self, kind: str, body: Body) -> None:
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, body)
        elif kind in DCL_NODES:
            if kind in ROLE_ALTERING_NODES:
                # ALTER ROLE/USER changes what a role may do (attributes, password, per-role
                # `SET role`): refused like SET ROLE.
                self.flags.add(m.FLAG_ROLE_SWITCH)
            self.ddl_like(kind, body, Op.DCL)
        elif kind in DDL_NODES:
            self.ddl_like(kind, body, Op.DDL)
        else:
            raise Unsupported(f"statement type {kind} is not modelled")

    def _target(self, rv: Body) -> m.RelationRef:
        """A relation the statement creates or writes as a whole (not a FROM item)."""
        self.seen.add(id(rv))
        return _relation(rv)

    def nested(self, node: Node | None) -> None:
        if node is None:
            raise Unsupported("statement without a body")
        self.statement(*node)

    # --- data statements -----------------------------------------------------------------

    def select_stmt(self, body: Body) -> None:
        self.operations.add(Op.READ)
        into = _find_into(body)
        if into is not None:
            # SELECT ... INTO creates a table and copies the rows into it.
            self.operations.add(Op.DDL)
            self.written.add(self._target(into.get("rel") or {}))
            self.select(body, Scope(), Ctx.WRITE_SOURCE)
        else:
            self.select(body, Scope(), Ctx.OUTPUT)

    def dml_stmt(self, kind: str, body: Body) -> None:
        self.query((kind, body), Scope(), Ctx.OUTPUT)

    def create_table_as(self, body: Body) -> None:
        self.operations.add(Op.DDL)
        self.written.add(self._target((body.get("into") or {}).get("rel") or {}))
        inner = unwrap(body.get("query"))
        if inner is not None and inner[0] == "SelectStmt":
            self.operations.add(Op.READ)
            self.select(inner[1], Scope(), Ctx.WRITE_SOURCE)
        else:
            self.nested(inner)  # CREATE TABLE AS EXECUTE name

    def view_stmt(self, body: Body) -> None:
        self.operations.add(Op.DDL)
        self.written.add(self._target(body.get("view") or {}))
        # A view definition copies column values to a new, unprotected name.
        self.query(unwrap(body.get("query")), Scope(), Ctx.WRITE_SOURCE)

    def copy_stmt(self, body: Body) -> None:
        self.operations.add(Op.COPY)
        is_from = bool(body.get("is_from"))
        if body.get("is_program"):
            self.flags.add(m.FLAG_COPY_PROGRAM)
        elif body.get("filename") is not None:
            self.flags.add(m.FLAG_COPY_FILE)
        else:
            self.flags.add(m.FLAG_COPY_FROM_STDIN if is_from else m.FLAG_COPY_TO_STDOUT)
        query = unwrap(body.get("query"))
        if query is not None:
            self.nested(query)  # COPY (query) TO: the query decides
            return
        relation = self._target(body.get("relation") or {})
        columns = name_list(body.get("attlist")) or ["*"]
        if is_from:
            self.operations.add(Op.INSERT)
            self.written.add(relation)
            scope = Scope(entries=[Entry(relation.name, relation=relation)])
            self.expr(unwrap(body.get("whereClause")), scope, Ctx.PREDICATE)
        else:
            self.operations.add(Op.READ)
            self.read.add(relation)
            for column in columns:
                self.emit(frozenset({(column, frozenset({relation}))}), Ctx.OUTPUT)

    # --- wrappers ------------------------------------------------------------------------

    def explain(self, body: Body) -> None:
        self.operations.add(Op.EXPLAIN)
        inner = unwrap(body.get("query"))
        analyze = False
        for _, option in iter_list(body.get("options")):
            if option.get("defname") == "analyze":
                analyze = self._option_true(unwrap(option.get("arg")))
        if analyze:
            self.flags.add(m.FLAG_EXPLAIN_ANALYZE)
            self.nested(inner)
            return
        planned = StatementWalker()
        planned.nested(inner)
        self.read |= planned.read | planned.written
        self.columns.update(planned.columns)
        self.functions |= planned.functions
        self.flags |= planned.flags
        self.seen |= planned.seen
        self.object_name = planned.object_name

    @staticmethod
    def _option_true(arg: Node | None) -> bool:
        if arg is None:
            return True
        kind, body = arg
        if kind == "Integer":
            return bool(body.get("ival", 0))
        if kind == "Boolean":
            return bool(body.get("boolval", False))
        value = string_value(arg)
        return value is None or value.lower() not in _FALSE_WORDS

    def prepare(self, body: Body) -> None:
        self.operations.add(Op.PREPARE)
        self.nested(unwrap(body.get("query")))
        self.object_name = body.get("name")

    def execute(self, body: Body) -> None:
        self.operations.add(Op.EXECUTE)
        self.flags.add(m.FLAG_EXECUTE_PREPARED)
        self.object_name = body.get("name")
        for param in iter_list(body.get("params")):
            self.expr(param, Scope(), Ctx.DERIVED)

    def declare_cursor(self, body: Body) -> None:
        self.flags.add(m.FLAG_DECLARE_CURSOR)
        self.nested(unwrap(body.get("query")))
        self.object_name = body.get("portalname")

    def fetch(self, body: Body) -> None:
        self.operations.add(Op.UTILITY)
        self.flags.add(m.FLAG_CURSOR_FETCH)
        self.object_name = body.get("portalname")

    def close_portal(self, body: Body) -> None:
        self.operations.add(Op.UTILITY)
        self.flags.add(m.FLAG_CURSOR_CLOSE)
        self.object_name = body.get("portalname")

    def deallocate(self, body: Body) -> None:
        self.operations.add(Op.UTILITY)
        self.object_name = body.get("name")

    # --- procedural ----------------------------------------------------------------------

    def do_block(self, body: Body) -> None:
        # The body is PL/pgSQL text run by the server: nothing in it is visible to guard.
        self.operations.add(Op.DO)
        self.flags.add(m.FLAG_DYNAMIC_SQL)

    def call(self, body: Body) -> None:
        self.operations.add(Op.CALL)
        self.func_call(body.get("funccall") or {}, Scope(), Ctx.DERIVED)

    # --- session and transaction ---------------------------------------------------------

    def variable_set(self, body: Body) -> None:
        self.operations.add(Op.SESSION)
        self.setting(body)

    def setting(self, body: Body) -> None:
        name = str(body.get("name") or "").lower()
        if name in ROLE_SETTINGS:
            self.flags.add(m.FLAG_ROLE_SWITCH)
        if name == "search_path":
            self.flags.add(m.FLAG_SET_SEARCH_PATH)
        if body.get("kind") == "VAR_RESET_ALL":
            self.flags.update({m.FLAG_SET_SEARCH_PATH, m.FLAG_SESSION_RESET})
        for arg in iter_list(body.get("args")):
            self.expr(arg, Scope(), Ctx.DERIVED)

    def discard(self, body: Body) -> None:
        self.operations.add(Op.SESSION)
        if body.get("target") == "DISCARD_ALL":
            # DISCARD ALL includes RESET ALL: search_path returns to the role default.
            self.flags.update({m.FLAG_SET_SEARCH_PATH, m.FLAG_SESSION_RESET})

    def alter_system(self, body: Body) -> None:
        self.operations.add(Op.DDL)
        self.flags.add(m.FLAG_ALTER_SYSTEM)
        self.setting(body.get("setstmt") or {})

    def truncate(self, body: Body) -> None:
        self.operations.add(Op.DDL)
        self.flags.add(m.FLAG_TRUNCATE)
        for _, rv in iter_list(body.get("relations")):
            self.written.add(self._target(rv))

    def lock(self, body: Body) -> None:
        self.operations.add(Op.UTILITY)
        self.flags.add(m.FLAG_LOCK)
        self.seen.update(id(rv) for _, rv in iter_list(body.get("relations")))

    # --- DDL / DCL -----------------------------------------------------------------------

    def ddl_like(self, kind: str, body: Body, op: Op) -> None:
        """Collect relations, functions and columns anywhere in a schema/role statement."""
        self.operations.add(op)
        columns: list[str] = []
        for child_kind, child in walk(kind, body):
            if child_kind == "RangeVar" and child.get("relname"):
                self.written.add(_relation(child))
            elif child_kind == "FuncCall":
                self.note_function(child)
            elif child_kind == "ColumnRef":
                columns.append(name_list(child.get("fields"))[-1])
        if self.written:
            relations = frozenset(self.written)
            for column in columns:
                self.emit(frozenset({(column, relations)}), Ctx.DERIVED)


def _simple(op: Op) -> Callable[[StatementWalker, Body], None]:
    def handle(walker: StatementWalker, body: Body) -> None:
        walker.operations.add(op)

    return handle


def _dml(kind: str) -> Callable[[StatementWalker, Body], None]:
    def handle(walker: StatementWalker, body: Body) -> None:
        walker.dml_stmt(kind, body)

    return handle


_HANDLERS: dict[str, Callable[[StatementWalker, Body], None]] = {
    "SelectStmt": StatementWalker.select_stmt,
    "InsertStmt": _dml("InsertStmt"),
    "UpdateStmt": _dml("UpdateStmt"),
    "DeleteStmt": _dml("DeleteStmt"),
    "MergeStmt": _dml("MergeStmt"),
    "CreateTableAsStmt": StatementWalker.create_table_as,
    "ViewStmt": StatementWalker.view_stmt,
    "CopyStmt": StatementWalker.copy_stmt,
    "ExplainStmt": StatementWalker.explain,
    "PrepareStmt": StatementWalker.prepare,
    "ExecuteStmt": StatementWalker.execute,
    "DeallocateStmt": StatementWalker.deallocate,
    "DeclareCursorStmt": StatementWalker.declare_cursor,
    "FetchStmt": StatementWalker.fetch,
    "ClosePortalStmt": StatementWalker.close_portal,
    "DoStmt": StatementWalker.do_block,
    "CallStmt": StatementWalker.call,
    "VariableSetStmt": StatementWalker.variable_set,
    "VariableShowStmt": _simple(Op.SESSION),
    "DiscardStmt": StatementWalker.discard,
    "TransactionStmt": _simple(Op.TRANSACTION),
    "ConstraintsSetStmt": _simple(Op.TRANSACTION),
    "ListenStmt": _simple(Op.LISTEN),
    # UNLISTEN only stops deliveries: no data can leave through it (connection poolers
    # such as asyncpg run `UNLISTEN *` on every release), so it is a session reset.
    "UnlistenStmt": _simple(Op.SESSION),
    "NotifyStmt": _simple(Op.NOTIFY),
    "LockStmt": StatementWalker.lock,
    "AlterSystemStmt": StatementWalker.alter_system,
    "TruncateStmt": StatementWalker.truncate,
}
assert SESSION_NODES | TRANSACTION_NODES <= set(_HANDLERS)


def analyze_statement(
    node: Node, text: str, fingerprint: str, normalized: str = ""
) -> m.StatementAnalysis:
    """Analyse one parsed statement; anything not modelled sets `fail_closed`."""
    kind, body = node
    walker = StatementWalker()
    failure: str | None = None
    try:
        walker.statement(kind, body)
        if kind not in DDL_NODES and kind not in DCL_NODES or kind in _HANDLERS:
            missed = first_unseen(kind, body, _TRACKED, walker.seen)
            if missed is not None:
                raise Unsupported(f"a {missed} in a {kind} was not analysed")
    except Unsupported as exc:
        failure = str(exc)
    except RecursionError:
        failure = "statement is nested too deeply to analyse"
    operations = frozenset(walker.operations) or frozenset({Op.UNKNOWN})
    if any(f.rpartition(".")[2] == "pg_notify" for f in walker.functions):
        # pg_notify() is NOTIFY in function form: a channel that carries values to any
        # listener outside guard, so the policy must allow `notify` for it too.
        operations |= {Op.NOTIFY}
    if failure is not None:
        operations |= {Op.UNKNOWN}
    return m.StatementAnalysis(
        text=text,
        command=kind,
        operations=operations,
        relations_read=frozenset(walker.read),
        relations_written=frozenset(walker.written),
        columns=tuple(walker.columns),
        functions=frozenset(walker.functions),
        flags=frozenset(walker.flags),
        fail_closed=failure,
        fingerprint=fingerprint,
        object_name=walker.object_name,
        normalized=normalized,
    )
