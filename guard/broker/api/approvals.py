"""The approval routes of the broker's API: what reviewers and requesters see and do.

Imports FastAPI, the API schemas and the approval service; decides nothing itself (the
service applies segregation of duties). A request is visible to its requester and to
members of its approver groups; to anyone else it does not exist (404).
"""

from typing import Any

from fastapi import APIRouter

from guard.broker.api.schemas import ApprovalDecide, ApprovalInfo, ApprovalVote
from guard.broker.approvals.model import ApprovalRequest
from guard.broker.approvals.service import UNMASKED_RULE, ApprovalService
from guard.broker.errors import BadRequest, NotFound
from guard.broker.identity.principal import Principal


def approval_routes(approvals: ApprovalService | None, Caller: Any) -> APIRouter:  # noqa: C901 - one closure per route
    """The routes; `Caller` is the app's authenticated-principal dependency type."""
    router = APIRouter()

    def _approvals() -> ApprovalService:
        if approvals is None:
            raise NotFound("approval requests are not enabled on this broker")
        return approvals

    def _info(request: ApprovalRequest, caller: Principal) -> ApprovalInfo:
        why = _approvals().why_not(request, caller)
        return ApprovalInfo(
            id=request.id,
            state=request.state.value,
            state_reason=request.state_reason,
            target=request.target,
            session_id=request.session_id,
            requester=request.requester.label,
            requester_groups=sorted(request.requester.groups),
            session_reason=request.session_reason,
            statement=request.statement,
            tables=list(request.tables),
            rule=request.rule_id,
            approver_groups=sorted(request.approver_groups),
            approvals_required=request.approvals_required,
            window_seconds=request.window_seconds,
            kind="unmasked" if request.rule_id == UNMASKED_RULE else "statement",
            votes=[
                ApprovalVote(
                    approver=d.approver.label,
                    approver_groups=sorted(d.approver.groups),
                    approve=d.approve,
                    comment=d.comment,
                    at=d.at,
                )
                for d in request.decisions
            ],
            created_at=request.created_at,
            expires_at=request.expires_at,
            can_decide=why is None,
            why_not=why,
        )

    @router.get("/v1/approvals", response_model=list[ApprovalInfo])
    async def pending_approvals(caller: Caller) -> list[ApprovalInfo]:
        return [_info(r, caller) for r in _approvals().decidable_by(caller)]

    @router.get("/v1/approvals/{request_id}", response_model=ApprovalInfo)
    async def get_approval(request_id: str, caller: Caller) -> ApprovalInfo:
        return _info(_approvals().get(request_id, caller), caller)

    @router.post("/v1/approvals/{request_id}/approve", response_model=ApprovalInfo)
    async def approve(request_id: str, body: ApprovalDecide, caller: Caller) -> ApprovalInfo:
        decided = _approvals().decide(request_id, caller, approve=True, comment=body.comment)
        return _info(decided, caller)

    @router.post("/v1/approvals/{request_id}/deny", response_model=ApprovalInfo)
    async def deny(request_id: str, body: ApprovalDecide, caller: Caller) -> ApprovalInfo:
        if not body.comment.strip():
            raise BadRequest("a denial needs a reason", hint="guard deny ID --reason TEXT")
        decided = _approvals().decide(request_id, caller, approve=False, comment=body.comment)
        return _info(decided, caller)

    @router.get("/v1/requests", response_model=list[ApprovalInfo])
    async def my_requests(caller: Caller) -> list[ApprovalInfo]:
        return [_info(r, caller) for r in _approvals().requested_by(caller)]

    return router
