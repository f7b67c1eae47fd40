"""Commands the sans-IO core (`proxy.connection`) hands to the asyncio shell: imperatives.

Imports only the stdlib. The shell (`proxy.pump`) executes these in order and decides
nothing; everything that matters for security is decided before a command exists. A
command the shell does not know is a bug, and the shell raises on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.broker.proxy.gate import Decision


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__, and one or
# two of these are built per relayed message. Nothing holds on to a command.
@dataclass(slots=True)
class SendToServer:
    data: bytes | memoryview


@dataclass(slots=True)
class SendToClient:
    data: bytes | memoryview


@dataclass(slots=True)
class WriteAudit:
    """Append these statement records to the audit log, in order, then answer.

    Blocking, and always the last command of its list: the connection is paused until the
    shell calls `audit_written(seqs)` once they are in the log, or `audit_failed()` if they
    cannot be written. Nothing the connection forwards after it is sent before that answer.
    `records` are fixed fields (`audit.serialize.fixed_fields`): the log adds seq and time.
    """

    records: tuple[bytes, ...]


@dataclass(slots=True)
class RequestApproval:
    """Ask for a decision on a held statement, then answer `approval_decided`.

    Blocking, and always the last command of its list: the statement's audit records are
    written (`seqs`), the client has been told the request id, and nothing of the statement
    has been forwarded. The answer comes when people decide, the request expires, or it is
    withdrawn (`withdraw` below, the client's cancel, its disconnect).
    """

    request_id: str
    decision: Decision
    protocol: str  # simple | extended
    seqs: list[int]


@dataclass(slots=True)
class EndApproval:
    """The approved statement is done: take its database grant back, then answer
    `approval_ended`. Blocking: nothing the client sent after it runs with the grant."""

    request_id: str


@dataclass(slots=True)
class RecordResults:
    """Queue result records (values in `audit.record.RESULT_FIELDS` order): what already
    happened upstream, chained at the audit log's next flush. Not blocking."""

    results: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the operator log (`level`: "warning" or "error"): the core logs nothing
    itself. Messages name connections and sessions, never statement values."""

    level: str
    message: str
    exc: BaseException | None = None


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close both sides; `reason` is for the operator log and the audit record of the
    connection's end (it never holds values)."""

    reason: str


Command = (
    SendToServer
    | SendToClient
    | WriteAudit
    | RequestApproval
    | EndApproval
    | RecordResults
    | Log
    | CloseConnection
)
