"""Session fixture: the real demo stack (`guard dev up --detach`) in a throwaway GUARD_HOME.

Everything is the real part: PostgreSQL, OpenBao, the dev OIDC provider and the broker,
started by the same command a newcomer runs. Skips when PostgreSQL or OpenBao is missing,
except with CI=true, where that fails the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import httpx

GUARD = [sys.executable, "-m", "guard.cli.main"]
DEMO_POLICY = Path(__file__).resolve().parents[1] / "guard" / "devstack" / "policies.yaml"


def _have_postgres() -> bool:
    from guard.devstack.postgres import find_pg_bindir

    return find_pg_bindir() is not None


def _have_openbao() -> bool:
    return (Path(sys.executable).parent / "bao").exists() or shutil.which("bao") is not None


@dataclass
class Stack:
    home: Path
    status: dict
    env: dict[str, str]

    def guard(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*GUARD, *args],
            env={**self.env, **(env or {})},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def broker_tls(self) -> ssl.SSLContext:
        """Verifies the broker API's HTTPS certificate against the stack's CA."""
        return ssl.create_default_context(cafile=self.status["broker_ca"])

    def http(self, **kwargs) -> httpx.Client:
        """An httpx client of this stack's broker API over verified HTTPS (the dev CA):
        `with stack.http(headers=...) as http: http.post("/v1/sessions", ...)`."""
        import httpx

        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.status["broker_url"], verify=self.broker_tls(), **kwargs)

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One broker API call (`path` like /v1/sessions) over verified HTTPS."""
        with self.http() as http:
            return http.request(method, path, **kwargs)

    def end_session(self, session_id: str, headers: dict[str, str]) -> httpx.Response:
        return self.api("DELETE", f"/v1/sessions/{session_id}", headers=headers)

    def request_session(self, token: str, target: str = "demo") -> httpx.Response:
        """POST /v1/sessions with `token` as the bearer: the broker's answer, whatever it is."""
        return self.api(
            "POST",
            "/v1/sessions",
            json={"target": target},
            headers={"Authorization": f"Bearer {token}"},
        )

    def open_session(self, user: str = "alice") -> tuple[dict, dict[str, str]]:
        """POST /v1/sessions as `user` (dev IdP token); (created body, auth headers). The
        body also carries `gateway_ca` (this stack's CA file, not part of the API's answer)
        so helpers given only the body can reach the gateway over verified TLS."""
        token = self.guard("dev", "token", user)
        assert token.returncode == 0, token.stderr
        headers = {"Authorization": f"Bearer {token.stdout.strip()}"}
        created = self.api(
            "POST", "/v1/sessions", json={"target": "demo", "reason": "tests"}, headers=headers
        )
        assert created.status_code == 201, created.text
        return {**created.json(), "gateway_ca": self.status["gateway_ca"]}, headers

    def direct(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of `sql` run straight on PostgreSQL as the admin: what the gateway's
        answers are compared with."""
        import psycopg

        with psycopg.connect(self.admin_dsn) as conn:
            return conn.execute(sql, params).fetchall()

    @property
    def audit_path(self) -> Path:
        return Path(self.status["audit_log"])

    def audit_records(self) -> list[dict]:
        """Every record, result batches expanded, read after one of the broker's flush
        intervals (200 ms): result records, and statement records when the audit log has no
        fsync (the demo stack: they wait in its journal), reach the file within one."""
        from guard.broker.audit.record import expand
        from guard.broker.health import FLUSH_INTERVAL

        time.sleep(FLUSH_INTERVAL * 1.5)

        return [
            record
            for line in self.audit_path.read_text().splitlines()
            if line
            for record in expand(json.loads(line)["body"])
        ]

    def libpq_env(self, session: dict) -> dict[str, str]:
        """Environment for libpq tools (psql, pgbench) reaching the gateway for `session`:
        verified TLS against the dev CA, and no stray PG* variables from the caller."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
            "PGHOST": session["gateway_host"],
            "PGPORT": str(session["gateway_port"]),
            "PGUSER": session["user"],
            "PGPASSWORD": session["password"],
            "PGDATABASE": session["database"],
            "PGSSLMODE": "verify-full",
            "PGSSLROOTCERT": self.status["gateway_ca"],
            "PGCONNECT_TIMEOUT": "10",
        }

    @property
    def admin_dsn(self) -> str:
        return self.status["upstream_dsn"]


