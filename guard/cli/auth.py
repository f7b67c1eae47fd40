"""Logging in: the RFC 8628 device flow, token storage, and fresh ID tokens for commands.

Imports the standard library and the CLI's own modules (`cli.http` for the IdP); `keyring`
only when a command reads or writes tokens through the OS keychain. The ID token's `exp` is
read without verification (the broker is the one that verifies), so no JWT library either:
`guard exec` with a stored login stays fast. Tokens go to the OS keychain through
`keyring` (service "guard", user "<issuer> <client_id>"); where no keychain exists
(servers, CI) or `GUARD_KEYRING=file`, to `$GUARD_HOME/credentials.json` with mode 0600.
Tokens are never printed or logged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from guard.cli.errors import CliError
from guard.cli.http import HttpClient, Response, TransportError
from guard.cli.profile import Profile, guard_home
from guard.cli.record import TYPE_CHECKING, Record

if TYPE_CHECKING:  # `typing` costs `guard exec` ~13 ms of start-up: for mypy only
    from typing import Any, Protocol

    class KeyringBackend(Protocol):
        def get_password(self, service: str, username: str) -> str | None: ...
        def set_password(self, service: str, username: str, password: str) -> None: ...
        def delete_password(self, service: str, username: str) -> None: ...


DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPE = "openid profile email groups offline_access"
MIN_VALIDITY = 60  # seconds an ID token must still be valid to be sent
SLOW_DOWN_STEP = 5  # RFC 8628 §3.5
KEYRING_SERVICE = "guard"
_KEPT = ("id_token", "refresh_token", "access_token")
_KEYRING_HINT = "set GUARD_KEYRING=file to keep tokens in $GUARD_HOME/credentials.json (0600)"


def system_keyring() -> KeyringBackend | None:
    """The OS keychain, or None when there is none (keyring's fail/null/empty chainer)."""
    if os.environ.get("GUARD_KEYRING", "").lower() == "file":
        return None
    try:
        import keyring
        from keyring.backends import fail

        backend = keyring.get_keyring()
    except Exception:  # noqa: BLE001 - any import/backend discovery problem: no keychain
        return None
    if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) < 1:
        return None
    return backend


