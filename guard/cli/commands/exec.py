"""`guard exec [OPTIONS] [TARGET] -- CMD…`: run a program with PG* and DATABASE_URL for a
session.

TARGET is spelled as `guard connect` spells it; `--db TARGET` is the older spelling and
still works. Before `--`, guard's options and TARGET in any order; after it, the program,
verbatim. The child's exit status is returned unchanged. In CI, an identity token from
`--id-token-file` or `GUARD_ID_TOKEN` replaces `guard login`. Imported when `guard`
starts: what a session needs is imported when the command runs. The everyday forms of this
command line never reach click: `cli.entry` parses and runs them (`run_exec`, also this
command's body) without it.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from guard.cli.entry import DEFAULT_TARGET, ExecArguments, read_exec, run_exec
from guard.cli.errors import CliError
from guard.cli.options import session_options
from guard.cli.usage import GuardCommand


class ExecCommand(GuardCommand):
    """`guard exec`: its target and program are read from the raw arguments by
    `read_exec`, the rule the fast path (`cli.entry`) reads them by; click parses guard's
    own words (before `--`, or all of them without one) with the options' types and errors.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest: list[str] = []

        def parse(words: list[str], interspersed: bool) -> tuple[str | None, tuple[str, ...]]:
            # Before `--`, options may follow TARGET; without one, the program's first word
            # ends guard's options (`guard exec ./job.sh -v`).
            ctx.allow_interspersed_args = interspersed
            rest[:] = super(ExecCommand, self).parse_args(ctx, words)
            given = ctx.get_parameter_source("db") is ParameterSource.COMMANDLINE
            return (ctx.params["db"] if given else None), ctx.params["command"]

        try:
            ctx.params["db"], ctx.params["command"] = read_exec(args, parse)
        except CliError:
            if not ctx.resilient_parsing:
                raise  # shell completion: leave what click parsed alone
        return rest


@click.command(
    "exec",
    cls=ExecCommand,
    help="Run a command with PG* / DATABASE_URL pointing at TARGET through guard.\n\n"
    "Before `--`: guard's options and TARGET, in any order (`guard exec demo --ttl 1h -- "
    "psql`); after it: the command, verbatim. Without `--`, the options come first and the "
    "command is everything from its first word on (`guard exec --db demo ./job.sh -v`); "
    "the target is then --db's, the older spelling.",
    context_settings={"allow_interspersed_args": False},  # see `parse` above
)
@click.argument(
    "command",
    nargs=-1,
    metavar="[TARGET] -- CMD...",  # as EXEC_USAGE shows it
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
    command: tuple[str, ...],
    db: str,
    reason: str,
    ttl: int | None,
    unmasked: bool,
    id_token_file: Path | None,
) -> int:
    # The same function as the click-free fast path (`cli.entry`) runs; `ExecCommand` has
    # split the target from the program. (`--unmasked` always comes this way: the fast
    # path takes no flags.)
    return run_exec(ExecArguments(command, db, reason, ttl, id_token_file, unmasked))
