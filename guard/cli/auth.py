"""Logging in: the RFC 8628 device flow, token storage, and fresh ID tokens for commands.

Imports httpx, keyring, PyJWT (only to read `exp` without verification: the broker is the
one that verifies) and the CLI's own modules. Tokens go to the OS keychain through
`keyring`; where no keychain exists (servers, CI) to `$GUARD_HOME/credentials.json` with
mode 0600. Tokens are never printed or logged.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

from guard.cli.errors import CliError
from guard.cli.profile import Profile, guard_home

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
MIN_VALIDITY = 60  # seconds an ID token must still be valid to be used
_SERVICE = "guard"


def _usable_keyring() -> Any | None:
    if os.environ.get("GUARD_KEYRING") == "file":
        return None
    try:
        import keyring
        from keyring.backends import fail

        backend = keyring.get_keyring()
        if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) < 1:
            return None
        return keyring
    except Exception:  # noqa: BLE001 - any keyring import/backend problem means "no keychain"
        return None


class TokenStore:
    """Tokens per (issuer, client): OS keychain, else a 0600 JSON file."""

    _warned = False

    def __init__(self, profile: Profile) -> None:
        self.key = f"{profile.issuer} {profile.client_id}"
        self._keyring = _usable_keyring()
        self.path = guard_home() / "credentials.json"

    def _read_file(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CliError(
                f"cannot read {self.path}: {exc}", hint="delete it and log in again"
            ) from exc

    def _write_file(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.chmod(self.path, 0o600)  # an older file may have been created looser
        if not TokenStore._warned and os.environ.get("GUARD_KEYRING") != "file":
            TokenStore._warned = True
            print(
                f"guard: no OS keychain found; tokens stored in {self.path} (mode 0600)",
                file=sys.stderr,
            )

    def load(self) -> dict[str, Any] | None:
        if self._keyring is not None:
            raw = self._keyring.get_password(_SERVICE, self.key)
            return json.loads(raw) if raw else None
        return self._read_file().get(self.key)

    def save(self, tokens: dict[str, Any]) -> None:
        kept = {k: tokens[k] for k in ("id_token", "refresh_token", "access_token") if k in tokens}
        if self._keyring is not None:
            self._keyring.set_password(_SERVICE, self.key, json.dumps(kept))
            return
        data = self._read_file()
        data[self.key] = kept
        self._write_file(data)

    def clear(self) -> None:
        if self._keyring is not None:
            try:
                self._keyring.delete_password(_SERVICE, self.key)
            except Exception:  # noqa: BLE001 - nothing stored is fine
                pass
            return
        data = self._read_file()
        if data.pop(self.key, None) is not None:
            self._write_file(data)


@dataclass
class DeviceAuthorization:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


class DeviceFlow:
    def __init__(self, issuer: str, client_id: str, *, http: httpx.Client | None = None) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self.http = http or httpx.Client(timeout=10.0)
        self._config: dict[str, Any] | None = None

    def _unreachable(self, exc: Exception) -> CliError:
        return CliError(
            f"cannot reach the identity provider at {self.issuer}: {type(exc).__name__}",
            hint="check the issuer URL and your network (`guard dev status` for the demo)",
        )

    def config(self) -> dict[str, Any]:
        if self._config is None:
            try:
                response = self.http.get(f"{self.issuer}/.well-known/openid-configuration")
                response.raise_for_status()
                self._config = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise self._unreachable(exc) from exc
        return self._config

    def _post(self, url: str, data: dict[str, str]) -> httpx.Response:
        try:
            return self.http.post(url, data=data)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    def start(
        self, scope: str = "openid profile email groups offline_access"
    ) -> DeviceAuthorization:
        endpoint = self.config().get("device_authorization_endpoint")
        if not endpoint:
            raise CliError(f"{self.issuer} does not support the device flow (RFC 8628)")
        response = self._post(endpoint, {"client_id": self.client_id, "scope": scope})
        if response.status_code != 200:
            raise CliError(f"device authorization failed: {_oauth_error(response)}")
        body = response.json()
        return DeviceAuthorization(
            body["device_code"],
            body["user_code"],
            body["verification_uri"],
            body.get("verification_uri_complete"),
            int(body.get("expires_in", 600)),
            int(body.get("interval", 5)),
        )

    def poll(self, auth: DeviceAuthorization, *, sleep=time.sleep) -> dict[str, Any]:
        interval = max(auth.interval, 1)
        deadline = time.monotonic() + auth.expires_in
        token_endpoint = self.config()["token_endpoint"]
        while time.monotonic() < deadline:
            sleep(interval)
            response = self._post(
                token_endpoint,
                {
                    "grant_type": DEVICE_GRANT,
                    "device_code": auth.device_code,
                    "client_id": self.client_id,
                },
            )
            if response.status_code == 200:
                return response.json()
            error = _oauth_error(response)
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += 5  # RFC 8628 §3.5
                continue
            if error == "access_denied":
                raise CliError("the sign-in was denied", hint="run `guard login` again")
            if error == "expired_token":
                break
            raise CliError(f"sign-in failed: {error}")
        raise CliError(
            "the sign-in code expired before it was approved", hint="run `guard login` again"
        )

    def refresh(self, refresh_token: str) -> dict[str, Any] | None:
        response = self._post(
            self.config()["token_endpoint"],
            {
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": self.client_id,
            },
        )
        return response.json() if response.status_code == 200 else None


def _oauth_error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.status_code))
    except ValueError:
        return f"HTTP {response.status_code}"


def seconds_left(id_token: str) -> float:
    # Read `exp` only, WITHOUT verifying: the broker verifies every token it receives; the
    # CLI just avoids sending one that is about to expire.
    try:
        claims = jwt.decode(id_token, options={"verify_signature": False})
        return float(claims.get("exp", 0)) - time.time()
    except jwt.PyJWTError:
        return -1.0


def current_id_token(profile: Profile, *, id_token_file: Path | None = None) -> str:
    """An ID token for the broker: from a file or GUARD_ID_TOKEN (CI), else the login."""
    if id_token_file is not None:
        try:
            return id_token_file.read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read the ID token file {id_token_file}: {exc}") from exc
    if os.environ.get("GUARD_ID_TOKEN"):
        return os.environ["GUARD_ID_TOKEN"].strip()
    store = TokenStore(profile)
    tokens = store.load()
    if tokens and seconds_left(tokens.get("id_token", "")) > MIN_VALIDITY:
        return tokens["id_token"]
    if tokens and tokens.get("refresh_token"):
        fresh = DeviceFlow(profile.issuer, profile.client_id).refresh(tokens["refresh_token"])
        if fresh and fresh.get("id_token"):
            store.save(fresh)
            return fresh["id_token"]
    raise CliError(
        "not logged in (or the login expired)",
        hint="run `guard login` (or `guard dev login USER` for the demo)",
    )
