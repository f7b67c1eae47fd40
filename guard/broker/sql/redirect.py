"""Redirection: point reads of protected tables at their masking views (DESIGN §3, layer 2).

Pure: imports pglast and the stdlib. The session role may not read a protected base table
(the database backstop), and its `search_path` starts with the masking views' schema, so an
unqualified `customers` already reads masked rows. Every other spelling that PostgreSQL
resolves to the base table would be `permission denied` where the security contract wants a
masked read, so the statement text is spliced at the parser's token offsets:

* `public.customers`, `"public"."customers"`, `U&"\\0070ublic".customers`, `demo.public.x`
  in a FROM/USING/MERGE source → `guard_masked.customers` (the alias, if any, kept: the
  relation's own name stays its reference name, so `customers.ssn`, `c.*` and whole-row
  references still work); `ONLY` is kept (a view accepts it); `TABLE t` is a FROM too;
* 3- and 4-part column references to such a table (`public.customers.ssn`) → `customers.ssn`;
* `COPY t [(cols)] TO …` of a protected table → `COPY (SELECT cols FROM view) TO …` (a view
  cannot be copied from as a relation);
* `t TABLESAMPLE method (p) [REPEATABLE (s)]` → `(SELECT * FROM view WHERE random() < p/100)`
  with the alias kept (a view cannot be sampled; a Bernoulli sample of the masked rows is the
  masked sample; REPEATABLE cannot be honoured and is dropped);
* `SET search_path …` and `set_config('search_path', 'literal', …)` get the masking schema
  first, so a client that sets its own path keeps reading masked views; a computed value
  for set_config cannot be checked and is refused (`Redirect.refusal`).

Writes are never redirected (INSERT/UPDATE/DELETE targets, COPY FROM): the policy decides
them on the base table. The result is verified by parsing it again: the same number of
statements, and nothing left to redirect; otherwise the original text is kept and the
backstop refuses it (fail closed: a failed redirection can only cost a masked read).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from pglast import parser

_NAME_KINDS = frozenset(
    {"UNRESERVED_KEYWORD", "COL_NAME_KEYWORD", "TYPE_FUNC_NAME_KEYWORD", "RESERVED_KEYWORD"}
)
_DOT = "ASCII_46"
_OPEN, _CLOSE = "ASCII_40", "ASCII_41"


@dataclass(frozen=True, slots=True)
class Redirect:
    """A statement string to forward instead of the client's, and what was changed."""

    text: str
    # Protected relations read through their masking views ("public.customers").
    relations: tuple[str, ...] = ()
    # The client's search_path change was given the masking schema first.
    search_path: bool = False
    # Set when the string must be refused instead (e.g. a computed search_path value).
    refusal: str | None = None


def quote_ident(name: str) -> str:
    if name.isidentifier() and name.islower() and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


def _e_literal(value: str) -> str:
    # E'' means the same whatever standard_conforming_strings says.
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class _Token(NamedTuple):
    start: int  # byte offsets in the UTF-8 text, end exclusive
    end: int
    name: str
    kind: str


class _Unsplicable(Exception):
    """The tokens at a node's location are not what its tree says: keep the text as is."""


