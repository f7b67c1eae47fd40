"""HTTP client of the broker API, with broker errors turned into `CliError`s.

Imports the standard library, the CLI's HTTP client (`cli.http`), its session-path wire
types (`cli.wire`), error type and profile (the broker's CA). The session path (open,
heartbeat, end) imports nothing heavier; the approval calls import the broker's pydantic
models (`guard.broker.api.schemas`, the only broker module the CLI may import) when they
run. Never logs or prints the bearer token or session secrets.
"""

from __future__ import annotations

import ssl
from datetime import datetime
from urllib.parse import quote

from guard.cli.errors import EXIT_FAILURE, CliError
from guard.cli.http import HttpClient, Response, Transport, TransportError
from guard.cli.profile import broker_ca_file, broker_tls_context
from guard.cli.record import TYPE_CHECKING
from guard.cli.wire import ErrorBody, SessionCreated

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    from pydantic import BaseModel

    from guard.broker.api.schemas import (
        ApprovalInfo,
        BackstopReport,
        Identity,
        SessionExtended,
        SessionInfo,
        TargetInfo,
    )

    M = TypeVar("M", bound=BaseModel)

TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0


class BrokerError(CliError):
    """A failed broker call: `status` is the HTTP status (None: the broker was not reached),
    so a command can say more about a 403/404/409 than the generic message does."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        exit_code: int = EXIT_FAILURE,
        status: int | None = None,
    ) -> None:
        super().__init__(message, hint, exit_code)
        self.status = status


class BrokerClient:
    # The transport of clients made without one: None is the network; tests put a function
    # from `cli.http.Request` to `cli.http.Response` here to stand in for the broker.
    transport: Transport | None = None

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: Transport | None = None,
        ca_file: str | None = None,
        fresh_token: Callable[[], str] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        # A source of a new token for every request (GitHub Actions': each token is good
        # for one broker call); `token` is the first.
        self._fresh_token = fresh_token
        self._used_first = False
        transport = transport if transport is not None else type(self).transport
        self._http = HttpClient(
            self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
            transport=transport,
            # HTTPS is always verified: against `ca_file`, else GUARD_BROKER_CA or the
            # profile's broker_ca_file (the dev stack's CA), else the system trust store.
            context=_verify(self.base_url, ca_file) if transport is None else None,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def use_token(self, token: str) -> None:
        """Send `token` from now on (the session credential after the open), on the same
        connection."""
        self._fresh_token = None
        self._http.headers["authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, **kwargs: Any) -> Response:
        if self._fresh_token is not None:
            if self._used_first:
                self._http.headers["authorization"] = f"Bearer {self._fresh_token()}"
            self._used_first = True
        try:
            response = self._http.request(method, path, **kwargs)
        except TransportError as exc:
            raise BrokerError(
                f"cannot reach the guard broker at {self.base_url}: {exc}",
                hint="check that the broker is running (`guard dev status` for the local demo)",
            ) from exc
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def create_session(
        self,
        target: str,
        *,
        reason: str = "",
        ttl_seconds: int | None = None,
        heartbeat: bool = False,
        unmasked: bool = False,
    ) -> SessionCreated:
        """Open a session; with `heartbeat` the caller promises `heartbeat()` calls (the
        broker ends the session when they stop); `unmasked` asks to read protected
        columns raw (see `SessionCreated.unmask_state`)."""
        # `schemas.SessionCreate`, defaults left out (the broker validates the values).
        body: dict[str, Any] = {"target": target}
        if reason:
            body["reason"] = reason
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if heartbeat:
            body["heartbeat"] = True
        if unmasked:
            body["unmasked"] = True
        response = self._request("POST", "/v1/sessions", json=body)
        try:
            return SessionCreated.from_json(response.json())
        except ValueError as exc:
            raise _unexpected(response, "a new session") from exc

    def session(self, session_id: str) -> SessionInfo:
        """One session of the caller's (this client's token: its session credential)."""
        from guard.broker.api.schemas import SessionInfo

        path = f"/v1/sessions/{_segment(session_id)}"
        return _model(SessionInfo, self._request("GET", path), "a session")

    def heartbeat(self, session_id: str) -> None:
        """The session is still in use (this client's token: the session credential)."""
        self._request("POST", f"/v1/sessions/{_segment(session_id)}/heartbeat")

    def reauthenticate(self, session_id: str, id_token: str) -> datetime | None:
        """Present a fresh ID token for the session; when it now ends unless another comes
        (None: its target requires none)."""
        path = f"/v1/sessions/{_segment(session_id)}/reauth"
        answer = self._request("POST", path, json={"id_token": id_token})
        try:
            until = answer.json().get("login_expires_at")
            return None if until is None else datetime.fromisoformat(until.replace("Z", "+00:00"))
        except (ValueError, AttributeError) as exc:
            raise _unexpected(answer, "a session") from exc

    def end_session(self, session_id: str) -> str | None:
        """End the session: None. One that is already gone is not an error: the broker's
        word on it ("session … ended: ttl expired", for its holder) is returned."""
        try:
            self._request("DELETE", f"/v1/sessions/{_segment(session_id)}")
        except BrokerError as err:
            if err.status != 404:
                raise
            return err.message
        return None

    # ------------------------------------------------------------ approvals
    def pending_approvals(self) -> list[ApprovalInfo]:
        """Pending requests the caller may decide."""
        return _approvals(self._request("GET", "/v1/approvals"))

    def approval(self, request_id: str) -> ApprovalInfo:
        return _approval(self._request("GET", f"/v1/approvals/{_segment(request_id)}"))

    def decide(self, request_id: str, *, approve: bool, comment: str = "") -> ApprovalInfo:
        """Approve (`comment`) or deny (`comment` is the reason) a request; its new state."""
        from guard.broker.api.schemas import ApprovalDecide

        verb = "approve" if approve else "deny"
        body = ApprovalDecide(comment=comment).model_dump()
        path = f"/v1/approvals/{_segment(request_id)}/{verb}"
        return _approval(self._request("POST", path, json=body))

    def my_requests(self) -> list[ApprovalInfo]:
        """The caller's own requests, newest first."""
        return _approvals(self._request("GET", "/v1/requests"))

    # ------------------------------------------------------------ who, where, which sessions
    def whoami(self) -> Identity:
        from guard.broker.api.schemas import Identity

        return _model(Identity, self._request("GET", "/v1/me"), "an identity")

    def targets(self) -> list[TargetInfo]:
        """Every policy target, and whether the caller may open a session on it."""
        from guard.broker.api.schemas import TargetInfo

        return _models(TargetInfo, self._request("GET", "/v1/targets"), "a list of targets")

    def backstop(self, target: str, *, plan: bool = False) -> BackstopReport:
        """The target's database backstop drift (and, with `plan`, the statements an
        apply runs); auditors only."""
        from guard.broker.api.schemas import BackstopReport

        path = f"/v1/targets/{quote(target, safe='')}/backstop" + ("?plan=true" if plan else "")
        return _model(BackstopReport, self._request("GET", path), "a backstop report")

    def apply_backstop(self, target: str) -> BackstopReport:
        from guard.broker.api.schemas import BackstopReport

        path = f"/v1/targets/{quote(target, safe='')}/backstop/apply"
        return _model(BackstopReport, self._request("POST", path), "a backstop report")

    def policy_catalog_check(self, target: str, policy_text: str) -> list[str]:
        """The names a candidate policy protects on `target` that its database lacks."""
        from guard.broker.api.schemas import PolicyCatalogReport

        path = f"/v1/targets/{quote(target, safe='')}/policy-check"
        answer = self._request("POST", path, json={"policy": policy_text})
        return _model(PolicyCatalogReport, answer, "a policy check").problems

    def sessions(self, *, every: bool = False) -> list[SessionInfo]:
        """The caller's live sessions; `every`: everyone's (auditors only)."""
        from guard.broker.api.schemas import SessionInfo

        path = "/v1/sessions?all=true" if every else "/v1/sessions"
        return _models(SessionInfo, self._request("GET", path), "a list of sessions")

    def extend(self, session_id: str, ttl_seconds: int | None = None) -> SessionExtended:
        """Make the session last `ttl_seconds` from now (None: its target's default)."""
        from guard.broker.api.schemas import SessionExtend, SessionExtended

        body = SessionExtend(ttl_seconds=ttl_seconds).model_dump()
        path = f"/v1/sessions/{_segment(session_id)}/extend"
        return _model(SessionExtended, self._request("POST", path, json=body), "a session")

    def revoke(
        self,
        *,
        reason: str,
        session_id: str | None = None,
        subject: str | None = None,
        target: str | None = None,
    ) -> list[str]:
        """End every session matching the selectors (auditors only); the ids ended."""
        from guard.broker.api.schemas import SessionRevoke, SessionsRevoked

        body = SessionRevoke(
            session_id=session_id, subject=subject, target=target, reason=reason
        ).model_dump()
        answer = self._request("POST", "/v1/sessions/revoke", json=body)
        return _model(SessionsRevoked, answer, "a list of revoked sessions").session_ids


def of_caller() -> BrokerClient:
    """A client of the profile's broker that speaks for the caller: their stored login's
    ID token, or a CI job's (`GUARD_ID_TOKEN`, or a fresh one per call in GitHub Actions)."""
    from guard.cli.auth import current_id_token, per_call_token
    from guard.cli.profile import load_profile

    profile = load_profile()
    return BrokerClient(
        profile.broker_url, current_id_token(profile), fresh_token=per_call_token(profile)
    )


def _verify(base_url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The verification of an https:// broker (a context with its CA); plain http://
    (a loopback broker without api_tls) has nothing to verify."""
    if not base_url.lower().startswith("https://"):
        return None
    return broker_tls_context(ca_file if ca_file is not None else broker_ca_file())


def _segment(text: str) -> str:
    """`text` as one URL path segment (an ID typed as `../x` stays one segment)."""
    return quote(text, safe="")


def _model(cls: type[M], response: Response, wanted: str) -> M:
    """The answer as the broker's model `cls`; `wanted` names it in the error."""
    try:
        return cls.model_validate(response.json())
    except ValueError as exc:  # not JSON, or not a `cls` (pydantic's error)
        raise _unexpected(response, wanted) from exc


def _models(cls: type[M], response: Response, wanted: str) -> list[M]:
    try:
        data = response.json()
        if not isinstance(data, list):
            raise ValueError("not a list")
        return [cls.model_validate(item) for item in data]
    except ValueError as exc:
        raise _unexpected(response, wanted) from exc


def _approval(response: Response) -> ApprovalInfo:
    from guard.broker.api.schemas import ApprovalInfo

    return _model(ApprovalInfo, response, "an approval request")


def _approvals(response: Response) -> list[ApprovalInfo]:
    from guard.broker.api.schemas import ApprovalInfo

    return _models(ApprovalInfo, response, "a list of approval requests")


def _unexpected(response: Response, wanted: str) -> BrokerError:
    request = response.request
    what = f"{request.method} {request.url.path}" if request is not None else "a request"
    return BrokerError(
        f"the broker's answer to {what} is not {wanted}",
        hint="the broker and this guard may be different versions (`guard --version`)",
        status=response.status_code,
    )


def _error_from(response: Response) -> BrokerError:
    try:
        body = ErrorBody.from_json(response.json())
        message, hint = body.message, body.hint
    except ValueError:
        message, hint = f"broker answered HTTP {response.status_code}", None
    if response.status_code == 401 and hint is None:
        hint = "run `guard login` (or `guard dev login USER` for the demo)"
    return BrokerError(message, hint=hint, status=response.status_code)
