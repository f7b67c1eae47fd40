"""Real sink-written audit logs for the audit tests, and the tools an attacker would use on
them (edit a line, re-chain everything after an edit)."""

from __future__ import annotations

import json
from pathlib import Path

from guard.broker.audit.chain import GENESIS, seal_bytes, split_line
from guard.broker.audit.checkpoint import load_public_pem
from guard.broker.audit.record import StatementRecord
from guard.broker.audit.sink import JsonlAuditSink
from guard.broker.audit.verify import VerifyReport, keys_by_id, verify_log

SECRET_TEXT = "SELECT full_name FROM customers WHERE id = $1"


def stmt(i: int) -> StatementRecord:
    return StatementRecord(
        session_id="s1",
        connection_id="c1",
        principal="alice",
        issuer="https://idp",
        groups=("engineers",),
        target="demo",
        protocol="simple",
        fingerprint=f"fp{i}",
        statement=SECRET_TEXT,
        operations=("read",),
        tables=("public.customers",),
        verdict="allow",
        rule="engineers-read",
    )


def write_log(path: Path, n: int, *, every: int = 4, close: bool = True) -> JsonlAuditSink:
    sink = JsonlAuditSink(path, checkpoint_every=every)
    for i in range(n):
        sink.append(stmt(i))
    if close:
        sink.close()
    return sink


def kinds(lines: list[bytes]) -> list[str]:
    return [json.loads(line)["body"]["kind"] for line in lines]


def body(line: bytes) -> dict:
    return json.loads(line)["body"]


def rechain(lines: list[bytes], start: int = 0) -> list[bytes]:
    """Recompute every hash from line `start` (0-based) on, as someone holding the file
    (but not the signing key) can."""
    out = list(lines[:start])
    prev = GENESIS if start == 0 else split_line(lines[start - 1])[1]
    for line in lines[start:]:
        sealed, prev = seal_bytes(prev, split_line(line)[0])
        out.append(sealed.rstrip(b"\n"))
    return out


def reseal(line: bytes, new_body: dict) -> bytes:
    """`line` with its body replaced (its prev kept), hash recomputed."""
    _, _, prev = split_line(line)
    sealed, _ = seal_bytes(prev, json.dumps(new_body, separators=(",", ":")).encode())
    return sealed.rstrip(b"\n")


def verify(
    path: Path,
    lines: list[bytes] | None = None,
    *,
    now: float | None = None,
    pubkey: Path | None = None,
) -> VerifyReport:
    import time

    keys = keys_by_id(
        [load_public_pem((pubkey or path.with_name(path.name + ".pub")).read_bytes())]
    )
    data = path.read_bytes().splitlines() if lines is None else lines
    return verify_log(data, keys, now=time.time() if now is None else now)
