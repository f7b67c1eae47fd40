"""`guard exec [OPTIONS] [TARGET] -- CMD...` (issue 14): with a `--`, everything before the
first one is guard's, its options and at most one TARGET in any order, and everything after
it the program, verbatim; without one, the options, then the program from its first word on,
with `--db` (the older spelling) or the default target. Both parsers, click's and the
script's fast path (`cli.entry`), read it so; an unknown option, a second positional or a
target named twice, differently, is a usage error before any session opens; and the target
read is the one the broker is asked for."""

from __future__ import annotations

import json
import sys

import pytest

from guard.cli import http
from guard.cli.client import BrokerClient
from guard.cli.commands.exec import exec_command
from guard.cli.entry import EXEC_USAGE, exec_arguments, read_exec
from guard.cli.errors import EXIT_USAGE, CliError
from guard.cli.profile import Profile, save_profile
from tests.cli.invoke import guard, home  # noqa: F401

READINGS = [
    # (arguments after `guard exec`, target, program)
    (["demo", "--", "psql", "-c", "select 1"], "demo", ("psql", "-c", "select 1")),
    (["--", "true"], "demo", ("true",)),  # no target: the default
    (["--db", "prod", "--", "true"], "prod", ("true",)),
    (["--db=prod", "true"], "prod", ("true",)),  # no `--` at all
    (["./job.sh", "-v"], "demo", ("./job.sh", "-v")),  # no `--`: the program whole
    (["--db", "prod", "./job.sh", "-v", "--db", "x"], "prod", ("./job.sh", "-v", "--db", "x")),
    (["./job.sh", "--", "x"], "./job.sh", ("x",)),  # the broker refuses it: nothing runs
    (["prod", "--", "psql", "--", "-x"], "prod", ("psql", "--", "-x")),  # the first `--`
    (["demo", "--", "psql", "--", "x"], "demo", ("psql", "--", "x")),
    (["--db", "prod", "prod", "--", "true"], "prod", ("true",)),  # the same target twice
    (["--", "prod", "--", "true"], "demo", ("prod", "--", "true")),  # all after the first
    (["--", "--", "--", "true"], "demo", ("--", "--", "true")),
    (["--reason", "r", "--ttl", "1h", "prod", "--", "true"], "prod", ("true",)),
    (["demo", "--ttl", "10m", "--", "true"], "demo", ("true",)),  # options after TARGET
    (["--ttl", "10m", "demo", "--", "true"], "demo", ("true",)),
    (["prod", "--reason=r", "--db", "prod", "--", "true"], "prod", ("true",)),
]


@pytest.mark.parametrize(("words", "target", "program"), READINGS)
def test_click_reads_the_target_and_the_program(words, target, program):
    with exec_command.make_context("exec", list(words)) as ctx:
        assert (ctx.params["db"], ctx.params["command"]) == (target, program)


@pytest.mark.parametrize(("words", "target", "program"), READINGS)
def test_the_fast_path_reads_them_alike(words, target, program):
    fast = exec_arguments(["exec", *words], {})
    assert fast is not None  # each is an everyday command line: no click needed
    assert (fast.db, fast.command) == (target, program)


@pytest.mark.parametrize("parser", ["click", "fast path"])
def test_options_after_the_target_are_guards(parser):
    words = ["demo", "--ttl", "10m", "--reason", "r", "--", "true"]
    if parser == "click":
        with exec_command.make_context("exec", list(words)) as ctx:
            read = dict(ctx.params)
    else:
        fast = exec_arguments(["exec", *words], {})
        assert fast is not None
        read = fast.as_dict()
    assert read == {
        "command": ("true",),
        "db": "demo",
        "reason": "r",
        "ttl": 600,
        "id_token_file": None,
        "unmasked": False,
    }


def test_unmasked_is_left_to_click_and_read_there():
    # The fast path takes no flags: `--unmasked` goes to click, which reads it.
    words = ["demo", "--unmasked", "--reason", "case 7", "--", "true"]
    assert exec_arguments(["exec", *words], {}) is None
    with exec_command.make_context("exec", list(words)) as ctx:
        assert ctx.params["unmasked"] is True and ctx.params["db"] == "demo"


