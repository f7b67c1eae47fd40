"""The `guard` command line: a thin client of the broker API.

Each command lives in `cli.commands.<name>` and registers itself on `app` when this module
is imported, so `typer.testing.CliRunner(app)` and documentation tools see every command.
Command modules import only the stdlib, typer and the CLI's light modules at that point;
what a command needs (httpx, rich, keyring, …) is imported when it runs, keeping start-up,
`--help` and usage errors fast. Failures reach the user through one path
(`cli.usage.exit_code`: `CliError.diagnostics()`, click's usage errors, and the exit code).
From `guard.broker` the CLI imports only `guard.broker.api.schemas` (and the policy
compiler for `guard policy check`, the audit verifier for `guard audit verify`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from guard.cli.commands import approve, audit, connect, deny, dev, login, policy, proxy
from guard.cli.commands import exec as exec_cmd
from guard.cli.commands import requests as requests_cmd
from guard.cli.usage import GuardGroup, exit_code

app = typer.Typer(
    name="guard",
    cls=GuardGroup,
    help="Just-in-time, audited, masked access to PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"guard {version('guard')}")
    except PackageNotFoundError:
        typer.echo("guard (version unknown: the package is not installed)")
    raise typer.Exit(0)


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print guard's version and exit.",
        ),
    ] = False,
) -> None:
    pass


login.register(app)
connect.register(app)
exec_cmd.register(app)
proxy.register(app)
approve.register(app)
deny.register(app)
requests_cmd.register(app)
policy.register(app)
audit.register(app)
dev.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run `guard` with `argv` (default: the process's arguments); the exit code."""
    try:
        return app(args=argv, prog_name="guard", standalone_mode=False)
    except (Exception, KeyboardInterrupt) as exc:  # raised before GuardGroup.main runs
        return exit_code(exc)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
