"""Approval requests and principals for the approvals tests: fixed examples and Hypothesis
strategies over small sets of issuers, subjects and groups (so collisions are common)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from guard.broker.approvals.model import ApprovalRequest, Person
from guard.broker.identity.principal import Principal

T0 = datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)
TTL = timedelta(minutes=10)

ISSUERS = ("https://idp.example", "https://idp-new.example", "https://evil.example")
SUBJECTS = ("alice", "bob", "carol", "dave", "erin")
GROUPS = ("security-leads", "dba", "engineering", "auditors")


def principal(subject: str, *groups: str, issuer: str = ISSUERS[0]) -> Principal:
    return Principal(issuer, subject, frozenset(groups), display_name=subject.title())


ALICE = principal("alice", "engineering")
BOB = principal("bob", "security-leads")
CAROL = principal("carol", "security-leads", "dba")


def request(
    *,
    request_id: str = "req-1",
    requester: Principal = ALICE,
    approver_groups: frozenset[str] = frozenset({"security-leads"}),
    approvals_required: int = 1,
    window_seconds: int | None = None,
    created_at: datetime = T0,
    ttl: timedelta = TTL,
) -> ApprovalRequest:
    return ApprovalRequest(
        id=request_id,
        session_id="sess-1",
        target="demo",
        requester=Person.of(requester),
        session_reason="INC-123",
        statement="SELECT * FROM transactions WHERE amount > $1",
        fingerprint="5e1f3c0a9b7d2e44",
        tables=("public.transactions",),
        rule_id="transactions-need-approval",
        approver_groups=approver_groups,
        approvals_required=approvals_required,
        window_seconds=window_seconds,
        created_at=created_at,
        expires_at=created_at + ttl,
    )


issuers = st.sampled_from(ISSUERS)
subjects = st.sampled_from(SUBJECTS)
group_sets = st.frozensets(st.sampled_from(GROUPS))

principals = st.builds(
    Principal,
    issuer=issuers,
    subject=subjects,
    groups=group_sets,
    display_name=st.none() | st.sampled_from(("Alice", "Bob", "Mallory")),
)


@st.composite
def requests(draw: st.DrawFn) -> ApprovalRequest:
    """A fresh pending request (created at T0, expiring at T0 + TTL)."""
    return request(
        requester=draw(principals),
        approver_groups=draw(st.frozensets(st.sampled_from(GROUPS), min_size=1)),
        approvals_required=draw(st.integers(1, 3)),
        window_seconds=draw(st.none() | st.integers(1, 3600)),
    )
