"""Broker settings: read once at start-up from a YAML file (plus environment overrides).

Imports pydantic and yaml only. Nothing here opens sockets or files other than the config
file itself; `service.py` turns settings into running parts.

Secrets never live in this file: the OpenBao token comes from `openbao.token_file` or the
`GUARD_OPENBAO_TOKEN` environment variable, so a config file can be shared and reviewed.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = 0
    # Address given to clients in session responses (a load balancer's name in production).
    advertise_host: str | None = None


class GatewaySettings(ListenSettings):
    port: int = 6433
    # A connection with nothing in flight and no byte either way for this long is ended
    # (FATAL 57P05, like PostgreSQL's idle_session_timeout); 0 turns the watchdog off.
    # Statements running or held for approval are never "idle".
    idle_timeout_seconds: float = Field(default=900.0, ge=0)
    # The whole login (startup, TLS, SCRAM, the upstream login) must finish within this.
    login_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # Connections still logging in, at most (then FATAL 53300 at once).
    max_logging_in: int = Field(default=128, ge=1)
    # A client message whose start arrived must be complete within this long.
    message_timeout_seconds: float = Field(default=60.0, gt=0)
    # Gateway processes: 1 serves clients in the broker's own process; N > 1 starts N
    # worker processes that share the port (SO_REUSEPORT) and ask the broker about
    # sessions, so the gateway uses N cores; "auto" (the default) is one per CPU the broker
    # may use. A host that shares its cores with the database may do better with fewer
    # (bench/run.py --gateway-workers); each worker is a process of ~75 MB.
    workers: int | Literal["auto"] = Field(default="auto")

    @field_validator("workers")
    @classmethod
    def _workers_in_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("gateway.workers must be between 1 and 64, or auto")
        return value

    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.workers


class ApiSettings(ListenSettings):
    # Plain HTTP on a non-loopback address carries bearer tokens and session secrets in
    # clear, so the broker refuses to start that way without `api_tls` unless this says
    # so explicitly (e.g. behind a TLS-terminating proxy on the same host).
    allow_plaintext: bool = False


class TLSSettings(_Strict):
    """A server certificate: the PG gateway's (clients use sslmode=verify-full against it)
    or the API's (HTTPS; the CLI verifies it)."""

    cert_file: Path
    key_file: Path
    # The CA that signed `cert_file`, handed to clients so they verify the server with it
    # (the gateway's: in each session's answer). Optional: without it clients use theirs.
    ca_file: Path | None = None


class OIDCSettings(_Strict):
    """The people's identity provider (the CLI's `guard login`): shorthand for one
    `trusted_issuers` entry of kind `person`, named `oidc`."""

    issuer: str
    audience: str = "guard-cli"
    groups_claim: str = "groups"
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_seconds: int = Field(default=30, ge=0, le=300)


# A claim's required value: one pattern or a list of alternatives (see identity.bindings).
ClaimRule = str | list[str]


def _claim_rules(rules: dict[str, object], where: str) -> dict[str, ClaimRule]:
    """YAML writes `123` and `true` unquoted: take them as the strings claims compare as."""
    out: dict[str, ClaimRule] = {}
    for claim, wanted in rules.items():
        values = wanted if isinstance(wanted, list) else [wanted]
        texts = []
        for value in values:
            if isinstance(value, bool):
                texts.append("true" if value else "false")
            elif isinstance(value, int | str) and str(value):
                texts.append(str(value))
            else:
                raise ValueError(f"{where}.{claim}: a claim value must be a string or number")
        if not claim or not texts:
            raise ValueError(f"{where}: an empty claim name or value list")
        out[claim] = texts[0] if len(texts) == 1 else texts
    return out


class GroupMappingSettings(_Strict):
    """`group` is given to a token whose claims match every entry of `when`."""

    group: str = Field(min_length=1)
    when: dict[str, ClaimRule]

    @field_validator("when", mode="before")
    @classmethod
    def _strings(cls, value: object) -> object:
        if not isinstance(value, dict) or not value:
            raise ValueError("when: name at least one claim")
        return _claim_rules(value, "when")


