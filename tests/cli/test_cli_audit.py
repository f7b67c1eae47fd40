"""`guard audit verify` and `guard audit pubkey`, offline, through CliRunner and `main()`:
exit 0 only for an intact log, 1 for damage (named by line, seq and kind), 2 for usage; no
key material or record contents in what it prints."""

from __future__ import annotations

import json
import time

from guard.broker.audit.sink import JsonlAuditSink
from tests.audit.audit_logs import SECRET_TEXT, stmt, write_log
from tests.cli.invoke import guard, home  # noqa: F401


def _log(tmp_path, n=10):
    path = tmp_path / "logs" / "audit.jsonl"
    path.parent.mkdir(exist_ok=True)
    write_log(path, n)
    return path


def _clean(outcome):
    text = outcome.out + outcome.err
    assert "Traceback" not in text and "PRIVATE" not in text and SECRET_TEXT not in text
    return text


def test_an_intact_log_exits_0(home, guard):  # noqa: F811
    path = _log(home)
    outcome = guard("audit", "verify", str(path))
    _clean(outcome)
    assert outcome.code == 0, outcome
    assert outcome.out.startswith(f"ok {path}: 13 records, 3 signed checkpoint(s)")


def test_damage_exits_1_naming_line_seq_and_kind(home, guard):  # noqa: F811
    path = _log(home)
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[6]
    path.write_bytes(b"".join(lines))
    outcome = guard("audit", "verify", str(path))
    _clean(outcome)
    assert outcome.code == 1, outcome
    assert f"{path}: line 7 (seq 7): deleted: 1 record(s) are missing" in outcome.out
    assert outcome.err.splitlines()[0] == f"error: {path} is damaged: deleted at line 7 (seq 7)"


def test_json(home, guard):  # noqa: F811
    path = _log(home)
    pub = path.with_name("audit.jsonl.pub")
    kept = home / "kept.pem"  # the examiner's own copy
    kept.write_bytes(pub.read_bytes())
    outcome = guard("audit", "verify", str(path), "--pubkey", str(kept), "--json")
    assert outcome.code == 0, outcome
    report = json.loads(outcome.out)
    assert report["ok"] is True and report["damage"] is None
    assert report["public_keys"] == [str(kept)] and report["checkpoints"] == 3
    path.write_bytes(path.read_bytes().replace(b"engineers-read", b"deny-ddl", 1))
    outcome = guard("audit", "verify", str(path), "--pubkey", str(kept), "--json")
    _clean(outcome)
    assert outcome.code == 1
    damage = json.loads(outcome.out)["damage"]
    assert (damage["kind"], damage["line"], damage["seq"]) == ("modified", 1, 1)


def test_a_checkpoint_signed_by_another_key_fails(home, guard):  # noqa: F811
    path = _log(home)
    other = home / "other" / "audit.jsonl"
    other.parent.mkdir()
    JsonlAuditSink(other).close()
    outcome = guard(
        "audit", "verify", str(path), "--pubkey", str(other.with_name("audit.jsonl.pub"))
    )
    _clean(outcome)
    assert outcome.code == 1
    assert "line 5 (seq 5): forged-checkpoint" in outcome.out


def test_a_foreign_file(home, guard):  # noqa: F811
    path = _log(home)
    foreign = home / "notes.txt"
    foreign.write_text("dear diary\n")
    outcome = guard("audit", "verify", str(foreign), "--pubkey", str(path) + ".pub")
    assert outcome.code == 1
    assert outcome.err.startswith(f"error: {foreign} is not a guard audit log: line 1 ")


def test_possibly_truncated(home, guard, monkeypatch):  # noqa: F811
    path = _log(home)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # the last checkpoint cut away
    assert guard("audit", "verify", str(path)).code == 0  # too fresh to tell
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    outcome = guard("audit", "verify", str(path))
    assert outcome.code == 1
    assert "line 13 (seq 13): truncated: possibly truncated" in outcome.out


