"""`guard login` (OIDC device flow, RFC 8628) and `guard logout`."""

from __future__ import annotations

import webbrowser
from typing import Annotated

import jwt
import typer
from rich.console import Console
from rich.panel import Panel

from guard.cli.auth import DeviceFlow, TokenStore
from guard.cli.profile import Profile, load_profile

_err = Console(stderr=True)


def describe_login(tokens: dict) -> str:
    # Display only (unverified): the broker verifies the token on every use.
    claims = jwt.decode(tokens["id_token"], options={"verify_signature": False})
    name = claims.get("preferred_username") or claims.get("email") or claims.get("sub")
    groups = ", ".join(claims.get("groups", [])) or "no groups"
    return f"logged in as {name} ({groups})"


def login(
    issuer: Annotated[str | None, typer.Option(help="OIDC issuer URL")] = None,
    client_id: Annotated[str | None, typer.Option(help="OIDC client id")] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser")] = False,
) -> int:
    profile = load_profile()
    if issuer or client_id:
        profile = Profile(
            **{
                **profile.__dict__,
                "issuer": issuer or profile.issuer,
                "client_id": client_id or profile.client_id,
            }
        )
    flow = DeviceFlow(profile.issuer, profile.client_id)
    auth = flow.start()
    _err.print(
        Panel.fit(
            f"Open [bold]{auth.verification_uri}[/bold]\nand enter the code "
            f"[bold cyan]{auth.user_code}[/bold cyan]",
            title="guard login",
        )
    )
    if not no_browser:
        try:
            webbrowser.open(auth.verification_uri_complete or auth.verification_uri)
        except Exception:  # noqa: BLE001 - no browser is fine
            pass
    tokens = flow.poll(auth)
    TokenStore(profile).save(tokens)
    _err.print(describe_login(tokens))
    return 0


def logout() -> int:
    TokenStore(load_profile()).clear()
    _err.print("logged out")
    return 0


def register(app: typer.Typer) -> None:
    app.command("login", help="Sign in with your identity provider (device flow).")(login)
    app.command("logout", help="Forget the stored tokens.")(logout)
