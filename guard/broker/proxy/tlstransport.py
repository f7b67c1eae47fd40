"""TLS connections whose records C moves once the handshake is done (`proxy._ctls`).

The gateway handshakes with Python's `ssl` over memory BIOs, as before: the context, the
certificate checks and the login (SCRAM channel binding reads the SSL object) are
unchanged. `adopt` then hands the connection's socket and its SSL object to
`_ctls.TLSTransport`, which reads, decrypts, encrypts and sends the records itself: per
pgbench transaction about 3.4 µs of the gateway's CPU less than uvloop's TLS transport
toward the client and `proxy.tlslayer` toward PostgreSQL (bench/floor_relay.py, `c`
against `bio`). The asyncio transport it replaces is left without sending anything (its
socket is a duplicate now), and the adopted one is an asyncio transport by its methods,
so the pump and asyncio streams run on it unchanged.

Without the build (no compiler, GUARD_PURE_PYTHON), or when an object is not what the C
code was built for, `adopt` answers None and the caller keeps its Python path: the
reference (tests/integration/test_gateway_pure.py serves a session on it).

Imports the stdlib, `proxy.speedups` (which picks the build) and `proxy.tlslayer` (whose
handshake `handshake` runs over streams, for both legs); the listener and the upstream
login use it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
import weakref
from typing import Any, cast

from guard.broker.proxy.speedups import compiled_module
from guard.broker.proxy.tlslayer import TLSClient

log = logging.getLogger("guard.proxy")

_c = compiled_module("guard.broker.proxy._ctls")


@functools.cache
def usable() -> bool:
    """Built, and built for this interpreter's `_ssl` (its SSL object's layout checked once,
    on an object that never handshakes): the listener decides before a handshake which
    way it goes, since a connection handshaken over memory BIOs cannot go back."""
    if _c is None:
        return False
    a, b = socket.socketpair()
    fd = os.dup(a.fileno())
    try:
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bios = ssl.MemoryBIO(), ssl.MemoryBIO()
        ssl_object = probe.wrap_bio(*bios, server_hostname="probe")
        _c.TLSTransport(ssl_object._sslobj, fd, None, {}).abort()  # closes fd
    except TypeError as exc:  # another CPython's `_ssl` layout: checked, never guessed
        log.warning("TLS records stay with Python's transports: %s", exc)
        os.close(fd)  # refused: still ours
        return False
    finally:
        a.close()
        b.close()
    return True


# PostgreSQL accepts the one key exchange group its `ssl_ecdh_curve` names, prime256v1
# unless set, and OpenSSL's client sends its key share for X25519 first: every upstream
# login took a HelloRetryRequest round trip (a second ClientHello; against the dev stack's
# PostgreSQL, 2.27-2.89 ms to handshake against 2.06-2.67 with P-256 first, and ~100 us
# of the gateway's CPU). So the upstream login offers the groups its context offers, P-256
# moved first (`upstream_groups`): never a group more or less. A fixed list would undo what
# the host decided: a system crypto policy that dropped a group (FIPS, RHEL's FUTURE)
# would get it back, and OpenSSL 3.5's post-quantum X25519MLKEM768 would be dropped
# toward a PostgreSQL configured for it. A server that wants another group still gets it,
# after the retry.

# IANA's supported_groups code points and OpenSSL's names for them (SSL_set1_groups_list):
# what OpenSSL 3.0-3.5 offers by default or a system policy may name. A group not here
# leaves the context's order as it is: only what can be named back is reordered.
_GROUP_NAMES = {
    23: "P-256",
    24: "P-384",
    25: "P-521",
    29: "X25519",
    30: "X448",
    31: "brainpoolP256r1tls13",
    32: "brainpoolP384r1tls13",
    33: "brainpoolP512r1tls13",
    256: "ffdhe2048",
    257: "ffdhe3072",
    258: "ffdhe4096",
    259: "ffdhe6144",
    260: "ffdhe8192",
    0x0200: "MLKEM512",
    0x0201: "MLKEM768",
    0x0202: "MLKEM1024",
    0x11EB: "SecP256r1MLKEM768",
    0x11EC: "X25519MLKEM768",
    0x11ED: "SecP384r1MLKEM1024",
}
_P256 = 23
_SUPPORTED_GROUPS = 10  # the extension's type (RFC 8446 4.2.7)


def offered_groups(client_hello: bytes) -> list[int] | None:
    """The groups a ClientHello offers (supported_groups), in its order: `client_hello` is
    what a client first sends, the handshake's TLS records. None when that is not one whole
    ClientHello, or it offers no groups."""
    body = bytearray()
    pos = 0
    while pos < len(client_hello):
        if client_hello[pos] != 22 or pos + 5 > len(client_hello):  # handshake records only
            return None
        size = int.from_bytes(client_hello[pos + 3 : pos + 5], "big")
        body += client_hello[pos + 5 : pos + 5 + size]
        pos += 5 + size
    if len(body) < 4 or body[0] != 1:  # ClientHello
        return None
    end = 4 + int.from_bytes(body[1:4], "big")
    if end != len(body):
        return None
    try:
        at = 4 + 2 + 32  # legacy_version, random
        at += 1 + body[at]  # legacy_session_id
        at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher_suites
        at += 1 + body[at]  # legacy_compression_methods
        stop = at + 2 + int.from_bytes(body[at : at + 2], "big")
    except IndexError:
        return None
    at += 2
    if stop != end:
        return None
    while at + 4 <= stop:
        kind = int.from_bytes(body[at : at + 2], "big")
        size = int.from_bytes(body[at + 2 : at + 4], "big")
        data = body[at + 4 : at + 4 + size]
        at += 4 + size
        if kind == _SUPPORTED_GROUPS:
            count = int.from_bytes(data[:2], "big")
            if size != 2 + count or count % 2 or not count or at > stop:
                return None
            return [int.from_bytes(data[i : i + 2], "big") for i in range(2, size, 2)]
    return None


def p256_first(groups: list[int]) -> bytes | None:
    """`groups` for SSL_set1_groups_list with P-256 first and the others in their order;
    None when there is nothing to move (P-256 leads, or is not offered) or a group has no
    name here."""
    if _P256 not in groups or groups[0] == _P256:
        return None
    names = [_GROUP_NAMES.get(g) for g in (_P256, *(g for g in groups if g != _P256))]
    if None in names:
        return None
    return ":".join(cast(list[str], names)).encode()


_upstream_groups: weakref.WeakKeyDictionary[ssl.SSLContext, bytes | None] = (
    weakref.WeakKeyDictionary()
)


def upstream_groups(context: ssl.SSLContext) -> bytes | None:
    """The groups the upstream login offers with `context`, for `prefer_groups`: the ones
    the context's ClientHello offers (OpenSSL's defaults, or what the host's OpenSSL
    configuration or the context narrowed them to), P-256 moved first. None: leave the
    context's own order (see `p256_first`; also without the build, which alone can set
    them). Read once per context, from a ClientHello made and never sent."""
    if not usable():
        return None
    try:
        return _upstream_groups[context]
    except KeyError:
        pass
    outgoing = ssl.MemoryBIO()
    probe = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="groups.invalid")
    try:
        probe.do_handshake()
    except ssl.SSLWantReadError:
        pass  # the ClientHello is out; nothing will answer it
    except ssl.SSLError:
        return None  # a context that cannot say hello: the login's handshake reports it
    groups = offered_groups(outgoing.read())
    _upstream_groups[context] = found = p256_first(groups) if groups else None
    return found


def prefer_groups(ssl_object: ssl.SSLObject, groups: bytes) -> bool:
    """Offer `groups` in this order on `ssl_object` (before its handshake); False, and the
    context's own order kept, without the build or when OpenSSL refuses the list."""
    if not usable():
        return False
    assert _c is not None
    try:
        return bool(_c.prefer_groups(getattr(ssl_object, "_sslobj", None), groups))
    except TypeError:
        return False