def _words(args: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """A stand-in parser of guard's words: `--db X` and positionals."""
    db = None
    if args[:1] == ["--db"]:
        db, args = args[1], args[2:]
    return db, tuple(args)


def test_the_rule():
    def read(*args: str) -> tuple[str, tuple[str, ...]]:
        return read_exec(args, lambda words, _interspersed: _words(words))

    assert read("prod", "--", "true") == ("prod", ("true",))
    assert read("--db", "prod", "prod", "--", "true") == ("prod", ("true",))
    assert read("--db", "prod", "true") == ("prod", ("true",))
    assert read("true", "-v") == ("demo", ("true", "-v"))
    assert read("--", "a", "b", "--", "c") == ("demo", ("a", "b", "--", "c"))
    with pytest.raises(CliError, match="two targets: 'prod' before `--` and --db 'demo'") as e:
        read("--db", "demo", "prod", "--", "true")
    assert e.value.exit_code == EXIT_USAGE
    with pytest.raises(CliError, match="guard exec takes one TARGET before `--`") as e:
        read("a", "b", "--", "true")
    assert e.value.exit_code == EXIT_USAGE


def test_options_may_follow_positionals_before_a_double_dash_only():
    seen: list[tuple[list[str], bool]] = []

    def parse(words: list[str], interspersed: bool) -> tuple[str | None, tuple[str, ...]]:
        seen.append((words, interspersed))
        return None, tuple(w for w in words if not w.startswith("-"))

    read_exec(["demo", "--ttl=1h", "--", "x", "--", "y"], parse)
    read_exec(["--ttl=1h", "./job.sh", "-v"], parse)
    assert seen == [(["demo", "--ttl=1h"], True), (["--ttl=1h", "./job.sh", "-v"], False)]


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "--db", "demo", "prod", "--", "true"],
        ["exec", "prod", "--db=demo", "--", "true"],
    ],
)
def test_two_different_targets_are_a_usage_error(home, guard, argv):  # noqa: F811
    outcome = guard(*argv)
    assert outcome.code == 2, outcome
    assert outcome.out == ""
    assert outcome.err.splitlines() == [
        "error: two targets: 'prod' before `--` and --db 'demo'",
        "hint: name it once: `guard exec prod -- CMD...` (--db is the older spelling)",
    ]


@pytest.mark.parametrize(
    "words",
    [
        ["a", "b", "--", "true"],
        ["python", "job.py", "--", "--flag"],  # the program goes after `--`
        ["--db", "prod", "demo", "x", "--", "true"],
    ],
)
def test_two_words_before_the_double_dash_are_a_usage_error(home, guard, words):  # noqa: F811
    outcome = guard("exec", *words)
    assert outcome.code == 2, outcome
    assert outcome.out == ""
    assert outcome.err.splitlines() == [
        "error: guard exec takes one TARGET before `--`",
        "hint: usage: guard exec [OPTIONS] [TARGET] -- CMD... (see `guard exec --help`)",
    ]


def test_a_target_without_a_program_is_the_commands_usage_error(home, guard):  # noqa: F811
    outcome = guard("exec", "demo", "--")
    assert outcome.code == 2, outcome
    assert outcome.err.splitlines()[0] == "error: no command given"


class TargetBroker:
    """Opens a session on "demo" only, as the broker refuses a target its policy lacks."""

    def __init__(self) -> None:
        self.asked: list[str] = []  # the targets of the sessions asked for
        self.ttls: list[int | None] = []  # and their `ttl_seconds`

    def __call__(self, request: http.Request) -> http.Response:
        if request.method == "POST" and request.url.path == "/v1/sessions":
            body = json.loads(request.content)
            target = body["target"]
            self.asked.append(target)
            self.ttls.append(body.get("ttl_seconds"))
            if target != "demo":
                message = f'guard: unknown target "{target}"'
                return http.Response(
                    403, json={"error": "forbidden", "message": message, "hint": None}
                )
            return http.Response(201, json=self._created())
        if request.method == "DELETE":
            return http.Response(204)
        return http.Response(404, json={"error": "not_found", "message": "no", "hint": None})

    @staticmethod
    def _created() -> dict:
        return {
            "session_id": "ses1",
            "gateway_host": "127.0.0.1",
            "gateway_port": 9,
            "gateway_tls": False,
            "database": "demo",
            "user": "guard_ses1",
            "password": "gateway-secret",
            "expires_at": "2999-01-01T00:00:00+00:00",
            "principal": "alice",
            "session_token": "gsc_session",
            "heartbeat_interval_seconds": 3600,
            "heartbeat_grace_seconds": 45,
        }


