"""`guard policy check [FILE]`: validate a policies.yaml and report errors with YAML paths.

Imports the pure `guard.broker.policy` package (no I/O besides reading FILE): validation
must work offline, without a broker, e.g. in a pre-commit hook. The compiler and rich are
imported when the command runs, not when `guard` starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from guard.cli import console
from guard.cli.errors import CliError
from guard.cli.usage import GuardCommand, GuardGroup


def check(
    file: Annotated[Path, typer.Argument(dir_okay=False, help="Policy file")] = Path(
        "policies.yaml"
    ),
) -> int:
    from guard.broker.policy.compile import PolicyError, load_policy_file

    out = console.stdout()

    if not file.exists():
        raise CliError(f"{file}: no such file", hint="pass the path of your policies.yaml")
    try:
        policy = load_policy_file(file)
    except PolicyError as err:
        for problem in err.errors:
            out.print(
                f"[red]{file}[/red]: [bold]{problem.path}[/bold]: {problem.message}",
                highlight=False,
            )
        raise CliError(
            f"{file}: {len(err.errors)} problem(s)", hint="fix them and run again"
        ) from err
    out.print(
        f"[green]ok[/green] {file}: version {policy.version}, {len(policy.targets)} target(s), "
        f"{len(policy.rules)} rule(s)",
        highlight=False,
    )
    return 0


def register(app: typer.Typer) -> None:
    policy_app = typer.Typer(cls=GuardGroup, help="Policy tools.", no_args_is_help=True)
    policy_app.command("check", cls=GuardCommand, help="Validate a policies.yaml.")(check)
    app.add_typer(policy_app, name="policy")
