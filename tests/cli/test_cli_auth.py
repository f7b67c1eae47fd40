"""CLI token storage, ID-token selection and the dev-login issuer check."""

from __future__ import annotations

import json
import os
import stat
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from guard.cli.auth import TokenStore, current_id_token
from guard.cli.errors import CliError
from guard.cli.profile import Profile, save_profile
from tests.cli.invoke import guard  # noqa: F401

KEY = ec.generate_private_key(ec.SECP256R1())


def token(exp_in: int) -> str:
    return jwt.encode({"sub": "a", "exp": int(time.time()) + exp_in}, KEY, algorithm="ES256")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("GUARD_KEYRING", "file")
    monkeypatch.delenv("GUARD_ID_TOKEN", raising=False)
    profile = Profile(broker_url="http://127.0.0.1:9", issuer="http://127.0.0.1:8")
    save_profile(profile)
    return profile


def test_file_store_is_private_and_round_trips(home, tmp_path):
    store = TokenStore(home)
    store.save({"id_token": "a.b.c", "refresh_token": "r", "ignored": "x"})
    path = tmp_path / "credentials.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.load() == {"id_token": "a.b.c", "refresh_token": "r"}
    store.clear()
    assert store.load() is None


def test_current_token_prefers_file_then_env_then_store(home, tmp_path, monkeypatch):
    TokenStore(home).save({"id_token": token(600)})
    stored = current_id_token(home)
    assert jwt.decode(stored, options={"verify_signature": False})["sub"] == "a"
    monkeypatch.setenv("GUARD_ID_TOKEN", "env.token.x")
    assert current_id_token(home) == "env.token.x"
    f = tmp_path / "tok"
    f.write_text("file.token.y\n")
    assert current_id_token(home, id_token_file=f) == "file.token.y"


def test_expiring_token_without_refresh_asks_to_log_in(home):
    TokenStore(home).save({"id_token": token(10)})  # < 60 s left
    with pytest.raises(CliError, match="not logged in"):
        current_id_token(home)


def test_dev_login_refuses_a_non_dev_issuer(home, tmp_path, guard):  # noqa: F811
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "stack.json").write_text(json.dumps({"issuer": "http://other:1"}))
    outcome = guard("dev", "login", "alice")
    assert outcome.code == 1
    assert outcome.err.startswith("error: guard dev login works only against the local dev IdP")


def test_broker_outage_is_a_clear_cli_error(home, monkeypatch, guard):  # noqa: F811
    monkeypatch.setenv("GUARD_ID_TOKEN", token(600))
    outcome = guard("exec", "--db", "demo", "--", "true")
    assert outcome.code == 1
    assert outcome.err.startswith("error: cannot reach the guard broker at http://127.0.0.1:9")
    assert "\nhint: " in outcome.err
    assert os.environ["GUARD_ID_TOKEN"] not in outcome.out + outcome.err  # never echo the token


def test_exec_without_command_is_a_usage_error(home, guard):  # noqa: F811
    outcome = guard("exec", "--db", "demo")
    assert outcome.code == 2
    assert outcome.err == "error: no command given\nhint: guard exec demo -- python job.py\n"


def test_exec_passes_everything_after_the_program_to_it(home, monkeypatch, guard):  # noqa: F811
    # Options after the program's name are the program's, not guard's: the broker is
    # reached (and is down) instead of `-v`/`--db` being parsed as guard options.
    monkeypatch.setenv("GUARD_ID_TOKEN", token(600))
    outcome = guard("exec", "--db", "demo", "./job.sh", "-v", "--db", "x")
    assert outcome.code == 1
    assert "cannot reach the guard broker" in outcome.err
