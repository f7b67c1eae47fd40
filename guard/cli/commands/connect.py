"""`guard connect TARGET [-- PSQL-ARGS]`: psql through guard for the session's lifetime.

Imported when `guard` starts: what a session needs is imported when the command runs.
"""

from __future__ import annotations

import sys

import click

from guard.cli.errors import CliError
from guard.cli.options import session_options
from guard.cli.profile import load_profile
from guard.cli.usage import GuardCommand


# psql's own options go after `--`; an unknown option before it is a usage error, not
# something to hand to psql (a mistyped `--reason` must not become a psql argument).
@click.command(
    "connect",
    cls=GuardCommand,
    help="Open psql to TARGET through guard (ends the session when psql exits).",
)
@click.argument("target", help="Policy target, e.g. demo")
@click.argument(
    "psql_args", nargs=-1, metavar="[-- PSQL_ARGS]...", help="Arguments passed to psql, after `--`"
)
@session_options
@click.option("--print-env", is_flag=True, help="Print PG* variables for another client and wait")
def connect(
    target: str,
    psql_args: tuple[str, ...],
    reason: str,
    ttl: int | None,
    unmasked: bool,
    print_env: bool,
) -> int:
    import shlex
    import shutil

    from guard.cli.auth import current_id_token, token_source
    from guard.cli.runner import run_in_session

    profile = load_profile()
    token = current_id_token(profile)
    argv: list[str] | None = None
    if not print_env:
        psql = shutil.which("psql")
        if psql is None:
            raise CliError(
                "psql is not installed", hint="install the PostgreSQL client, or use --print-env"
            )
        argv = [psql, *psql_args]

    def ready(env: dict[str, str]) -> None:
        if print_env:
            for key in (
                "PGHOST",
                "PGPORT",
                "PGUSER",
                "PGPASSWORD",
                "PGDATABASE",
                "PGSSLMODE",
                "PGSSLROOTCERT",
            ):
                if key in env:
                    print(f"export {key}={shlex.quote(env[key])}", flush=True)
            print("guard: press Ctrl-C to end the session", file=sys.stderr)
        else:
            # One line as written (not wrapped): the session's own line came just before.
            print(
                f"guard: psql to the gateway at {env['PGHOST']}:{env['PGPORT']}"
                f" ({env['PGSSLMODE']})",
                file=sys.stderr,
            )

    return run_in_session(
        broker_url=profile.broker_url,
        token=token,
        fresh_token=lambda: current_id_token(profile),
        token_from=token_source(profile=profile),
        target=target,
        reason=reason,
        ttl_seconds=ttl,
        argv=argv,
        on_ready=ready,
        gateway_ca_file=profile.gateway_ca_file,
        unmasked=unmasked,
    )
