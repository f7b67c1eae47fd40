"""The CLI profile: where the broker and the IdP are, so commands need no flags.

Imports only the stdlib. The profile lives at `$GUARD_HOME/profile.json` (default
`~/.guard`). It holds addresses and CA files only, never tokens or credentials (those go to
the keyring, see `cli.auth`). `guard dev up` writes it; every setting can also come from
the environment, which overrides the file (`GUARD_BROKER_URL`, `GUARD_ISSUER`,
`GUARD_CLIENT_ID`, `GUARD_BROKER_CA`, `GUARD_GATEWAY_CA`, `GUARD_SCOPE`,
`GUARD_CI_AUDIENCE`, `GUARD_ID_TOKEN_VARIABLE`), so a CI job configures guard without
one. Only the broker URL is required: a job that brings its own ID token needs no issuer.

The broker API is HTTPS, always verified: against `broker_ca_file` when set (the dev
stack's CA), else the system trust store. There is no switch to turn verification off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from guard.cli.errors import CliError
from guard.cli.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    import ssl


def guard_home() -> Path:
    return Path(os.environ.get("GUARD_HOME") or Path.home() / ".guard")


def dev_state_dir() -> Path:
    return guard_home() / "dev"


class Profile(Record):
    broker_url: str
    # The OIDC issuer people log in at; a CI job that brings its own token needs none.
    issuer: str = ""
    client_id: str = "guard-cli"
    # Audience the broker expects in ID tokens; the CLI only passes tokens through.
    audience: str = "guard-cli"
    # CA that signs the gateway's certificate (None: the system trust store).
    gateway_ca_file: str | None = None
    # CA that signs the broker API's HTTPS certificate (None: the system trust store).
    broker_ca_file: str | None = None
    # OAuth scopes `guard login` asks for (None: `auth.DEFAULT_SCOPE`); an IdP that refuses
    # scopes it does not know (`groups`) needs its own list.
    scope: str | None = None
    # The audience a CI job asks its platform's token service for (GitHub Actions); the
    # broker's trusted issuer must name the same. None: the broker URL.
    ci_audience: str | None = None
    # The environment variable that holds a CI job's ID token (GitLab's `id_tokens:`
    # names its own); None: GUARD_ID_TOKEN.
    id_token_variable: str | None = None

    @property
    def path(self) -> Path:
        return profile_path()


# Environment variables that override the profile's settings.
_FROM_ENVIRONMENT = (
    ("GUARD_BROKER_URL", "broker_url"),
    ("GUARD_ISSUER", "issuer"),
    ("GUARD_CLIENT_ID", "client_id"),
    ("GUARD_BROKER_CA", "broker_ca_file"),
    ("GUARD_GATEWAY_CA", "gateway_ca_file"),
    ("GUARD_SCOPE", "scope"),
    ("GUARD_CI_AUDIENCE", "ci_audience"),
    ("GUARD_ID_TOKEN_VARIABLE", "id_token_variable"),
)


def profile_path() -> Path:
    return guard_home() / "profile.json"


def save_profile(profile: Profile) -> Path:
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.as_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_profile() -> Profile:
    data: dict[str, str] = {}
    path = profile_path()
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(
                f"cannot read the guard profile {path}: {exc}",
                hint="delete it and run `guard dev up` (or write broker_url and issuer)",
            ) from exc
    # Every setting from the environment too: a CI job configures guard without a file.
    for variable, key in _FROM_ENVIRONMENT:
        if os.environ.get(variable):
            data[key] = os.environ[variable]
    if not data.get("broker_url"):
        raise CliError(
            "guard is not configured: no broker URL / issuer",
            hint="run `guard dev up` for the local demo, or set GUARD_BROKER_URL and GUARD_ISSUER",
        )
    known = {k: v for k, v in data.items() if k in Profile._fields}
    return Profile(**known)


def broker_ca_file() -> str | None:
    """The CA file that verifies the broker: `GUARD_BROKER_CA`, else the profile's
    `broker_ca_file`, else None (the system trust store). Never raises: a missing or
    unreadable profile means no CA of its own."""
    if os.environ.get("GUARD_BROKER_CA"):
        return os.environ["GUARD_BROKER_CA"]
    try:
        value = json.loads(profile_path().read_text()).get("broker_ca_file")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def broker_tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies the broker's certificate and host name against
    `ca_file` (None: the system trust store); TLS 1.2 or newer."""
    import ssl  # here: `--help` and usage errors need no TLS (~13 ms of start-up)

    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(
            f"cannot read the broker CA file {ca_file}: {exc}",
            hint="run `guard dev up` again for the demo, or fix broker_ca_file in the"
            " profile (or GUARD_BROKER_CA)",
        ) from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
