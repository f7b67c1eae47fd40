"""CLI login: token storage, the device-flow client, fresh ID tokens, login/logout and the
dev-only shortcuts, against a `guard.cli.http` transport and the real dev IdP."""

from __future__ import annotations

import json
import os
import stat
import time
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from guard.cli import http
from guard.cli.auth import (
    KEYRING_SERVICE,
    DeviceAuthorization,
    DeviceFlow,
    TokenStore,
    current_id_token,
    system_keyring,
)
from guard.cli.errors import CliError
from guard.cli.main import main
from guard.cli.profile import Profile, load_profile, save_profile
from tests.fix_oidc import dev_idp  # noqa: F401

ISSUER = "https://idp.example"
KEY = ec.generate_private_key(ec.SECP256R1())


def token(exp_in: int, **extra) -> str:
    claims = {"sub": "a", "exp": int(time.time()) + exp_in, **extra}
    return jwt.encode(claims, KEY, algorithm="ES256")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("GUARD_KEYRING", "file")
    for var in ("GUARD_ID_TOKEN", "GUARD_ISSUER", "GUARD_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    profile = Profile(broker_url="http://127.0.0.1:9", issuer=ISSUER)
    save_profile(profile)
    return profile


def use_issuer(home_profile: Profile, issuer: str, tmp_path, *, dev_stack: bool) -> Profile:
    profile = Profile(broker_url=home_profile.broker_url, issuer=issuer)
    save_profile(profile)
    if dev_stack:
        (tmp_path / "dev").mkdir(exist_ok=True)
        (tmp_path / "dev" / "stack.json").write_text(json.dumps({"issuer": issuer}))
    return profile


# TokenStore ---------------------------------------------------------------------------


def test_file_store_is_0600_and_round_trips(home, tmp_path):
    store = TokenStore(home)
    assert not store.uses_keyring
    store.save({"id_token": "a.b.c", "refresh_token": "r", "access_token": "x", "other": "y"})
    path = tmp_path / "credentials.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.load() == {"id_token": "a.b.c", "refresh_token": "r", "access_token": "x"}
    other = TokenStore(Profile(broker_url="b", issuer="https://other.example"))
    assert other.load() is None  # keyed by issuer and client id
    assert store.clear() is True
    assert store.load() is None and store.clear() is False


def test_file_store_tightens_a_loose_file(home, tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text("{}")
    path.chmod(0o644)
    TokenStore(home).save({"id_token": "a.b.c"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))


def test_no_keychain_warns_once_on_stderr(home, monkeypatch, capsys):
    import keyring
    from keyring.backends import fail

    monkeypatch.delenv("GUARD_KEYRING")
    monkeypatch.setattr(keyring, "get_keyring", lambda: fail.Keyring())
    monkeypatch.setattr(TokenStore, "_warned", False)
    assert system_keyring() is None
    TokenStore(home).save({"id_token": "secret.token.value"})
    TokenStore(home).save({"id_token": "secret.token.value"})
    err = capsys.readouterr().err
    assert err.count("no OS keychain found") == 1 and "0600" in err
    assert "secret.token.value" not in err


def test_system_keyring_detection(monkeypatch):
    import keyring
    from keyring.backends import chainer

    class Good:
        priority = 5

    monkeypatch.delenv("GUARD_KEYRING", raising=False)
    monkeypatch.setattr(keyring, "get_keyring", lambda: Good())
    assert isinstance(system_keyring(), Good)
    monkeypatch.setattr(chainer.ChainerBackend, "backends", [])
    monkeypatch.setattr(keyring, "get_keyring", lambda: chainer.ChainerBackend())
    assert system_keyring() is None  # a chainer with nothing to chain
    monkeypatch.setattr(keyring, "get_keyring", lambda: Good())
    monkeypatch.setenv("GUARD_KEYRING", "file")
    assert system_keyring() is None


class MemoryKeyring:
    def __init__(self, fail: bool = False) -> None:
        self.items: dict[tuple[str, str], str] = {}
        self.fail = fail

    def get_password(self, service, username):
        if self.fail:
            raise RuntimeError("org.freedesktop.DBus.Error.ServiceUnknown")
        return self.items.get((service, username))

    def set_password(self, service, username, password):
        self.items[(service, username)] = password

    def delete_password(self, service, username):
        del self.items[(service, username)]


def test_keyring_store_uses_service_and_issuer_client_key(home, tmp_path):
    backend = MemoryKeyring()
    store = TokenStore(home, backend=backend)
    store.save({"id_token": "i", "refresh_token": "r"})
    assert json.loads(backend.items[(KEYRING_SERVICE, f"{ISSUER} guard-cli")]) == {
        "id_token": "i",
        "refresh_token": "r",
    }
    assert store.load() == {"id_token": "i", "refresh_token": "r"}
    assert not (tmp_path / "credentials.json").exists()
    assert store.clear() and backend.items == {}


def test_broken_keyring_is_a_cli_error_with_a_way_out(home):
    with pytest.raises(CliError) as info:
        TokenStore(home, backend=MemoryKeyring(fail=True)).load()
    assert "keychain" in info.value.message and "GUARD_KEYRING=file" in info.value.hint


# DeviceFlow (mock IdP) ----------------------------------------------------------------


class MockIdP:
    """Discovery plus a token endpoint answering from a script of (status, body)."""

    def __init__(self, script=(), issuer: str = ISSUER) -> None:
        self.script = list(script)
        self.issuer = issuer
        self.forms: list[dict[str, str]] = []

    def __call__(self, request: http.Request) -> http.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return http.Response(
                200,
                json={
                    "issuer": self.issuer,
                    "token_endpoint": f"{ISSUER}/token",
                    "device_authorization_endpoint": f"{ISSUER}/device_authorization",
                },
            )
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        self.forms.append(form)
        status, body = self.script.pop(0)
        if isinstance(body, Exception):
            raise body
        return http.Response(status, json=body)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def flow_for(idp: MockIdP, fake: FakeTime) -> DeviceFlow:
    client = http.HttpClient(transport=idp)
    return DeviceFlow(ISSUER, "guard-cli", http=client, sleep=fake.sleep, clock=fake.clock)


AUTH = DeviceAuthorization("dc", "BCDF-GHJK", f"{ISSUER}/device", None, 600, 5)
PENDING = (400, {"error": "authorization_pending"})
SLOW = (400, {"error": "slow_down"})


def test_poll_honours_interval_and_slow_down():
    fake = FakeTime()
    ok = (200, {"id_token": "i", "refresh_token": "r"})
    idp = MockIdP([PENDING, SLOW, PENDING, SLOW, ok])
    assert flow_for(idp, fake).poll(AUTH)["id_token"] == "i"
    assert fake.sleeps == [5, 5, 10, 10, 15]
    assert idp.forms[0] == {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": "dc",
        "client_id": "guard-cli",
    }


def test_poll_stops_at_expiry():
    fake = FakeTime()
    idp = MockIdP([PENDING] * 200)
    with pytest.raises(CliError, match="expired before it was approved"):
        flow_for(idp, fake).poll(AUTH)
    assert sum(fake.sleeps) <= 600 and len(idp.forms) == 119


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ((400, {"error": "access_denied"}), "denied"),
        ((400, {"error": "expired_token"}), "expired"),
        ((400, {"error": "invalid_grant"}), "invalid_grant"),
    ],
)
def test_poll_errors_are_clear(answer, message):
    with pytest.raises(CliError, match=message):
        flow_for(MockIdP([answer]), FakeTime()).poll(AUTH)


