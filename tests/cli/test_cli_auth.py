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
from guard.cli.main import main
from guard.cli.profile import Profile, save_profile

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


def test_dev_login_refuses_a_non_dev_issuer(home, tmp_path, capsys):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "stack.json").write_text(json.dumps({"issuer": "http://other:1"}))
    assert main(["dev", "login", "alice"]) == 1
    assert "only against the local dev IdP" in capsys.readouterr().err


def test_broker_outage_is_a_clear_cli_error(home, monkeypatch, capsys):
    monkeypatch.setenv("GUARD_ID_TOKEN", token(600))
    assert main(["exec", "--db", "demo", "--", "true"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the guard broker at http://127.0.0.1:9" in err
    assert "hint:" in err
    assert os.environ["GUARD_ID_TOKEN"] not in err  # never echo the token


def test_exec_without_command_is_a_usage_error(home, capsys):
    assert main(["exec", "--db", "demo"]) == 2
    assert "no command given" in capsys.readouterr().err
