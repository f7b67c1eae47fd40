"""Statement fingerprints and normalized text, for audit records and grouping.

Imports only pglast. The fingerprint (libpg_query's, as used by pg_stat_statements-like
tools) ignores constants, whitespace and comments, so audit records and caches can group
`SELECT * FROM t WHERE id = 1` with `select * from t where id=2`. The normalized text
replaces constants with $n so an audit record does not keep the values a client typed
(libpg_query leaves comments and the inner text of PREPARE/COPY file names as they are).
"""

from __future__ import annotations

from pglast import parser


def fingerprint(text: str) -> str:
    """Fingerprint of one statement's text; '' when the text does not parse on its own."""
    try:
        return str(parser.fingerprint(text))
    except Exception:  # pglast raises ParseError, or ValueError on odd input: no id then
        return ""


UNNORMALIZABLE = "<statement text withheld: it could not be normalized>"


def normalize(text: str) -> str:
    """`text` with its constants replaced by $1, $2, ...; a placeholder if that fails."""
    try:
        return str(parser.normalize(text))
    except Exception:  # never fall back to the raw text: it may hold typed values
        return UNNORMALIZABLE
