"""Instructions per pgbench transaction through the sans-IO relay, counted by callgrind.

    .venv/bin/python bench/relay_instructions.py            # every mode, both implementations
    .venv/bin/python bench/relay_instructions.py --mode simple --pure
    .venv/bin/python bench/relay_instructions.py --shell pump     # through the asyncio shell
    .venv/bin/python bench/relay_instructions.py drive simple 1200   # what callgrind runs

Wall time on this shared 2-core machine varies by ±30 % from run to run; instruction counts
do not. Each mode's driver runs under `valgrind --tool=callgrind` (PYTHONHASHSEED=0) for
N=1200 and N=200 transactions; the difference / 1000 is the count of one transaction, with
start-up, imports and warm-up cancelled out. `--pure` sets GUARD_PURE_PYTHON=1 (the
pure-Python hot path); without it the compiled one is used when it is built.

The transactions are bench/micro_session.py's: the bytes of one pgbench -S transaction
(simple with a distinct literal each time, extended, prepared; masked: simple, with the
result's column a protected base column, so the gateway masks its row), or of TPC-B's seven
statements (tpcb: pgbench's default script, -M simple, fresh literals each time), and
PostgreSQL's answers, through GatewayConnection with the bench policy; the audit commands
go to a JSONL sink as the shell's (`--sink none`: answered with sequence numbers, nothing
written).

`--shell pump` runs the same traffic through the gateway's own asyncio shell instead
(`proxy.pump.Pump` on uvloop, the sink in the broker's `health.WatchedAuditSink`), with
transports that take the bytes and send nothing: the path of a real connection but for
TLS and the sockets.

`--wall` times that path instead of counting it (no valgrind: the CPU's own SHA-256
instructions and caches): the least time per transaction over 5 rounds of 4000, in each of
3 processes. The real path runs the same code between the kernel's and OpenSSL's work,
with colder caches: 2-3x this on this VM.

    .venv/bin/python bench/relay_instructions.py --wall --compiled
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The audit logs of this process, removed when it exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="guard-bench-audit-")
ROOT = Path(__file__).resolve().parent.parent
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
TEXT = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
MODES = ("simple", "extended", "prepared", "masked", "tpcb")
ACCOUNTS_OID, ABALANCE_ATTNUM = 16500, 3
OTHER_OID, OTHER_ATTNUM = 16400, 4  # a protected column elsewhere (the demo's customers.ssn)
WARM_UP = 50
COUNTS = (200, 1200)


def drive(mode: str, n: int, sink: str, through: str = "core") -> None:
    """Run `n` transactions of `mode` through one connection, after a warm-up."""
    proxy, shell, audit = _connection(sink, masked=mode == "masked")
    # As many requests built for every count (made in Python, they are not the relay's
    # work): building them cancels out of the difference of two counts.
    traffic = _traffic(mode, WARM_UP + max(n, *COUNTS), proxy, shell)[: WARM_UP + n]
    if through == "pump":
        _through_pump(proxy, audit, traffic)
        return
    for transaction in traffic:
        for request, answer in transaction:
            shell(proxy.from_client(request))
            shell(proxy.from_server(answer))
    assert not proxy.closed


class _Null(asyncio.Transport):
    """Takes what is written, sends nothing; the client's is a TLS one, as in guard."""

    def __init__(self, tls: bool) -> None:
        super().__init__()
        self.tls, self.closed, self.reading = tls, False, True

    def write(self, data: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return object() if name == "sslcontext" and self.tls else default

    def set_protocol(self, protocol: Any) -> None:
        pass

    def set_write_buffer_limits(self, high: Any = None, low: Any = None) -> None:
        pass

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


# A transaction: its requests, each with the server's answer.
Transaction = tuple[tuple[bytes, bytes], ...]


def _through_pump(
    proxy: Any, audit: Any, traffic: list[Transaction], rounds: int = 1
) -> list[float]:
    """The traffic through `proxy.pump.Pump`, as the gateway's transports would hand it,
    in `rounds` equal parts: the wall time of each, per transaction."""
    import uvloop

    from guard.broker.health import WatchedAuditSink
    from guard.broker.proxy.core import Pump

    times: list[float] = []

    async def run() -> None:
        pump = Pump(proxy, _Null(tls=True), _Null(tls=False), audit=WatchedAuditSink(audit))
        pump.start(b"", b"")
        client, upstream = pump._client_side, pump._upstream_side
        size = len(traffic) // rounds
        for start in range(0, size * rounds, size):
            began = time.perf_counter()
            for transaction in traffic[start : start + size]:
                for request, answer in transaction:
                    client.data_received(request)
                    upstream.data_received(answer)
            times.append((time.perf_counter() - began) / size)
        assert not proxy.closed and not pump.done.done()

    uvloop.run(run())
    return times


WALL_ROUNDS, WALL_SIZE, WALL_PROCESSES = 5, 4000, 3


def wall(mode: str, sink: str) -> float:
    """The least wall time per transaction (µs) through the pump, over WALL_ROUNDS rounds
    of WALL_SIZE transactions after a warm-up round."""
    proxy, shell, audit = _connection(sink, masked=mode == "masked")
    traffic = _traffic(mode, (WALL_ROUNDS + 1) * WALL_SIZE, proxy, shell)
    return min(_through_pump(proxy, audit, traffic, WALL_ROUNDS + 1)[1:]) * 1e6


def _connection(sink: str, masked: bool) -> tuple[Any, Callable[[list[Any]], None], Any]:
    """A connection of the bench policy, the shell's audit duties for its commands, and
    the sink. `masked`: abalance is a protected base column (masked in the gateway)."""
    from guard.broker.audit.sink import JsonlAuditSink
    from guard.broker.identity.principal import Principal
    from guard.broker.masking.strategies import get_strategy
    from guard.broker.policy.compile import load_policy_file
    from guard.broker.proxy.commands import RecordResults, WriteAudit
    from guard.broker.proxy.core import GatewayConnection
    from guard.broker.proxy.gate import Gate

    policy = load_policy_file(ROOT / "bench/policies.yaml")
    principal = Principal("iss", "alice", frozenset({"engineers"}))
    gate = Gate(
        policy=policy, target="demo", principal=principal, session_id="s", connection_id="c"
    )
    # The gateway's map is never empty where a target has masking (the demo's has): a
    # protected column of another table in every mode, so each RowDescription is looked up
    # as on the real path; `masked` adds abalance itself.
    protected = {(OTHER_OID, OTHER_ATTNUM): get_strategy("redact")}
    if masked:
        protected[(ACCOUNTS_OID, ABALANCE_ATTNUM)] = get_strategy("redact")
    proxy = GatewayConnection(gate, protected=protected, client_user="u")
    audit: Any
    if sink == "jsonl":
        audit = JsonlAuditSink(
            Path(tempfile.mkdtemp(dir=_SCRATCH.name)) / "audit.jsonl", journal=True
        )
    else:
        counter = itertools.count(1)

        class Numbering:
            """Answers with sequence numbers, writes nothing."""

            group_commit = None

            def append_statements(self, records: Sequence[bytes]) -> list[int]:
                return [next(counter) for _ in records]

            def append_results(self, results: object) -> None:
                pass

        audit = Numbering()
    append_statements, append_results = audit.append_statements, audit.append_results

    def shell(commands: list[Any]) -> None:
        while commands:
            for other in commands:
                if other.__class__ is RecordResults:
                    append_results(other.results)
            cmd = commands[-1]
            if cmd.__class__ is not WriteAudit:
                return
            commands = proxy.audit_written(append_statements(cmd.records))

    return proxy, shell, audit


def _traffic(
    mode: str, total: int, proxy: Any, shell: Callable[[list[Any]], None]
) -> list[Transaction]:
    """`total` transactions of one pgbench mode, each request with the server's answer."""
    from guard.broker.pgwire import messages as m
    from guard.broker.pgwire.encoder import encode

    def wire(*messages: m.Message) -> bytes:
        return b"".join(encode(x) for x in messages)

    field = m.FieldDescription("abalance", ACCOUNTS_OID, ABALANCE_ATTNUM, 23, 4, -1, 0)
    tail = (m.DataRow((b"0",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    if mode in ("simple", "masked"):  # a distinct literal each time, like pgbench -M simple
        answer = wire(m.RowDescription((field,)), *tail)
        return [((wire(m.Query(SQL.format(i))), answer),) for i in range(total)]
    if mode == "tpcb":
        return [_tpcb(i, wire, field) for i in range(total)]
    if mode == "extended":
        ext = wire(
            m.Parse("", TEXT, ()),
            m.Bind("", "", (), (b"1",), ()),
            m.Describe(b"P", ""),
            m.Execute("", 0),
            m.Sync(),
        )
        answer = wire(m.ParseComplete(), m.BindComplete(), m.RowDescription((field,)), *tail)
        return [((ext, answer),)] * total
    shell(proxy.from_client(wire(m.Parse("P0_1", TEXT, ()), m.Sync())))
    shell(proxy.from_server(wire(m.ParseComplete(), m.ReadyForQuery(b"I"))))
    prepared = wire(m.Bind("", "P0_1", (), (b"1",), ()), m.Execute("", 0), m.Sync())
    return [((prepared, wire(m.BindComplete(), *tail)),)] * total


def _tpcb(i: int, wire: Callable[..., bytes], field: Any) -> Transaction:
    """pgbench's TPC-B transaction number `i` (-M simple: its values inlined), answered."""
    from guard.broker.pgwire import messages as m

    aid, tid, bid, delta = 1 + i * 7919 % 1000000, 1 + i % 100, 1 + i % 10, i % 10001 - 5000
    done = m.ReadyForQuery(b"T")
    statements = (
        ("BEGIN;", (m.CommandComplete("BEGIN"),)),
        (
            f"UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};",
            (m.CommandComplete("UPDATE 1"),),
        ),
        (
            f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};",
            (m.RowDescription((field,)), m.DataRow((b"0",)), m.CommandComplete("SELECT 1")),
        ),
        (
            f"UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};",
            (m.CommandComplete("UPDATE 1"),),
        ),
        (
            f"UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};",
            (m.CommandComplete("UPDATE 1"),),
        ),
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
            f"VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);",
            (m.CommandComplete("INSERT 0 1"),),
        ),
        ("END;", (m.CommandComplete("COMMIT"),)),
    )
    return tuple(
        (wire(m.Query(sql)), wire(*answer, m.ReadyForQuery(b"I") if sql == "END;" else done))
        for sql, answer in statements
    )


def count(mode: str, n: int, sink: str, pure: bool, shell: str) -> int:
    """Instructions callgrind counts for one driver run."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("GUARD_PURE_PYTHON", None)
    if pure:
        env["GUARD_PURE_PYTHON"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/cg.out",
                sys.executable,
                __file__,
                "drive",
                mode,
                str(n),
                "--sink",
                sink,
                "--shell",
                shell,
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    found = re.search(r"Collected : (\d+)", out.stderr)
    assert found, out.stderr[-2000:]
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--sink", choices=("jsonl", "none"), default="jsonl")
    parser.add_argument("--pure", action="store_true", help="only GUARD_PURE_PYTHON=1")
    parser.add_argument("--compiled", action="store_true", help="only the default build")
    parser.add_argument(
        "--shell", choices=("core", "pump"), default="core", help="pump: through proxy.pump"
    )
    parser.add_argument("--wall", action="store_true", help="time it through the pump")
    args, rest = parser.parse_known_args()
    if rest[:1] == ["drive"]:
        drive(rest[1], int(rest[2]), args.sink, args.shell)
        return
    if rest[:1] == ["wall"]:
        print(f"{wall(rest[1], args.sink):.3f}")
        return
    variants = [True] if args.pure else [False] if args.compiled else [True, False]
    if args.wall:
        for mode in args.mode or MODES:
            for pure in variants:
                env = {**os.environ, "GUARD_PURE_PYTHON": "1" if pure else "0"}
                least = min(
                    float(
                        subprocess.run(
                            [sys.executable, __file__, "wall", mode, "--sink", args.sink],
                            env=env,
                            cwd=ROOT,
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stdout
                    )
                    for _ in range(WALL_PROCESSES)
                )
                label = "pure" if pure else "default"
                print(f"{mode:9} {label:8} sink={args.sink:5} shell=pump {least:10.2f} µs/tx")
        return
    jobs = [(mode, n, pure) for mode in args.mode or MODES for pure in variants for n in COUNTS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = pool.map(lambda j: count(j[0], j[1], args.sink, j[2], args.shell), jobs)
        counts = dict(zip(jobs, found, strict=True))
    for mode in args.mode or MODES:
        for pure in variants:
            per_tx = (counts[(mode, COUNTS[1], pure)] - counts[(mode, COUNTS[0], pure)]) / (
                COUNTS[1] - COUNTS[0]
            )
            label = "pure" if pure else "default"
            print(
                f"{mode:9} {label:8} sink={args.sink:5} shell={args.shell:4} "
                f"{per_tx:10.0f} instructions/tx"
            )


if __name__ == "__main__":
    main()