class TokenStore:
    """Tokens per (issuer, client): the OS keychain, else a 0600 JSON file."""

    _warned = False  # the "no keychain" note is printed once per process

    def __init__(self, profile: Profile, *, backend: KeyringBackend | None = None) -> None:
        """`backend` replaces the OS keychain (tests); by default it is discovered when
        first needed."""
        self.key = f"{profile.issuer} {profile.client_id}"
        self.path = guard_home() / "credentials.json"
        self._backend = backend
        self._resolved = backend is not None

    @property
    def _keyring(self) -> KeyringBackend | None:
        if not self._resolved:
            self._resolved = True
            # Tokens are read and refreshed where the login put them. When the 0600 file
            # holds this login, keyring's backend discovery (100–150 ms of imports, every
            # command) is skipped. They stay in the file until `guard logout`; the login
            # after that goes to a keychain if one has appeared.
            self._backend = None if self._file_holds_login() else system_keyring()
        return self._backend

    def _file_holds_login(self) -> bool:
        try:
            return isinstance(self._read_file().get(self.key), dict)
        except CliError:  # unreadable: let the keychain (or the error on use) decide
            return False

    @property
    def uses_keyring(self) -> bool:
        return self._keyring is not None

    def _keyring_call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - keyring backends raise anything (DBus…)
            raise CliError(
                f"cannot {what} the OS keychain: {type(exc).__name__}", hint=_KEYRING_HINT
            ) from exc

    def _read_file(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CliError(
                f"cannot read {self.path}: {type(exc).__name__}", hint="delete it and log in again"
            ) from exc
        return data if isinstance(data, dict) else {}

    def _write_file(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        # 0600 from the first byte, then an atomic replace: never readable by others, never
        # half-written.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover tmp file
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.chmod(self.path, 0o600)
        if not TokenStore._warned and os.environ.get("GUARD_KEYRING", "").lower() != "file":
            TokenStore._warned = True
            print(
                f"guard: no OS keychain found; tokens are kept in {self.path} (mode 0600)",
                file=sys.stderr,
            )

    def load(self) -> dict[str, Any] | None:
        if self._keyring is not None:
            keyring = self._keyring
            raw = self._keyring_call(
                "read from", lambda: keyring.get_password(KEYRING_SERVICE, self.key)
            )
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                return None
        else:
            data = self._read_file().get(self.key)
        return data if isinstance(data, dict) else None

    def save(self, tokens: dict[str, Any]) -> None:
        kept = {k: tokens[k] for k in _KEPT if tokens.get(k)}
        if self._keyring is not None:
            keyring = self._keyring
            self._keyring_call(
                "write to",
                lambda: keyring.set_password(KEYRING_SERVICE, self.key, json.dumps(kept)),
            )
            return
        data = self._read_file()
        data[self.key] = kept
        self._write_file(data)

    def clear(self) -> bool:
        """Forget this (issuer, client)'s tokens; True if there were any."""
        if self._keyring is not None:
            had = self.load() is not None
            if had:
                keyring = self._keyring
                self._keyring_call(
                    "delete from", lambda: keyring.delete_password(KEYRING_SERVICE, self.key)
                )
            return had
        data = self._read_file()
        if data.pop(self.key, None) is None:
            return False
        self._write_file(data)
        return True


class DeviceAuthorization(Record):
    """The IdP's answer to a device authorization request (RFC 8628 §3.2)."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


def _oauth_error(response: Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return f"HTTP {response.status_code}"


class DeviceFlow:
    """An OAuth client of one issuer: discovery, device authorization, polling, refresh."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        *,
        http: HttpClient | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self._owns_http = http is None
        # HTTPS to the IdP is verified against the system trust store (SSL_CERT_FILE).
        self.http = http or HttpClient(timeout=10.0, connect_timeout=10.0)
        self._sleep = sleep
        self._clock = clock
        self._config: dict[str, Any] | None = None

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> DeviceFlow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, exc: Exception) -> CliError:
        return CliError(
            f"cannot reach the identity provider at {self.issuer}: {exc}",
            hint="check the issuer URL and your network (for the demo: `guard dev status`)",
        )

    def config(self) -> dict[str, Any]:
        """The issuer's discovery document (fetched once)."""
        if self._config is None:
            url = f"{self.issuer}/.well-known/openid-configuration"
            try:
                response = self.http.get(url)
            except TransportError as exc:
                raise self._unreachable(exc) from exc
            try:
                if response.status_code >= 400:
                    raise ValueError(f"HTTP {response.status_code}")
                config = response.json()
            except ValueError as exc:
                raise CliError(
                    f"{self.issuer} is not an OpenID Connect issuer (no discovery document)",
                    hint="check the issuer URL in your profile (or --issuer)",
                ) from exc
            if not isinstance(config, dict) or str(config.get("issuer", "")).rstrip("/") != (
                self.issuer
            ):
                raise CliError(
                    f"{url} describes another issuer ({config.get('issuer')!r})",
                    hint="use the issuer URL exactly as the identity provider names it",
                )
            self._config = config
        return self._config

    def post_form(self, url: str, data: dict[str, str]) -> Response:
        try:
            return self.http.post(url, data=data)
        except TransportError as exc:
            raise self._unreachable(exc) from exc

    def _endpoint(self, name: str) -> str:
        url = self.config().get(name)
        if not isinstance(url, str) or not url:
            raise CliError(f"{self.issuer} has no {name} (device flow, RFC 8628, unsupported)")
        return url

    def start(self, scope: str = DEFAULT_SCOPE) -> DeviceAuthorization:
        """Ask for a device code and the user code to show (RFC 8628 §3.1)."""
        response = self.post_form(
            self._endpoint("device_authorization_endpoint"),
            {"client_id": self.client_id, "scope": scope},
        )
        if response.status_code != 200:
            raise CliError(
                f"the identity provider refused the sign-in request: {_oauth_error(response)}",
                hint=f"check that client id {self.client_id!r} is registered at {self.issuer}",
            )
        try:
            body = response.json()
            return DeviceAuthorization(
                device_code=body["device_code"],
                user_code=body["user_code"],
                verification_uri=body["verification_uri"],
                verification_uri_complete=body.get("verification_uri_complete"),
                expires_in=int(body.get("expires_in", 600)),
                interval=int(body.get("interval", 5)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CliError(f"{self.issuer} sent a malformed device authorization") from exc

    def poll(self, auth: DeviceAuthorization, *, immediate: bool = False) -> dict[str, Any]:
        """Poll the token endpoint until approval (RFC 8628 §3.4/3.5); the token response.

        Waits `interval` seconds before each request (+5 s after every `slow_down`) and
        gives up when the code expires. `immediate=True` sends the first request at once
        (the code is known to be approved already).
        """
        interval = max(auth.interval, 1)
        deadline = self._clock() + auth.expires_in
        token_endpoint = self._endpoint("token_endpoint")
        wait = 0 if immediate else interval
        while self._clock() + wait < deadline:
            if wait:
                self._sleep(wait)
            wait = interval
            response = self.post_form(
                token_endpoint,
                {
                    "grant_type": DEVICE_GRANT,
                    "device_code": auth.device_code,
                    "client_id": self.client_id,
                },
            )
            if response.status_code == 200:
                return _token_body(response, self.issuer)
            error = _oauth_error(response)
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += SLOW_DOWN_STEP
                wait = interval
                continue
            if error == "access_denied":
                raise CliError("the sign-in was denied", hint="run `guard login` again")
            if error == "expired_token":
                break
            raise CliError(f"sign-in failed at {self.issuer}: {error}")
        raise CliError(
            "the sign-in code expired before it was approved", hint="run `guard login` again"
        )

    def revoke(self, refresh_token: str) -> bool:
        """Revoke the login at the IdP (RFC 7009) when it offers a revocation endpoint;
        whether it was told. Best effort: the caller forgets the tokens either way."""
        url = self.config().get("revocation_endpoint")
        if not isinstance(url, str) or not url:
            return False
        form = {
            "token": refresh_token,
            "token_type_hint": "refresh_token",
            "client_id": self.client_id,
        }
        return self.post_form(url, form).status_code == 200

    def refresh(self, refresh_token: str) -> dict[str, Any] | None:
        """New tokens for a refresh token; None if the IdP no longer accepts it."""
        response = self.post_form(
            self._endpoint("token_endpoint"),
            {
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": self.client_id,
            },
        )
        if response.status_code == 200:
            # OIDC Core §12.2: a refresh answer may come without an ID token.
            return _token_body(response, self.issuer, id_token=False)
        if response.status_code in (400, 401):
            return None  # invalid_grant and friends: the login is over
        raise CliError(
            f"the identity provider at {self.issuer} failed to refresh the login: "
            f"{_oauth_error(response)}",
            hint="try again later, or run `guard login`",
        )


def _token_body(response: Response, issuer: str, *, id_token: bool = True) -> dict[str, Any]:
    """A token response's body; CliError when it is not one (or, with `id_token`, when it
    holds no ID token)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or (id_token and not isinstance(body.get("id_token"), str)):
        raise CliError(f"the identity provider at {issuer} sent no ID token")
    return body


def seconds_left(id_token: str) -> float:
    """Seconds until `exp`, read WITHOUT verifying the token.

    The broker verifies every token it receives; the CLI only avoids sending one that is
    about to expire. Unreadable tokens count as expired.
    """
    claims = unverified_claims(id_token)
    exp = claims.get("exp") if claims is not None else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return -1.0
    return float(exp) - time.time()


@contextlib.contextmanager
def refresh_lock() -> Iterator[None]:
    """One login refresh at a time among the guard processes of this GUARD_HOME (eight
    parallel `guard exec` in a CI job all find the ID token expired at once). An advisory
    lock (flock) on `$GUARD_HOME/credentials.lock`: released when the process exits,
    however it exits, so a killed guard never leaves it held."""
    import fcntl

    home = guard_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(home / "credentials.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits as long as a refresh takes (its timeouts)
        yield
    finally:
        os.close(fd)


def unverified_claims(id_token: str) -> dict[str, Any] | None:
    """The payload of a compact JWS (header.payload.signature), NOT verified: for showing
    and for expiry checks only, never for a decision. None when it is not one."""
    parts = id_token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def id_token_variable(profile: Profile | None = None) -> str:
    """The environment variable a CI job's ID token is in: the profile's
    `id_token_variable` (GitLab's `id_tokens:` entry names its own), else GUARD_ID_TOKEN."""
    name = profile.id_token_variable if profile is not None else None
    return name or os.environ.get("GUARD_ID_TOKEN_VARIABLE") or "GUARD_ID_TOKEN"


def in_github_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def token_source(id_token_file: Path | None = None, profile: Profile | None = None) -> str | None:
    """Where `current_id_token` takes the token from, in words, when it is not the stored
    login: `--id-token-file PATH`, the CI variable, or GitHub Actions' token service;
    None for the login."""
    if id_token_file is not None:
        return f"--id-token-file {id_token_file}"
    variable = id_token_variable(profile)
    if os.environ.get(variable, "").strip():
        return variable
    if in_github_actions():
        return "GitHub Actions' ID token service (ACTIONS_ID_TOKEN_REQUEST_URL)"
    return None


def per_call_token(profile: Profile) -> Callable[[], str] | None:
    """A source of a fresh token for each broker call where the caller's token is good for
    one call only (GitHub Actions' service); None where one token serves all calls."""
    if not in_github_actions() or os.environ.get(id_token_variable(profile), "").strip():
        return None  # a stored login, or a token given in the environment: there is no other
    return lambda: github_actions_token(profile)


def github_actions_token(profile: Profile) -> str:
    """A fresh ID token from the GitHub Actions runner for guard's audience.

    Asked for on every broker call and never cached: it lives about five minutes and the
    broker accepts each one once (it remembers the `jti`). The request bearer is the
    runner's, sent only to the runner's own URL; neither it nor the token is ever shown.
    """
    from urllib.parse import quote

    url = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL", "")
    bearer = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "")
    if not url or not bearer:
        raise CliError(
            "this GitHub Actions job cannot ask for an ID token",
            hint="give the job `permissions: id-token: write` (and contents: read)",
        )
    audience = profile.ci_audience or profile.broker_url
    target = f"{url}{'&' if '?' in url else '?'}audience={quote(audience, safe='')}"
    client = HttpClient(
        headers={"Authorization": f"Bearer {bearer}"}, timeout=15.0, connect_timeout=10.0
    )
    try:
        response = client.get(target)
    except TransportError as exc:
        raise CliError(
            f"cannot reach GitHub Actions' ID token service: {exc}",
            hint="retry the job; GitHub's status page says whether Actions is degraded",
        ) from exc
    finally:
        client.close()
    try:
        value = response.json().get("value") if response.status_code == 200 else None
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, str) or not value:
        raise CliError(
            f"GitHub Actions' ID token service answered HTTP {response.status_code} "
            f"without a token (audience {audience!r})",
            hint="check the job's `permissions: id-token: write`",
        )
    return value


def current_id_token(
    profile: Profile, *, id_token_file: Path | None = None, http: HttpClient | None = None
) -> str:
    """An ID token to send to the broker.

    In order: `--id-token-file` (the caller passes it), the CI variable (GUARD_ID_TOKEN or
    the profile's `id_token_variable`), a fresh token from GitHub Actions' token service
    in a GitHub Actions job, the stored login if it is valid for more than a minute, a
    silent refresh (rotated tokens are stored), else `CliError("not logged in")`.
    """
    if id_token_file is not None:
        try:
            token = id_token_file.read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read the ID token file {id_token_file}: {exc}") from exc
        if not token:
            raise CliError(f"the ID token file {id_token_file} is empty")
        return token
    variable = id_token_variable(profile)
    if os.environ.get(variable, "").strip():
        return os.environ[variable].strip()
    if in_github_actions():
        return github_actions_token(profile)
    if not profile.issuer:
        raise CliError(
            "no identity provider configured and no ID token given",
            hint=f"set GUARD_ISSUER (then `guard login`), or give a CI job's token with "
            f"{variable} or --id-token-file",
        )
    store = TokenStore(profile)
    tokens = store.load() or {}
    token = _valid_id_token(tokens)
    if token is None and tokens.get("refresh_token"):
        with refresh_lock():
            # Another guard process may have refreshed while this one waited: its tokens,
            # not a second use of the same refresh token, which a rotating IdP takes for
            # theft and answers by revoking the whole login (OAuth 2.1 reuse detection).
            tokens = store.load() or {}
            token = _valid_id_token(tokens) or _refreshed(store, tokens, profile, http)
    if token is None:
        raise CliError(
            "not logged in (or the login expired)",
            hint="run `guard login` (or `guard dev login USER` for the demo)",
        )
    return token


def _valid_id_token(tokens: dict[str, Any]) -> str | None:
    """The stored `tokens`' ID token, if it is valid for more than `MIN_VALIDITY` seconds."""
    token = tokens.get("id_token", "")
    return str(token) if seconds_left(token) > MIN_VALIDITY else None


def _refreshed(
    store: TokenStore, tokens: dict[str, Any], profile: Profile, http: HttpClient | None
) -> str | None:
    """A fresh ID token from the stored `tokens`' refresh token (the new tokens stored in
    `store`), or None when there is none or the IdP no longer takes it."""
    refresh = tokens.get("refresh_token")
    if not refresh:
        return None
    with DeviceFlow(profile.issuer, profile.client_id, http=http) as flow:
        fresh = flow.refresh(refresh)
    if fresh is None:
        return None
    if not isinstance(fresh.get("id_token"), str):
        # Allowed (OIDC Core §12.2), but the broker takes only ID tokens. Keep what it
        # sent, a rotated refresh token above all (the old one is spent), and say why.
        store.save({"refresh_token": refresh, **fresh, "id_token": ""})
        raise CliError(
            f"the identity provider at {profile.issuer} renewed the login without a new ID token",
            hint="run `guard login` again; to stay logged in, the IdP must issue ID tokens "
            "when it refreshes (its client settings for guard)",
        )
    # An IdP that does not rotate keeps the old refresh token valid: keep it.
    store.save({"refresh_token": refresh, **fresh})
    return str(fresh["id_token"])