@pytest.fixture(scope="session")
def dev_stack(tmp_path_factory) -> Stack:
    missing = [
        name
        for name, ok in (("PostgreSQL", _have_postgres()), ("OpenBao", _have_openbao()))
        if not ok
    ]
    if missing:
        message = f"{' and '.join(missing)} not available"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: this is a failure, not a skip)")
        pytest.skip(message)
    home = tmp_path_factory.mktemp("guard-home")
    env = {**os.environ, "GUARD_HOME": str(home), "GUARD_KEYRING": "file"}
    env.pop("GUARD_ID_TOKEN", None)
    up = subprocess.run(
        [*GUARD, "dev", "up", "--detach"], env=env, capture_output=True, text=True, timeout=120
    )
    if up.returncode != 0:
        subprocess.run([*GUARD, "dev", "down"], env=env, capture_output=True, timeout=60)
        pytest.fail(f"guard dev up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    status = json.loads(
        subprocess.run(
            [*GUARD, "dev", "status", "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    stack = Stack(home=home, status=status, env=env)
    yield stack
    subprocess.run([*GUARD, "dev", "down"], env=env, capture_output=True, timeout=60)


@contextlib.contextmanager
def stack_with_rules(base: Stack, home: Path, rules: str) -> Iterator[Stack]:
    """A second demo stack whose policy is the demo policy plus `rules` (YAML rule
    entries); see `stack_with_policy`."""
    with stack_with_policy(base, home, DEMO_POLICY.read_text() + rules) as stack:
        yield stack


@contextlib.contextmanager
def stack_with_policy(
    base: Stack, home: Path, text: str, env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """A second demo stack (own GUARD_HOME, ports, cluster) whose policy is `text`. `base`
    is the `dev_stack` fixture: its environment, and its skip/fail rules when PostgreSQL
    or OpenBao is missing. `env` adds to the environment `guard dev up` runs in (the dev
    stack's knobs: GUARD_DEV_USERS, GUARD_DEV_ID_TOKEN_LIFETIME, …)."""
    home.mkdir(parents=True, exist_ok=True)
    policy = home / "policies.yaml"
    policy.write_text(text)
    env = {**base.env, **(env or {}), "GUARD_HOME": str(home)}
    up = subprocess.run(
        [*GUARD, "dev", "up", "--detach", "--policy", str(policy)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert up.returncode == 0, f"guard dev up --policy failed:\n{up.stdout}\n{up.stderr}"
        status = json.loads(
            subprocess.run(
                [*GUARD, "dev", "status", "--json"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert status["policy_file"] == str(policy.resolve())
        yield Stack(home=home, status=status, env=env)
    finally:
        subprocess.run([*GUARD, "dev", "down"], env=env, capture_output=True, timeout=60)


@contextlib.contextmanager
def denying_approvals(
    stack: Stack, *, reviewer: str = "carol", reason: str = "approval withheld by the test"
) -> Iterator[None]:
    """While inside, every approval request the reviewer may decide is denied at once: for
    tests that send a gated statement to see the session go on after it is refused."""
    import threading

    token = stack.guard("dev", "token", reviewer)
    assert token.returncode == 0, token.stderr
    headers = {"Authorization": f"Bearer {token.stdout.strip()}"}
    url = f"{stack.status['broker_url']}/v1/approvals"
    stop = threading.Event()

    def deny_all() -> None:
        with stack.http(headers=headers, timeout=10) as http:
            while not stop.is_set():
                for request in http.get(url).json():
                    http.post(f"{url}/{request['id']}/deny", json={"comment": reason})
                stop.wait(0.05)

    thread = threading.Thread(target=deny_all, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def gateway_connect(session: dict, **kwargs):
    """psycopg through the gateway over verified TLS (the session's stack's dev CA): how
    a client guard handed a session connects."""
    import psycopg

    return psycopg.connect(
        host=session["gateway_host"],
        port=session["gateway_port"],
        user=session["user"],
        password=session["password"],
        dbname=session["database"],
        sslmode="verify-full",
        sslrootcert=session["gateway_ca"],
        connect_timeout=10,
        **kwargs,
    )
