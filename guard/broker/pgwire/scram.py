"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both ends, plus MD5 passwords.

`ScramServer` is the gateway authenticating a client against a `ScramVerifier` (the broker
keeps verifiers, never passwords); `ScramClient` is the gateway logging in upstream. Both
are sans-IO: they take and return the SASL payloads that travel inside
SASLInitialResponse / SASLResponse / AuthenticationSASLContinue / AuthenticationSASLFinal.

PostgreSQL specifics: the user name in client-first is ignored (the startup packet's user
counts), so the server accepts "n=," and "n=*"; authorization identities ("a=") are refused;
passwords are SASLprep-normalized, falling back to the raw bytes when SASLprep refuses them,
exactly as the server does, or a non-ASCII password would fail against a real server.

Every comparison of secret-derived values uses hmac.compare_digest. Failures raise
`AuthenticationFailed` with a message meant for logs, not for the peer.

Stdlib only (hashlib, hmac, secrets, base64, stringprep, unicodedata); never import guard or
third-party packages here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
DEFAULT_ITERATIONS = 4096  # PostgreSQL's scram_iterations default
SALT_SIZE = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
NONCE_SIZE = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN (random bytes before base64)
_KEY_SIZE = 32  # SHA-256 output


class AuthenticationFailed(Exception):
    """The SCRAM exchange failed: wrong password, tampered or malformed messages."""


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """What a server stores for a password: enough to check a proof, not to make one."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


def make_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> ScramVerifier:
    if iterations < 1:
        raise ValueError("iterations must be positive")
    salt = secrets.token_bytes(SALT_SIZE) if salt is None else salt
    _, stored_key, server_key = _keys(_salted_password(password, salt, iterations))
    return ScramVerifier(salt, iterations, stored_key, server_key)


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The PasswordMessage payload for AuthenticationMD5Password (without the NUL)."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest().encode("ascii")
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode("ascii")


# =========================================================================== server
class ScramServer:
    """One server-side SCRAM-SHA-256 exchange against `verifier`.

    Without `channel_binding` only SCRAM-SHA-256 is offered: a client asking for binding
    ("p=…") fails. With `channel_binding=(type, data)` (e.g. ("tls-server-end-point",
    cert_hash)) SCRAM-SHA-256-PLUS is offered too, and a client claiming the server cannot
    bind ("y") fails, since that means someone stripped -PLUS from the advertisement.
    """

    def __init__(
        self,
        verifier: ScramVerifier,
        *,
        nonce: bytes | None = None,
        channel_binding: tuple[str, bytes] | None = None,
    ) -> None:
        self._verifier = verifier
        self._channel_binding = channel_binding
        self._server_nonce = _nonce_arg(nonce)
        self._state = "first"
        self._cbind_header = b""  # the gs2 header (+ binding data) the client must echo
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """What to put in AuthenticationSASL, most preferred first."""
        if self._channel_binding is not None:
            return (MECHANISM_PLUS, MECHANISM)
        return (MECHANISM,)

    def handle_client_first(self, data: bytes, mechanism: str = MECHANISM) -> bytes:
        """Take client-first-message (sent with SASLInitialResponse naming `mechanism`),
        return server-first-message."""
        _step(self, "first", "client-first-message")
        text = _text(data)
        flag, sep, rest = text.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not sep or not sep2:
            raise AuthenticationFailed("malformed SCRAM gs2 header")
        self._check_binding_flag(flag)
        if mechanism not in self.mechanisms:
            raise AuthenticationFailed(f"unsupported SASL mechanism {mechanism[:40]!r}")
        # The mechanism and the gs2 flag must agree, as in PostgreSQL's auth-scram.c: -PLUS
        # with "n"/"y" would log in unbound although the client chose binding, and binding
        # data under plain SCRAM-SHA-256 is a client that does not know what it sent.
        if (mechanism == MECHANISM_PLUS) != flag.startswith("p="):
            raise AuthenticationFailed(
                f"channel binding flag {flag[:10]!r} does not match mechanism {mechanism}"
            )
        if authzid:
            raise AuthenticationFailed("authorization identities are not supported")
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            raise AuthenticationFailed("unsupported mandatory SCRAM extension")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            raise AuthenticationFailed("malformed client-first-message")
        # attrs[0] is the user name: PostgreSQL ignores it in favour of the startup user.
        client_nonce = attrs[1][2:]
        _check_nonce(client_nonce)
        self._cbind_header = f"{flag},,".encode("ascii")
        if flag.startswith("p=") and self._channel_binding is not None:
            self._cbind_header += self._channel_binding[1]
        self._nonce = client_nonce + self._server_nonce
        self._client_first_bare = bare
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self._state = "final"
        return self._server_first.encode("ascii")

    def _check_binding_flag(self, flag: str) -> None:
        """The gs2 channel-binding flag must agree with what this server offers."""
        if flag == "n":
            return
        if flag == "y":
            if self._channel_binding is not None:
                raise AuthenticationFailed(
                    "client supports channel binding but thinks the server does not"
                )
        elif flag.startswith("p="):
            if self._channel_binding is None:
                raise AuthenticationFailed("client requires channel binding, not available")
            if flag[2:] != self._channel_binding[0]:
                raise AuthenticationFailed(f"unsupported channel binding type {flag[2:]!r}")
        else:
            raise AuthenticationFailed(f"malformed SCRAM channel binding flag {flag[:10]!r}")

    def handle_client_final(self, data: bytes) -> bytes:
        """Take client-final-message, return server-final-message ("v=…")."""
        _step(self, "final", "client-final-message")
        text = _text(data)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        attrs = without_proof.split(",")
        if (
            not sep
            or len(attrs) < 2
            or not attrs[0].startswith("c=")
            or not attrs[1].startswith("r=")
        ):
            raise AuthenticationFailed("malformed client-final-message")
        if not hmac.compare_digest(_unb64(attrs[0][2:]), self._cbind_header):
            raise AuthenticationFailed("channel binding data does not match")
        nonce = attrs[1][2:].encode("ascii", "replace")
        client_nonce = self._nonce[: len(self._nonce) - len(self._server_nonce)]
        if not nonce.startswith(client_nonce.encode("ascii")) or not hmac.compare_digest(
            nonce, self._nonce.encode("ascii")
        ):
            raise AuthenticationFailed("nonce does not match")
        proof = _unb64(proof_b64)
        if len(proof) != _KEY_SIZE:
            raise AuthenticationFailed("malformed client proof")
        auth_message = ",".join(
            (self._client_first_bare, self._server_first, without_proof)
        ).encode("utf-8")
        v = self._verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key):
            raise AuthenticationFailed("password authentication failed")
        self._state = "done"
        return b"v=" + base64.b64encode(_hmac(v.server_key, auth_message))


# =========================================================================== client
class ScramKeys:
    """The client keys one password gives for each salt and iteration count a server has
    sent, kept for the next login with that password.

    Deriving them is PBKDF2 (PostgreSQL's default 4096 iterations: ~1 ms of CPU), and a
    server sends the same salt to every login of a role, so a client that opens a
    connection per statement (pgbench -C, a job without a pool) pays it once instead of
    on every connection. The keys log in as the password does: keep this exactly as long
    as the password it came from (the broker: the session's life).
    """

    __slots__ = ("_password", "_derived")

    # A database sends one salt per role; another one means its verifier was reset.
    _LIMIT = 4

    def __init__(self) -> None:
        self._password: str | None = None
        self._derived: dict[tuple[bytes, int], tuple[bytes, bytes, bytes]] = {}

    def derive(self, password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
        """ClientKey, StoredKey and ServerKey of `password` for this salt and count."""
        if password != self._password:  # new credentials: the old keys go
            self._derived.clear()
            self._password = password
        keys = self._derived.get((salt, iterations))
        if keys is None:
            keys = _keys(_salted_password(password, salt, iterations))
            if len(self._derived) >= self._LIMIT:
                self._derived.clear()
            self._derived[(salt, iterations)] = keys
        return keys


class ScramClient:
    """One client-side SCRAM-SHA-256 exchange.

    `channel_binding=(type, data)` selects SCRAM-SHA-256-PLUS ("p=type"); without it the
    client sends "n,,". `username` defaults to "" because PostgreSQL takes the user from
    the startup packet; `nonce` exists for test vectors. `keys`, when given, keeps the
    password's keys for the next exchange with the same salt.
    """

    def __init__(
        self,
        password: str,
        *,
        channel_binding: tuple[str, bytes] | None = None,
        username: str = "",
        nonce: bytes | None = None,
        keys: ScramKeys | None = None,
    ) -> None:
        self._password = password
        self._keys = keys if keys is not None else ScramKeys()  # kept for this exchange only
        self._channel_binding = channel_binding
        nonce_text = _nonce_arg(nonce)
        self._client_nonce = nonce_text
        if channel_binding is not None:
            self._gs2_header = f"p={channel_binding[0]},,"
        else:
            self._gs2_header = "n,,"
        self._client_first_bare = f"n={_saslname(username)},r={nonce_text}"
        self._state = "first"
        self._server_signature = b""

    @property
    def mechanism(self) -> str:
        return MECHANISM_PLUS if self._channel_binding is not None else MECHANISM

    def client_first(self) -> bytes:
        _step(self, "first", "client-first-message")
        self._state = "server-first"
        return (self._gs2_header + self._client_first_bare).encode("utf-8")

    def handle_server_first(self, data: bytes) -> bytes:
        """Take server-first-message, return client-final-message."""
        _step(self, "server-first", "server-first-message")
        server_first = _text(data)
        attrs = server_first.split(",")
        if attrs[0].startswith("m="):
            raise AuthenticationFailed("unsupported mandatory SCRAM extension")
        if (
            len(attrs) < 3
            or not attrs[0].startswith("r=")
            or not attrs[1].startswith("s=")
            or not attrs[2].startswith("i=")
        ):
            raise AuthenticationFailed("malformed server-first-message")
        nonce = attrs[0][2:]
        # The server must extend our nonce, or it is replaying an old exchange.
        if not nonce.startswith(self._client_nonce) or len(nonce) <= len(self._client_nonce):
            raise AuthenticationFailed("server nonce does not extend the client nonce")
        _check_nonce(nonce)
        salt = _unb64(attrs[1][2:])
        iterations_text = attrs[2][2:]
        if not iterations_text.isascii() or not iterations_text.isdigit():
            raise AuthenticationFailed("malformed iteration count")
        iterations = int(iterations_text)
        if iterations < 1 or not salt:
            raise AuthenticationFailed("invalid salt or iteration count")
        client_key, stored_key, server_key = self._keys.derive(self._password, salt, iterations)
        cbind = self._gs2_header.encode("ascii")
        if self._channel_binding is not None:
            cbind += self._channel_binding[1]
        without_proof = f"c={_b64(cbind)},r={nonce}"
        auth_message = ",".join((self._client_first_bare, server_first, without_proof)).encode(
            "utf-8"
        )
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = "server-final"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify_server_final(self, data: bytes) -> None:
        """Check server-final-message: the server proves it knew the verifier too."""
        _step(self, "server-final", "server-final-message")
        text = _text(data)
        if text.startswith("e="):
            raise AuthenticationFailed(f"server reported SCRAM error {text[2:64]!r}")
        if not text.startswith("v="):
            raise AuthenticationFailed("malformed server-final-message")
        signature = _unb64(text[2:].split(",", 1)[0])
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthenticationFailed("server signature does not match")
        self._state = "done"

    @property
    def done(self) -> bool:
        """True once the server's signature checked out (mutual authentication)."""
        return self._state == "done"


# =========================================================================== primitives
def _step(exchange: ScramServer | ScramClient, expected: str, what: str) -> None:
    # Any step out of order, like any failed step, ends the exchange for good: each step
    # sets "failed" first and only a successful step moves on.
    state = exchange._state
    exchange._state = "failed"
    if state != expected:
        raise AuthenticationFailed(f"{what} out of order")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def _keys(salted: bytes) -> tuple[bytes, bytes, bytes]:
    """ClientKey, StoredKey, ServerKey."""
    client_key = _hmac(salted, b"Client Key")
    return client_key, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthenticationFailed("malformed base64 in SCRAM message") from exc


def _text(data: bytes) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthenticationFailed("SCRAM message is not UTF-8") from exc


def _check_nonce(nonce: str) -> None:
    # RFC 5802: printable ASCII except ",".
    if not nonce or not all("!" <= c <= "~" and c != "," for c in nonce):
        raise AuthenticationFailed("invalid SCRAM nonce")


def _nonce_arg(nonce: bytes | None) -> str:
    if nonce is None:
        return _b64(secrets.token_bytes(NONCE_SIZE))
    text = nonce.decode("ascii", "replace")
    try:
        _check_nonce(text)
    except AuthenticationFailed:
        raise ValueError("a nonce is printable ASCII without ','") from None
    return text


def _saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,  # unassigned code points
)


def saslprep(password: str) -> bytes:
    """RFC 4013 SASLprep as PostgreSQL's pg_saslprep applies it to SCRAM passwords.

    ASCII passes through untouched; a password SASLprep rejects is used as raw UTF-8
    rather than refused, which is what the server does when it builds its verifier.
    """
    raw = password.encode("utf-8", "surrogatepass")
    if password.isascii():
        return raw
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    normalized = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not normalized or any(check(c) for c in normalized for check in _PROHIBITED):
        return raw
    if any(stringprep.in_table_d1(c) for c in normalized):
        # Bidi rule: RandALCat text has no LCat and starts and ends with RandALCat.
        if any(stringprep.in_table_d2(c) for c in normalized) or not (
            stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])
        ):
            return raw
    return normalized.encode("utf-8")
