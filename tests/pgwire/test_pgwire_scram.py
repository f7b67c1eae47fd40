"""SCRAM-SHA-256 both ends (RFC 7677 test vector included), SASLprep, MD5 passwords."""

from __future__ import annotations

import base64
import hashlib

import pytest

from guard.broker.pgwire import scram
from guard.broker.pgwire.scram import (
    AuthenticationFailed,
    ScramClient,
    ScramKeys,
    ScramServer,
    make_verifier,
    md5_password,
    saslprep,
)

# RFC 7677 section 3.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# One verifier for most tests: PBKDF2 is deliberately slow.
VERIFIER = make_verifier("s3cret", iterations=4096)


def _login(client: ScramClient, server: ScramServer) -> None:
    server_first = server.handle_client_first(client.client_first(), client.mechanism)
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.verify_server_final(server_final)


def test_rfc7677_vector_client_side() -> None:
    client = ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE)
    assert client.mechanism == "SCRAM-SHA-256"
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)
    assert client.done


def test_rfc7677_vector_server_side() -> None:
    verifier = make_verifier("pencil", salt=RFC_SALT, iterations=4096)
    server = ScramServer(verifier, nonce=RFC_SERVER_NONCE)
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_client_and_server_agree() -> None:
    client = ScramClient("s3cret")
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")  # as libpq sends it: the startup user counts
    server = ScramServer(VERIFIER)
    server_first = server.handle_client_first(first)
    client.verify_server_final(server.handle_client_final(client.handle_server_first(server_first)))
    assert client.done


@pytest.mark.parametrize("user", [b"n=", b"n=*", b"n=someone=2Celse"])
def test_server_ignores_the_user_name(user: bytes) -> None:
    server = ScramServer(VERIFIER)
    assert server.handle_client_first(b"n,," + user + b",r=abc").startswith(b"r=abc")


def test_wrong_password_fails_at_the_server() -> None:
    with pytest.raises(AuthenticationFailed, match="password authentication failed"):
        _login(ScramClient("wrong"), ScramServer(VERIFIER))


def test_tampered_server_signature_fails_at_the_client() -> None:
    client = ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE)
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    forged = b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    with pytest.raises(AuthenticationFailed, match="server signature"):
        client.verify_server_final(forged)
    assert not client.done


def test_a_server_that_does_not_know_the_password_is_caught() -> None:
    client = ScramClient("s3cret")
    impostor = ScramServer(make_verifier("other"))
    first = impostor.handle_client_first(client.client_first())
    final = client.handle_server_first(first)
    with pytest.raises(AuthenticationFailed):
        impostor.handle_client_final(final)
    # Even if the impostor answered with a made-up signature, the client would refuse it.
    with pytest.raises(AuthenticationFailed):
        client.verify_server_final(b"v=" + base64.b64encode(b"\x00" * 32))


def test_server_error_attribute_fails_at_the_client() -> None:
    client = ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE)
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthenticationFailed, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_client_final_nonce_must_be_the_combined_nonce() -> None:
    server = ScramServer(make_verifier("pencil", salt=RFC_SALT), nonce=RFC_SERVER_NONCE)
    server.handle_client_first(RFC_CLIENT_FIRST)
    tampered = RFC_CLIENT_FINAL.replace(b"hNlF$k0,", b"hNlF$k1,")
    with pytest.raises(AuthenticationFailed, match="nonce"):
        server.handle_client_final(tampered)


def test_server_first_must_extend_the_client_nonce() -> None:
    client = ScramClient("pencil", nonce=b"abc")
    client.client_first()
    with pytest.raises(AuthenticationFailed, match="nonce"):
        client.handle_server_first(b"r=xyz123,s=" + base64.b64encode(b"salt") + b",i=4096")
    client = ScramClient("pencil", nonce=b"abc")
    client.client_first()
    with pytest.raises(AuthenticationFailed, match="nonce"):  # nothing added by the server
        client.handle_server_first(b"r=abc,s=" + base64.b64encode(b"salt") + b",i=4096")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=abcdef,s=!!!,i=4096",  # bad base64
        b"r=abcdef,s=c2FsdA==,i=-1",
        b"r=abcdef,s=c2FsdA==,i=0",
        b"r=abcdef,s=c2FsdA==,i=4k",
        b"r=abcdef,s=c2FsdA==",
        b"m=ext,r=abcdef,s=c2FsdA==,i=4096",
        b"\xff\xfe",
    ],
)
def test_malformed_server_first(server_first: bytes) -> None:
    client = ScramClient("pencil", nonce=b"abc")
    client.client_first()
    with pytest.raises(AuthenticationFailed):
        client.handle_server_first(server_first)


