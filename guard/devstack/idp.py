"""A small standards-following OIDC provider for the demo stack and tests.

Discovery, JWKS, RFC 8628 device authorization (user codes, polling with `interval` and
`slow_down`, expiry, denial), refresh tokens with rotation, RS256 ID tokens carrying the
user's groups. Users come from a YAML file; approval happens on the `/device` page (a dev
tool: no passwords). The broker verifies its tokens like any other issuer's and never
special-cases it.

    python -m guard.devstack.idp --host 127.0.0.1 --port N --state-dir DIR --client-id guard-cli
"""

from __future__ import annotations

import argparse
import html
import secrets
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from guard.devstack.files import write_private

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels or look-alikes (RFC 8628 §6.1)
ID_TOKEN_LIFETIME = 15 * 60
DEVICE_CODE_LIFETIME = 600


@dataclass
class IdPConfig:
    issuer: str
    client_id: str
    state_dir: Path
    users: dict[str, dict]
    interval: int = 5


@dataclass
class _Device:
    user_code: str
    expires_at: float
    interval: int
    last_poll: float = 0.0
    user: str | None = None
    denied: bool = False


@dataclass
class _State:
    devices: dict[str, _Device] = field(default_factory=dict)  # device_code → device
    refresh: dict[str, str] = field(default_factory=dict)  # refresh token → user


def load_users(path: Path | None) -> dict[str, dict]:
    text = (
        path.read_text()
        if path
        else resources.files("guard.devstack").joinpath("users.yaml").read_text()
    )
    return dict((yaml.safe_load(text) or {}).get("users", {}))


def signing_key(state_dir: Path) -> rsa.RSAPrivateKey:
    path = state_dir / "idp-signing-key.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    write_private(path, pem)
    return key


