"""Usage errors: every command line a user can get wrong ends in one `error:` line, one
`hint:` line and exit 2 — never a traceback — through CliRunner and `main()` alike."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

import click
import pytest

from guard.cli.errors import CliError
from guard.cli.main import COMMANDS, app
from guard.cli.options import duration, http_url
from guard.cli.usage import GuardCommand, GuardGroup, exit_code
from tests.cli.invoke import Outcome, guard, home  # noqa: F401

# Per command: (missing, unknown, malformed) argument. `None` for "missing" only where the
# command has nothing that can be missing (checked below).
CASES: dict[str, tuple[list[str] | None, list[str], list[str]]] = {
    "login": (["login", "--issuer"], ["login", "--bogus"], ["login", "--issuer", "idp.example"]),
    "logout": (None, ["logout", "--bogus"], ["logout", "--help=yes"]),
    "connect": (["connect"], ["connect", "demo", "-X"], ["connect", "demo", "--ttl", "soon"]),
    "exec": (
        ["exec", "--db"],
        ["exec", "--bogus", "--", "true"],
        ["exec", "--ttl", "5x", "--", "true"],
    ),
    "proxy": (["proxy"], ["proxy", "demo", "--bogus"], ["proxy", "demo", "--port", "http"]),
    "approve": (
        ["approve", "--comment"],
        ["approve", "--bogus"],
        ["approve", "--watch=yes"],
    ),
    "deny": (
        ["deny", "apr-1"],
        ["deny", "apr-1", "--reason", "no", "--bogus"],
        ["deny", "apr-1", "--reason", "no", "--json=1"],
    ),
    "requests": (None, ["requests", "--bogus"], ["requests", "--json=yes"]),
    "status": (None, ["status", "--bogus"], ["status", "--json=yes"]),
    "targets": (None, ["targets", "--bogus"], ["targets", "--json=1"]),
    "sessions": (None, ["sessions", "--bogus"], ["sessions", "--all=yes"]),
    "end": (["end"], ["end", "s1", "--bogus"], ["end", "s1", "s2"]),
    "extend": (["extend"], ["extend", "s1", "--bogus"], ["extend", "s1", "--ttl", "soon"]),
    "revoke": (
        ["revoke", "--user", "bob"],  # no --reason
        ["revoke", "--user", "bob", "--reason", "x", "--bogus"],
        ["revoke", "--reason", "x"],  # nothing named to revoke
    ),
    "policy check": (
        ["policy", "check", "p.yaml", "--target"],
        ["policy", "check", "--bogus"],
        ["policy", "check", "/"],
    ),
    "policy explain": (
        ["policy", "explain", "--as", "alice", "SELECT 1"],
        ["policy", "explain", "--as", "alice", "--db", "demo", "SELECT 1", "--bogus"],
        ["policy", "explain", "--policy", "/", "--as", "alice", "--db", "demo", "SELECT 1"],
    ),
    "audit verify": (
        ["audit", "verify", "--pubkey"],
        ["audit", "verify", "--bogus"],
        ["audit", "verify", "--grace", "soon"],
    ),
    "audit pubkey": (
        ["audit", "pubkey", "--log"],
        ["audit", "pubkey", "--bogus"],
        ["audit", "pubkey", "--help=1"],
    ),
    "target check": (
        ["target", "check"],
        ["target", "check", "demo", "--bogus"],
        ["target", "check", "demo", "--json=1"],
    ),
    "target plan": (
        ["target", "plan"],
        ["target", "plan", "demo", "--bogus"],
        ["target", "plan", "a", "b"],
    ),
    "target apply": (
        ["target", "apply"],
        ["target", "apply", "demo", "-x"],
        ["target", "apply", "demo", "--json=y"],
    ),
    "dev up": (["dev", "up", "--policy"], ["dev", "up", "--bogus"], ["dev", "up", "--detach=1"]),
    "dev down": (None, ["dev", "down", "extra"], ["dev", "down", "--help=yes"]),
    "dev status": (None, ["dev", "status", "--bogus"], ["dev", "status", "--json=yes"]),
    "dev login": (
        ["dev", "login"],
        ["dev", "login", "al", "--bogus"],
        ["dev", "login", "--help=1"],
    ),
    "dev token": (
        ["dev", "token"],
        ["dev", "token", "ci", "--bogus"],
        ["dev", "token", "--help=1"],
    ),
}

GROUP_CASES = [
    pytest.param([], id="no-command"),
    pytest.param(["dev"], id="dev-no-command"),
    pytest.param(["policy"], id="policy-no-command"),
    pytest.param(["target"], id="target-no-command"),
    pytest.param(["conect", "demo"], id="unknown-command"),
    pytest.param(["dev", "stauts"], id="unknown-dev-command"),
    pytest.param(["--bogus"], id="unknown-option"),
    pytest.param(["--version=1"], id="malformed-option"),
]


def leaves(command=None, path: str = "") -> dict[str, object]:
    """Every runnable command of the app, by its path ("dev status")."""
    command = command or app
    if not isinstance(command, click.Group):
        return {path: command}
    ctx = click.Context(command)
    found: dict[str, object] = {}
    for name in command.list_commands(ctx):  # imports lazily registered commands
        found.update(leaves(command.get_command(ctx, name), f"{path} {name}".strip()))
    return found


def usage_cases():
    for path, (missing, unknown, malformed) in CASES.items():
        for kind, argv in (("missing", missing), ("unknown", unknown), ("malformed", malformed)):
            if argv is not None:
                yield pytest.param(argv, id=f"{path.replace(' ', '-')}-{kind}")


def assert_usage_error(outcome) -> None:
    assert "Traceback" not in outcome.out + outcome.err
    assert outcome.code == 2, outcome
    assert outcome.out == ""
    lines = outcome.err.splitlines()
    assert len(lines) == 2, outcome.err
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ")


def test_every_command_is_registered_and_has_usage_cases():
    commands = leaves()
    assert set(commands) == set(CASES)
    for path, command in commands.items():
        assert isinstance(command, GuardCommand), path  # so its usage errors name it
        if CASES[path][0] is None:  # nothing can be missing: no argument, no valued option
            valued = [
                p
                for p in command.params
                if p.required or (p.param_type_name == "option" and not p.is_flag)
            ]
            assert not valued, path
    assert isinstance(app, GuardGroup)


def test_help_lists_every_command(guard):  # noqa: F811
    outcome = guard("--help")
    assert outcome.code == 0
    for name in (
        "login logout status targets connect exec sessions extend end approve deny requests"
        " revoke"
        " policy target dev"
    ).split():
        assert name in outcome.out


@pytest.mark.parametrize("argv", [*usage_cases(), *GROUP_CASES])
def test_usage_errors_are_one_line_with_a_hint_and_exit_2(home, guard, argv):  # noqa: F811
    assert_usage_error(guard(*argv))


@pytest.mark.parametrize(
    ("argv", "error", "hint"),
    [
        ([], "error: missing command", "`guard` takes one of: login, logout, status, targets"),
        (["conect", "demo"], "unknown command 'conect' for `guard`", "`guard connect`?"),
        (["pubkey"], "unknown command 'pubkey'", "did you mean `guard audit pubkey`?"),
        (["check"], "unknown command 'check'", "did you mean `guard policy check`?"),
        (["frobnicate"], "unknown command", "`guard` takes one of: login,"),
        (["connect"], "error: missing argument 'TARGET'", "usage: guard connect [OPTIONS]"),
        (["exec", "--db"], "option '--db' requires an argument", "usage: guard exec [OPTIONS]"),
        (["dev", "up", "--policy"], "'--policy' requires an argument", "usage: guard dev up"),
        (["connect", "demo", "--ttl", "soon"], "'soon' is not a duration", "guard connect"),
        (["login", "--issuer", "idp.example"], "'idp.example' is not an http(s) URL", "login"),
        (["connect", "demo", "-X"], "no such option '-X'", "[-- PSQL_ARGS]"),
        (["deny", "apr-1"], "missing option '--reason'", "usage: guard deny [OPTIONS] ID"),
        (["aprove"], "unknown command 'aprove'", "did you mean `guard approve`?"),
        (["request"], "unknown command 'request'", "did you mean `guard requests`?"),
        (["policy", "explain", "SELECT 1"], "missing option '--db'", "guard policy explain"),
        (["explain"], "unknown command 'explain'", "did you mean `guard policy explain`?"),
    ],
)
def test_usage_errors_say_what_is_wrong_and_what_to_type(home, guard, argv, error, hint):  # noqa: F811
    outcome = guard(*argv)
    assert_usage_error(outcome)
    first, second = outcome.err.splitlines()
    assert error in first
    assert hint in second


def test_command_usage_error_from_the_command_itself(home, guard):  # noqa: F811
    outcome = guard("exec", "--db", "demo")
    assert_usage_error(outcome)
    assert "no command given" in outcome.err


def test_version_prints_the_installed_version(guard):  # noqa: F811
    outcome = guard("--version")
    assert outcome.code == 0
    assert outcome.out == f"guard {version('guard')}\n"
    assert outcome.err == ""


def test_the_program_itself_prints_no_traceback(home):  # noqa: F811
    for argv in ([], ["conect", "demo"], ["exec", "--db"], ["pubkey"]):
        run = subprocess.run(
            [sys.executable, "-m", "guard.cli.main", *argv], capture_output=True, text=True
        )
        assert_usage_error(Outcome(run.returncode, run.stdout, run.stderr))


HEAVY = (
    "typer",
    "rich",
    "httpx",
    "pydantic",
    "jwt",
    "keyring",
    "asyncio",
    "webbrowser",
    "ssl",  # only a command that talks to the broker or the IdP needs TLS
    "guard.cli.auth",
    "guard.cli.client",
    "guard.cli.runner",
)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(None, id="import"),
        pytest.param(["--help"], id="help"),
        pytest.param(["dev", "status", "--help"], id="sub-command-help"),
        pytest.param(["--version"], id="version"),
        pytest.param(["exec", "--db"], id="usage-error"),
    ],
)
def test_starting_the_cli_loads_no_heavy_module(home, argv):  # noqa: F811
    # Command modules are imported when looked up; what they need when they run, so
    # start-up, help, --version and usage errors pay only for click.
    code = (
        "import contextlib, io, sys, guard.cli.main\n"
        f"if {argv!r} is not None:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        f"        guard.cli.main.main({argv!r})\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_running_a_command_imports_its_module_only(home):  # noqa: F811
    """`guard exec` (here stopped by a usage error) pays for its own command module, not
    for the other ten; `guard --help` still lists them all, in their order."""
    code = (
        "import contextlib, io, sys, guard.cli.main\n"
        "with contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "    guard.cli.main.main(['exec', '--db'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('guard.cli.commands.')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "['guard.cli.commands.exec']"
    listed = subprocess.run(
        [sys.executable, "-m", "guard.cli.main", "--help"], capture_output=True, text=True
    ).stdout
    commands = listed.split("Commands:")[1].splitlines()
    names = [line.split()[0] for line in commands if line.startswith("  ") and line[2] != " "]
    assert names == list(COMMANDS)


def test_shell_completion_comes_with_click(home):  # noqa: F811
    env = {**os.environ, "_GUARD_COMPLETE": "bash_complete", "COMP_WORDS": "guard dev s"}
    run = subprocess.run(
        [sys.executable, "-m", "guard.cli.main"],
        env={**env, "COMP_CWORD": "2"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["plain,status"]


# click's exceptions, through the one mapping ------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (click.exceptions.Exit(4), 4),
        (click.exceptions.Abort(), 130),
        (KeyboardInterrupt(), 130),
        (click.UsageError("Bad thing."), 2),
        (click.BadParameter("bad value"), 2),
        (click.ClickException("Went wrong."), 1),
        (CliError("no luck", hint="try again"), 1),
    ],
)
def test_exit_code_maps_click_outcomes(exc, code, capsys):
    assert exit_code(exc) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code in (1, 2):
        assert err.startswith("error: ") and err.count("\n") in (1, 2)


def test_usage_error_without_a_command_is_one_line(capsys):
    assert exit_code(click.UsageError("No such thing.\nmore detail")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: no such thing",
        "hint: see `guard --help`",
    ]


def test_a_bug_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="bug"):
        exit_code(RuntimeError("bug"))


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800), (" 42 ", 42)]
)
def test_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1w", "-5m", "", "1h30m"])
def test_bad_durations_are_bad_parameters(text):
    with pytest.raises(click.BadParameter):
        duration(text)


@pytest.mark.parametrize("text", ["idp.example", "ftp://idp.example", "https://", "http:/x"])
def test_issuer_must_be_an_http_url(text):
    assert http_url("https://idp.example/realms/x") == "https://idp.example/realms/x"
    with pytest.raises(click.BadParameter):
        http_url(text)