async def settle(writer: asyncio.StreamWriter) -> None:
    """Wait until the transport under `writer` has sent everything written to it (drain
    alone waits only until it is under its high-water mark): what `adopt` needs."""
    transport = writer.transport
    if transport.get_write_buffer_size():
        transport.set_write_buffer_limits(high=0)  # drain now waits for an empty buffer
        await writer.drain()


def adopt(transport: asyncio.BaseTransport, ssl_object: ssl.SSLObject) -> asyncio.Transport | None:
    """The TLS connection `ssl_object` runs over `transport` (a plain transport, its write
    buffer empty, nothing it received left unread by the caller), now moved by C; the old
    transport is abandoned without a byte sent. None: it stays as it was (not built, the
    objects are not the ones the C code knows, or bytes still wait to be sent)."""
    if not usable():
        return None
    plain = cast(asyncio.Transport, transport)
    sock = plain.get_extra_info("socket")
    ssl_socket = getattr(ssl_object, "_sslobj", None)  # the C object ssl.SSLObject wraps
    if sock is None or ssl_socket is None or plain.get_write_buffer_size() or plain.is_closing():
        return None
    assert _c is not None
    extra: dict[str, Any] = {}  # the transport's get_extra_info answers, filled once it took
    fd = os.dup(sock.fileno())
    try:
        adopted = _c.TLSTransport(ssl_socket, fd, asyncio.get_running_loop(), extra)
    except TypeError:  # not an SSL object over memory BIOs: the caller's own path
        os.close(fd)
        return None
    except BaseException:  # a refused construction leaves the descriptor to us
        os.close(fd)
        raise
    extra.update(
        peername=plain.get_extra_info("peername"),
        sockname=plain.get_extra_info("sockname"),
        sslcontext=ssl_object.context,
        ssl_object=ssl_object,
        cipher=ssl_object.cipher(),
        compression=ssl_object.compression(),
        peercert=ssl_object.getpeercert(),
    )
    plain.pause_reading()
    plain.set_protocol(asyncio.Protocol())  # its connection_lost goes nowhere
    plain.abort()  # closes its descriptor only: the socket lives on in `fd`
    return cast(asyncio.Transport, adopted)


