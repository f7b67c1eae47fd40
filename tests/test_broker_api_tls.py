"""The broker API's TLS settings: `api_tls` serves HTTPS, and guard-broker refuses to start
(one line on stderr, exit 2) when the API would listen off loopback in plain HTTP, unless
`api.allow_plaintext: true` says so explicitly (finding 4 of the hardening issue)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from guard.broker.service import api_tls_refusal, main
from guard.broker.settings import BrokerSettings, is_loopback
from guard.devstack.tls import broker_cert, make_dev_ca


def _config(tmp_path: Path, **extra: object) -> dict:
    return {
        "state_dir": str(tmp_path / "state"),
        "policy_file": str(tmp_path / "policies.yaml"),
        "oidc": {"issuer": "https://idp.example"},
        "openbao": {"addr": "https://bao.example:8200"},
        "targets": {"demo": {"database": "demo", "openbao_role": "guard-demo"}},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        **extra,
    }


def _settings(tmp_path: Path, **extra: object) -> BrokerSettings:
    return BrokerSettings.model_validate(_config(tmp_path, **extra))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("guard.internal.example", False),
        ("localhost.example", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_loopback_api_without_tls_may_start(tmp_path):
    assert _settings(tmp_path).api_plaintext_refusal() is None  # default 127.0.0.1:8400
    assert _settings(tmp_path, api={"host": "::1"}).api_plaintext_refusal() is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "guard.internal.example"])
def test_non_loopback_api_without_tls_is_refused(tmp_path, host):
    refusal = _settings(tmp_path, api={"host": host}).api_plaintext_refusal()
    assert refusal is not None and "\n" not in refusal
    assert "without TLS" in refusal and "api_tls" in refusal and "allow_plaintext" in refusal


def test_allow_plaintext_must_be_explicit(tmp_path):
    settings = _settings(tmp_path, api={"host": "0.0.0.0", "allow_plaintext": True})
    assert settings.api_plaintext_refusal() is None
    assert _settings(tmp_path).api.allow_plaintext is False


def test_api_tls_allows_any_address(tmp_path):
    tls = {"cert_file": "/c.pem", "key_file": "/k.pem"}
    settings = _settings(tmp_path, api={"host": "0.0.0.0"}, api_tls=tls)
    assert settings.api_plaintext_refusal() is None
    assert settings.api_tls is not None and settings.api_tls.cert_file == Path("/c.pem")


def test_api_tls_needs_both_files(tmp_path):
    with pytest.raises(ValueError, match="key_file"):
        _settings(tmp_path, api_tls={"cert_file": "/c.pem"})


def test_a_loadable_certificate_passes_and_a_missing_one_is_refused(tmp_path):
    make_dev_ca(tmp_path / "tls")
    cert, key = broker_cert(tmp_path / "tls")
    good = _settings(tmp_path, api_tls={"cert_file": str(cert), "key_file": str(key)})
    assert api_tls_refusal(good) is None
    missing = {"cert_file": str(tmp_path / "nope.pem"), "key_file": str(key)}
    refusal = api_tls_refusal(_settings(tmp_path, api_tls=missing))
    assert refusal is not None and "cannot load the API certificate" in refusal
    assert "\n" not in refusal


def _main(tmp_path: Path, capsys, **extra: object) -> tuple[int, str]:
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, **extra)))
    code = main(["--config", str(path)])
    return code, capsys.readouterr().err


def test_guard_broker_refuses_plaintext_off_loopback_in_one_line(tmp_path, capsys):
    code, err = _main(tmp_path, capsys, api={"host": "0.0.0.0", "port": 8400})
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("guard-broker: the API would listen on 0.0.0.0")
    # Nothing was started: no state directory, no audit log.
    assert not (tmp_path / "state").exists() and not (tmp_path / "audit.jsonl").exists()


def test_guard_broker_refuses_an_api_certificate_that_does_not_load(tmp_path, capsys):
    bad = {"cert_file": str(tmp_path / "nope.pem"), "key_file": str(tmp_path / "nope-key.pem")}
    code, err = _main(tmp_path, capsys, api={"host": "0.0.0.0"}, api_tls=bad)
    assert code == 2
    assert err.count("\n") == 1 and "cannot load the API certificate" in err
