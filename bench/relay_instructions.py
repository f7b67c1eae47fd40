"""Instructions per pgbench -S transaction through the sans-IO relay, counted by callgrind.

    .venv/bin/python bench/relay_instructions.py            # every mode, both implementations
    .venv/bin/python bench/relay_instructions.py --mode simple --pure
    .venv/bin/python bench/relay_instructions.py drive simple 1200   # what callgrind runs

Wall time on this shared 2-core machine varies by ±30 % from run to run; instruction counts
do not. Each mode's driver runs under `valgrind --tool=callgrind` (PYTHONHASHSEED=0) for
N=1200 and N=200 transactions; the difference / 1000 is the count of one transaction, with
start-up, imports and warm-up cancelled out. `--pure` sets GUARD_PURE_PYTHON=1 (the
pure-Python hot path); without it the compiled one is used when it is built.

The transactions are bench/micro_session.py's: the bytes of one pgbench -S transaction
(simple with a distinct literal each time, extended, prepared; masked: simple, with the
result's column a protected base column, so the gateway masks its row) and PostgreSQL's
answer, through GatewayConnection with the bench policy; the audit commands go to a JSONL sink as
the shell's (`--sink none`: answered with sequence numbers, nothing written).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
TEXT = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
MODES = ("simple", "extended", "prepared", "masked")
ACCOUNTS_OID, ABALANCE_ATTNUM = 16500, 3
WARM_UP = 50
COUNTS = (200, 1200)


def drive(mode: str, n: int, sink: str) -> None:
    """Run `n` transactions of `mode` through one connection, after a warm-up."""
    proxy, shell = _connection(sink, masked=mode == "masked")
    requests, answer = _traffic(mode, WARM_UP + n, proxy, shell)
    for request in requests:
        shell(proxy.from_client(request))
        shell(proxy.from_server(answer))
    assert not proxy.closed


def _connection(sink: str, masked: bool) -> tuple[Any, Callable[[list[Any]], None]]:
    """A connection of the bench policy, and the shell's audit duties for its commands.
    `masked`: abalance is a protected base column (masked in the gateway, as ****)."""
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
    protected = {(ACCOUNTS_OID, ABALANCE_ATTNUM): get_strategy("redact")} if masked else {}
    proxy = GatewayConnection(gate, protected=protected, client_user="u")
    if sink == "jsonl":
        audit = JsonlAuditSink(Path(tempfile.mkdtemp()) / "audit.jsonl")
        append_statements, append_results = audit.append_statements, audit.append_results
    else:
        counter = itertools.count(1)

        def append_statements(records: Sequence[bytes]) -> list[int]:
            return [next(counter) for _ in records]

        def append_results(results: object) -> None:
            pass

    def shell(commands: list[Any]) -> None:
        while commands:
            for other in commands:
                if other.__class__ is RecordResults:
                    append_results(other.results)
            cmd = commands[-1]
            if cmd.__class__ is not WriteAudit:
                return
            commands = proxy.audit_written(append_statements(cmd.records))

    return proxy, shell


def _traffic(
    mode: str, total: int, proxy: Any, shell: Callable[[list[Any]], None]
) -> tuple[list[bytes], bytes]:
    """`total` requests of one pgbench -S mode, and the server's answer to each."""
    from guard.broker.pgwire import messages as m
    from guard.broker.pgwire.encoder import encode

    def wire(*messages: m.Message) -> bytes:
        return b"".join(encode(x) for x in messages)

    field = m.FieldDescription("abalance", ACCOUNTS_OID, ABALANCE_ATTNUM, 23, 4, -1, 0)
    tail = (m.DataRow((b"0",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    if mode in ("simple", "masked"):  # a distinct literal each time, like pgbench -M simple
        answer = wire(m.RowDescription((field,)), *tail)
        return [wire(m.Query(SQL.format(i))) for i in range(total)], answer
    if mode == "extended":
        ext = wire(
            m.Parse("", TEXT, ()),
            m.Bind("", "", (), (b"1",), ()),
            m.Describe(b"P", ""),
            m.Execute("", 0),
            m.Sync(),
        )
        answer = wire(m.ParseComplete(), m.BindComplete(), m.RowDescription((field,)), *tail)
        return [ext] * total, answer
    shell(proxy.from_client(wire(m.Parse("P0_1", TEXT, ()), m.Sync())))
    shell(proxy.from_server(wire(m.ParseComplete(), m.ReadyForQuery(b"I"))))
    prepared = wire(m.Bind("", "P0_1", (), (b"1",), ()), m.Execute("", 0), m.Sync())
    return [prepared] * total, wire(m.BindComplete(), *tail)


def count(mode: str, n: int, sink: str, pure: bool) -> int:
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
    args, rest = parser.parse_known_args()
    if rest[:1] == ["drive"]:
        drive(rest[1], int(rest[2]), args.sink)
        return
    variants = [True] if args.pure else [False] if args.compiled else [True, False]
    jobs = [(mode, n, pure) for mode in args.mode or MODES for pure in variants for n in COUNTS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = pool.map(lambda j: count(j[0], j[1], args.sink, j[2]), jobs)
        counts = dict(zip(jobs, found, strict=True))
    for mode in args.mode or MODES:
        for pure in variants:
            per_tx = (counts[(mode, COUNTS[1], pure)] - counts[(mode, COUNTS[0], pure)]) / (
                COUNTS[1] - COUNTS[0]
            )
            label = "pure" if pure else "default"
            print(f"{mode:9} {label:8} sink={args.sink:5} {per_tx:10.0f} instructions/tx")


if __name__ == "__main__":
    main()
