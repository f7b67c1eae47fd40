"""Commands the session logic hands to the asyncio shell: imperatives, no decisions.

Imports only the stdlib. The shell (`proxy.server`) executes these in order and decides
nothing; everything that matters for security is decided before a command exists.
"""

from __future__ import annotations

from dataclasses import dataclass


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__, and one or
# two of these are built per relayed message. Nothing holds on to a command.
@dataclass(slots=True)
class SendToServer:
    data: bytes | memoryview


@dataclass(slots=True)
class SendToClient:
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close both sides; `reason` is for the operator log (never holds values)."""

    reason: str


Command = SendToServer | SendToClient | CloseConnection
