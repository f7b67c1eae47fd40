"""The broker's ID-token verification: real tokens from the dev IdP, and the classic attacks.

Tokens from the real IdP (`dev_idp`) check the happy path and attacks on genuine tokens;
claim-level cases (expiry, nbf, audiences, replay) use tokens minted with a local key and a
`StaticKeySource`, so each case fails for exactly the reason under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from guard.broker.fakes import FakeComponentWarning
from guard.broker.identity.oidc import (
    AuthenticationError,
    DiscoveryKeySource,
    IdentityProviderUnavailable,
    OIDCVerifier,
    StaticKeySource,
    principal_from_token,
)
from guard.broker.settings import OIDCSettings
from tests.fix_oidc import dev_idp  # noqa: F401

ISSUER = "https://idp.example"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature))
    )


def jwk_of(private_key, kid: str) -> jwt.PyJWK:
    data = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return jwt.PyJWK({**data, "kid": kid, "alg": "RS256", "use": "sig"})


def claims(**over) -> dict:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": "guard-cli",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": f"jti-{time.monotonic_ns()}",
        "preferred_username": "alice",
        "groups": ["engineers"],
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def mint(key=KEY, kid: str | None = "k1", alg: str = "RS256", **over) -> str:
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims(**over), key, algorithm=alg, headers=headers)


def static(*pairs) -> StaticKeySource:
    with pytest.warns(FakeComponentWarning, match="unit tests only"):
        return StaticKeySource({kid: jwk_of(key, kid) for key, kid in pairs})


def local_verifier(keys=None, **kw) -> OIDCVerifier:
    return OIDCVerifier(
        issuer=ISSUER,
        audience="guard-cli",
        algorithms=["RS256", "ES256"],
        key_source=keys or static((KEY, "k1")),
        **kw,
    )


def reason_of(verifier: OIDCVerifier, token: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    if len(token) > 10:
        assert token not in str(info.value)  # messages never carry the token
    return info.value


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def idp_verifier(dev_idp, http):  # noqa: F811
    return OIDCVerifier(
        issuer=dev_idp.issuer,
        audience="guard-cli",
        algorithms=["RS256", "ES256"],
        key_source=DiscoveryKeySource(dev_idp.issuer, http),
    )


# Real tokens from the dev IdP ----------------------------------------------------------


def test_real_token_verifies_to_a_principal(dev_idp, idp_verifier):  # noqa: F811
    principal = principal_from_token(idp_verifier, dev_idp.token_for("alice"))
    assert principal.issuer == dev_idp.issuer
    assert principal.groups == frozenset({"engineers"})
    assert principal.display_name == "alice" and principal.subject


@pytest.mark.parametrize(
    ("user", "groups"),
    [("bob", {"security-leads"}), ("ci", {"service"}), ("mallory", set())],
)
def test_groups_come_from_the_idp(dev_idp, idp_verifier, user, groups):  # noqa: F811
    assert principal_from_token(idp_verifier, dev_idp.token_for(user)).groups == groups


def test_alg_none_is_rejected(dev_idp, idp_verifier):  # noqa: F811
    good = dev_idp.token_for("mallory")
    body = jwt.decode(good, options={"verify_signature": False})
    forged = forge({"alg": "none", "typ": "JWT"}, {**body, "groups": ["security-leads"]})
    assert reason_of(idp_verifier, forged).reason == "algorithm"
    forged = forge({"alg": "None"}, body)
    assert reason_of(idp_verifier, forged).reason == "algorithm"


def test_hs256_signed_with_the_public_key_is_rejected(dev_idp, idp_verifier):  # noqa: F811
    """The algorithm-confusion attack: HMAC keyed with the IdP's public RSA key."""
    good = dev_idp.token_for("mallory")
    kid = jwt.get_unverified_header(good)["kid"]
    body = {**jwt.decode(good, options={"verify_signature": False}), "groups": ["security-leads"]}
    jwk = httpx.get(f"{dev_idp.issuer}/jwks").json()["keys"][0]
    public = jwt.PyJWK(jwk).key
    for pem in (
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        json.dumps(jwk).encode(),
    ):
        signing_input = ".".join(forge({"alg": "HS256", "kid": kid}, body).split(".")[:2])
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        assert reason_of(idp_verifier, f"{signing_input}.{b64(mac)}").reason == "algorithm"


def test_tampered_payload_is_rejected(dev_idp, idp_verifier):  # noqa: F811
    header, payload, signature = dev_idp.token_for("mallory").split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["groups"] = ["security-leads"]
    tampered = f"{header}.{b64(json.dumps(body).encode())}.{signature}"
    assert reason_of(idp_verifier, tampered).reason == "signature"


