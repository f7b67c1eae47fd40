"""A small standards-following OIDC provider for the demo stack and tests.

Discovery, JWKS, RFC 8628 device authorization (user codes, polling with `interval` and
`slow_down`, expiry, denial), refresh tokens with rotation (and reuse detection), RS256 ID
tokens carrying the user's groups. Users come from a YAML file; approval happens on the
`/device` page (a dev tool: no passwords). The broker verifies its tokens like any other
issuer's and never special-cases it.

    python -m guard.devstack.idp --host 127.0.0.1 --port N --state-dir DIR --client-id guard-cli

State (device codes, refresh tokens) lives in memory: restarting the IdP logs everyone out,
but the signing key persists in `DIR/idp-signing-key.pem` so issued ID tokens stay valid.
Tokens are never logged (uvicorn runs without an access log).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from guard.devstack.files import write_private

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §6.1: base-20 consonants, no vowels (no words) and no look-alikes (0/O, 1/I).
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
ID_TOKEN_LIFETIME = 15 * 60
DEVICE_CODE_LIFETIME = 600
REFRESH_TOKEN_LIFETIME = 12 * 3600
SLOW_DOWN_STEP = 5  # RFC 8628 §3.5: "increased by 5 seconds for this and all subsequent"
KEY_FILE = "idp-signing-key.pem"
# RFC 6749 §5.1: token responses must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass
class IdPConfig:
    issuer: str
    client_id: str
    state_dir: Path
    users: dict[str, dict[str, Any]]
    # Where `users` came from, read again when it changes: removing a user (offboarding)
    # or a group takes effect at their next refresh, as at a real IdP.
    users_file: Path | None = None
    interval: int = 5
    id_token_lifetime: int = ID_TOKEN_LIFETIME
    # Wall clock (seconds since the epoch); tests inject a fake one to expire codes.
    clock: Callable[[], float] = time.time


@dataclass
class _Device:
    user_code: str
    scope: str
    expires_at: float
    interval: int
    last_poll: float | None = None
    user: str | None = None
    auth_time: int = 0
    denied: bool = False


@dataclass
class _Refresh:
    user: str
    auth_time: int
    family: str  # every rotation of one login shares a family
    expires_at: float


@dataclass
class _State:
    devices: dict[str, _Device] = field(default_factory=dict)  # device_code → device
    refresh: dict[str, _Refresh] = field(default_factory=dict)  # sha256(token) → grant
    used_refresh: dict[str, str] = field(default_factory=dict)  # sha256(token) → family


def load_users(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Users from YAML (`users: {name: {name:, email:, groups: [...]}}`), checked."""
    source = path or resources.files("guard.devstack").joinpath("users.yaml")
    data = yaml.safe_load(source.read_text()) or {}
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict) or not users:
        raise ValueError(f"{source}: expected a non-empty `users:` mapping")
    for name, info in users.items():
        info = info or {}
        groups = info.get("groups", []) if isinstance(info, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError(f"{source}: user {name!r} needs `groups:` as a list of strings")
        users[name] = info
    return {str(k): v for k, v in users.items()}


def signing_key(state_dir: Path) -> rsa.RSAPrivateKey:
    """The IdP's RSA-2048 key: generated once into `state_dir`, mode 0600."""
    path = state_dir / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} is not an RSA private key")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, pem)
    return key


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an RSA or EC public JWK (base64url, no padding)."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def normalize_user_code(raw: str) -> str:
    """`bcdf ghjk`, `BCDFGHJK` and `BCDF-GHJK` are the same code (RFC 8628 §6.1)."""
    chars = [c for c in raw.upper() if c in USER_CODE_ALPHABET]
    return "".join(chars[:4]) + "-" + "".join(chars[4:]) if len(chars) > 4 else "".join(chars)


def _digest(token: str) -> str:
    # Refresh tokens are kept as hashes: a memory dump does not hand them out.
    return hashlib.sha256(token.encode()).hexdigest()


def _error(code: str, description: str, status: int = 400) -> JSONResponse:
    # Always 400, `invalid_client` too: RFC 6749 §5.2 requires 401 only when the client
    # authenticated with an Authorization header, and this public client never does.
    return JSONResponse(
        {"error": code, "error_description": description}, status_code=status, headers=NO_STORE
    )


