"""Which build of the sans-IO connection core runs: compiled, or the pure-Python reference.

`guard.broker.proxy._cconnection` is `proxy/connection.py` compiled by Cython as it is (the
declarations that make it faster are in `proxy/connection.pxd`; setup.py builds it when
Cython and a compiler are there). `proxy.connection` stays the reference:
tests/proxy/test_core_twins.py feeds both the same traffic and requires the same commands,
and the rest of the suite runs on the build picked here. The compiled twin is used unless
GUARD_PURE_PYTHON is set (as in `proxy.speedups`), or it was built from another
connection.py than the one beside it (`SOURCE_SHA256`): a stale twin would run code the
reference no longer has, so the reference runs and the log says to rebuild
(`./scripts/bootstrap`, or reinstall).

Imports `proxy.connection`, `proxy.speedups` and the stdlib; only the asyncio shell's
listener (and tests, benches) import this module.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from guard.broker.proxy import connection
from guard.broker.proxy.speedups import compiled_module

log = logging.getLogger("guard.proxy")


def _twin() -> type[connection.GatewayConnection] | None:
    module = compiled_module("guard.broker.proxy._cconnection")
    if module is None:
        return None
    try:
        digest = hashlib.sha256(Path(connection.__file__).read_bytes()).hexdigest()
    except OSError:  # installed without its source: nothing to check the twin against
        digest = None
    if digest is None or getattr(module, "SOURCE_SHA256", None) != digest:
        log.warning(
            "the compiled connection core was built from another proxy/connection.py; "
            "running the pure-Python one (rebuild: ./scripts/bootstrap or reinstall guard)"
        )
        return None
    twin: type[connection.GatewayConnection] = module.GatewayConnection
    return twin


_compiled = _twin()
COMPILED: bool = _compiled is not None
GatewayConnection: type[connection.GatewayConnection] = _compiled or connection.GatewayConnection
