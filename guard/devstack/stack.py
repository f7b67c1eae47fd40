"""`guard dev up/down/status`: the whole demo stack on 127.0.0.1 under one state dir.

`up` starts, with random free loopback ports: a throwaway PostgreSQL cluster with the demo
bank database and the policy's database backstop; an OpenBao dev server whose database
secrets engine mints session roles for target `demo`; the dev OIDC provider; the broker
(API + PG gateway, SQLite state) with the policy file. OpenBao and the IdP boot while
PostgreSQL is initialised. Every process is recorded in `stack.json` (mode 0600: it holds
the throwaway demo admin DSN) by pid and kernel start time, so `down` stops exactly what
`up` started and never a process that merely inherited a recycled pid.

Children run in their own sessions (Ctrl-C in a terminal does not reach them) and log to
`<state>/logs/<name>.log`; PostgreSQL logs inside its cluster directory (the `postgres`
user cannot write under root's HOME) and `logs/postgres.log` links there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from guard.cli.profile import Profile, broker_tls_context, save_profile
from guard.devstack.demo_data import create_demo_database
from guard.devstack.files import write_private
from guard.devstack.openbao import OpenBaoDevServer, configure_database_target
from guard.devstack.postgres import PostgresCluster, free_port, stop_cluster
from guard.devstack.processes import alive, proc_start_time
from guard.devstack.tls import broker_cert, make_dev_ca

TARGET = "demo"
OPENBAO_ROLE = "guard-demo"
CLIENT_ID = "guard-cli"
REPO_POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"
PACKAGED_POLICY = Path(__file__).resolve().parent / "policies.yaml"
# Stop order: the broker first, so it can revoke its leases while OpenBao still runs.
STOP_ORDER = ("broker", "idp", "openbao", "postgres")


class StackError(RuntimeError):
    """`up` failed or was refused; `hint` says what to do. Printed by the CLI as is."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class AlreadyRunning(StackError):
    """`up` found a whole stack running in its state dir (every recorded process alive);
    `status` is that stack's `read_status`. Nothing was started or stopped."""

    def __init__(self, state_dir: Path, status: dict[str, Any]) -> None:
        super().__init__(
            f"a dev stack is already running in {state_dir}", hint="run `guard dev down` first"
        )
        self.status = status


# --- processes -------------------------------------------------------------------------


def _stop_pid(
    pid: int, start_time: int | None, *, first: signal.Signals, timeout: float = 5.0
) -> None:
    """Send `first`, wait up to `timeout`, then SIGKILL."""
    if not alive(pid, start_time):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, first)
    deadline = time.monotonic() + timeout
    while alive(pid, start_time) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap our own child (foreground `up`)
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if alive(pid, start_time):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _spawn(name: str, argv: list[str], state_dir: Path) -> subprocess.Popen[bytes]:
    with open(state_dir / "logs" / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=state_dir,
        )


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return "(no log)"


def _wait_http(
    url: str,
    proc: subprocess.Popen[bytes],
    name: str,
    log: Path,
    timeout: float,
    verify: ssl.SSLContext | bool = True,
):
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0, verify=verify) as http:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    why = f"exited with status {proc.returncode}" if proc.poll() is not None else "timed out"
    raise StackError(
        f"the {name} did not become ready at {url} ({why}); last lines of {log}:\n{_tail(log)}",
        hint=f"fix what {log} reports, then run `guard dev up` again",
    )


# --- state -----------------------------------------------------------------------------


def _save(state_dir: Path, status: dict[str, Any]) -> None:
    data = {k: v for k, v in status.items() if k != "running"}
    write_private(state_dir / "stack.json", json.dumps(data, indent=2) + "\n")


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The recorded stack plus `running` (every recorded process alive), or None."""
    path = state_dir / "stack.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(
            f"cannot read {path}: {exc}", hint="run `guard dev down`, or delete the file"
        ) from exc
    pids, starts = data.get("pids", {}), data.get("pid_starts", {})
    data["running"] = bool(pids) and all(alive(p, starts.get(n)) for n, p in pids.items())
    return data


@contextlib.contextmanager
def _lock(state_dir: Path) -> Iterator[None]:
    with open(state_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(
                f"another `guard dev up`/`down` is working in {state_dir}",
                hint="wait for it to finish",
            ) from None
        yield


def default_policy() -> Path:
    """./policies.yaml, else the source checkout's, else the copy shipped in the package."""
    for candidate in (Path.cwd() / "policies.yaml", REPO_POLICY, PACKAGED_POLICY):
        if candidate.is_file():
            return candidate
    raise StackError("no policies.yaml found", hint="pass --policy FILE")


