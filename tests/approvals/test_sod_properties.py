"""Segregation of duties (approvals/model.py), as properties over generated principals.

Principals come from small sets of issuers, subjects and groups, so the interesting
collisions (the requester under another issuer, one person in two approver groups, the
same person twice) happen in most examples. Times are fixed values, never the clock.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.broker.approvals.model import (
    AlreadyFinal,
    ApprovalRequest,
    Decision,
    NotAllowed,
    Person,
    RequestState,
    decide,
    expire,
    why_not,
    withdraw,
)
from guard.broker.identity.principal import Principal
from tests.approvals.approval_examples import (
    ALICE,
    BOB,
    CAROL,
    GROUPS,
    T0,
    TTL,
    group_sets,
    issuers,
    principal,
    principals,
    request,
    requests,
)

SOD = settings(max_examples=200, deadline=None)

# Instants while the request is open (T0 .. T0 + TTL, exclusive) and once it has expired.
open_times = st.integers(0, int(TTL.total_seconds()) - 1).map(lambda s: T0 + timedelta(seconds=s))
late_times = st.integers(0, 10**6).map(lambda s: T0 + TTL + timedelta(seconds=s))

# A decision attempt: who, approve or deny, a comment.
attempts = st.tuples(principals, st.booleans(), st.sampled_from(("", "ok", "INC-123 checked")))


def eligible(req: ApprovalRequest, who: Principal) -> bool:
    """May `who` ever decide `req`, whatever else happened (not the requester, a member)?"""
    return who.subject != req.requester.subject and bool(who.groups & req.approver_groups)


def attempt(
    req: ApprovalRequest, who: Principal, approve: bool, comment: str = "", *, now=T0
) -> tuple[ApprovalRequest, Exception | None]:
    """decide(), with a refusal returned instead of raised; the input must stay unchanged."""
    before = copy.deepcopy(req)
    try:
        after = decide(req, who, approve=approve, comment=comment, now=now)
    except (NotAllowed, AlreadyFinal) as refused:
        assert req == before
        return req, refused
    assert req == before  # (g) decide never changes its input
    return after, None


def approving_subjects(req: ApprovalRequest) -> set[str]:
    return {d.approver.subject for d in req.decisions if d.approve}


# (a) ---------------------------------------------------------------------------------------


@SOD
@given(requests(), issuers, group_sets, st.booleans(), open_times, st.lists(attempts, max_size=6))
def test_the_requester_never_decides_their_own_request(
    req, issuer, groups, approve, now, history
) -> None:
    for who, ok, comment in history:  # whatever happened before
        req, _ = attempt(req, who, ok, comment)
    me = Principal(issuer, req.requester.subject, groups | req.approver_groups)
    assert why_not(req, me, now) is not None
    expected = AlreadyFinal if req.final else NotAllowed
    with pytest.raises(expected):
        decide(req, me, approve=approve, comment="mine", now=now)
    assert req.requester.subject not in {d.approver.subject for d in req.decisions}


# (b) ---------------------------------------------------------------------------------------


@SOD
@given(requests(), st.lists(principals, max_size=12))
def test_approved_exactly_when_enough_distinct_people_approved(req, approvers) -> None:
    required = req.approvals_required
    counted: set[str] = set()  # distinct eligible subjects that tried to approve, so far
    for who in approvers:
        was_final = req.final
        req, refused = attempt(req, who, True)
        if was_final:
            assert isinstance(refused, AlreadyFinal)
            continue
        if eligible(req, who) and who.subject not in counted:
            counted.add(who.subject)
            assert refused is None
        else:
            assert isinstance(refused, NotAllowed)
        # Never earlier, never later: APPROVED exactly at the required count.
        assert (req.state is RequestState.APPROVED) == (len(counted) >= required)
        assert req.state in (RequestState.PENDING, RequestState.APPROVED)
        assert {p.subject for p in req.approvers} == approving_subjects(req) == counted
    assert len(req.approvers) == min(len(counted), required)
    assert len(req.decisions) == len(req.approvers)  # every accepted decision is a person


# (c) ---------------------------------------------------------------------------------------


@SOD
@given(requests(), principals, issuers, group_sets, st.booleans(), open_times)
def test_deciding_twice_is_refused_and_changes_nothing(
    req, who, issuer, groups, approve, now
) -> None:
    req = request(
        requester=principal("alice"),
        approver_groups=req.approver_groups,
        approvals_required=2,  # one approval leaves it pending
    )
    who = Principal(who.issuer, "bob", who.groups | req.approver_groups)
    once, refused = attempt(req, who, True, now=now)
    assert refused is None and once.state is RequestState.PENDING
    # The same subject again: under any issuer, with any groups, approving or denying.
    again = Principal(issuer, "bob", groups | req.approver_groups)
    twice, refused = attempt(once, again, approve, now=now)
    assert isinstance(refused, NotAllowed)
    assert twice == once and len(once.approvers) == 1


@SOD
@given(st.frozensets(st.sampled_from(GROUPS), min_size=2), st.integers(2, 3), open_times)
def test_a_person_in_two_approver_groups_counts_once(approver_groups, required, now) -> None:
    req = request(approver_groups=approver_groups, approvals_required=required)
    both = principal("bob", *approver_groups)  # a member of every approver group
    req, refused = attempt(req, both, True, now=now)
    assert refused is None
    assert req.state is RequestState.PENDING and len(req.approvers) == 1
    req, refused = attempt(req, both, True, now=now)
    assert isinstance(refused, NotAllowed) and len(req.approvers) == 1


# (d) ---------------------------------------------------------------------------------------


@SOD
@given(requests(), st.lists(attempts, max_size=10), st.lists(attempts, min_size=1, max_size=5))
def test_one_denial_ends_the_request(req, history, afterwards) -> None:
    for who, approve, comment in history:
        before = req
        req, refused = attempt(req, who, approve, comment)
        if refused is None and not approve:
            assert before.state is RequestState.PENDING
            assert req.state is RequestState.DENIED and req.state_reason == comment
            assert req.decisions[-1].approver.subject == who.subject
    if req.state is not RequestState.DENIED:
        return
    # Denied: nothing more is accepted, and expiry or withdrawal changes nothing either.
    assert sum(not d.approve for d in req.decisions) == 1
    for who, approve, comment in afterwards:
        after, refused = attempt(req, who, approve, comment)
        assert isinstance(refused, AlreadyFinal) and after == req
    assert expire(req, T0 + TTL) == req and withdraw(req, "gone") == req


@SOD
@given(requests(), st.lists(principals, max_size=4), principals, st.booleans())
def test_a_denial_after_approvals_still_denies(req, approvers, denier, approve_after) -> None:
    for who in approvers:
        req, _ = attempt(req, who, True)
    if req.final or not eligible(req, denier) or denier.subject in approving_subjects(req):
        return
    denied, refused = attempt(req, denier, False, "not during the freeze")
    assert refused is None and denied.state is RequestState.DENIED
    assert denied.state_reason == "not during the freeze"
    assert not any(d.approve for d in denied.decisions[len(req.decisions) :])
    newcomer = principal("erin", *req.approver_groups)
    _, refused = attempt(denied, newcomer, approve_after)
    assert isinstance(refused, AlreadyFinal)


# (e) ---------------------------------------------------------------------------------------


@SOD
@given(requests(), principals, st.booleans(), open_times)
def test_nobody_outside_the_approver_groups_decides(req, who, approve, now) -> None:
    outsider = Principal(who.issuer, who.subject, who.groups - req.approver_groups)
    after, refused = attempt(req, outsider, approve, now=now)
    assert isinstance(refused, NotAllowed) and after == req
    assert why_not(req, outsider, now) is not None


# (f) ---------------------------------------------------------------------------------------


@SOD
@given(requests(), st.lists(principals, max_size=3), principals, st.booleans(), late_times)
def test_after_expiry_nothing_is_decided_and_expire_expires(
    req, approvers, who, approve, now
) -> None:
    for early in approvers:
        req, _ = attempt(req, early, True)
    after, refused = attempt(req, who, approve, now=now)
    assert isinstance(refused, AlreadyFinal) and after == req
    assert why_not(req, who, now) is not None
    expired = expire(req, now)
    if req.state is RequestState.PENDING:
        assert expired.state is RequestState.EXPIRED and expired.decisions == req.decisions
        assert expired.state_reason
    else:  # decided in time: expiry does not undo it
        assert expired == req


@SOD
@given(requests(), open_times)
def test_expire_before_expiry_changes_nothing(req, now) -> None:
    before = copy.deepcopy(req)
    assert expire(req, now) == req == before


# (g) ---------------------------------------------------------------------------------------


@SOD
@given(requests(), st.lists(attempts, max_size=8), open_times, late_times, st.text(max_size=5))
def test_no_function_changes_its_input(req, history, now, late, reason) -> None:
    for who, approve, comment in history:
        req, _ = attempt(req, who, approve, comment, now=now)  # attempt() checks decide
        before = copy.deepcopy(req)
        for who_ in (ALICE, BOB, CAROL, who):
            why_not(req, who_, now)
        expire(req, late)
        withdraw(req, reason)
        assert req == before
        assert req.approvers == before.approvers


@SOD
@given(requests(), st.lists(attempts, max_size=8), st.text(max_size=10))
def test_withdraw_ends_only_a_pending_request(req, history, reason) -> None:
    for who, approve, comment in history:
        req, _ = attempt(req, who, approve, comment)
    withdrawn = withdraw(req, reason)
    if req.final:
        assert withdrawn == req
    else:
        assert withdrawn.state is RequestState.WITHDRAWN and withdrawn.state_reason == reason
        assert withdrawn.decisions == req.decisions
        _, refused = attempt(withdrawn, BOB, True)
        assert isinstance(refused, AlreadyFinal)


# Messages, by example -----------------------------------------------------------------------


def test_the_requester_is_told_someone_else_must_decide() -> None:
    alice_elsewhere = principal("alice", "security-leads", issuer="https://idp-new.example")
    with pytest.raises(NotAllowed, match=r"you made this request.*segregation of duties"):
        decide(request(), alice_elsewhere, approve=True, comment="", now=T0)


def test_a_non_member_is_told_which_groups_may_decide() -> None:
    req = request(approver_groups=frozenset({"security-leads", "dba"}))
    assert why_not(req, principal("dave", "engineering"), T0) == (
        "only members of dba, security-leads may decide this request"
    )


def test_a_second_decision_by_the_same_person_is_explained() -> None:
    req = decide(request(approvals_required=2), BOB, approve=True, comment="", now=T0)
    assert why_not(req, BOB, T0) == (
        "you have already decided this request; another approver must decide"
    )


def test_final_and_expired_requests_say_so() -> None:
    denied = decide(request(), BOB, approve=False, comment="no", now=T0)
    assert denied.state is RequestState.DENIED and denied.state_reason == "no"
    with pytest.raises(AlreadyFinal, match="the request is already denied"):
        decide(denied, CAROL, approve=True, comment="", now=T0)
    with pytest.raises(AlreadyFinal, match="the request has expired"):
        decide(request(), BOB, approve=True, comment="", now=T0 + TTL)
    assert expire(request(), T0 + TTL).state_reason == "no decision in time"


def test_two_approvers_bob_then_carol() -> None:
    req = request(approvals_required=2)
    req = decide(req, BOB, approve=True, comment="ok", now=T0)
    assert req.state is RequestState.PENDING
    req = decide(req, CAROL, approve=True, comment="ok too", now=T0 + timedelta(seconds=1))
    assert req.state is RequestState.APPROVED
    assert [p.label for p in req.approvers] == ["Bob", "Carol"]
    assert [p.groups for p in req.approvers] == [BOB.groups, CAROL.groups]


def test_approvers_are_distinct_subjects_whatever_the_issuer() -> None:
    # Built by hand (as a store might hand it back): the same subject under two issuers
    # and two group sets is one person, listed once, first decision first.
    req = request(approvals_required=3)
    bob_elsewhere = principal("bob", "dba", issuer="https://idp-new.example")
    decisions = tuple(
        Decision(Person.of(who), True, "", T0) for who in (BOB, bob_elsewhere, CAROL, BOB)
    )
    req = replace(req, decisions=decisions)
    assert req.approvers == (Person.of(BOB), Person.of(CAROL))
