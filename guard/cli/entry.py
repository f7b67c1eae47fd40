"""The `guard` program's entry point: `guard exec`'s everyday command lines run without
loading click; every other command line goes to the click application (`cli.main`).

Why: `guard exec` is how CI jobs and scripts reach a database, once per job step, so its
start-up is paid on every run (issue 13: session start and end ≤ 150 ms). Importing click
brings `inspect`, `typing`, `enum`, `uuid`, `gettext` and more: about 40% of the
instructions the whole command executed. The fast path takes only command lines it
understands completely: `exec`, `--db`, `--reason`, `--ttl`, `--id-token-file` (each at most
once, `--opt value` or `--opt=value`, a value that is neither empty nor starts with `-`), and
the words `read_exec` splits as click's command does: before a `--`, the options and at most
one TARGET in any order, the program after it; without one, the options, then the program
from the first argument that is not an option. Anything else, `--help`, a mistake, shell
completion, goes to click, which owns help, usage errors and their hints;
`tests/cli/test_entry.py` holds the two parsers to the same result for every command line
the fast one takes.

Imports only the standard library and the CLI's session-path modules, when they run.
"""

from __future__ import annotations

import os
import stat
import sys

from guard.cli.errors import EXIT_USAGE, CliError, outcome
from guard.cli.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

    # Parses guard's own words of a `guard exec` command line: (the words, whether options
    # may follow positionals) → (`--db`'s value, None when not given; the positionals).
    OptionParser = Callable[[list[str], bool], tuple[str | None, tuple[str, ...]]]

# `guard exec`'s options that take a value, by the name of the click parameter.
_EXEC_OPTIONS = {"--db": "db", "--reason": "reason", "--ttl": "ttl", "--id-token-file": "file"}
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_TARGET = "demo"  # `guard exec`'s target when the command line names none
EXEC_USAGE = "guard exec [OPTIONS] [TARGET] -- CMD..."


class ExecArguments(Record):
    """A `guard exec` command line, as the click command's parameters."""

    command: tuple[str, ...]  # the program and its arguments
    db: str = DEFAULT_TARGET  # the policy target, however the command line named it
    reason: str = ""
    ttl: int | None = None
    id_token_file: Path | None = None
    unmasked: bool = False


def duration_seconds(text: str) -> int | None:
    """'90s', '15m', '1h', '2d' or plain seconds → seconds; None when `text` is none of
    these. (Without `re`: importing it costs every `guard exec` ~2 ms here.)"""
    body = text.strip()
    unit = body[-1:] if body[-1:] in _UNIT_SECONDS else ""
    number = body[: len(body) - len(unit)].rstrip()
    if not number.isdecimal():  # the digits `\d` matches, as `int` reads them
        return None
    return int(number) * _UNIT_SECONDS.get(unit, 1)


def read_exec(args: Sequence[str], parse: OptionParser) -> tuple[str, tuple[str, ...]]:
    """`guard exec`'s policy target and program from its arguments `args` (after `exec`),
    guard's own words parsed by `parse`: the rule, for click's command (`ExecCommand`) and
    the fast path alike, so they cannot read a command line apart.

    With a `--`, everything before the first one is guard's: options in any order and at
    most one TARGET among them (`demo --ttl 10m -- psql`); everything after it is the
    program, verbatim, its own `--` too. Without one, options come first and the program
    is everything from the first positional on (`./job.sh -v`, as with env(1)). The target
    is TARGET, else `--db`'s (the older spelling), else the default. Raises CliError (usage)
    for two positionals before `--`, or TARGET and `--db` naming different targets."""
    if "--" not in args:
        db, command = parse(list(args), False)
        return (DEFAULT_TARGET if db is None else db), command
    split = list(args).index("--")
    db, words = parse(list(args[:split]), True)
    program = tuple(args[split + 1 :])
    if len(words) > 1:
        raise CliError(
            "guard exec takes one TARGET before `--`",
            hint=f"usage: {EXEC_USAGE} (see `guard exec --help`)",
            exit_code=EXIT_USAGE,
        )
    if not words:
        return (DEFAULT_TARGET if db is None else db), program
    target = words[0]
    if db is not None and db != target:
        raise CliError(
            f"two targets: {target!r} before `--` and --db {db!r}",
            hint=f"name it once: `guard exec {target} -- CMD...` (--db is the older spelling)",
            exit_code=EXIT_USAGE,
        )
    return target, program


def exec_arguments(argv: Sequence[str], environ: Mapping[str, str]) -> ExecArguments | None:
    """`argv` (the program's arguments) as a `guard exec` command line the fast path runs;
    None for any other, which click parses."""
    if not argv or argv[0] != "exec" or "_GUARD_COMPLETE" in environ:
        return None
    values: dict[str, str] = {}

    def parse(words: list[str], interspersed: bool) -> tuple[str | None, tuple[str, ...]]:
        positionals = _options(words, interspersed, values)
        return values.get("db"), positionals

    try:
        target, program = read_exec(argv[1:], parse)
    except (_NotTaken, CliError):
        return None  # click parses it, and reports the usage error
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


class _NotTaken(Exception):
    """A command line the fast path leaves to click."""


def _options(words: list[str], interspersed: bool, values: dict[str, str]) -> tuple[str, ...]:
    """Reads `exec`'s options in `words` (none of them `--`) into `values`, by parameter
    name; the positionals, as click's parser leaves them: every one when `interspersed`,
    else everything from the first on (the program: `guard exec ./job.sh -v`). Raises
    _NotTaken when a word is not one the fast path takes."""
    positionals: list[str] = []
    i = 0
    while i < len(words):
        arg = words[i]
        if not arg.startswith("-"):
            if not interspersed:
                return tuple(words[i:])
            positionals.append(arg)
            i += 1
            continue
        name, equals, value = arg.partition("=")
        if name not in _EXEC_OPTIONS or _EXEC_OPTIONS[name] in values:
            raise _NotTaken
        if not equals:
            if i + 1 == len(words):
                raise _NotTaken
            i += 1
            value = words[i]
        if not value or value.startswith("-"):
            raise _NotTaken  # `--db --reason x`: click decides what that means
        values[_EXEC_OPTIONS[name]] = value
        i += 1
    return tuple(positionals)


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
    from guard.cli.auth import current_id_token, token_source
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
        fresh_token=lambda: current_id_token(profile, id_token_file=arguments.id_token_file),
        auto_extend=True,  # while the program runs, when the target's policy allows
        token_from=token_source(arguments.id_token_file, profile),
        unmasked=arguments.unmasked,
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