def test_token_signed_by_another_key_is_rejected(dev_idp, idp_verifier):  # noqa: F811
    good = dev_idp.token_for("mallory")
    kid = jwt.get_unverified_header(good)["kid"]
    body = {**jwt.decode(good, options={"verify_signature": False}), "groups": ["x"]}
    same_kid = jwt.encode(body, OTHER_KEY, algorithm="RS256", headers={"kid": kid})
    assert reason_of(idp_verifier, same_kid).reason == "signature"
    new_kid = jwt.encode(body, OTHER_KEY, algorithm="RS256", headers={"kid": "attacker"})
    err = reason_of(idp_verifier, new_kid)
    assert err.reason == "unknown_key" and "attacker" in err.message


def test_wrong_audience_says_expected_and_got(dev_idp, http):  # noqa: F811
    verifier = OIDCVerifier(
        issuer=dev_idp.issuer,
        audience="payments-app",
        algorithms=["RS256"],
        key_source=DiscoveryKeySource(dev_idp.issuer, http),
    )
    err = reason_of(verifier, dev_idp.token_for("alice"))
    assert err.reason == "audience" and err.http_status == 401
    assert "expected 'payments-app'" in err.message and "'guard-cli'" in err.message


def test_wrong_issuer_is_rejected_before_any_key_lookup(dev_idp, http):  # noqa: F811
    keys = DiscoveryKeySource(dev_idp.issuer, http)
    verifier = OIDCVerifier(
        issuer="https://login.example.com",
        audience="guard-cli",
        algorithms=["RS256"],
        key_source=keys,
    )
    err = reason_of(verifier, dev_idp.token_for("alice"))
    assert err.reason == "issuer"
    assert dev_idp.issuer in err.message and "https://login.example.com" in err.message
    assert keys.fetch_count == 0


def test_unknown_kid_refetches_once_then_cools_down(dev_idp, http):  # noqa: F811
    keys = DiscoveryKeySource(dev_idp.issuer, http)
    verifier = OIDCVerifier(
        issuer=dev_idp.issuer, audience="guard-cli", algorithms=["RS256"], key_source=keys
    )
    verifier.verify(dev_idp.token_for("alice"))
    assert keys.fetch_count == 1
    bogus = jwt.encode(
        claims(iss=dev_idp.issuer), OTHER_KEY, algorithm="RS256", headers={"kid": "nope"}
    )
    for _ in range(20):
        assert reason_of(verifier, bogus).reason == "unknown_key"
    assert keys.fetch_count == 1  # within the cooldown: no refetch storm
    verifier.verify(dev_idp.token_for("bob"))  # known kid: served from the cache
    assert keys.fetch_count == 1


def test_idp_down_is_unavailable_not_unauthenticated(http):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        issuer = f"http://127.0.0.1:{s.getsockname()[1]}"
    verifier = OIDCVerifier(
        issuer=issuer,
        audience="guard-cli",
        algorithms=["RS256"],
        key_source=DiscoveryKeySource(issuer, http),
    )
    token = jwt.encode(claims(iss=issuer), KEY, algorithm="RS256", headers={"kid": "k"})
    with pytest.raises(IdentityProviderUnavailable) as info:
        verifier.verify(token)
    assert info.value.http_status == 503
    assert f"cannot reach the identity provider at {issuer}" in info.value.message


# Claims, with a local key ------------------------------------------------------------


def test_expired_token_tells_the_user_to_log_in():
    err = reason_of(local_verifier(), mint(exp=int(time.time()) - 120, iat=int(time.time()) - 900))
    assert err.reason == "expired"
    assert err.message == "token expired: run `guard login` again"


def test_leeway_applies_to_expiry():
    token = mint(exp=int(time.time()) - 10)
    assert local_verifier(leeway=30).verify(token)["sub"] == "user-1"
    assert reason_of(local_verifier(leeway=0), token).reason == "expired"


def test_not_yet_valid_tokens_are_rejected():
    future = int(time.time()) + 600
    assert reason_of(local_verifier(), mint(nbf=future)).reason == "not_yet_valid"
    assert reason_of(local_verifier(), mint(iat=future)).reason == "not_yet_valid"


@pytest.mark.parametrize("claim", ["exp", "iat", "iss", "sub", "aud"])
def test_required_claims(claim):
    err = reason_of(local_verifier(), mint(**{claim: None}))
    assert err.reason == "missing_claim" and claim in err.message


