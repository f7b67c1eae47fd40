"""Which implementation of the relay's byte scanning runs: compiled, or pure Python.

(And whether the gate has `guard.broker.sql._cshape`, the compiled `sql.shape.literal_shape`
that normalizes plain statements with inlined values without a parse, held equal to it by
tests/sql/test_sql_shape.py; without it libpg_query normalizes every such statement.)

`guard.broker.pgwire._cframe` (C, built by setup.py when a compiler is there) frames server
and client messages, reads the names of Query, Parse, Bind, Describe/Close and Execute
(one message's, or a whole `[Parse] Bind [Describe] Execute Sync` request's at once), and
splits and builds the DataRows the gateway masks; `guard.broker.pgwire.parser` (and
`encoder.data_row`) do the same in pure Python and are the reference
(tests/pgwire/test_speedups.py holds the two equal, errors included). The compiled one is
used when it was built, unless GUARD_PURE_PYTHON is set (to anything but "" or "0"), read
once, at import. Without a build the pure one runs, silently: a missing compiler is said
at install time, not to users.

This tiny module is the one place that reads the environment for it: pgwire and the
sans-IO core may not import os (tests/test_import_rules.py), so they take what is picked
here (`proxy.connection` passes `scan` to its parsers). Imports os, importlib, pgwire and
nothing else.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from guard.broker.pgwire import encoder, parser
from guard.broker.pgwire.parser import Scan


def compiled_module(name: str) -> ModuleType | None:
    """The compiled module `name`, or None: not built, or GUARD_PURE_PYTHON is set."""
    if os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:  # not built (no compiler at install time): the reference runs
        return None


_c = compiled_module("guard.broker.pgwire._cframe")
_cs = compiled_module("guard.broker.sql._cshape")
COMPILED: bool = _c is not None

# The framing loop handed to the parsers; None: their own (pure) loop.
scan: Scan | None = _c.scan if _c is not None else None
cstring_body = _c.cstring_body if _c is not None else parser.cstring_body
execute_portal = _c.execute_portal if _c is not None else parser.execute_portal
parse_statement = _c.parse_statement if _c is not None else parser.parse_statement
bind_names = _c.bind_names if _c is not None else parser.bind_names
describe_target = _c.describe_target if _c is not None else parser.describe_target
extended_request = _c.extended_request if _c is not None else parser.extended_request
data_rows = _c.data_rows if _c is not None else parser.data_rows
data_row = _c.data_row if _c is not None else encoder.data_row
join_small = _c.join_small if _c is not None else encoder.join_small


def _libpg_query_alone(text: str) -> str | None:
    """Without the build: `sql.shape.literal_shape`, the reference, is slower in Python
    (6 µs) than libpg_query's parse (3 µs idle), so the gate asks libpg_query alone."""
    return None


literal_shape = _cs.literal_shape if _cs is not None else _libpg_query_alone
