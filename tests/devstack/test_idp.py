"""The dev OIDC provider: discovery, JWKS, RFC 8628 device flow, refresh rotation.

End-to-end tests talk HTTP to the real process (`dev_idp`); timing cases (expiry) run the
same app in process with a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import stat
import time

import httpx
import jwt
import pytest

from guard.devstack.idp import (
    DEVICE_GRANT,
    USER_CODE_ALPHABET,
    IdPConfig,
    create_app,
    jwk_thumbprint,
    load_users,
    normalize_user_code,
)
from tests.fix_oidc import dev_idp  # noqa: F401


def test_discovery_document(dev_idp):  # noqa: F811
    doc = httpx_get(f"{dev_idp.issuer}/.well-known/openid-configuration")
    assert doc["issuer"] == dev_idp.issuer
    assert doc["jwks_uri"] == f"{dev_idp.issuer}/jwks"
    assert doc["token_endpoint"] == f"{dev_idp.issuer}/token"
    assert doc["device_authorization_endpoint"] == f"{dev_idp.issuer}/device_authorization"
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert {DEVICE_GRANT, "refresh_token"} <= set(doc["grant_types_supported"])
    for key in ("response_types_supported", "subject_types_supported", "scopes_supported"):
        assert doc[key]
    assert "groups" in doc["claims_supported"]


def test_jwks_is_public_with_rfc7638_kid(dev_idp):  # noqa: F811
    (key,) = httpx_get(f"{dev_idp.issuer}/jwks")["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)  # no private members
    canonical = json.dumps({"e": key["e"], "kty": "RSA", "n": key["n"]}, separators=(",", ":"))
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())
    assert key["kid"] == expected.rstrip(b"=").decode() == jwk_thumbprint(key)
    key_file = dev_idp.state_dir / "idp-signing-key.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_device_authorization_response(dev_idp):  # noqa: F811
    start = dev_idp.start_device()
    assert re.fullmatch(
        rf"[{USER_CODE_ALPHABET}]{{4}}-[{USER_CODE_ALPHABET}]{{4}}", start["user_code"]
    )
    assert len(start["device_code"]) >= 43  # 256 random bits, base64url
    assert start["verification_uri"] == f"{dev_idp.issuer}/device"
    assert start["verification_uri_complete"].endswith(f"user_code={start['user_code']}")
    assert start["expires_in"] == 600 and start["interval"] == 1
    assert dev_idp.start_device()["device_code"] != start["device_code"]


def test_unknown_client_is_invalid_client(dev_idp):  # noqa: F811
    response = httpx.post(f"{dev_idp.issuer}/device_authorization", data={"client_id": "evil"})
    assert response.status_code == 400 and response.json()["error"] == "invalid_client"
    start = dev_idp.start_device()
    response = httpx.post(
        f"{dev_idp.issuer}/token",
        data={"grant_type": DEVICE_GRANT, "device_code": start["device_code"], "client_id": "x"},
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_client"


def test_device_flow_pending_slow_down_approve_tokens(dev_idp):  # noqa: F811
    start = dev_idp.start_device()
    first = dev_idp.poll(start["device_code"])
    assert first.status_code == 400 and first.json()["error"] == "authorization_pending"
    assert first.headers["cache-control"] == "no-store"
    assert dev_idp.poll(start["device_code"]).json()["error"] == "slow_down"  # < 1 s later
    time.sleep(1.1)  # the interval is now 1 + 5 s: still too fast
    assert dev_idp.poll(start["device_code"]).json()["error"] == "slow_down"
    # The user enters the code in another format; it still matches.
    approve = dev_idp.decide(start["user_code"].replace("-", "").lower(), "alice")
    assert approve.status_code == 200 and "alice" in approve.text
    before = int(time.time())
    response = dev_idp.poll(start["device_code"])
    assert response.status_code == 200, response.json()
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert body["access_token"].count(".") == 0  # opaque: cannot pass for an ID token
    assert body["refresh_token"]
    header = jwt.get_unverified_header(body["id_token"])
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert header["alg"] == "RS256" and header["kid"]
    assert claims["iss"] == dev_idp.issuer and claims["aud"] == "guard-cli"
    assert claims["exp"] - claims["iat"] == 900 and claims["nbf"] == claims["iat"]
    assert before - 2 <= claims["iat"] <= before + 2 and claims["auth_time"] <= claims["iat"]
    assert claims["preferred_username"] == "alice" and claims["name"] == "Alice Anderson"
    assert claims["email"] == "alice@example.com" and claims["groups"] == ["engineers"]
    assert claims["jti"] and claims["sub"]
    # The device code is single-use.
    assert dev_idp.poll(start["device_code"]).json()["error"] == "invalid_grant"


def test_subject_is_stable_and_jti_unique(dev_idp):  # noqa: F811
    a = jwt.decode(dev_idp.token_for("bob"), options={"verify_signature": False})
    b = jwt.decode(dev_idp.token_for("bob"), options={"verify_signature": False})
    c = jwt.decode(dev_idp.token_for("carol"), options={"verify_signature": False})
    assert a["sub"] == b["sub"] != c["sub"]
    assert a["jti"] != b["jti"]
    assert a["groups"] == c["groups"] == ["security-leads"]


def test_deny_then_access_denied(dev_idp):  # noqa: F811
    start = dev_idp.start_device()
    assert dev_idp.decide(start["user_code"], action="deny").status_code == 200
    # A decided code cannot be approved afterwards.
    assert dev_idp.decide(start["user_code"], "alice").status_code == 400
    assert dev_idp.poll(start["device_code"]).json()["error"] == "access_denied"
    assert dev_idp.poll(start["device_code"]).json()["error"] == "invalid_grant"


def test_unknown_user_and_unknown_code(dev_idp):  # noqa: F811
    start = dev_idp.start_device()
    response = dev_idp.decide(start["user_code"], "eve")
    assert response.status_code == 400 and "unknown user" in response.text
    assert dev_idp.decide("BBBB-BBBB", "alice").status_code == 400
    assert dev_idp.poll("not-a-device-code").json()["error"] == "invalid_grant"


def test_refresh_rotates_and_reuse_revokes_the_login(dev_idp):  # noqa: F811
    tokens = dev_idp.tokens_for("bob")
    fresh = dev_idp.refresh(tokens["refresh_token"])
    assert fresh.status_code == 200
    body = fresh.json()
    assert body["refresh_token"] != tokens["refresh_token"]
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert claims["preferred_username"] == "bob" and claims["groups"] == ["security-leads"]
    old = dev_idp.refresh(tokens["refresh_token"])  # the rotated-out token
    assert old.status_code == 400 and old.json()["error"] == "invalid_grant"
    # Its reuse means it leaked: the newer token of the same login is revoked as well.
    assert dev_idp.refresh(body["refresh_token"]).json()["error"] == "invalid_grant"


def test_unsupported_grant_type(dev_idp):  # noqa: F811
    response = httpx.post(
        f"{dev_idp.issuer}/token", data={"grant_type": "password", "client_id": "guard-cli"}
    )
    assert response.json()["error"] == "unsupported_grant_type"


def test_device_page_lists_users_and_escapes_input(dev_idp):  # noqa: F811
    page = httpx.get(f"{dev_idp.issuer}/device", params={"user_code": '"><script>'})
    assert page.status_code == 200
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
    for user in ("alice", "bob", "carol", "ci", "mallory"):
        assert f'value="{user}"' in page.text


# In-process, with a fake clock -------------------------------------------------------


class Local:
    """The IdP app in process, called through httpx's ASGI transport (no sockets)."""

    def __init__(self, app) -> None:
        self.app = app

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://idp.test") as c:
                return await c.request(method, path, **kw)

        return asyncio.run(go())

    def get(self, path: str, **kw) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.request("POST", path, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def local(tmp_path):
    clock = Clock()
    config = IdPConfig(
        issuer="http://idp.test",
        client_id="guard-cli",
        state_dir=tmp_path,
        users=load_users(),
        interval=5,
        clock=clock,
    )
    return Local(create_app(config)), clock, config


def _poll(client, device_code):
    form = {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": "guard-cli"}
    return client.post("/token", data=form).json()


def test_device_code_expires(local):
    client, clock, _ = local
    start = client.post("/device_authorization", data={"client_id": "guard-cli"}).json()
    clock.now += 601
    assert (
        client.post(
            "/device",
            data={"user_code": start["user_code"], "username": "alice", "action": "approve"},
        ).status_code
        == 400
    )
    assert _poll(client, start["device_code"])["error"] == "expired_token"


def test_slow_down_adds_five_seconds_each_time(local):
    client, clock, _ = local
    code = client.post("/device_authorization", data={"client_id": "guard-cli"}).json()
    code = code["device_code"]
    assert _poll(client, code)["error"] == "authorization_pending"
    clock.now += 4.9
    assert _poll(client, code)["error"] == "slow_down"  # interval 5 → 10
    clock.now += 9.9
    assert _poll(client, code)["error"] == "slow_down"  # 10 → 15
    clock.now += 15
    assert _poll(client, code)["error"] == "authorization_pending"


def test_signing_key_is_generated_once(local):
    client, _, config = local
    kid = client.get("/jwks").json()["keys"][0]["kid"]
    second = Local(create_app(config))  # a restart with the same state dir
    assert second.get("/jwks").json()["keys"][0]["kid"] == kid


def test_user_code_normalisation():
    assert normalize_user_code("bcdf ghjk") == "BCDF-GHJK"
    assert normalize_user_code("BCDF-GHJK") == "BCDF-GHJK"
    assert normalize_user_code("bcd") == "BCD"


def test_users_yaml_validation(tmp_path):
    bad = tmp_path / "users.yaml"
    bad.write_text("users: {eve: {groups: admins}}\n")
    with pytest.raises(ValueError, match="groups"):
        load_users(bad)
    users = load_users()
    assert users["mallory"]["groups"] == [] and users["ci"]["groups"] == ["service"]


def httpx_get(url: str) -> dict:
    response = httpx.get(url)
    response.raise_for_status()
    return response.json()


def test_a_user_removed_or_regrouped_in_the_users_file_is_so_at_the_next_refresh(tmp_path):
    """Offboarding at the dev IdP: the users file is read again when it changes."""
    users_file = tmp_path / "users.yaml"
    users_file.write_text(
        "users:\n  alice: {groups: [engineers]}\n  bob: {groups: [security-leads]}\n"
    )
    config = IdPConfig(
        issuer="http://idp.test",
        client_id="guard-cli",
        state_dir=tmp_path,
        users=load_users(users_file),
        users_file=users_file,
        interval=1,
    )
    client = Local(create_app(config))

    def login(user: str) -> dict:
        start = client.post("/device_authorization", data={"client_id": "guard-cli"}).json()
        decided = client.post(
            "/device", data={"user_code": start["user_code"], "username": user, "action": "approve"}
        )
        assert decided.status_code == 200
        return _poll(client, start["device_code"])

    def refresh(token: str):
        form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": "guard-cli"}
        return client.post("/token", data=form)

    alice, bob = login("alice"), login("bob")
    users_file.write_text("users:\n  alice: {groups: [contractors]}\n")
    os.utime(users_file, ns=(1, 2))  # a new mtime, whatever the clock's resolution
    fresh = refresh(alice["refresh_token"]).json()
    claims = jwt.decode(fresh["id_token"], options={"verify_signature": False})
    assert claims["groups"] == ["contractors"]
    gone = refresh(bob["refresh_token"])
    assert gone.status_code == 400
    assert gone.json() == {
        "error": "invalid_grant",
        "error_description": "the user no longer exists (offboarded)",
    }
