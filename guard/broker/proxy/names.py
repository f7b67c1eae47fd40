"""What the client's prepared-statement and portal names mean, as PostgreSQL sees them.

Pure data for `proxy.connection`: no I/O, stdlib and `proxy.gate`'s Decision only.

A Parse, Bind or Close changes a name as soon as it is forwarded, but PostgreSQL may never
carry it out: when an extended-protocol message fails, the server skips every message up
to Sync, so the names those skipped messages would have changed keep their old meaning.
Every change therefore returns an `Undo`, which the connection keeps on the request it
belongs to until PostgreSQL answers it; on a failure the undos of the failed and the
skipped requests are rolled back, newest first. So a later Execute is always decided,
masked and recorded as what actually runs. (An undo that lives on its request needs no
parallel queue that must stay in step with the request FIFO.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.broker.pgwire.messages import FieldDescription
    from guard.broker.proxy.connection import MaskPlan
    from guard.broker.proxy.gate import Decision

# Portals per connection: names come from the client and upstream drops them only at
# transaction end, which pipelining hides from this side, so the oldest are forgotten.
MAX_PORTALS = 4096


class _Gone:
    """An Undo's "the name had no entry"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "GONE"


GONE = _Gone()


class Description:
    """One distinct RowDescription of a connection: its fields, decoded once, and its mask
    plan per list of result formats (the plan cache's key is this object, which a statement
    or portal holds for as long as it uses it: a key that cannot come to mean another)."""

    __slots__ = ("fields", "plans", "view_masked")

    def __init__(self, fields: tuple[FieldDescription, ...], view_masked: int = 0) -> None:
        self.fields = fields
        self.plans: dict[tuple[int, ...] | None, MaskPlan | None] = {}
        # How many of its columns a masking view masked (counted per row in the audit).
        self.view_masked = view_masked


class Prepared:
    """A statement prepared through guard: its decision, the audit records each Execute of
    it writes, and the columns of its result once a Describe of it has told them."""

    __slots__ = ("decision", "records", "description")

    def __init__(self, decision: Decision, records: tuple[bytes, ...]) -> None:
        self.decision = decision
        self.records = records
        self.description: Description | None = None


class Portal:
    """A bound portal: the statement it was bound from (None: not one guard saw parsed,
    so it cannot run), the result formats of the Bind, and its own Describe's answer."""

    __slots__ = ("prepared", "formats", "description")

    def __init__(self, prepared: Prepared | None, formats: tuple[int, ...]) -> None:
        self.prepared = prepared
        self.formats = formats
        self.description: Description | None = None


# What one change did: (table, name, the value before or GONE). Parse, Bind and Close each
# change one name.
Undo = tuple[dict[str, Any], str, object]


class NameTables:
    """Statement and portal names → what they mean, with every change undoable."""

    __slots__ = ("statements", "portals")

    def __init__(self) -> None:
        self.statements: dict[str, Prepared] = {}
        # Upstream keeps a portal's statement even if the name is closed or parsed again,
        # so the portal holds the statement object, not its name.
        self.portals: dict[str, Portal] = {}

    def parse(self, name: str, prepared: Prepared) -> Undo:
        statements = self.statements
        undo = (statements, name, statements.get(name, GONE))
        statements[name] = prepared
        return undo

    def bind(self, name: str, portal: Portal) -> Undo:
        portals = self.portals
        undo = (portals, name, portals.pop(name, GONE))  # re-bound: now the newest
        portals[name] = portal
        if len(portals) > MAX_PORTALS:
            # Executing a forgotten portal is refused (26000), never run unrecorded.
            del portals[next(iter(portals))]
        return undo

    def close(self, kind: bytes, name: str) -> Undo:
        table: dict[str, Any] = self.statements if kind == b"S" else self.portals
        return (table, name, table.pop(name, GONE))

    def rollback(self, undo: Undo) -> None:
        """Give the name of one change back the meaning it had before it."""
        table, name, before = undo
        if before is GONE:
            table.pop(name, None)
        else:
            table[name] = before

    def forget_unnamed(self, undo: Undo) -> None:
        """A Parse or Bind of the unnamed statement or portal failed: there is none now."""
        table, name, _before = undo
        if name == "":
            table.pop("", None)