def test_poll_immediate_skips_the_first_wait():
    fake = FakeTime()
    flow_for(MockIdP([(200, {"id_token": "i"})]), fake).poll(AUTH, immediate=True)
    assert fake.sleeps == []


def test_discovery_of_another_issuer_is_refused():
    flow = flow_for(MockIdP(issuer="https://evil.example"), FakeTime())
    with pytest.raises(CliError, match="describes another issuer"):
        flow.start()


def test_unreachable_idp_names_the_issuer():
    def down(request: http.Request) -> http.Response:
        raise http.ConnectError("refused")

    flow = DeviceFlow(ISSUER, "guard-cli", http=http.HttpClient(transport=down))
    with pytest.raises(CliError) as info:
        flow.start()
    assert f"cannot reach the identity provider at {ISSUER}" in info.value.message
    assert info.value.hint


# current_id_token -------------------------------------------------------------------


def test_explicit_token_sources_come_first(home, tmp_path, monkeypatch):
    TokenStore(home).save({"id_token": token(600)})
    assert jwt.decode(current_id_token(home), options={"verify_signature": False})["sub"] == "a"
    monkeypatch.setenv("GUARD_ID_TOKEN", "env.token.x")
    assert current_id_token(home) == "env.token.x"
    f = tmp_path / "tok"
    f.write_text("file.token.y\n")
    assert current_id_token(home, id_token_file=f) == "file.token.y"
    f.write_text("")
    with pytest.raises(CliError, match="empty"):
        current_id_token(home, id_token_file=f)


