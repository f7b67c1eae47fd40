"""`guard connect TARGET [-- PSQL-ARGS]`: psql through guard for the session's lifetime."""

from __future__ import annotations

import shlex
import shutil
from typing import Annotated

import typer
from rich.console import Console

from guard.cli.auth import current_id_token
from guard.cli.errors import CliError
from guard.cli.profile import load_profile
from guard.cli.runner import parse_duration, run_in_session

_err = Console(stderr=True)


def connect(
    target: Annotated[str, typer.Argument(help="Policy target, e.g. demo")],
    psql_args: Annotated[list[str] | None, typer.Argument(help="Arguments passed to psql")] = None,
    reason: Annotated[str, typer.Option(help="Why you need access (recorded)")] = "",
    ttl: Annotated[str | None, typer.Option(help="Session lifetime, e.g. 30m, 1h")] = None,
    print_env: Annotated[
        bool, typer.Option("--print-env", help="Print PG* variables for another client and wait")
    ] = False,
) -> int:
    profile = load_profile()
    token = current_id_token(profile)
    argv: list[str] | None = None
    if not print_env:
        psql = shutil.which("psql")
        if psql is None:
            raise CliError(
                "psql is not installed", hint="install the PostgreSQL client, or use --print-env"
            )
        argv = [psql, *(psql_args or [])]

    def ready(env: dict[str, str]) -> None:
        if print_env:
            for key in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE"):
                print(f"export {key}={shlex.quote(env[key])}", flush=True)
            _err.print("[dim]session open; press Ctrl-C to end it[/dim]")
        else:
            _err.print(f"[dim]guard: connected to {target} through 127.0.0.1:{env['PGPORT']}[/dim]")

    return run_in_session(
        broker_url=profile.broker_url,
        token=token,
        target=target,
        reason=reason,
        ttl_seconds=parse_duration(ttl),
        argv=argv,
        on_ready=ready,
        gateway_ca_file=profile.gateway_ca_file,
    )


def register(app: typer.Typer) -> None:
    app.command(
        "connect",
        help="Open psql to TARGET through guard (ends the session when psql exits).",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(connect)