@pytest.mark.parametrize(
    "client_first",
    [
        b"p=tls-server-end-point,,n=,r=abc",  # binding requested, no TLS here
        b"n,a=admin,n=,r=abc",  # authorization identity
        b"n,,m=ext,n=,r=abc",  # mandatory extension
        b"x,,n=,r=abc",
        b"n,,r=abc",  # no user attribute
        b"n,,n=,r=",  # empty nonce
        b"n,,n=,r=a,b",  # extension after the nonce is fine, but "b" is no attribute…
        b"n,,n=",
        b"garbage",
        b"\xff",
    ],
)
def test_malformed_or_unsupported_client_first(client_first: bytes) -> None:
    server = ScramServer(VERIFIER)
    if client_first == b"n,,n=,r=a,b":
        # PostgreSQL ignores unknown extensions after the nonce; so do we.
        server.handle_client_first(client_first)
        return
    with pytest.raises(AuthenticationFailed):
        server.handle_client_first(client_first)


def test_client_final_must_echo_the_gs2_header() -> None:
    server = ScramServer(VERIFIER)
    server_first = server.handle_client_first(b"y,,n=,r=abc")  # "y": fine without binding
    nonce = server_first.split(b",")[0][2:]
    final = (
        b"c=" + base64.b64encode(b"n,,") + b",r=" + nonce + b",p=" + base64.b64encode(b"\x00" * 32)
    )
    with pytest.raises(AuthenticationFailed, match="channel binding"):
        server.handle_client_final(final)


def test_messages_out_of_order_fail() -> None:
    server = ScramServer(VERIFIER)
    with pytest.raises(AuthenticationFailed):
        server.handle_client_final(RFC_CLIENT_FINAL)
    with pytest.raises(AuthenticationFailed):  # a failed exchange cannot be resumed
        server.handle_client_first(RFC_CLIENT_FIRST)
    client = ScramClient("x")
    with pytest.raises(AuthenticationFailed):
        client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthenticationFailed):
        client.verify_server_final(RFC_SERVER_FINAL)


def test_a_successful_exchange_cannot_be_replayed() -> None:
    client, server = ScramClient("s3cret"), ScramServer(VERIFIER)
    first = client.client_first()
    final = client.handle_server_first(server.handle_client_first(first))
    server.handle_client_final(final)
    with pytest.raises(AuthenticationFailed):
        server.handle_client_final(final)


# ---------------------------------------------------------------------- channel binding
CB = ("tls-server-end-point", hashlib.sha256(b"certificate").digest())


def test_channel_binding_round_trip() -> None:
    client = ScramClient("s3cret", channel_binding=CB)
    server = ScramServer(VERIFIER, channel_binding=CB)
    assert client.mechanism == "SCRAM-SHA-256-PLUS"
    assert server.mechanisms == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    assert client.client_first().startswith(b"p=tls-server-end-point,,")
    client = ScramClient("s3cret", channel_binding=CB)
    _login(client, server)
    assert client.done


def test_channel_binding_data_mismatch_fails() -> None:
    # A man in the middle terminates TLS with another certificate.
    client = ScramClient("s3cret", channel_binding=(CB[0], b"other certificate hash"))
    with pytest.raises(AuthenticationFailed, match="channel binding"):
        _login(client, ScramServer(VERIFIER, channel_binding=CB))


def test_binding_requested_without_tls_fails() -> None:
    server = ScramServer(VERIFIER)
    assert server.mechanisms == ("SCRAM-SHA-256",)
    with pytest.raises(AuthenticationFailed, match="channel binding"):
        _login(ScramClient("s3cret", channel_binding=CB), server)


def test_unknown_binding_type_fails() -> None:
    server = ScramServer(VERIFIER, channel_binding=CB)
    with pytest.raises(AuthenticationFailed, match="channel binding type"):
        server.handle_client_first(b"p=tls-unique,,n=,r=abc", "SCRAM-SHA-256-PLUS")


def test_y_flag_is_a_downgrade_when_the_server_can_bind() -> None:
    server = ScramServer(VERIFIER, channel_binding=CB)
    with pytest.raises(AuthenticationFailed, match="thinks the server does not"):
        server.handle_client_first(b"y,,n=,r=abc")


# ---------------------------------------------------------------------- verifiers, SASLprep
def test_verifier_keeps_no_password_and_hides_keys_in_repr() -> None:
    verifier = make_verifier("hunter2", salt=b"0123456789abcdef", iterations=4096)
    assert (verifier.salt, verifier.iterations) == (b"0123456789abcdef", 4096)
    assert len(verifier.stored_key) == len(verifier.server_key) == 32
    assert "stored_key" not in repr(verifier) and "hunter2" not in repr(verifier)
    assert make_verifier("hunter2").salt != make_verifier("hunter2").salt
    with pytest.raises(ValueError):
        make_verifier("x", iterations=0)


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("user", b"user"),
        ("I\u00adX", b"IX"),  # soft hyphen mapped to nothing (RFC 4013 section 3)
        ("\u00aa", b"a"),  # NFKC
        ("\u2168", b"IX"),
        ("a\u00a0b", b"a b"),  # non-ASCII space mapped to SPACE
        ("\x07", b"\x07"),  # ASCII passes through, as in pg_saslprep
        ("\u0627\u0031", "\u0627\u0031".encode()),  # bidi violation: raw bytes, as PG
        ("a\u0221", "a\u0221".encode()),  # unassigned in Unicode 3.2: raw bytes
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    assert saslprep(password) == prepared