class _Splicer:
    def __init__(self, sql: str, protected: frozenset[tuple[str, str]], masked: str) -> None:
        self.sql = sql
        self.raw = sql.encode("utf-8")
        self.protected = protected
        self.names = frozenset(name for _, name in protected)
        self.masked = masked
        self._tokens: list[_Token] | None = None
        self._index: dict[int, int] = {}
        self.edits: list[tuple[int, int, bytes]] = []
        self.relations: dict[str, None] = {}
        self.search_path = False
        self.refusal: str | None = None

    # -- tokens ----------------------------------------------------------------------------
    @property
    def tokens(self) -> list[_Token]:
        if self._tokens is None:
            # The scanner counts characters, the parser's locations count bytes (UTF-8).
            if self.sql.isascii():
                offsets: Any = range(len(self.sql) + 1)
            else:
                offsets = [0]
                for char in self.sql:
                    offsets.append(offsets[-1] + len(char.encode("utf-8")))
            self._tokens = [
                _Token(offsets[t.start], offsets[t.end + 1], t.name, t.kind)
                for t in parser.scan(self.sql)
            ]
            self._index = {t.start: i for i, t in enumerate(self._tokens)}
        return self._tokens

    def _at(self, location: int) -> int:
        self.tokens  # noqa: B018 - scans the text and indexes its tokens once
        index = self._index.get(location)
        if index is None:
            raise _Unsplicable(f"no token at {location}")
        return index

    def _name_end(self, index: int) -> int:
        """Index of the last token of one name (a UIDENT's UESCAPE 'c' included)."""
        tokens = self.tokens
        token = tokens[index]
        if token.name not in ("IDENT", "UIDENT") and token.kind not in _NAME_KINDS:
            raise _Unsplicable(f"not a name: {token.name}")
        if (
            token.name == "UIDENT"
            and index + 2 < len(tokens)
            and tokens[index + 1].name == "UESCAPE"
        ):
            return index + 2
        return index

    def _qualified(self, location: int, parts: int) -> tuple[int, int]:
        """(first, last) token indexes of a dotted name of `parts` names at `location`."""
        first = index = self._at(location)
        for part in range(parts):
            index = self._name_end(index)
            if part < parts - 1:
                if index + 2 >= len(self.tokens) or self.tokens[index + 1].name != _DOT:
                    raise _Unsplicable("dotted name expected")
                index += 2
        return first, index

    def _span(self, first: int, last: int) -> tuple[int, int]:
        return self.tokens[first].start, self.tokens[last].end

    def _close(self, open_index: int) -> int:
        depth = 0
        for i in range(open_index, len(self.tokens)):
            name = self.tokens[i].name
            if name == _OPEN:
                depth += 1
            elif name == _CLOSE:
                depth -= 1
                if depth == 0:
                    return i
        raise _Unsplicable("unbalanced parentheses")

    def _edit(self, start: int, end: int, text: str) -> None:
        self.edits.append((start, end, text.encode("utf-8")))

    def _text(self, start: int, end: int) -> str:
        return self.raw[start:end].decode("utf-8")

    # -- what is protected -----------------------------------------------------------------
    def _protected(self, rv: dict[str, Any]) -> bool:
        schema, name = rv.get("schemaname"), rv.get("relname", "")
        if schema is None:
            return name in self.names
        return (schema, name) in self.protected

    def _parts(self, rv: dict[str, Any]) -> int:
        return 1 + (rv.get("schemaname") is not None) + (rv.get("catalogname") is not None)

    def _view(self, rv: dict[str, Any]) -> str:
        if rv.get("schemaname") is None:
            return quote_ident(rv["relname"])  # the search_path finds the view
        return f"{quote_ident(self.masked)}.{quote_ident(rv['relname'])}"

    def _note(self, rv: dict[str, Any]) -> None:
        self.relations[f"{rv.get('schemaname') or '*'}.{rv['relname']}"] = None

    # -- the walk --------------------------------------------------------------------------
    def walk(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self.walk(item)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in ("fromClause", "usingClause"):
                for item in value:
                    self.from_item(item)
            elif key == "sourceRelation":
                self.from_item(value)
            elif key in _HANDLERS:
                _HANDLERS[key](self, value)
            else:
                self.walk(value)

    def from_item(self, item: Any) -> None:
        if not isinstance(item, dict):
            return
        if "RangeVar" in item:
            self.range_var(item["RangeVar"])
        elif "JoinExpr" in item:
            join = item["JoinExpr"]
            self.from_item(join.get("larg"))
            self.from_item(join.get("rarg"))
            self.walk(join.get("quals"))
        elif "RangeTableSample" in item:
            self.table_sample(item["RangeTableSample"])
        else:
            self.walk(item)

    def range_var(self, rv: dict[str, Any]) -> None:
        if rv.get("schemaname") is None or not self._protected(rv):
            return  # unqualified: the search_path already finds the view
        first, last = self._qualified(rv["location"], self._parts(rv))
        start, end = self._span(first, last)
        self._edit(start, end, self._view(rv))
        self._note(rv)

    def table_sample(self, sample: dict[str, Any]) -> None:
        relation = sample.get("relation", {})
        rv = relation.get("RangeVar") if isinstance(relation, dict) else None
        if rv is None or not self._protected(rv):
            self.walk(sample)
            return
        first, last = self._qualified(rv["location"], self._parts(rv))
        if first > 0 and self.tokens[first - 1].name == "ONLY":
            first -= 1  # ONLY does not apply to a subquery
        # The clause: TABLESAMPLE method ( args ) [ REPEATABLE ( seed ) ]
        keyword = next(
            (i for i in range(last + 1, len(self.tokens)) if self.tokens[i].name == "TABLESAMPLE"),
            None,
        )
        if keyword is None or keyword + 2 >= len(self.tokens):
            raise _Unsplicable("TABLESAMPLE expected")
        args_open = keyword + 2
        if self.tokens[args_open].name != _OPEN:
            raise _Unsplicable("sampling method arguments expected")
        args_close = self._close(args_open)
        clause_end = args_close
        if (
            clause_end + 1 < len(self.tokens)
            and self.tokens[clause_end + 1].name == "REPEATABLE"
            and clause_end + 2 < len(self.tokens)
        ):
            clause_end = self._close(clause_end + 2)
        method = [m.get("String", {}).get("sval") for m in sample.get("method", [])]
        if len(sample.get("args", [])) != 1 or method[-1:] not in (["system"], ["bernoulli"]):
            raise _Unsplicable("only SYSTEM and BERNOULLI samples are redirected")
        percent = self._text(self.tokens[args_open + 1].start, self.tokens[args_close].start)
        alias_start = self.tokens[last].end
        alias = self._text(alias_start, self.tokens[keyword].start).strip()
        name_start, _ = self._span(first, last)
        subquery = f"(SELECT * FROM {self._view(rv)} WHERE pg_catalog.random() * 100 < ({percent}))"
        # One edit over the whole span: the alias moves after the subquery, as it must.
        self._edit(
            name_start,
            self.tokens[clause_end].end,
            f"{subquery} {alias or 'AS ' + quote_ident(rv['relname'])}",
        )
        self._note(rv)
        for arg in sample.get("args", []):
            self.walk(arg)

    def column_ref(self, ref: dict[str, Any]) -> None:
        fields = ref.get("fields", [])
        if len(fields) < 3:
            return
        names = [f.get("String", {}).get("sval") for f in fields[:-1]]
        schema, table = names[-2], names[-1]
        if None in names or (schema, table) not in self.protected:
            return
        first, last = self._qualified(ref["location"], len(names))
        start, end = self._span(first, last)
        self._edit(start, end, quote_ident(table))

    def copy(self, stmt: dict[str, Any]) -> None:
        rv = stmt.get("relation")  # a bare RangeVar here, not a node
        if isinstance(rv, dict) and "RangeVar" in rv:
            rv = rv["RangeVar"]
        if rv is None or stmt.get("is_from") or not self._protected(rv):
            self.walk(stmt.get("query"))
            return
        first, last = self._qualified(rv["location"], self._parts(rv))
        start, end = self._span(first, last)
        columns = "*"
        if last + 1 < len(self.tokens) and self.tokens[last + 1].name == _OPEN:
            close = self._close(last + 1)
            columns = self._text(self.tokens[last + 2].start, self.tokens[close].start).strip()
            end = self.tokens[close].end
        self._edit(start, end, f"(SELECT {columns} FROM {self._view(rv)})")
        self._note(rv)

    def set_statement(self, stmt: dict[str, Any]) -> None:
        if stmt.get("name") != "search_path" or stmt.get("kind") != "VAR_SET_VALUE":
            return
        args = stmt.get("args", [])
        values = [a.get("A_Const", {}).get("sval", {}).get("sval") for a in args]
        if values and values[0] == self.masked:
            return
        if not args or None in values:
            self.refusal = "guard: this search_path value cannot be checked: name the schemas"
            return
        location = args[0]["A_Const"]["location"]
        self._edit(location, location, f"{quote_ident(self.masked)}, ")
        self.search_path = True

    def func_call(self, call: dict[str, Any]) -> None:
        self.search_path_config(call)
        self.walk(call)

    def search_path_config(self, call: dict[str, Any]) -> None:
        names = [n.get("String", {}).get("sval") for n in call.get("funcname", [])]
        if names[-1:] != ["set_config"] or names[:-1] not in ([], ["pg_catalog"]):
            return
        args = call.get("args", [])
        setting = args[0].get("A_Const", {}).get("sval", {}).get("sval") if args else None
        if not isinstance(setting, str) or setting.strip().lower() != "search_path":
            return  # a computed setting name is the analyser's business (a role switch)
        value = args[1].get("A_Const") if len(args) > 1 else None
        text = value.get("sval", {}).get("sval") if isinstance(value, dict) else None
        if not isinstance(text, str) or value is None:
            self.refusal = (
                "guard: set_config('search_path', …) needs a literal value, so that guard "
                "can keep the masking views first"
            )
            return
        first_schema = text.split(",")[0].strip().strip('"')
        if first_schema == self.masked:
            return
        index = self._at(value["location"])
        start, end = self._span(index, index)
        new = f"{quote_ident(self.masked)}, {text}" if text.strip() else quote_ident(self.masked)
        self._edit(start, end, _e_literal(new))
        self.search_path = True

    # -- result ----------------------------------------------------------------------------
    def spliced(self) -> str:
        out = self.raw
        for start, end, text in sorted(self.edits, key=lambda e: e[0], reverse=True):
            out = out[:start] + text + out[end:]
        return out.decode("utf-8")


_HANDLERS = {
    "CopyStmt": _Splicer.copy,
    "VariableSetStmt": _Splicer.set_statement,
    "FuncCall": _Splicer.func_call,
    "ColumnRef": _Splicer.column_ref,
}


def _splice(
    sql: str, protected: frozenset[tuple[str, str]], masked: str
) -> tuple[_Splicer, int] | None:
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except Exception:  # noqa: BLE001 - the analyser reports unparseable text
        return None
    splicer = _Splicer(sql, protected, masked)
    statements = tree.get("stmts", [])
    try:
        splicer.walk(statements)
    except (_Unsplicable, KeyError, IndexError, TypeError, AttributeError):
        return None
    return splicer, len(statements)


def _mentions(sql: str, protected: frozenset[tuple[str, str]]) -> bool:
    lowered = sql.lower()
    if "search_path" in lowered or "u&" in lowered:
        return True
    return any(name.lower() in lowered for _, name in protected)


def redirect(sql: str, protected: frozenset[tuple[str, str]], masked: str) -> Redirect | None:
    """The text to forward instead of `sql`, or None when it is fine as it is (or cannot be
    redirected: then it runs as written and the database's rights decide)."""
    if not _mentions(sql, protected):
        return None
    result = _splice(sql, protected, masked)
    if result is None:
        return None
    splicer, count = result
    if splicer.refusal is not None:
        return Redirect(sql, refusal=splicer.refusal)
    if not splicer.edits:
        return None
    text = splicer.spliced()
    again = _splice(text, protected, masked)
    if again is None or again[1] != count or again[0].edits or again[0].refusal:
        return None  # not what was meant: run the original, the backstop refuses it
    return Redirect(
        text, relations=tuple(r for r in splicer.relations), search_path=splicer.search_path
    )


def iter_edits(sql: str, protected: frozenset[tuple[str, str]], masked: str) -> Iterator[str]:
    """The replacement texts `redirect` would splice in (for tests and `guard policy
    explain`)."""
    result = _splice(sql, protected, masked)
    if result is not None:
        for _start, _end, text in sorted(result[0].edits):
            yield text.decode("utf-8")


# Tokens libpg_query's normalization replaces with a parameter ($n): one constant, or a
# minus sign and the number it negates.
_CONSTANTS = frozenset({"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"})
_NUMBERS = frozenset({"ICONST", "FCONST"})
_MINUS = "ASCII_45"


def refill(sql: str, normalized: str, forward: str) -> str | None:
    """`forward` (the redirection of `normalized`, `sql` with its constants replaced by
    $n) with those constants put back: what `redirect(sql)` gives, for a statement run
    with ever new literals, without parsing it twice more. None when the texts do not
    line up token for token, or the result does not normalize back to `forward` exactly
    (a constant the redirection moved or added): then the caller redirects `sql` itself.

    The check is the guarantee: a text that normalizes to `forward` is `forward` with
    constants in its parameters' places, in order, so it reads what `forward` reads."""
    try:
        values = _constants(sql, normalized)
        if values is None:
            return None
        parts, at = [], 0
        for token in parser.scan(forward):
            text = forward[token.start : token.end + 1]
            if token.name == "PARAM" and text in values:
                parts += [forward[at : token.start], values[text]]
                at = token.end + 1
        candidate = "".join(parts) + forward[at:]
        if str(parser.normalize(candidate)) != forward:
            return None
    except Exception:  # noqa: BLE001 - the scanner's errors: redirect the text itself
        return None
    return candidate


def _constants(sql: str, normalized: str) -> dict[str, str] | None:
    """The constant each of `normalized`'s new parameters ($n) stands for in `sql`, as
    written; None when the two texts are not the same tokens but for those."""
    exact, shape = parser.scan(sql), parser.scan(normalized)
    params = [t for t in exact if t.name == "PARAM"]
    existing = max((int(sql[t.start + 1 : t.end + 1]) for t in params), default=0)
    values: dict[str, str] = {}
    i = 0
    for token in shape:
        text = normalized[token.start : token.end + 1]
        if i >= len(exact):
            return None
        start = exact[i].start
        if token.name == "PARAM" and int(text[1:]) > existing:
            if exact[i].name == _MINUS and i + 1 < len(exact):
                i += 1  # a negative number: the sign is part of the constant
                if exact[i].name not in _NUMBERS:
                    return None
            elif exact[i].name not in _CONSTANTS:
                return None
            values[text] = sql[start : exact[i].end + 1]
        elif sql[start : exact[i].end + 1] != text:
            return None
        i += 1
    return values if i == len(exact) else None
