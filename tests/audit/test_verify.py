"""`audit.verify` on logs the real sink wrote, damaged the ways an attacker or a crash would:
each damage is found with its kind and its first line; nothing says a record's contents."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard.broker.audit import checkpoint
from guard.broker.audit.chain import split_line
from tests.audit.audit_logs import SECRET_TEXT, body, kinds, rechain, reseal, verify, write_log

# every=4, 10 statements, closed: s s s s C s s s s C s s C (13 lines; C = checkpoint)
LAYOUT = ["statement"] * 4 + ["checkpoint"] + ["statement"] * 4 + ["checkpoint"]
LAYOUT += ["statement"] * 2 + ["checkpoint"]


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 10)
    lines = path.read_bytes().splitlines()
    assert kinds(lines) == LAYOUT
    return path, lines


def check(path, lines, kind, line, seq, **kw):
    report = verify(path, lines, **kw)
    assert not report.ok and report.damage is not None, report
    assert (report.damage.kind, report.damage.line, report.damage.seq) == (kind, line, seq), (
        report.damage
    )
    assert SECRET_TEXT not in report.damage.detail and "engineers" not in report.damage.detail
    return report.damage


def test_an_intact_log_verifies(log):
    path, lines = log
    report = verify(path, lines)
    assert report.ok and report.damage is None
    assert (report.records, report.checkpoints, report.unsigned) == (13, 3, 0)
    assert "ends with a checkpoint" in report.notes[0]


def test_a_fresh_unsigned_tail_is_intact_but_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = write_log(path, 6, close=False)  # s s s s C s s: two records not signed yet
    report = verify(path)
    assert report.ok and report.unsigned == 2
    assert "could be cut or changed without a trace" in report.notes[0]
    sink.close()


def test_modified(log):
    path, lines = log
    lines[2] = lines[2].replace(b"engineers-read", b"deny-ddl")
    check(path, lines, "modified", 3, 3)


def test_modified_with_its_own_hash_recomputed(log):
    path, lines = log
    changed = body(lines[2])
    changed["verdict"] = "deny"
    lines[2] = reseal(lines[2], changed)
    d = check(path, lines, "modified", 3, 3)
    assert "recomputed" in d.detail


def test_deleted(log):
    path, lines = log
    del lines[6:8]  # seq 7 and 8
    d = check(path, lines, "deleted", 7, 7)
    assert "seq 7-8" in d.detail


def test_reordered(log):
    path, lines = log
    lines[1], lines[2] = lines[2], lines[1]
    check(path, lines, "reordered", 2, 2)


def test_truncated_mid_record(log):
    path, lines = log
    lines[-1] = lines[-1][:40]  # a crash mid-write, before the broker restarted
    check(path, lines, "truncated", 13, 13)


def test_truncated_tail_is_reported_once_the_sink_would_have_signed_it(log):
    path, lines = log
    cut = lines[:-1]  # the last checkpoint cut away: lines 11-12 are unsigned
    report = verify(path, cut)
    assert report.ok and report.unsigned == 2  # within 60 s: it could still be coming
    later = time.time() + checkpoint.SECONDS + 11
    d = check(path, cut, "truncated", 13, 13, now=later)
    assert d.detail.startswith("possibly truncated")


def test_truncated_right_after_a_checkpoint_is_not_detectable(log):
    # The documented limit: a cut right after a checkpoint leaves a log that verifies.
    path, lines = log
    report = verify(path, lines[:10])
    assert report.ok and "cut right after a checkpoint" in report.notes[0]


def test_re_chained_after_an_edit(log):
    path, lines = log
    changed = body(lines[5])
    changed["rule"] = "deny-ddl"
    lines[5] = reseal(lines[5], changed)
    forged = rechain(lines, 5)  # every hash consistent again
    d = check(path, forged, "re-chained", 10, 10)  # the first checkpoint after the edit
    assert "between line 5 and this line" in d.detail


def test_re_chained_after_deleting_and_renumbering(log):
    path, lines = log
    rest = []
    for line in lines[3:]:  # drop seq 3, renumber everything after it
        b = body(line)
        b["seq"] -= 1
        rest.append(reseal(line, b))
    forged = rechain(lines[:2] + rest, 2)
    check(path, forged, "re-chained", 4, 4)  # the checkpoint, now at line 4


def test_re_chained_with_the_last_checkpoint_removed(log):
    path, lines = log
    # the checkpoint at line 10 removed, everything after renumbered and re-chained; the
    # tail (5 records) is longer than the sink ever leaves unsigned (every 4)
    rest = []
    for line in lines[10:12]:
        b = body(line)
        b["seq"] -= 1
        rest.append(reseal(line, b))
    forged = rechain(lines[:9] + rest, 9)
    d = check(path, forged, "re-chained", 6, 6)
    assert "signs every 4" in d.detail


def test_forged_checkpoint_with_another_key(log):
    path, lines = log
    mallory = Ed25519PrivateKey.generate()
    kid = checkpoint.key_id(mallory.public_key())
    prev, seq = split_line(lines[3])[1], 4
    fake = checkpoint.body(
        mallory, kid, head=prev, head_seq=seq, time="2030-01-01T00:00:00Z", every=4, seconds=60.0
    )
    lines[4] = reseal(lines[4], fake)
    d = check(path, rechain(lines, 4), "forged-checkpoint", 5, 5)
    assert kid in d.detail and "not a key given" in d.detail


def test_forged_checkpoint_signature(log):
    path, lines = log
    cp = body(lines[4])
    cp["every"] = 1000000  # hide a longer unsigned tail: the signature covers it
    lines[4] = reseal(lines[4], cp)
    check(path, rechain(lines, 4), "forged-checkpoint", 5, 5)


def test_a_foreign_file(tmp_path, log):
    path, _ = log
    d = check(path, [b"root:x:0:0:root:/root:/bin/bash"], "not-a-log", 1, None)
    assert d.detail == "line 1 is not a guard audit record"


def test_messages_hold_no_record_contents(log):
    path, lines = log
    lines[2] = json.dumps({"ssn": "123-45-6789", "body": SECRET_TEXT}).encode()
    d = check(path, lines, "modified", 3, 3)
    assert "123-45-6789" not in d.detail