def test_usage_errors_exit_2(home, guard):  # noqa: F811
    missing = guard("audit", "verify", str(home / "nope.jsonl"))
    assert missing.code == 2 and "no such file" in missing.err
    bare = home / "bare.jsonl"
    bare.write_bytes(b"")
    nokey = guard("audit", "verify", str(bare))
    assert nokey.code == 2 and "no public key" in nokey.err and "--pubkey" in nokey.err
    notpem = home / "x.pem"
    notpem.write_text("nonsense")
    bad = guard("audit", "verify", str(bare), "--pubkey", str(notpem))
    assert bad.code == 2 and "not a PEM public key" in bad.err and "nonsense" not in bad.err
    nodev = guard("audit", "verify")
    assert nodev.code == 2 and "no dev stack" in nodev.err
    assert guard("audit", "verify", "--bogus").code == 2


def test_the_dev_stacks_log_is_the_default(home, guard):  # noqa: F811
    path = _log(home)
    (home / "dev").mkdir()
    (home / "dev" / "stack.json").write_text(json.dumps({"audit_log": str(path)}))
    outcome = guard("audit", "verify")
    assert outcome.code == 0 and outcome.out.startswith(f"ok {path}")


def test_pubkey_prints_the_public_pem(home, guard):  # noqa: F811
    path = _log(home)
    pub = path.with_name("audit.jsonl.pub").read_text()
    outcome = guard("audit", "pubkey", "--log", str(path))
    assert outcome.code == 0 and outcome.out == pub
    key = guard("audit", "pubkey", "--key", str(path) + ".key")
    assert key.code == 0 and key.out == pub
    (path.with_name("audit.jsonl.key")).unlink()  # not readable here: the exported copy
    assert guard("audit", "pubkey", "--log", str(path)).out == pub
    none = guard("audit", "pubkey", "--key", str(home / "nokey.key"))
    assert none.code == 2 and "cannot read the signing key" in none.err


def test_records_written_after_the_key_are_verified_with_it(home, guard):  # noqa: F811
    path = _log(home, 2)
    sink = JsonlAuditSink(path)
    sink.append(stmt(3))
    sink.close()
    assert guard("audit", "verify", str(path)).code == 0


def _verdicts(text: str) -> list[str]:
    """Each checked file's verdict line up to its first colon (notes left out)."""
    return [line.split(":")[0] for line in text.splitlines() if not line.startswith("note:")]


def _worker_logs(main, count=2):
    """Gateway worker logs beside `main`, as the broker writes them (`gateway.workers`),
    signed with the broker's key."""
    key = main.with_name(main.name + ".key")
    paths = []
    for i in range(count):
        path = main.with_name(f"audit.gateway-{i}.jsonl")
        sink = JsonlAuditSink(path, checkpoint_every=4, signing_key_file=key)
        for n in range(5):
            sink.append(stmt(n))
        sink.close()
        paths.append(path)
    return paths


def test_several_logs_are_checked_and_any_damage_fails_naming_it(home, guard):  # noqa: F811
    main = _log(home)
    first, second = _worker_logs(main)
    outcome = guard("audit", "verify", str(main), str(first), str(second))
    assert outcome.code == 0, outcome
    assert _verdicts(outcome.out) == [f"ok {main}", f"ok {first}", f"ok {second}"]
    lines = first.read_bytes().splitlines(keepends=True)
    del lines[2]
    first.write_bytes(b"".join(lines))
    outcome = guard("audit", "verify", str(main), str(first), str(second))
    _clean(outcome)
    assert outcome.code == 1, outcome
    verdicts = _verdicts(outcome.out)
    assert verdicts[0] == f"ok {main}" and verdicts[1] == str(first)
    assert verdicts[2] == f"ok {second}"  # checked all the same
    assert outcome.err.startswith(f"error: {first} is damaged: deleted at line 3")
    as_json = guard("audit", "verify", str(main), str(first), "--json")
    reports = json.loads(as_json.out)
    assert as_json.code == 1 and [r["ok"] for r in reports] == [True, False]


def test_the_dev_default_takes_the_gateway_logs_and_a_lone_broker_log_points_at_them(  # noqa: F811
    home,  # noqa: F811
    guard,  # noqa: F811
):
    main = _log(home)
    workers = _worker_logs(main)
    (home / "dev").mkdir()
    (home / "dev" / "stack.json").write_text(json.dumps({"audit_log": str(main)}))
    outcome = guard("audit", "verify")
    assert outcome.code == 0, outcome
    assert _verdicts(outcome.out) == [f"ok {p}" for p in (main, *workers)]
    lone = guard("audit", "verify", str(main))
    assert lone.code == 0
    assert "note: 2 gateway worker log(s) beside it (audit.gateway-0.jsonl, …)" in lone.out
