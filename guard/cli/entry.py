"""The `guard` program's entry point: `guard exec`'s everyday command lines run without
loading click; every other command line goes to the click application (`cli.main`).

Why: `guard exec` is how CI jobs and scripts reach a database, once per job step, so its
start-up is paid on every run (issue 13: session start and end ≤ 150 ms). Importing click
brings `inspect`, `typing`, `enum`, `uuid`, `gettext` and more: about 40% of the
instructions the whole command executed. The fast path takes only command lines it
understands completely: `exec`, then `--db`, `--reason`, `--ttl`, `--id-token-file` (each at
most once, `--opt value` or `--opt=value`, a value that is neither empty nor starts with
`-`), then the command (after `--`, or from the first argument that is not an option), which
`split_target` reads as click's command does: `TARGET -- PROGRAM...` or the program alone.
Anything else, `--help`, a mistake, shell completion, goes to click, which owns help, usage
errors and their hints; `tests/cli/test_entry.py` holds the two parsers to the same result
for every command line the fast one takes.

Imports only the standard library and the CLI's session-path modules, when they run.
"""

from __future__ import annotations

import os
import stat
import sys

from guard.cli.errors import EXIT_USAGE, CliError, outcome
from guard.cli.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

# `guard exec`'s options that take a value, by the name of the click parameter.
_EXEC_OPTIONS = {"--db": "db", "--reason": "reason", "--ttl": "ttl", "--id-token-file": "file"}
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_TARGET = "demo"  # `guard exec`'s target when the command line names none


class ExecArguments(Record):
    """A `guard exec` command line, as the click command's parameters."""

    command: tuple[str, ...]  # the program and its arguments
    db: str = DEFAULT_TARGET  # the policy target, however the command line named it
    reason: str = ""
    ttl: int | None = None
    id_token_file: Path | None = None


def duration_seconds(text: str) -> int | None:
    """'90s', '15m', '1h', '2d' or plain seconds → seconds; None when `text` is none of
    these. (Without `re`: importing it costs every `guard exec` ~2 ms here.)"""
    body = text.strip()
    unit = body[-1:] if body[-1:] in _UNIT_SECONDS else ""
    number = body[: len(body) - len(unit)].rstrip()
    if not number.isdecimal():  # the digits `\d` matches, as `int` reads them
        return None
    return int(number) * _UNIT_SECONDS.get(unit, 1)


def split_target(command: tuple[str, ...], db: str | None) -> tuple[str, tuple[str, ...]]:
    """`guard exec`'s policy target and program, from its `command` as click leaves it (a
    leading `--` taken, everything from the first positional on verbatim) and `--db`'s value
    (None when not given). Exactly one argument before the first `--` of `command` is the
    TARGET and the program follows that `--` (`demo -- psql -c 'select 1'`); any other
    `command` is the program whole (`python job.py -- --flag`), the target `--db`'s or the
    default. Both parsers of the command line call this, so they cannot read it apart.
    Raises CliError (usage) when TARGET and `--db` name different targets."""
    if len(command) >= 2 and command[1] == "--" and command[0] != "--":
        target = command[0]
        if db is not None and db != target:
            raise CliError(
                f"two targets: {target!r} before `--` and --db {db!r}",
                hint=f"name it once: `guard exec {target} -- CMD...` (--db is the older spelling)",
                exit_code=EXIT_USAGE,
            )
        return target, command[2:]
    return (DEFAULT_TARGET if db is None else db), command


def exec_arguments(argv: Sequence[str], environ: Mapping[str, str]) -> ExecArguments | None:
    """`argv` (the program's arguments) as a `guard exec` command line the fast path runs;
    None for any other, which click parses."""
    if not argv or argv[0] != "exec" or "_GUARD_COMPLETE" in environ:
        return None
    options = _options(argv)
    if options is None:
        return None
    values, command = options
    try:
        target, program = split_target(command, values.get("db"))
    except CliError:
        return None  # two targets: click reports the usage error
    ttl = duration_seconds(values["ttl"]) if "ttl" in values else None
    if not program or ("ttl" in values and ttl is None):
        return None
    token_file = values.get("file")
    if token_file is not None and not _readable_file(token_file):
        return None
    from pathlib import Path

    return ExecArguments(
        program,
        db=target,
        reason=values.get("reason", ""),
        ttl=ttl,
        id_token_file=None if token_file is None else Path(token_file),
    )


def _options(argv: Sequence[str]) -> tuple[dict[str, str], tuple[str, ...]] | None:
    """`exec`'s option values by parameter name, and the command as click leaves it (see
    `split_target`); None when an argument is not one the fast path takes."""
    values: dict[str, str] = {}
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-"):
            break  # the program: the rest is its own (`guard exec ./job.sh -v`)
        name, equals, value = arg.partition("=")
        if name not in _EXEC_OPTIONS or _EXEC_OPTIONS[name] in values:
            return None
        if not equals:
            if i + 1 == len(argv):
                return None
            i += 1
            value = argv[i]
        if not value or value.startswith("-"):
            return None  # `--db --reason x`: click decides what that means
        values[_EXEC_OPTIONS[name]] = value
        i += 1
    return values, tuple(argv[i:])


def _readable_file(path: str) -> bool:
    """What click's `Path(exists=True, dir_okay=False)` accepts."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISDIR(mode) and os.access(path, os.R_OK)


def run_exec(arguments: ExecArguments) -> int:
    """Run `guard exec`: open a session, run the program with PG* and DATABASE_URL for it,
    end the session; the program's exit status. (The click command runs this too.)"""
    if not arguments.command:
        raise CliError(
            "no command given", hint="guard exec demo -- python job.py", exit_code=EXIT_USAGE
        )
    from guard.cli.auth import current_id_token
    from guard.cli.profile import load_profile
    from guard.cli.runner import run_in_session

    profile = load_profile()
    token = current_id_token(profile, id_token_file=arguments.id_token_file)
    return run_in_session(
        broker_url=profile.broker_url,
        token=token,
        target=arguments.db,
        reason=arguments.reason,
        ttl_seconds=arguments.ttl,
        argv=list(arguments.command),
        gateway_ca_file=profile.gateway_ca_file,
    )


def main() -> None:
    """The `guard` script."""
    argv = sys.argv[1:]
    arguments = exec_arguments(argv, os.environ)
    if arguments is None:
        from guard.cli.main import main as click_main

        sys.exit(click_main(argv))
    try:
        code = run_exec(arguments)
    except (CliError, KeyboardInterrupt) as exc:
        code = outcome(exc)
    sys.exit(code)
