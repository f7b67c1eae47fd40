"""The sink's faults of finding 7 (issue 12), reproduced on real files: a torn last line, a
foreign file, a log deleted/renamed/replaced under the broker; and the signed checkpoints
(every N records, every T seconds, at close) with their key file."""

from __future__ import annotations

import logging
import os
import stat
import time

import pytest

from guard.broker.audit.chain import seal, split_line, verify_lines
from guard.broker.audit.checkpoint import key_id, load_public_pem
from guard.broker.audit.sink import AuditUnavailable, JsonlAuditSink
from guard.broker.settings import AuditSettings
from tests.audit.audit_logs import body, kinds, stmt, verify, write_log

# --- torn last line, foreign file ---------------------------------------------------------


def test_a_torn_last_line_is_cut_and_the_cut_recorded(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)  # s s s C
    good = path.read_bytes()
    torn, _ = seal("0" * 64, {"statement": "SELECT 'never ran'", "seq": 5})
    with path.open("ab") as fh:  # a crash mid-write: part of a line, no newline
        fh.write(torn[:57])
    sink = JsonlAuditSink(path)  # what the broker does at start-up: no error
    assert sink.append(stmt(9)) == 7
    sink.close()
    data = path.read_bytes()
    assert data.startswith(good) and torn[:57] not in data
    lines = data.splitlines()
    assert kinds(lines) == ["statement"] * 3 + ["checkpoint", "audit", "checkpoint"] + [
        "statement",
        "checkpoint",
    ]
    repair = body(lines[4])
    assert repair["event"] == "torn-line-cut" and repair["bytes_cut"] == 57
    # chained to the last good line, and the whole log verifies
    assert split_line(lines[4])[2] == split_line(lines[3])[1]
    assert verify_lines(lines).ok and verify(path).ok


