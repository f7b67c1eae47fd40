"""Signed checkpoints of the audit chain: Ed25519 over the chain head, its seq and the time.

Imports the stdlib, `cryptography` and `audit.chain`; no file I/O. The sink (`audit.sink`)
holds the private key and writes checkpoints; `audit.verify` checks them, offline, with the
public key alone (the `guard` CLI imports this module for `guard audit verify`).

A checkpoint is a record in the chain like any other (so it is hashed and linked too):

    {"alg":"ed25519","every":N,"head":H,"head_seq":S,"key_id":K,"kind":"checkpoint",
     "seconds":T,"seq":S+1,"sig":B64,"time":"..."}

`head` is the hash of the record before it (seq `head_seq`), `every`/`seconds` say how often
the sink writes them (the verifier holds the tail to that), and `sig` signs `message()` of
all that but `seq` and `sig`. Whoever edits, drops or reorders records and recomputes the
hashes after them changes every later head, and cannot sign the new heads without the key.
What stays undetectable from the file alone: records after the last checkpoint (until the
next one, at most N records or T seconds later), and a cut right after a checkpoint; an
external copy of the latest checkpoint (or of the log) closes that gap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.broker.audit.chain import canonical

ALG = "ed25519"
KIND = "checkpoint"
_CONTEXT = b"guard-audit-checkpoint/1\n"  # domain separation: this key signs nothing else

# Defaults of AuditSettings.checkpoint_every / checkpoint_seconds.
EVERY = 1000
SECONDS = 60.0


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name of a public key: the first 16 hex of SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_pem(data: bytes) -> Ed25519PrivateKey:
    """ValueError (saying nothing of the data) unless `data` is an Ed25519 PKCS#8 PEM key."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, binascii.Error):
        raise ValueError("not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def load_public_pem(data: bytes) -> Ed25519PublicKey:
    """ValueError unless `data` is an Ed25519 public key in PEM (or a private key's PEM,
    whose public half is taken)."""
    if b"PRIVATE KEY" in data:
        return load_private_pem(data).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, binascii.Error):
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def message(*, key: str, head: str, head_seq: int, time: str, every: int, seconds: float) -> bytes:
    """The bytes a checkpoint's signature covers."""
    fields = {
        "alg": ALG,
        "every": every,
        "head": head,
        "head_seq": head_seq,
        "key_id": key,
        "seconds": seconds,
        "time": time,
    }
    return _CONTEXT + canonical(fields)


def body(
    key: Ed25519PrivateKey,
    kid: str,
    *,
    head: str,
    head_seq: int,
    time: str,
    every: int,
    seconds: float,
) -> dict[str, Any]:
    """The body of the checkpoint after record `head_seq` (hash `head`), signed."""
    signed = message(key=kid, head=head, head_seq=head_seq, time=time, every=every, seconds=seconds)
    return {
        "alg": ALG,
        "every": every,
        "head": head,
        "head_seq": head_seq,
        "key_id": kid,
        "kind": KIND,
        "seconds": seconds,
        "seq": head_seq + 1,
        "sig": base64.b64encode(key.sign(signed)).decode("ascii"),
        "time": time,
    }


def signature_valid(
    public: Ed25519PublicKey, record: dict[str, Any], *, head: str, head_seq: int
) -> bool:
    """Whether `record` (a checkpoint body) signs chain head `head` at `head_seq`; the other
    signed fields are the record's own."""
    try:
        signed = message(
            key=str(record["key_id"]),
            head=head,
            head_seq=head_seq,
            time=str(record["time"]),
            every=int(record["every"]),
            seconds=float(record["seconds"]),
        )
        signature = base64.b64decode(str(record["sig"]), validate=True)
        public.verify(signature, signed)
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidSignature):
        return False
    return True
