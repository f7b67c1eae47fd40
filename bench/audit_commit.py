"""Benchmark: audit records per second, without fsync, with an fsync per record, and
durable by group commit with K concurrent writers.

    .venv/bin/python bench/audit_commit.py [--seconds 3] [--writers 1,8,64,256] [--dir DIR]

Writes real statement records (`tests`-like, ~600 bytes sealed) through `JsonlAuditSink` to
a temporary log on DIR's file system (default: the system temp dir; put it on the disk the
broker's audit log lives on). Rows:

- `sync, no fsync`: `append_statements` of one record at a time, in a plain loop, each
  written to the log at once (one write syscall per record).
- `sync, no fsync, journal`: the same through the journal (the gateway's hot path with
  `audit.fsync: false`): each record copied into the mapped ring, the log written once
  per 200 ms flush (here: every 2000 records).
- `sync, fsync per record`: the same with an fsync after each write: the cost that group
  commit exists to avoid.
- `group commit, K writers`: K asyncio tasks on one uvloop event loop (as in the broker),
  each handing one record to `group_commit.submit` and waiting for its answer before the
  next, as a paused connection does; durable records/s (every answered record was fsynced),
  and the mean records per fsync.
- `thread hop, no fsync, K writers`: the same thread hop without the fsync, to see whether
  group commit would pay with fsync off too (it does not: the sync path stays there).

Each row's log is verified afterwards (`guard audit verify`'s verifier): the chain holds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guard.broker.audit.checkpoint import load_public_pem  # noqa: E402
from guard.broker.audit.commit import GroupCommit  # noqa: E402
from guard.broker.audit.record import StatementRecord  # noqa: E402
from guard.broker.audit.serialize import fixed_fields  # noqa: E402
from guard.broker.audit.sink import JsonlAuditSink, public_key_file  # noqa: E402
from guard.broker.audit.verify import keys_by_id, verify_log  # noqa: E402


def record(i: int) -> bytes:
    return fixed_fields(
        StatementRecord(
            session_id="5f3a9c2e71b04d2f",
            connection_id="c-17",
            principal="alice",
            issuer="https://idp.example.com",
            groups=("engineers", "oncall"),
            target="demo",
            protocol="extended",
            fingerprint=f"{i:016x}",
            statement="SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            operations=("read",),
            tables=("public.pgbench_accounts",),
            verdict="allow",
            rule="engineers-read",
        )
    )


def verified(path: Path) -> str:
    keys = keys_by_id(
        [load_public_pem(public_key_file(path.with_name(path.name + ".key")).read_bytes())]
    )
    report = verify_log(path.read_bytes().splitlines(), keys, now=time.time())
    return "chain ok" if report.ok else f"CHAIN BROKEN: {report}"


def sync_rate(
    path: Path, seconds: float, *, fsync: bool, journal: bool = False
) -> tuple[float, float, float, str]:
    sink = JsonlAuditSink(path, fsync=fsync, journal=journal)
    rec = (record(0),)
    n = 0
    deadline = time.perf_counter() + seconds
    t0, cpu0 = time.perf_counter(), os.times()
    while True:
        for _ in range(100):
            sink.append_statements(rec)
        n += 100
        if n % 2000 == 0:
            sink.flush()
        if time.perf_counter() >= deadline:
            break
    rate = n / (time.perf_counter() - t0)
    cpu1 = os.times()
    sink.close()
    user = (cpu1.user - cpu0.user) / n * 1e6
    system = (cpu1.system - cpu0.system) / n * 1e6
    return rate, user, system, verified(path)


async def _writers(group: GroupCommit, writers: int, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    rec = (record(1),)
    count = 0
    stop = False

    async def writer() -> None:
        nonlocal count
        while not stop:
            fut: asyncio.Future[object] = loop.create_future()
            group.submit(rec, fut.set_result, loop)
            result = await fut
            if isinstance(result, Exception):
                raise result
            count += 1

    tasks = [loop.create_task(writer()) for _ in range(writers)]  # noqa: TID251 - a bench
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    return count


def group_rate(
    path: Path, seconds: float, writers: int, *, fsync: bool
) -> tuple[float, float, str]:
    import uvloop

    sink = JsonlAuditSink(path, fsync=fsync)
    group = sink.group_commit
    if group is None:  # no fsync: the same thread hop, without the fsync
        group = GroupCommit(sink._write_batch, lambda: None)
    t0, cpu0 = time.perf_counter(), os.times()
    count = uvloop.run(_writers(group, writers, seconds))
    rate = count / (time.perf_counter() - t0)
    cpu1 = os.times()
    user = (cpu1.user - cpu0.user) / count * 1e6
    system = (cpu1.system - cpu0.system) / count * 1e6
    per_batch = group.records / max(group.batches, 1)
    if sink.group_commit is None:
        group.close()
    sink.close()
    return rate, per_batch, user, system, verified(path)


def row(label: str, rate: float, per: float | None, user: float, system: float, ok: str) -> None:
    batch = f"{per:9.1f}" if per is not None else f"{'-':>9}"
    cpu = f"{user + system:12.1f} ({system:4.1f})"
    print(f"{label:38} {rate:>10,.0f}  {batch}  {cpu:>19}   {ok}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--writers", default="1,8,64,256", help="comma-separated K values")
    ap.add_argument("--dir", type=Path, default=None, help="where the temporary logs go")
    args = ap.parse_args()
    ks = [int(k) for k in args.writers.split(",")]
    with tempfile.TemporaryDirectory(prefix="guard-audit-bench-", dir=args.dir) as tmp:
        d = Path(tmp)
        print(f"audit log on {os.path.realpath(tmp)}, {args.seconds:g} s per row")
        print(f"{'':38} {'records/s':>10}  {'per fsync':>9}  {'CPU µs/record (sys)':>19}")
        rate, user, system, ok = sync_rate(d / "nofsync.jsonl", args.seconds, fsync=False)
        row("sync, no fsync", rate, None, user, system, ok)
        rate, user, system, ok = sync_rate(
            d / "journal.jsonl", args.seconds, fsync=False, journal=True
        )
        row("sync, no fsync, journal", rate, None, user, system, ok)
        rate, user, system, ok = sync_rate(d / "fsync.jsonl", min(args.seconds, 2.0), fsync=True)
        row("sync, fsync per record", rate, 1.0, user, system, ok)
        for k in ks:
            rate, per, user, system, ok = group_rate(d / f"g{k}.jsonl", args.seconds, k, fsync=True)
            row(f"group commit (durable), {k} writers", rate, per, user, system, ok)
        for k in ks:
            rate, per, user, system, ok = group_rate(
                d / f"h{k}.jsonl", args.seconds, k, fsync=False
            )
            row(f"thread hop, no fsync, {k} writers", rate, None, user, system, ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
