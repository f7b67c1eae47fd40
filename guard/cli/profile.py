"""The CLI profile: where the broker and the IdP are, so commands need no flags.

Imports only the stdlib. The profile lives at `$GUARD_HOME/profile.json` (default
`~/.guard`). It holds addresses only, never tokens or credentials (those go to the keyring,
see `cli.auth`). `guard dev up` writes it; `GUARD_BROKER_URL` / `GUARD_ISSUER` override it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from guard.cli.errors import CliError


def guard_home() -> Path:
    return Path(os.environ.get("GUARD_HOME") or Path.home() / ".guard")


def dev_state_dir() -> Path:
    return guard_home() / "dev"


@dataclass(frozen=True)
class Profile:
    broker_url: str
    issuer: str
    client_id: str = "guard-cli"
    # Audience the broker expects in ID tokens; the CLI only passes tokens through.
    audience: str = "guard-cli"
    # CA that signs the gateway's certificate (None: the system trust store).
    gateway_ca_file: str | None = None

    @property
    def path(self) -> Path:
        return profile_path()


def profile_path() -> Path:
    return guard_home() / "profile.json"


def save_profile(profile: Profile) -> Path:
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(profile), indent=2) + "\n")
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
    if os.environ.get("GUARD_BROKER_URL"):
        data["broker_url"] = os.environ["GUARD_BROKER_URL"]
    if os.environ.get("GUARD_ISSUER"):
        data["issuer"] = os.environ["GUARD_ISSUER"]
    if not data.get("broker_url") or not data.get("issuer"):
        raise CliError(
            "guard is not configured: no broker URL / issuer",
            hint="run `guard dev up` for the local demo, or set GUARD_BROKER_URL and GUARD_ISSUER",
        )
    known = {k: v for k, v in data.items() if k in Profile.__dataclass_fields__}
    return Profile(**known)
