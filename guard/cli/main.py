"""The `guard` command line: a thin client of the broker API.

Each command lives in `cli.commands.<name>` and registers itself here. Errors reach the user
through one path (`CliError.diagnostics()` and its exit code). From `guard.broker` the CLI
imports only `guard.broker.api.schemas`.
"""

from __future__ import annotations

import sys

import typer

from guard.cli.errors import CliError

app = typer.Typer(
    name="guard",
    help="Just-in-time, audited, masked access to PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from guard.cli.commands import connect, dev, login, policy
    from guard.cli.commands import exec as exec_cmd

    login.register(app)
    connect.register(app)
    exec_cmd.register(app)
    policy.register(app)
    dev.register(app)


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        result = app(args=argv, standalone_mode=False)
    except CliError as err:
        print(err.diagnostics(), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 130
        raise
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
