"""Which implementation of the relay's byte scanning runs: compiled, or pure Python.

`guard.broker.pgwire._cframe` (C, built by setup.py when a compiler is there) frames server
and client messages, reads the names of Query, Parse, Bind, Describe/Close and Execute, and
splits and builds the DataRows the gateway masks; `guard.broker.pgwire.parser` (and
`encoder.data_row`) do the same in pure Python and are the reference
(tests/pgwire/test_speedups.py holds the two equal, errors included). The compiled one is
used when it was built, unless GUARD_PURE_PYTHON is set (to anything but "" or "0"), read
once, at import. Without a build the pure one runs, silently: a missing compiler is said
at install time, not to users.

This tiny module is the one place that reads the environment for it: pgwire and the
sans-IO core may not import os (tests/test_import_rules.py), so they take what is picked
here (`proxy.connection` passes `scan` to its parsers). Imports os, pgwire and nothing else.
"""

from __future__ import annotations

import os
from types import ModuleType

from guard.broker.pgwire import encoder, parser
from guard.broker.pgwire.parser import Scan


def _compiled() -> ModuleType | None:
    if os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from guard.broker.pgwire import _cframe
    except ImportError:  # not built (no compiler at install time): the reference runs
        return None
    return _cframe


_c = _compiled()
COMPILED: bool = _c is not None

# The framing loop handed to the parsers; None: their own (pure) loop.
scan: Scan | None = _c.scan if _c is not None else None
cstring_body = _c.cstring_body if _c is not None else parser.cstring_body
execute_portal = _c.execute_portal if _c is not None else parser.execute_portal
parse_statement = _c.parse_statement if _c is not None else parser.parse_statement
bind_names = _c.bind_names if _c is not None else parser.bind_names
describe_target = _c.describe_target if _c is not None else parser.describe_target
data_rows = _c.data_rows if _c is not None else parser.data_rows
data_row = _c.data_row if _c is not None else encoder.data_row
join_small = _c.join_small if _c is not None else encoder.join_small
