"""The broker's HTTP API (FastAPI): sessions and approval requests for verified principals.

Imports FastAPI, the API schemas and the broker's domain types; it holds no state of its
own. Every route that does something authenticates the bearer ID token first; domain
errors become JSON `ErrorBody` responses with their HTTP status in one handler.
"""

import asyncio
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response

from guard.broker.api.approvals import approval_routes
from guard.broker.api.schemas import ErrorBody, SessionCreate, SessionCreated, SessionInfo
from guard.broker.approvals.service import ApprovalService
from guard.broker.errors import GuardError, NotFound, Unauthenticated
from guard.broker.identity.principal import Principal
from guard.broker.sessions import SessionManager


class PrincipalResolver(Protocol):
    def __call__(self, token: str) -> Principal: ...


class GatewayAddress(Protocol):
    host: str
    port: int
    tls: bool


def create_app(
    *,
    sessions: SessionManager,
    resolve_principal: PrincipalResolver,
    gateway: GatewayAddress,
    approvals: ApprovalService | None = None,
) -> FastAPI:
    app = FastAPI(title="guard broker", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(GuardError)
    async def _guard_error(_request: Request, exc: GuardError) -> JSONResponse:
        body = ErrorBody(error=exc.code, message=exc.message, hint=exc.hint)
        return JSONResponse(status_code=exc.http_status, content=body.model_dump())

    async def principal(
        authorization: Annotated[str | None, Header()] = None,
    ) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token", hint="run `guard login`")
        token = authorization[7:].strip()
        # Verification may fetch JWKS over HTTP: keep it off the event loop.
        return await asyncio.to_thread(resolve_principal, token)

    Caller = Annotated[Principal, Depends(principal)]

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated)
    async def open_session(body: SessionCreate, caller: Caller) -> SessionCreated:
        opened = await sessions.open(
            caller, body.target, reason=body.reason, ttl_seconds=body.ttl_seconds
        )
        s = opened.session
        return SessionCreated(
            session_id=s.id,
            gateway_host=gateway.host,
            gateway_port=gateway.port,
            gateway_tls=gateway.tls,
            database=s.upstream.database,
            user=s.user,
            password=opened.secret,
            expires_at=s.expires_at,
            principal=caller.label,
        )

    def _owned(session_id: str, caller: Principal):
        session = sessions.get(session_id)
        if (session.principal.issuer, session.principal.subject) != (caller.issuer, caller.subject):
            # Same answer as a missing session: do not reveal other people's session ids.
            raise NotFound(f"no active session {session_id!r}")
        return session

    @app.get("/v1/sessions/{session_id}", response_model=SessionInfo)
    async def get_session(session_id: str, caller: Caller) -> SessionInfo:
        s = _owned(session_id, caller)
        return SessionInfo(
            session_id=s.id,
            target=s.target,
            principal=s.principal.label,
            expires_at=s.expires_at,
            status="active",
            connections=len(s.connections),
        )

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def end_session(session_id: str, caller: Caller) -> Response:
        _owned(session_id, caller)
        await sessions.end(session_id, "ended by client")
        return Response(status_code=204)

    app.include_router(approval_routes(approvals, Caller))

    return app