def test_passwords_equal_after_saslprep_authenticate() -> None:
    client = ScramClient("IX")
    _login(client, ScramServer(make_verifier("\u2168")))
    assert client.done


def test_md5_password() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert md5_password("alice", "secret", salt) == expected
    assert len(expected) == 35


def test_invalid_nonce_arguments_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        ScramClient("x", nonce=b"a,b")
    with pytest.raises(ValueError):
        ScramServer(VERIFIER, nonce=b"")


def test_the_mechanism_and_the_binding_flag_must_agree() -> None:
    """A client that chose SCRAM-SHA-256-PLUS must bind ("p="), and one that chose plain
    SCRAM-SHA-256 must not; a mechanism the server did not offer is refused."""
    bound = ScramClient("s3cret", channel_binding=CB).client_first()
    unbound = ScramClient("s3cret").client_first()
    with pytest.raises(AuthenticationFailed, match="does not match"):
        ScramServer(VERIFIER, channel_binding=CB).handle_client_first(unbound, "SCRAM-SHA-256-PLUS")
    with pytest.raises(AuthenticationFailed, match="does not match"):
        ScramServer(VERIFIER, channel_binding=CB).handle_client_first(bound, "SCRAM-SHA-256")
    with pytest.raises(AuthenticationFailed, match="unsupported SASL mechanism"):
        ScramServer(VERIFIER).handle_client_first(unbound, "SCRAM-SHA-256-PLUS")
    with pytest.raises(AuthenticationFailed, match="unsupported SASL mechanism"):
        ScramServer(VERIFIER).handle_client_first(unbound, "SCRAM-SHA-1")
    client = ScramClient("s3cret", channel_binding=CB)
    server = ScramServer(VERIFIER, channel_binding=CB)
    server_first = server.handle_client_first(client.client_first(), "SCRAM-SHA-256-PLUS")
    client.verify_server_final(server.handle_client_final(client.handle_server_first(server_first)))
    assert client.done


@pytest.fixture
def pbkdf2_runs(monkeypatch) -> list[tuple[bytes, int]]:
    """(salt, iterations) of every PBKDF2 the module runs from here on."""
    runs: list[tuple[bytes, int]] = []
    real = scram._salted_password

    def counted(password: str, salt: bytes, iterations: int) -> bytes:
        runs.append((salt, iterations))
        return real(password, salt, iterations)

    monkeypatch.setattr(scram, "_salted_password", counted)
    return runs


def test_kept_keys_log_in_again_without_another_pbkdf2(pbkdf2_runs) -> None:
    keys = ScramKeys()
    for binding in (None, ("tls-server-end-point", b"cert hash"), None):
        server = ScramServer(VERIFIER, channel_binding=binding)
        client = ScramClient("s3cret", channel_binding=binding, keys=keys)
        _login(client, server)
        assert client.done
    # Three logins, fresh nonces each (so fresh proofs), one derivation.
    assert pbkdf2_runs == [(VERIFIER.salt, VERIFIER.iterations)]


PENCIL_OTHER_SALT = make_verifier("pencil", iterations=4096)  # the vector's password, new salt


def test_kept_keys_are_the_passwords_keys_for_each_salt(pbkdf2_runs) -> None:
    keys = ScramKeys()
    # The RFC 7677 vector through kept keys, after another salt was derived: the proof
    # is the vector's, so the keys are right for the salt asked, not the last one.
    _login(ScramClient("s3cret", keys=keys), ScramServer(VERIFIER))
    client = ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE, keys=keys)
    client.client_first()
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)
    other = PENCIL_OTHER_SALT
    _login(ScramClient("pencil", keys=keys), ScramServer(other))
    _login(ScramClient("pencil", keys=keys), ScramServer(other))
    assert pbkdf2_runs[1:] == [(RFC_SALT, 4096), (other.salt, 4096)]


def test_another_password_is_never_answered_from_kept_keys(pbkdf2_runs) -> None:
    keys = ScramKeys()
    _login(ScramClient("s3cret", keys=keys), ScramServer(VERIFIER))
    # Credentials replaced: the old password's keys must not log the new one in (nor
    # the new one's fail against a server that has the old verifier).
    client = ScramClient("not-s3cret", keys=keys)
    with pytest.raises(AuthenticationFailed):
        _login(client, ScramServer(VERIFIER))
    _login(ScramClient("s3cret", keys=keys), ScramServer(VERIFIER))
    assert len(pbkdf2_runs) == 3


def test_kept_keys_are_bounded() -> None:
    keys = ScramKeys()
    for i in range(10):
        keys.derive("s3cret", bytes([i]) * 16, 1)
    assert len(keys._derived) <= ScramKeys._LIMIT
