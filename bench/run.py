"""Benchmark: direct PostgreSQL vs pgbouncer vs guard, measured in the same run.

    .venv/bin/python bench/run.py [--seconds 10] [--clients 8] [--scale 10] [--audit-fsync on|off]

Starts the real demo stack (`guard dev up` in a throwaway GUARD_HOME, with analysis, policy
and audit on), loads pgbench tables into the demo database, starts pgbouncer (Debian
package; installed with apt-get when missing and running as root; run as `postgres`), then
runs pgbench -S (simple, extended, prepared, and simple with a new connection per
transaction) and TPC-B-like with N clients against each path (every hop is verified TLS:
every path reaches PostgreSQL over it, as guard does, and clients reach pgbouncer and guard
over it too — the gateway refuses plaintext logins, so pgbouncer serves client TLS with the
dev stack's gateway certificate to stay comparable),
plus a 1M-row COPY TO STDOUT, SELECT * and SELECT * through a server-side cursor of
pgbench_accounts (each path --bulk-runs times, interleaved; the median is kept). Each
workload also runs on the path users take, `guard exec --db demo -- pgbench …` (alice logged
in to the dev IdP): session, the gateway over verified TLS, teardown; printed are its tps, its
ratio to pgbouncer, and the CPU µs per transaction of the gateway + the guard CLI. Prints tps,
the ratio to direct and to pgbouncer, and the gateway's CPU µs per transaction (the broker
process's user+system CPU time over the run divided by the transactions it served; system
time alone after it), and pgbouncer's, measured the same way; for bulk rows, the gateway's
CPU ns per row.

Numbers on a shared 2-core machine are noisy: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg

from guard.devstack.postgres import free_port

ROOT = Path(__file__).resolve().parent.parent
GUARD = [sys.executable, "-m", "guard.cli.main"]
TPS = re.compile(
    r"tps = ([0-9.]+) \((?:without initial connection time|including reconnection times)\)"
)
TXNS = re.compile(r"number of transactions actually processed: (\d+)")


def sh(cmd, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def gateway_times(broker_pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the broker and its gateway worker processes, if it
    has any (`gateway.workers` > 1): the gateway's CPU either way."""
    children = Path(f"/proc/{broker_pid}/task/{broker_pid}/children").read_text().split()
    times = [cpu_times(broker_pid)] + [cpu_times(int(pid)) for pid in children]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def postgres_times(postmaster_pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of PostgreSQL: the postmaster, its live backends, and
    the backends it has reaped (a session's backends end with it)."""
    fields = Path(f"/proc/{postmaster_pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    user, system = (
        (int(fields[11]) + int(fields[13])) / ticks,
        (int(fields[12]) + int(fields[14])) / ticks,
    )
    children = Path(f"/proc/{postmaster_pid}/task/{postmaster_pid}/children").read_text()
    for pid in children.split():
        with contextlib.suppress(OSError):  # a backend that ended meanwhile is reaped
            u, s = cpu_times(int(pid))
            user, system = user + u, system + s
    return user, system


def pgbench(
    env: dict[str, str], args: list[str], seconds: int, clients: int, *, via: list[str] = ()
) -> tuple[float, int]:
    """pgbench's tps and transactions; `via` runs it through a wrapper (`guard exec --`)."""
    argv = [*via, "pgbench", "-n", "-T", str(seconds), "-c", str(clients), "-j", "2", *args]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench {args} failed: {out.stderr[-2000:]}")
    return float(TPS.search(out.stdout).group(1)), int(TXNS.search(out.stdout).group(1))


def guard_exec_pgbench(
    env: dict[str, str], args: list[str], seconds: int, clients: int, broker_pid: int
) -> tuple[float, int, tuple[float, float], tuple[float, float]]:
    """The user's path: `guard exec --db demo -- pgbench …` (the session, the gateway over
    verified TLS, teardown). Returns tps, transactions, and the CPU µs per transaction of
    the gateway and of the guard CLI process itself (read just before pgbench ends, so its
    child's CPU is not counted)."""
    argv = [*GUARD, "exec", "--db", "demo", "--", "pgbench", "-n", "-T", str(seconds)]
    argv += ["-c", str(clients), "-j", "2", *args]
    before = gateway_times(broker_pid)
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)  # session open, pgbench connected
    cli_before = cpu_times(proc.pid)
    time.sleep(max(0.5, seconds - 1.5))
    cli_after = cpu_times(proc.pid)
    out, err = proc.communicate()
    after = gateway_times(broker_pid)
    if proc.returncode != 0:
        raise RuntimeError(f"guard exec pgbench {args} failed: {err[-2000:]}")
    tps, n = float(TPS.search(out).group(1)), int(TXNS.search(out).group(1))
    # The CLI's share over the part of the run it was sampled for.
    sampled = n * max(0.5, seconds - 1.5) / seconds
    cli = tuple((a - b) / max(sampled, 1) * 1e6 for a, b in zip(cli_after, cli_before, strict=True))
    return tps, n, _per_tx(before, after, n), cli  # type: ignore[return-value]


def libpq_env(host, port, user: str, password: str, *, sslmode: str, rootcert: str = ""):
    """pgbench's environment for the demo database at host:port."""
    env = {
        **os.environ,
        "PGHOST": str(host),
        "PGPORT": str(port),
        "PGUSER": user,
        "PGPASSWORD": password,
        "PGDATABASE": "demo",
        "PGSSLMODE": sslmode,
    }
    if rootcert:
        env["PGSSLROOTCERT"] = rootcert
    return env


def admin_env(status: dict, *, sslmode: str) -> dict[str, str]:
    """libpq environment for the demo database as its admin (from `guard dev status`)."""
    admin = psycopg.conninfo.conninfo_to_dict(status["upstream_dsn"])
    rootcert = status["gateway_ca"] if sslmode.startswith("verify") else ""
    return libpq_env(
        admin["host"],
        admin["port"],
        admin["user"],
        admin["password"],
        sslmode=sslmode,
        rootcert=rootcert,
    )


APP_ROLE = "bench_app"


def app_env(status: dict, *, sslmode: str) -> dict[str, str]:
    """libpq environment for the demo database as a plain application role, made here: the
    login pgbench, pgbouncer and guard's peers use, as a bank's job would (not the admin).

    The peers once logged in as the stack's admin, a superuser, for whom PostgreSQL skips
    every privilege check; guard's session roles are not superusers. Measured with pgbench
    -S straight to PostgreSQL (8 clients, plain TCP, interleaved): 25–28 µs of PostgreSQL
    CPU per transaction as the superuser, 28–32 as roles granted the tables; a role shaped
    like guard's (a member of the session group, the masking schema first on its search
    path) cost the same as this one (32.4–39.6 against 32.6–36.5, three pairs).
    """
    password = secrets.token_urlsafe(18)
    with psycopg.connect(status["upstream_dsn"], autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,))
        verb = "ALTER" if exists.fetchone() else "CREATE"
        conn.execute(f"{verb} ROLE {APP_ROLE} LOGIN NOSUPERUSER PASSWORD '{password}'")
        conn.execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON pgbench_accounts, pgbench_branches, "
            f"pgbench_tellers, pgbench_history TO {APP_ROLE}"
        )
    admin = psycopg.conninfo.conninfo_to_dict(status["upstream_dsn"])
    rootcert = status["gateway_ca"] if sslmode.startswith("verify") else ""
    return libpq_env(
        admin["host"], admin["port"], APP_ROLE, password, sslmode=sslmode, rootcert=rootcert
    )


