"""Verifying OIDC ID tokens from any issuer with discovery (PyJWT + JWKS).

Imports PyJWT, httpx and the broker's error types. Checks, in one place: signature with a
key from the issuer's JWKS (found by `kid`; an unknown `kid` refetches the JWKS at most once
per cooldown, so a flood of bogus kids cannot hammer the IdP), an explicit algorithm list
(never taken from the token: that is what stops `alg=none` and the HS256-with-public-key
confusion attack), `iss`, `aud`, `exp`, `nbf`, `iat` with a small leeway, and optionally
`jti` replay. Only then does a token become `VerifiedClaims`, the one way to a `Principal`.

Foreign exceptions (PyJWT, httpx) become `AuthenticationError` (401) or
`IdentityProviderUnavailable` (503) in one place, `_map_exceptions`. Messages never contain
the token.

Audience: a token whose `aud` is a string must equal ours exactly (PyJWT `strict_aud`).
OIDC Core §3.1.3.7 allows a list; PyJWT's strict mode rejects every list, so a list is
handled deliberately: it must contain our audience, and when it names more than one
audience the authorized party `azp` must be us (a token issued to another client that
merely lists us is refused).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import jwt

from guard.broker.errors import DependencyUnavailable, Unauthenticated
from guard.broker.fakes import FakeComponentWarning
from guard.broker.identity.bindings import (
    AUDIT_CLAIMS,
    ClaimBindings,
    GroupMapping,
    claim_text,
    patterns_of,
)
from guard.broker.identity.principal import Principal, VerifiedClaims

if TYPE_CHECKING:
    from guard.broker.settings import OIDCSettings, TrustedIssuerSettings

JWKS_REFETCH_COOLDOWN = 30.0  # at most one JWKS fetch per this many seconds for unknown kids
FAILED_FETCH_BACKOFF = 5.0  # after a failed fetch, answer 503 without retrying for this long
# Only asymmetric algorithms: the broker never shares a secret with an IdP, so an HS* or
# `none` entry could only ever be an attack (or a misconfiguration that enables one).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
REQUIRED_CLAIMS = ("exp", "iat", "iss", "sub", "aud")
REPLAY_CACHE_SIZE = 100_000
_SHOWN = 120  # characters of a token-supplied value quoted in an error message


class AuthenticationError(Unauthenticated):
    """The token is not acceptable (HTTP 401). `reason` is a short machine-readable tag."""

    def __init__(
        self, message: str, reason: str = "invalid_token", *, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class IdentityProviderUnavailable(DependencyUnavailable):
    """The IdP's discovery document or JWKS could not be fetched (HTTP 503): fail closed."""


class KeySource(Protocol):
    def get_signing_key(self, kid: str | None) -> jwt.PyJWK:
        """The verification key for `kid` (None: only if exactly one key exists)."""
        ...


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def _unverified_claims(token: str) -> dict[str, Any]:
    # Read WITHOUT verification, only to choose a check or to word an error message; never
    # to accept anything.
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}


