"""TLS as a record layer over memory BIOs: bytes in, bytes out, no sockets (sans-IO).

The gateway speaks TLS to PostgreSQL on every upstream message. Per request/response
round trip, uvloop's SSL transport costs 31–33 µs of CPU on top of the plain socket calls,
and encrypting and decrypting through `ssl.MemoryBIO` ourselves over a plain transport
24–26 µs (`bench/tls_roundtrip.py`, warmed up, 2026-12-03: 52, 84, 77 µs). An earlier
"34 vs 7 µs" came from the bench's order: the first TLS run in a process pays OpenSSL's
set-up. The same swap on the client leg was measured at ~1 % of gateway CPU and not
kept. The handshake and
certificate verification are OpenSSL's as before (the context decides: verify-full with
the configured CA, hostname checked), only the plumbing differs.

Imports only the stdlib (`ssl`, `typing`). `proxy.upstream` drives the handshake and the
login over it, and so does `proxy.tlstransport` for the client leg (`server_side`); once
they are done, the records move in C (`proxy._ctls`, through `tlstransport.adopt`). Where
that is not built, `proxy.pump` encrypts and decrypts the upstream's relayed bytes with
it, and the client leg is uvloop's TLS transport, with `DirectSSLObject` (below) as its
SSL object.
"""

from __future__ import annotations

import ssl
from typing import Any

# Plaintext taken out of the TLS object per read call: large, so a burst of records
# (a big result set) drains in few calls, but under glibc's mmap threshold (128 KiB at
# start): `read(n)` allocates n bytes and shrinks them, and at 256 KiB every call was an
# mmap, an mremap and a munmap (26 µs for four small records' round trip, 3.8 at 64 KiB,
# in a fresh process; relays that had run a while had raised the threshold: no such calls).
READ_SIZE = 1 << 16


class DirectSSLObject(ssl.SSLObject):
    """An `ssl.SSLObject` whose `read`, `write` and `pending` are its C object's own.

    ssl.SSLObject's three are Python methods that only forward to that object, and uvloop's
    TLS transport (the gateway's client leg) calls them for every read and write it moves:
    a Python frame each, four per round trip. It takes them once, as bound methods, when it
    wraps the connection, so as properties they cost one frame per connection instead.
    Made by a context whose `sslobject_class` is this class (documented for exactly this);
    everything else, handshake and verification included, is ssl.SSLObject's.
    """

    @property
    def read(self) -> Any:  # type: ignore[override]
        return self._sslobj.read

    @property
    def write(self) -> Any:  # type: ignore[override]
        return self._sslobj.write

    @property
    def pending(self) -> Any:  # type: ignore[override]
        return self._sslobj.pending


class TLSClosed(Exception):
    """The peer ended TLS (close_notify): no more data will come."""


class TLSClient:
    """Client side of one TLS connection, fed with ciphertext, yielding plaintext (the
    server side with `server_side`: the gateway's handshake with its clients)."""

    __slots__ = ("ssl_object", "handshake_done", "_incoming", "_outgoing", "_c", "_closed")

    def __init__(
        self, context: ssl.SSLContext, server_hostname: str | None, *, server_side: bool = False
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        # ssl.SSLObject wraps a C object whose read/write take the same arguments; calling
        # it directly skips a Python frame per call on the relay's hot path.
        self._c = getattr(self.ssl_object, "_sslobj", self.ssl_object)
        self.handshake_done = False
        self._closed = False

    def handshake(self, data: bytes = b"") -> bytes:
        """Feed handshake bytes from the peer; return bytes to send to it.

        Raises ssl.SSLError (ssl.SSLCertVerificationError for a bad certificate) when the
        handshake fails; `handshake_done` turns true once it has completed.
        """
        if data:
            self._incoming.write(data)
        try:
            self.ssl_object.do_handshake()
            self.handshake_done = True
        except ssl.SSLWantReadError:
            pass
        return self._outgoing.read()

    def receive(self, data: bytes) -> None:
        """Ciphertext that came after the handshake, kept for whoever reads the records next
        (`tlstransport.adopt`'s transport delivers it first)."""
        if data:
            self._incoming.write(data)

    def encrypt(self, data: bytes | memoryview) -> bytes:
        self._c.write(data)
        return self._outgoing.read()

    def decrypt(self, data: bytes | memoryview = b"") -> bytes:
        """Plaintext of the complete records received so far (b"" when none is complete).

        Raises TLSClosed at the peer's close_notify and ssl.SSLError on a bad record.
        """
        if self._closed:
            raise TLSClosed
        if data:
            self._incoming.write(data)
        c = self._c
        incoming = self._incoming
        chunks: list[bytes] = []
        while True:
            try:
                chunk = c.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break  # no complete record left
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                # close_notify (ssl answers a clean shutdown with b"", not an error).
                self._closed = True
                if chunks:
                    break  # deliver what came before the close first; TLSClosed next time
                raise TLSClosed
            chunks.append(chunk)
            # Most reads hold whole records: stop without provoking SSLWantReadError.
            if not incoming.pending and not c.pending():
                break
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def pending_output(self) -> bytes:
        """Bytes TLS itself wants sent (e.g. a reply to a key update); usually b""."""
        return self._outgoing.read() if self._outgoing.pending else b""
