"""Session lifecycle faults of issue 12 against the real stack: a broker process of its own.

Each test starts `guard-broker` with the dev stack's broker config (same PostgreSQL,
OpenBao, dev IdP, certificates) but its own ports, state and audit log, and short session
intervals, so it can be killed, signalled or cut off from OpenBao without disturbing the
shared `dev_stack` broker. Waits poll for the outcome with generous deadlines; nothing
depends on how fast the machine is.

Reproduced: a `kill -9`ed CLI's session (and database role) outliving it (finding 3); the
end of a session needing the ID token (2); a revocation given up while OpenBao was down,
with /v1/health saying ok (8); a broker restart forgetting owed revocations; SIGTERM/SIGINT
ending nothing (10); one principal opening sessions without limit (9); a session opened
on a full audit disk (a small tmpfs) answered by a plain-text 500 and a half-open state (7).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml

from tests.fix_stack import GUARD, Stack, dev_stack  # noqa: F401

pytestmark = pytest.mark.integration

DEADLINE = 60.0


def wait_for(what: str, check: Callable[[], object], deadline: float = DEADLINE) -> object:
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpCut:
    """A TCP forwarder to `target` that the test can cut (every connection closed, new
    ones refused) and restore: OpenBao going away for one broker only."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def set_cut(self, cut: bool) -> None:
        if cut:
            self.cut.set()
            with self._lock:
                socks, self._socks = self._socks, set()
            for s in socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        else:
            self.cut.clear()

    def close(self) -> None:
        self.set_cut(True)
        self._listener.close()


