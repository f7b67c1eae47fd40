"""`guard exec [TARGET] -- CMD...` (issue 14): exactly one word before the first `--` that
click leaves in the command is the target; any other command line is the program whole,
with `--db` (the older spelling) or the default target. Both parsers, click's and the
script's fast path (`cli.entry`), read it so; a target named twice, differently, is a
usage error; and the target read is the one the broker is asked for."""

from __future__ import annotations

import json
import sys

import pytest

from guard.cli import http
from guard.cli.client import BrokerClient
from guard.cli.commands.exec import exec_command
from guard.cli.entry import exec_arguments, split_target
from guard.cli.errors import EXIT_USAGE, CliError
from guard.cli.profile import Profile, save_profile
from tests.cli.invoke import guard, home  # noqa: F401

READINGS = [
    # (arguments after `guard exec`, target, program)
    (["demo", "--", "psql", "-c", "select 1"], "demo", ("psql", "-c", "select 1")),
    (["--", "true"], "demo", ("true",)),  # no target: the default
    (["--db", "prod", "--", "true"], "prod", ("true",)),
    (["--db=prod", "true"], "prod", ("true",)),  # no `--` at all
    (["python", "job.py", "--", "--flag"], "demo", ("python", "job.py", "--", "--flag")),
    (["--db", "prod", "python", "job.py", "--", "x"], "prod", ("python", "job.py", "--", "x")),
    (["./job.sh", "--", "x"], "./job.sh", ("x",)),  # the broker refuses it: nothing runs
    (["prod", "--", "psql", "--", "-x"], "prod", ("psql", "--", "-x")),  # the first `--`
    (["--db", "prod", "prod", "--", "true"], "prod", ("true",)),  # the same target twice
    (["--", "prod", "--", "true"], "prod", ("true",)),  # click takes the leading `--`
    (["--", "--", "--", "true"], "demo", ("--", "--", "true")),  # nothing before the `--`
    (["--reason", "r", "--ttl", "1h", "prod", "--", "true"], "prod", ("true",)),
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


def test_only_a_second_target_is_refused():
    assert split_target(("prod", "--", "true"), None) == ("prod", ("true",))
    assert split_target(("prod", "--", "true"), "prod") == ("prod", ("true",))
    assert split_target(("true",), "prod") == ("prod", ("true",))
    with pytest.raises(CliError, match="two targets: 'prod' before `--` and --db 'demo'") as e:
        split_target(("prod", "--", "true"), "demo")
    assert e.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "--db", "demo", "prod", "--", "true"],
        ["exec", "--db=demo", "--", "prod", "--", "true"],
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


def test_a_target_without_a_program_is_the_commands_usage_error(home, guard):  # noqa: F811
    outcome = guard("exec", "demo", "--")
    assert outcome.code == 2, outcome
    assert outcome.err.splitlines()[0] == "error: no command given"


class TargetBroker:
    """Opens a session on "demo" only, as the broker refuses a target its policy lacks."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, request: http.Request) -> http.Response:
        if request.method == "POST" and request.url.path == "/v1/sessions":
            target = json.loads(request.content)["target"]
            self.asked.append(target)
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
