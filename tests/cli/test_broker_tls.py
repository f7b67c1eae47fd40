"""The CLI verifies the broker's HTTPS certificate: against the profile's broker CA (or
GUARD_BROKER_CA), else the system trust store; never unverified.

The broker is a tiny threaded HTTPS server with a dev-CA certificate for 127.0.0.1.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from guard.cli.client import BrokerClient, BrokerError
from guard.cli.errors import CliError
from guard.cli.profile import (
    Profile,
    broker_ca_file,
    broker_tls_context,
    load_profile,
    save_profile,
)
from guard.devstack.tls import broker_cert, make_dev_ca


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps([]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("ca")
    ca, _, _ = make_dev_ca(directory)
    cert, key = broker_cert(directory)
    other_ca, _, _ = make_dev_ca(tmp_path_factory.mktemp("other-ca"))
    return {"ca": ca, "cert": cert, "key": key, "other_ca": other_ca}


@pytest.fixture(scope="module")
def https_broker(pki) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GUARD_HOME", str(tmp_path))
    for var in ("GUARD_BROKER_URL", "GUARD_ISSUER", "GUARD_BROKER_CA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(BrokerClient, "transport", None)
    return tmp_path


def test_profile_broker_ca_verifies_the_broker(home, pki, https_broker):
    save_profile(
        Profile(broker_url=https_broker, issuer="http://idp", broker_ca_file=str(pki["ca"]))
    )
    assert load_profile().broker_ca_file == str(pki["ca"])
    client = BrokerClient(https_broker, "token")
    try:
        assert client.pending_approvals() == []
    finally:
        client.close()


def test_an_explicit_ca_file_wins(home, pki, https_broker):
    save_profile(Profile(broker_url=https_broker, issuer="http://idp", broker_ca_file="/nope"))
    client = BrokerClient(https_broker, "token", ca_file=str(pki["ca"]))
    try:
        assert client.pending_approvals() == []
    finally:
        client.close()


def test_guard_broker_ca_overrides_the_profile(home, pki, https_broker, monkeypatch):
    save_profile(
        Profile(broker_url=https_broker, issuer="http://idp", broker_ca_file=str(pki["other_ca"]))
    )
    monkeypatch.setenv("GUARD_BROKER_CA", str(pki["ca"]))
    assert broker_ca_file() == str(pki["ca"])
    assert load_profile().broker_ca_file == str(pki["ca"])
    client = BrokerClient(https_broker, "token")
    try:
        assert client.pending_approvals() == []
    finally:
        client.close()


@pytest.mark.parametrize("which", ["other_ca", None])
def test_a_certificate_from_another_ca_is_refused(home, pki, https_broker, which):
    # Another CA, or no CA at all (the system trust store does not know the dev CA).
    ca = str(pki[which]) if which else None
    save_profile(Profile(broker_url=https_broker, issuer="http://idp", broker_ca_file=ca))
    client = BrokerClient(https_broker, "token")
    try:
        with pytest.raises(BrokerError) as failed:
            client.pending_approvals()
    finally:
        client.close()
    assert failed.value.status is None  # the broker was not reached
    assert "cannot reach the guard broker" in failed.value.message


def test_a_missing_ca_file_is_a_cli_error_with_a_hint(home, https_broker):
    with pytest.raises(CliError) as failed:
        BrokerClient(https_broker, "token", ca_file=str(home / "missing.pem"))
    assert "broker CA file" in failed.value.message
    assert failed.value.hint and "GUARD_BROKER_CA" in failed.value.hint


def test_the_context_verifies_chain_and_host_name(pki):
    ctx = broker_tls_context(str(pki["ca"]))
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_broker_ca_file_tolerates_no_or_a_broken_profile(home):
    assert broker_ca_file() is None
    (home / "profile.json").write_text("{not json")
    assert broker_ca_file() is None