def test_expiring_token_is_refreshed_and_rotation_stored(home):
    TokenStore(home).save({"id_token": token(30), "refresh_token": "r1"})
    fresh = token(900, fresh=True)
    idp = MockIdP([(200, {"id_token": fresh, "refresh_token": "r2", "access_token": "a"})])
    client = http.HttpClient(transport=idp)
    assert current_id_token(home, http=client) == fresh
    assert idp.forms == [
        {"grant_type": "refresh_token", "refresh_token": "r1", "client_id": "guard-cli"}
    ]
    assert TokenStore(home).load() == {
        "id_token": fresh,
        "refresh_token": "r2",
        "access_token": "a",
    }
    assert current_id_token(home, http=http) == fresh  # now valid: no second request


def test_refresh_without_rotation_keeps_the_refresh_token(home):
    TokenStore(home).save({"id_token": token(30), "refresh_token": "r1"})
    fresh = token(900)
    idp = MockIdP([(200, {"id_token": fresh})])
    current_id_token(home, http=http.HttpClient(transport=idp))
    assert TokenStore(home).load()["refresh_token"] == "r1"


@pytest.mark.ci_identity
def test_a_refresh_without_an_id_token_keeps_the_rotated_login_and_says_why(home):
    TokenStore(home).save({"id_token": token(30), "refresh_token": "r1"})
    idp = MockIdP([(200, {"access_token": "a2", "refresh_token": "r2", "token_type": "Bearer"})])
    with pytest.raises(CliError, match="renewed the login without a new ID token") as info:
        current_id_token(home, http=http.HttpClient(transport=idp))
    assert "guard login" in info.value.hint
    assert TokenStore(home).load()["refresh_token"] == "r2"  # r1 is spent: r2 is kept


def test_rejected_refresh_means_not_logged_in(home):
    TokenStore(home).save({"id_token": token(30), "refresh_token": "r1"})
    idp = MockIdP([(400, {"error": "invalid_grant"})])
    with pytest.raises(CliError, match="not logged in") as info:
        current_id_token(home, http=http.HttpClient(transport=idp))
    assert "guard login" in info.value.hint


def test_nothing_stored_means_not_logged_in(home):
    with pytest.raises(CliError, match="not logged in"):
        current_id_token(home)


def test_refresh_with_idp_down_is_a_clear_error(home):
    TokenStore(home).save({"id_token": token(30), "refresh_token": "r1"})

    def down(request: http.Request) -> http.Response:
        raise http.ConnectError("refused")

    with pytest.raises(CliError, match=f"cannot reach the identity provider at {ISSUER}"):
        current_id_token(home, http=http.HttpClient(transport=down))


