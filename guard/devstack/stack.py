"""`guard dev up/down/status`: the whole demo stack on loopback under one state dir.

Starts, in order: a throwaway PostgreSQL cluster with the demo bank database and the
policy's database backstop; an OpenBao dev server with the database secrets engine for
target `demo`; the dev OIDC provider; the broker (API + PG gateway) with SQLite state and
the policy file. Every process is recorded by pid in `stack.json` (mode 0600: it holds the
throwaway demo admin DSN) so `down` stops exactly what `up` started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from guard.broker.masking.objects import creation_statements, revocation_statements
from guard.broker.policy.compile import load_policy_file
from guard.devstack.backstop import apply_backstop
from guard.devstack.demo_data import create_demo_database
from guard.devstack.openbao import OpenBaoDevServer, configure_database_target
from guard.devstack.postgres import PostgresCluster, free_port, stop_cluster
from guard.devstack.tls import make_dev_ca

TARGET = "demo"
OPENBAO_ROLE = "guard-demo"
CLIENT_ID = "guard-cli"
REPO_POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"


class StackError(RuntimeError):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return True


def read_status(state_dir: Path) -> dict | None:
    path = state_dir / "stack.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    pids = data.get("pids", {})
    data["running"] = bool(pids) and all(alive(p) for p in pids.values())
    return data


def default_policy() -> Path:
    local = Path.cwd() / "policies.yaml"
    if local.exists():
        return local
    if REPO_POLICY.exists():
        return REPO_POLICY
    raise StackError("no policies.yaml found", hint="pass --policy FILE")


def _spawn(name: str, argv: list[str], state_dir: Path) -> subprocess.Popen[bytes]:
    log = open(state_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=state_dir,
        )
    finally:
        log.close()


def _wait_http(
    url: str, proc: subprocess.Popen[bytes], name: str, state_dir: Path, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    tail = (state_dir / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
    raise StackError(
        f"the {name} did not become ready at {url}:\n{tail}",
        hint=f"see {state_dir / 'logs' / (name + '.log')}",
    )


def up(state_dir: Path, policy_file: Path | None, progress: Callable[[str], None]) -> dict:
    existing = read_status(state_dir)
    if existing and any(alive(p) for p in existing.get("pids", {}).values()):
        raise StackError(
            f"a dev stack is already running in {state_dir}", hint="run `guard dev down` first"
        )
    if existing:
        down(state_dir)
    policy_path = (policy_file or default_policy()).resolve()
    policy = load_policy_file(policy_path)
    if TARGET not in policy.targets:
        raise StackError(f"{policy_path} has no target {TARGET!r}", hint="the demo needs it")
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    started: dict[str, int] = {}
    status: dict = {"state_dir": str(state_dir), "pids": started, "policy_file": str(policy_path)}
    pg = PostgresCluster()
    bao = OpenBaoDevServer()
    try:
        progress("PostgreSQL")
        tls_dir = state_dir / "tls"
        ca_file, cert_file, key_file = make_dev_ca(tls_dir)
        status["gateway_ca"] = str(ca_file)
        pg.start(tls=(tls_dir / "postgres.pem", tls_dir / "postgres-key.pem"))
        pg._owns_base = False  # it outlives this process; `down` removes it
        status["pg_base_dir"] = str(pg.base_dir)
        started["postgres"] = pg.pid or 0
        create_demo_database(pg.admin_dsn())
        apply_backstop(pg.admin_dsn(TARGET), policy.targets[TARGET])
        upstream_dsn = pg.admin_dsn(TARGET)
        status["upstream_dsn"] = upstream_dsn

        progress("OpenBao")
        bao.start(state_dir, detach=True)
        started["openbao"] = bao.pid or 0
        configure_database_target(
            bao.client(),
            connection_name=TARGET,
            role_name=OPENBAO_ROLE,
            host=pg.host,
            port=pg.port,
            database=TARGET,
            admin_user=pg.admin_user,
            admin_password=pg.admin_password,
            creation_statements=creation_statements(),
            revocation_statements=revocation_statements(),
        )
        status["openbao_addr"] = bao.addr

        progress("dev identity provider")
        idp_port = free_port()
        issuer = f"http://127.0.0.1:{idp_port}"
        idp = _spawn(
            "idp",
            [
                sys.executable,
                "-m",
                "guard.devstack.idp",
                "--host",
                "127.0.0.1",
                "--port",
                str(idp_port),
                "--state-dir",
                str(state_dir),
                "--client-id",
                CLIENT_ID,
            ],
            state_dir,
        )
        started["idp"] = idp.pid
        _wait_http(f"{issuer}/.well-known/openid-configuration", idp, "idp", state_dir)
        status["issuer"] = issuer

        progress("broker")
        api_port, gw_port = free_port(), free_port()
        dsn_file = state_dir / "upstream-admin-dsn"
        _write_private(dsn_file, upstream_dsn)
        config = {
            "state_dir": str(state_dir / "broker"),
            "policy_file": str(policy_path),
            "api": {"host": "127.0.0.1", "port": api_port},
            "gateway": {"host": "127.0.0.1", "port": gw_port},
            "gateway_tls": {"cert_file": str(cert_file), "key_file": str(key_file)},
            "oidc": {"issuer": issuer, "audience": CLIENT_ID},
            "openbao": {"addr": bao.addr, "token_file": str(state_dir / "openbao-token")},
            "targets": {
                TARGET: {
                    "host": pg.host,
                    "port": pg.port,
                    "database": TARGET,
                    "openbao_role": OPENBAO_ROLE,
                    "admin_dsn_file": str(dsn_file),
                    # Verified TLS with channel binding (SCRAM-SHA-256-PLUS) to the database.
                    "sslmode": "verify-full",
                    "sslrootcert": str(ca_file),
                }
            },
            "audit": {"path": str(state_dir / "audit.jsonl")},
        }
        config_path = state_dir / "broker.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        broker = _spawn(
            "broker",
            [sys.executable, "-m", "guard.broker.service", "--config", str(config_path)],
            state_dir,
        )
        started["broker"] = broker.pid
        broker_url = f"http://127.0.0.1:{api_port}"
        _wait_http(f"{broker_url}/v1/health", broker, "broker", state_dir)
        status.update(
            broker_url=broker_url,
            gateway=f"127.0.0.1:{gw_port}",
            audit_log=config["audit"]["path"],
            broker_config=str(config_path),
        )
    except BaseException:
        _write_private(state_dir / "stack.json", json.dumps(status, indent=2))
        down(state_dir)
        raise
    _write_private(state_dir / "stack.json", json.dumps(status, indent=2))
    status["running"] = True
    return status


def _stop_pid(pid: int, timeout: float = 5.0) -> None:
    if not alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        try:  # reap it if it is our own child (foreground `guard dev up`)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def down(state_dir: Path) -> bool:
    """Stop every recorded process (broker first, so it can revoke its leases)."""
    path = state_dir / "stack.json"
    if not path.exists():
        return False
    data = json.loads(path.read_text())
    pids = data.get("pids", {})
    for name in ("broker", "idp", "openbao"):
        if pids.get(name):
            _stop_pid(int(pids[name]), timeout=10.0 if name == "broker" else 5.0)
    if data.get("pg_base_dir"):
        stop_cluster(Path(data["pg_base_dir"]))
    data["pids"] = {}
    data["stopped"] = True
    _write_private(path, json.dumps(data, indent=2))
    return True
