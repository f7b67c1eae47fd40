"""`guard dev login USER` / `guard dev token USER`: the real device flow against the local
dev IdP, approved on its `/device` form instead of in a browser. Refuses any other issuer."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from guard.cli.auth import DeviceFlow, TokenStore
from guard.cli.commands.login import describe_login
from guard.cli.errors import CliError
from guard.cli.profile import Profile, dev_state_dir, load_profile

_err = Console(stderr=True)


def _dev_profile() -> Profile:
    profile = load_profile()
    stack = dev_state_dir() / "stack.json"
    try:
        dev_issuer = json.loads(stack.read_text()).get("issuer")
    except (OSError, ValueError):
        dev_issuer = None
    if not dev_issuer or dev_issuer.rstrip("/") != profile.issuer.rstrip("/"):
        raise CliError(
            "guard dev login works only against the local dev IdP started by `guard dev up`",
            hint="use `guard login` for a real identity provider",
        )
    return profile


def _device_login(profile: Profile, user: str) -> dict:
    flow = DeviceFlow(profile.issuer, profile.client_id)
    auth = flow.start()
    response = flow.http.post(
        f"{flow.issuer}/device",
        data={"user_code": auth.user_code, "username": user, "action": "approve"},
    )
    if response.status_code != 200:
        raise CliError(
            f"the dev IdP has no user {user!r}",
            hint="see guard/devstack/users.yaml (alice, bob, carol, ci, mallory)",
        )
    # Approved already, so the first poll succeeds; no need to wait a full interval.
    return flow.poll(auth, sleep=lambda _s: None)


def dev_login(user: Annotated[str, typer.Argument(help="Dev IdP user, e.g. alice")]) -> int:
    profile = _dev_profile()
    tokens = _device_login(profile, user)
    TokenStore(profile).save(tokens)
    _err.print(describe_login(tokens))
    return 0


def dev_token(user: Annotated[str, typer.Argument(help="Dev IdP user, e.g. ci")]) -> int:
    tokens = _device_login(_dev_profile(), user)
    print(tokens["id_token"])  # the one deliberate token output (for CI examples)
    return 0


def register(dev_app: typer.Typer) -> None:
    dev_app.command("login", help="Log in as a dev IdP user without a browser.")(dev_login)
    dev_app.command("token", help="Print a fresh ID token of a dev IdP user.")(dev_token)
