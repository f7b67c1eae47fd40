"""The `guard` command line: a thin client of the broker API.

Each command is a click command in `cli.commands.<name>`, named in `COMMANDS` and imported
when it is looked up, so `click.testing.CliRunner`, `--help`, documentation tools and
click's shell completion (`_GUARD_COMPLETE=bash_source guard`) see every command while
running one imports only its own module. This module and
the command modules import only the stdlib, click and the CLI's light modules (errors,
profile, options, usage, console); what a command needs (httpx, rich, keyring, …) is
imported when it runs, keeping start-up, `--help` and usage errors fast. Failures reach the
user through one path (`cli.usage.exit_code`: `CliError.diagnostics()`, click's usage
errors, and the exit code). From `guard.broker` the CLI imports only
`guard.broker.api.schemas` (and the policy compiler for `guard policy check`, the audit
verifier for `guard audit verify`), and only when a command runs.
"""

from __future__ import annotations

import sys

import click

from guard.cli.usage import GuardGroup, exit_code

# Every command, in this order in `guard --help` and in the "takes one of" hint. A command's
# module is imported when the command is looked up (run, or listed by --help/completion),
# so `guard exec` imports only `cli.commands.exec`: ~10 ms less start-up than all of them.
COMMANDS = {
    "login": "guard.cli.commands.login:login",
    "logout": "guard.cli.commands.login:logout",
    "status": "guard.cli.commands.sessions:status",
    "targets": "guard.cli.commands.sessions:targets",
    "connect": "guard.cli.commands.connect:connect",
    "exec": "guard.cli.commands.exec:exec_command",
    "proxy": "guard.cli.commands.proxy:proxy",
    "sessions": "guard.cli.commands.sessions:sessions",
    "extend": "guard.cli.commands.sessions:extend",
    "end": "guard.cli.commands.sessions:end",
    "approve": "guard.cli.commands.approve:approve",
    "deny": "guard.cli.commands.deny:deny",
    "requests": "guard.cli.commands.requests:requests",
    "revoke": "guard.cli.commands.sessions:revoke",
    "policy": "guard.cli.commands.policy:policy",
    "target": "guard.cli.commands.target:target",
    "audit": "guard.cli.commands.audit:audit",
    "dev": "guard.cli.commands.dev:dev",
}


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        click.echo(f"guard {version('guard')}")
    except PackageNotFoundError:
        click.echo("guard (version unknown: the package is not installed)")
    ctx.exit(0)


@click.group(
    "guard",
    cls=GuardGroup,
    help="Just-in-time, audited, masked access to PostgreSQL.",
    no_args_is_help=True,
    # Help as wide as the terminal up to 100 columns (click stops at 80); every command's
    # context inherits it.
    context_settings={"max_content_width": 100},
    lazy=COMMANDS,
)
@click.option(
    "--version",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_print_version,
    help="Print guard's version and exit.",
)
def app() -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    """Run `guard` with `argv` (default: the process's arguments); the exit code."""
    try:
        code: int = app.main(args=argv, prog_name="guard", standalone_mode=False)
        return code
    except (Exception, KeyboardInterrupt) as exc:  # raised before GuardGroup.main runs
        return exit_code(exc)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
