"""Which build of the sans-IO connection core and of its asyncio shell runs: compiled, or
the pure-Python references.

`guard.broker.proxy._cconnection` is `proxy/connection.py` compiled by Cython as it is (the
declarations that make it faster are in `proxy/connection.pxd`), and
`guard.broker.proxy._cpump` is `proxy/pump.py`, the shell that moves a connection's bytes
and executes its commands, compiled the same way with `proxy/pump.pxd`, and
`guard.broker.proxy._cnames` is `proxy/names.py` (the core's twin imports it; setup.py
builds all three when Cython and a compiler are there). `proxy.connection`, `proxy.pump`
and `proxy.names` stay the references: tests/proxy/test_core_twins.py feeds both cores
the same traffic and requires the same commands, and the rest of the suite runs on the
builds picked here. A twin is used unless GUARD_PURE_PYTHON is set (as in
`proxy.speedups`), or it was built from another source than the one beside it
(`SOURCE_SHA256`): a stale twin would run code the reference no longer has, so the
reference runs and the log says to rebuild (`./scripts/bootstrap`, or reinstall).

Imports `proxy.connection`, `proxy.names`, `proxy.pump`, `proxy.speedups` and the stdlib;
only the asyncio shell's listener (and tests, benches) import this module.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import ModuleType

from guard.broker.proxy import connection, names, pump
from guard.broker.proxy.speedups import compiled_module

log = logging.getLogger("guard.proxy")


def _twin(reference: ModuleType, name: str, what: str) -> ModuleType | None:
    """The compiled twin `name` of the module `reference`, or None (the reference runs)."""
    module = compiled_module(name)
    if module is None:
        return None
    try:
        digest = hashlib.sha256(Path(reference.__file__ or "").read_bytes()).hexdigest()
    except OSError:  # installed without its source: nothing to check the twin against
        digest = None
    if digest is None or getattr(module, "SOURCE_SHA256", None) != digest:
        source = Path(reference.__file__ or "?").name
        log.warning(
            "the compiled %s was built from another proxy/%s; running the pure-Python one "
            "(rebuild: ./scripts/bootstrap or reinstall guard)",
            what,
            source,
        )
        return None
    return module


_cconnection = _twin(connection, "guard.broker.proxy._cconnection", "connection core")
# The core's twin runs on the name tables' twin (`_cnames`, names.py compiled; setup.py):
# without a current one, the reference core runs.
if _cconnection is not None and _twin(names, "guard.broker.proxy._cnames", "name tables") is None:
    _cconnection = None
_cpump = _twin(pump, "guard.broker.proxy._cpump", "connection shell")
COMPILED: bool = _cconnection is not None
PUMP_COMPILED: bool = _cpump is not None
GatewayConnection: type[connection.GatewayConnection] = (
    _cconnection.GatewayConnection if _cconnection is not None else connection.GatewayConnection
)
Pump: type[pump.Pump] = _cpump.Pump if _cpump is not None else pump.Pump
