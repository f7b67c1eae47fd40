"""The `guard` script's fast path for `guard exec` (`cli.entry`): for every command line it
takes, click would have parsed the same parameters; whatever it does not take reaches
click; it runs without importing click; and the duration reader it shares with click
reads what the old regular expression read. (`test_exec_target.py`: what `TARGET -- CMD`
means.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guard.cli.commands.exec import exec_command
from guard.cli.entry import duration_seconds, exec_arguments

TOKEN_FILE = Path(__file__)  # exists, a file, readable
# Options, their values, programs and targets; "--" twice, so that `TARGET -- CMD`, options
# after TARGET (`demo --ttl 10m -- true`) and a program's own `--` come up often.
WORDS = [
    "--db", "--db=", "--db=prod", "--reason", "--reason=a=b", "--ttl", "--ttl=15m",
    "--ttl=soon", "--id-token-file", f"--id-token-file={TOKEN_FILE}", str(TOKEN_FILE),
    str(TOKEN_FILE.parent), "/nonexistent", "--", "-", "-v", "--help", "-h", "--dbx",
    "--TTL", "--print-env", "prod", "1h", " 2 d ", "0", "x y", "", "psql", "-c",
    "select 1", "--db=--reason", "demo", "--db=demo", "./job.sh", "--", "10m", "--bogus",
]  # fmt: skip


def click_parameters(argv: list[str]) -> dict[str, object]:
    """What the click command parses from `guard exec ARGV...` (raises on a usage error)."""
    with exec_command.make_context("exec", list(argv[1:])) as ctx:
        return dict(ctx.params)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=8))
@example(["--db", "prod", "--", "psql", "-c", "select 1"])
@example(["--ttl=15m", "--reason", "x y", "psql", "--", "-v"])
@example(["--id-token-file", str(TOKEN_FILE), "--", "--help"])
@example(["demo", "--", "psql", "-c", "select 1"])  # TARGET -- CMD
@example(["demo", "--ttl", "10m", "--", "true"])  # options after TARGET
@example(["--ttl=15m", "demo", "--reason", "x y", "--", "psql", "--", "-v"])
@example(["demo", "--bogus", "--", "true"])  # click's usage error
@example(["demo", "prod", "--", "true"])  # two positionals before `--`: a usage error
@example(["--db=demo", "demo", "--", "psql"])  # the same target twice
@example(["--", "prod", "--", "psql"])  # everything after the first `--` is the program
@example(["--", "--", "--", "psql"])
@example(["./job.sh", "-v", "--db", "prod"])  # no `--`: the program from its first word on
@example(["python", "-c", "--", "-v"])  # `-c` before `--` is no option of guard's
def test_what_the_fast_path_takes_click_parses_the_same(words):
    argv = ["exec", *words]
    fast = exec_arguments(argv, {})
    if fast is None:
        return  # click's to parse (or to refuse)
    assert click_parameters(argv) == fast.as_dict()


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "--help"],
        ["exec", "--db"],  # no value
        ["exec", "--db", "a", "--db", "b", "true"],  # repeated: click's rule, not ours
        ["exec", "--ttl", "soon", "true"],  # click reports the bad duration
        ["exec", "--id-token-file", "/nonexistent", "true"],
        ["exec", "--id-token-file", "/", "true"],  # a directory
        ["exec", "--bogus", "true"],
        ["exec", "--db", "--reason", "x", "true"],
        ["exec", "--"],  # no program: the command's own error
        ["exec", "demo", "--"],  # a target, no program
        ["exec", "--db", "prod", "demo", "--", "true"],  # two targets: click's usage error
        ["exec", "demo", "--db", "prod", "--", "true"],
        ["exec", "a", "b", "--", "true"],  # two positionals before `--`
        ["exec", "demo", "--bogus", "--", "true"],
        ["exec", "python", "job.py", "--", "--flag"],  # the older reading: now two words
        ["connect", "demo"],
        ["--version"],
        [],
    ],
)
def test_anything_else_goes_to_click(argv):
    assert exec_arguments(argv, {}) is None


def test_shell_completion_goes_to_click():
    argv = ["exec", "--", "true"]
    assert exec_arguments(argv, {}) is not None
    assert exec_arguments(argv, {"_GUARD_COMPLETE": "bash_complete"}) is None


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")  # what `--ttl` read before


@given(st.text(alphabet=st.sampled_from("0123456789٣ smhdx\t\n\u2003-+."), max_size=8))
@example("15m")
@example(" 2 d ")
@example("٣h")  # a decimal digit that is not ASCII: `\d` and `int` take it
@example("5\n")
def test_durations_read_as_the_old_pattern_read_them(text):
    match = _DURATION.match(text)
    expected = None
    if match:
        expected = (
            int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]
        )
    assert duration_seconds(text) == expected


def _script(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The `guard` script's entry with ARGS in a fresh interpreter; its stderr ends with
    whether click was imported."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('click loaded:', 'click' in sys.modules, file=sys.stderr))\n"
        "from guard.cli.entry import main\n"
        f"sys.argv = ['guard', *{list(args)!r}]\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")}
    env["GUARD_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_fast_path_runs_without_click_and_fails_in_one_line(tmp_path):
    ran = _script(tmp_path, "exec", "--db", "demo", "--", "true")
    assert ran.returncode == 1
    assert ran.stderr.splitlines() == [
        "error: guard is not configured: no broker URL / issuer",
        "hint: run `guard dev up` for the local demo, or set GUARD_BROKER_URL and GUARD_ISSUER",
        "click loaded: False",
    ]
    usage = _script(tmp_path, "exec", "--bogus", "true")
    assert usage.returncode == 2
    assert usage.stderr.splitlines()[0] == "error: no such option '--bogus'"
    assert usage.stderr.splitlines()[-1] == "click loaded: True"


@pytest.mark.parametrize(
    "words",
    [
        ["demo", "--", "true"],
        ["--db", "demo", "--", "true"],
        ["demo", "--ttl", "10m", "--", "true"],
        ["--ttl=10m", "demo", "--reason", "r", "--", "true"],
    ],
)
def test_the_target_form_stays_on_the_fast_path(tmp_path, words):
    ran = _script(tmp_path, "exec", *words)
    assert ran.returncode == 1
    assert ran.stderr.splitlines()[0] == "error: guard is not configured: no broker URL / issuer"
    assert ran.stderr.splitlines()[-1] == "click loaded: False"


@given(st.from_regex(r"\A[1-9][0-9]{0,5}[smhd]\Z"))
def test_every_duration_a_policy_accepts_ttl_accepts_alike(text):
    """`--ttl` reads whatever `session_ttl` may say (issue 14), to the same seconds."""
    from guard.broker.policy.schema import duration_seconds as policy_seconds

    assert duration_seconds(text) == policy_seconds(text)
