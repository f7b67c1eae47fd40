"""The normalized text of the simplest literal-bearing statements, without a parse.

Imports nothing. `literal_shape(text)` is `fingerprint.normalize(text)` (libpg_query's
normalization: constants replaced by $1, $2, ...) for the statements clients that inline
their values send most (pgbench -M simple, ORMs without binds):
`SELECT abalance FROM pgbench_accounts WHERE aid = 48213;`,
`UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 7;`. For any other
text it returns None and the caller asks libpg_query, whose parse costs ~7 µs a statement
on this machine (5 % of the gateway's time under `guard exec -- pgbench -S -M simple`).

Why the answer is libpg_query's, or None, never something else: it accepts only texts whose
every token is of a kind whose normalization is plain, and says None at the first other.
- One statement that starts with SELECT, INSERT, UPDATE or DELETE (so no SET value or
  option list, whose numbers are not constants), made only of ASCII words, unsigned
  numbers, the operators = < > <= >= <> != + - * and ( ) , . ; (no quotes, comments,
  dollar signs, casts or brackets: nothing whose inside is not tokens).
- No TRUE, FALSE or NULL (libpg_query replaces those words too).
- Every number follows an operator (so it is an operand of an expression, a constant
  libpg_query replaces: never an ORDER BY or GROUP BY position, a LIMIT, a type modifier
  or an IN list, which it would not replace or this code would have to understand), or
  opens an item of a VALUES list's row (`VALUES (1, -2), (3, 4)`: the number right after
  a row's "(" or ",", at the row's own depth, is an expression of its own, a constant;
  TPC-B's INSERT, whose text was decided and cached anew each time without this).
- A minus that follows an operator (or opens a VALUES item) and precedes a number is the
  constant's sign (PostgreSQL folds it in: `= -5` is `= $1`); a minus between a word and
  a number may be either (`b -5` subtracts, `AND -5` is a sign), so that text is None.
A text that is not valid SQL may still get an answer; its normalized text then does not
parse either, so the decision on it is a refusal and the gate decides the exact text, as
it does when libpg_query fails. `tests/sql/test_shape.py` holds this to libpg_query with
Hypothesis, and the compiled twin (`sql/_cshape.c`, picked in `proxy.speedups`) to this.
"""

from __future__ import annotations

_LEADS = frozenset(("select", "insert", "update", "delete"))
_CONSTANT_WORDS = frozenset(("true", "false", "null"))
_OPERATOR_CHARS = frozenset("*<>=!+-")
# Operators a number may follow. '!' only in "!=": any other run with it keeps a trailing
# +/- in PostgreSQL's lexer ("!-5" is one operator), which this code does not follow.
_OPERATORS = frozenset(("=", "<", ">", "<=", ">=", "<>", "!=", "+", "-", "*"))
_PUNCTUATION = frozenset("(),.;")
_SPACE = frozenset(" \t\n\r\f\v")
_DIGITS = frozenset("0123456789")
_WORD_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_WORD = _WORD_START | _DIGITS

# Token kinds, for what the previous token was.
_START, _WORD_TOKEN, _NUMBER, _OPERATOR, _OPEN = range(5)
# Where a VALUES list stands: not in one, its word just read (a "(" must follow), or in it.
_NO_VALUES, _VALUES_WORD, _IN_VALUES = range(3)


def literal_shape(text: str) -> str | None:  # noqa: C901 - one lexer, read top to bottom
    """libpg_query's normalization of `text` when it is of the plain kind above, else None."""
    if not text.isascii():
        return None
    n = len(text)
    out: list[str] = []
    copied = 0  # text[:copied] is in out
    params = 0
    previous = _START
    ended = False  # a ';' was seen: only space may follow
    last_operator = ""
    values = _NO_VALUES
    depth = 0  # in a VALUES list: 1 inside a row, more in its items' parentheses
    i = 0
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
            continue
        if ended:
            return None
        if c in _WORD_START:
            j = i + 1
            while j < n and text[j] in _WORD:
                j += 1
            word = text[i:j].lower()
            if previous is _START and word not in _LEADS:
                return None
            if word in _CONSTANT_WORDS:
                return None
            if word == "values":
                values = _VALUES_WORD
            elif values is _VALUES_WORD or depth == 0:
                values = _NO_VALUES  # a word between or after the rows ends the list
            previous, i = _WORD_TOKEN, j
            continue
        if previous is _START:
            return None
        number = -1  # where the digits of a constant starting at i are
        if c in _OPERATOR_CHARS:
            j = i + 1
            while j < n and text[j] in _OPERATOR_CHARS:
                j += 1
            if "--" in text[i:j]:
                return None  # a comment, or a double sign
            if "!" not in text[i:j]:
                # PostgreSQL's lexer: a run of 2+ ends in + or - only if it has a character
                # like ! ~ @; otherwise the trailing signs are tokens of their own.
                while j - i > 1 and text[j - 1] in "+-":
                    j -= 1
            operator = text[i:j]
            if operator not in _OPERATORS:
                return None
            if operator == "-":
                k = j
                while k < n and text[k] in _SPACE:
                    k += 1
                if k < n and text[k] in _DIGITS:
                    if (previous is _OPERATOR and last_operator != "-") or (
                        previous is _OPEN and values is _IN_VALUES and depth == 1
                    ):
                        number = k  # a sign: the constant starts at it ("= - 5" is "= $1")
                    elif previous is not _NUMBER:
                        # "b -5" subtracts, "AND -5" and "(-5" are signs, and libpg_query
                        # misplaces a doubled sign ("- -5"): not this code's to tell.
                        return None
            if number < 0:
                last_operator = operator
                previous, i = _OPERATOR, j
                continue
        elif c in _DIGITS:
            if previous is not _OPERATOR and not (
                previous is _OPEN and values is _IN_VALUES and depth == 1
            ):
                return None
            number = i
        elif c in _PUNCTUATION:
            if c == "." and (previous is _NUMBER or (i + 1 < n and text[i + 1] in _DIGITS)):
                # ".5" is a number; "5 .b" does not parse, but "$1 .b" would (a field of
                # a parameter): its shape must not be a statement the text is not.
                return None
            if c == ";":
                ended = True
            elif c == "(":
                if values is _VALUES_WORD:
                    values = _IN_VALUES  # its first row
                if values is _IN_VALUES:
                    depth += 1
            elif c == ")" and values is _IN_VALUES:
                if depth == 0:
                    values = _NO_VALUES  # the parenthesis around the whole list closes
                else:
                    depth -= 1
            previous = _OPEN if c in "(," else _WORD_TOKEN if c in ").;" else previous
            i += 1
            continue
        else:
            return None
        # A constant, from i (its sign or its first digit) to the end of its number.
        end = _number_end(text, number)
        if end is None:
            return None
        params += 1
        out += (text[copied:i], f"${params}")
        copied, previous, i = end, _NUMBER, end
    if previous is _START:
        return None
    if not params:
        return text
    out.append(text[copied:])
    return "".join(out)


def _number_end(text: str, i: int) -> int | None:
    """Where the unsigned number at `i` ends: digits, optionally '.' and digits; None when
    what follows would make it another token (5e3, 0x1F, 1_000, 5., 5.a, 123abc)."""
    n = len(text)
    j = i
    while j < n and text[j] in _DIGITS:
        j += 1
    if j < n and text[j] == ".":
        j += 1
        if j >= n or text[j] not in _DIGITS:
            return None
        while j < n and text[j] in _DIGITS:
            j += 1
    if j < n and (text[j] in _WORD or text[j] == "."):
        return None
    return j
