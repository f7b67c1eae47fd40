"""guard's CLI against an independent, certified OpenID provider (oidc-provider on Node).

Every other test talks to guard's own dev IdP, written alongside the CLI: these prove the
device flow (RFC 8628), the silent refresh of an expired ID token with a provider that
rotates refresh tokens and revokes a login whose spent refresh token comes back, RFC 7009
revocation at logout, and a broker trusting a second issuer, with a provider guard's
authors did not write. The CLI runs as a user runs it (subprocesses, a 0600 token file);
approval is headless (tests/fix_node_idp.py). Tokens are compared by digest, never shown.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from guard.cli.auth import MIN_VALIDITY, seconds_left, unverified_claims
from tests.fix_node_idp import NodeIdP, node_idp  # noqa: F401
from tests.fix_stack import DEMO_POLICY, Stack, stack_with_policy

pytestmark = pytest.mark.ci_identity

GUARD = [sys.executable, "-m", "guard.cli.main"]
SCOPE = "openid profile email groups offline_access"
# Nothing listens there: the tests before the broker's need only a configured URL.
NO_BROKER = "https://127.0.0.1:9"
_USER_CODE = re.compile(r"enter the code\s+(\S+)")
MASKED_SSN = "***-**-6789"  # customer 1 of the demo data (raw 123-45-6789)
JOB = (
    "import os, psycopg\n"
    "with psycopg.connect(os.environ['DATABASE_URL']) as conn:\n"
    "    print(conn.execute('SELECT ssn FROM customers WHERE id = 1').fetchone()[0])\n"
)


def digest(token: str) -> str:
    """What a test compares and shows instead of a token."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass
