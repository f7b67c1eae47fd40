"""The broker's token verification against a real dev IdP process, and the classic attacks."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from guard.broker.fakes import FakeComponentWarning
from guard.broker.identity.oidc import (
    AuthenticationError,
    DiscoveryKeySource,
    IdentityProviderUnavailable,
    OIDCVerifier,
    StaticKeySource,
    principal_from_token,
)
from guard.devstack.postgres import free_port


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guard.devstack.idp",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path_factory.mktemp("idp")),
            "--interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    issuer = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield issuer
    proc.terminate()
    proc.wait(5)


def device_tokens(issuer: str, user: str) -> dict:
    start = httpx.post(f"{issuer}/device_authorization", data={"client_id": "guard-cli"}).json()
    assert (
        httpx.post(
            f"{issuer}/token",
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                "device_code": start["device_code"],
                "client_id": "guard-cli",
            },
        ).json()["error"]
        == "authorization_pending"
    )
    httpx.post(
        f"{issuer}/device",
        data={"user_code": start["user_code"], "username": user, "action": "approve"},
    ).raise_for_status()
    time.sleep(1.05)
    return httpx.post(
        f"{issuer}/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": start["device_code"],
            "client_id": "guard-cli",
        },
    ).json()


def verifier_for(issuer: str, **kw) -> OIDCVerifier:
    keys = DiscoveryKeySource(issuer, httpx.Client(timeout=2))
    return OIDCVerifier(
        issuer=issuer,
        audience=kw.pop("audience", "guard-cli"),
        algorithms=["RS256", "ES256"],
        key_source=keys,
        **kw,
    )


def test_real_device_flow_token_verifies_to_principal(idp):
    tokens = device_tokens(idp, "alice")
    principal = principal_from_token(verifier_for(idp), tokens["id_token"])
    assert principal.groups == frozenset({"engineers"})
    assert principal.issuer == idp and principal.display_name == "alice"


def test_slow_down_and_deny(idp):
    start = httpx.post(f"{idp}/device_authorization", data={"client_id": "guard-cli"}).json()
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": start["device_code"],
        "client_id": "guard-cli",
    }
    httpx.post(f"{idp}/token", data=form)
    assert httpx.post(f"{idp}/token", data=form).json()["error"] == "slow_down"
    httpx.post(f"{idp}/device", data={"user_code": start["user_code"], "action": "deny"})
    assert httpx.post(f"{idp}/token", data=form).json()["error"] == "access_denied"


def test_refresh_rotates(idp):
    tokens = device_tokens(idp, "bob")
    form = {
        "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"],
        "client_id": "guard-cli",
    }
    fresh = httpx.post(f"{idp}/token", data=form)
    assert fresh.status_code == 200 and fresh.json()["refresh_token"] != tokens["refresh_token"]
    assert httpx.post(f"{idp}/token", data=form).json()["error"] == "invalid_grant"


def _forge(claims: dict, header: dict, signature: bytes = b"") -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature))
    )


def test_attacks_are_rejected(idp):
    verifier = verifier_for(idp)
    good = device_tokens(idp, "alice")["id_token"]
    header = jwt.get_unverified_header(good)
    claims = jwt.decode(good, options={"verify_signature": False})
    # alg=none
    with pytest.raises(AuthenticationError):
        verifier.verify(_forge({**claims, "groups": ["security-leads"]}, {"alg": "none"}))
    # HS256 keyed with the IdP's public key (algorithm confusion)
    jwk = httpx.get(f"{idp}/jwks").json()["keys"][0]
    public_pem = jwt.PyJWK(jwk).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hashlib
    import hmac

    signing_input = ".".join(_forge(claims, {"alg": "HS256", "kid": header["kid"]}).split(".")[:2])
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(AuthenticationError):
        verifier.verify(signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
    # tampered payload with the original signature
    parts = good.split(".")
    tampered = _forge({**claims, "groups": ["security-leads"]}, header).split(".")[:2]
    with pytest.raises(AuthenticationError):
        verifier.verify(".".join([*tampered, parts[2]]))
    # signed by another key
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthenticationError):
        verifier.verify(jwt.encode(claims, other, algorithm="RS256", headers={"kid": "evil"}))
    # expired, wrong audience, wrong issuer (validly signed by the IdP is impossible to
    # forge here, so use a verifier configured differently)
    with pytest.raises(AuthenticationError, match="audience"):
        verifier_for(idp, audience="another-app").verify(good)
    expired_claims = {**claims, "exp": int(time.time()) - 3600}
    with pytest.raises(AuthenticationError):
        verifier.verify(
            jwt.encode(expired_claims, other, algorithm="RS256", headers={"kid": header["kid"]})
        )


def test_unknown_kid_refetch_is_rate_limited(idp):
    keys = DiscoveryKeySource(idp, httpx.Client(timeout=2))
    verifier = OIDCVerifier(issuer=idp, audience="guard-cli", algorithms=["RS256"], key_source=keys)
    verifier.verify(device_tokens(idp, "alice")["id_token"])
    fetched = keys._fetched_at
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bogus = jwt.encode({"sub": "x"}, other, algorithm="RS256", headers={"kid": "nope"})
    for _ in range(5):
        with pytest.raises(AuthenticationError, match="unknown key"):
            verifier.verify(bogus)
    assert keys._fetched_at == fetched  # within the cooldown: no refetch storm


def test_idp_down_is_unavailable_not_unauthenticated():
    keys = DiscoveryKeySource("http://127.0.0.1:9", httpx.Client(timeout=1))
    verifier = OIDCVerifier(
        issuer="http://127.0.0.1:9", audience="guard-cli", algorithms=["RS256"], key_source=keys
    )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"sub": "x"}, other, algorithm="RS256", headers={"kid": "k"})
    with pytest.raises(IdentityProviderUnavailable, match="127.0.0.1:9"):
        verifier.verify(token)


def test_symmetric_algorithms_cannot_be_configured():
    with pytest.warns(FakeComponentWarning):
        keys = StaticKeySource({})
    with pytest.raises(ValueError):
        OIDCVerifier(issuer="x", audience="a", algorithms=["HS256"], key_source=keys)
