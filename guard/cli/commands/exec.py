"""`guard exec [TARGET] -- CMD…`: run a program with PG* and DATABASE_URL for a session.

TARGET is spelled as `guard connect` spells it; `--db TARGET` is the older spelling and
still works. The child's exit status is returned unchanged. In CI, an identity token from
`--id-token-file` or `GUARD_ID_TOKEN` replaces `guard login`. Imported when `guard`
starts: what a session needs is imported when the command runs. The everyday forms of this
command line never reach click: `cli.entry` parses and runs them (`run_exec`, also this
command's body) without it.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from guard.cli.entry import DEFAULT_TARGET, ExecArguments, run_exec, split_target
from guard.cli.options import session_options
from guard.cli.usage import GuardCommand


class ExecCommand(GuardCommand):
    """`guard exec`: its parameters are the target and the program, read from the command
    by `split_target` as the fast path (`cli.entry`) reads them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        if not ctx.resilient_parsing:  # shell completion: leave what click parsed alone
            given = ctx.get_parameter_source("db") is ParameterSource.COMMANDLINE
            db = ctx.params["db"] if given else None
            ctx.params["db"], ctx.params["command"] = split_target(ctx.params["command"], db)
        return rest


# Everything from the program's name on is the program's (`guard exec ./job.sh -v`), as
# with env(1); an unknown option before it is a usage error, not a program to run.
@click.command(
    "exec",
    cls=ExecCommand,
    help="Run a command with PG* / DATABASE_URL pointing at TARGET through guard.\n\n"
    "TARGET is the one word before `--` (`guard exec demo -- psql`). Without `--`, or with "
    "more words before it, they are all the command and the target is --db's, the older "
    "spelling (`guard exec --db demo python job.py`).",
    context_settings={"allow_interspersed_args": False},
)
@click.argument(
    "command",
    nargs=-1,
    metavar="[TARGET] -- CMD...",
    help="Policy target (default: demo), `--`, then the command and its arguments",
)
@click.option(
    "--db",
    default=DEFAULT_TARGET,
    show_default=True,
    metavar="TARGET",
    help="Policy target: the older spelling of TARGET",
)
@session_options
@click.option(
    "--id-token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding an OIDC ID token (CI)",
)
def exec_command(
    command: tuple[str, ...], db: str, reason: str, ttl: int | None, id_token_file: Path | None
) -> int:
    # The same function as the click-free fast path (`cli.entry`) runs; `ExecCommand` has
    # split the target from the program.
    return run_exec(ExecArguments(command, db, reason, ttl, id_token_file))
