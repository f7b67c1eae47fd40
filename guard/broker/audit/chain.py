"""Hash chain for the audit log: each line commits to the one before it.

Imports only the stdlib (hashlib, hmac, json). No file or socket I/O: `audit.sink` writes
what `seal` returns, and `verify_lines` checks what an examiner reads back.

Line format (one JSON object per line, keys sorted, no spaces):
    {"body": {...}, "prev": "<hex sha256 of previous line's hash or GENESIS>", "hash": "<hex>"}
where hash = sha256(prev || "\\n" || canonical(body)). Editing, dropping, reordering or
inserting a line breaks every later hash, so tampering is evident from the first broken
line on. (Signed checkpoints, which stop truncation of the tail and a wholesale rewrite by
someone holding the file, come with the audit-depth work.)
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
    h = hashlib.sha256(prev.encode("ascii"))
    h.update(b"\n")
    h.update(body_bytes)
    return h.hexdigest()


def seal(prev: str, body: Mapping[str, Any]) -> tuple[bytes, str]:
    """Return the JSONL line (with trailing newline) for `body` and its hash."""
    body_bytes = canonical(body)
    digest = link_hash(prev, body_bytes)
    # Built by hand so the body inside the line is byte-identical to what was hashed.
    line = (
        b'{"body":'
        + body_bytes
        + b',"hash":"'
        + digest.encode()
        + b'","prev":"'
        + prev.encode()
        + b'"}\n'
    )
    return line, digest


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
        text = raw.decode() if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
            body, claimed, claimed_prev = obj["body"], obj["hash"], obj["prev"]
        except (ValueError, KeyError, TypeError):
            return ChainReport(False, count, prev, number, "not a chained audit record")
        if not hmac.compare_digest(str(claimed_prev), prev):
            return ChainReport(False, count, prev, number, "prev does not match the previous hash")
        if not hmac.compare_digest(str(claimed), link_hash(prev, canonical(body))):
            return ChainReport(False, count, prev, number, "hash does not match the record")
        prev = claimed
        count += 1
    return ChainReport(True, count, prev)


def last_hash_of(line: bytes) -> str:
    """The hash a new record must chain to, read from the log's last line."""
    obj = json.loads(line)
    value = obj["hash"]
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError("last audit line has no valid hash")
    return value
