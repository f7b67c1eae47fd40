"""Offline verification of an audit log: the chain, the signed checkpoints, the tail.

Imports the stdlib, `cryptography` and `audit.chain`/`audit.checkpoint`; no I/O (the caller
reads the file and passes its lines). `guard audit verify` runs it, so an examiner needs the
log and the public key, never the broker.

`verify_log` reads the lines in order and stops at the first damage, which it names by line
number (1-based), the seq the record should have had, and a kind:

- `not-a-log`: line 1 is not a guard audit record (a foreign file);
- `modified`: a record's hash does not match its content, or a line is not a record at all,
  or a record's hash was recomputed after an edit (the next record's `prev` disagrees);
- `deleted`: records are missing (the next seq found is higher, the links do not join);
- `reordered`: a record is out of its place (a lower seq, or a missing one found later);
- `re-chained`: every hash is consistent, but a checkpoint's signed chain head is not the
  chain's (records before it were changed and the hashes recomputed), or the records after
  the last checkpoint are more than the sink ever leaves unsigned (a checkpoint was removed);
- `forged-checkpoint`: a checkpoint with an unknown key id or a signature that fails;
- `truncated`: the last line is cut off mid-record (a crash mid-write), or the log ends with
  records no checkpoint covers although the sink would have signed them by now (`now` is
  more than `seconds` + `grace` after the first of them): the log was cut after them, or the
  broker stopped without closing it. Either way they, and anything cut, cannot be checked.

What the file alone cannot show: records after the last checkpoint can be cut or changed
without a trace until the next checkpoint (at most `every` records or `seconds` later), and
a cut right after a checkpoint leaves a log that verifies. Keep a copy of the latest
checkpoint elsewhere to close that gap. Messages never quote record contents.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guard.broker.audit.chain import GENESIS, expected_hash, split_record
from guard.broker.audit.checkpoint import EVERY, KIND, SECONDS, key_id, signature_valid

GRACE = 10.0  # seconds of clock skew and scheduling slack allowed past `seconds`

KINDS = (
    "not-a-log",
    "modified",
    "deleted",
    "reordered",
    "re-chained",
    "forged-checkpoint",
    "truncated",
)


@dataclass(frozen=True)
class Damage:
    kind: str
    line: int  # 1-based; one past the end for records cut from the end
    seq: int | None  # the seq that record should have
    detail: str


@dataclass
class VerifyReport:
    ok: bool = True
    lines: int = 0
    records: int = 0  # checkpoints included
    checkpoints: int = 0
    key_ids: list[str] = field(default_factory=list)  # of the checkpoints, in order seen
    last_checkpoint_line: int | None = None
    last_checkpoint_time: str | None = None
    unsigned: int = 0  # records after the last checkpoint
    damage: Damage | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _epoch(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def keys_by_id(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key_id(k): k for k in keys}


def verify_log(
    lines: Iterable[bytes],
    keys: Mapping[str, Ed25519PublicKey],
    *,
    now: float,
    grace: float = GRACE,
) -> VerifyReport:
    """Check `lines` (a log's lines, with or without newlines) against `keys` (by key id)."""
    return _Verifier(keys, now, grace).run(iter(lines))


class _Damaged(Exception):
    def __init__(self, kind: str, line: int, seq: int | None, detail: str) -> None:
        super().__init__(kind)
        self.damage = Damage(kind, line, seq, detail)


class _Verifier:
    def __init__(self, keys: Mapping[str, Ed25519PublicKey], now: float, grace: float) -> None:
        self.keys, self.now, self.grace = keys, now, grace
        self.report = VerifyReport()
        self.prev = GENESIS
        self.expected = 1  # the seq the next record must have
        self.every, self.seconds = EVERY, SECONDS
        self.tail_first: float | None = None  # time of the first record after the last checkpoint
        self.tail_last: float | None = None
        self.tail_first_line = 1

    def run(self, lines: Iterator[bytes]) -> VerifyReport:
        try:
            for number, raw in enumerate(lines, start=1):
                self.report.lines = number
                if raw.strip():
                    self.line(number, raw, lines)
            self.tail()
        except _Damaged as exc:
            self.report.ok = False
            self.report.damage = exc.damage
        return self.report

    def line(self, number: int, raw: bytes, rest: Iterator[bytes]) -> None:
        expected = self.expected
        try:
            body_bytes, claimed, claimed_prev, body = split_record(raw)
        except ValueError:
            self.unreadable(number, raw, rest)
        seq = body.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            seq = None
        if not hmac.compare_digest(claimed, expected_hash(raw, claimed_prev, body_bytes)):
            raise _Damaged(
                "modified",
                number,
                expected,
                "the record's hash does not match its content: it was changed after it was written",
            )
        if not hmac.compare_digest(claimed_prev, self.prev):
            self.unlinked(number, seq, rest)
        if seq != expected:
            raise _Damaged(
                "modified",
                number,
                expected,
                f"the record says seq {seq} where seq {expected} belongs (changed and the "
                "hashes recomputed)",
            )
        if body.get("kind") == KIND:
            self.checkpoint(number, body)
        else:
            self.report.unsigned += 1
            when = _epoch(body.get("time"))
            if self.tail_first is None:
                self.tail_first, self.tail_first_line = when, number
            self.tail_last = when if when is not None else self.tail_last
        self.prev = claimed
        self.expected += 1
        self.report.records += 1

    def unreadable(self, number: int, raw: bytes, rest: Iterator[bytes]) -> NoReturn:
        if self.report.records == 0:
            raise _Damaged("not-a-log", number, None, f"line {number} is not a guard audit record")
        if not raw.endswith(b"\n") and next(rest, None) is None:
            raise _Damaged(
                "truncated",
                number,
                self.expected,
                "the last line is cut off mid-record (a write interrupted by a crash; the "
                "broker removes it, and records that, when it next opens the log)",
            )
        raise _Damaged("modified", number, self.expected, "the line is not an audit record")

    def unlinked(self, number: int, seq: int | None, rest: Iterator[bytes]) -> NoReturn:
        """The record does not chain to the one before: say why, from the seqs."""
        expected = self.expected
        if seq == expected and self.report.records:
            raise _Damaged(
                "modified",
                number - 1,
                expected - 1,
                "the record's hash was recomputed after an edit: the next record "
                f"(line {number}) was chained to a different hash",
            )
        if seq is None or seq == expected:
            raise _Damaged(
                "modified", number, expected, "the record is not chained to the one before"
            )
        if seq < expected:
            raise _Damaged(
                "reordered",
                number,
                expected,
                f"seq {seq} stands where seq {expected} belongs (records moved, or copied in)",
            )
        if _seq_later(rest, expected):
            raise _Damaged(
                "reordered",
                number,
                expected,
                f"seq {seq} stands where seq {expected} belongs, and seq {expected} comes "
                "later (records moved, or one inserted)",
            )
        missing = f"seq {expected}" + (f"-{seq - 1}" if seq - 1 > expected else "")
        raise _Damaged(
            "deleted",
            number,
            expected,
            f"{seq - expected} record(s) are missing before this line ({missing})",
        )

    def checkpoint(self, number: int, body: dict[str, Any]) -> None:
        expected, report = self.expected, self.report
        kid = str(body.get("key_id"))
        public = self.keys.get(kid)
        if public is None:
            raise _Damaged(
                "forged-checkpoint",
                number,
                expected,
                f"the checkpoint names key id {kid}, which is not a key given to verify with",
            )
        if body.get("head") != self.prev or body.get("head_seq") != expected - 1:
            since = (
                f"line {report.last_checkpoint_line}"
                if report.last_checkpoint_line
                else ("the start")
            )
            raise _Damaged(
                "re-chained",
                number,
                expected,
                "the chain head this checkpoint signed is not the chain's: records between "
                f"{since} and this line were changed, added or removed and the hashes "
                "recomputed",
            )
        if not signature_valid(public, body, head=self.prev, head_seq=expected - 1):
            raise _Damaged(
                "forged-checkpoint",
                number,
                expected,
                f"the checkpoint's signature does not verify with key {kid}",
            )
        report.checkpoints += 1
        if kid not in report.key_ids:
            report.key_ids.append(kid)
        report.last_checkpoint_line = number
        report.last_checkpoint_time = str(body.get("time"))
        self.every, self.seconds = int(body["every"]), float(body["seconds"])
        report.unsigned = 0
        self.tail_first = self.tail_last = None

    def tail(self) -> None:
        """The records after the last checkpoint: no more, and no older, than the sink
        leaves unsigned."""
        report, every, seconds = self.report, self.every, self.seconds
        first_seq = self.expected - report.unsigned
        span = f"lines {self.tail_first_line}-{report.lines}"
        if not report.unsigned:
            if report.checkpoints:
                report.notes.append(
                    "the log ends with a checkpoint: a cut right after a checkpoint cannot be "
                    "told from the file alone; compare the last checkpoint with a copy kept "
                    "elsewhere"
                )
            return
        removed = "a checkpoint was removed and the records after it re-chained"
        if report.unsigned > every:
            raise _Damaged(
                "re-chained",
                self.tail_first_line,
                first_seq,
                f"{report.unsigned} records ({span}) follow the last checkpoint, but the sink "
                f"signs every {every}: {removed}",
            )
        first, last = self.tail_first, self.tail_last
        if first is not None and last is not None and last - first > seconds + self.grace:
            raise _Damaged(
                "re-chained",
                self.tail_first_line,
                first_seq,
                f"the records after the last checkpoint ({span}) span {last - first:.0f} s, "
                f"but the sink signs every {seconds:g} s: {removed}",
            )
        if first is not None and self.now - first > seconds + self.grace:
            raise _Damaged(
                "truncated",
                report.lines + 1,
                self.expected,
                f"possibly truncated: the last {report.unsigned} record(s) ({span}) are not "
                f"covered by a checkpoint although the first is {self.now - first:.0f} s old "
                f"and the sink signs within {seconds:g} s: the log was cut after them (a "
                "checkpoint and whatever followed removed), or the broker stopped without "
                "closing it; they cannot be checked",
            )
        report.notes.append(
            f"{report.unsigned} record(s) after the last checkpoint ({span}) are not signed "
            f"yet: until the next checkpoint (within {every} records or {seconds:g} s) they "
            "could be cut or changed without a trace"
        )


def _seq_later(lines: Iterable[bytes], wanted: int) -> bool:
    """Whether a later line holds the record with seq `wanted` (consumes `lines`)."""
    needles = (b'"seq":%d,' % wanted, b'"seq":%d}' % wanted)
    for raw in lines:
        if not any(needle in raw for needle in needles):
            continue
        try:
            _, _, _, body = split_record(raw)
        except ValueError:
            continue
        if body.get("seq") == wanted:
            return True
    return False
