"""`guard exec [--db TARGET] -- CMD…`: run a program with PG* and DATABASE_URL for a session.

The child's exit status is returned unchanged. In CI, an identity token from
`--id-token-file` or `GUARD_ID_TOKEN` replaces `guard login`. Imported when `guard`
starts: what a session needs is imported when the command runs. The everyday forms of this
command line never reach click: `cli.entry` parses and runs them (`run_exec`, also this
command's body) without it.
"""

from __future__ import annotations

from pathlib import Path

import click

from guard.cli.entry import ExecArguments, run_exec
from guard.cli.options import session_options
from guard.cli.usage import GuardCommand


# Everything from the program's name on is the program's (`guard exec ./job.sh -v`), as
# with env(1); an unknown option before it is a usage error, not a program to run.
@click.command(
    "exec",
    cls=GuardCommand,
    help="Run a command with PG* / DATABASE_URL pointing at TARGET through guard.",
    context_settings={"allow_interspersed_args": False},
)
@click.argument("command", nargs=-1, metavar="[CMD]...", help="Command and its arguments")
@click.option("--db", default="demo", show_default=True, help="Policy target")
@session_options
@click.option(
    "--id-token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding an OIDC ID token (CI)",
)
def exec_command(
    command: tuple[str, ...], db: str, reason: str, ttl: int | None, id_token_file: Path | None
) -> int:
    # The same function as the click-free fast path (`cli.entry`) runs.
    return run_exec(ExecArguments(command, db, reason, ttl, id_token_file))
