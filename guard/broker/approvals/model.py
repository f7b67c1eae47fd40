"""Approval requests and the segregation of duties that decides them (pure, immutable).

Imports only the stdlib, `identity.principal` and `policy.model`. A request is made when a
statement's verdict is `require_approval`; people decide it; this module alone says who
may and what their decisions add up to. The rules are invariants, not settings — no policy
can turn them off, and no group is exempt:

- The approver is never the requester: the same subject under any trusted issuer is the
  same person (an IdP migration must not let alice approve alice).
- The approver's groups come from the approver's own verified token at decision time (the
  caller passes the `Principal` it just verified), never from the request.
- `approvals_required` counts distinct people: one person in two approver groups counts
  once, and deciding twice counts once (the second decision is refused).
- One denial ends the request; an expired, withdrawn or decided request takes no more
  decisions.

Every function returns a new request; nothing is changed in place, so the caller (the
approval service) can persist and audit exactly the value it got.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from guard.broker.identity.principal import Principal


class RequestState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"  # the requester cancelled, disconnected, or the session ended


class NotAllowed(Exception):
    """This person may not decide this request (the message says why, for them)."""


class AlreadyFinal(Exception):
    """The request is no longer pending (the message says in which state)."""


@dataclass(frozen=True, slots=True)
class Person:
    """Who someone was when they acted: identity, and the groups their token carried."""

    issuer: str
    subject: str
    label: str
    groups: frozenset[str]

    @classmethod
    def of(cls, principal: Principal) -> Person:
        return cls(principal.issuer, principal.subject, principal.label, principal.groups)


@dataclass(frozen=True, slots=True)
class Decision:
    approver: Person
    approve: bool
    comment: str
    at: datetime


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    id: str
    session_id: str
    target: str
    requester: Person
    session_reason: str
    # What would run: normalized text (literals replaced by $n), never typed values.
    statement: str
    fingerprint: str
    tables: tuple[str, ...]
    rule_id: str
    approver_groups: frozenset[str]
    approvals_required: int
    # The approval covers the rule's statements in the session for this long; None: only
    # the one statement (same text, same parameters).
    window_seconds: int | None
    created_at: datetime
    expires_at: datetime
    state: RequestState = RequestState.PENDING
    state_reason: str = ""
    decisions: tuple[Decision, ...] = ()

    @property
    def approvers(self) -> tuple[Person, ...]:
        """The distinct people who approved, in order."""
        seen: dict[str, Person] = {}
        for d in self.decisions:
            if d.approve:
                seen.setdefault(d.approver.subject, d.approver)
        return tuple(seen.values())

    @property
    def final(self) -> bool:
        return self.state is not RequestState.PENDING


def why_not(request: ApprovalRequest, approver: Principal, now: datetime) -> str | None:
    """Why `approver` may not decide `request` now; None when they may."""
    if request.state is RequestState.PENDING and now >= request.expires_at:
        return "the request has expired"
    if request.final:
        return f"the request is already {request.state.value}"
    if approver.subject == request.requester.subject:
        return "you made this request: someone else must decide it (segregation of duties)"
    if not approver.groups & request.approver_groups:
        groups = ", ".join(sorted(request.approver_groups))
        return f"only members of {groups} may decide this request"
    if any(d.approver.subject == approver.subject for d in request.decisions):
        return "you have already decided this request; another approver must decide"
    return None


def decide(
    request: ApprovalRequest,
    approver: Principal,
    *,
    approve: bool,
    comment: str,
    now: datetime,
) -> ApprovalRequest:
    """The request with this person's decision added (and its state, if that settles it).

    Raises AlreadyFinal when the request is not pending (or has just expired), NotAllowed
    when segregation of duties or the approver groups rule this person out.
    """
    reason = why_not(request, approver, now)
    if reason is not None:
        if request.final or now >= request.expires_at:
            raise AlreadyFinal(reason)
        raise NotAllowed(reason)
    decisions = (*request.decisions, Decision(Person.of(approver), approve, comment, now))
    decided = replace(request, decisions=decisions)
    if not approve:
        return replace(decided, state=RequestState.DENIED, state_reason=comment)
    if len(decided.approvers) >= request.approvals_required:
        return replace(decided, state=RequestState.APPROVED)
    return decided


def expire(request: ApprovalRequest, now: datetime) -> ApprovalRequest:
    """The request expired if it is still pending at or after its expiry; else unchanged."""
    if request.final or now < request.expires_at:
        return request
    return replace(request, state=RequestState.EXPIRED, state_reason="no decision in time")


def withdraw(request: ApprovalRequest, reason: str) -> ApprovalRequest:
    """The request withdrawn (cancel, disconnect, session end) if still pending."""
    if request.final:
        return request
    return replace(request, state=RequestState.WITHDRAWN, state_reason=reason)