@pytest.fixture
def broker(home, monkeypatch) -> TargetBroker:  # noqa: F811
    monkeypatch.setenv("GUARD_ID_TOKEN", "header.alice.signature")
    save_profile(Profile(broker_url="http://broker.test", issuer="http://idp.test"))
    fake = TargetBroker()
    monkeypatch.setattr(BrokerClient, "transport", fake)
    return fake


def test_the_target_is_the_one_the_broker_is_asked_for(broker, guard):  # noqa: F811
    outcome = guard("exec", "demo", "--", sys.executable, "-c", "raise SystemExit(7)")
    assert outcome.code == 7, outcome
    assert "session ses1 on demo for" in outcome.err.splitlines()[0]
    assert broker.asked == ["demo"]


def test_a_program_taken_for_a_target_is_refused_and_nothing_runs(
    broker,
    guard,  # noqa: F811
    tmp_path,
):
    ran = tmp_path / "ran"
    child = f"open({str(ran)!r}, 'w').close()"
    outcome = guard("exec", "./job.sh", "--", sys.executable, "-c", child)
    assert broker.asked == ["./job.sh"]
    assert outcome.code == 1, outcome
    assert outcome.err.splitlines()[0] == 'error: guard: unknown target "./job.sh"'
    assert not ran.exists()


def test_options_after_the_target_reach_the_broker(broker, guard):  # noqa: F811
    outcome = guard("exec", "demo", "--ttl", "10m", "--", sys.executable, "-c", "exit(7)")
    assert outcome.code == 7, outcome
    assert (broker.asked, broker.ttls) == (["demo"], [600])


@pytest.mark.parametrize(
    ("words", "error"),
    [
        (["demo", "--bogus", "--", "true"], "error: no such option '--bogus'"),
        (["demo", "--db", "nosuch", "--", "true"], "error: two targets: 'demo' before `--`"),
        (["a", "b", "--", "true"], "error: guard exec takes one TARGET before `--`"),
        (["demo", "--ttl", "soon", "--", "true"], "error: invalid value for '--ttl'"),
    ],
)
def test_a_usage_error_before_the_double_dash_opens_no_session(broker, guard, words, error):  # noqa: F811
    outcome = guard("exec", *words)
    assert outcome.code == 2, outcome
    assert outcome.err.startswith(error)
    assert len(outcome.err.splitlines()) == 2  # error, hint
    assert broker.asked == []


def test_the_program_after_the_first_double_dash_is_run_verbatim(broker, guard):  # noqa: F811
    child = "import sys; sys.exit(0 if sys.argv[1:] == ['--', 'x', '--db'] else 9)"
    outcome = guard("exec", "demo", "--", sys.executable, "-c", child, "--", "x", "--db")
    assert outcome.code == 0, outcome
    assert broker.asked == ["demo"]


ARGS_ARE_V = "import sys; sys.exit(5 if sys.argv[1:] == ['-v', '--db', 'x'] else 9)"


@pytest.mark.parametrize(
    "words",
    [
        ["--", sys.executable, "-c", "exit(5)"],  # no target: the default
        [sys.executable, "-c", "exit(5)"],  # no `--`: the program from its first word on
        ["--db", "demo", sys.executable, "-c", ARGS_ARE_V, "-v", "--db", "x"],  # its options
    ],
    ids=["double-dash", "no-double-dash", "no-double-dash-program-options"],
)
def test_without_a_target_the_default_is_asked_for(broker, guard, words):  # noqa: F811
    outcome = guard("exec", *words)
    assert outcome.code == 5, outcome
    assert broker.asked == ["demo"]


def test_the_usage_hints_show_the_usage_help_shows(home, guard):  # noqa: F811
    outcome = guard("exec", "--help")
    assert outcome.code == 0, outcome
    assert outcome.out.splitlines()[0] == f"Usage: {EXEC_USAGE}"
