"""Events the shell feeds to the sans-IO core besides bytes: past-tense facts, no logic.

Imports only the stdlib and `pgwire.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass

from guard.broker.pgwire.messages import ErrorResponse


@dataclass(frozen=True, slots=True)
class ApprovalDecided:
    """The request of a held statement is settled.

    Approved: the statement runs now; `per_statement` says its database grant covers only
    it (the core then asks for `EndApproval` once it completed), else the grant is the
    session's for an approval window. Not approved (denied, expired, withdrawn): `error`
    is what the client gets in its place, and the session goes on.
    """

    request_id: str
    approved: bool
    error: ErrorResponse | None = None
    per_statement: bool = True
