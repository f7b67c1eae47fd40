"""`guard login` (OIDC device flow, RFC 8628) and `guard logout`.

The user code and link go to stderr (stdout stays clean for scripts); tokens go to the
keychain through `cli.auth.TokenStore` and are never shown. Imported when `guard` starts:
the device flow's modules (httpx, keyring, PyJWT, rich) are imported when a command runs.
"""

from __future__ import annotations

import os
from typing import Any

import click

from guard.cli import console
from guard.cli.errors import EXIT_USAGE, CliError
from guard.cli.options import http_url
from guard.cli.profile import Profile, load_profile, save_profile
from guard.cli.usage import GuardCommand


def describe_login(tokens: dict[str, Any]) -> str:
    """`logged in as alice (engineers)`, read from the ID token for display only.

    Decoded WITHOUT verification: this is a greeting, not a decision; the broker verifies
    the token on every use.
    """
    from guard.cli.auth import unverified_claims

    claims = unverified_claims(tokens["id_token"]) or {}
    name = claims.get("preferred_username") or claims.get("email") or claims.get("sub") or "?"
    groups = claims.get("groups") or []
    shown = ", ".join(str(g) for g in groups) if isinstance(groups, list) else str(groups)
    return f"logged in as {name} ({shown or 'no groups'})"


def _login_profile(issuer: str | None, client_id: str | None) -> Profile:
    profile = load_profile()
    wanted = profile.replace(
        issuer=issuer or profile.issuer, client_id=client_id or profile.client_id
    )
    if wanted == profile:
        return profile
    if os.environ.get("GUARD_ISSUER") or os.environ.get("GUARD_BROKER_URL"):
        # Saving now would write the environment's overrides into the profile file.
        console.stderr().print(
            "note: the profile was not changed (GUARD_ISSUER / GUARD_BROKER_URL are set); "
            "set GUARD_ISSUER to this issuer for other commands to use this login"
        )
    else:
        save_profile(wanted)
        console.stderr().print(
            f"profile updated: issuer {wanted.issuer}, client id {wanted.client_id}"
        )
    return wanted


@click.command("login", cls=GuardCommand, help="Sign in with your identity provider (device flow).")
@click.option(
    "--issuer", type=http_url, metavar="URL", help="OIDC issuer URL (saved in the profile)"
)
@click.option("--client-id", help="OIDC client id")
@click.option(
    "--scope",
    help="OAuth scopes to ask for (default: the profile's, GUARD_SCOPE, else "
    "'openid profile email groups offline_access')",
)
@click.option("--no-browser", is_flag=True, help="Only print the link; do not open a browser")
def login(issuer: str | None, client_id: str | None, scope: str | None, no_browser: bool) -> int:
    import webbrowser

    from rich.markup import escape

    from guard.cli.auth import DEFAULT_SCOPE, DeviceFlow, TokenStore

    err = console.stderr()
    profile = _login_profile(issuer, client_id)
    if not profile.issuer:
        raise CliError(
            "no identity provider to log in at",
            hint="guard login --issuer URL (or set GUARD_ISSUER)",
            exit_code=EXIT_USAGE,
        )
    with DeviceFlow(profile.issuer, profile.client_id) as flow:
        auth = flow.start(scope or profile.scope or DEFAULT_SCOPE)
        # The IdP's words, not markup. The complete URI (code included) when it sends one:
        # one click on another device instead of typing the code (RFC 8628 §3.3.1).
        # Links are printed whole, never inside a box or folded at the console's width
        # (80 columns in a CI log): a folded link can be neither copied nor clicked.
        err.print(
            f"Open [bold]{escape(auth.verification_uri)}[/bold]\n"
            f"and enter the code [bold cyan]{escape(auth.user_code)}[/bold cyan]",
            soft_wrap=True,
        )
        if auth.verification_uri_complete:
            err.print(
                f"or open [bold]{escape(auth.verification_uri_complete)}[/bold]", soft_wrap=True
            )
        if not no_browser:
            try:
                webbrowser.open(auth.verification_uri_complete or auth.verification_uri)
            except Exception:  # noqa: BLE001 - no browser here: the printed link is enough
                pass
        with err.status("waiting for approval…"):
            tokens = flow.poll(auth)
    TokenStore(profile).save(tokens)
    err.print(describe_login(tokens))
    return 0


@click.command(
    "logout", cls=GuardCommand, help="Revoke the login at the identity provider and forget it."
)
def logout() -> int:
    from guard.cli.auth import DeviceFlow, TokenStore

    profile = load_profile()
    store = TokenStore(profile)
    refresh = (store.load() or {}).get("refresh_token")
    told = False
    if refresh and profile.issuer:
        # Revoked first, so a copy of the refresh token (a backup, another machine) dies
        # with the login; forgotten here whatever the IdP answers.
        try:
            with DeviceFlow(profile.issuer, profile.client_id) as flow:
                told = flow.revoke(refresh)
        except CliError as err:
            console.stderr().print(
                f"note: the identity provider was not told: {err.message}", markup=False
            )
    had = store.clear()
    if not had:
        console.stderr().print("not logged in")
    else:
        console.stderr().print(
            "logged out" + (" (the login was revoked at the identity provider)" if told else "")
        )
    return 0
