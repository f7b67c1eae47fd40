"""Verifying OIDC ID tokens from any issuer with discovery (PyJWT + JWKS).

Imports PyJWT, httpx and the broker's error types. Checks, in one place: signature with a
key from the issuer's JWKS (found by `kid`; an unknown `kid` refetches the JWKS at most once
per cooldown, so a flood of bogus kids cannot hammer the IdP), an explicit algorithm list
(never taken from the token: that is what stops `alg=none` and the HS256-with-public-key
confusion attack), `iss`, `aud`, `exp`, `nbf`, `iat` with a small leeway. Only then does a
token become `VerifiedClaims`, the one way to a `Principal`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import httpx
import jwt

from guard.broker.errors import DependencyUnavailable, Unauthenticated
from guard.broker.fakes import FakeComponentWarning
from guard.broker.identity.principal import Principal, VerifiedClaims

JWKS_REFRESH_COOLDOWN = 30.0
_SYMMETRIC = frozenset({"HS256", "HS384", "HS512", "none"})


class AuthenticationError(Unauthenticated):
    def __init__(self, message: str, *, reason: str = "invalid_token", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.reason = reason


class IdentityProviderUnavailable(DependencyUnavailable):
    pass


class KeySource(Protocol):
    def get_signing_key(self, kid: str | None) -> jwt.PyJWK: ...


def _pick(keys: dict[str, jwt.PyJWK], kid: str | None) -> jwt.PyJWK | None:
    if kid is None:
        # Without a kid only an unambiguous key set is acceptable.
        return next(iter(keys.values())) if len(keys) == 1 else None
    return keys.get(kid)


class DiscoveryKeySource:
    """JWKS of an issuer found through OIDC discovery, cached, refetched on unknown kid."""

    def __init__(self, issuer: str, http: httpx.Client) -> None:
        self.issuer = issuer.rstrip("/")
        self._http = http
        self._keys: dict[str, jwt.PyJWK] = {}
        self._jwks_uri: str | None = None
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def _get_json(self, url: str) -> Any:
        try:
            response = self._http.get(url)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise IdentityProviderUnavailable(
                f"cannot reach the identity provider at {self.issuer}: {type(exc).__name__}",
                hint="check that the IdP is up and reachable from the broker",
            ) from exc

    def _refresh(self) -> None:
        if self._jwks_uri is None:
            config = self._get_json(f"{self.issuer}/.well-known/openid-configuration")
            if config.get("issuer", "").rstrip("/") != self.issuer:
                # A discovery document for another issuer would let that issuer's keys in.
                raise IdentityProviderUnavailable(
                    f"discovery at {self.issuer} names issuer {config.get('issuer')!r}"
                )
            self._jwks_uri = config["jwks_uri"]
        jwks = self._get_json(self._jwks_uri)
        keys: dict[str, jwt.PyJWK] = {}
        for index, data in enumerate(jwks.get("keys", [])):
            if data.get("use", "sig") != "sig":
                continue
            try:
                keys[data.get("kid") or f"#{index}"] = jwt.PyJWK(data)
            except jwt.PyJWTError:
                continue  # an unsupported key type must not break the others
        self._keys = keys
        self._fetched_at = time.monotonic()

    def get_signing_key(self, kid: str | None) -> jwt.PyJWK:
        with self._lock:
            key = _pick(self._keys, kid)
            if key is None and time.monotonic() - self._fetched_at >= JWKS_REFRESH_COOLDOWN:
                self._refresh()
                key = _pick(self._keys, kid)
        if key is None:
            raise AuthenticationError(
                f"token signed with an unknown key (kid {kid!r})", reason="unknown_key"
            )
        return key


class StaticKeySource:
    """A fixed key set, for unit tests only."""

    def __init__(self, keys: dict[str, jwt.PyJWK]) -> None:
        warnings.warn("StaticKeySource is for unit tests only", FakeComponentWarning, stacklevel=2)
        self._keys = keys

    def get_signing_key(self, kid: str | None) -> jwt.PyJWK:
        key = _pick(self._keys, kid)
        if key is None:
            raise AuthenticationError(f"token signed with an unknown key (kid {kid!r})")
        return key


class OIDCVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str],
        groups_claim: str = "groups",
        leeway: int = 30,
        key_source: KeySource,
    ) -> None:
        bad = set(algorithms) & _SYMMETRIC
        if bad or not algorithms:
            raise ValueError(f"refusing symmetric or empty algorithm list: {sorted(bad)}")
        self.issuer = issuer
        self.audience = audience
        self.algorithms = list(algorithms)
        self.groups_claim = groups_claim
        self.leeway = leeway
        self.key_source = key_source

    @contextlib.contextmanager
    def _map_exceptions(self) -> Iterator[None]:
        try:
            yield
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError(
                "token expired", reason="expired", hint="run `guard login` again"
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError(
                f"token is not for this broker (expected audience {self.audience!r})",
                reason="audience",
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthenticationError(
                f"token was not issued by {self.issuer}", reason="issuer"
            ) from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthenticationError("token is not valid yet", reason="nbf") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(
                f"token lacks the {exc.claim!r} claim", reason="claims"
            ) from exc
        except jwt.InvalidAlgorithmError as exc:
            raise AuthenticationError(
                "token uses a signing algorithm that is not allowed", reason="algorithm"
            ) from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {type(exc).__name__}") from exc

    def verify(self, token: str) -> VerifiedClaims:
        with self._map_exceptions():
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self.algorithms:
                raise jwt.InvalidAlgorithmError(str(header.get("alg")))
            key = self.key_source.get_signing_key(header.get("kid"))
            claims = jwt.decode(
                token,
                key=key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={
                    "require": ["exp", "iat", "iss", "sub", "aud"],
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_aud": True,
                    "verify_iss": True,
                },
            )
        return VerifiedClaims(claims)


def principal_from_token(verifier: OIDCVerifier, token: str) -> Principal:
    return Principal.from_claims(verifier.verify(token), groups_claim=verifier.groups_claim)
