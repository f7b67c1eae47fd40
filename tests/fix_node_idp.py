"""Session fixture `node_idp`: an independent, certified OpenID provider (panva's
`oidc-provider` 9, on Node) on 127.0.0.1, for interop tests of guard's CLI.

The provider program is tests/interop/node_idp/provider.mjs (its header says what it
offers: the device flow, rotating refresh tokens with reuse detection, RS256, a `groups`
claim, RFC 7009 revocation); its users and groups are the dev stack's
(guard/devstack/users.yaml). `scripts/bootstrap` installs its node_modules (`npm ci`).
Approval is headless, over HTTP: `node_idp.approve(user_code, "alice")` confirms the code
on the provider's /device form (its cookie and xsrf field) and signs alice in at the
interaction endpoint provider.mjs adds. No browser.

It also plays a CI issuer: `node_idp.ci_token("ci-main")` is an ID token of the second
client `guard-ci` (its `aud`) whose claims are a GitHub Actions job's, those of
CI_ACCOUNTS["ci-main"] (shaped by tests/fix_ci_issuer.py's github_claims), with a new
`jti` each time: got through the same device flow, approved as the CI account.

Skips when Node, npm or the node_modules are missing, except with CI=true, where that is a
failure. Tokens are never printed; the provider's stderr goes to a file in the test's
temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from guard.cli.auth import MIN_VALIDITY
from tests.fix_ci_issuer import github_claims
from tests.fix_pg import require

NODE_IDP_DIR = Path(__file__).resolve().parent / "interop" / "node_idp"
USERS = Path(__file__).resolve().parents[1] / "guard" / "devstack" / "users.yaml"
CLIENT_ID = "guard-cli"
CI_CLIENT_ID = "guard-ci"  # the `aud` of CI tokens: a broker's workload issuer's audience
_FORK = {
    "repository": "mallory/app",
    "repository_id": "666",
    "repository_owner": "mallory",
    "repository_owner_id": "666",
}
# CI accounts: GitHub Actions jobs of octo/app (owner 1001, repository 4242) and others.
# Each one's `sub` is its own (oidc-provider's account id).
CI_ACCOUNTS = {
    # A push to the protected main branch: what a deploy binding admits.
    "ci-main": github_claims(),
    # A fork's pull request (another owner, pull_request event).
    "ci-fork": github_claims(
        **_FORK,
        sub="repo:mallory/app:pull_request",
        ref="refs/pull/7/merge",
        ref_protected="false",
        event_name="pull_request",
        workflow_ref="mallory/app/.github/workflows/deploy.yml@refs/pull/7/merge",
        job_workflow_ref="mallory/app/.github/workflows/deploy.yml@refs/pull/7/merge",
    ),
    # The fork's own push to its main (its workflows, its owner).
    "ci-fork-push": github_claims(
        **_FORK,
        sub="repo:mallory/app:ref:refs/heads/main",
        workflow_ref="mallory/app/.github/workflows/deploy.yml@refs/heads/main",
        job_workflow_ref="mallory/app/.github/workflows/deploy.yml@refs/heads/main",
    ),
    # A push to another, unprotected branch of the right repository.
    "ci-branch": github_claims(
        sub="repo:octo/app:ref:refs/heads/feature",
        ref="refs/heads/feature",
        ref_protected="false",
        workflow_ref="octo/app/.github/workflows/deploy.yml@refs/heads/feature",
        job_workflow_ref="octo/app/.github/workflows/deploy.yml@refs/heads/feature",
    ),
    # A pull request from a branch of the repository itself.
    "ci-pull-request": github_claims(
        sub="repo:octo/app:pull_request",
        ref="refs/pull/8/merge",
        ref_protected="false",
        event_name="pull_request",
    ),
}
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# The ID token lives this long past the minute guard wants left on a token it sends
# (MIN_VALIDITY): fresh for guard right after a login or refresh, due for refresh after.
FRESH_FOR = 6
_XSRF = re.compile(r'name="xsrf" value="([^"]+)"')


@dataclass
class NodeIdP:
    issuer: str
    client_id: str
    ci_client_id: str
    id_token_ttl: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def fresh_for(self) -> int:
        """Seconds after issue during which guard sends an ID token without refreshing."""
        return self.id_token_ttl - MIN_VALIDITY

    def config(self) -> dict:
        response = httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=10)
        response.raise_for_status()
        return response.json()

    def approve(self, user_code: str, username: str) -> None:
        """Approve `user_code` as `username`, as a browser would: the /device form (the
        code, confirmed), then the sign-in interaction. AssertionError if the provider
        does not end on its success page."""
        with httpx.Client(base_url=self.issuer, follow_redirects=True, timeout=10) as browser:
            form = browser.get("/device")
            form.raise_for_status()
            xsrf = _XSRF.search(form.text)
            assert xsrf, "no xsrf field on the provider's /device form"
            confirmed = browser.post(
                "/device", data={"xsrf": xsrf[1], "user_code": user_code, "confirm": "yes"}
            )
            assert confirmed.status_code == 200, confirmed.text[:500]
            assert confirmed.url.path.startswith("/interaction/"), confirmed.url.path
            done = browser.post(confirmed.url.path, data={"username": username})
            assert done.status_code == 200, done.text[:500]
            assert "Sign-in Success" in done.text, done.text[:500]

    def cancel(self, user_code: str) -> None:
        """Cancel `user_code` on the /device form, as a user who did not start this
        sign-in would: the device flow ends in access_denied."""
        with httpx.Client(base_url=self.issuer, follow_redirects=True, timeout=10) as browser:
            form = browser.get("/device")
            form.raise_for_status()
            xsrf = _XSRF.search(form.text)
            assert xsrf, "no xsrf field on the provider's /device form"
            cancelled = browser.post(
                "/device", data={"xsrf": xsrf[1], "user_code": user_code, "abort": "yes"}
            )
            assert cancelled.status_code < 500, cancelled.text[:500]
            assert "Sign-in Success" not in cancelled.text

    def ci_token(self, account: str) -> str:
        """An ID token for the CI client, signed in as CI account `account` (a key of
        CI_ACCOUNTS): its claims, `aud` the CI client id, a new `jti`. Through the device
        flow (authorization, approval, one token request); never printed."""
        tokens = self.device_tokens(self.ci_client_id, "openid ci", account)
        assert "refresh_token" not in tokens
        return tokens["id_token"]

    def device_tokens(self, client_id: str, scope: str, username: str) -> dict:
        """The token response of a device flow of `client_id` for `scope`, approved as
        `username`, straight at the provider (no guard CLI)."""
        config = self.config()
        with httpx.Client(timeout=10) as http:
            started = http.post(
                config["device_authorization_endpoint"],
                data={"client_id": client_id, "scope": scope},
            )
            assert started.status_code == 200, started.text[:500]
            device = started.json()
            self.approve(device["user_code"], username)
            granted = http.post(
                config["token_endpoint"],
                data={
                    "grant_type": DEVICE_GRANT,
                    "device_code": device["device_code"],
                    "client_id": client_id,
                },
            )
            assert granted.status_code == 200, granted.json().get("error")
            return granted.json()

    def stats(self) -> dict:
        """provider.mjs's counters: `grants` (successful token requests by grant type) and
        `refreshRefused` (refresh requests it refused)."""
        response = httpx.get(f"{self.issuer}/interop/stats", timeout=10)
        response.raise_for_status()
        return response.json()

    def refreshes(self) -> tuple[int, int]:
        """(refreshes granted, refreshes refused) so far."""
        stats = self.stats()
        return stats["grants"].get("refresh_token", 0), stats["refreshRefused"]

    def refresh(self, refresh_token: str) -> httpx.Response:
        """A refresh grant, straight at the provider (a test reusing a spent token)."""
        return httpx.post(
            self.config()["token_endpoint"],
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": self.client_id,
            },
            timeout=10,
        )


def _ready_line(process: subprocess.Popen[bytes], log: Path, timeout: float) -> dict:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if selector.select(timeout):
            line = process.stdout.readline()
            if line:
                return json.loads(line)
    process.kill()
    process.wait(10)
    pytest.fail(f"oidc-provider did not start:\n{log.read_text()}", pytrace=False)


@pytest.fixture(scope="session")
def node_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeIdP]:
    node = shutil.which("node")
    require(
        "Node.js",
        node is not None and shutil.which("npm") is not None,
        "install Node.js (20 or later) and npm, then run scripts/bootstrap",
    )
    require(
        "oidc-provider",
        (NODE_IDP_DIR / "node_modules" / "oidc-provider" / "package.json").exists(),
        "run scripts/bootstrap (npm ci in tests/interop/node_idp)",
    )
    assert node is not None
    work = tmp_path_factory.mktemp("node-idp")
    users = work / "users.json"
    users.write_text(json.dumps(yaml.safe_load(USERS.read_text())["users"]))
    ci_accounts = work / "ci-accounts.json"
    ci_accounts.write_text(json.dumps(CI_ACCOUNTS))
    log = work / "provider.log"
    ttl = MIN_VALIDITY + FRESH_FOR
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [node, "provider.mjs", "--port", "0", "--users", str(users)]
            + ["--client-id", CLIENT_ID, "--id-token-ttl", str(ttl)]
            + ["--ci-accounts", str(ci_accounts), "--ci-client-id", CI_CLIENT_ID],
            cwd=NODE_IDP_DIR,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "NODE_ENV": "test"},
        )
    try:
        ready = _ready_line(process, log, timeout=30)
        idp = NodeIdP(
            issuer=ready["issuer"],
            client_id=CLIENT_ID,
            ci_client_id=CI_CLIENT_ID,
            id_token_ttl=ttl,
            log=log,
            process=process,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                assert idp.config()["issuer"] == idp.issuer
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield idp
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
