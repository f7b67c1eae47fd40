"""The dev stack's broker API is HTTPS with a certificate from the stack's CA, and the CLI
verifies it (finding 4 of the hardening issue: the API was plain `http://`)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest

from guard.devstack.tls import make_dev_ca
from tests.fix_stack import Stack

pytestmark = pytest.mark.integration


def test_status_and_profile_give_an_https_broker_and_its_ca(dev_stack: Stack):
    assert dev_stack.status["broker_url"].startswith("https://127.0.0.1:")
    assert Path(dev_stack.status["broker_ca"]).is_file()
    shown = dev_stack.guard("dev", "status")
    assert shown.returncode == 0, shown.stderr
    assert "https://127.0.0.1:" in shown.stdout
    profile = json.loads((dev_stack.home / "profile.json").read_text())
    assert profile["broker_url"] == dev_stack.status["broker_url"]
    assert profile["broker_ca_file"] == dev_stack.status["broker_ca"]


def test_the_api_answers_over_https_verified_by_the_dev_ca(dev_stack: Stack):
    with dev_stack.http() as http:
        response = http.get("/v1/health")
    assert response.status_code == 200
    assert response.url.scheme == "https"


def test_the_api_does_not_answer_plain_http(dev_stack: Stack):
    plain = dev_stack.status["broker_url"].replace("https://", "http://", 1)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/v1/health", timeout=5)


@pytest.mark.parametrize("ca", ["system", "other"])
def test_the_certificate_does_not_verify_without_the_dev_ca(dev_stack: Stack, tmp_path, ca):
    if ca == "system":
        verify = ssl.create_default_context()
    else:
        other, _, _ = make_dev_ca(tmp_path)
        verify = ssl.create_default_context(cafile=str(other))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{dev_stack.status['broker_url']}/v1/health", verify=verify, timeout=5)


def test_the_cli_reaches_the_broker_through_its_profile(dev_stack: Stack):
    # `guard requests` calls GET /v1/requests with the profile's broker and CA.
    token = dev_stack.guard("dev", "token", "alice")
    assert token.returncode == 0, token.stderr
    listed = dev_stack.guard("requests", env={"GUARD_ID_TOKEN": token.stdout.strip()})
    assert listed.returncode == 0, listed.stdout + listed.stderr


def test_the_cli_refuses_a_broker_its_ca_does_not_sign(dev_stack: Stack, tmp_path):
    other, _, _ = make_dev_ca(tmp_path)
    token = dev_stack.guard("dev", "token", "alice")
    env = {"GUARD_ID_TOKEN": token.stdout.strip(), "GUARD_BROKER_CA": str(other)}
    listed = dev_stack.guard("requests", env=env)
    assert listed.returncode != 0
    assert "cannot reach the guard broker" in listed.stderr
