"""`sql.shape.literal_shape` is libpg_query's normalization wherever it answers, and its
compiled twin (`sql._cshape`) is the same function."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pglast import parser

from guard.broker.sql.fingerprint import normalize
from guard.broker.sql.shape import literal_shape

try:
    from guard.broker.sql import _cshape
except ImportError:  # not built: the equivalence tests skip, the reference is still tested
    _cshape = None  # type: ignore[assignment]

IMPLEMENTATIONS = [pytest.param(literal_shape, id="pure")]
if _cshape is not None:
    IMPLEMENTATIONS.append(pytest.param(_cshape.literal_shape, id="compiled"))


@pytest.mark.parametrize("shape", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # pgbench -M simple: -S, and TPC-B's updates with either sign of the delta
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        ),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 7;",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
        ),
        (
            "UPDATE pgbench_tellers SET tbalance = tbalance + 99 WHERE tid = 3;",
            "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;",
        ),
        ("delete from t where a<>5 and b>=-2.5", "delete from t where a<>$1 and b>=$2"),
        ("select a from t where a = - 5 and b=+6", "select a from t where a = $1 and b=+$2"),
        ("select a from t where a = 5 - 3", "select a from t where a = $1 - $2"),
        ("select a from t where a*5 != 3\n", "select a from t where a*$1 != $2\n"),
        ("select a, b from t", "select a, b from t"),  # nothing to replace: the text itself
        # TPC-B's insert: the items of a VALUES list's rows, signs folded in
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
            "VALUES (7, 1, 48213, -1234, CURRENT_TIMESTAMP);",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
            "VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
        ),
        (
            "insert into t values (1, - 2), (3 + 4, 5)",
            "insert into t values ($1, $2), ($3 + $4, $5)",
        ),
        (
            "select a from t where a in (values (1), (2)) and b = 3",
            "select a from t where a in (values ($1), ($2)) and b = $3",
        ),
    ],
)
def test_plain_statements_get_libpg_querys_normalization(shape, text, expected):
    assert shape(text) == expected
    assert normalize(text) == expected


@pytest.mark.parametrize("shape", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1",  # a number that follows no operator
        "select a from t order by 2",  # a sort position, never a constant
        "select a from t group by 1",
        "select a from t limit 5",
        "select a from t where a in (1, 2)",
        "insert into t values (f(1))",  # deeper than a row's own items
        "insert into t values (1), 2",  # not a row's
        "insert into t values (1) returning a, 5",  # after the list
        "insert into t default values returning (5)",
        "select a from t where a in (values (1)) and b in (2)",
        # after a list, "(" opens no row: a sort expression or type modifier libpg_query keeps
        "select a from t where a in (values (1) order by (2))",
        "select a from t where a in (values (1)) and cast(b as varchar(10)) = c",
        "select a from t where a in (values (1)) order by ((2))",
        "select a::varchar(10) from t",
        "select a from t where a = 'x'",  # quotes, comments, casts, dollar signs
        "select a from t where a = 5 -- note",
        "select a from t where a = 5 /* note */",
        "select a from t where a = $1",
        "select a from t where a = true",  # words libpg_query replaces too
        "select a from t where a = null",
        "select a from t where a = b -5",  # subtraction or sign: not the lexer's to tell
        "select a from t where a = 1 and -5 = b",
        "select a from t where a = - -5",  # libpg_query makes this "$15"
        "select a from t where a = (-5)",
        "select a from t where a = 5e3",  # other number spellings
        "select a from t where a = 0x1F",
        "select a from t where a = 1_000",
        "select a from t where a = 5.",
        "select a from t where a = .5",
        "select a from t where a !=-5",  # one operator "!=-" in PostgreSQL's lexer
        "select f(a => 5)",
        "set work_mem = 5",  # a SET value is not a constant
        "select a from t where a = 5; set work_mem = 5",  # one statement only
        "with x as (select 1) select * from x",
        "select a from t where a = 5 and b = 'é'",
        "",
        "   ",
    ],
)
def test_anything_else_is_left_to_libpg_query(shape, text):
    assert shape(text) is None


_TOKENS = st.sampled_from(
    [
        *("select", "SELECT", "insert", "update", "delete", "set", "with", "values"),
        *("a", "b", "t", "aid", "where", "from", "and", "or", "order", "by", "group"),
        *("limit", "in", "into", "true", "NULL", "x1", "_y", "is", "not", "as", "interval"),
        *("5", "007", "5.5", "5.", ".5", "1_000", "0x1F", "5e3", "123abc"),
        "99999999999999999999999",
        *("=", "<", ">", "<=", ">=", "<>", "!=", "+", "-", "*", "=>", "!", "==", "--"),
        *("/", "||", "::", ":", "=-", "+-", "*-", "!=-", "- -", "/*", "*/"),
        *("(", ")", ",", ".", ";", "'a'", "$1", '"q"', "[", "]", "é"),
    ]
)
_SEPARATORS = st.sampled_from(["", " ", " ", "\n", "\t"])


@st.composite
def _statements(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.tuples(_TOKENS, _SEPARATORS), min_size=1, max_size=14))
    return "".join(token + separator for token, separator in tokens)


# INSERTs with a VALUES list, their rows made of the tokens above and mostly of those
# that matter there (numbers, signs, parentheses, commas, words).
_ROW_TOKENS = st.one_of(
    _TOKENS, st.sampled_from(["(", ")", ",", "5", "-", "- 5", "values", "default", "f"])
)


_ITEMS = st.sampled_from(
    ["5", "-5", "- 5", "5.5", "+5", "5 + -5", "5 - 5", "a", "default", "f(5)", "(5)", "'x'"]
)


@st.composite
def _inserts(draw: st.DrawFn) -> str:
    """Well-formed rows (which libpg_query normalizes) or a row's start and tokens."""
    if draw(st.booleans()):
        rows = draw(st.lists(st.lists(_ITEMS, min_size=1, max_size=4), min_size=1, max_size=3))
        tail = draw(st.sampled_from(["", ";", " returning a", " on conflict (a) do nothing"]))
        listed = ", ".join("(" + ", ".join(row) + ")" for row in rows)
        return f"insert into t values {listed}{tail}"
    tokens = draw(st.lists(st.tuples(_ROW_TOKENS, _SEPARATORS), min_size=1, max_size=14))
    return "insert into t values (" + "".join(t + s for t, s in tokens)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(_statements(), _inserts()))
@example("update t set a = a + - 5 where b = 6")
@example("select a from t where a = 5 .b")
def test_wherever_it_answers_it_is_libpg_querys_answer(text):
    shaped = literal_shape(text)
    if shaped is None:
        return
    try:
        expected = parser.normalize(text)
    except Exception:  # noqa: BLE001 - the text does not parse: neither may its shape
        with pytest.raises(Exception):  # noqa: B017, PT011 - pglast's ParseError or ValueError
            parser.parse_sql(shaped)
        return
    assert shaped == expected


@pytest.mark.skipif(_cshape is None, reason="sql._cshape is not built (no compiler)")
@settings(max_examples=3000, deadline=None)
@given(st.one_of(_statements(), _inserts(), st.text(max_size=40)))
def test_the_compiled_shape_is_the_reference(text):
    assert _cshape.literal_shape(text) == literal_shape(text)
