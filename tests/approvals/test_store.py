"""Approval stores: what is saved comes back equal, in the documented order, after a reopen.

Both stores run the same contract tests; the SQLite store also round-trips generated
requests, shares its file with the broker's `SqliteStateStore`, and saves atomically.
Times are fixed values, never the clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.broker.approvals.model import (
    ApprovalRequest,
    Decision,
    Person,
    RequestState,
    decide,
    withdraw,
)
from guard.broker.approvals.store import (
    ApprovalStore,
    MemoryApprovalStore,
    SqliteApprovalStore,
)
from guard.broker.state import SqliteStateStore
from tests.approvals.approval_examples import ALICE, BOB, CAROL, T0, TTL, principal, request


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApprovalStore]:
    made: ApprovalStore = (
        MemoryApprovalStore()
        if request.param == "memory"
        else SqliteApprovalStore(tmp_path / "s.db")
    )
    yield made
    made.close()


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def approved_by_two() -> ApprovalRequest:
    req = request(request_id="two", approvals_required=2, window_seconds=900)
    req = decide(req, BOB, approve=True, comment="looks fine", now=at(5))
    return decide(req, CAROL, approve=True, comment="ok, INC-123", now=at(9))


def denied() -> ApprovalRequest:
    return decide(request(request_id="no"), CAROL, approve=False, comment="not now", now=at(3))


# Round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "example",
    [
        request(),  # pending, no decisions, no window
        request(request_id="w", window_seconds=600),
        approved_by_two(),
        denied(),
        withdraw(request(request_id="gone"), "client cancelled"),
        replace(request(request_id="x"), state=RequestState.EXPIRED, state_reason="late"),
    ],
    ids=lambda r: f"{r.id}-{r.state.value}",
)
def test_a_saved_request_comes_back_equal(store: ApprovalStore, example: ApprovalRequest) -> None:
    store.save(example)
    got = store.get(example.id)
    assert got == example
    assert got is not None and got.created_at.tzinfo is not None
    assert got.decisions == example.decisions  # order, people, groups, times


def test_an_unknown_id_is_none(store: ApprovalStore) -> None:
    store.save(request())
    assert store.get("nope") is None


def test_saving_again_replaces_the_request_and_all_its_decisions(store: ApprovalStore) -> None:
    two = approved_by_two()
    store.save(two)
    fewer = replace(two, state=RequestState.PENDING, decisions=two.decisions[:1])
    store.save(fewer)
    assert store.get(two.id) == fewer
    store.save(replace(fewer, decisions=()))
    assert store.get(two.id) == replace(fewer, decisions=())


def test_times_in_other_offsets_come_back_as_the_same_instant_in_utc(
    store: ApprovalStore,
) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    example = request(created_at=T0.astimezone(india))
    store.save(example)
    got = store.get(example.id)
    assert got == example
    assert got is not None and got.created_at.utcoffset() == timedelta(0)


def test_a_naive_time_is_refused(store: ApprovalStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.save(request(created_at=T0.replace(tzinfo=None), ttl=timedelta(0)))
    assert store.get("req-1") is None


# Queries ------------------------------------------------------------------------------------


def test_pending_is_oldest_first_and_only_pending(store: ApprovalStore) -> None:
    store.save(request(request_id="c", created_at=at(30)))
    store.save(request(request_id="a", created_at=at(10)))
    store.save(replace(approved_by_two(), created_at=at(0)))
    store.save(replace(denied(), created_at=at(1)))
    store.save(request(request_id="b2", created_at=at(20)))
    store.save(request(request_id="b1", created_at=at(20)))  # same instant: by id
    assert [r.id for r in store.pending()] == ["a", "b1", "b2", "c"]


def test_by_requester_is_newest_first_any_issuer_with_a_limit(store: ApprovalStore) -> None:
    alice_new_idp = principal("alice", issuer="https://idp-new.example")
    for n in range(7):
        who = alice_new_idp if n % 2 else ALICE
        store.save(request(request_id=f"a{n}", requester=who, created_at=at(n)))
    store.save(request(request_id="bob's", requester=BOB, created_at=at(100)))
    store.save(
        decide(
            request(request_id="a-done", created_at=at(50)),
            BOB,
            approve=True,
            comment="",
            now=at(51),
        )
    )
    assert [r.id for r in store.by_requester("alice")] == [
        "a-done",
        "a6",
        "a5",
        "a4",
        "a3",
        "a2",
        "a1",
        "a0",
    ]
    assert [r.id for r in store.by_requester("alice", limit=3)] == ["a-done", "a6", "a5"]
    assert store.by_requester("alice", limit=0) == []
    assert [r.id for r in store.by_requester("bob")] == ["bob's"]
    assert store.by_requester("mallory") == []
    assert store.by_requester("alice", limit=2)[0] == store.get("a-done")  # decisions too


def test_by_requester_defaults_to_fifty(store: ApprovalStore) -> None:
    for n in range(55):
        store.save(request(request_id=f"r{n:02}", created_at=at(n)))
    got = store.by_requester("alice")
    assert len(got) == 50 and got[0].id == "r54" and got[-1].id == "r05"


def test_a_negative_limit_is_refused(store: ApprovalStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.by_requester("alice", limit=-1)


# Broker start -------------------------------------------------------------------------------


def test_expire_all_pending_expires_pending_requests_only(store: ApprovalStore) -> None:
    half = decide(
        request(request_id="half", approvals_required=2, created_at=at(2)),
        BOB,
        approve=True,
        comment="",
        now=at(3),
    )
    old = request(request_id="old", created_at=at(-2) - TTL)  # already past its expiry
    for r in (request(request_id="p", created_at=at(1)), half, old, approved_by_two(), denied()):
        store.save(r)
    now = at(60)

    changed = store.expire_all_pending("the broker restarted", now)

    assert [r.id for r in changed] == ["old", "p", "half"]  # oldest first
    for r in changed:
        assert r.state is RequestState.EXPIRED and r.state_reason == "the broker restarted"
        assert store.get(r.id) == r
    assert changed[2].decisions == half.decisions  # the decisions made stay on record
    assert changed[1].expires_at == now  # stopped being decidable now ...
    assert changed[0].expires_at == old.expires_at  # ... or earlier, when it already had
    assert store.get("two") == approved_by_two() and store.get("no") == denied()
    assert store.pending() == []
    assert store.expire_all_pending("again", at(61)) == []


def test_expire_all_pending_refuses_a_naive_now(store: ApprovalStore) -> None:
    store.save(request())
    with pytest.raises(ValueError, match="naive"):
        store.expire_all_pending("restart", T0.replace(tzinfo=None))
    assert store.get("req-1") == request()


# SQLite only --------------------------------------------------------------------------------


def test_requests_survive_closing_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "broker.db"  # the directory is made
    first = SqliteApprovalStore(path)
    for r in (request(), approved_by_two(), denied()):
        first.save(r)
    first.close()

    second = SqliteApprovalStore(path)  # CREATE IF NOT EXISTS leaves the data alone
    assert second.get("req-1") == request()
    assert second.get("two") == approved_by_two()
    assert [r.id for r in second.pending()] == ["req-1"]
    changed = second.expire_all_pending("the broker restarted", at(60))
    second.close()

    third = SqliteApprovalStore(path)
    assert third.get("req-1") == changed[0] and third.pending() == []
    third.close()


def test_the_state_store_and_the_approval_store_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    state = SqliteStateStore(path)
    approvals = SqliteApprovalStore(path)
    state.session_opened(
        session_id="sess-1",
        issuer=ALICE.issuer,
        subject=ALICE.subject,
        groups=["engineering"],
        target="demo",
        reason="INC-123",
        lease_id="lease-1",
        expires_at=T0 + TTL,
    )
    approvals.save(approved_by_two())
    assert state.open_leases() == [("sess-1", "lease-1")]
    assert approvals.get("two") == approved_by_two()
    state.close()
    approvals.close()


def test_a_failed_save_changes_nothing(tmp_path: Path) -> None:
    store = SqliteApprovalStore(tmp_path / "s.db")
    first = decide(request(approvals_required=2), BOB, approve=True, comment="", now=at(1))
    store.save(first)
    # The second decision cannot be encoded (a lone surrogate): the request row was already
    # written in the transaction when the decision insert fails; all of it rolls back.
    broken = decide(first, CAROL, approve=True, comment="\ud800", now=at(2))
    with pytest.raises(UnicodeEncodeError):
        store.save(broken)
    assert store.get(first.id) == first
    store.save(broken := decide(first, CAROL, approve=True, comment="fine", now=at(2)))
    assert store.get(first.id) == broken  # and the store is still usable
    store.close()


# Generated requests -------------------------------------------------------------------------

# Text as it can arrive from a token or a client: any code point but lone surrogates (which
# sqlite3 cannot encode; a save of one fails and changes nothing, see above).
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=9))]),
)
people = st.builds(Person, texts, texts, texts, st.frozensets(texts, max_size=4))
decisions = st.builds(Decision, people, st.booleans(), texts, moments)
generated = st.builds(
    ApprovalRequest,
    id=texts,
    session_id=texts,
    target=texts,
    requester=people,
    session_reason=texts,
    statement=texts,
    fingerprint=texts,
    tables=st.lists(texts, max_size=4).map(tuple),
    rule_id=texts,
    approver_groups=st.frozensets(texts, max_size=4),
    approvals_required=st.integers(1, 10),
    window_seconds=st.none() | st.integers(0, 2**31),
    created_at=moments,
    expires_at=moments,
    state=st.sampled_from(RequestState),
    state_reason=texts,
    decisions=st.lists(decisions, max_size=4).map(tuple),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(generated)
def test_generated_requests_round_trip_through_sqlite(
    tmp_path: Path, example: ApprovalRequest
) -> None:
    store = SqliteApprovalStore(tmp_path / "gen.db")  # the same file each example: a reopen
    try:
        store.save(example)
        assert store.get(example.id) == example
        by_requester = store.by_requester(example.requester.subject, limit=1000)
        assert example in by_requester
        assert (example in store.pending()) == (example.state is RequestState.PENDING)
    finally:
        store.close()