class Cli:
    """guard's CLI in its own GUARD_HOME, configured from the environment only."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*GUARD, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def login(self, idp: NodeIdP, username: str) -> str:
        """`guard login`, approved as `username` at the provider; its output."""
        status, out = self.login_run(lambda code: idp.approve(code, username))
        assert status == 0, out
        return out

    def login_run(
        self, decide: Callable[[str], None] | None, env: dict[str, str] | None = None
    ) -> tuple[int | None, str]:
        """`guard login` while `decide(user_code)` acts at the provider; its exit status
        and output. `decide=None`: its output up to the end of the sign-in text (the complete
        link), then it is stopped (status None)."""
        process = subprocess.Popen(
            [*GUARD, "login", "--no-browser"],
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output: list[str] = []
        code_seen, box_seen = threading.Event(), threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                output.append(line)
                if _USER_CODE.search(line):
                    code_seen.set()
                if line.startswith("or open"):  # the last line of the sign-in text
                    box_seen.set()
            code_seen.set()
            box_seen.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        status = None
        try:
            if decide is None:
                assert box_seen.wait(30), "guard login printed no complete sign-in link"
            else:
                assert code_seen.wait(30), "guard login printed no user code"
                code = _USER_CODE.search("".join(output))
                assert code, f"guard login printed no user code:\n{''.join(output)}"
                decide(code[1])
                # oidc-provider names no polling interval: guard waits the RFC's 5 s.
                status = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            reader.join(10)
            if process.stdout is not None:
                process.stdout.close()
        return status, "".join(output)

    def tokens(self, idp: NodeIdP) -> dict[str, str]:
        """The stored login (the file guard keeps with GUARD_KEYRING=file)."""
        path = self.home / "credentials.json"
        return json.loads(path.read_text()).get(f"{idp.issuer} {idp.client_id}") or {}

    def wait_until_due(self, idp: NodeIdP) -> None:
        """Sleep until guard no longer sends the stored ID token (refresh due)."""
        left = seconds_left(self.tokens(idp)["id_token"])
        time.sleep(max(0.0, left - MIN_VALIDITY) + 0.5)


def make_cli(home: Path, idp: NodeIdP, **profile: str) -> Cli:
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")}
    env.update(
        {
            "GUARD_HOME": str(home),
            "GUARD_KEYRING": "file",
            "GUARD_ISSUER": idp.issuer,
            "GUARD_CLIENT_ID": idp.client_id,
            "GUARD_SCOPE": SCOPE,
            "GUARD_BROKER_URL": NO_BROKER,
            **profile,
        }
    )
    return Cli(home=home, env=env)


@pytest.fixture
def cli(node_idp: NodeIdP, tmp_path: Path) -> Cli:  # noqa: F811
    return make_cli(tmp_path / "home", node_idp)


def test_login_stores_the_login_and_logout_revokes_it(cli: Cli, node_idp: NodeIdP) -> None:  # noqa: F811
    out = cli.login(node_idp, "alice")
    assert "logged in as alice (engineers)" in out
    assert f"{node_idp.issuer}/device" in out  # the verification URI, as the IdP names it
    stored = cli.tokens(node_idp)
    assert {"id_token", "refresh_token"} <= stored.keys()
    assert stat.S_IMODE((cli.home / "credentials.json").stat().st_mode) == 0o600
    claims = unverified_claims(stored["id_token"]) or {}
    assert (claims["iss"], claims["aud"], claims["sub"]) == (node_idp.issuer, "guard-cli", "alice")
    assert claims["groups"] == ["engineers"]
    assert claims["email"] == "alice@example.com"

    result = cli.run("logout")
    assert result.returncode == 0, result.stderr
    assert "logged out (the login was revoked at the identity provider)" in result.stderr
    assert cli.tokens(node_idp) == {}
    refused = node_idp.refresh(stored["refresh_token"])
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    result = cli.run("status")
    assert result.returncode != 0
    assert "not logged in" in result.stderr


def test_login_cancelled_at_the_provider_is_denied(cli: Cli, node_idp: NodeIdP) -> None:  # noqa: F811
    status, out = cli.login_run(node_idp.cancel)
    assert status == 1, out
    assert "the sign-in was denied" in out
    assert not (cli.home / "credentials.json").exists()


def test_login_prints_the_complete_verification_uri_on_one_line(
    cli: Cli,
    node_idp: NodeIdP,  # noqa: F811
) -> None:
    # 40 columns: the complete URI here is ~50 characters; a real IdP's (a Keycloak
    # realm's) passes 76, the inside of the box on an 80-column console, just as easily.
    _, out = cli.login_run(None, env={"COLUMNS": "40"})
    code = _USER_CODE.search(out)
    assert code, out
    assert f"{node_idp.issuer}/device?user_code={code[1]}" in out


def test_expired_id_token_is_refreshed_and_the_spent_token_dies(
    cli: Cli,
    node_idp: NodeIdP,  # noqa: F811
) -> None:
    cli.login(node_idp, "bob")
    before = cli.tokens(node_idp)
    cli.wait_until_due(node_idp)
    # Any command that needs a token refreshes first; no broker listens, so it then fails
    # to reach it, but not for want of a login.
    granted, refused = node_idp.refreshes()
    result = cli.run("status")
    assert result.returncode != 0
    assert "cannot reach the guard broker" in result.stderr, result.stderr
    after = cli.tokens(node_idp)
    assert digest(after["id_token"]) != digest(before["id_token"])
    assert seconds_left(after["id_token"]) > MIN_VALIDITY
    assert (unverified_claims(after["id_token"]) or {})["groups"] == ["security-leads"]
    assert node_idp.refreshes() == (granted + 1, refused)
    # Rotated: the provider refuses the spent refresh token (and, by its reuse detection,
    # ends the whole login; that is what the CLI's refresh lock exists to prevent).
    assert digest(after["refresh_token"]) != digest(before["refresh_token"])
    reused = node_idp.refresh(before["refresh_token"])
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    assert node_idp.refresh(after["refresh_token"]).status_code == 400


@pytest.fixture(scope="module")
def node_stack(
    dev_stack: Stack,
    node_idp: NodeIdP,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
):
    """A demo stack whose broker trusts the Node provider beside its dev IdP."""
    work = tmp_path_factory.mktemp("node-stack")
    issuers = work / "trusted_issuers.yaml"
    entry = {
        "name": "node-oidc-provider",
        "issuer": node_idp.issuer,
        "audience": node_idp.client_id,
        "kind": "person",
        "groups_claim": "groups",
    }
    issuers.write_text(yaml.safe_dump([entry]))
    env = {"GUARD_DEV_TRUSTED_ISSUERS": str(issuers)}
    with stack_with_policy(dev_stack, work / "home", DEMO_POLICY.read_text(), env=env) as stack:
        yield stack


def test_exec_through_a_broker_trusting_the_provider_and_eight_at_expiry(
    node_stack: Stack,
    node_idp: NodeIdP,  # noqa: F811
    tmp_path: Path,
) -> None:
    cli = make_cli(
        tmp_path / "home",
        node_idp,
        GUARD_BROKER_URL=node_stack.status["broker_url"],
        GUARD_BROKER_CA=node_stack.status["broker_ca"],
        GUARD_GATEWAY_CA=node_stack.status["gateway_ca"],
    )
    job = tmp_path / "job.py"
    job.write_text(JOB)
    cli.login(node_idp, "alice")

    status = cli.run("status", "--json")
    assert status.returncode == 0, status.stderr
    me = json.loads(status.stdout)
    assert me["issuer"] == node_idp.issuer
    assert me["groups"] == ["engineers"]
    assert (me["via"], me["kind"]) == ("node-oidc-provider", "person")

    first = cli.run("exec", "--db", "demo", "--", sys.executable, str(job))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == MASKED_SSN

    # Eight at once, right when the ID token is due: one refreshes (under the CLI's lock),
    # the others wait and take its tokens. A second use of a spent refresh token would
    # make the provider revoke the login, and most of them would fail.
    cli.wait_until_due(node_idp)
    before = cli.tokens(node_idp)
    granted, refused = node_idp.refreshes()
    with ThreadPoolExecutor(8) as pool:
        runs = list(
            pool.map(
                lambda _: cli.run("exec", "--db", "demo", "--", sys.executable, str(job)),
                range(8),
            )
        )
    failed = [r.stderr for r in runs if r.returncode != 0 or r.stdout.strip() != MASKED_SSN]
    assert not failed, failed[0]
    after = cli.tokens(node_idp)
    assert digest(after["refresh_token"]) != digest(before["refresh_token"])
    # No spent refresh token was sent again (one refresh, a second only if a command
    # started after the fresh ID token was due in turn, FRESH_FOR seconds later).
    granted_after, refused_after = node_idp.refreshes()
    assert refused_after == refused
    assert granted_after > granted

    # The login survived: a further exec needs no `guard login`, and the stored refresh
    # token is still the provider's live one.
    again = cli.run("exec", "--db", "demo", "--", sys.executable, str(job))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == MASKED_SSN