# --- up / down -------------------------------------------------------------------------


@contextlib.contextmanager
def _step(name: str, log: Path | None) -> Iterator[None]:
    """Turn a failure of one step into a StackError naming the step and its log."""
    try:
        yield
    except StackError:
        raise
    except Exception as exc:
        text = str(exc) or type(exc).__name__
        if log is not None and log.exists() and str(log) not in text:
            text += f"\nlast lines of {log}:\n{_tail(log)}"
        raise StackError(
            f"{name} failed: {text}",
            hint=f"fix the cause above and run `guard dev up` again (logs: {log or 'above'})",
        ) from exc


def up(
    state_dir: Path,
    policy_file: Path | None = None,
    progress: Callable[[str], None] = lambda step: None,
) -> dict[str, Any]:
    """Start the stack, save stack.json and the CLI profile. Raises `AlreadyRunning` when
    a whole stack runs here, and a StackError when part of one does (never a second stack
    over a live process); a record whose processes are all gone is cleaned up first."""
    t0 = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    with _lock(state_dir):
        existing = read_status(state_dir)
        if existing:
            if existing["running"]:
                wanted = policy_file.resolve() if policy_file else None
                if wanted and str(wanted) != existing.get("policy_file"):
                    raise StackError(
                        f"a dev stack is already running in {state_dir} with the policy "
                        f"{existing.get('policy_file')}, not {wanted}",
                        hint=f"run `guard dev down`, then `guard dev up --policy {policy_file}`",
                    )
                raise AlreadyRunning(state_dir, existing)
            starts = existing.get("pid_starts", {})
            pids = existing.get("pids", {})
            running = [n for n, p in pids.items() if alive(p, starts.get(n))]
            if running:
                gone = [n for n in pids if n not in running]
                raise StackError(
                    f"a dev stack is partly running in {state_dir}: {', '.join(running)} "
                    f"still running, {', '.join(gone)} exited (logs: {state_dir / 'logs'})",
                    hint="run `guard dev down` to stop what is left, then `guard dev up`",
                )
            _down(state_dir)  # stale: a crash or reboot left a record behind
        policy_path, policy = _load_policy(policy_file)
        # A fresh OpenBao knows none of the old leases: start the broker's state afresh.
        shutil.rmtree(state_dir / "broker", ignore_errors=True)
        logs = state_dir / "logs"
        logs.mkdir(exist_ok=True)
        status: dict[str, Any] = {
            "state_dir": str(state_dir),
            "policy_file": str(policy_path),
            "pids": {},
            "pid_starts": {},
            "logs": {},
        }
        try:
            _start(state_dir, policy, status, progress)
        except BaseException:
            _save(state_dir, status)
            _down(state_dir)
            raise
        status["up_seconds"] = round(time.monotonic() - t0, 2)
        _save(state_dir, status)
    save_profile(
        Profile(
            broker_url=status["broker_url"],
            issuer=status["issuer"],
            client_id=CLIENT_ID,
            audience=CLIENT_ID,
            gateway_ca_file=status["gateway_ca"],
            broker_ca_file=status["broker_ca"],
        )
    )
    status["running"] = True
    return status


def dev_audit_fsync() -> bool:
    """The demo broker's `audit.fsync`: off unless GUARD_DEV_AUDIT_FSYNC=on. The demo's
    PostgreSQL runs with fsync off itself (a power loss loses the database it audits), and an
    fsync per batch costs the demo's statements latency (0.3–2 ms each on a VM disk; see
    bench/audit_commit.py, and bench/run.py --audit-fsync on|off for the user path). A
    record still survives a broker crash (kill -9): it is written before its statement is
    forwarded. Production brokers keep the setting's default, on."""
    value = os.environ.get("GUARD_DEV_AUDIT_FSYNC", "off").strip().lower()
    if value not in ("on", "off", "true", "false", "1", "0"):
        raise StackError(
            f"GUARD_DEV_AUDIT_FSYNC={value!r} is not on or off",
            hint="unset it (off, the default) or set it to on or off",
        )
    return value in ("on", "true", "1")