@contextlib.contextmanager
def _map_exceptions(  # noqa: C901 - one flat table of exception translations (DESIGN §5.5)
    issuer: str, audience: str | None = None, token: str | None = None
) -> Iterator[None]:
    """The one translation of PyJWT / httpx exceptions into the broker's domain errors."""
    try:
        yield
    except httpx.HTTPStatusError as exc:
        raise IdentityProviderUnavailable(
            f"cannot reach the identity provider at {issuer}: HTTP "
            f"{exc.response.status_code} from {exc.request.url}",
            hint="check the broker's oidc.issuer and that the IdP is healthy",
        ) from exc
    except httpx.HTTPError as exc:
        raise IdentityProviderUnavailable(
            f"cannot reach the identity provider at {issuer}: {type(exc).__name__}",
            hint="check that the IdP is up and reachable from the broker",
        ) from exc
    except json.JSONDecodeError as exc:
        raise IdentityProviderUnavailable(
            f"the identity provider at {issuer} answered with something that is not JSON",
            hint="check the broker's oidc.issuer",
        ) from exc
    except jwt.ExpiredSignatureError as exc:
        raise AuthenticationError("token expired: run `guard login` again", "expired") from exc
    except jwt.InvalidAudienceError as exc:
        got = _unverified_claims(token).get("aud") if token else None
        raise AuthenticationError(
            f"token is for audience {_quote(got)}, expected {audience!r}", "audience"
        ) from exc
    except jwt.InvalidIssuerError as exc:
        got = _unverified_claims(token).get("iss") if token else None
        raise AuthenticationError(
            f"token was issued by {_quote(got)}, expected {issuer!r}", "issuer"
        ) from exc
    except jwt.ImmatureSignatureError as exc:
        raise AuthenticationError(
            "token is not valid yet (is this machine's clock right?)", "not_yet_valid"
        ) from exc
    except jwt.MissingRequiredClaimError as exc:
        raise AuthenticationError(f"token lacks the {exc.claim!r} claim", "missing_claim") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise AuthenticationError(
            "token is signed with an algorithm that is not allowed", "algorithm"
        ) from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthenticationError("token signature does not verify", "signature") from exc
    except jwt.InvalidKeyError as exc:
        raise AuthenticationError(f"token key is not acceptable: {exc}", "key") from exc
    except jwt.DecodeError as exc:
        raise AuthenticationError("token is malformed (not a signed JWT)", "malformed") from exc
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"invalid token: {exc}", "invalid_token") from exc


def _pick(keys: Mapping[str, jwt.PyJWK], kid: str | None) -> jwt.PyJWK | None:
    if kid is None:
        # Without a kid only an unambiguous key set is acceptable.
        return next(iter(keys.values())) if len(keys) == 1 else None
    return keys.get(kid)


def _unknown_key(kid: str | None, count: int) -> AuthenticationError:
    if kid is None and count > 1:
        return AuthenticationError(
            "token has no `kid` header but the issuer publishes several keys", "unknown_key"
        )
    return AuthenticationError(
        f"token signed with an unknown key (kid {_quote(kid)})", "unknown_key"
    )


