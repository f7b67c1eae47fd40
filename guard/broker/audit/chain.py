"""Hash chain for the audit log: each line commits to the one before it.

Imports only the stdlib (hashlib, hmac, json). No file or socket I/O: `audit.sink` writes
what `seal` returns, and `verify_lines` checks what an examiner reads back.

Line format (one JSON object per line):
    {"body":<body JSON>,"link":"<64 hex>","prev":"<64 hex: previous line's hash or GENESIS>"}
where link = sha256(<body JSON bytes exactly as they stand in the line> || "\\n" || prev).
Hashing the stored bytes (not a re-serialization) lets the writer use any JSON encoder and
makes the verifier independent of encoder quirks; the fixed-size tail locates the body.
The body comes first so that a writer can keep SHA-256's state after the part of a body
that repeats (a cached statement's fixed fields: every body but its seq and time) and hash
only the rest and prev: 3 of a statement record's 11 blocks (`audit/_cseal.c`).
Logs written before that have `"hash"` in the key's place, with hash = sha256(prev || "\\n"
|| body); both keys are 4 letters, so the tail has the same size, and a line's key says
which order it was hashed in (one log may hold both: a broker upgraded mid-log). Either
order is an unambiguous encoding: prev is 64 hex digits and a body has no raw newline.
Editing, dropping, reordering or inserting a line breaks every later hash, so tampering is
evident from the first broken line on. Someone holding the file can still recompute every
hash after an edit, or cut the tail: signed checkpoints (`audit.checkpoint`, records in this
same chain) make that evident too, and `audit.verify` checks both.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64


def canonical(body: Mapping[str, Any]) -> bytes:
    """Deterministic JSON: the bytes that are hashed must not depend on dict order."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link_hash(prev: str, body_bytes: bytes) -> str:
    """The hash of a `"link"` line (what `seal` writes): body first, then prev."""
    h = hashlib.sha256(body_bytes)
    h.update(b"\n")
    h.update(prev.encode("ascii"))
    return h.hexdigest()


def legacy_hash(prev: str, body_bytes: bytes) -> str:
    """The hash of a `"hash"` line (logs written before the body came first): prev first."""
    h = hashlib.sha256(prev.encode("ascii"))
    h.update(b"\n")
    h.update(body_bytes)
    return h.hexdigest()


_sha256 = hashlib.sha256
_HEAD = b'{"body":'
_LINK = b',"link":"'
_LEGACY = b',"hash":"'
_TAIL_LEN = len(_LINK) + 64 + len(b'","prev":"') + 64 + len(b'"}')


def seal_bytes(prev: str, body_bytes: bytes) -> tuple[bytes, str]:
    """Return the JSONL line (with newline) for already-serialized body JSON, and its hash."""
    line, digest = seal_line(prev.encode("ascii"), body_bytes)
    return line, digest.decode("ascii")


def seal_line(prev: bytes, body_bytes: bytes) -> tuple[bytes, bytes]:
    """`seal_bytes` with the hashes as ASCII bytes (the writer's hot path)."""
    digest = _sha256(b"%b\n%b" % (body_bytes, prev)).hexdigest().encode("ascii")
    return b'{"body":%b,"link":"%b","prev":"%b"}\n' % (body_bytes, digest, prev), digest


def seal(prev: str, body: Mapping[str, Any]) -> tuple[bytes, str]:
    """Return the JSONL line (with trailing newline) for `body` and its hash."""
    return seal_bytes(prev, canonical(body))


def split_line(line: bytes) -> tuple[bytes, str, str]:
    """(body bytes, hash, prev) of a stored line; ValueError when it is not one."""
    body, digest, prev, _ = split_record(line)
    return body, digest, prev


def split_record(line: bytes) -> tuple[bytes, str, str, dict[str, Any]]:
    """`split_line` and the body parsed; ValueError when the line is not a record."""
    line = line.rstrip(b"\r\n")
    if not line.startswith(_HEAD) or len(line) < len(_HEAD) + _TAIL_LEN + 2:
        raise ValueError("not a chained audit record")
    tail = line[-_TAIL_LEN:]
    if not (_is_tail(tail) and tail.endswith(b'"}')):
        raise ValueError("not a chained audit record")
    body = line[len(_HEAD) : -_TAIL_LEN]
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("audit record body is not a JSON object")
    return body, tail[9:73].decode("ascii"), tail[83:147].decode("ascii"), parsed


def _is_tail(tail: bytes) -> bool:
    return tail[:9] in (_LINK, _LEGACY) and tail[73:83] == b'","prev":"'


def expected_hash(line: bytes, prev: str, body_bytes: bytes) -> str:
    """The hash `line` (split into `prev` and `body_bytes`) must carry, in the order its
    key says it was hashed in."""
    if line.rstrip(b"\r\n")[-_TAIL_LEN:].startswith(_LEGACY):
        return legacy_hash(prev, body_bytes)
    return link_hash(prev, body_bytes)


def is_record_prefix(data: bytes) -> bool:
    """Whether `data` can be the start of a record line (what a write cut short leaves)."""
    return data[: len(_HEAD)] == _HEAD[: len(data)]


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    records: int
    last_hash: str
    first_bad_line: int | None = None  # 1-based
    problem: str | None = None


def verify_lines(lines: Iterable[bytes | str]) -> ChainReport:
    """Check every link; stop at the first line that does not follow from the one before."""
    prev = GENESIS
    count = 0
    for number, raw in enumerate(lines, start=1):
        data = raw.encode() if isinstance(raw, str) else raw
        if not data.strip():
            continue
        try:
            body, claimed, claimed_prev = split_line(data)
        except (ValueError, UnicodeDecodeError):
            return ChainReport(False, count, prev, number, "not a chained audit record")
        if not hmac.compare_digest(claimed_prev, prev):
            return ChainReport(False, count, prev, number, "prev does not match the previous hash")
        if not hmac.compare_digest(claimed, expected_hash(data, prev, body)):
            return ChainReport(False, count, prev, number, "hash does not match the record")
        prev = claimed
        count += 1
    return ChainReport(True, count, prev)


def last_hash_of(line: bytes) -> str:
    """The hash a new record must chain to, read from the log's last line."""
    return split_line(line)[1]


def continuation(data: bytes, last_hash: str) -> list[bytes]:
    """The lines in `data` that continue the chain after `last_hash`, in chain order.

    `data` is what an audit journal held (`audit.sink`): lines in ring order, among them
    stale lines already in the log, lines cut off by a crash or overwritten in part, and
    zeros never written. Each kept line names `last_hash` (or the line kept before it) as
    its prev and its hash checks: following prev links from the log's last line can only
    reach records sealed after it, and a damaged or forged line stops the walk there.
    """
    candidates: dict[str, list[bytes]] = {}
    for raw in data.split(b"\n"):
        line = raw.strip(b"\0")
        # The fixed-size tail names prev without parsing the body (most lines are stale).
        if len(line) < len(_HEAD) + _TAIL_LEN + 2 or not line.startswith(_HEAD):
            continue
        tail = line[-_TAIL_LEN:]
        if not _is_tail(tail):
            continue
        candidates.setdefault(tail[83:147].decode("ascii", "replace"), []).append(line)
    kept: list[bytes] = []
    prev = last_hash
    while prev in candidates:
        for line in candidates.pop(prev):
            try:
                body, digest, claimed_prev = split_line(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if claimed_prev == prev and hmac.compare_digest(
                digest, expected_hash(line, prev, body)
            ):
                kept.append(line + b"\n")
                prev = digest
                break
        else:
            break  # no intact line continues from here
    return kept