def test_wrong_issuer_with_a_known_key():
    err = reason_of(local_verifier(), mint(iss="https://idp.example/"))
    assert err.reason == "issuer"  # exact comparison: a trailing slash is another issuer


def test_audience_string_must_match_exactly():
    for aud in ("guard-cli-evil", "guard", "GUARD-CLI", ""):
        assert reason_of(local_verifier(), mint(aud=aud)).reason in ("audience", "missing_claim")


def test_audience_lists_follow_oidc_core():
    verifier = local_verifier()
    assert verifier.verify(mint(aud=["guard-cli"]))["aud"] == ["guard-cli"]
    assert verifier.verify(mint(aud=["guard-cli", "other"], azp="guard-cli"))
    err = reason_of(verifier, mint(aud=["guard-cli", "other"]))  # no azp
    assert err.reason == "audience" and "azp" in err.message
    assert reason_of(verifier, mint(aud=["guard-cli", "other"], azp="other")).reason == "audience"
    assert reason_of(verifier, mint(aud=["other"])).reason == "audience"


def test_kid_is_required_when_the_key_set_has_several_keys():
    one = local_verifier(static((KEY, "k1")))
    assert one.verify(mint(kid=None))["sub"] == "user-1"
    two = local_verifier(static((KEY, "k1"), (OTHER_KEY, "k2")))
    err = reason_of(two, mint(kid=None))
    assert err.reason == "unknown_key" and "kid" in err.message
    assert two.verify(mint(OTHER_KEY, kid="k2"))["sub"] == "user-1"
    assert reason_of(two, mint(OTHER_KEY, kid="k1")).reason == "signature"


def test_algorithm_must_match_the_key_and_the_list():
    ec_key = ec.generate_private_key(ec.SECP256R1())
    # ES256 is allowed, but key k1 is an RS256 key: PyJWT binds the algorithm to the key.
    assert reason_of(local_verifier(), mint(ec_key, alg="ES256")).reason == "algorithm"
    rs_only = OIDCVerifier(
        issuer=ISSUER, audience="guard-cli", algorithms=["RS256"], key_source=static((KEY, "k1"))
    )
    assert reason_of(rs_only, mint(alg="RS512")).reason == "algorithm"


def test_short_rsa_keys_are_refused():
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        token = mint(weak, kid="weak")
    assert reason_of(local_verifier(static((weak, "weak"))), token).reason == "key"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "e30.e30.", "x" * 5000])
def test_garbage_is_malformed_not_a_crash(token):
    assert reason_of(local_verifier(), token).reason in ("malformed", "algorithm")


def test_jti_replay_is_off_by_default_and_on_by_flag():
    token = mint()
    default = local_verifier()
    default.verify(token)
    default.verify(token)  # the CLI reuses one ID token until it nears expiry
    strict = local_verifier(replay_check=True)
    strict.verify(token)
    assert reason_of(strict, token).reason == "replayed"
    assert reason_of(strict, mint(jti=None)).reason == "missing_claim"


def test_replay_cache_is_bounded_and_fails_closed():
    from guard.broker.identity.oidc import JtiReplayCache

    now = [1000.0]
    cache = JtiReplayCache(max_entries=2, clock=lambda: now[0])
    cache.check_and_remember("a", 1010)
    cache.check_and_remember("b", 1100)
    with pytest.raises(AuthenticationError, match="too many"):
        cache.check_and_remember("c", 1100)  # full of live entries: refuse, forget nothing
    now[0] = 1050  # "a" expired: its slot is reused
    cache.check_and_remember("c", 1100)
    with pytest.raises(AuthenticationError, match="replayed"):
        cache.check_and_remember("b", 1100)


@pytest.mark.parametrize("algorithms", [["HS256"], ["none"], [], ["RS256", "HS512"], ["XX1"]])
def test_symmetric_or_unknown_algorithms_cannot_be_configured(algorithms):
    with pytest.raises(ValueError, match="asymmetric"):
        OIDCVerifier(
            issuer=ISSUER, audience="a", algorithms=algorithms, key_source=static((KEY, "k1"))
        )


def test_from_settings_and_groups_claim():
    settings = OIDCSettings(issuer=ISSUER, audience="guard-cli", groups_claim="roles")
    verifier = OIDCVerifier.from_settings(settings, static((KEY, "k1")))
    assert verifier.algorithms == ["RS256", "ES256"] and verifier.leeway == 30
    principal = principal_from_token(verifier, mint(roles=["dba"], groups=["ignored"]))
    assert principal.groups == frozenset({"dba"})