async def _form(request: Request) -> dict[str, str]:
    # Parsed by hand: avoids a python-multipart dependency for urlencoded forms.
    data = parse_qs((await request.body()).decode(errors="replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in data.items()}


class _Provider:
    """The IdP's endpoints as plain methods over its key and in-memory state."""

    def __init__(self, config: IdPConfig) -> None:
        self.config = config
        self.key = signing_key(config.state_dir)
        public_jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(
            self.key.public_key(), as_dict=True
        )
        self.kid = jwk_thumbprint(public_jwk)
        public_jwk.update(kid=self.kid, alg="RS256", use="sig")
        self.public_jwk = public_jwk
        self.state = _State()
        self.issuer, self.clock = config.issuer, config.clock
        self._users_read = self._users_mtime()

    def _users_mtime(self) -> int | None:
        path = self.config.users_file
        try:
            return path.stat().st_mtime_ns if path is not None else None
        except OSError:
            return None

    def users(self) -> dict[str, dict[str, Any]]:
        """The users now: the file again when it changed (a file that no longer reads
        keeps the last good list)."""
        mtime = self._users_mtime()
        if mtime is not None and mtime != self._users_read and self.config.users_file:
            try:
                self.config.users = load_users(self.config.users_file)
            except (OSError, ValueError):
                return self.config.users
            self._users_read = mtime
        return self.config.users

    def subject(self, user: str) -> str:
        # Stable per (issuer, user), opaque like a real IdP's `sub`.
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.issuer}/users/{user}"))

    def purge(self, now: float) -> None:
        state = self.state
        for code in [c for c, d in state.devices.items() if d.expires_at < now - 60]:
            del state.devices[code]
        for digest in [d for d, g in state.refresh.items() if g.expires_at < now]:
            del state.refresh[digest]

    def issue(self, user: str, auth_time: int, family: str, scope: str = "openid") -> JSONResponse:
        config = self.config
        now = int(self.clock())
        info = self.users()[user]
        claims = {
            "iss": self.issuer,
            "sub": self.subject(user),
            "aud": config.client_id,
            "iat": now,
            "nbf": now,
            "exp": now + config.id_token_lifetime,
            "auth_time": auth_time,
            "jti": secrets.token_urlsafe(16),
            "name": info.get("name", user),
            "preferred_username": user,
            "email": info.get("email", f"{user}@example.com"),
            "groups": list(info.get("groups", [])),
        }
        id_token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        refresh = secrets.token_urlsafe(32)
        self.state.refresh[_digest(refresh)] = _Refresh(
            user, auth_time, family, now + REFRESH_TOKEN_LIFETIME
        )
        body = {
            # Opaque on purpose: a JWT access token with the ID token's audience could be
            # replayed to the broker as if it were an ID token.
            "access_token": secrets.token_urlsafe(32),
            "id_token": id_token,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_in": config.id_token_lifetime,
            "scope": scope,
        }
        return JSONResponse(body, headers=NO_STORE)

    def discovery(self) -> dict[str, Any]:
        issuer = self.issuer
        return {
            "issuer": issuer,
            "jwks_uri": f"{issuer}/jwks",
            "token_endpoint": f"{issuer}/token",
            "device_authorization_endpoint": f"{issuer}/device_authorization",
            "revocation_endpoint": f"{issuer}/revoke",
            "id_token_signing_alg_values_supported": ["RS256"],
            "grant_types_supported": [DEVICE_GRANT, "refresh_token"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "scopes_supported": ["openid", "profile", "email", "groups", "offline_access"],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "nbf",
                "auth_time",
                "jti",
                "name",
                "preferred_username",
                "email",
                "groups",
            ],
            "token_endpoint_auth_methods_supported": ["none"],
        }

    def device_authorization(self, form: dict[str, str]) -> JSONResponse:
        config, issuer = self.config, self.issuer
        if form.get("client_id") != config.client_id:
            return _error("invalid_client", "unknown client_id")
        now = self.clock()
        self.purge(now)
        device_code = secrets.token_urlsafe(32)  # 256 bits
        raw = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
        user_code = normalize_user_code(raw)
        scope = form.get("scope") or "openid"
        self.state.devices[device_code] = _Device(
            user_code, scope, now + DEVICE_CODE_LIFETIME, config.interval
        )
        return JSONResponse(
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": f"{issuer}/device",
                "verification_uri_complete": f"{issuer}/device?user_code={quote(user_code)}",
                "expires_in": DEVICE_CODE_LIFETIME,
                "interval": config.interval,
            },
            headers=NO_STORE,
        )

    def device_page(self, user_code: str) -> str:
        options = "".join(
            f'<option value="{html.escape(u)}">{html.escape(u)} — '
            f"{html.escape(', '.join(info.get('groups', [])) or 'no groups')}</option>"
            for u, info in self.users().items()
        )
        return (
            "<!doctype html><meta charset=utf-8><title>guard dev IdP</title>"
            "<h1>guard dev sign-in</h1><p>Development identity provider: no passwords.</p>"
            '<form method="post" action="/device">'
            f'<label>Code <input name="user_code" value="{html.escape(user_code)}"></label> '
            f'<label>User <select name="username">{options}</select></label> '
            '<button name="action" value="approve">Approve</button> '
            '<button name="action" value="deny">Deny</button></form>'
        )

    def device_decide(self, form: dict[str, str]) -> HTMLResponse:
        code = normalize_user_code(form.get("user_code", ""))
        now = self.clock()
        device = next(
            (d for d in self.state.devices.values() if d.user_code == code and d.expires_at >= now),
            None,
        )
        if device is None:
            return HTMLResponse("<p>unknown or expired code</p>", status_code=400)
        if device.denied or device.user is not None:
            return HTMLResponse("<p>this code was already used</p>", status_code=400)
        action = form.get("action")
        if action == "deny":
            device.denied = True
            return HTMLResponse("<p>denied; return to your terminal</p>")
        if action != "approve":
            return HTMLResponse("<p>action must be approve or deny</p>", status_code=400)
        user = form.get("username", "")
        if user not in self.users():
            return HTMLResponse("<p>unknown user</p>", status_code=400)
        device.user, device.auth_time = user, int(now)
        return HTMLResponse(f"<p>signed in as {html.escape(user)}; return to your terminal</p>")

    def token(self, form: dict[str, str]) -> JSONResponse:
        if form.get("client_id") != self.config.client_id:
            return _error("invalid_client", "unknown client_id")
        grant = form.get("grant_type")
        if grant == "refresh_token":
            return self.refresh_grant(form)
        if grant == DEVICE_GRANT:
            return self.device_grant(form)
        return _error("unsupported_grant_type", f"unsupported grant_type {grant!r}")

    def refresh_grant(self, form: dict[str, str]) -> JSONResponse:
        state = self.state
        digest = _digest(form.get("refresh_token", ""))
        grant = state.refresh.pop(digest, None)  # rotation: one use only
        if grant is None:
            family = state.used_refresh.get(digest)
            if family is not None:
                # A rotated token came back: it leaked. Revoke the whole login (OAuth 2.0
                # Security BCP, refresh token rotation with reuse detection).
                for d in [d for d, g in state.refresh.items() if g.family == family]:
                    del state.refresh[d]
            return _error("invalid_grant", "unknown, expired or already used refresh token")
        state.used_refresh[digest] = grant.family
        if grant.expires_at < self.clock():
            return _error("invalid_grant", "the refresh token expired")
        if grant.user not in self.users():
            return _error("invalid_grant", "the user no longer exists (offboarded)")
        return self.issue(grant.user, grant.auth_time, grant.family)

    def revoke(self, form: dict[str, str]) -> Response:
        """RFC 7009: a refresh token revoked ends its whole login (every rotation of it).
        200 whatever the token was: a client learns nothing about tokens not its own."""
        state = self.state
        grant = state.refresh.get(_digest(form.get("token", "")))
        if grant is not None:
            for digest in [d for d, g in state.refresh.items() if g.family == grant.family]:
                del state.refresh[digest]
        return Response(status_code=200, headers=NO_STORE)

    def device_grant(self, form: dict[str, str]) -> JSONResponse:
        device_code = form.get("device_code", "")
        device = self.state.devices.get(device_code)
        if device is None:
            return _error("invalid_grant", "unknown or already used device code")
        now = self.clock()
        if device.expires_at < now:
            del self.state.devices[device_code]
            return _error("expired_token", "the device code expired")
        if device.denied:
            del self.state.devices[device_code]
            return _error("access_denied", "the user denied the request")
        if device.user is not None:
            del self.state.devices[device_code]  # one use only
            return self.issue(device.user, device.auth_time, secrets.token_hex(8), device.scope)
        too_fast = device.last_poll is not None and now - device.last_poll < device.interval
        device.last_poll = now
        if too_fast:
            device.interval += SLOW_DOWN_STEP
            return _error("slow_down", f"poll at most every {device.interval} s")
        return _error("authorization_pending", "waiting for the user")