@dataclass
class Broker:
    stack: Stack
    config_path: Path
    config: dict
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        scheme = "https" if self.config.get("api_tls") else "http"
        return f"{scheme}://127.0.0.1:{self.config['api']['port']}"

    def http(self, **kwargs) -> httpx.Client:
        verify = self.stack.broker_tls() if self.config.get("api_tls") else True
        return httpx.Client(base_url=self.url, verify=verify, timeout=30, **kwargs)

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        with self.http() as http:
            return http.request(method, path, **kwargs)

    def token(self, user: str) -> str:
        out = self.stack.guard("dev", "token", user)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def open(self, user: str = "alice", **body) -> tuple[dict, dict[str, str]]:
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        created = self.api("POST", "/v1/sessions", json={"target": "demo", **body}, headers=headers)
        assert created.status_code == 201, created.text
        return created.json(), headers

    def db_role(self, created: dict) -> str:
        """The database role OpenBao issued for the session (asked through the gateway)."""
        gw = self.config["gateway"]
        with psycopg.connect(
            host="127.0.0.1",
            port=gw["port"],
            user=created["user"],
            password=created["password"],
            dbname=created["database"],
            sslmode="verify-full",
            sslrootcert=self.stack.status["gateway_ca"],
            connect_timeout=10,
        ) as conn:
            return conn.execute("SELECT current_user").fetchone()[0]

    def audit(self) -> list[dict]:
        from guard.broker.audit.record import expand

        path = Path(self.config["audit"]["path"])
        if not path.exists():
            return []
        return [
            record
            for line in path.read_text().splitlines()
            if line.strip()
            for record in expand(json.loads(line)["body"])
        ]

    def ended(self, session_id: str) -> list[str]:
        return [
            r.get("detail", "")
            for r in self.audit()
            if r.get("kind") == "session"
            and r.get("session_id") == session_id
            and r.get("event") == "ended"
        ]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"broker did not stop on {signal.Signals(sig).name}:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def role_exists(stack: Stack, role: str) -> bool:
    return bool(stack.direct("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)))


@pytest.fixture
def start_broker(dev_stack: Stack, tmp_path) -> Iterator[Callable[..., Broker]]:  # noqa: F811
    started: list[Broker] = []

    def start(
        *,
        state: Path | None = None,
        openbao_addr: str | None = None,
        audit: Path | None = None,
        gateway: dict | None = None,
        **sessions,
    ) -> Broker:
        config = yaml.safe_load(Path(dev_stack.status["broker_config"]).read_text())
        n = len(started)
        config["state_dir"] = str(state or tmp_path / f"state{n}")
        config["audit"] = {**config["audit"], "path": str(audit or tmp_path / f"audit{n}.jsonl")}
        config["api"] = {**config.get("api", {}), "port": free_port()}
        config["gateway"] = {**config.get("gateway", {}), "port": free_port(), **(gateway or {})}
        if openbao_addr is not None:
            config["openbao"] = {**config["openbao"], "addr": openbao_addr}
        config["sessions"] = {
            "heartbeat_interval_seconds": 0.2,
            "heartbeat_grace_seconds": 2.0,
            "expiry_check_seconds": 0.1,
            "revoke_retry_initial_seconds": 0.1,
            "revoke_retry_max_seconds": 0.5,
            **sessions,
        }
        path = tmp_path / f"broker{n}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = tmp_path / f"broker{n}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "guard.broker.service", "--config", str(path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        broker = Broker(dev_stack, path, config, proc, log)
        started.append(broker)

        def up() -> bool:
            assert proc.poll() is None, f"broker exited:\n{broker.tail()}"
            with contextlib.suppress(httpx.TransportError):
                return broker.api("GET", "/v1/health").status_code in (200, 503)
            return False

        wait_for("the broker's API", up)
        return broker

    yield start
    for broker in started:
        if broker.proc.poll() is None:
            broker.stop()


# ------------------------------------------------------------------ findings 2 and 3
def test_a_killed_cli_loses_its_session_when_heartbeats_stop(start_broker):
    """`kill -9` of `guard exec`: the broker ends the session after the heartbeat grace
    (2 s here, 45 s by default), revoking the database role."""
    broker = start_broker()
    child = (
        "import os, sys, time, psycopg\n"
        "role = psycopg.connect(os.environ['DATABASE_URL'])"
        ".execute('select current_user').fetchone()[0]\n"
        "print(role, os.environ['PGUSER'], os.getpid(), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {
        **broker.stack.env,
        "GUARD_BROKER_URL": broker.url,
        "GUARD_ID_TOKEN": broker.token("alice"),
    }
    cli = subprocess.Popen(
        [*GUARD, "exec", "--db", "demo", "--", sys.executable, "-c", child],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = cli.stdout.readline()  # type: ignore[union-attr]
        assert line, cli.stderr.read()  # type: ignore[union-attr]
        role, gateway_user, child_pid = line.split()
        session_id = gateway_user.removeprefix("guard_")
        assert role_exists(broker.stack, role)
        # Heartbeats arrive: the deadline moves (seen with the owner's ID token).
        headers = {"Authorization": f"Bearer {env['GUARD_ID_TOKEN']}"}

        def deadline() -> str:
            info = broker.api("GET", f"/v1/sessions/{session_id}", headers=headers)
            assert info.status_code == 200, info.text
            return info.json()["heartbeat_deadline"]

        first = deadline()
        wait_for("a heartbeat", lambda: deadline() != first)
        cli.kill()
        cli.wait()
        os.kill(int(child_pid), signal.SIGKILL)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    wait_for("the role's revocation", lambda: not role_exists(broker.stack, role))
    # The `ended` record follows the revocation: wait for it rather than race it.
    wait_for("the end's audit record", lambda: broker.ended(session_id))
    assert broker.ended(session_id) == ["heartbeat lost (none for 2 s)"]


def test_a_session_ends_with_its_own_credential_without_an_id_token(start_broker):
    broker = start_broker()
    created, _ = broker.open(heartbeat=True)
    role = broker.db_role(created)
    sid = created["session_id"]
    assert created["session_token"].startswith("gsc_")
    expired = {"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.expired.signature"}
    assert broker.api("DELETE", f"/v1/sessions/{sid}", headers=expired).status_code == 401
    wrong = {"Authorization": "Bearer gsc_not-this-sessions-credential"}
    assert broker.api("DELETE", f"/v1/sessions/{sid}", headers=wrong).status_code == 404
    own = {"Authorization": f"Bearer {created['session_token']}"}
    assert broker.api("POST", f"/v1/sessions/{sid}/heartbeat", headers=own).status_code == 200
    assert broker.api("DELETE", f"/v1/sessions/{sid}", headers=own).status_code == 204
    # The client's own end is answered once the revocation is owed on disk; it runs after.
    wait_for("the role's revocation", lambda: not role_exists(broker.stack, role))
    assert broker.ended(sid) == ["ended by client"]


# ------------------------------------------------------------------ finding 8
def test_revocation_is_retried_until_openbao_is_back_and_health_says_degraded(
    start_broker,
    dev_stack,  # noqa: F811
):
    addr = httpx.URL(
        yaml.safe_load(Path(dev_stack.status["broker_config"]).read_text())["openbao"]["addr"]
    )
    cut = TcpCut(addr.host, addr.port or 8200)
    try:
        broker = start_broker(openbao_addr=f"{addr.scheme}://127.0.0.1:{cut.port}")
        created, headers = broker.open()
        role = broker.db_role(created)
        cut.set_cut(True)
        sid = created["session_id"]
        assert broker.api("DELETE", f"/v1/sessions/{sid}", headers=headers).status_code == 204
        # The revocation is attempted after the DELETE's answer (the debt is on disk first),
        # so health turns degraded when that attempt has failed, a moment later.
        wait_for("health degraded", lambda: broker.api("GET", "/v1/health").status_code == 503)
        health = broker.api("GET", "/v1/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "degraded"
        assert any(r.startswith("openbao:") for r in health.json()["reasons"])
        assert role_exists(broker.stack, role)  # still there: OpenBao could not be told
        cut.set_cut(False)
        wait_for("the retried revocation", lambda: not role_exists(broker.stack, role))
        wait_for("health ok", lambda: broker.api("GET", "/v1/health").status_code == 200)
        assert broker.api("GET", "/v1/health").json() == {"status": "ok"}
    finally:
        cut.close()


def test_a_restarted_broker_goes_on_with_revocations_it_owed(start_broker, dev_stack, tmp_path):  # noqa: F811
    addr = httpx.URL(
        yaml.safe_load(Path(dev_stack.status["broker_config"]).read_text())["openbao"]["addr"]
    )
    cut = TcpCut(addr.host, addr.port or 8200)
    state = tmp_path / "shared-state"
    try:
        first = start_broker(state=state, openbao_addr=f"{addr.scheme}://127.0.0.1:{cut.port}")
        created, _ = first.open()
        role = first.db_role(created)
        cut.set_cut(True)
        assert first.stop(signal.SIGTERM) == 0  # ends the session; the revocation fails
        assert role_exists(dev_stack, role)
        with sqlite3.connect(state / "broker.sqlite3") as db:
            owed = db.execute("SELECT count(*) FROM pending_revocations").fetchone()[0]
        assert owed == 1
        cut.set_cut(False)
        start_broker(state=state, openbao_addr=f"{addr.scheme}://127.0.0.1:{cut.port}")
        wait_for("the owed revocation", lambda: not role_exists(dev_stack, role))
    finally:
        cut.close()


# ------------------------------------------------------------------ finding 10
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_broker_ends_its_sessions_and_revokes_their_leases(start_broker, sig):
    broker = start_broker()
    created, _ = broker.open()
    role = broker.db_role(created)
    assert role_exists(broker.stack, role)
    assert broker.stop(sig) == 0, broker.tail()
    assert not role_exists(broker.stack, role)
    assert broker.ended(created["session_id"]) == ["broker shutting down"]


# ------------------------------------------------------------------ finding 9
def test_sessions_per_principal_are_limited_with_a_429_and_an_audit_record(start_broker):
    broker = start_broker(max_sessions_per_principal=2)
    opened = [broker.open("bob") for _ in range(2)]
    headers = opened[0][1]
    refused = broker.api("POST", "/v1/sessions", json={"target": "demo"}, headers=headers)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == "session_limit" and refused.json()["hint"]
    limited = [r for r in broker.audit() if r.get("event") == "limit-reached"]
    bobs = {
        r["principal"] for r in broker.audit() if r.get("session_id") == opened[0][0]["session_id"]
    }
    assert len(limited) == 1 and {limited[0]["principal"]} == bobs
    broker.open("alice")  # another principal is not limited by bob's sessions
    for created, h in opened:
        sid = created["session_id"]
        assert broker.api("DELETE", f"/v1/sessions/{sid}", headers=h).status_code == 204
    broker.open("bob")


def test_api_errors_are_json(start_broker):
    broker = start_broker()
    headers = {"Authorization": f"Bearer {broker.token('alice')}"}
    bad = broker.api("POST", "/v1/sessions", json={"target": 5, "x": 1}, headers=headers)
    assert bad.status_code == 422
    assert bad.json()["error"] == "invalid_request" and bad.json()["hint"]
    assert broker.api("GET", "/v1/nowhere").json()["error"] == "not_found"


# ------------------------------------------------------------------ finding 7 (open)
@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_open_on_a_full_audit_disk_is_a_json_503_and_leaves_nothing_open(
    start_broker, small_disk, tmp_path
):
    state = tmp_path / "full-disk-state"
    broker = start_broker(state=state, audit=small_disk / "audit.jsonl")
    headers = {"Authorization": f"Bearer {broker.token('alice')}"}
    filler = small_disk / "filler"
    with open(filler, "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    answer = broker.api("POST", "/v1/sessions", json={"target": "demo"}, headers=headers)
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["error"] == "audit_unavailable" and body["hint"]
    with sqlite3.connect(state / "broker.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM sessions WHERE ended_at IS NULL").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM pending_revocations").fetchone() == (0,)
    health = broker.api("GET", "/v1/health")
    assert health.status_code == 503 and health.json()["reasons"][0].startswith("audit:")
    filler.unlink()
    created, _ = broker.open()  # room again: sessions open, health recovers
    assert broker.api("GET", "/v1/health").json() == {"status": "ok"}
    broker.stop()
    assert broker.ended(created["session_id"]) == ["broker shutting down"]