_GITHUB_ISSUER = "https://token.actions.githubusercontent.com"


class TrustedIssuerSettings(_Strict):
    """One OIDC issuer whose tokens the broker accepts: people's IdP or a CI platform.

    Tokens are routed by their exact `iss`; each issuer has its own JWKS (a key of one
    can never verify a token of another), its own audience and its own bindings."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    issuer: str
    # Exactly one audience, guard's own (e.g. the broker's URL). A workload token must
    # carry exactly this one; a platform default (`https://github.com/OWNER`) is refused.
    audience: str = Field(min_length=1)
    # `person`: someone who logged in (ID tokens reused until they expire). `workload`: a
    # CI job's token (single use by default, admitted only through its bindings).
    kind: Literal["person", "workload"] = "person"
    # Which CI platform's rules apply (owner/project id bindings, audited claims); from
    # the issuer URL when unset: GitHub Actions' issuer, or a GitLab one (gitlab in its host).
    platform: Literal["github", "gitlab", "generic"] | None = None
    subject_claim: str = "sub"
    # Groups from a claim of the token: default `groups` for people; none for workloads,
    # whose groups come from `groups` mappings only (a CI platform's own claims say
    # nothing about guard's groups).
    groups_claim: str | None = None
    name_claims: tuple[str, ...] = ("preferred_username", "email", "name")
    require: dict[str, ClaimRule] = {}
    groups: list[GroupMappingSettings] = []
    # Claims copied to the session's audit record beside those the bindings name.
    audit_claims: tuple[str, ...] | None = None
    # Remember each token's `jti` until it expires and refuse a second use. Default: on
    # for workloads (the CLI fetches a fresh token per broker call), off for people.
    single_use: bool | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_seconds: int = Field(default=30, ge=0, le=300)

    @field_validator("require", mode="before")
    @classmethod
    def _strings(cls, value: object) -> object:
        if not isinstance(value, dict):
            raise ValueError("require: a mapping of claim → value(s)")
        return _claim_rules(value, "require")

    @field_validator("issuer")
    @classmethod
    def _secure_issuer(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return value
        if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
            return value  # a development IdP on this machine
        raise ValueError(f"issuer {value!r} must be an https:// URL (http only on loopback)")

    @model_validator(mode="after")
    def _safe_bindings(self) -> TrustedIssuerSettings:
        from guard.broker.identity.bindings import binding_problems

        audience = self.audience.rstrip("/")
        if audience.lower().startswith("https://github.com") or audience == self.issuer.rstrip("/"):
            # GitHub's default audience is the owner's URL and GitLab's legacy one the
            # instance's: any job of the platform can get a token for those.
            raise ValueError(
                f"audience {self.audience!r} is a platform default: use guard's own "
                "(e.g. the broker's URL), and ask for it in the job"
            )
        if self.kind == "workload":
            problems = binding_problems(
                self.resolved_platform(), self.require, [m.when for m in self.groups]
            )
            if problems:
                raise ValueError(f"trusted issuer {self.name!r}: " + "; ".join(problems))
        return self

    def resolved_platform(self) -> str:
        if self.platform is not None:
            return self.platform
        host = urlsplit(self.issuer).hostname or ""
        if self.issuer.rstrip("/") == _GITHUB_ISSUER or urlsplit(self.issuer).path.endswith(
            "/_services/token"
        ):
            return "github"  # github.com, or GitHub Enterprise Server's issuer
        return "gitlab" if "gitlab" in host.split(".") else "generic"

    def token_groups_claim(self) -> str | None:
        if self.groups_claim is not None:
            return self.groups_claim or None
        return "groups" if self.kind == "person" else None

    def is_single_use(self) -> bool:
        return self.kind == "workload" if self.single_use is None else self.single_use

    @classmethod
    def from_oidc(cls, oidc: OIDCSettings) -> TrustedIssuerSettings:
        return cls(
            name="oidc",
            issuer=oidc.issuer,
            audience=oidc.audience,
            groups_claim=oidc.groups_claim,
            algorithms=oidc.algorithms,
            leeway_seconds=oidc.leeway_seconds,
        )


class OpenBaoSettings(_Strict):
    addr: str
    token_file: Path | None = None
    mount: str = "database"
    verify_tls: bool | str = True

    def token(self) -> str:
        env = os.environ.get("GUARD_OPENBAO_TOKEN")
        if env:
            return env
        if self.token_file is None:
            raise ValueError("openbao: set token_file or GUARD_OPENBAO_TOKEN")
        return self.token_file.read_text().strip()


class TargetSettings(_Strict):
    """Where a policy target lives upstream, and which OpenBao role mints its credentials."""

    host: str = "127.0.0.1"
    port: int = 5432
    database: str
    openbao_role: str
    # TLS to the database: "disable", "require" (encrypted, unverified) or "verify-full"
    # (certificate chain from `sslrootcert` or the system store, and the host name).
    sslmode: Literal["disable", "require", "verify-full"] = "disable"
    sslrootcert: Path | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        if self.sslmode == "disable":
            return None
        ctx = ssl.create_default_context(cafile=str(self.sslrootcert) if self.sslrootcert else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.sslmode == "require":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # Admin DSN file (read by the broker for catalog look-ups such as protected-column
    # OIDs); never handed to clients.
    admin_dsn_file: Path | None = None
    # DSN file of a role that may GRANT the guard_approved_* roles (approvals are enforced
    # by the database): a superuser/CREATEROLE admin, or better a role holding them WITH
    # ADMIN OPTION; defaults to admin_dsn_file.
    grants_dsn_file: Path | None = None
    # SECURITY DEFINER functions (regprocedure text, e.g. `public.f(integer)`) whose owner
    # reads protected data that sessions may still execute: the backstop revokes EXECUTE on
    # every other one, and `guard target check` reports them.
    definer_functions_allowed: list[str] = []
    # Check the database backstop (`guard target check`) before issuing credentials, at
    # most this often while it passes; a drifted target gets no new sessions (503).
    backstop_check_seconds: float = Field(default=60.0, ge=0)


class AuditSettings(_Strict):
    path: Path
    # Ed25519 key (PEM, PKCS#8) that signs the log's checkpoints; created 0600 when missing,
    # its public key written beside it (`.pub`; `guard audit pubkey` prints it). Default:
    # beside the log, `<path>.key`.
    signing_key_file: Path | None = None
    # A signed checkpoint after this many records, and after this many seconds when records
    # were written since the last: only records after the last checkpoint can be cut or
    # re-chained without a trace (`guard audit verify`).
    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_seconds: float = Field(default=60.0, gt=0)
    # fsync statement records before their statements are forwarded (group commit: one
    # fsync per batch of concurrent statements), so an OS crash or power loss cannot lose
    # the record of a statement that ran. Off, a record survives a broker crash (kill -9)
    # but not an OS crash; records then pass through `<path>.journal`, a memory-mapped
    # ring, and reach the log within 200 ms (recovered from the ring after a crash).
    fsync: bool = True


class ApprovalSettings(_Strict):
    # Slack-compatible incoming webhooks (Slack, Mattermost, Teams…) told of new approval
    # requests and decisions. The URLs are secrets: logs show their host only, and the
    # settings' repr leaves them out.
    webhooks: list[str] = Field(default=[], repr=False)

    @field_validator("webhooks")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for i, url in enumerate(urls):
            try:
                parts = urlsplit(url)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                ok = False
            if not ok:
                # The URL itself is not repeated: it may carry a secret.
                raise ValueError(f"webhooks[{i}] is not an http(s) URL with a host")
        return urls


class SessionSettings(_Strict):
    """Session liveness, limits and lease clean-up."""

    # A client that asks for heartbeats (the CLI does) is told to send one every
    # `heartbeat_interval_seconds`; the broker ends its session when none came for
    # `heartbeat_grace_seconds` (a killed CLI or a lost laptop loses access that quickly).
    heartbeat_interval_seconds: float = Field(default=10.0, gt=0)
    heartbeat_grace_seconds: float = Field(default=45.0, gt=0)
    # Open sessions one principal (issuer + subject) may hold at once; one more is 429.
    max_sessions_per_principal: int = Field(default=10, ge=1)
    # A failed lease revocation is retried after this, doubling up to the maximum, until
    # OpenBao/Vault accepts it (pending revocations survive a broker restart).
    revoke_retry_initial_seconds: float = Field(default=1.0, gt=0)
    revoke_retry_max_seconds: float = Field(default=60.0, gt=0)
    # How often the broker compares the leases its state holds open with live sessions
    # and revokes those no session owns.
    reconcile_interval_seconds: float = Field(default=60.0, gt=0)
    # How often expired and heartbeat-lost sessions are looked for.
    expiry_check_seconds: float = Field(default=1.0, gt=0)
    # Members of these OIDC groups may list every session (`guard sessions --all`) and end
    # anyone's (`guard revoke`); everyone else sees and ends only their own.
    auditor_groups: list[str] = []

    @model_validator(mode="after")
    def _grace_after_interval(self) -> SessionSettings:
        if self.heartbeat_grace_seconds <= self.heartbeat_interval_seconds:
            raise ValueError(
                "heartbeat_grace_seconds must be longer than heartbeat_interval_seconds"
            )
        return self


class BrokerSettings(_Strict):
    state_dir: Path
    policy_file: Path
    api: ApiSettings = ApiSettings(port=8400)
    # The API serves HTTPS with this certificate; without it, plain HTTP (loopback only,
    # unless api.allow_plaintext).
    api_tls: TLSSettings | None = None
    gateway: GatewaySettings = GatewaySettings()
    gateway_tls: TLSSettings | None = None
    # People's IdP (shorthand) and/or any number of trusted issuers (people's and CI's).
    oidc: OIDCSettings | None = None
    trusted_issuers: list[TrustedIssuerSettings] = []
    openbao: OpenBaoSettings
    targets: dict[str, TargetSettings]
    audit: AuditSettings
    approvals: ApprovalSettings = ApprovalSettings()
    session_default_ttl_seconds: int = 3600
    sessions: SessionSettings = SessionSettings()

    @model_validator(mode="after")
    def _issuers(self) -> BrokerSettings:
        issuers = self.issuers()
        if not issuers:
            raise ValueError("no identity provider: set oidc.issuer or trusted_issuers")
        for what in ("name", "issuer"):
            seen = [getattr(i, what) for i in issuers]
            twice = sorted({v for v in seen if seen.count(v) > 1})
            if twice:
                raise ValueError(f"trusted issuers: {what} {twice[0]!r} appears twice")
        return self

    def issuers(self) -> list[TrustedIssuerSettings]:
        """Every trusted issuer: `oidc` (as the entry `oidc`) first, then `trusted_issuers`."""
        head = [TrustedIssuerSettings.from_oidc(self.oidc)] if self.oidc is not None else []
        return head + list(self.trusted_issuers)

    @property
    def database_path(self) -> Path:
        return self.state_dir / "broker.sqlite3"

    def api_plaintext_refusal(self) -> str | None:
        """Why the API must not start as configured (plain HTTP off loopback), else None."""
        if self.api_tls is not None or self.api.allow_plaintext:
            return None
        if is_loopback(self.api.host):
            return None
        return (
            f"the API would listen on {self.api.host or '*'} without TLS (bearer tokens and"
            " session secrets in clear): set api_tls {cert_file, key_file}, listen on"
            " 127.0.0.1, or set api.allow_plaintext: true explicitly"
        )


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for the
    wildcard (`0.0.0.0`, `::`, empty) and for any other name, which may resolve anywhere."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_settings(path: Path) -> BrokerSettings:
    """Parse the broker's YAML config; raises pydantic.ValidationError with field paths."""
    data = yaml.safe_load(path.read_text()) or {}
    return BrokerSettings.model_validate(data)
