"""The parse tree as libpg_query's JSON gives it, and what each node kind means to guard.

Imports only pglast and the stdlib. `pglast.parser.parse_sql_json` (2-10 us) is used instead of
`pglast.parse_sql` (40-150 us) because analysis sits on the proxy hot path, so the tree here
is plain dicts: a node is `{"TypeName": {fields}}`, a NIL list item is `{}`, a nested list is
`{"List": {"items": [...]}}`, and fields whose C type is a specific node pointer
(`RangeVar *relation`) hold the node body without its type wrapper. `children` uses pglast's
own field metadata to re-wrap those, so a generic walk never mistakes a typed child for data.

The statement tables classify every statement node type the analyser accepts; a node type
in none of them is unknown and its statement fails closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pglast import ast

Body = dict[str, Any]
Node = tuple[str, Body]


def _node_classes() -> dict[str, type]:
    return {
        name: cls
        for name in dir(ast)
        if isinstance(cls := getattr(ast, name), type) and issubclass(cls, ast.Node)
    }


_CLASSES = _node_classes()
_GENERIC_POINTERS = frozenset({"Node*", "List*", "Expr*"})


def _field_table() -> dict[str, dict[str, str | None]]:
    """Per node type: field -> None (a wrapped node or list of them) or the unwrapped type."""
    table: dict[str, dict[str, str | None]] = {}
    for name, cls in _CLASSES.items():
        slots = getattr(cls, "__slots__", None)
        if not isinstance(slots, dict):
            continue
        fields: dict[str, str | None] = {}
        for field, info in slots.items():
            c_type = info.c_type
            if c_type in _GENERIC_POINTERS:
                fields[field] = None
            elif c_type.rstrip("*") in _CLASSES and c_type.rstrip("*") not in ("Node", "Expr"):
                # `CreateStmt base` (CreateForeignTableStmt) is embedded without a pointer.
                fields[field] = c_type.rstrip("*")
        table[name] = fields
    return table


_FIELDS = _field_table()


def unwrap(value: Any) -> Node | None:
    """`{"Type": body}` -> ("Type", body); NIL (`{}` or None) -> None."""
    if value.__class__ is not dict or not value:
        return None
    item: Node  # an annotation only: no check at run time
    for item in value.items():  # the single (type, body) pair; cheaper than unpacking
        return item
    return None


def iter_list(value: Any) -> Iterator[Node]:
    """Wrapped nodes of a List field, flattening nested `List` nodes and skipping NIL."""
    if not value:
        return
    for item in value:
        node = unwrap(item)
        if node is None:
            continue
        if node[0] == "List":
            yield from iter_list(node[1].get("items"))
        else:
            yield node


def children(kind: str, body: Body) -> Iterator[Node]:
    """Every child node of a node, typed children re-wrapped; scalars are skipped."""
    if kind == "List":
        yield from iter_list(body.get("items"))
        return
    fields = _FIELDS.get(kind, {})
    for field, value in body.items():
        if field not in fields or not value:
            continue
        typed = fields[field]
        if typed is not None:
            if isinstance(value, list):  # not produced by libpg_query, but cheap to accept
                for item in value:
                    yield typed, item
            else:
                yield typed, value
        elif isinstance(value, list):
            yield from iter_list(value)
        else:
            node = unwrap(value)
            if node is not None:
                if node[0] == "List":
                    yield from iter_list(node[1].get("items"))
                else:
                    yield node


def first_unseen(  # noqa: C901 - `children` inlined on purpose: it runs over every statement
    kind: str, body: Body, tracked: frozenset[str], seen: set[int]
) -> str | None:
    """Kind of the first `tracked` node in the subtree whose body id is not in `seen`.

    The same traversal as `children`, inlined because it runs over every analysed
    statement; TypeName subtrees are skipped (identifiers there are type modifiers).
    """
    stack: list[Node] = [(kind, body)]
    pop, push = stack.pop, stack.append
    while stack:
        node_kind, node_body = pop()
        if node_kind in tracked and id(node_body) not in seen:
            return node_kind
        if node_kind == "TypeName":
            continue
        if node_kind == "List":
            pending: list[Any] = [node_body.get("items") or ()]
        else:
            fields = _FIELDS.get(node_kind)
            if not fields:
                continue
            pending = []
            for field, value in node_body.items():
                if not value or field not in fields:
                    continue
                typed = fields[field]
                if typed is not None:
                    push((typed, value))
                elif value.__class__ is list:
                    pending.append(value)
                else:
                    for item in value.items():
                        push(item)
        for items in pending:
            for item in items:
                if item:
                    for pair in item.items():
                        push(pair)
    return None


def walk(kind: str, body: Body) -> Iterator[Node]:
    """Pre-order walk of a subtree (iterative: DDL trees may be deep)."""
    stack: list[Node] = [(kind, body)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(children(*node))


def string_value(node: Node | None) -> str | None:
    """The text of a `String` node or of a string constant, else None."""
    if node is None:
        return None
    kind, body = node
    if kind == "String":
        return str(body.get("sval", ""))
    if kind == "A_Const" and "sval" in body:
        return str(body["sval"].get("sval", ""))
    if kind == "TypeCast":
        return string_value(unwrap(body.get("arg")))
    return None


def name_list(items: Any) -> list[str]:
    """A qualified name (flat list of `String`) as its parts; A_Star becomes '*'."""
    parts: list[str] = []
    for item in items or ():
        string = item.get("String")
        if string is not None:
            parts.append(str(string.get("sval", "")))
        else:
            parts.append("*" if "A_Star" in item else "?")
    return parts


# --- statement classification --------------------------------------------------------------

# Role and privilege management. ALTER ROLE/USER can also change what a role is (password,
# attributes, per-role settings such as `role`), so those two also count as role switching.
DCL_NODES = frozenset(
    {
        "GrantStmt",
        "GrantRoleStmt",
        "CreateRoleStmt",
        "AlterRoleStmt",
        "AlterRoleSetStmt",
        "DropRoleStmt",
        "AlterDefaultPrivilegesStmt",
        "ReassignOwnedStmt",
        "DropOwnedStmt",
        "CreateUserMappingStmt",
        "AlterUserMappingStmt",
        "DropUserMappingStmt",
    }
)
ROLE_ALTERING_NODES = frozenset({"AlterRoleStmt", "AlterRoleSetStmt"})

# Schema changes, plus maintenance and server administration (VACUUM/ANALYZE rewrite planner
# statistics, LOAD loads a shared library, CHECKPOINT is server-wide): none of it is data
# access the policy models, so all of it is DDL and a policy has to allow it explicitly.
_DDL_EXTRA = frozenset(
    {
        "DefineStmt",
        "IndexStmt",
        "RuleStmt",
        "ViewStmt",
        "RenameStmt",
        "CommentStmt",
        "SecLabelStmt",
        "CompositeTypeStmt",
        "ImportForeignSchemaStmt",
        "CreatedbStmt",
        "DropdbStmt",
        "ClusterStmt",
        "VacuumStmt",
        "ReindexStmt",
        "RefreshMatViewStmt",
        "CheckPointStmt",
        "LoadStmt",
        "TruncateStmt",
        "CreateTableAsStmt",
        "AlterSystemStmt",
    }
)
DDL_NODES = (
    frozenset(
        name
        for name in _CLASSES
        if name.endswith("Stmt") and name.startswith(("Create", "Alter", "Drop"))
    )
    | _DDL_EXTRA
) - DCL_NODES

TRANSACTION_NODES = frozenset({"TransactionStmt", "ConstraintsSetStmt"})
SESSION_NODES = frozenset({"VariableSetStmt", "VariableShowStmt", "DiscardStmt"})

# Settings whose change switches the identity privileges are checked against.
ROLE_SETTINGS = frozenset({"role", "session_authorization"})

# Functions that run SQL given to them as a string (or read a cursor opened elsewhere): the
# analyser cannot see that SQL, so reads inside it would bypass lineage and gating.
# ts_rewrite only does so in its two-argument form `ts_rewrite(tsquery, text)`.
DYNAMIC_SQL_FUNCTIONS = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "ts_stat",
        "pg_background_launch",
    }
)
DYNAMIC_SQL_TWO_ARG = frozenset({"ts_rewrite"})

# Expression nodes whose children are plain sub-expressions: walking them generically, with
# every child in DERIVED (or PREDICATE) context, is exact. Any expression node not listed
# here or handled explicitly by the walker makes the statement fail closed.
GENERIC_EXPR_NODES = frozenset(
    {
        "A_Expr",
        "BoolExpr",
        "NullTest",
        "BooleanTest",
        "CaseExpr",
        "CaseWhen",
        "CoalesceExpr",
        "MinMaxExpr",
        "RowExpr",
        "A_ArrayExpr",
        "CollateClause",
        "NamedArgExpr",
        "A_Indices",
        "XmlExpr",
        "XmlSerialize",
        "GroupingFunc",
        "ResTarget",
        "List",
        "TypeName",
        "JsonValueExpr",
        "JsonFuncExpr",
        "JsonParseExpr",
        "JsonScalarExpr",
        "JsonSerializeExpr",
        "JsonObjectConstructor",
        "JsonArrayConstructor",
        "JsonArrayQueryConstructor",
        "JsonAggConstructor",
        "JsonObjectAgg",
        "JsonArrayAgg",
        "JsonIsPredicate",
        "JsonKeyValue",
        "JsonArgument",
        "JsonBehavior",
        "JsonOutput",
        "JsonReturning",
        "JsonFormat",
        "JsonTablePathSpec",
        "JsonTableColumn",
        "RangeTableFuncCol",
    }
)
# Leaves that carry no column data.
CONSTANT_NODES = frozenset(
    {
        "A_Const",
        "ParamRef",
        "SQLValueFunction",
        "SetToDefault",
        "MergeSupportFunc",
        "Integer",
        "Float",
        "String",
        "Boolean",
        "BitString",
        "A_Star",
        "CurrentOfExpr",
    }
)
