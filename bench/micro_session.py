"""CPU cost of the sans-IO relay per pgbench -S transaction, without sockets.

    .venv/bin/python bench/micro_session.py

Feeds the bytes of one `pgbench -S` transaction (simple and extended protocol) and its
responses through GatewayConnection with the demo policy, executing its audit commands
against a real JSONL audit sink as the shell does (`proxy.pump.Pump.run`), and prints µs per
transaction. The full-stack numbers come from bench/run.py.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from guard.broker.audit.sink import JsonlAuditSink
from guard.broker.identity.principal import Principal
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.policy.compile import load_policy_file
from guard.broker.proxy.commands import RecordResults, WriteAudit
from guard.broker.proxy.core import GatewayConnection
from guard.broker.proxy.gate import Gate

# The audit logs of this process, removed when it exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="guard-bench-audit-")
ROOT = Path(__file__).resolve().parent.parent
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"


def wire(*messages) -> bytes:
    return b"".join(encode(x) for x in messages)


def main() -> None:
    policy = load_policy_file(ROOT / "bench/policies.yaml")
    audit = JsonlAuditSink(Path(tempfile.mkdtemp(dir=_SCRATCH.name)) / "audit.jsonl", journal=True)
    principal = Principal("iss", "alice", frozenset({"engineers"}))
    gate = Gate(
        policy=policy,
        target="demo",
        principal=principal,
        session_id="s",
        connection_id="c",
    )
    proxy = GatewayConnection(gate, protected={}, client_user="u")

    def shell(commands: list) -> None:
        """The shell's audit duties (transport writes left out)."""
        while commands:
            cmd = commands[-1]
            for other in commands:
                if other.__class__ is RecordResults:
                    audit.append_results(other.results)
            if cmd.__class__ is not WriteAudit:
                return
            commands = proxy.audit_written(audit.append_statements(cmd.records))

    field = m.FieldDescription("abalance", 16500, 3, 23, 4, -1, 0)
    row = (m.DataRow((b"0",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    text = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    n = 20000

    def per_tx(requests: list[bytes], *reply: m.BackendMessage) -> float:
        """CPU µs per request/reply pair through the relay."""
        answer = wire(*reply)
        start = time.process_time()
        for request in requests:
            shell(proxy.from_client(request))
            shell(proxy.from_server(answer))
        return (time.process_time() - start) / len(requests) * 1e6

    # simple: a different literal each time, like pgbench -M simple (analysis cache misses
    # on text, so this measures parse + policy + audit per statement).
    simple = per_tx(
        [wire(m.Query(SQL.format(i % 100000))) for i in range(n)],
        m.RowDescription((field,)),
        *row,
    )
    # extended: unnamed Parse of the same text with a parameter (pgbench -M extended).
    ext = wire(
        m.Parse("", text, ()),
        m.Bind("", "", (), (b"1",), ()),
        m.Describe(b"P", ""),
        m.Execute("", 0),
        m.Sync(),
    )
    extended = per_tx(
        [ext] * n, m.ParseComplete(), m.BindComplete(), m.RowDescription((field,)), *row
    )
    # prepared: Parse once, then Bind/Execute/Sync of the named statement (-M prepared).
    shell(proxy.from_client(wire(m.Parse("P0_1", text, ()), m.Sync())))
    shell(proxy.from_server(wire(m.ParseComplete(), m.ReadyForQuery(b"I"))))
    prep = wire(m.Bind("", "P0_1", (), (b"1",), ()), m.Execute("", 0), m.Sync())
    prepared = per_tx([prep] * n, m.BindComplete(), *row)
    print(
        f"sans-IO core CPU per pgbench -S transaction: simple {simple:.1f} µs "
        f"(distinct literals), extended {extended:.1f} µs, prepared {prepared:.1f} µs"
    )


if __name__ == "__main__":
    main()
