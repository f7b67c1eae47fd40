"""A throwaway PostgreSQL cluster on loopback, for `guard dev up`, tests and benchmarks.

Runs the machine's own server binaries (`pg_config --bindir`, then
/usr/lib/postgresql/*/bin, then PATH). PostgreSQL refuses to run as root, so when we are
root the cluster lives in a fresh temporary directory owned by the `postgres` OS user and
every server command runs through `runuser -u postgres`. Durability settings are off
(fsync, full_page_writes, synchronous_commit): this is demo and test data only.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ADMIN_USER = "guard_admin"


class PostgresUnavailable(RuntimeError):
    pass


def find_pg_bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "pg_ctl").exists():
            return Path(out.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PostgresCluster:
    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.admin_user = ADMIN_USER
        self.admin_password = ""
        self.base_dir: Path | None = None
        self.bindir: Path | None = None
        self._owns_base = False

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "sock"

    def admin_dsn(self, dbname: str = "postgres") -> str:
        return (
            f"host={self.host} port={self.port} user={self.admin_user} "
            f"password={self.admin_password} dbname={dbname} sslmode=disable"
        )

    def start(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> PostgresCluster:
        """Start the cluster; `tls=(cert, key)` turns on ssl with that server certificate."""
        self.bindir = find_pg_bindir()
        if self.bindir is None:
            raise PostgresUnavailable(
                "PostgreSQL server binaries not found: install postgresql "
                "(Debian: apt-get install postgresql) or put pg_ctl on PATH"
            )
        if base_dir is None or os.geteuid() == 0:
            # As root, HOME is not traversable by `postgres`: use a fresh temp dir.
            base_dir = Path(tempfile.mkdtemp(prefix="guard-pg-"))
            self._owns_base = True
        self.base_dir = base_dir
        self.port = port or free_port()
        self.admin_password = secrets.token_urlsafe(24)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        pwfile = base_dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.admin_password + "\n")
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            for path in (base_dir, self.socket_dir, pwfile):
                os.chown(path, pg.pw_uid, pg.pw_gid)
        try:
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.admin_user,
                    f"--pwfile={pwfile}",
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ]
            )
            pwfile.unlink()
            conf = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.socket_dir}'",
                "fsync": "off",
                "full_page_writes": "off",
                "synchronous_commit": "off",
                "max_connections": "200",
                "shared_buffers": "128MB",
                "password_encryption": "'scram-sha-256'",
                "logging_collector": "off",
            }
            if tls is not None:
                conf.update(self._install_tls(*tls))
            with open(self.data_dir / "postgresql.auto.conf", "a") as fh:
                fh.writelines(f"{k} = {v}\n" for k, v in conf.items())
            self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(base_dir / "postgres.log"),
                    "-w",
                    "-t",
                    "30",
                    "start",
                ]
            )
        except Exception:
            self.stop()
            raise
        return self

    def _install_tls(self, cert: Path, key: Path) -> dict[str, str]:
        assert self.base_dir is not None
        # The server insists on a key file owned by it with no group/other access.
        targets = {"server.crt": cert.read_bytes(), "server.key": key.read_bytes()}
        for name, data in targets.items():
            path = self.base_dir / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            if os.geteuid() == 0:
                pg = pwd.getpwnam("postgres")
                os.chown(path, pg.pw_uid, pg.pw_gid)
        return {
            "ssl": "on",
            "ssl_cert_file": f"'{self.base_dir / 'server.crt'}'",
            "ssl_key_file": f"'{self.base_dir / 'server.key'}'",
        }

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(
            [*_as_postgres(), *cmd], capture_output=True, text=True, timeout=120, cwd="/"
        )
        if out.returncode != 0:
            raise PostgresUnavailable(f"{Path(cmd[0]).name} failed: {out.stderr.strip()[-2000:]}")

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.base_dir is None:
            return
        if self.bindir is not None and (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                [
                    *_as_postgres(),
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
                cwd="/",
            )
        if self._owns_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_cluster(base_dir: Path) -> None:
    """Stop a cluster started by an earlier process (used by `guard dev down`)."""
    bindir = find_pg_bindir()
    data = base_dir / "data"
    if bindir is not None and (data / "postmaster.pid").exists():
        subprocess.run(
            [*_as_postgres(), str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
            cwd="/",
        )
    if base_dir.name.startswith("guard-pg-"):
        shutil.rmtree(base_dir, ignore_errors=True)


def wait_ready(dsn: str, timeout: float = 20.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
