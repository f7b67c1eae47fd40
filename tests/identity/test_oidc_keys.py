"""`DiscoveryKeySource`: discovery checks, JWKS caching, refetch cooldown, outage backoff.

The IdP is an `httpx.MockTransport` that counts requests; time is a fake clock.
"""

from __future__ import annotations

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from guard.broker.identity.oidc import (
    AuthenticationError,
    DiscoveryKeySource,
    IdentityProviderUnavailable,
)

ISSUER = "https://idp.example"


def public_jwk(kid: str, **extra) -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid, "alg": "RS256", **extra}


class FakeIdP:
    def __init__(self, keys: list[dict], issuer: str = ISSUER) -> None:
        self.keys = keys
        self.issuer = issuer
        self.requests: list[str] = []
        self.fail: Exception | int | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if isinstance(self.fail, Exception):
            raise self.fail
        if isinstance(self.fail, int):
            return httpx.Response(self.fail, text="oops")
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": self.issuer, "jwks_uri": f"{ISSUER}/keys"})
        if request.url.path == "/keys":
            return httpx.Response(200, json={"keys": self.keys})
        return httpx.Response(404)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    idp, clock = FakeIdP([public_jwk("k1")]), Clock()
    http = httpx.Client(transport=httpx.MockTransport(idp.handler))
    yield DiscoveryKeySource(ISSUER, http, clock=clock), idp, clock
    http.close()


def test_discovery_then_jwks_then_cache(setup):
    keys, idp, _ = setup
    assert keys.get_signing_key("k1").key_id == "k1"
    assert idp.requests == ["/.well-known/openid-configuration", "/keys"]
    for _ in range(10):
        keys.get_signing_key("k1")
    assert len(idp.requests) == 2


def test_unknown_kid_refetches_at_most_once_per_cooldown(setup):
    keys, idp, clock = setup
    keys.get_signing_key("k1")
    for _ in range(50):
        with pytest.raises(AuthenticationError, match="unknown key"):
            keys.get_signing_key("bogus")
    assert keys.fetch_count == 1  # first fetch was < 30 s ago
    clock.now += 31
    for _ in range(50):
        with pytest.raises(AuthenticationError):
            keys.get_signing_key("bogus")
    assert keys.fetch_count == 2  # one refetch, then the cooldown again
    assert idp.requests.count("/.well-known/openid-configuration") == 1


def test_key_rotation_is_picked_up_after_the_cooldown(setup):
    keys, idp, clock = setup
    keys.get_signing_key("k1")
    idp.keys = [public_jwk("k2")]
    clock.now += 30
    assert keys.get_signing_key("k2").key_id == "k2"
    with pytest.raises(AuthenticationError):
        keys.get_signing_key("k1")  # rotated out


def test_discovery_issuer_must_match_exactly():
    for claimed in ("https://evil.example", ISSUER + "/"):
        idp = FakeIdP([public_jwk("k1")], issuer=claimed)
        with httpx.Client(transport=httpx.MockTransport(idp.handler)) as http:
            with pytest.raises(IdentityProviderUnavailable, match="expected exactly"):
                DiscoveryKeySource(ISSUER, http).get_signing_key("k1")


def test_insecure_jwks_uri_is_refused_for_an_https_issuer():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": "http://idp.example/k"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(IdentityProviderUnavailable, match="jwks_uri"):
            DiscoveryKeySource(ISSUER, http).get_signing_key("k1")


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        (httpx.ConnectError("refused"), "cannot reach the identity provider at " + ISSUER),
        (httpx.ReadTimeout("slow"), "ReadTimeout"),
        (500, "HTTP 500"),
    ],
)
def test_outage_is_unavailable_with_backoff(setup, failure, text):
    keys, idp, clock = setup
    idp.fail = failure
    with pytest.raises(IdentityProviderUnavailable, match=text) as info:
        keys.get_signing_key("k1")
    assert info.value.http_status == 503
    attempts = len(idp.requests)
    with pytest.raises(IdentityProviderUnavailable):
        keys.get_signing_key("k1")  # within the backoff: answered without the network
    assert len(idp.requests) == attempts
    idp.fail = None
    clock.now += 5
    assert keys.get_signing_key("k1").key_id == "k1"  # recovered


def test_cached_keys_survive_an_outage(setup):
    keys, idp, clock = setup
    keys.get_signing_key("k1")
    idp.fail = httpx.ConnectError("down")
    clock.now += 60
    assert keys.get_signing_key("k1").key_id == "k1"
    with pytest.raises(IdentityProviderUnavailable):
        keys.get_signing_key("k-new")  # might be a rotated key: 503, not 401


def test_not_json_and_not_a_jwks_are_unavailable():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(200, text="<html>login</html>")
        return httpx.Response(404)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(IdentityProviderUnavailable, match="not JSON"):
            DiscoveryKeySource(ISSUER, http).get_signing_key("k1")

    def handler2(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/keys"})
        return httpx.Response(200, json={"keys": "nope"})

    with httpx.Client(transport=httpx.MockTransport(handler2)) as http:
        with pytest.raises(IdentityProviderUnavailable, match="JWK set"):
            DiscoveryKeySource(ISSUER, http).get_signing_key("k1")


def test_encryption_and_unsupported_keys_are_skipped():
    idp = FakeIdP(
        [
            public_jwk("enc", use="enc"),
            {"kty": "weird", "kid": "w"},
            public_jwk("sig"),
        ]
    )
    with httpx.Client(transport=httpx.MockTransport(idp.handler)) as http:
        keys = DiscoveryKeySource(ISSUER, http)
        assert keys.get_signing_key(None).key_id == "sig"  # the only usable key
        with pytest.raises(AuthenticationError):
            keys.get_signing_key("enc")
