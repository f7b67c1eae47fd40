"""The gateway's upstream TLS record layer (sans-IO, memory BIOs) against a real OpenSSL
server object: verification, round trips, close_notify, and records that do not decrypt;
and the client leg's `DirectSSLObject` (the same TLS, without ssl.SSLObject's forwarding
frames)."""

from __future__ import annotations

import ssl

import pytest

from guard.broker.proxy.tlslayer import DirectSSLObject, TLSClient, TLSClosed
from guard.devstack.tls import make_dev_ca


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_dev_ca(directory)
    return ca, cert, key


class _Server:
    """An OpenSSL server end over memory BIOs, standing in for PostgreSQL."""

    def __init__(self, cert, key, sslobject_class: type[ssl.SSLObject] = ssl.SSLObject) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.sslobject_class = sslobject_class
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def feed(self, data: bytes) -> bytes:
        self.incoming.write(data)
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def read(self, data: bytes) -> bytes:
        self.incoming.write(data)
        return self.obj.read(1 << 20)

    def write(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()


def _client(ca, hostname="localhost") -> TLSClient:
    context = ssl.create_default_context(cafile=str(ca))
    return TLSClient(context, hostname)


def _connect(client: TLSClient, server: _Server) -> None:
    to_server = client.handshake()
    while not client.handshake_done:
        to_server = client.handshake(server.feed(to_server))
    # The client's Finished; TLS 1.3 servers answer with session tickets, which carry no
    # application data but must reach the client in order.
    assert client.decrypt(server.feed(to_server)) == b""


def test_round_trip_in_both_directions(certs):
    ca, cert, key = certs
    client, server = _client(ca), _Server(cert, key)
    _connect(client, server)
    assert server.read(client.encrypt(b"Q\x00\x00\x00\x0dSELECT 1\x00")) == (
        b"Q\x00\x00\x00\x0dSELECT 1\x00"
    )
    # Several records in one read come out together; a partial record waits for the rest.
    wire = server.write(b"a" * 10) + server.write(b"b" * 70_000)
    assert client.decrypt(wire[:-10]) == b"a" * 10 + b"b" * 16384 * 4
    assert client.decrypt(wire[-10:]) == b"b" * (70_000 - 16384 * 4)
    assert client.decrypt(b"") == b""
    assert client.pending_output() == b""


def test_hostname_mismatch_is_refused(certs):
    ca, cert, key = certs
    client, server = _client(ca, hostname="db.example.com"), _Server(cert, key)
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(client, server)


def test_unknown_ca_is_refused(certs, tmp_path):
    _, cert, key = certs
    other_ca, _, _ = make_dev_ca(tmp_path / "other")
    client, server = _client(other_ca), _Server(cert, key)
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(client, server)


def test_close_notify_ends_the_stream_after_earlier_data(certs):
    ca, cert, key = certs
    client, server = _client(ca), _Server(cert, key)
    _connect(client, server)
    data = server.write(b"last words")
    try:
        server.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    data += server.outgoing.read()
    assert client.decrypt(data) == b"last words"
    with pytest.raises(TLSClosed):
        client.decrypt()


def test_a_tampered_record_does_not_decrypt(certs):
    ca, cert, key = certs
    client, server = _client(ca), _Server(cert, key)
    _connect(client, server)
    record = bytearray(server.write(b"D" * 100))
    record[-5] ^= 0x01  # flip one bit of the authentication tag
    with pytest.raises(ssl.SSLError):
        client.decrypt(bytes(record))


def test_a_direct_ssl_object_is_the_same_tls_with_its_c_objects_methods(certs):
    ca, cert, key = certs
    server = _Server(cert, key, DirectSSLObject)
    assert isinstance(server.obj, DirectSSLObject)
    # What uvloop's transport takes once per connection: the C methods themselves.
    for name in ("read", "write", "pending"):
        method = getattr(server.obj, name)
        assert method.__self__ is server.obj._sslobj and method.__name__ == name
    with pytest.raises(ssl.SSLWantReadError):
        server.obj.read(1024)  # before the handshake, as ssl.SSLObject
    client = _client(ca)
    _connect(client, server)
    assert server.obj.pending() == 0
    assert server.read(client.encrypt(b"Q" * 5000)) == b"Q" * 5000
    assert client.decrypt(server.write(b"T" * 70000)) == b"T" * 70000
    with pytest.raises(ssl.SSLWantReadError):
        server.obj.read(1024)  # nothing left: the same error as ssl.SSLObject's
    assert server.obj.version() in ("TLSv1.2", "TLSv1.3")
