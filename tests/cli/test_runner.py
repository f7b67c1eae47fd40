"""`guard exec`'s session teardown against a fake broker (a `guard.cli.http` transport): the ID
token opens the session and nothing else; heartbeats and the end carry the session
credential; a failed end is one line on stderr and the child's status still comes back."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from guard.cli import http
from guard.cli.client import BrokerClient
from guard.cli.errors import CliError
from guard.cli.profile import Profile, save_profile
from guard.cli.runner import Heartbeat
from tests.cli.invoke import guard  # noqa: F401

ID_TOKEN = "header.alice-id-token.signature"
SESSION_TOKEN = "gsc_session-credential"


class FakeBroker:
    """Opens one session; accepts only the session credential for heartbeat and end (the
    ID token has 'expired' by then); `end_status` is what DELETE answers."""

    def __init__(self, end_status: int = 204, interval: float = 0.02) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.end_status = end_status
        self.interval = interval
        self.beaten = threading.Event()

    def __call__(self, request: http.Request) -> http.Response:
        auth = request.headers.get("authorization", "")
        self.calls.append((request.method, request.url.path, auth))
        if request.method == "POST" and request.url.path == "/v1/sessions":
            if auth != f"Bearer {ID_TOKEN}":
                return error(401, "unauthenticated", "the ID token's signature does not verify")
            assert json.loads(request.content)["heartbeat"] is True
            return http.Response(201, json=self.created())
        if auth != f"Bearer {SESSION_TOKEN}":
            return error(401, "unauthenticated", "token expired")
        if request.url.path == "/v1/sessions/ses1/heartbeat":
            self.beaten.set()
            return http.Response(200, json=self.info())
        if request.method == "DELETE" and request.url.path == "/v1/sessions/ses1":
            if self.end_status == 204:
                return http.Response(204)
            if self.end_status == 404:  # what the broker tells the session's holder
                return error(404, "not_found", "session ses1 ended: ttl expired")
            return error(self.end_status, "dependency_unavailable", "OpenBao is unreachable")
        return error(404, "not_found", "no such route")

    def created(self) -> dict:
        return {
            "session_id": "ses1",
            "gateway_host": "127.0.0.1",
            "gateway_port": 9,
            "gateway_tls": False,
            "database": "demo",
            "user": "guard_ses1",
            "password": "gateway-secret",
            "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            "principal": "alice",
            "session_token": SESSION_TOKEN,
            "heartbeat_interval_seconds": self.interval,
            "heartbeat_grace_seconds": 45,
        }

    def info(self) -> dict:
        return {
            "session_id": "ses1",
            "target": "demo",
            "principal": "alice",
            "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            "status": "active",
        }


def error(status: int, code: str, message: str) -> http.Response:
    return http.Response(status, json={"error": code, "message": message, "hint": None})


@pytest.fixture
def make_broker(tmp_path, monkeypatch) -> Iterator:
    monkeypatch.setenv("GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("GUARD_KEYRING", "file")
    monkeypatch.setenv("GUARD_ID_TOKEN", ID_TOKEN)
    for var in ("GUARD_ISSUER", "GUARD_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    save_profile(Profile(broker_url="http://broker.test", issuer="http://idp.test"))

    def make(**kwargs) -> FakeBroker:
        fake = FakeBroker(**kwargs)
        monkeypatch.setattr(BrokerClient, "transport", fake)
        return fake

    yield make


def test_exec_heartbeats_and_ends_with_the_session_credential(
    make_broker,
    guard,  # noqa: F811
    tmp_path,
):
    """Finding 2: the end carried the ID token (401 once it expired, exit 1, session left
    open). Now the child waits until the broker saw a heartbeat, and everything after the
    open carries the session credential."""
    broker = make_broker()
    marker = tmp_path / "beaten"

    def mark_on_heartbeat() -> None:
        if broker.beaten.wait(60):
            marker.write_text("yes")

    threading.Thread(target=mark_on_heartbeat, daemon=True).start()
    child = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "deadline = time.monotonic() + 60\n"
        "while not p.exists() and time.monotonic() < deadline: time.sleep(0.01)\n"
        "sys.exit(3 if p.exists() else 99)\n"
    )
    outcome = guard("exec", "--db", "demo", "--", sys.executable, "-c", child)
    assert outcome.code == 3, outcome
    started, ended = outcome.err.splitlines()  # the session's start and end, nothing else
    assert re.fullmatch(
        r"guard: session ses1 on demo for (59m \d\ds|1h 00m) \(until \d\d:\d\d:\d\d UTC\)", started
    )
    assert (
        ended
        == f"guard: session ses1 ended: {os.path.basename(sys.executable)} exited with status 3"
    )
    after_open = broker.calls[1:]
    assert ("POST", "/v1/sessions/ses1/heartbeat", f"Bearer {SESSION_TOKEN}") in after_open
    assert after_open[-1] == ("DELETE", "/v1/sessions/ses1", f"Bearer {SESSION_TOKEN}")
    assert all(auth == f"Bearer {SESSION_TOKEN}" for _, _, auth in after_open)


def test_a_failed_teardown_is_one_stderr_line_and_the_exit_code_survives(
    make_broker,
    guard,  # noqa: F811
):
    make_broker(end_status=503, interval=3600)
    outcome = guard("exec", "--db", "demo", "--", sys.executable, "-c", "raise SystemExit(7)")
    assert outcome.code == 7, outcome
    lines = outcome.err.splitlines()
    assert len(lines) == 2, outcome.err  # the session's start, then the failed end
    assert lines[1].startswith("guard: could not end session ses1: OpenBao is unreachable")
    assert "Traceback" not in outcome.err


def test_a_session_the_broker_ended_already_is_said_with_its_reason(make_broker, guard):  # noqa: F811
    make_broker(end_status=404, interval=3600)  # the broker ended it already
    outcome = guard("exec", "--db", "demo", "--", sys.executable, "-c", "pass")
    assert outcome.code == 0
    assert outcome.err.splitlines()[1:] == ["guard: the broker ended session ses1: ttl expired"]


# ------------------------------------------------------------------ the child's environment
def _created(**changes):
    from guard.cli.wire import SessionCreated

    return SessionCreated.from_json(
        {
            **FakeBroker().created(),
            "gateway_host": "gw.example",
            "gateway_port": 6433,
            "gateway_tls": True,
            "password": "p@ss/word",
            **changes,
        }
    )


def test_the_child_talks_to_the_gateway_itself_over_verified_tls():
    from urllib.parse import parse_qs, urlsplit

    from guard.cli.runner import gateway_tls, session_env

    created = _created()
    env = session_env(
        created, host="gw.example", port=6433, tls=gateway_tls(created, "/etc/guard/ca.pem")
    )
    assert (env["PGHOST"], env["PGPORT"]) == ("gw.example", "6433")  # no loopback hop
    assert env["PGSSLMODE"] == "verify-full" and env["PGSSLROOTCERT"] == "/etc/guard/ca.pem"
    url = urlsplit(env["DATABASE_URL"])
    assert (url.hostname, url.port, url.password) == ("gw.example", 6433, "p%40ss%2Fword")
    assert parse_qs(url.query) == {"sslmode": ["verify-full"], "sslrootcert": ["/etc/guard/ca.pem"]}
    assert gateway_tls(_created(), None) == {"sslmode": "verify-full", "sslrootcert": "system"}
    assert gateway_tls(_created(gateway_tls=False), None) == {"sslmode": "disable"}


def test_the_brokers_gateway_ca_lives_in_a_private_file_for_the_session_only():
    import os
    import stat

    from guard.cli.runner import gateway_ca

    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    with gateway_ca(_created(gateway_ca_pem=pem), None) as path:
        assert path is not None and open(path).read() == pem
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path)  # gone with the session
    with gateway_ca(_created(gateway_ca_pem=pem), "/profile/ca.pem") as path:
        assert path == "/profile/ca.pem"  # the profile's CA wins


# ------------------------------------------------------------------ renewing the login
class _Beats:
    """A broker client for `Heartbeat`: records heartbeats and presented ID tokens."""

    def __init__(self) -> None:
        self.presented: list[str] = []
        self.beats = 0

    def heartbeat(self, session_id: str) -> None:
        self.beats += 1

    def reauthenticate(self, session_id: str, token: str) -> datetime:
        self.presented.append(token)
        return datetime.now(UTC) + timedelta(minutes=15)


def _beat_until(client: _Beats, heartbeat: Heartbeat, beats: int) -> None:
    heartbeat.start()
    deadline = time.monotonic() + 10
    while client.beats < beats and time.monotonic() < deadline:
        time.sleep(0.01)
    heartbeat.stop()


def test_a_login_near_its_expiry_is_renewed_once_with_a_fresh_token():
    client = _Beats()
    tokens = iter(["fresh-1", "fresh-2"])
    beat = Heartbeat(
        client,
        "ses1",
        0.01,
        login_expires_at=datetime.now(UTC) + timedelta(seconds=60),
        fresh_token=lambda: next(tokens),
    )
    _beat_until(client, beat, 5)
    assert client.presented == ["fresh-1"]  # then 15 minutes away: not again yet
    assert beat.login_expires_at > datetime.now(UTC) + timedelta(minutes=14)


def test_a_refused_renewal_is_said_once_and_the_same_token_is_not_sent_again(capsys):
    client = _Beats()

    def refused() -> str:
        raise CliError("not logged in (or the login expired)")

    beat = Heartbeat(
        client,
        "ses1",
        0.01,
        login_expires_at=datetime.now(UTC) + timedelta(seconds=60),
        fresh_token=refused,
    )
    _beat_until(client, beat, 5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("guard: could not renew your login (not logged in")
    assert "the broker ends session ses1 at " in lines[0]
    assert client.presented == []
    same = _Beats()
    ci = Heartbeat(
        same,
        "ses1",
        0.01,
        login_expires_at=datetime.now(UTC) + timedelta(seconds=60),
        fresh_token=lambda: "the-ci-token",
        opened_with="the-ci-token",  # a CI job's token: nothing fresher to send
    )
    _beat_until(same, ci, 5)
    assert same.presented == []


class _Extended:
    def __init__(self, expires_at: datetime, notice: str | None = None) -> None:
        self.expires_at = expires_at
        self.notice = notice


class _Extending(_Beats):
    """Extends by a minute, up to a cap (the policy's maximum)."""

    def __init__(self, cap: datetime) -> None:
        super().__init__()
        self.cap = cap
        self.extended: list[datetime] = []

    def extend(self, session_id: str) -> _Extended:
        new = min(datetime.now(UTC) + timedelta(seconds=60), self.cap)
        self.extended.append(new)
        return _Extended(new)


def test_auto_extension_extends_near_the_end_until_the_maximum_then_warns(capsys):
    """A 2 s session whose maximum is 2.5 s: extended once, to the maximum; then no more
    calls, and the TTL warning (a quarter of the session before its end) instead."""
    now = datetime.now(UTC)
    client = _Extending(cap=now + timedelta(seconds=2.5))
    beat = Heartbeat(client, "ses1", 0.01, expires_at=now + timedelta(seconds=2), auto_extend=True)
    _beat_until(client, beat, 260)  # about 2.6 s of beats
    lines = capsys.readouterr().err.splitlines()
    assert client.extended == [client.cap, client.cap]  # the second call found the maximum
    assert lines[0].startswith("guard: session ses1 extended to ")
    assert lines[1].startswith("guard: session ses1 ends in ") and lines[1].endswith("(its TTL)")
    assert len(lines) == 2


def test_without_auto_extension_nothing_is_extended_and_the_end_is_warned_of(capsys):
    client = _Extending(cap=datetime.now(UTC) + timedelta(hours=1))
    beat = Heartbeat(client, "ses1", 0.01, expires_at=datetime.now(UTC) + timedelta(seconds=2))
    _beat_until(client, beat, 200)
    assert client.extended == []
    assert "guard: session ses1 ends in " in capsys.readouterr().err


@pytest.mark.ci_identity
def test_a_ci_token_the_broker_refuses_is_named_not_sent_to_guard_login(
    make_broker,
    guard,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    make_broker()
    monkeypatch.setenv("GUARD_ID_TOKEN", "garbage")
    outcome = guard("exec", "demo", "--", "true")
    assert outcome.code == 1
    assert outcome.err.splitlines() == [
        "error: the broker refused the ID token from GUARD_ID_TOKEN: the ID token's "
        "signature does not verify",
        "hint: a CI job's token must be unexpired, for the broker's audience, and from an "
        "issuer the broker trusts; check the job's OIDC settings",
    ]
    token_file = tmp_path / "token"
    token_file.write_text("garbage\n")
    monkeypatch.delenv("GUARD_ID_TOKEN")
    outcome = guard("exec", "--id-token-file", str(token_file), "demo", "--", "true")
    assert outcome.err.startswith(
        f"error: the broker refused the ID token from --id-token-file {token_file}:"
    )