def create_app(config: IdPConfig) -> FastAPI:
    provider = _Provider(config)
    app = FastAPI(title="guard dev IdP", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/.well-known/openid-configuration")
    async def discovery() -> dict[str, Any]:
        return provider.discovery()

    @app.get("/jwks")
    async def jwks() -> dict[str, Any]:
        return {"keys": [provider.public_jwk]}

    @app.post("/device_authorization")
    async def device_authorization(request: Request) -> JSONResponse:
        return provider.device_authorization(await _form(request))

    @app.get("/device", response_class=HTMLResponse)
    async def device_page(user_code: str = "") -> str:
        return provider.device_page(user_code)

    @app.post("/device", response_class=HTMLResponse)
    async def device_decide(request: Request) -> HTMLResponse:
        return provider.device_decide(await _form(request))

    @app.post("/token")
    async def token(request: Request) -> JSONResponse:
        return provider.token(await _form(request))

    @app.post("/revoke")
    async def revoke(request: Request) -> Response:
        return provider.revoke(await _form(request))

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m guard.devstack.idp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--client-id", default="guard-cli")
    parser.add_argument("--users", type=Path, help="users YAML (default: the packaged one)")
    parser.add_argument("--interval", type=int, default=5, help="device-flow poll interval (s)")
    parser.add_argument(
        "--id-token-lifetime", type=int, default=ID_TOKEN_LIFETIME, help="seconds (default 900)"
    )
    args = parser.parse_args(argv)
    config = IdPConfig(
        issuer=f"http://{args.host}:{args.port}",
        client_id=args.client_id,
        state_dir=args.state_dir,
        users=load_users(args.users),
        users_file=args.users,
        interval=max(args.interval, 1),
        id_token_lifetime=max(args.id_token_lifetime, 60),
    )
    uvicorn.run(
        create_app(config), host=args.host, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
