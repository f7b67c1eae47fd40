"""The approval service: requests for held statements, decided by people, enforced by grants.

The gateway holds a statement whose verdict is `require_approval` and asks this service
(`hold`). The service makes the request (persisted, audited), waits for people to decide it
through the API (`decide`, with the segregation of duties of `approvals.model`), for it to
expire, or for it to be withdrawn (the client's cancel or disconnect, the session's end),
and answers with an `ApprovalDecided` event. On approval it first grants the session's
database role `guard_approved_<table>` for the gated tables the statement reads, so the
database's gate view lets exactly this statement (or, with a window, the rule's statements
of this session until the window ends) through; `end_statement` and the window's timer take
the grant back. If a grant cannot be taken back the session is ended: its role is revoked,
which is the one way left to keep the approval from being stretched.

Every request and every decision is an audit record (`ApprovalEvent`) with identities and
the groups the actor's own token carried. Imports asyncio, the store, the grants, the
audit sink and the policy; no sockets of its own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from guard.broker.approvals import model
from guard.broker.approvals.grants import Grants
from guard.broker.approvals.model import ApprovalRequest, Person, RequestState
from guard.broker.approvals.notify import Notifier, NullNotifier
from guard.broker.approvals.store import ApprovalStore
from guard.broker.audit.record import ApprovalEvent
from guard.broker.audit.sink import AuditSink, AuditUnavailable
from guard.broker.errors import Conflict, Forbidden, GuardError, NotFound
from guard.broker.identity.principal import Principal
from guard.broker.masking.objects import UNMASKED_ROLE
from guard.broker.pgwire.messages import ErrorResponse
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.policy.model import BACKSTOP_SCHEMAS, ApprovalRequirement
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.proxy.gate import Decision
from guard.broker.proxy.tasks import spawn

if TYPE_CHECKING:
    from guard.broker.sessions import Session

log = logging.getLogger("guard.approvals")

# The rule id of requests for an unmasked session (no policy rule has it: ids are checked).
UNMASKED_RULE = "unmasked-access"

# How long a request without an approval window stays decidable (a window makes it at
# least that long: the security contract says a held statement must not time out before
# the window the policy sets).
DEFAULT_REQUEST_SECONDS = 15 * 60


@dataclass(frozen=True, slots=True)
class Requester:
    """The session a held statement belongs to, as the gateway knows it."""

    session_id: str
    target: str
    principal: Principal
    reason: str
    role: str  # the session's database role: the grantee
    expires_at: datetime

    @classmethod
    def of(cls, session: Session) -> Requester:
        """The requester a session is, as the broker knows it (its role is the grantee)."""
        return cls(
            session_id=session.id,
            target=session.target,
            principal=session.principal,
            reason=session.reason,
            role=session.credentials.username,
            expires_at=session.expires_at,
        )


@dataclass(frozen=True, slots=True)
class HeldStatement:
    """What a request needs to know of a held statement: its rule, the approval it asks
    for, its normalized text (no literal reaches reviewers) and the relations it reads.
    Plain values, so a gateway worker process can send it to the broker (`proxy.control`)."""

    rule_id: str
    approval: ApprovalRequirement
    statement: str
    fingerprint: str
    relations_read: tuple[tuple[str | None, str], ...]  # (schema as written, name)

    @classmethod
    def of(cls, decision: Decision) -> HeldStatement:
        verdict = decision.hold
        assert verdict is not None and verdict.approval is not None
        statements = decision.analysis.statements
        return cls(
            rule_id=verdict.rule_id,
            approval=verdict.approval,
            statement="; ".join(s.normalized for s in statements),
            fingerprint=",".join(s.fingerprint for s in statements),
            relations_read=tuple(
                (relation.schema, relation.name)
                for s in statements
                for relation in s.relations_read
            ),
        )


@dataclass(slots=True)
class _Window:
    request_id: str
    until: datetime
    requester: Requester
    tables: tuple[str, ...]
    timer: asyncio.TimerHandle | None = None


class ApprovalService:
    def __init__(
        self,
        *,
        store: ApprovalStore,
        audit: AuditSink,
        policy: CompiledPolicy,
        grants: Grants,
        end_session: Callable[[str, str], Awaitable[None]],
        holding_targets: frozenset[str],
        notifier: Notifier | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        request_seconds: int = DEFAULT_REQUEST_SECONDS,
    ) -> None:
        # Targets whose database grants the broker can give (a grants DSN is configured):
        # elsewhere an approval could not be enforced, so statements are refused, not held.
        self.holding_targets = holding_targets
        # Told of every event after its audit record (webhooks); never blocks, never raises.
        self.notifier = notifier or NullNotifier()
        self.store = store
        self.audit = audit
        self.policy = policy
        self.grants = grants
        self._end_session = end_session
        self.clock = clock
        self.request_seconds = request_seconds
        self._waiters: dict[str, asyncio.Future[ApprovalRequest]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._windows: dict[tuple[str, str], _Window] = {}
        self._running: dict[str, tuple[Requester, tuple[str, ...]]] = {}  # per-statement grants
        self._tasks: set[asyncio.Task[None]] = set()
        # Unmasked sessions (`SessionManager.unmask`, `.unmask_refused`), set by the broker.
        self.unmask: Callable[[str, str], Awaitable[None]] | None = None
        self.unmask_refused: Callable[[str, str, str], None] | None = None

    def holds_for(self, target: str) -> bool:
        return target in self.holding_targets

    def expire_left_over(self) -> None:
        """At start: requests a previous broker run left pending can never be answered."""
        for request in self.store.expire_all_pending("the broker restarted", self.clock()):
            self._record(request, "expired", _GUARD)

    # ------------------------------------------------------------------ the gateway side
    async def hold(
        self, request_id: str, requester: Requester, held: HeldStatement
    ) -> ApprovalDecided:
        """Make the request for a held statement and wait for its outcome (see module)."""
        tables = self._gated_tables(requester.target, held)
        window = self._windows.get((requester.session_id, held.rule_id))
        now = self.clock()
        if window is not None and now < window.until:
            # An approval window of this session covers the rule: the grant is in place.
            return ApprovalDecided(request_id, approved=True, per_statement=False)
        requirement = held.approval
        lifetime = max(self.request_seconds, requirement.window_seconds or 0)
        request = ApprovalRequest(
            id=request_id,
            session_id=requester.session_id,
            target=requester.target,
            requester=Person.of(requester.principal),
            session_reason=requester.reason,
            statement=held.statement,
            fingerprint=held.fingerprint,
            tables=tables,
            rule_id=held.rule_id,
            approver_groups=requirement.approver_groups,
            approvals_required=requirement.approvals_required,
            window_seconds=requirement.window_seconds or None,
            created_at=now,
            expires_at=min(now + timedelta(seconds=lifetime), requester.expires_at),
        )
        if self.store.get(request_id) is not None:  # never overwrite another request
            return ApprovalDecided(
                request_id,
                approved=False,
                error=ErrorResponse.build(
                    "42501", "guard: the approval request could not be made; run it again"
                ),
            )
        final = await self._decided(self._made(request))
        return await self._outcome(final, requester)

    def _made(self, request: ApprovalRequest) -> str:
        """Save and record a new request, with the future its final state will be set on
        and its expiry timer; its id, for `_decided`."""
        self.store.save(request)
        self._record(request, "requested", request.requester)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ApprovalRequest] = loop.create_future()
        self._waiters[request.id] = waiter
        delay = max(0.0, (request.expires_at - self.clock()).total_seconds())
        self._timers[request.id] = loop.call_later(delay, self._expire, request.id)
        return request.id

    async def _decided(self, request_id: str) -> ApprovalRequest:
        """The final state of a request `_made` made, once people (or its expiry, or a
        withdrawal) settle it."""
        try:
            return await self._waiters[request_id]
        finally:
            self._waiters.pop(request_id, None)
            timer = self._timers.pop(request_id, None)
            if timer is not None:
                timer.cancel()

    # ------------------------------------------------------------------ unmasked sessions
    def request_unmasked(self, session: Session, requirement: ApprovalRequirement) -> str:
        """Ask approvers for an unmasked session (`SessionManager.request_unmask`); the
        request's id. Approved, the session is unmasked (`unmask`); otherwise it stays
        masked (`unmask_refused`). Withdrawn when the session ends, as a held statement is."""
        assert self.unmask is not None and self.unmask_refused is not None
        now = self.clock()
        target = self.policy.targets[session.target]
        request = ApprovalRequest(
            id=secrets.token_hex(6),
            session_id=session.id,
            target=session.target,
            requester=Person.of(session.principal),
            session_reason=session.reason,
            statement=f"unmasked session on {session.target}: protected columns read raw",
            fingerprint=UNMASKED_RULE,
            tables=tuple(sorted({f"{c.schema}.{c.table}" for c in target.protected_columns})),
            rule_id=UNMASKED_RULE,
            approver_groups=requirement.approver_groups,
            approvals_required=requirement.approvals_required,
            window_seconds=None,
            created_at=now,
            expires_at=min(now + timedelta(seconds=self.request_seconds), session.expires_at),
        )
        task = spawn(self._settle_unmask(self._made(request)), name=f"unmasked {request.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return request.id

    async def _settle_unmask(self, request_id: str) -> None:
        assert self.unmask is not None and self.unmask_refused is not None
        final = await self._decided(request_id)
        if final.state is not RequestState.APPROVED:
            self.unmask_refused(final.session_id, final.state.value, _refusal_text(final))
            return
        who = ", ".join(p.label for p in final.approvers)
        try:
            await self.unmask(final.session_id, f"approved by {who} (request {final.id})")
        except GuardError as exc:
            log.error("approval %s: unmasked access not granted: %s", final.id, exc.message)
            return
        self._record(final, "granted", _GUARD, UNMASKED_ROLE)

    async def end_statement(self, request_id: str) -> None:
        """The approved statement completed: take its per-statement grant back."""
        held = self._running.pop(request_id, None)
        if held is None:
            return
        requester, tables = held
        await self._revoke(request_id, requester, tables)

    def withdraw(self, request_id: str, reason: str) -> None:
        """The client cancelled or went away: its pending request is withdrawn."""
        request = self.store.get(request_id)
        if request is None or request.final:
            return
        self._settled(model.withdraw(request, reason), _GUARD)

    async def session_ended(self, session_id: str) -> None:
        """A session ended: its pending requests are withdrawn and its grants go."""
        for request in self.store.pending():
            if request.session_id == session_id:
                self.withdraw(request.id, "the session ended")
        for key in [k for k in self._windows if k[0] == session_id]:
            window = self._windows.pop(key)
            if window.timer is not None:
                window.timer.cancel()
        # The role itself is revoked with the session's lease: nothing more to take back.
        for request_id in [r for r, (q, _t) in self._running.items() if q.session_id == session_id]:
            self._running.pop(request_id, None)

    # ------------------------------------------------------------------ the people side
    def decide(
        self, request_id: str, approver: Principal, *, approve: bool, comment: str
    ) -> ApprovalRequest:
        """An approver's decision, checked against segregation of duties (`model`)."""
        request = self._visible(request_id, approver)
        try:
            decided = model.decide(
                request, approver, approve=approve, comment=comment, now=self.clock()
            )
        except model.AlreadyFinal as exc:
            raise Conflict(str(exc), hint="see `guard requests` or `guard approve`") from None
        except model.NotAllowed as exc:
            raise Forbidden(str(exc), hint="ask another member of the approver groups") from None
        self.store.save(decided)
        self._record(
            decided,
            "vote-approve" if approve else "vote-deny",
            Person.of(approver),
            comment,
        )
        if decided.final:
            self._settled(decided, Person.of(approver), saved=True)
        return decided

    def get(self, request_id: str, caller: Principal) -> ApprovalRequest:
        return self._visible(request_id, caller)

    def decidable_by(self, caller: Principal) -> list[ApprovalRequest]:
        now = self.clock()
        return [r for r in self.store.pending() if model.why_not(r, caller, now) is None]

    def requested_by(self, caller: Principal) -> list[ApprovalRequest]:
        return self.store.by_requester(caller.subject)

    def why_not(self, request: ApprovalRequest, caller: Principal) -> str | None:
        return model.why_not(request, caller, self.clock())

    def _visible(self, request_id: str, caller: Principal) -> ApprovalRequest:
        """The requester and members of its approver groups see a request; others get the
        same answer as for one that does not exist."""
        request = self.store.get(request_id)
        if request is None or not (
            caller.subject == request.requester.subject or caller.groups & request.approver_groups
        ):
            raise NotFound(f"no approval request {request_id!r}", hint="`guard approve` lists them")
        return request

    # ------------------------------------------------------------------ settling
    def _expire(self, request_id: str) -> None:
        self._timers.pop(request_id, None)
        request = self.store.get(request_id)
        if request is None or request.final:
            return
        expired = model.expire(request, max(self.clock(), request.expires_at))
        self._settled(expired, _GUARD)

    def _settled(self, request: ApprovalRequest, actor: Person, *, saved: bool = False) -> None:
        if not saved:
            self.store.save(request)
        self._record(request, request.state.value, actor, request.state_reason)
        waiter = self._waiters.get(request.id)
        if waiter is not None and not waiter.done():
            waiter.set_result(request)

    async def _outcome(self, request: ApprovalRequest, requester: Requester) -> ApprovalDecided:
        if request.state is RequestState.APPROVED:
            tables = request.tables
            try:
                await self.grants.grant(requester.target, requester.role, tables)
            except GuardError as exc:
                log.error("approval %s: the database grant failed: %s", request.id, exc.message)
                return ApprovalDecided(
                    request.id,
                    approved=False,
                    error=ErrorResponse.build(
                        "58000",
                        f"guard: request {request.id} was approved, but the database grant "
                        "failed, so the statement did not run",
                        hint="ask the guard operator to check the broker log",
                    ),
                )
            self._record(request, "granted", _GUARD, ", ".join(tables))
            if request.window_seconds:
                self._open_window(request, requester)
                return ApprovalDecided(request.id, approved=True, per_statement=False)
            self._running[request.id] = (requester, tables)
            return ApprovalDecided(request.id, approved=True, per_statement=True)
        return ApprovalDecided(request.id, approved=False, error=_error_for(request))

    def _open_window(self, request: ApprovalRequest, requester: Requester) -> None:
        assert request.window_seconds is not None
        until = self.clock() + timedelta(seconds=request.window_seconds)
        window = _Window(request.id, until, requester, request.tables)
        self._windows[(requester.session_id, request.rule_id)] = window
        delay = (until - self.clock()).total_seconds()
        window.timer = asyncio.get_running_loop().call_later(
            delay, self.close_window, requester.session_id, request.rule_id
        )

    def close_window(self, session_id: str, rule_id: str) -> None:
        """A window ends (its timer): the rule's statements need approval again, and the
        grant is taken back."""
        window = self._windows.pop((session_id, rule_id), None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        task = spawn(
            self._revoke(window.request_id, window.requester, window.tables),
            name=f"window {window.request_id} ends",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _revoke(self, request_id: str, requester: Requester, tables: Sequence[str]) -> None:
        try:
            await self.grants.revoke(requester.target, requester.role, tables)
        except GuardError as exc:
            # Fail closed: a grant that cannot be taken back must not outlive its scope.
            log.error(
                "approval %s: the grant could not be taken back (%s); ending session %s",
                request_id,
                exc.message,
                requester.session_id,
            )
            await self._end_session(requester.session_id, "an approval grant could not be revoked")
            return
        request = self.store.get(request_id)
        if request is not None:
            self._record(request, "revoked", _GUARD, ", ".join(tables))

    def _gated_tables(self, target: str, held: HeldStatement) -> tuple[str, ...]:
        """The target's gated tables the statement reads (by name, as the policy matches)."""
        gated = self.policy.targets[target].gated_tables
        found: set[str] = set()
        for relation_schema, name in held.relations_read:
            if relation_schema in BACKSTOP_SCHEMAS:  # its gate view: the table (policy_ref)
                relation_schema = None
            for schema, table in gated:
                if name == table and relation_schema in (None, schema):
                    found.add(f"{schema}.{table}")
        return tuple(sorted(found))

    def _record(
        self, request: ApprovalRequest, event: str, actor: Person, detail: str = ""
    ) -> None:
        try:
            self.audit.append(
                ApprovalEvent(
                    request_id=request.id,
                    session_id=request.session_id,
                    event=event,
                    actor=actor.subject,
                    actor_issuer=actor.issuer,
                    actor_groups=tuple(sorted(actor.groups)),
                    target=request.target,
                    rule=request.rule_id,
                    detail=detail[:500],
                )
            )
        except AuditUnavailable as exc:
            log.error("could not record %s of approval request %s: %s", event, request.id, exc)
        self.notifier.notify(event, request, actor)


_GUARD = Person("guard", "guard", "guard", frozenset())


def _refusal_text(request: ApprovalRequest) -> str:
    """Why a request ended without approval, for its requester."""
    if request.state is RequestState.DENIED:
        who = next((d.approver.label for d in request.decisions if not d.approve), "a reviewer")
        why = f": {request.state_reason}" if request.state_reason else ""
        return f"request {request.id} was denied by {who}{why}"
    return f"request {request.id} {request.state.value} ({request.state_reason})"


def _error_for(request: ApprovalRequest) -> ErrorResponse:
    """What the client gets in place of a statement that was not approved."""
    if request.state is RequestState.DENIED:
        return ErrorResponse.build("42501", f"guard: {_refusal_text(request)}")
    if request.state is RequestState.WITHDRAWN and "cancel" in request.state_reason:
        return ErrorResponse.build("57014", "canceling statement due to user request")
    return ErrorResponse.build(
        "42501",
        f"guard: request {request.id} {request.state.value} ({request.state_reason}); "
        "the statement did not run",
        hint="run it again to make a new request",
    )
