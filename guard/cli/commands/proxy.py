"""`guard proxy TARGET [--port N]`: a session on a local plain port, for clients without TLS.

`guard connect` and `guard exec` hand clients the gateway itself over verified TLS. A tool
that cannot do TLS (some GUI clients) gets this instead: a loopback port whose relay speaks
verified TLS to the gateway, for the session's lifetime (Ctrl-C ends both). Every byte then
crosses a second hop, so use it only where TLS is not an option. Imported when `guard`
starts: what a session needs is imported when the command runs.
"""

from __future__ import annotations

import click

from guard.cli import console
from guard.cli.options import session_options
from guard.cli.profile import load_profile
from guard.cli.usage import GuardCommand


@click.command(
    "proxy",
    cls=GuardCommand,
    help="Serve a session on a local plain port for clients that cannot do TLS.",
)
@click.argument("target", help="Policy target, e.g. demo")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    metavar="PORT",
    show_default=True,
    help="Local port (0: any free one)",
)
@session_options
def proxy(target: str, port: int, reason: str, ttl: int | None, unmasked: bool) -> int:
    import shlex

    from guard.cli.auth import current_id_token, token_source
    from guard.cli.runner import run_in_session

    profile = load_profile()

    def ready(env: dict[str, str]) -> None:
        for key in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE"):
            print(f"export {key}={shlex.quote(env[key])}", flush=True)
        console.stderr().print(
            f"[dim]guard: {target} on 127.0.0.1:{env['PGPORT']} (plain, this machine only); "
            "Ctrl-C ends the session[/dim]"
        )

    return run_in_session(
        broker_url=profile.broker_url,
        token=current_id_token(profile),
        fresh_token=lambda: current_id_token(profile),
        token_from=token_source(profile=profile),
        target=target,
        reason=reason,
        ttl_seconds=ttl,
        argv=None,
        on_ready=ready,
        gateway_ca_file=profile.gateway_ca_file,
        relay_port=port,
        unmasked=unmasked,
    )