def test_refresh_against_the_real_dev_idp(home, tmp_path, dev_idp):  # noqa: F811
    profile = use_issuer(home, dev_idp.issuer, tmp_path, dev_stack=False)
    real = dev_idp.tokens_for("carol")
    TokenStore(profile).save({"id_token": token(10), "refresh_token": real["refresh_token"]})
    fresh = current_id_token(profile)
    claims = jwt.decode(fresh, options={"verify_signature": False})
    assert claims["iss"] == dev_idp.issuer and claims["preferred_username"] == "carol"
    stored = TokenStore(profile).load()
    assert stored["id_token"] == fresh and stored["refresh_token"] != real["refresh_token"]
    assert dev_idp.refresh(real["refresh_token"]).status_code == 400  # rotated out


@pytest.mark.ci_identity
def test_parallel_guard_commands_refreshing_at_once_keep_the_login(home, tmp_path, dev_idp):  # noqa: F811
    """Eight `guard` processes find the ID token expired at the same moment. The dev IdP
    rotates refresh tokens and revokes the whole login when one is used twice (reuse
    detection), so without one refresh at a time some of them would lose it for all."""
    import subprocess
    import sys

    profile = use_issuer(home, dev_idp.issuer, tmp_path, dev_stack=False)
    real = dev_idp.tokens_for("carol")
    TokenStore(profile).save({"id_token": token(10), "refresh_token": real["refresh_token"]})
    code = (
        "from guard.cli.auth import current_id_token\n"
        "from guard.cli.profile import load_profile\n"
        "print(current_id_token(load_profile()))\n"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    results = [(run.wait(timeout=60), *run.communicate()) for run in runs]
    assert [code for code, _, _ in results] == [0] * 8, [err for _, _, err in results]
    issued = {out.strip() for _, out, _ in results}
    assert len(issued) == 1  # one refresh; the seven others took its tokens from the store
    # The login survived: its stored refresh token still works.
    stored = TokenStore(profile).load()
    assert dev_idp.refresh(stored["refresh_token"]).status_code == 200


# guard login / logout / dev login / dev token -------------------------------------------


@pytest.mark.ci_identity
def test_login_and_logout_against_the_dev_idp(home, tmp_path, dev_idp, monkeypatch, capsys):  # noqa: F811
    opened: list[str] = []

    def browser(url: str) -> bool:  # the "user" approves in the browser
        opened.append(url)
        code = parse_qs(urlsplit(url).query)["user_code"][0]
        dev_idp.decide(code, "alice").raise_for_status()
        return True

    monkeypatch.setattr("webbrowser.open", browser)
    assert main(["login", "--issuer", dev_idp.issuer]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "logged in as alice (engineers)" in err and "profile updated" in err
    assert opened and opened[0].startswith(f"{dev_idp.issuer}/device?user_code=")
    assert opened[0] in err  # the complete URI is printed too, for another device
    profile = load_profile()
    assert profile.issuer == dev_idp.issuer
    stored = TokenStore(profile).load()
    assert stored and stored["id_token"] not in err
    assert current_id_token(profile) == stored["id_token"]
    assert main(["logout"]) == 0
    assert TokenStore(profile).load() is None
    assert "logged out (the login was revoked at the identity provider)" in capsys.readouterr().err
    # Revoked at the IdP (RFC 7009): a copy of the refresh token is worth nothing now.
    refused = dev_idp.refresh(stored["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"


def test_login_no_browser_does_not_open_one(home, dev_idp, monkeypatch, capsys):  # noqa: F811
    def no(url: str) -> bool:
        raise AssertionError("browser opened")

    monkeypatch.setattr("webbrowser.open", no)
    monkeypatch.setenv("GUARD_ISSUER", "http://127.0.0.1:1")  # nothing listens there
    assert main(["login", "--no-browser"]) == 1
    assert "cannot reach the identity provider at http://127.0.0.1:1" in capsys.readouterr().err


def test_dev_login_and_dev_token(home, tmp_path, dev_idp, capsys):  # noqa: F811
    profile = use_issuer(home, dev_idp.issuer, tmp_path, dev_stack=True)
    assert main(["dev", "login", "bob"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "logged in as bob (security-leads)" in err
    stored = TokenStore(profile).load()
    TokenStore(profile).clear()

    assert main(["dev", "token", "ci"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].count(".") == 2  # only the ID token on stdout
    claims = jwt.decode(lines[0], options={"verify_signature": False})
    assert claims["groups"] == ["service"] and claims["iss"] == dev_idp.issuer
    assert lines[0] not in err and stored["id_token"] != lines[0]
    assert TokenStore(profile).load() is None  # dev token stores nothing


def test_dev_login_unknown_user(home, tmp_path, dev_idp, capsys):  # noqa: F811
    use_issuer(home, dev_idp.issuer, tmp_path, dev_stack=True)
    assert main(["dev", "login", "eve"]) == 1
    assert "no user 'eve'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["login", "token"])
def test_dev_login_refuses_a_non_dev_issuer(home, tmp_path, capsys, command):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "stack.json").write_text(json.dumps({"issuer": "http://127.0.0.1:5556"}))
    assert main(["dev", command, "alice"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "guard dev login works only against the local dev IdP started by `guard dev up`" in err
    assert ISSUER in err


def test_dev_login_without_a_dev_stack(home, capsys):
    assert main(["dev", "login", "alice"]) == 1
    err = capsys.readouterr().err
    assert "only against the local dev IdP" in err and "guard dev up" in err


# settings from the environment, for a CI job without a profile ------------------------------
@pytest.mark.ci_identity
def test_a_ci_job_configures_guard_from_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARD_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("GUARD_BROKER_URL", "https://broker.example")
    monkeypatch.setenv("GUARD_GATEWAY_CA", "/etc/guard/gateway-ca.pem")
    monkeypatch.setenv("GUARD_SCOPE", "openid email")
    monkeypatch.setenv("GUARD_CLIENT_ID", "ci")
    for var in ("GUARD_ISSUER", "GUARD_ID_TOKEN", "GUARD_BROKER_CA"):
        monkeypatch.delenv(var, raising=False)
    profile = load_profile()  # no issuer needed to get this far
    assert (profile.broker_url, profile.issuer, profile.client_id) == (
        "https://broker.example",
        "",
        "ci",
    )
    assert (profile.gateway_ca_file, profile.scope) == ("/etc/guard/gateway-ca.pem", "openid email")
    with pytest.raises(CliError, match="no identity provider configured and no ID token") as no:
        current_id_token(profile)
    assert "GUARD_ID_TOKEN" in no.value.hint
    monkeypatch.setenv("GUARD_ID_TOKEN", "  header.payload.signature\n")
    assert current_id_token(profile) == "header.payload.signature"


@pytest.mark.ci_identity
def test_login_asks_for_the_scopes_configured(home, monkeypatch, capsys):
    asked: list[str] = []

    def idp(request: http.Request) -> http.Response:
        if request.url.path.endswith("openid-configuration"):
            return http.Response(
                200,
                json={
                    "issuer": ISSUER,
                    "device_authorization_endpoint": f"{ISSUER}/device",
                    "token_endpoint": f"{ISSUER}/token",
                },
            )
        asked.append(parse_qs(request.content.decode())["scope"][0])
        return http.Response(400, json={"error": "invalid_scope"})

    monkeypatch.setattr("guard.cli.auth.HttpClient", lambda **kw: http.HttpClient(transport=idp))
    assert main(["login", "--scope", "openid email", "--no-browser"]) == 1
    monkeypatch.setenv("GUARD_SCOPE", "openid groups")
    assert main(["login", "--no-browser"]) == 1
    assert asked == ["openid email", "openid groups"]
    assert (
        "the identity provider refused the sign-in request: invalid_scope"
        in capsys.readouterr().err
    )
