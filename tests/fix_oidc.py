"""Session fixture: the real dev OIDC provider in a subprocess (poll interval 1 s).

`dev_idp.token_for("alice")` runs the whole device flow over HTTP (device authorization,
approval on the `/device` form, token request) and returns a real RS256 ID token. Tokens
are never printed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DevIdP:
    issuer: str
    client_id: str
    state_dir: Path
    interval: int
    process: subprocess.Popen[bytes]

    def start_device(self, client_id: str | None = None) -> dict[str, Any]:
        response = httpx.post(
            f"{self.issuer}/device_authorization",
            data={"client_id": client_id or self.client_id, "scope": "openid groups"},
        )
        response.raise_for_status()
        return response.json()

    def decide(self, user_code: str, username: str = "", action: str = "approve") -> httpx.Response:
        return httpx.post(
            f"{self.issuer}/device",
            data={"user_code": user_code, "username": username, "action": action},
        )

    def poll(self, device_code: str) -> httpx.Response:
        return httpx.post(
            f"{self.issuer}/token",
            data={
                "grant_type": DEVICE_GRANT,
                "device_code": device_code,
                "client_id": self.client_id,
            },
        )

    def refresh(self, refresh_token: str) -> httpx.Response:
        return httpx.post(
            f"{self.issuer}/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": self.client_id,
            },
        )

    def tokens_for(self, username: str) -> dict[str, Any]:
        """The full device flow for `username`: the token response (id/refresh/access)."""
        start = self.start_device()
        self.decide(start["user_code"], username).raise_for_status()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = self.poll(start["device_code"])
            if response.status_code == 200:
                return response.json()
            error = response.json()["error"]
            if error not in ("authorization_pending", "slow_down"):
                raise AssertionError(f"device flow failed: {error}")
            time.sleep(start["interval"] + (5 if error == "slow_down" else 0))
        raise AssertionError("device flow did not finish in 30 s")

    def token_for(self, username: str) -> str:
        return self.tokens_for(username)["id_token"]


@pytest.fixture(scope="session")
def dev_idp(tmp_path_factory: pytest.TempPathFactory):
    state_dir = tmp_path_factory.mktemp("dev-idp")
    port = _free_port()
    log = (state_dir / "idp.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guard.devstack.idp",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
            "--client-id",
            "guard-cli",
            "--interval",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    idp = DevIdP(f"http://127.0.0.1:{port}", "guard-cli", state_dir, 1, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"dev IdP did not start:\n{(state_dir / 'idp.log').read_text()}")
            try:
                httpx.get(f"{idp.issuer}/.well-known/openid-configuration", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield idp
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
