"""The approval service end to end in memory: a held statement's request, people deciding it
through the service (segregation of duties applied), the grant given before the statement
runs and taken back after it, windows, expiry, withdrawal, and the audit trail of it all.

The real gate decides the demo policy's `SELECT ... FROM transactions`; grants, store and
audit sink are the in-memory implementations; the clock is a list the test moves.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from guard.broker.approvals.grants import MemoryGrants
from guard.broker.approvals.model import RequestState
from guard.broker.approvals.service import ApprovalService, HeldStatement, Requester
from guard.broker.approvals.store import MemoryApprovalStore
from guard.broker.audit.sink import MemoryAuditSink
from guard.broker.errors import Conflict, Forbidden
from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import load_policy
from guard.broker.proxy.gate import Gate
from tests.playbook import POLICY

_DEMO = Path(__file__).resolve().parents[2] / "policies.yaml"
# The demo rule approves for a 30-minute window; most tests want one statement per approval.
ONE_STATEMENT = load_policy(_DEMO.read_text().replace(", window: 30m", ""))
TWO_PEOPLE = load_policy(
    _DEMO.read_text()
    .replace(", window: 30m", "")
    .replace("approvals_required: 1", "approvals_required: 2")
)

T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
ALICE = Principal("https://idp.test", "alice-sub", frozenset({"engineers"}), "alice")
BOB = Principal("https://idp.test", "bob-sub", frozenset({"security-leads"}), "bob")
CAROL = Principal("https://idp.test", "carol-sub", frozenset({"security-leads"}), "carol")
SQL = "SELECT * FROM transactions WHERE account_id = 1"


class Harness:
    def __init__(self, *, policy=ONE_STATEMENT) -> None:
        self.now = [T0]
        self.grants = MemoryGrants()
        self.audit = MemoryAuditSink()
        self.store = MemoryApprovalStore()
        self.ended: list[tuple[str, str]] = []

        async def end_session(session_id: str, reason: str) -> None:
            self.ended.append((session_id, reason))

        self.service = ApprovalService(
            store=self.store,
            audit=self.audit,
            policy=policy,
            grants=self.grants,
            end_session=end_session,
            holding_targets=frozenset({"demo"}),
            clock=lambda: self.now[0],
        )
        gate = Gate(
            policy=policy, target="demo", principal=ALICE, session_id="s1", connection_id="c1"
        )
        self.held = HeldStatement.of(gate.decide(SQL))
        self.requester = Requester(
            session_id="s1",
            target="demo",
            principal=ALICE,
            reason="INC-123",
            role="v-token-alice",
            expires_at=T0 + timedelta(hours=1),
        )

    def events(self) -> list[tuple[str, str]]:
        return [(r["event"], r["actor"]) for r in self.audit.records if r["kind"] == "approval"]


async def _held(h: Harness, request_id: str = "r1") -> asyncio.Task:
    task = asyncio.ensure_future(h.service.hold(request_id, h.requester, h.held))
    await asyncio.sleep(0)  # the request exists once hold() is waiting
    return task


def test_an_approval_grants_then_the_statement_ends_and_the_grant_goes():
    async def main():
        h = Harness()
        task = await _held(h)
        (pending,) = h.service.decidable_by(BOB)
        assert pending.statement.endswith("account_id = $1")  # no literal reaches reviewers
        assert pending.session_reason == "INC-123" and pending.tables == ("public.transactions",)
        h.service.decide("r1", BOB, approve=True, comment="INC-123 checked")
        outcome = await task
        assert outcome.approved and outcome.per_statement
        held = set(h.grants.held)
        await h.service.end_statement("r1")
        return h, held

    h, held_while_running = asyncio.run(main())
    assert held_while_running == {("demo", "v-token-alice", "guard_approved_transactions")}
    assert h.grants.held == set()
    assert [c[0] for c in h.grants.calls] == ["grant", "revoke"]
    assert h.events() == [
        ("requested", "alice-sub"),
        ("vote-approve", "bob-sub"),
        ("approved", "bob-sub"),
        ("granted", "guard"),
        ("revoked", "guard"),
    ]
    bob_vote = next(r for r in h.audit.records if r.get("event") == "vote-approve")
    assert bob_vote["actor_groups"] == ["security-leads"]  # from bob's own token


def test_the_requester_cannot_approve_under_any_issuer():
    async def main():
        h = Harness()
        task = await _held(h)
        alice_elsewhere = Principal(
            "https://other-idp.test", "alice-sub", frozenset({"security-leads"})
        )
        with pytest.raises(Forbidden, match="segregation of duties"):
            h.service.decide("r1", alice_elsewhere, approve=True, comment="")
        assert h.service.decidable_by(alice_elsewhere) == []
        h.service.withdraw("r1", "test over")
        return await task

    assert not asyncio.run(main()).approved


def test_two_approvers_are_two_people():
    async def main():
        h = Harness(policy=TWO_PEOPLE)
        task = await _held(h)
        h.service.decide("r1", BOB, approve=True, comment="ok")
        with pytest.raises(Forbidden, match="already decided"):
            h.service.decide("r1", BOB, approve=True, comment="again")
        assert not task.done()
        h.service.decide("r1", CAROL, approve=True, comment="ok too")
        return await task, h

    outcome, h = asyncio.run(main())
    assert outcome.approved
    assert h.store.get("r1").state is RequestState.APPROVED


def test_a_denial_reaches_the_client_with_who_and_why():
    async def main():
        h = Harness()
        task = await _held(h)
        h.service.decide("r1", CAROL, approve=False, comment="not during the audit")
        with pytest.raises(Conflict, match="already denied"):
            h.service.decide("r1", BOB, approve=True, comment="")
        return await task, h

    outcome, h = asyncio.run(main())
    assert not outcome.approved and outcome.error.sqlstate == "42501"
    assert "denied by carol: not during the audit" in outcome.error.message
    assert h.grants.calls == []


def test_a_request_expires_unanswered():
    async def main():
        h = Harness()
        h.service.request_seconds = 0  # expires at once (no window keeps it longer)
        task = await _held(h)
        h.now[0] = T0 + timedelta(hours=2)
        h.service._expire("r1")
        return await task, h

    outcome, h = asyncio.run(main())
    assert not outcome.approved and "expired" in outcome.error.message
    assert ("expired", "guard") in h.events()


def test_a_cancel_withdraws_with_the_cancel_error():
    async def main():
        h = Harness()
        task = await _held(h)
        h.service.withdraw("r1", "cancelled by the client")
        return await task, h

    outcome, h = asyncio.run(main())
    assert outcome.error.sqlstate == "57014"
    assert h.store.get("r1").state is RequestState.WITHDRAWN


def test_a_window_approval_covers_the_rule_in_the_session_until_it_ends():
    async def main():
        h = Harness(policy=POLICY)  # the demo rule: window 30m
        task = await _held(h)
        h.service.decide("r1", BOB, approve=True, comment="")
        first = await task
        second = await h.service.hold("r2", h.requester, h.held)  # no new request
        return first, second, h

    first, second, h = asyncio.run(main())
    assert first.approved and not first.per_statement  # the demo rule has window: 30m
    assert second.approved and h.store.get("r2") is None
    assert [c[0] for c in h.grants.calls] == ["grant"]


def test_a_window_ends_on_time_its_grant_goes_and_the_next_read_asks_again():
    async def main():
        h = Harness(policy=POLICY)  # window: 30m
        task = await _held(h)
        h.service.decide("r1", BOB, approve=True, comment="")
        await task
        (window,) = h.service._windows.values()
        assert window.until == T0 + timedelta(minutes=30)  # the policy's window
        # The window's timer fires (called here as the event loop would at its end):
        h.service.close_window("s1", "transactions-need-approval")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        again = await _held(h, "r2")
        assert h.store.get("r2").state is RequestState.PENDING  # a new request, not covered
        h.service.withdraw("r2", "test over")
        await again
        return h

    h = asyncio.run(main())
    assert [c[0] for c in h.grants.calls] == ["grant", "revoke"]
    assert h.grants.held == set()


def test_a_grant_that_cannot_be_taken_back_ends_the_session():
    from guard.broker.errors import DependencyUnavailable

    async def main():
        h = Harness()
        task = await _held(h)
        h.service.decide("r1", BOB, approve=True, comment="")
        assert (await task).per_statement
        h.grants.error = DependencyUnavailable("database down")
        await h.service.end_statement("r1")
        return h

    h = asyncio.run(main())
    assert h.ended == [("s1", "an approval grant could not be revoked")]


def test_others_cannot_see_a_request():
    async def main():
        h = Harness()
        task = await _held(h)
        mallory = Principal("https://idp.test", "mallory", frozenset({"engineers"}))
        from guard.broker.errors import NotFound

        with pytest.raises(NotFound):
            h.service.get("r1", mallory)
        assert h.service.get("r1", ALICE).id == "r1"
        assert [r.id for r in h.service.requested_by(ALICE)] == ["r1"]
        h.service.withdraw("r1", "over")
        await task

    asyncio.run(main())


def test_every_event_is_told_to_the_notifier_after_its_record():
    class Recording:
        def __init__(self) -> None:
            self.told: list[tuple[str, str]] = []

        def notify(self, event, request, actor) -> None:
            self.told.append((event, actor.subject))

    async def main():
        h = Harness()
        h.service.notifier = notifier = Recording()
        task = await _held(h)
        h.service.decide("r1", BOB, approve=True, comment="")
        await task
        await h.service.end_statement("r1")
        return h, notifier

    h, notifier = asyncio.run(main())
    assert notifier.told == h.events()  # the same events, in the audit's order


def test_requests_outlive_a_broker_restart_and_pending_ones_expire(tmp_path):
    from guard.broker.approvals.store import SqliteApprovalStore

    async def first_run():
        h = Harness()
        h.service.store = h.store = SqliteApprovalStore(tmp_path / "state.db")
        task = await _held(h)  # the broker stops while the request waits
        task.cancel()
        h.store.close()

    asyncio.run(first_run())
    h = Harness()
    h.service.store = h.store = SqliteApprovalStore(tmp_path / "state.db")
    h.service.expire_left_over()
    request = h.store.get("r1")
    assert request is not None and request.state is RequestState.EXPIRED
    assert request.state_reason == "the broker restarted"
    assert h.events() == [("expired", "guard")]
    h.store.close()


def test_a_request_id_already_taken_is_never_overwritten():
    async def main():
        h = Harness()
        first = await _held(h)
        second = await h.service.hold("r1", h.requester, h.held)  # the same id again
        h.service.withdraw("r1", "test over")
        await first
        return h, second

    h, second = asyncio.run(main())
    assert not second.approved and "could not be made" in second.error.message
    assert h.store.get("r1").state is RequestState.WITHDRAWN  # the first request, intact


# -- unmasked sessions -------------------------------------------------------------------
DAVE = Principal("https://idp.test", "dave-sub", frozenset({"fraud-investigators"}), "dave")


class _Session:
    """What `request_unmasked` reads of a broker session."""

    id = "s9"
    target = "demo"
    principal = DAVE
    reason = "fraud case 7"
    expires_at = T0 + timedelta(hours=1)

    class credentials:  # noqa: N801 - the attribute path the service reads
        username = "v-token-dave"


def _unmasking(h: Harness) -> tuple[list, list]:
    unmasked: list[tuple[str, str]] = []
    refused: list[tuple[str, str, str]] = []

    async def unmask(session_id: str, why: str) -> None:
        unmasked.append((session_id, why))

    h.service.unmask = unmask
    h.service.unmask_refused = lambda *args: refused.append(args)
    return unmasked, refused


def _requirement():
    access = ONE_STATEMENT.targets["demo"].unmasked
    assert access is not None and access.approval is not None
    return access.approval


def test_an_unmasked_request_approved_unmasks_the_session():
    async def main():
        h = Harness()
        unmasked, refused = _unmasking(h)
        request_id = h.service.request_unmasked(_Session(), _requirement())
        (pending,) = h.service.decidable_by(BOB)
        assert pending.id == request_id and pending.rule_id == "unmasked-access"
        assert pending.session_reason == "fraud case 7"
        assert set(pending.tables) == {"public.customers", "public.accounts"}
        with pytest.raises(Forbidden):  # not an approver (and the requester never is)
            h.service.decide(request_id, DAVE, approve=True, comment="")
        h.service.decide(request_id, BOB, approve=True, comment="case checked")
        await asyncio.sleep(0.01)
        return h, request_id, unmasked, refused

    h, request_id, unmasked, refused = asyncio.run(main())
    assert unmasked == [("s9", f"approved by bob (request {request_id})")]
    assert refused == []
    assert h.events()[-1] == ("granted", "guard")


@pytest.mark.parametrize("outcome", ["denied", "withdrawn"])
def test_an_unmasked_request_not_approved_leaves_the_session_masked(outcome):
    async def main():
        h = Harness()
        unmasked, refused = _unmasking(h)
        request_id = h.service.request_unmasked(_Session(), _requirement())
        if outcome == "denied":
            h.service.decide(request_id, CAROL, approve=False, comment="no case number")
        else:
            await h.service.session_ended("s9")
        await asyncio.sleep(0.01)
        return unmasked, refused

    unmasked, refused = asyncio.run(main())
    assert unmasked == []
    ((session_id, state, detail),) = refused
    assert (session_id, state) == ("s9", outcome)
    if outcome == "denied":
        assert "denied by carol: no case number" in detail
