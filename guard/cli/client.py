"""HTTP client of the broker API (httpx), with broker errors turned into `CliError`s.

Imports httpx, `guard.broker.api.schemas` (the only broker module the CLI may import) and
the CLI's own error type. Never logs or prints the bearer token or session secrets.
"""

from __future__ import annotations

import httpx

from guard.broker.api.schemas import ErrorBody, SessionCreate, SessionCreated
from guard.cli.errors import CliError

TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class BrokerClient:
    def __init__(self, base_url: str, token: str, *, transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CliError(
                f"cannot reach the guard broker at {self.base_url}: {type(exc).__name__}",
                hint="check that the broker is running (`guard dev status` for the local demo)",
            ) from exc
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def create_session(
        self, target: str, *, reason: str = "", ttl_seconds: int | None = None
    ) -> SessionCreated:
        body = SessionCreate(target=target, reason=reason, ttl_seconds=ttl_seconds)
        response = self._request("POST", "/v1/sessions", json=body.model_dump(exclude_none=True))
        return SessionCreated.model_validate(response.json())

    def end_session(self, session_id: str) -> None:
        try:
            self._request("DELETE", f"/v1/sessions/{session_id}")
        except CliError as err:
            if "no active session" not in err.message:
                raise


def _error_from(response: httpx.Response) -> CliError:
    try:
        body = ErrorBody.model_validate(response.json())
        message, hint = body.message, body.hint
    except ValueError:
        message, hint = f"broker answered HTTP {response.status_code}", None
    if response.status_code == 401 and hint is None:
        hint = "run `guard login` (or `guard dev login USER` for the demo)"
    return CliError(message, hint=hint)
