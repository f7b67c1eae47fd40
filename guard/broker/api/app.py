"""The broker's HTTP API (FastAPI): sessions and approval requests for verified principals.

Imports FastAPI, the API schemas and the broker's domain types; it holds no state of its
own. Every route that does something authenticates the bearer ID token first — except a
session's heartbeat and end, which also accept the session credential the open returned
(so a session can be ended after the ID token expired). Every error is a JSON `ErrorBody`:
domain errors with their HTTP status, request validation errors as 422 with a hint, and
anything unexpected as a 500 naming a request id that the broker's log holds the details
under (the client never sees a traceback).
"""

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.broker.api.approvals import approval_routes
from guard.broker.api.backstop import backstop_routes
from guard.broker.api.schemas import (
    ErrorBody,
    Identity,
    SessionCreate,
    SessionCreated,
    SessionExtend,
    SessionExtended,
    SessionInfo,
    SessionReauth,
    SessionRevoke,
    SessionsRevoked,
    TargetInfo,
)
from guard.broker.approvals.service import ApprovalService
from guard.broker.audit.sink import AuditUnavailable
from guard.broker.backstop import BackstopMonitor
from guard.broker.errors import Forbidden, GuardError, NotFound, Unauthenticated
from guard.broker.identity.principal import Principal
from guard.broker.policy.model import Effect
from guard.broker.sessions import CREDENTIAL_PREFIX, Session, SessionManager

log = logging.getLogger("guard.api")

# `TargetInfo.unmasked`: what `can_unmask` says, in a word for the targets list.
_UNMASK_WORDS = {Effect.ALLOW: "yes", Effect.REQUIRE_APPROVAL: "after approval"}


class PrincipalResolver(Protocol):
    def __call__(self, token: str) -> Principal: ...


class GatewayAddress(Protocol):
    host: str
    port: int
    tls: bool
    ca_pem: str | None  # the CA of the gateway's certificate, if the broker knows it


def _error(status: int, code: str, message: str, hint: str | None) -> JSONResponse:
    body = ErrorBody(error=code, message=message, hint=hint)
    return JSONResponse(status_code=status, content=body.model_dump())


