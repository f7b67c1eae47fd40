"""The audit hash chain: records link to their predecessor; any edit is evident."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from guard.broker.audit import sink as sink_module
from guard.broker.audit.chain import GENESIS, continuation, seal, split_line, verify_lines
from guard.broker.audit.record import RESULT_FIELDS, ResultRecord, StatementRecord, expand
from guard.broker.audit.serialize import complete
from guard.broker.audit.sink import AuditUnavailable, JsonlAuditSink
from tests.audit.audit_logs import verify, write_log


def _stmt(i: int) -> StatementRecord:
    return StatementRecord(
        session_id="s1",
        connection_id="c1",
        principal="alice",
        issuer="https://idp",
        groups=("engineers",),
        target="demo",
        protocol="simple",
        fingerprint=f"fp{i}",
        statement=f"SELECT $1 + {i}",
        operations=("read",),
        tables=("public.t",),
        verdict="allow",
        rule="engineers-read",
    )


def records(path) -> list[bytes]:
    """The log's lines but its checkpoints (which `close` adds: tests/audit/test_checkpoints)."""
    return [line for line in path.read_bytes().splitlines() if b'"kind":"checkpoint"' not in line]


def test_seal_links_to_previous_hash():
    line1, h1 = seal(GENESIS, {"a": 1})
    line2, h2 = seal(h1, {"a": 2})
    assert json.loads(line2)["prev"] == h1
    assert h1 != h2
    assert verify_lines([line1, line2]).ok


def test_sink_writes_verifiable_chain_and_continues_after_reopen(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path)
    assert sink.append(_stmt(1)) == 1
    assert sink.append(ResultRecord("s1", "c1", 1, "ok", "SELECT", rows=3)) == 2
    sink.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sink = JsonlAuditSink(path)  # a restarted broker continues the same chain
    assert sink.append(_stmt(2)) == 4  # seq 3: the checkpoint `close` wrote
    sink.close()
    lines = path.read_bytes().splitlines()
    report = verify_lines(lines)
    assert report.ok and report.records == 5
    assert [json.loads(x)["body"]["seq"] for x in lines] == [1, 2, 3, 4, 5]
    assert [json.loads(x)["body"]["kind"] for x in lines] == [
        "statement",
        "result",
        "checkpoint",
        "statement",
        "checkpoint",
    ]


def test_a_link_is_the_sha256_of_the_body_then_prev():
    line, digest = seal(GENESIS, {"a": 1})
    line2, _ = seal(digest, {"a": 2})
    parsed = json.loads(line2)
    body = line2[len(b'{"body":') : line2.index(b',"link":"')]
    assert parsed["link"] == hashlib.sha256(body + b"\n" + digest.encode()).hexdigest()
    assert parsed["prev"] == digest and "hash" not in parsed


def _legacy_seal_line(prev: bytes, body: bytes) -> tuple[bytes, bytes]:
    """How lines were sealed before the body came first: logs already hold such lines."""
    digest = hashlib.sha256(prev + b"\n" + body).hexdigest().encode()
    return b'{"body":%b,"hash":"%b","prev":"%b"}\n' % (body, digest, prev), digest


def _write_legacy_log(path, n, monkeypatch) -> list[bytes]:
    with monkeypatch.context() as patched:
        patched.setattr(sink_module, "seal_line", _legacy_seal_line)
        patched.setattr(
            sink_module,
            "seal_record",
            lambda prev, fixed, seq, ns: _legacy_seal_line(prev, complete(fixed, seq, ns)),
        )
        write_log(path, n, every=4)
    return path.read_bytes().splitlines()


def test_a_log_written_prev_first_verifies_and_an_upgraded_broker_continues_it(
    tmp_path, monkeypatch
):
    path = tmp_path / "audit.jsonl"
    old = _write_legacy_log(path, 6, monkeypatch)
    assert old and all(b',"hash":"' in line for line in old)
    assert verify(path).ok  # signed checkpoints included
    write_log(path, 3, every=4)  # the same log, after the upgrade
    lines = path.read_bytes().splitlines()
    new = lines[len(old) :]
    assert new and all(b',"link":"' in line and b',"hash":"' not in line for line in new)
    assert verify_lines(lines).ok
    report = verify(path)
    assert report.ok and report.records == len(lines) and report.checkpoints >= 3


