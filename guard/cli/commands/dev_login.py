"""`guard dev login USER` / `guard dev token USER`: the real device flow against the local
dev IdP, approved on its `/device` form instead of in a browser.

Refuses any issuer but the one `guard dev up` recorded in `dev_state_dir()/stack.json`:
approving a sign-in without a person is only acceptable for the throwaway demo IdP.
The device flow's modules are imported when a command runs, not when `guard` starts.
"""

from __future__ import annotations

import json
from typing import Any

import click

from guard.cli import console
from guard.cli.commands.login import describe_login
from guard.cli.errors import CliError
from guard.cli.profile import Profile, dev_state_dir, load_profile
from guard.cli.usage import GuardCommand

ONLY_DEV = "guard dev login works only against the local dev IdP started by `guard dev up`"


def dev_profile() -> Profile:
    """The profile, if its issuer is the running dev stack's IdP; CliError otherwise."""
    profile = load_profile()
    stack = dev_state_dir() / "stack.json"
    try:
        dev_issuer = json.loads(stack.read_text()).get("issuer")
    except (OSError, ValueError, AttributeError):
        dev_issuer = None
    if not isinstance(dev_issuer, str) or dev_issuer.rstrip("/") != profile.issuer.rstrip("/"):
        raise CliError(
            ONLY_DEV,
            hint=f"the profile's issuer is {profile.issuer}; use `guard login` for it"
            if dev_issuer
            else "no dev stack is running here: run `guard dev up`",
        )
    return profile


def dev_device_login(profile: Profile, user: str) -> dict[str, Any]:
    """Run the device flow and approve it as `user` on the dev IdP's form."""
    from guard.cli.auth import DeviceFlow

    with DeviceFlow(profile.issuer, profile.client_id) as flow:
        auth = flow.start()
        response = flow.post_form(
            f"{flow.issuer}/device",
            {"user_code": auth.user_code, "username": user, "action": "approve"},
        )
        if response.status_code != 200:
            if "unknown user" in response.text:
                raise CliError(
                    f"the dev IdP has no user {user!r}",
                    hint="users: alice, bob, carol, ci, mallory (guard/devstack/users.yaml)",
                )
            raise CliError(f"the dev IdP refused the approval (HTTP {response.status_code})")
        # Approved already: the first poll returns the tokens.
        return flow.poll(auth, immediate=True)


@click.command("login", cls=GuardCommand, help="Log in as a dev IdP user without a browser.")
@click.argument("user", help="Dev IdP user, e.g. alice")
def dev_login(user: str) -> int:
    from guard.cli.auth import TokenStore

    profile = dev_profile()
    tokens = dev_device_login(profile, user)
    TokenStore(profile).save(tokens)
    console.stderr().print(describe_login(tokens))
    return 0


@click.command("token", cls=GuardCommand, help="Print a fresh ID token of a dev IdP user.")
@click.argument("user", help="Dev IdP user, e.g. ci")
def dev_token(user: str) -> int:
    tokens = dev_device_login(dev_profile(), user)
    # The one deliberate token output (for CI-style examples): stdout only, nothing stored.
    click.echo(tokens["id_token"])
    return 0
