"""HTTP client of the broker API (httpx), with broker errors turned into `CliError`s.

Imports httpx, `guard.broker.api.schemas` (the only broker module the CLI may import), the
CLI's own error type and profile (the broker's CA). Never logs or prints the bearer token
or session secrets.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from guard.broker.api.schemas import (
    ApprovalDecide,
    ApprovalInfo,
    ErrorBody,
    SessionCreate,
    SessionCreated,
)
from guard.cli.errors import CliError
from guard.cli.profile import broker_ca_file, broker_tls_context

TIMEOUT = httpx.Timeout(30.0, connect=5.0)


@dataclass
class BrokerError(CliError):
    """A failed broker call: `status` is the HTTP status (None: the broker was not reached),
    so a command can say more about a 403/404/409 than the generic message does."""

    status: int | None = None


class BrokerClient:
    # The transport of clients made without one: None is httpx's network transport; tests
    # put an `httpx.MockTransport` here to stand in for the broker.
    transport: httpx.BaseTransport | None = None

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: httpx.BaseTransport | None = None,
        ca_file: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        transport = transport if transport is not None else type(self).transport
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT,
            transport=transport,
            # HTTPS is always verified: against `ca_file`, else GUARD_BROKER_CA or the
            # profile's broker_ca_file (the dev stack's CA), else the system trust store.
            verify=_verify(self.base_url, ca_file) if transport is None else True,
        )

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise BrokerError(
                f"cannot reach the guard broker at {self.base_url}: {type(exc).__name__}",
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
    ) -> SessionCreated:
        """Open a session; with `heartbeat` the caller promises `heartbeat()` calls (the
        broker ends the session when they stop)."""
        body = SessionCreate(
            target=target, reason=reason, ttl_seconds=ttl_seconds, heartbeat=heartbeat
        )
        response = self._request(
            "POST", "/v1/sessions", json=body.model_dump(exclude_none=True, exclude_defaults=True)
        )
        return SessionCreated.model_validate(response.json())

    def heartbeat(self, session_id: str) -> None:
        """The session is still in use (this client's token: the session credential)."""
        self._request("POST", f"/v1/sessions/{_segment(session_id)}/heartbeat")

    def end_session(self, session_id: str) -> None:
        """End the session; one that is already gone is not an error."""
        try:
            self._request("DELETE", f"/v1/sessions/{_segment(session_id)}")
        except BrokerError as err:
            if err.status != 404:
                raise

    # ------------------------------------------------------------ approvals
    def pending_approvals(self) -> list[ApprovalInfo]:
        """Pending requests the caller may decide."""
        return _approvals(self._request("GET", "/v1/approvals"))

    def approval(self, request_id: str) -> ApprovalInfo:
        return _approval(self._request("GET", f"/v1/approvals/{_segment(request_id)}"))

    def decide(self, request_id: str, *, approve: bool, comment: str = "") -> ApprovalInfo:
        """Approve (`comment`) or deny (`comment` is the reason) a request; its new state."""
        verb = "approve" if approve else "deny"
        body = ApprovalDecide(comment=comment).model_dump()
        path = f"/v1/approvals/{_segment(request_id)}/{verb}"
        return _approval(self._request("POST", path, json=body))

    def my_requests(self) -> list[ApprovalInfo]:
        """The caller's own requests, newest first."""
        return _approvals(self._request("GET", "/v1/requests"))


def _verify(base_url: str, ca_file: str | None) -> ssl.SSLContext | bool:
    """The verification of an https:// broker (a context with its CA); plain http://
    (a loopback broker without api_tls) has nothing to verify."""
    if not base_url.lower().startswith("https://"):
        return True
    return broker_tls_context(ca_file if ca_file is not None else broker_ca_file())


def _segment(text: str) -> str:
    """`text` as one URL path segment (an ID typed as `../x` stays one segment)."""
    return quote(text, safe="")


def _approval(response: httpx.Response) -> ApprovalInfo:
    try:
        return ApprovalInfo.model_validate(response.json())
    except ValueError as exc:  # not JSON, or not an ApprovalInfo (pydantic's error)
        raise _unexpected(response, "an approval request") from exc


def _approvals(response: httpx.Response) -> list[ApprovalInfo]:
    try:
        data = response.json()
        if not isinstance(data, list):
            raise ValueError("not a list")
        return [ApprovalInfo.model_validate(item) for item in data]
    except ValueError as exc:
        raise _unexpected(response, "a list of approval requests") from exc


def _unexpected(response: httpx.Response, wanted: str) -> BrokerError:
    return BrokerError(
        f"the broker's answer to {response.request.method} {response.request.url.path} "
        f"is not {wanted}",
        hint="the broker and this guard may be different versions (`guard --version`)",
        status=response.status_code,
    )


def _error_from(response: httpx.Response) -> BrokerError:
    try:
        body = ErrorBody.model_validate(response.json())
        message, hint = body.message, body.hint
    except ValueError:
        message, hint = f"broker answered HTTP {response.status_code}", None
    if response.status_code == 401 and hint is None:
        hint = "run `guard login` (or `guard dev login USER` for the demo)"
    return BrokerError(message, hint=hint, status=response.status_code)