async def handshake(
    tls: TLSClient, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bytes:
    """Run `tls`'s handshake over the streams, both legs' (the gateway's with its client,
    the upstream login's with PostgreSQL), until it completes; its last flight, not yet
    written, is the answer (a TLS 1.3 server's session tickets, where it sends any). Raises
    ssl.SSLError as the handshake does, and EOFError when the peer left during it."""
    out = tls.handshake()
    while not tls.handshake_done:
        writer.write(out)
        await writer.drain()
        data = await reader.read(1 << 16)
        if not data:
            raise EOFError
        out = tls.handshake(data)
    return out


async def start_tls(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
) -> None:
    """TLS's server side on a client connection whose SSLRequest was answered, with the
    streams going on over it as `StreamWriter.start_tls` leaves them (which is what runs
    without the build): the handshake by Python's `ssl` over memory BIOs, the records then
    by C. Raises ssl.SSLError when the handshake fails (its alert sent first), and
    ConnectionResetError when the client leaves during it."""
    protocol = getattr(writer, "_protocol", None)
    if not usable() or not hasattr(protocol, "_replace_writer"):
        await writer.start_tls(context)
        return
    assert isinstance(protocol, asyncio.StreamReaderProtocol)
    tls = TLSClient(context, None, server_side=True)
    try:
        out = await handshake(tls, reader, writer)
    except EOFError:
        raise ConnectionResetError("the client left during the TLS handshake") from None
    except ssl.SSLError:
        writer.write(tls.pending_output())  # the alert that says why
        raise
    writer.write(out)  # the handshake's last flight (TLS 1.3: the session tickets)
    await settle(writer)
    buffer = reader._buffer  # noqa: SLF001 - records the client sent right after Finished
    tls.receive(bytes(buffer))
    buffer.clear()
    adopted = adopt(writer.transport, tls.ssl_object)
    if adopted is None:
        raise ConnectionResetError("the client left during the TLS handshake")
    # As StreamWriter.start_tls leaves the streams, on the adopted transport.
    adopted.set_protocol(protocol)
    writer._transport = adopted  # noqa: SLF001
    reader._transport = adopted  # noqa: SLF001 - its flow control pauses this one
    protocol._replace_writer(writer)  # noqa: SLF001
    adopted.resume_reading()
