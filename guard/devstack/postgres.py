"""A throwaway PostgreSQL cluster on loopback, for `guard dev up`, tests and benchmarks.

Runs the machine's own server binaries (`pg_config --bindir`, then
/usr/lib/postgresql/*/bin, then PATH). PostgreSQL refuses to run as root, so when we are
root the cluster lives in a fresh temporary directory (`guard-pg-*`) owned by the
`postgres` OS user and every server command runs through `runuser -u postgres`.

The admin superuser `guard_admin` gets a random password (given to initdb through a 0600
file, never on a command line); TCP accepts only 127.0.0.1 with scram-sha-256, the Unix
socket (in the cluster's own directory) only peer authentication. Durability is switched
off (fsync, full_page_writes, synchronous_commit) to make start-up and loading fast: this
is demo and test data only, never use these settings for data you want to keep.
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

from guard.devstack.files import write_private
from guard.devstack.processes import alive

ADMIN_USER = "guard_admin"
MISSING_HINT = "install postgresql (Debian: apt-get install postgresql) or put pg_ctl on PATH"


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing, or initdb/pg_ctl failed (message says which)."""


def find_pg_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl: `pg_config --bindir`, /usr/lib/postgresql/*/bin, PATH."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "pg_ctl").exists():
            return Path(out.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    for candidate in sorted(versions, key=_version_key, reverse=True):
        if (Path(candidate) / "pg_ctl").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _version_key(path: str) -> tuple[int, str]:
    name = Path(path).parent.name
    return (int(name), name) if name.isdigit() else (0, name)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _postgres_ids() -> tuple[int, int]:
    try:
        pg = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "running as root, but there is no `postgres` OS user to run the server as",
            # PostgreSQL refuses to run as root.
        ) from None
    return pg.pw_uid, pg.pw_gid


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


class PostgresCluster:
    """One initdb'd, running cluster. `start()` returns self; `stop()` removes a temp dir.

    Use as `with PostgresCluster().start() as pg: ...`.
    """

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.admin_user = ADMIN_USER
        self.admin_password = ""
        self.base_dir: Path | None = None
        self.bindir: Path | None = None
        # A directory we created ourselves is removed by stop(); a caller's is kept.
        self.owns_base_dir = False

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "cluster not started"
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None, "cluster not started"
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None, "cluster not started"
        return self.base_dir / "postgres.log"

    def admin_dsn(self, dbname: str = "postgres") -> str:
        """libpq keyword DSN of the admin superuser (throwaway demo credential)."""
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
        """initdb + start. `tls=(cert, key)` also serves TLS with that server certificate.

        As root `base_dir` is ignored: the cluster goes to a fresh `guard-pg-*` temp dir,
        because `postgres` cannot traverse root's HOME.
        """
        if self.base_dir is not None:
            raise RuntimeError("cluster already started")
        self.bindir = find_pg_bindir()
        if self.bindir is None:
            raise PostgresUnavailable(f"PostgreSQL server binaries not found: {MISSING_HINT}")
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root needs `runuser` (util-linux) to drop root")
        owner = _postgres_ids() if os.geteuid() == 0 else None
        if base_dir is None or owner is not None:
            base_dir = Path(tempfile.mkdtemp(prefix="guard-pg-"))
            self.owns_base_dir = True
        else:
            base_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.base_dir = base_dir
        self.port = port or free_port()
        self.admin_password = secrets.token_urlsafe(24)
        try:
            self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            pwfile = base_dir / "pwfile"
            write_private(pwfile, self.admin_password + "\n")
            if owner is not None:
                for path in (base_dir, self.socket_dir, pwfile):
                    os.chown(path, *owner)
            try:
                self._initdb(pwfile)
            finally:
                pwfile.unlink(missing_ok=True)
            self._write_conf(tls)
            self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    *("-D", str(self.data_dir), "-l", str(self.log_file)),
                    *("-w", "-t", "30", "start"),
                ],
                log=self.log_file,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self, pwfile: Path) -> None:
        assert self.bindir is not None
        self._run(
            [
                str(self.bindir / "initdb"),
                *("-D", str(self.data_dir), "-U", self.admin_user, f"--pwfile={pwfile}"),
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                *("-E", "UTF8", "--locale=C.UTF-8", "--no-sync"),
            ]
        )

    def _write_conf(self, tls: tuple[Path, Path] | None) -> None:
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            # Demo/test only: no durability, much faster initdb-to-loaded.
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            "max_connections": "200",
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
        }
        if tls is not None:
            conf.update(self._install_tls(*tls))
        # pg_hba.conf from initdb: host lines for 127.0.0.1/32 and ::1 only, scram-sha-256;
        # listen_addresses keeps IPv6 closed anyway.
        with open(self.data_dir / "postgresql.auto.conf", "a") as fh:
            fh.writelines(f"{k} = {v}\n" for k, v in conf.items())

    def _install_tls(self, cert: Path, key: Path) -> dict[str, str]:
        assert self.base_dir is not None
        # The server insists on a key file owned by it with no group/other access.
        for name, data in {"server.crt": cert.read_bytes(), "server.key": key.read_bytes()}.items():
            path = self.base_dir / name
            write_private(path, data)
            if os.geteuid() == 0:
                os.chown(path, *_postgres_ids())
        return {
            "ssl": "on",
            "ssl_cert_file": f"'{self.base_dir / 'server.crt'}'",
            "ssl_key_file": f"'{self.base_dir / 'server.key'}'",
        }

    def _run(self, cmd: list[str], log: Path | None = None) -> None:
        try:
            out = subprocess.run(
                [*_as_postgres(), *cmd], capture_output=True, text=True, timeout=120, cwd="/"
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresUnavailable(f"{Path(cmd[0]).name} timed out") from exc
        if out.returncode != 0:
            detail = out.stderr.strip()[-2000:]
            if log is not None and (tail := _tail(log)):
                detail += f"\n--- {log} ---\n{tail}"
            raise PostgresUnavailable(f"{Path(cmd[0]).name} failed: {detail}")

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (from postmaster.pid), or None when not running."""
        if self.base_dir is None:
            return None
        return postmaster_pid(self.data_dir)

    def stop(self) -> None:
        """Fast shutdown (idempotent); removes the cluster directory if we created it."""
        if self.base_dir is None:
            return
        stop_cluster(self.base_dir, remove=self.owns_base_dir, bindir=self.bindir)
        self.base_dir = None

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_cluster(base_dir: Path, *, remove: bool | None = None, bindir: Path | None = None) -> None:
    """Fast-stop a cluster (also one started by an earlier process, for `guard dev down`).

    `remove=None` removes the directory only if it is one of our `guard-pg-*` temp dirs.
    """
    bindir = bindir or find_pg_bindir()
    data = base_dir / "data"
    pid = postmaster_pid(data)
    if bindir is not None and pid is not None:
        cmd = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "20", "stop"]
        try:
            subprocess.run([*_as_postgres(), *cmd], capture_output=True, timeout=60, cwd="/")
        except subprocess.TimeoutExpired:
            pass
        # pg_ctl returns once postmaster.pid is gone; the process exits just after.
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    if remove is None:
        remove = base_dir.name.startswith("guard-pg-")
    if remove:
        shutil.rmtree(base_dir, ignore_errors=True)


def wait_ready(dsn: str, timeout: float = 20.0) -> None:
    """Poll until `dsn` accepts a connection (for clusters started by someone else)."""
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