class JsonInternalErrors:
    """ASGI middleware: an exception no handler took becomes a JSON 500 naming a request
    id; the traceback goes to the broker's log under that id, never to the client."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            request_id = secrets.token_hex(6)
            # Method and path only: headers hold bearer tokens.
            log.exception("request %s: %s %s failed", request_id, scope["method"], scope["path"])
            if started:
                return
            response = _error(
                500,
                "internal_error",
                f"the broker failed on this request (request id {request_id})",
                "retry; if it persists, give the request id to the broker's operators "
                "(their log has the details)",
            )
            await response(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GuardError)
    async def _guard_error(_request: Request, exc: GuardError) -> JSONResponse:
        return _error(exc.http_status, exc.code, exc.message, exc.hint)

    @app.exception_handler(AuditUnavailable)
    async def _audit_down(_request: Request, exc: AuditUnavailable) -> JSONResponse:
        log.error("audit unavailable: %s", exc)
        return _error(
            503,
            "audit_unavailable",
            "the broker cannot write its audit log",
            "the broker's operators must fix the audit log's disk or permissions",
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(
            422,
            "invalid_request",
            _validation_message(exc),
            "the request body does not match the broker's API; are the CLI and the broker "
            "the same version (`guard --version`)?",
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else f"http_{exc.status_code}"
        return _error(exc.status_code, code, str(exc.detail), None)


def create_app(  # noqa: C901 - one closure per route
    *,
    sessions: SessionManager,
    resolve_principal: PrincipalResolver,
    gateway: GatewayAddress,
    approvals: ApprovalService | None = None,
    health: Callable[[], list[str]] | None = None,
    backstop: BackstopMonitor | None = None,
) -> FastAPI:
    app = FastAPI(title="guard broker", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(JsonInternalErrors)
    _install_error_handlers(app)

    def bearer(authorization: str | None) -> str:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token", hint="run `guard login`")
        return authorization[7:].strip()

    async def principal(
        authorization: Annotated[str | None, Header()] = None,
    ) -> Principal:
        token = bearer(authorization)
        # Verification may fetch JWKS over HTTP: keep it off the event loop.
        return await asyncio.to_thread(resolve_principal, token)

    Caller = Annotated[Principal, Depends(principal)]

    def _owned(session_id: str, caller: Principal) -> Session:
        session = sessions.get(session_id)
        if (session.principal.issuer, session.principal.subject) != (caller.issuer, caller.subject):
            # Same answer as a missing session: do not reveal other people's session ids.
            raise NotFound(f"no active session {session_id!r}")
        return session

    async def session_of_caller(
        session_id: str, authorization: Annotated[str | None, Header()] = None
    ) -> Session:
        """The session, for its owner's ID token or for its own session credential."""
        token = bearer(authorization)
        if token.startswith(CREDENTIAL_PREFIX):
            return sessions.by_credential(session_id, token)
        caller = await asyncio.to_thread(resolve_principal, token)
        return _owned(session_id, caller)

    OwnSession = Annotated[Session, Depends(session_of_caller)]

    def _info(s: Session) -> SessionInfo:
        return SessionInfo(
            session_id=s.id,
            target=s.target,
            principal=s.principal.label,
            expires_at=s.expires_at,
            status="active",
            connections=len(s.connections),
            heartbeat_deadline=s.heartbeat_deadline,
            subject=s.principal.subject,
            reason=s.reason,
            login_expires_at=s.login_expires_at,
            unmask_state=s.unmask_state,
            unmask_request=s.unmask_request,
            unmask_detail=s.unmask_detail,
        )

    def _auditor(caller: Principal, what: str) -> None:
        if not sessions.is_auditor(caller):
            groups = ", ".join(sorted(sessions.settings.auditor_groups)) or "none configured"
            raise Forbidden(
                f"{caller.label} may not {what}: that is for the broker's auditor groups",
                hint=f"auditor groups: {groups} (sessions.auditor_groups in the broker config)",
            )

    @app.get("/v1/health", response_model=None)
    async def get_health() -> Any:
        reasons = health() if health is not None else []
        if reasons:
            return JSONResponse(status_code=503, content={"status": "degraded", "reasons": reasons})
        return {"status": "ok"}

    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated)
    async def open_session(body: SessionCreate, caller: Caller) -> SessionCreated:
        opened = await sessions.open(
            caller,
            body.target,
            reason=body.reason,
            ttl_seconds=body.ttl_seconds,
            heartbeat=body.heartbeat,
            unmasked=body.unmasked,
        )
        s = opened.session
        settings = sessions.settings
        return SessionCreated(
            session_id=s.id,
            gateway_host=gateway.host,
            gateway_port=gateway.port,
            gateway_tls=gateway.tls,
            gateway_ca_pem=gateway.ca_pem,
            database=s.upstream.database,
            user=s.user,
            password=opened.secret,
            expires_at=s.expires_at,
            principal=caller.label,
            session_token=opened.credential,
            heartbeat_interval_seconds=settings.heartbeat_interval_seconds
            if body.heartbeat
            else None,
            heartbeat_grace_seconds=settings.heartbeat_grace_seconds if body.heartbeat else None,
            ttl_notice=opened.ttl_notice,
            login_expires_at=s.login_expires_at,
            auto_extend=sessions.policy.targets[s.target].auto_extend,
            unmask_state=s.unmask_state,
            unmask_request=s.unmask_request,
            unmask_detail=s.unmask_detail,
        )

    @app.get("/v1/me", response_model=Identity)
    async def whoami(caller: Caller) -> Identity:
        return Identity(
            principal=caller.label,
            subject=caller.subject,
            issuer=caller.issuer,
            groups=sorted(caller.groups),
            auditor=sessions.is_auditor(caller),
            via=caller.via,
            kind=caller.kind,
        )

    @app.get("/v1/targets", response_model=list[TargetInfo])
    async def list_targets(caller: Caller) -> list[TargetInfo]:
        targets = sessions.policy.targets
        return [
            TargetInfo(
                name=name,
                allowed=verdict.allowed,
                why_not=None if verdict.allowed else verdict.message,
                default_ttl_seconds=targets[name].default_ttl_seconds,
                max_ttl_seconds=targets[name].max_ttl_seconds,
                unmasked=_UNMASK_WORDS.get(sessions.policy.can_unmask(caller, name).effect, ""),
            )
            for name, verdict in sessions.reachable(caller)
        ]

    @app.get("/v1/sessions", response_model=list[SessionInfo])
    async def list_sessions(caller: Caller, all: bool = False) -> list[SessionInfo]:  # noqa: A002 - the query parameter's name
        if all:
            _auditor(caller, "list every session")
            return [_info(s) for s in sessions.live()]
        return [_info(s) for s in sessions.held_by(caller)]

    @app.post("/v1/sessions/revoke", response_model=SessionsRevoked)
    async def revoke_sessions(body: SessionRevoke, caller: Caller) -> SessionsRevoked:
        _auditor(caller, "revoke sessions")
        ended = await sessions.revoke(
            caller,
            body.reason,
            session_id=body.session_id,
            subject=body.subject,
            target=body.target,
        )
        return SessionsRevoked(session_ids=ended)

    @app.get("/v1/sessions/{session_id}", response_model=SessionInfo)
    async def get_session(session_id: str, session: OwnSession) -> SessionInfo:
        return _info(session)

    @app.post("/v1/sessions/{session_id}/heartbeat", response_model=SessionInfo)
    async def heartbeat(session_id: str, session: OwnSession) -> SessionInfo:
        return _info(sessions.heartbeat(session.id))

    @app.post("/v1/sessions/{session_id}/extend", response_model=SessionExtended)
    async def extend_session(
        session_id: str, body: SessionExtend, session: OwnSession
    ) -> SessionExtended:
        extended, notice = await sessions.extend(session.id, body.ttl_seconds)
        return SessionExtended(**_info(extended).model_dump(), notice=notice)

    @app.post("/v1/sessions/{session_id}/reauth", response_model=SessionInfo)
    async def reauthenticate(
        session_id: str, body: SessionReauth, session: OwnSession
    ) -> SessionInfo:
        # Verified like any ID token (signature, issuer, audience, lifetime), off the loop.
        fresh = await asyncio.to_thread(resolve_principal, body.id_token)
        return _info(await sessions.reauthenticate(session.id, fresh))

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def end_session(
        session_id: str,
        session: OwnSession,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        # With the session's credential: the CLI that opened it, at its program's end.
        # With its holder's ID token: `guard end` from elsewhere; said so (the CLI still
        # running the session prints this reason).
        by_client = bearer(authorization).startswith(CREDENTIAL_PREFIX)
        why = "ended by client" if by_client else f"ended by {session.principal.label} (guard end)"
        # The lease's revocation is owed (on disk) before this answers, and runs after.
        await sessions.end(session.id, why, wait_for_revocation=False)
        return Response(status_code=204)

    app.include_router(approval_routes(approvals, Caller))
    app.include_router(backstop_routes(backstop, sessions, Caller, _auditor))

    return app