def _error(code: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": description}, status_code=status)


async def _form(request: Request) -> dict[str, str]:
    # Parsed by hand: avoids a python-multipart dependency for urlencoded forms.
    data = parse_qs((await request.body()).decode(), keep_blank_values=True)
    return {k: v[-1] for k, v in data.items()}


def create_app(config: IdPConfig) -> FastAPI:
    key = signing_key(config.state_dir)
    public_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    kid = jwt.PyJWK(public_jwk).thumbprint() if hasattr(jwt.PyJWK, "thumbprint") else None
    if not kid:
        import base64
        import hashlib
        import json

        members = {k: public_jwk[k] for k in ("e", "kty", "n")}
        digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode())
        kid = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()  # RFC 7638
    public_jwk.update(kid=kid, alg="RS256", use="sig")
    state = _State()
    issuer = config.issuer
    app = FastAPI(title="guard dev IdP", docs_url=None, redoc_url=None)

    def subject(user: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{issuer}/users/{user}"))

    def tokens_for(user: str) -> dict:
        now = int(time.time())
        info = config.users[user]
        claims = {
            "iss": issuer,
            "sub": subject(user),
            "aud": config.client_id,
            "iat": now,
            "nbf": now,
            "exp": now + ID_TOKEN_LIFETIME,
            "auth_time": now,
            "jti": secrets.token_urlsafe(12),
            "name": info.get("name", user),
            "preferred_username": user,
            "email": info.get("email", f"{user}@example.com"),
            "groups": list(info.get("groups", [])),
        }
        id_token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
        access = jwt.encode(
            {**claims, "jti": secrets.token_urlsafe(12), "scope": "openid"},
            key,
            algorithm="RS256",
            headers={"kid": kid},
        )
        refresh = secrets.token_urlsafe(32)
        state.refresh[refresh] = user
        return {
            "access_token": access,
            "id_token": id_token,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_in": ID_TOKEN_LIFETIME,
        }

    @app.get("/.well-known/openid-configuration")
    async def discovery() -> dict:
        return {
            "issuer": issuer,
            "jwks_uri": f"{issuer}/jwks",
            "token_endpoint": f"{issuer}/token",
            "device_authorization_endpoint": f"{issuer}/device_authorization",
            "id_token_signing_alg_values_supported": ["RS256"],
            "grant_types_supported": [DEVICE_GRANT, "refresh_token"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "scopes_supported": ["openid", "profile", "email", "groups", "offline_access"],
            "claims_supported": ["sub", "name", "preferred_username", "email", "groups"],
            "token_endpoint_auth_methods_supported": ["none"],
        }

    @app.get("/jwks")
    async def jwks() -> dict:
        return {"keys": [public_jwk]}

    @app.post("/device_authorization")
    async def device_authorization(request: Request) -> JSONResponse:
        form = await _form(request)
        if form.get("client_id") != config.client_id:
            return _error("invalid_client", "unknown client_id", 401)
        device_code = secrets.token_urlsafe(32)
        raw = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
        user_code = f"{raw[:4]}-{raw[4:]}"
        state.devices[device_code] = _Device(
            user_code, time.time() + DEVICE_CODE_LIFETIME, config.interval
        )
        return JSONResponse(
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": f"{issuer}/device",
                "verification_uri_complete": f"{issuer}/device?user_code={user_code}",
                "expires_in": DEVICE_CODE_LIFETIME,
                "interval": config.interval,
            }
        )

    @app.get("/device", response_class=HTMLResponse)
    async def device_page(user_code: str = "") -> str:
        options = "".join(
            f'<option value="{html.escape(u)}">{html.escape(u)}</option>' for u in config.users
        )
        return (
            "<!doctype html><title>guard dev IdP</title><h1>guard dev sign-in</h1>"
            '<form method="post" action="/device">'
            f'<label>Code <input name="user_code" value="{html.escape(user_code)}"></label> '
            f'<label>User <select name="username">{options}</select></label> '
            '<button name="action" value="approve">Approve</button> '
            '<button name="action" value="deny">Deny</button></form>'
        )

    @app.post("/device", response_class=HTMLResponse)
    async def device_decide(request: Request) -> HTMLResponse:
        form = await _form(request)
        code = form.get("user_code", "").strip().upper()
        device = next((d for d in state.devices.values() if d.user_code == code), None)
        if device is None or device.expires_at < time.time():
            return HTMLResponse("<p>unknown or expired code</p>", status_code=400)
        if form.get("action") == "deny":
            device.denied = True
            return HTMLResponse("<p>denied</p>")
        user = form.get("username", "")
        if user not in config.users:
            return HTMLResponse("<p>unknown user</p>", status_code=400)
        device.user = user
        return HTMLResponse(f"<p>signed in as {html.escape(user)}; return to your terminal</p>")

    @app.post("/token")
    async def token(request: Request) -> JSONResponse:
        form = await _form(request)
        if form.get("client_id") != config.client_id:
            return _error("invalid_client", "unknown client_id", 401)
        grant = form.get("grant_type")
        if grant == "refresh_token":
            user = state.refresh.pop(form.get("refresh_token", ""), None)  # rotation
            if user is None:
                return _error("invalid_grant", "unknown or used refresh token")
            return JSONResponse(tokens_for(user))
        if grant != DEVICE_GRANT:
            return _error("unsupported_grant_type", str(grant))
        device = state.devices.get(form.get("device_code", ""))
        if device is None:
            return _error("invalid_grant", "unknown device code")
        now = time.time()
        if device.expires_at < now:
            state.devices.pop(form["device_code"], None)
            return _error("expired_token", "the device code expired")
        if device.denied:
            state.devices.pop(form["device_code"], None)
            return _error("access_denied", "the user denied the request")
        if device.user is None:
            too_fast = now - device.last_poll < device.interval
            device.last_poll = now
            if too_fast:
                device.interval += 5  # RFC 8628 §3.5
                return _error("slow_down", "polling too fast")
            return _error("authorization_pending", "waiting for the user")
        state.devices.pop(form["device_code"], None)
        return JSONResponse(tokens_for(device.user))

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="guard-dev-idp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--client-id", default="guard-cli")
    parser.add_argument("--users", type=Path)
    parser.add_argument("--interval", type=int, default=5)
    args = parser.parse_args(argv)
    config = IdPConfig(
        issuer=f"http://{args.host}:{args.port}",
        client_id=args.client_id,
        state_dir=args.state_dir,
        users=load_users(args.users),
        interval=args.interval,
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