def dev_gateway_workers() -> int | str:
    """The demo broker's `gateway.workers`: 1 (the gateway in the broker's process) unless
    GUARD_DEV_GATEWAY_WORKERS says a number or `auto`. The demo shares its cores with
    PostgreSQL, OpenBao and the clients; bench/run.py --gateway-workers measures both."""
    value = os.environ.get("GUARD_DEV_GATEWAY_WORKERS", "1").strip().lower()
    if value == "auto":
        return value
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise StackError(
            f"GUARD_DEV_GATEWAY_WORKERS={value!r} is not a number from 1 to 64 or auto",
            hint="unset it (1, the default), or set it to e.g. 2 or auto",
        )
    return int(value)


def _load_policy(policy_file: Path | None):
    from guard.broker.policy.compile import load_policy_file

    policy_path = (policy_file or default_policy()).resolve()
    with _step(f"reading the policy {policy_path}", None):
        policy = load_policy_file(policy_path)
    if TARGET not in policy.targets:
        raise StackError(
            f"{policy_path} has no target {TARGET!r}",
            hint=f"the demo stack serves target {TARGET!r}: add it, or use the default policy",
        )
    return policy_path, policy


def _record(status: dict[str, Any], name: str, pid: int | None, log: Path) -> None:
    if pid:
        status["pids"][name] = pid
        status["pid_starts"][name] = proc_start_time(pid)
    status["logs"][name] = str(log)