class DiscoveryKeySource:
    """JWKS of an issuer found through OIDC discovery, cached, refetched on unknown kid.

    Thread-safe (the API verifies in worker threads). A known kid never waits for the
    network; an unknown kid refetches the JWKS at most once per `cooldown` seconds; after
    a failed fetch, requests get `IdentityProviderUnavailable` for `backoff` seconds
    without touching the IdP again.
    """

    def __init__(
        self,
        issuer: str,
        http: httpx.Client,
        *,
        cooldown: float = JWKS_REFETCH_COOLDOWN,
        backoff: float = FAILED_FETCH_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self._http = http
        self._cooldown = cooldown
        self._backoff = backoff
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._jwks_uri: str | None = None
        self._next_fetch = float("-inf")
        self._failure: IdentityProviderUnavailable | None = None
        self._lock = threading.Lock()
        self.fetch_count = 0  # JWKS fetches attempted (observable for tests and metrics)

    def _get_json(self, url: str) -> Any:
        response = self._http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        return response.json()

    def _discover(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        config = self._get_json(url)
        if not isinstance(config, dict):
            raise IdentityProviderUnavailable(f"{url} is not an OIDC discovery document")
        if config.get("issuer") != self.issuer:
            # OIDC Discovery §4.3: must match exactly, or another issuer's keys could get in.
            raise IdentityProviderUnavailable(
                f"discovery at {url} names issuer {_quote(config.get('issuer'))}, "
                f"expected exactly {self.issuer!r}",
                hint="set the broker's oidc.issuer to the IdP's issuer string",
            )
        jwks_uri = config.get("jwks_uri")
        secure = isinstance(jwks_uri, str) and (
            jwks_uri.startswith("https://") or self.issuer.startswith("http://")
        )
        if not secure:
            raise IdentityProviderUnavailable(
                f"discovery at {url} has no usable jwks_uri ({_quote(jwks_uri)})"
            )
        return jwks_uri

    def _fetch(self) -> None:
        self.fetch_count += 1
        if self._jwks_uri is None:
            self._jwks_uri = self._discover()
        jwks = self._get_json(self._jwks_uri)
        entries = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(entries, list):
            raise IdentityProviderUnavailable(f"{self._jwks_uri} is not a JWK set")
        keys: dict[str, jwt.PyJWK] = {}
        for index, data in enumerate(entries):
            if not isinstance(data, dict) or data.get("use", "sig") != "sig":
                continue
            try:
                keys[str(data.get("kid") or f"#{index}")] = jwt.PyJWK(data)
            except jwt.PyJWTError:
                continue  # an unsupported key type must not break the others
        self._keys = keys

    def get_signing_key(self, kid: str | None) -> jwt.PyJWK:
        key = _pick(self._keys, kid)  # fast path: the dict is replaced, never mutated
        if key is not None:
            return key
        with self._lock:
            key = _pick(self._keys, kid)
            now = self._clock()
            if key is None and now >= self._next_fetch:
                try:
                    with _map_exceptions(self.issuer):
                        self._fetch()
                except IdentityProviderUnavailable as exc:
                    self._jwks_uri = None  # rediscover next time: the jwks_uri may have moved
                    self._failure, self._next_fetch = exc, now + self._backoff
                    raise
                self._failure, self._next_fetch = None, now + self._cooldown
                key = _pick(self._keys, kid)
            elif key is None and self._failure is not None:
                raise self._failure
        if key is None:
            raise _unknown_key(kid, len(self._keys))
        return key


class StaticKeySource:
    """A fixed key set, for unit tests only (warns `FakeComponentWarning`)."""

    def __init__(self, keys: Mapping[str, jwt.PyJWK]) -> None:
        warnings.warn("StaticKeySource is for unit tests only", FakeComponentWarning, stacklevel=2)
        self._keys = dict(keys)

    def get_signing_key(self, kid: str | None) -> jwt.PyJWK:
        key = _pick(self._keys, kid)
        if key is None:
            raise _unknown_key(kid, len(self._keys))
        return key


class JtiReplayCache:
    """`jti` values seen within their token's lifetime: bounded, thread-safe, in memory.

    Per process: with several broker replicas a replayed token can still reach another
    replica. When full of unexpired entries it refuses new tokens (fail closed) rather than
    forget one that could then be replayed.
    """

    def __init__(
        self, max_entries: int = REPLAY_CACHE_SIZE, clock: Callable[[], float] = time.time
    ) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()  # jti → exp, insertion order
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()

    def check_and_remember(self, jti: str, expires_at: float) -> None:
        with self._lock:
            now = self._clock()
            seen = self._seen.get(jti)
            if seen is not None and seen >= now:
                raise AuthenticationError(
                    "token was already used (replayed jti)",
                    "replayed",
                    hint="get a fresh ID token for every call",
                )
            if len(self._seen) >= self._max:
                for old in [k for k, exp in self._seen.items() if exp < now]:
                    del self._seen[old]
            if len(self._seen) >= self._max:
                raise AuthenticationError("too many live tokens to track replays", "replay_cache")
            self._seen[jti] = expires_at


class OIDCVerifier:
    """Verifies ID tokens of one issuer for one audience.

    `replay_check` is off by default: `guard` sends the same ID token with every API
    call until it nears expiry (the CLI caches it), so a second use is normal, not an
    attack. Turn it on where each token is meant to be used once (for example CI tokens
    minted per job step).
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str],
        key_source: KeySource,
        groups_claim: str = "groups",
        leeway: int = 30,
        replay_check: bool = False,
        replay_cache: JtiReplayCache | None = None,
        single_audience: bool = False,
    ) -> None:
        if not algorithms or not set(algorithms) <= ASYMMETRIC_ALGORITHMS:
            bad = sorted(set(algorithms) - ASYMMETRIC_ALGORITHMS) or ["(empty list)"]
            raise ValueError(f"refusing OIDC algorithms {bad}: only asymmetric ones are allowed")
        self.issuer = issuer
        self.audience = audience
        self.algorithms = list(algorithms)
        self.groups_claim = groups_claim
        self.leeway = leeway
        self.key_source = key_source
        self.replay_cache = replay_cache or (JtiReplayCache() if replay_check else None)
        # A CI token must name exactly one audience, ours: one that also names another
        # relying party could be replayed to it, or from it to us.
        self.single_audience = single_audience

    @classmethod
    def from_settings(
        cls, settings: OIDCSettings, key_source: KeySource, *, replay_check: bool = False
    ) -> OIDCVerifier:
        return cls(
            issuer=settings.issuer,
            audience=settings.audience,
            algorithms=list(settings.algorithms),
            key_source=key_source,
            groups_claim=settings.groups_claim,
            leeway=settings.leeway_seconds,
            replay_check=replay_check,
        )

    def verify(self, token: str) -> VerifiedClaims:
        with _map_exceptions(self.issuer, self.audience, token):
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self.algorithms:  # before any key is looked up
                raise jwt.InvalidAlgorithmError(str(header.get("alg")))
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise jwt.InvalidTokenError("the kid header must be a string")
            # Read unverified only to refuse early and to pick the audience check below.
            peek = jwt.decode(token, options={"verify_signature": False})
            if "iss" not in peek:
                raise jwt.MissingRequiredClaimError("iss")
            if peek["iss"] != self.issuer:
                # Cheap early refusal of foreign tokens: no JWKS refetch for their kids.
                raise jwt.InvalidIssuerError("issuer mismatch")
            key = self.key_source.get_signing_key(kid)
            claims = jwt.decode(
                token,
                key=key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    # A string aud must match exactly; a list is checked below (docstring).
                    "strict_aud": isinstance(peek.get("aud"), str),
                    "enforce_minimum_key_length": True,
                },
            )
        aud = claims["aud"]
        if self.single_audience and isinstance(aud, list) and len(aud) != 1:
            raise AuthenticationError(
                f"token names {len(aud)} audiences; a CI token must name exactly one, "
                f"{self.audience!r}",
                "audience",
                hint="ask the CI platform for a token with only guard's audience",
            )
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.audience:
            raise AuthenticationError(
                f"token names several audiences but its authorized party (azp) is "
                f"{_quote(claims.get('azp'))}, not {self.audience!r}",
                "audience",
            )
        if self.replay_cache is not None:
            jti = claims.get("jti")
            if not isinstance(jti, str) or not jti:
                raise AuthenticationError("token lacks the 'jti' claim", "missing_claim")
            # Keyed by issuer too: two issuers' jti spaces are independent.
            key = f"{self.issuer}\n{jti}"
            self.replay_cache.check_and_remember(key, float(claims["exp"]) + self.leeway)
        return VerifiedClaims(claims)


def principal_from_token(verifier: OIDCVerifier, token: str) -> Principal:
    """Verify `token` and turn its claims into a `Principal` (groups from `groups_claim`)."""
    return Principal.from_claims(verifier.verify(token), groups_claim=verifier.groups_claim)


class TrustedIssuer:
    """One trusted issuer: its verifier (own JWKS, audience, algorithms) and bindings."""

    def __init__(self, settings: TrustedIssuerSettings, verifier: OIDCVerifier) -> None:
        self.settings = settings
        self.verifier = verifier
        platform = settings.resolved_platform()
        audit = settings.audit_claims
        if audit is None:
            audit = AUDIT_CLAIMS[platform] if settings.kind == "workload" else ()
        self.bindings = ClaimBindings(
            required=patterns_of(settings.require),
            mappings=tuple(GroupMapping(m.group, patterns_of(m.when)) for m in settings.groups),
            audit_claims=audit,
        )

    def principal(self, token: str) -> Principal:
        settings = self.settings
        claims = self.verifier.verify(token)
        what = "CI token" if settings.kind == "workload" else "token"
        mismatch = self.bindings.first_mismatch(claims)
        if mismatch is not None:
            # The classic CI attacks end here: a fork's pull request, another branch,
            # another repository of the same name, a reusable workflow called from
            # elsewhere: each fails one required claim.
            raise AuthenticationError(
                f"the {what} of {settings.name} does not match the broker's bindings: {mismatch}",
                "bindings",
                hint="run from the repository, branch and event the broker's "
                f"trusted_issuers entry {settings.name!r} names",
            )
        if settings.kind == "workload" and not settings.token_groups_claim():
            unmapped = self.bindings.closest_miss(claims)
            if unmapped is not None:
                # Admitted but given no group: said here, with what each mapping wanted,
                # rather than as a policy refusal naming no group (a CI job's author
                # cannot read the broker's config).
                raise AuthenticationError(
                    f"the {what} of {settings.name} matches none of its group mappings: {unmapped}",
                    "bindings",
                    hint="run from a repository, branch and event a mapping names",
                )
        subject = claims.get(settings.subject_claim)
        if claim_text(subject) in (None, ""):
            raise AuthenticationError(
                f"the {what} of {settings.name} has no {settings.subject_claim!r} claim "
                "to name its subject",
                "missing_claim",
            )
        return Principal.from_claims(
            claims,
            groups_claim=settings.token_groups_claim(),
            subject_claim=settings.subject_claim,
            name_claims=settings.name_claims,
            extra_groups=self.bindings.groups(claims),
            via=settings.name,
            kind=settings.kind,
            evidence=self.bindings.evidence(claims),
        )


class TrustedIssuers:
    """Every issuer the broker trusts, chosen by the token's exact `iss`.

    A token is routed by its (unverified) `iss` to that issuer alone, then verified with
    that issuer's keys only: a foreign issuer that reuses a trusted issuer's `kid` gets
    nowhere (its token names its own `iss`, which is not trusted, and a token naming a
    trusted `iss` must verify under that issuer's JWKS). An unknown `iss` is refused
    without any network call, so foreign tokens cannot make the broker fetch anything.
    """

    def __init__(self, issuers: Sequence[TrustedIssuer]) -> None:
        self._by_iss = {i.settings.issuer: i for i in issuers}

    @classmethod
    def from_settings(
        cls,
        issuers: Sequence[TrustedIssuerSettings],
        key_source: Callable[[TrustedIssuerSettings], KeySource],
    ) -> TrustedIssuers:
        replay = JtiReplayCache()  # one bound on remembered tokens for the whole broker
        return cls(
            [
                TrustedIssuer(
                    s,
                    OIDCVerifier(
                        issuer=s.issuer,
                        audience=s.audience,
                        algorithms=list(s.algorithms),
                        key_source=key_source(s),
                        groups_claim=s.token_groups_claim() or "",
                        leeway=s.leeway_seconds,
                        replay_cache=replay if s.is_single_use() else None,
                        single_audience=s.kind == "workload",
                    ),
                )
                for s in issuers
            ]
        )

    def __iter__(self) -> Iterator[TrustedIssuer]:
        return iter(self._by_iss.values())

    def principal(self, token: str) -> Principal:
        iss = _unverified_claims(token).get("iss")
        issuer = self._by_iss.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            if iss is None:
                with _map_exceptions("(unknown issuer)", token=token):
                    jwt.get_unverified_header(token)  # the malformed-token message
                raise AuthenticationError("token lacks the 'iss' claim", "missing_claim")
            raise AuthenticationError(
                f"token was issued by {_quote(iss)}, which this broker does not trust",
                "issuer",
                hint="log in with `guard login`, or add the issuer to the broker's trusted_issuers",
            )
        return issuer.principal(token)