@contextlib.contextmanager
def demo_stack(*up_args: str) -> Iterator[tuple[dict[str, str], dict]]:
    """`guard dev up` in a throwaway GUARD_HOME: (its env, its status); `dev down` after,
    and the home removed (a run leaves 1-2 GB there: the database, the audit log)."""
    home = tempfile.mkdtemp(prefix="guard-bench-")
    env = {**os.environ, "GUARD_HOME": home, "GUARD_KEYRING": "file"}
    try:
        sh([*GUARD, "dev", "up", "--detach", *up_args], env=env)
        yield env, json.loads(sh([*GUARD, "dev", "status", "--json"], env=env).stdout)
    finally:
        subprocess.run([*GUARD, "dev", "down"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def ensure_pgbouncer() -> str:
    path = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(path).exists():
        if os.geteuid() != 0:
            raise SystemExit("pgbouncer is not installed (apt-get install pgbouncer)")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "pgbouncer"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    return path


def start_pgbouncer(
    host: str, port: int, user: str, password: str, ca_file: str
) -> tuple[subprocess.Popen, int, str]:
    workdir = Path(tempfile.mkdtemp(prefix="guard-bench-pgb-"))
    listen = free_port()
    (workdir / "users.txt").write_text(f'"{user}" "{password}"\n')
    shutil.copy(ca_file, workdir / "ca.pem")
    # Clients reach pgbouncer over verified TLS, as they reach guard's gateway: the dev
    # CA's 127.0.0.1 server certificate (the gateway's, next to the CA file).
    tls_dir = Path(ca_file).parent
    shutil.copy(tls_dir / "gateway.pem", workdir / "client-tls.pem")
    shutil.copy(tls_dir / "gateway-key.pem", workdir / "client-tls-key.pem")
    (workdir / "pgbouncer.ini").write_text(
        f"[databases]\ndemo = host={host} port={port} dbname=demo\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen}\n"
        f"auth_type = scram-sha-256\nauth_file = {workdir}/users.txt\n"
        "pool_mode = session\nmax_client_conn = 100\ndefault_pool_size = 20\n"
        # Same upstream hop as guard's: verified TLS to PostgreSQL.
        f"server_tls_sslmode = verify-full\nserver_tls_ca_file = {workdir}/ca.pem\n"
        f"client_tls_sslmode = require\nclient_tls_cert_file = {workdir}/client-tls.pem\n"
        f"client_tls_key_file = {workdir}/client-tls-key.pem\n"
        f"unix_socket_dir = {workdir}\nlogfile = {workdir}/pgbouncer.log\n"
    )
    cmd = [ensure_pgbouncer(), str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        for f in workdir.iterdir():
            shutil.chown(f, "postgres")
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc, listen, str(workdir)


# The bulk reads each path serves, in order. A server-side cursor (psycopg's named cursor,
# FETCH FORWARD 10000 a round trip) is how Python ETL jobs read big tables; it puts 100 round
# trips in the million rows, and each one leaves the gateway, PostgreSQL and the client
# competing for this machine's two cores while the batch streams (stop 37's notes).
BULK = ("COPY TO", "SELECT *", "SELECT * cursor")


def bulk_reads(conninfo: str, broker_pid: int) -> list[tuple[float, float]]:
    """(seconds, the broker's CPU seconds) for each of BULK's reads, on one connection."""
    out = []
    with psycopg.connect(conninfo) as conn:
        for what in BULK:
            cpu = sum(gateway_times(broker_pid))
            start = time.perf_counter()
            if what == "COPY TO":
                with conn.cursor().copy("COPY pgbench_accounts TO STDOUT") as copy:
                    for _chunk in copy:
                        pass
            elif what == "SELECT *":
                # One result: libpq holds it whole, psycopg makes the rows as they are read.
                for _row in conn.execute("SELECT * FROM pgbench_accounts"):
                    pass
            else:
                with conn.cursor(name="bench") as cur:
                    cur.itersize = 10000
                    cur.execute("SELECT * FROM pgbench_accounts")
                    for _row in cur:
                        pass
            out.append((time.perf_counter() - start, sum(gateway_times(broker_pid)) - cpu))
    return out


def _per_tx(before: tuple[float, float], after: tuple[float, float], n: int):
    """(user, system) CPU µs per transaction between two cpu_times() readings."""
    return tuple((a - b) / max(n, 1) * 1e6 for a, b in zip(after, before, strict=True))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--only", action="append", help="run only workloads whose label starts so")
    ap.add_argument(
        "--without",
        choices=("core", "audit", "statements", "results"),
        action="append",
        help="take one part out of the gateway to see what it costs (bench/without/: core "
        "relays bytes and does nothing else; audit drops statement and result records; "
        "statements or results one of them); never the product",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="pgbouncer and guard exec runs per workload, in adjacent pairs; medians printed",
    )
    ap.add_argument("--no-bulk", action="store_true", help="skip the COPY / SELECT * runs")
    ap.add_argument("--bulk-runs", type=int, default=3, help="runs per path (median kept)")
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="profile the gateway during its pgbench runs: py-spy (.svg flamegraph, .txt "
        "collapsed stacks), perf (.perf) or strace -c (.strace)",
    )
    ap.add_argument(
        "--audit-fsync",
        choices=("on", "off"),
        default="off",
        help="the broker's audit.fsync (group commit; on is the production default, off the "
        "dev stack's): run both to compare the user path's tps",
    )
    ap.add_argument(
        "--gateway-workers",
        default="1",
        help="the broker's gateway.workers (1: in the broker's process; N or auto: worker "
        "processes sharing the port); gateway CPU figures include the workers",
    )
    args = ap.parse_args()
    os.environ["GUARD_DEV_AUDIT_FSYNC"] = args.audit_fsync  # read by `guard dev up`
    os.environ["GUARD_DEV_GATEWAY_WORKERS"] = args.gateway_workers
    print(f"audit fsync: {args.audit_fsync}, gateway workers: {args.gateway_workers}")
    if args.without:
        # bench/without/sitecustomize.py patches the broker's processes at start-up.
        os.environ["GUARD_BENCH_WITHOUT"] = ",".join(args.without)
        paths = [str(ROOT / "bench/without"), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        print(f"without: {', '.join(args.without)} (the gateway is not the product's)")

    with demo_stack("--policy", str(ROOT / "bench/policies.yaml")) as (env, status):
        return _compare(args, env, status)


def _compare(args: argparse.Namespace, env: dict[str, str], status: dict) -> int:
    pgb = None
    try:
        admin = psycopg.conninfo.conninfo_to_dict(status["upstream_dsn"])
        sh(["pgbench", "-i", "-q", "-s", str(args.scale)], env=admin_env(status, sslmode="disable"))
        # Direct clients get the same hop guard and pgbouncer use: verified TLS.
        direct_env = app_env(status, sslmode="verify-full")
        with psycopg.connect(status["upstream_dsn"], autocommit=True) as conn:
            conn.execute(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON pgbench_accounts, "
                "pgbench_branches, pgbench_tellers, pgbench_history TO guard_session"
            )
        token = sh([*GUARD, "dev", "token", "alice"], env=env).stdout.strip()
        session = httpx.post(
            f"{status['broker_url']}/v1/sessions",
            json={"target": "demo"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            # The broker API is HTTPS, verified against the dev stack's CA.
            verify=ssl.create_default_context(cafile=status["broker_ca"]),
        ).json()
        # The gateway refuses plaintext logins: verified TLS, as every guard client uses.
        guard_env = libpq_env(
            session["gateway_host"],
            session["gateway_port"],
            session["user"],
            session["password"],
            sslmode="verify-full",
            rootcert=status["gateway_ca"],
        )
        pgb, pgb_port, pgb_dir = start_pgbouncer(
            admin["host"],
            int(admin["port"]),
            direct_env["PGUSER"],
            direct_env["PGPASSWORD"],
            status["gateway_ca"],
        )
        # Clients reach pgbouncer and guard over verified TLS; both use TLS upstream.
        pgb_env = {**direct_env, "PGHOST": "127.0.0.1", "PGPORT": str(pgb_port)}
        # pgbouncer runs under runuser: its own pid is the one holding its config file.
        pgb_pid = int(
            subprocess.run(
                ["pgrep", "-n", "-f", f"pgbouncer {pgb_dir}"], capture_output=True, text=True
            ).stdout.split()[0]
        )
        broker = status["pids"]["broker"]
        broker_pid = int(broker["pid"] if isinstance(broker, dict) else broker)
        # PostgreSQL's own CPU per transaction behind pgbouncer and behind guard: it shares
        # the cores with the proxy, so a proxy's cost shows there too.
        postmaster = int(status["pids"]["postgres"])

        workloads = [
            ("-S simple", ["-S", "-M", "simple"]),
            ("-S extended", ["-S", "-M", "extended"]),
            ("-S prepared", ["-S", "-M", "prepared"]),
            ("TPC-B simple", ["-M", "simple"]),
            # A new connection per transaction (-C), as a job without a pool makes them:
            # TLS, SCRAM and, through guard, the gateway's own upstream login each time;
            # pgbouncer keeps its server connections.
            ("-S new conn", ["-S", "-M", "simple", "-C"]),
        ]
        sh([*GUARD, "dev", "login", "alice"], env=env)  # for the guard exec path
        print(
            f"{'workload':<14} {'direct':>9} {'pgbouncer':>10} {'guard':>9} "
            f"{'g/direct':>9} {'g/pgb':>7} {'gw µs/tx':>9} {'(sys)':>6} {'pgb µs/tx':>9} "
            f"{'(sys)':>6} {'exec tps':>9} {'e/pgb':>6} {'exec gw+cli µs/tx':>18} "
            f"{'PG µs/tx: pgb':>13} {'exec':>5}"
        )
        if args.only:
            workloads = [w for w in workloads if any(w[0].startswith(o) for o in args.only)]
        for label, wargs in workloads:
            d, _ = pgbench(direct_env, wargs, args.seconds, args.clients)
            # pgbouncer and `guard exec` in adjacent pairs, `--rounds` times: one 10 s run
            # of either moves by ±10 % on a shared VM, a pair's ratio much less.
            rounds = []
            for r in range(max(1, args.rounds)):
                pgb_before, pg_before = cpu_times(pgb_pid), postgres_times(postmaster)
                b, bn = pgbench(pgb_env, wargs, args.seconds, args.clients)
                pgb_us = _per_tx(pgb_before, cpu_times(pgb_pid), bn)
                pg_pgb = sum(_per_tx(pg_before, postgres_times(postmaster), bn))
                if r == 0:  # the gateway without the CLI's session, once
                    spy = _start_profiler(args.profile, label, broker_pid) if args.profile else None
                    before = gateway_times(broker_pid)
                    g, n = pgbench(guard_env, wargs, args.seconds, args.clients)
                    us = _per_tx(before, gateway_times(broker_pid), n)
                pg_before = postgres_times(postmaster)
                e, en, exec_gw, exec_cli = guard_exec_pgbench(
                    env, wargs, args.seconds, args.clients, broker_pid
                )
                pg_exec = sum(_per_tx(pg_before, postgres_times(postmaster), en))
                if r == 0 and spy is not None:
                    spy.send_signal(2)
                    spy.wait()
                rounds.append((b, *pgb_us, pg_pgb, e, e / b, sum(exec_gw), sum(exec_cli), pg_exec))
            # Medians of the rounds, each column on its own (e/pgb: of the pairs' ratios).
            b, pgb_user, pgb_sys, pg_pgb, e, ratio, exec_gw_us, exec_cli_us, pg_exec = (
                statistics.median(column) for column in zip(*rounds, strict=True)
            )
            print(
                f"{label:<14} {d:9.0f} {b:10.0f} {g:9.0f} {g / d:9.2f} {g / b:7.2f} "
                f"{sum(us):9.1f} {us[1]:6.1f} {pgb_user + pgb_sys:9.1f} {pgb_sys:6.1f} "
                f"{e:9.0f} {ratio:6.2f} {exec_gw_us:11.1f}+{exec_cli_us:.1f} "
                f"{pg_pgb:13.1f} {pg_exec:5.1f}",
                flush=True,
            )

        if args.no_bulk:
            return 0
        paths = {"direct": direct_env, "pgbouncer": pgb_env, "guard": guard_env}
        _compare_bulk(args, paths, broker_pid)
    finally:
        if pgb is not None:
            pgb.terminate()
            pgb.wait()
            shutil.rmtree(pgb_dir, ignore_errors=True)
    return 0


def _start_profiler(profile: str, label: str, broker_pid: int) -> subprocess.Popen[bytes]:
    """Profile the gateway during one workload's pgbench run, into `profile` + the label."""
    out = Path(profile)
    out = out.with_name(f"{out.stem}-{label.replace(' ', '_')}{out.suffix}")
    if out.suffix == ".strace":  # system calls per transaction
        cmd = ["strace", "-c", "-f", "-p", str(broker_pid), "-o", str(out)]
    elif out.suffix == ".perf":  # native profile: interpreter vs uvloop vs kernel
        # DWARF unwinding: libpython and the extensions have no frame pointers (with -g
        # every stack stopped at the interpreter); its samples are large, so fewer of them.
        cmd = ["perf", "record", "-F", "499", "--call-graph", "dwarf,16384", "-p", str(broker_pid)]
        cmd += ["-o", str(out)]
    else:
        fmt = "raw" if out.suffix == ".txt" else "flamegraph"
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [exe, "record", "-p", str(broker_pid), "-o", str(out), "-f", fmt]
        cmd += ["-r", "250"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _dsn(e: dict[str, str]) -> str:
    return (
        f"host={e['PGHOST']} port={e['PGPORT']} user={e['PGUSER']} "
        f"password={e['PGPASSWORD']} dbname=demo sslmode={e['PGSSLMODE']} "
        f"sslrootcert={e.get('PGSSLROOTCERT', '')}"
    )


def _compare_bulk(
    args: argparse.Namespace, paths: dict[str, dict[str, str]], broker_pid: int
) -> None:
    """BULK's reads of every pgbench_accounts row, through each path in turn.

    `paths` names the environments of direct, pgbouncer and guard, in the columns' order.
    """
    rows = args.scale * 100_000
    # One-shot bulk runs vary by ±5% on a shared machine: interleave the paths and keep
    # each path's median time, and the median of the gateway's CPU time per row.
    times: dict[str, list[list[tuple[float, float]]]] = {name: [] for name in paths}
    for _ in range(args.bulk_runs):
        for name, e in paths.items():
            times[name].append(bulk_reads(_dsn(e), broker_pid))
    for i, what in enumerate(BULK):
        d, b, g = (statistics.median(t[i][0] for t in times[k]) for k in times)
        gw_ns = statistics.median(t[i][1] for t in times["guard"]) / rows * 1e9
        print(
            f"{what:<15} {rows / d:9.0f} {rows / b:10.0f} {rows / g:9.0f} "
            f"{d / g:9.2f} {b / g:7.2f} {gw_ns:6.0f} ns/row (rows/s, median of "
            f"{args.bulk_runs}; {rows // 1000}k rows)"
        )


if __name__ == "__main__":
    sys.exit(main())