def test_a_crash_leaves_an_unsigned_tail_named_and_signed_at_restart(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = write_log(path, 6, close=False)  # s s s s C s s, then the broker dies
    os.close(sink._fd)
    sink._fd = -1
    JsonlAuditSink(path, checkpoint_every=4).close()
    lines = path.read_bytes().splitlines()
    assert kinds(lines)[7:] == ["audit", "checkpoint"]
    note = body(lines[7])
    assert note["event"] == "unsigned-tail" and note["records"] == 2
    assert verify(path).ok


@pytest.mark.parametrize(
    "content",
    [b"root:x:0:0:root:/root:/bin/bash\n", b"hello", b'{"some": "json"}\n', b"\x00\xff\xfe"],
)
def test_a_foreign_file_is_named_and_left_alone(tmp_path, content):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(content)
    with pytest.raises(AuditUnavailable) as err:
        JsonlAuditSink(path)
    assert str(err.value).startswith(f"{path} is not a guard audit log: line 1 ")
    assert path.read_bytes() == content


def test_a_damaged_last_line_is_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    with path.open("ab") as fh:
        fh.write(b"garbage\n")
    with pytest.raises(AuditUnavailable, match=r"is damaged: line 4 \(the last complete one\)"):
        JsonlAuditSink(path)


# --- the log deleted, renamed or replaced under the broker -------------------------------


def _open(path):
    sink = JsonlAuditSink(path, check_interval=0)
    sink.append(stmt(1))
    return sink


def _refused(sink, caplog, path, reason):
    with caplog.at_level(logging.ERROR, logger="guard.broker.audit"):
        for _ in range(3):
            with pytest.raises(AuditUnavailable, match=reason) as err:
                sink.append(stmt(2))
            assert err.value.sqlstate == "58030"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # one clear line, not one per refused statement
    assert str(path) in errors[0].getMessage() and reason in errors[0].getMessage()


def test_a_deleted_log_fails_closed_and_is_not_recreated(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    sink = _open(path)
    os.unlink(path)
    _refused(sink, caplog, path, "was deleted or renamed")
    sink.close()
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl.key", "audit.jsonl.pub"]


def test_a_renamed_log_fails_closed_and_resumes_when_it_is_back(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    sink = _open(path)
    moved = tmp_path / "moved.jsonl"
    os.rename(path, moved)
    before = moved.read_bytes()
    _refused(sink, caplog, path, "was deleted or renamed")
    assert moved.read_bytes() == before and not path.exists()  # nothing written anywhere
    os.rename(moved, path)
    assert sink.append(stmt(3)) == 2
    sink.close()
    assert verify(path).ok


def test_a_replaced_log_fails_closed(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    sink = _open(path)
    other = tmp_path / "other"
    other.write_bytes(b"")
    os.replace(other, path)
    _refused(sink, caplog, path, "was replaced by another file")
    sink.close()
    assert path.read_bytes() == b""


def test_the_check_is_time_bounded(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path)  # default: the path is stat'ed at most every 10 ms
    sink.append(stmt(1))
    os.unlink(path)
    time.sleep(0.02)
    with pytest.raises(AuditUnavailable):
        sink.append(stmt(2))
    sink.close()


def test_an_idle_broker_notices_at_its_flush(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    sink = _open(path)
    os.unlink(path)
    with caplog.at_level(logging.ERROR, logger="guard.broker.audit"):
        sink.flush()  # nothing queued: no exception for the broker's timer, one log line
        sink.flush()
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    with pytest.raises(AuditUnavailable):
        sink.append(stmt(2))


# --- checkpoints and the key ---------------------------------------------------------------


def test_checkpoints_every_n_records_even_inside_one_write(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, checkpoint_every=3)
    assert [sink.append(stmt(i)) for i in range(4)] == [1, 2, 3, 5]
    from guard.broker.audit.serialize import fixed_fields

    assert sink.append_statements([fixed_fields(stmt(i)) for i in range(5)]) == [6, 7, 9, 10, 11]
    lines = path.read_bytes().splitlines()
    assert [i + 1 for i, k in enumerate(kinds(lines)) if k == "checkpoint"] == [4, 8, 12]
    cp = body(lines[3])
    assert (cp["head_seq"], cp["head"], cp["every"]) == (3, split_line(lines[2])[1], 3)
    sink.close()
    assert verify(path).ok


def test_the_default_is_every_1000_records(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path)
    for i in range(1001):
        sink.append(stmt(i))
    lines = path.read_bytes().splitlines()
    assert [i + 1 for i, k in enumerate(kinds(lines)) if k == "checkpoint"] == [1001]
    sink.close()


def test_checkpoints_every_t_seconds_when_records_were_written(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlAuditSink(path, checkpoint_seconds=0.05, check_interval=0)
    sink.flush()
    time.sleep(0.06)
    sink.flush()
    assert path.read_bytes() == b""  # nothing written: nothing to sign
    sink.append(stmt(1))
    time.sleep(0.06)
    sink.flush()  # the broker's 200 ms timer
    sink.append(stmt(2))
    time.sleep(0.06)
    sink.append(stmt(3))  # due before this record: signed first
    assert kinds(path.read_bytes().splitlines()) == [
        "statement",
        "checkpoint",
        "statement",
        "checkpoint",
        "statement",
    ]
    sink.close()


def test_the_key_is_created_0600_and_its_public_key_exported(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = write_log(path, 1)
    key, pub = tmp_path / "audit.jsonl.key", tmp_path / "audit.jsonl.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PRIVATE" not in pub.read_bytes()
    assert key_id(load_public_pem(pub.read_bytes())) == sink.key_id
    assert JsonlAuditSink(path).key_id == sink.key_id  # kept across restarts


def test_from_settings(tmp_path):
    keyfile = tmp_path / "keys" / "signing.key"
    keyfile.parent.mkdir()
    settings = AuditSettings(
        path=tmp_path / "a.jsonl",
        signing_key_file=keyfile,
        checkpoint_every=2,
        checkpoint_seconds=5,
    )
    sink = JsonlAuditSink.from_settings(settings)
    sink.append(stmt(1))
    sink.append(stmt(2))
    assert kinds((tmp_path / "a.jsonl").read_bytes().splitlines())[-1] == "checkpoint"
    assert keyfile.exists() and (tmp_path / "keys" / "signing.pub").exists()
    assert AuditSettings(path=tmp_path / "a").checkpoint_every == 1000
    sink.close()


def test_a_key_others_can_read_is_refused_without_showing_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 1)
    key = tmp_path / "audit.jsonl.key"
    os.chmod(key, 0o644)
    with pytest.raises(AuditUnavailable, match="chmod 600") as err:
        JsonlAuditSink(path)
    assert "PRIVATE" not in str(err.value) and key.read_text() not in str(err.value)


def test_a_bad_key_file_is_refused_without_showing_it(tmp_path):
    key = tmp_path / "audit.jsonl.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END PRIVATE KEY-----\n")
    os.chmod(key, 0o600)
    with pytest.raises(AuditUnavailable) as err:
        JsonlAuditSink(tmp_path / "audit.jsonl")
    assert "c2VjcmV0" not in str(err.value) and "not an unencrypted PEM private key" in str(
        err.value
    )