def _start(
    state_dir: Path, policy: Any, status: dict[str, Any], progress: Callable[[str], None]
) -> None:
    from guard.broker.masking.objects import creation_statements, revocation_statements
    from guard.devstack.backstop import apply_backstop

    logs = state_dir / "logs"
    tls_dir = state_dir / "tls"
    ca_file, cert_file, key_file = make_dev_ca(tls_dir)
    api_cert_file, api_key_file = broker_cert(tls_dir)
    status["gateway_ca"] = str(ca_file)
    # The same CA signs the broker API's HTTPS certificate; the CLI's profile names it.
    status["broker_ca"] = str(ca_file)

    # OpenBao and the IdP boot while PostgreSQL is initialised.
    progress("OpenBao")
    bao = OpenBaoDevServer()
    bao_log = logs / "openbao.log"
    with _step("starting OpenBao", bao_log):
        bao.start(state_dir, log_file=bao_log, detach=True, wait=False)
    _record(status, "openbao", bao.pid, bao_log)
    status["openbao_addr"] = bao.addr
    status["openbao_token_file"] = str(bao.token_file)

    progress("dev identity provider")
    idp_port = free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    idp_argv = [sys.executable, "-m", "guard.devstack.idp", "--host", "127.0.0.1"]
    idp_argv += ["--port", str(idp_port), "--state-dir", str(state_dir), "--client-id", CLIENT_ID]
    # Test and demo knobs: a users file of one's own (edited while the stack runs:
    # offboarding), and shorter ID tokens (a login's refresh, seen in seconds).
    if os.environ.get("GUARD_DEV_USERS"):
        idp_argv += ["--users", os.environ["GUARD_DEV_USERS"]]
    if os.environ.get("GUARD_DEV_ID_TOKEN_LIFETIME", "").isdigit():
        idp_argv += ["--id-token-lifetime", os.environ["GUARD_DEV_ID_TOKEN_LIFETIME"]]
    idp = _spawn("idp", idp_argv, state_dir)
    _record(status, "idp", idp.pid, logs / "idp.log")
    status["issuer"] = issuer

    progress("PostgreSQL and the demo database")
    pg = PostgresCluster()
    pg_log = logs / "postgres.log"
    with _step("starting PostgreSQL", None):
        pg.start(tls=(tls_dir / "postgres.pem", tls_dir / "postgres-key.pem"))
    pg.owns_base_dir = False  # it outlives this process: `down` removes it
    status["pg_base_dir"] = str(pg.base_dir)
    with contextlib.suppress(OSError):
        pg_log.unlink(missing_ok=True)
        pg_log.symlink_to(pg.log_file)
    _record(status, "postgres", pg.pid, pg_log)
    upstream_dsn = pg.admin_dsn(TARGET)
    status["upstream_dsn"] = upstream_dsn
    with _step("loading the demo database", pg_log):
        create_demo_database(pg.admin_dsn("postgres"), TARGET)
    with _step("applying the policy's database backstop", pg_log):
        apply_backstop(upstream_dsn, policy.targets[TARGET])
    dsn_file = state_dir / "upstream-admin-dsn"
    write_private(dsn_file, upstream_dsn)

    with _step("configuring OpenBao's database secrets engine", bao_log):
        bao.wait_healthy()
        configure_database_target(
            bao.client(),
            connection_name=TARGET,
            role_name=OPENBAO_ROLE,
            host=pg.host,
            port=pg.port,
            database=TARGET,
            admin_user=pg.admin_user,
            admin_password=pg.admin_password,
            # The issued role's CONNECTION LIMIT is the policy's per-session limit.
            creation_statements=creation_statements(
                connection_limit=policy.targets[TARGET].max_connections_per_session
            ),
            revocation_statements=revocation_statements(),
        )
    _wait_http(f"{issuer}/.well-known/openid-configuration", idp, "dev IdP", logs / "idp.log", 30)

    progress("broker")
    api_port, gw_port = free_port(), free_port()
    config = {
        "state_dir": str(state_dir / "broker"),
        "policy_file": status["policy_file"],
        "api": {"host": "127.0.0.1", "port": api_port},
        "api_tls": {"cert_file": str(api_cert_file), "key_file": str(api_key_file)},
        "gateway": {"host": "127.0.0.1", "port": gw_port, "workers": dev_gateway_workers()},
        "gateway_tls": {
            "cert_file": str(cert_file),
            "key_file": str(key_file),
            "ca_file": str(ca_file),
        },
        "oidc": {"issuer": issuer, "audience": CLIENT_ID},
        "openbao": {"addr": bao.addr, "token_file": str(bao.token_file)},
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
        "audit": {"path": str(state_dir / "audit.jsonl"), "fsync": dev_audit_fsync()},
        # The demo's security leads (bob, carol) may list and revoke every session.
        "sessions": {"auditor_groups": ["security-leads"]},
    }
    # Test and demo knob: more trusted issuers (a YAML list of `trusted_issuers` entries,
    # e.g. a CI platform's or another IdP's) beside the dev IdP.
    extra_issuers = os.environ.get("GUARD_DEV_TRUSTED_ISSUERS")
    if extra_issuers:
        entries = yaml.safe_load(Path(extra_issuers).read_text()) or []
        if not isinstance(entries, list):
            raise StackError(f"GUARD_DEV_TRUSTED_ISSUERS: {extra_issuers} is not a YAML list")
        config["trusted_issuers"] = entries
    config_path = state_dir / "broker.yaml"
    write_private(config_path, yaml.safe_dump(config, sort_keys=False))
    broker_argv = [sys.executable, "-m", "guard.broker.service", "--config", str(config_path)]
    broker = _spawn("broker", broker_argv, state_dir)
    _record(status, "broker", broker.pid, logs / "broker.log")
    broker_url = f"https://127.0.0.1:{api_port}"
    _wait_http(
        f"{broker_url}/v1/health",
        broker,
        "broker",
        logs / "broker.log",
        30,
        verify=broker_tls_context(str(ca_file)),
    )
    status.update(
        broker_url=broker_url,
        gateway=f"127.0.0.1:{gw_port}",
        audit_log=config["audit"]["path"],
        broker_config=str(config_path),
    )


def down(state_dir: Path) -> bool:
    """Stop every recorded process and remove the cluster; False if nothing was recorded."""
    if not (state_dir / "stack.json").exists():
        return False
    with _lock(state_dir):
        return _down(state_dir)


def _down(state_dir: Path) -> bool:
    try:
        data = read_status(state_dir)
    except StackError:  # unreadable record: nothing to stop by pid, start afresh
        (state_dir / "stack.json").unlink(missing_ok=True)
        return True
    if data is None:
        return False
    pids, starts = data.get("pids", {}), data.get("pid_starts", {})
    for name in STOP_ORDER:
        pid = pids.get(name)
        if name == "postgres":
            if data.get("pg_base_dir"):
                stop_cluster(Path(data["pg_base_dir"]))  # pg_ctl stop -m fast, as postgres
            if pid:  # pg_ctl could not (cluster dir gone?): SIGINT is a fast shutdown
                _stop_pid(int(pid), starts.get(name), first=signal.SIGINT)
        elif pid:
            timeout = 10.0 if name == "broker" else 5.0
            _stop_pid(int(pid), starts.get(name), first=signal.SIGTERM, timeout=timeout)
    data["pids"], data["pid_starts"] = {}, {}
    data["stopped"] = True
    _save(state_dir, data)
    return True