def test_a_lines_key_names_its_hash_order_and_cannot_be_swapped(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    old = _write_legacy_log(path, 2, monkeypatch)
    write_log(path, 2, every=4)
    lines = path.read_bytes().splitlines()
    for number, line in enumerate(lines):
        swapped = (
            line.replace(b',"hash":"', b',"link":"')
            if b',"hash":"' in line
            else line.replace(b',"link":"', b',"hash":"')
        )
        report = verify_lines([*lines[:number], swapped, *lines[number + 1 :]])
        assert not report.ok and report.first_bad_line == number + 1
        assert not verify(path, [*lines[:number], swapped, *lines[number + 1 :]]).ok
    assert len(old) < len(lines)


def test_a_journal_of_prev_first_lines_is_recovered(tmp_path, monkeypatch):
    lines = _write_legacy_log(tmp_path / "audit.jsonl", 5, monkeypatch)
    last = split_line(lines[1])[1]
    ring = b"\0" * 7 + b"\n".join(reversed(lines[2:])) + b"\n\0\0"
    assert continuation(ring, last) == [line + b"\n" for line in lines[2:]]


@pytest.mark.parametrize("tamper", ["edit", "drop", "swap", "insert"])
def test_tampering_is_detected(tmp_path, tamper):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path)
    for i in range(4):
        sink.append(_stmt(i))
    sink.close()
    lines = path.read_bytes().splitlines()
    if tamper == "edit":
        lines[1] = lines[1].replace(b"engineers-read", b"deny-ddl")
    elif tamper == "drop":
        del lines[1]
    elif tamper == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        forged, _ = seal(GENESIS, {"seq": 99})
        lines.insert(2, forged.rstrip(b"\n"))
    report = verify_lines(lines)
    assert not report.ok
    assert report.first_bad_line == 2 if tamper != "insert" else report.first_bad_line == 3


def test_unwritable_log_fails_closed(tmp_path):
    blocked = tmp_path / "dir"
    blocked.mkdir()
    (blocked / "audit.jsonl").mkdir()  # a directory where the file should be
    with pytest.raises(AuditUnavailable):
        JsonlAuditSink(blocked / "audit.jsonl")


def test_write_failure_raises_audit_unavailable(tmp_path):
    sink = JsonlAuditSink(tmp_path / "audit.jsonl")
    os.close(sink._fd)  # simulate the descriptor going bad (disk gone, fd revoked)
    with pytest.raises(AuditUnavailable):
        sink.append(_stmt(1))
    sink._fd = -1


def test_records_have_no_field_for_values():
    # The audit trail must never become a copy of protected data: no field may hold a
    # result value or a raw statement literal.
    fields = set(StatementRecord.__dataclass_fields__) | set(ResultRecord.__dataclass_fields__)
    assert not fields & {"values", "rows_data", "result", "sql", "text", "params"}


def _gate():
    from tests.playbook import connection

    return connection().gate  # the playbook's gate: demo policy, alice, s1/c1


@pytest.mark.parametrize(
    "result",
    [
        {"outcome": "ok", "command_tag": "SELECT", "rows": 3, "masked_cells": 2},
        {"outcome": "error", "sqlstate": "42P01"},
        # Server-supplied words are encoded, never pasted: a quote cannot break the record.
        {"outcome": "ok", "command_tag": 'SEL"ECT\\\n', "rows": None},
    ],
)
def test_gate_records_are_exactly_the_record_types(tmp_path, result):
    # The gate serializes records on the hot path without building the dataclasses; what
    # lands in the chain must still be exactly what the record types define.
    sink = JsonlAuditSink(tmp_path / "audit.jsonl")
    gate = _gate()
    decision = gate.decide("SELECT name FROM customers WHERE id = 1")
    (seq,) = sink.append_statements(gate.statement_records(decision, "simple"))
    expected = ResultRecord(session_id="s1", connection_id="c1", statement_seq=seq, **result)
    # What the connection queues: the ResultRecord's values in RESULT_FIELDS order (an
    # empty call around it adds nothing to the batch, and no empty JSON part).
    sink.append_results([])
    sink.append_results([tuple(getattr(expected, name) for name in RESULT_FIELDS)])
    sink.append_results(iter(()))
    sink.close()
    assert verify_lines((tmp_path / "audit.jsonl").read_bytes().splitlines()).ok
    statement, batch = (json.loads(line)["body"] for line in records(tmp_path / "audit.jsonl"))
    assert batch["kind"] == "results" and batch["seq"] == seq + 1
    (stored,) = expand(batch)
    body = expected.to_body()
    assert {k: v for k, v in stored.items() if k != "time"} == {
        k: v for k, v in body.items() if k != "time"
    }
    assert stored["time"].endswith("Z") and stored["time"] <= batch["time"]
    assert set(statement) == set(StatementRecord.__dataclass_fields__) | {"seq"}
    assert statement["statement"] == "SELECT name FROM customers WHERE id = $1"


def test_results_are_chained_in_batches_and_kept_when_the_write_fails(tmp_path):
    sink = JsonlAuditSink(tmp_path / "audit.jsonl")
    for i in range(3):
        sink.append_deferred(ResultRecord("s1", "c1", i + 1, "ok", "SELECT", rows=i))
    assert (tmp_path / "audit.jsonl").read_bytes() == b""  # queued, not yet written
    fd = sink._fd
    sink._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail
    with pytest.raises(AuditUnavailable):
        sink.flush()
    os.close(sink._fd)
    sink._fd = fd
    sink.append_deferred(ResultRecord("s1", "c1", 4, "error", sqlstate="57014"))
    sink.close()
    assert verify_lines((tmp_path / "audit.jsonl").read_bytes().splitlines()).ok
    lines = records(tmp_path / "audit.jsonl")
    assert len(lines) == 1
    results = expand(json.loads(lines[0])["body"])
    assert [r["statement_seq"] for r in results] == [1, 2, 3, 4]  # nothing lost, in order
    assert results[3]["sqlstate"] == "57014" and results[2]["rows"] == 2


def test_result_fields_are_the_result_records_own():
    # The hot path queues bare values in RESULT_FIELDS order; they must be exactly the
    # ResultRecord's fields (but kind and time, which the sink adds).
    fields = tuple(ResultRecord.__dataclass_fields__)
    assert RESULT_FIELDS == tuple(f for f in fields if f not in ("kind", "time"))


def test_batch_writer_builds_the_same_bodies_as_result_body():
    import json

    from guard.broker.audit.record import expand, iso_from_ns, result_body
    from guard.broker.audit.serialize import result_entries_py

    values = ("s1", "c1", 7, "ok", "UPDATE", 3, 1, None, 6, 0)
    other = ("s1", "c2", 8, "error", None, None, 0, "57014", 0, 0)
    ns = 1_764_000_000_123_456_789
    ids: dict[tuple[str, str], int] = {}
    entries = result_entries_py([([values, other], ns), ([values], ns + 10**9)], ids)
    # Each result an array: its (session, connection) pair an index into the batch's ids,
    # added in the order first seen; no keys, no ids repeated.
    assert ids == {("s1", "c1"): 0, ("s1", "c2"): 1}
    assert json.loads(b"[%b]" % entries)[1] == [
        1,
        8,
        "error",
        None,
        None,
        0,
        "57014",
        0,
        0,
        iso_from_ns(ns),
    ]
    whole = ResultRecord("s9", "c9", 9, "ok", "SELECT 1").to_body()  # given whole (deferred)
    batch = json.loads(
        b'{"kind":"results","ids":%b,"results":[%b,%b],"seq":5,"time":"t"}'
        % (json.dumps(list(ids)).encode(), entries, json.dumps(whole).encode())
    )
    assert expand(batch) == [
        result_body(values, iso_from_ns(ns)),
        result_body(other, iso_from_ns(ns)),
        result_body(values, iso_from_ns(ns + 10**9)),
        whole,
    ]
    # A batch written before the compact entries: its results are the bodies themselves.
    old = {"kind": "results", "results": [result_body(values, "t0")], "seq": 3, "time": "t"}
    assert expand(old) == [result_body(values, "t0")]


def test_a_short_write_leaves_no_torn_line(tmp_path, monkeypatch):
    # A full disk accepts part of a line: the statement must not run (AuditUnavailable),
    # and the log must stay a verifiable chain that later records extend.
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path)
    sink.append(_stmt(1))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(AuditUnavailable, match="short write"):
        sink.append(_stmt(2))
    monkeypatch.setattr(os, "write", real_write)
    assert sink.append(_stmt(3)) == 2
    sink.close()
    report = verify_lines(path.read_bytes().splitlines())
    assert report.ok and report.records == 3  # and the checkpoint `close` wrote
    assert [json.loads(x)["body"]["fingerprint"] for x in records(path)] == ["fp1", "fp3"]
