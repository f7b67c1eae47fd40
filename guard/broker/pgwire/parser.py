"""Sans-IO parsers for the PostgreSQL wire protocol: bytes in, frames and messages out.

`FrontendParser` reads what a client sends (with the untagged startup phase as a parser
state), `BackendParser` what a server sends. Both are fed arbitrary chunks with `feed()` and
hand out complete `Frame`s (type byte + a zero-copy view of the raw message, for forwarding
unchanged) or decoded messages; `NEED_DATA` means "feed me more". Nothing here reads a
socket, so the same code serves the gateway, the CLI relay and the tests.

Untrusted input never escapes as IndexError, struct.error or UnicodeDecodeError: every
malformed, oversized or unexpected input raises `ClientProtocolError` or
`ServerProtocolError`.

This module is the reference for its compiled twin, `_cframe.c` (drain()'s framing loop,
passed in as `scan`, the relay's fast accessors and `data_rows`), which guard.broker.proxy.speedups
picks when it is built and GUARD_PURE_PYTHON is not set; tests/pgwire/test_speedups.py
holds the two equal.

Stdlib only (struct, enum, dataclasses, functools); never import guard or third-party
packages here.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, TypeVar

from . import messages as m
from .errors import ClientProtocolError, ProtocolError, ServerProtocolError


class NeedData(enum.Enum):
    """Sentinel type: the parser needs more bytes before it can return anything."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    __str__ = __repr__


NEED_DATA: Final = NeedData.NEED_DATA

MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024
# PostgreSQL's MAX_STARTUP_PACKET_LENGTH: the startup packet after its length word.
MAX_STARTUP_PACKET_SIZE: Final = 10_000
# Protocol 3.2 allows cancel keys of 4..256 bytes (3.0 always sends 4).
MIN_CANCEL_KEY_SIZE: Final = 4
MAX_CANCEL_KEY_SIZE: Final = 256

PasswordKind: TypeAlias = Literal["password", "sasl_initial", "sasl", "gss"]
# One framed message, type byte and length word included: a view into the parser's
# immutable buffer, or (from the compiled scan, for a small message) a copy of it in bytes.
Raw: TypeAlias = bytes | memoryview
# The compiled framing loop (`_cframe.scan`): (view, pos, valid, runs, limit, out) →
# (pos, need); a parser given one drains with it (see _Framer.drain).
Scan: TypeAlias = Callable[[bytes | memoryview, int, bytes, bytes, int, list[Raw]], tuple[int, int]]

# Precompiled, as psycopg's _struct.py does: a format string parsed per call costs more than
# the unpack itself on the hot path.
_UNPACK_I: Final = struct.Struct("!i").unpack_from  # Int32 (signed)
_UNPACK_U32: Final = struct.Struct("!I").unpack_from  # OIDs are unsigned
_UNPACK_U16: Final = struct.Struct("!H").unpack_from  # counts, read unsigned as the server does
_UNPACK_H: Final = struct.Struct("!h").unpack_from  # Int16 (signed): format codes
_UNPACK_II: Final = struct.Struct("!ii").unpack_from  # startup header: length, code
_UNPACK_BI: Final = struct.Struct("!Bi").unpack_from  # tag and length word
_FIELD: Final = struct.Struct("!IhIhih")  # RowDescription field after its name
_UNPACK_FIELD: Final = _FIELD.unpack_from


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message as received. `tag` is the type byte, 0 for startup packets."""

    tag: int
    raw: Raw  # header included; a view of an immutable buffer (or bytes), valid forever

    @property
    def body(self) -> Raw:
        """The payload after the type byte (if any) and the Int32 length."""
        return self.raw[5:] if self.tag else self.raw[4:]


# Frozen dataclasses assign fields through object.__setattr__, which triples the cost of a
# Frame on the hot path (~600 ns → ~200 ns here). The parser fills the slots directly; the
# result is an ordinary, equal, hashable Frame.
_new_object = object.__new__
_set_tag = Frame.__dict__["tag"].__set__
_set_raw = Frame.__dict__["raw"].__set__


def frame_of(raw: Raw) -> Frame:
    """The Frame of one tagged message's raw view (as drain() returns it)."""
    return _frame(raw[0], raw)


def _frame(tag: int, raw: Raw) -> Frame:
    frame: Frame = _new_object(Frame)
    _set_tag(frame, tag)
    _set_raw(frame, raw)
    return frame


# Message types drain() joins into runs: result rows and COPY data, which need no per-message
# decision. ('D' from a client is Describe, which does.)
_BACKEND_RUNS: Final = frozenset({m.TAG_DATA_ROW, m.TAG_COPY_DATA})
_FRONTEND_RUNS: Final = frozenset({m.TAG_COPY_DATA})


@functools.cache
def _tag_table(tags: frozenset[int]) -> bytes:
    # Indexing bytes by the tag is the cheapest membership test there is. Built once per
    # tag set: building it is ~16 us, and a gateway connection makes four or five parsers
    # (two tables each) on its way in.
    return bytes(1 if i in tags else 0 for i in range(256))


def _tag_repr(tag: int) -> str:
    return repr(bytes([tag]))


class _Framer:
    """Buffering and framing of tagged messages, shared by both parsers.

    The buffer is an immutable `bytes` plus a read offset, and frames are memoryview slices
    of it: a later feed() never moves or mutates bytes a frame points into. Bytes fed while
    a message is incomplete are queued and joined only once enough have arrived, so a large
    message in many small chunks is copied a bounded number of times, not once per chunk.
    """

    __slots__ = (
        "_buf",
        "_pos",
        "_view",
        "_chunks",
        "_chunked",
        "_max",
        "_valid",
        "_runs",
        "_scan",
    )
    _error: type[ProtocolError] = ProtocolError
    _side: str = ""

    def __init__(
        self,
        max_message_size: int,
        valid_tags: frozenset[int],
        run_tags: frozenset[int],
        scan: Scan | None = None,
    ) -> None:
        if max_message_size < 4:
            raise ValueError("max_message_size must be at least 4 (the length word)")
        # A read that is queued as a view of what remains of it becomes the buffer as it is.
        self._buf: bytes | memoryview = b""
        self._pos = 0
        self._view = memoryview(self._buf)
        # Reads not yet in the buffer: bytes, or a view of what remains of one.
        self._chunks: list[bytes | memoryview] = []
        self._chunked = 0
        self._max = max_message_size
        self._valid = _tag_table(valid_tags)
        self._runs = _tag_table(run_tags)
        # The compiled framing loop, if the caller picked it (guard.broker.proxy.speedups);
        # None: the loop below, which is the reference.
        self._scan = scan

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._chunks or self._pos < len(self._buf):
            # bytes() copies a bytearray the caller may reuse; it is free for bytes.
            chunk = bytes(data)
            self._chunks.append(chunk)
            self._chunked += len(chunk)
        else:
            self._buf = bytes(data)
            self._pos = 0
            self._view = memoryview(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos + self._chunked

    def unconsumed(self) -> bytes:
        """The buffered bytes not yet returned as frames (the buffer is left as it is).

        For handing a connection over to another parser, and for refusing plaintext that a
        client pipelined behind an SSLRequest (CVE-2021-23214).
        """
        return b"".join([self._buf[self._pos :], *self._chunks])

    def next_frame(self) -> Frame | NeedData:
        return self._next_tagged()

    def drain(self) -> tuple[list[Raw], ProtocolError | None]:  # noqa: C901 - relay hot loop; a helper adds a call per message
        """Every complete tagged message buffered: the relay's hot path.

        Returns views of the raw messages (type byte and length word included) in order,
        with consecutive messages of a *run* type (DataRow and CopyData from a server,
        CopyData from a client) joined into one view: a million result rows are framed
        (every length word checked against the limit) but cost one header read each and
        are forwarded as a few slices. Views point into immutable buffers, valid forever.
        The compiled `scan` hands out a message of at most 512 bytes as a bytes copy
        instead of a view (copying that little costs a sixth of making a view); the bytes
        are the same either way.

        A malformed message ends the list: its error is returned, not raised, so that the
        caller can act on the well-formed messages before it (as it would have, had they
        arrived in an earlier read) and then fail. The next drain() finds the same error.
        """
        if self._scan is not None:
            return self._drain_scanned(self._scan)
        out: list[Raw] = []
        append = out.append
        buf, pos, view = self._buf, self._pos, self._view
        size = len(buf)
        valid, runs, limit = self._valid, self._runs, self._max
        unpack = _UNPACK_BI
        while True:
            if size - pos < 5:
                if not self._join(pos, 5):
                    break
                buf, pos, view = self._buf, 0, self._view
                size = len(buf)
            kind, length = unpack(buf, pos)
            if not valid[kind] or length < 4 or length > limit:
                return out, self._fault_at(pos)
            end = pos + 1 + length
            if end > size:
                if not self._join(pos, 1 + length):
                    break
                buf, pos, view = self._buf, 0, self._view
                size = len(buf)
                end = 1 + length
            if runs[kind]:
                try:
                    while True:  # one unpack per message: this loop runs once per result row
                        tag, length = unpack(buf, end)
                        after = end + 1 + length
                        if tag != kind or length < 4 or length > limit or after > size:
                            break  # another message, a bad length (framed next), or short
                        end = after
                except struct.error:
                    pass  # fewer than 5 bytes left
            append(view[pos:end])
            pos = end
        self._pos = pos
        return out, None

    def feed_drain(self, data: bytes) -> tuple[list[Raw], ProtocolError | None]:
        """feed(data), then drain(), in one call (the relay's, once per read).

        With the compiled scan and nothing buffered, `data` is framed where it is: unless
        a message is left incomplete (or malformed) it never becomes the buffer. With a
        message's start buffered (a bulk result's row split across reads), the head of
        `data` completes it and the rest is framed where it is (`_complete`).
        """
        scan = self._scan
        if scan is None or data.__class__ is not bytes or self._chunks:
            self.feed(data)
            return self.drain()
        out: list[Raw] = []
        start = 0
        if self._pos != len(self._buf):
            start = self._complete(scan, data, out)
            if not start:  # `data` does not complete it, or its header is malformed
                self.feed(data)
                return self.drain()
        pos, need = scan(data, start, self._valid, self._runs, self._max, out)
        if pos == len(data):
            return out, None  # all framed: the buffer stays empty
        return out, self.keep(data, pos, need)

    def _complete(self, scan: Scan, data: bytes, out: list[Raw]) -> int:
        """The message whose start is buffered, completed with the head of `data` and framed
        into `out`: how many bytes of `data` that took. 0 (and nothing framed or consumed)
        when `data` does not complete it or its header is malformed: feed() and drain()
        then buffer it or report the fault. A bulk result's rows straddle nearly every
        read; this copies the one split row and frames the rest of the read where it is,
        as `_join` would, in a call instead of a loop's dozen."""
        view, pos = self._view, self._pos
        tail = len(view) - pos
        head = bytes(view[pos : pos + 5]) if tail >= 5 else b"".join((view[pos:], data[: 5 - tail]))
        if len(head) < 5:
            return 0
        kind: int
        length: int
        kind, length = _UNPACK_BI(head, 0)
        missing = 1 + length - tail
        if not self._valid[kind] or not 4 <= length <= self._max or not 0 < missing <= len(data):
            return 0
        whole = b"".join((view[pos:], data[:missing]))
        scan(whole, 0, self._valid, self._runs, self._max, out)
        self._pos = len(view)
        return missing

    def scan_tables(self) -> tuple[Scan, bytes, bytes, int] | None:
        """The compiled scan and what it takes besides the bytes (valid tags, run tags, the
        size limit), for a caller that frames a read itself while nothing is buffered, as
        `feed_drain` does then (a call less per read); None without the compiled scan."""
        if self._scan is None:
            return None
        return self._scan, self._valid, self._runs, self._max

    def keep(self, data: bytes, pos: int, need: int) -> ProtocolError | None:
        """`data` was scanned up to `pos` with nothing buffered (`need`: the scan's answer),
        and a message's start stays behind: data becomes the buffer, as feed() would make
        it. The error of a malformed header at pos, if that is what stopped the scan."""
        self._buf, self._pos, self._view = data, pos, memoryview(data)
        if need == 0:  # a malformed header at pos
            return self._fault_at(pos)
        return None

    def _fault_at(self, pos: int) -> ProtocolError:
        """The error for the malformed header at `pos`: the one `_next_tagged` raises
        for it, so both framing loops report a fault in the same words."""
        self._pos = pos
        try:
            self._next_tagged()
        except ProtocolError as err:
            return err
        raise AssertionError("a malformed message framed")  # pragma: no cover

    def _drain_scanned(self, scan: Scan) -> tuple[list[Raw], ProtocolError | None]:
        """drain() with the compiled loop framing what the buffer holds: the same frames and
        the same error, since buffering (_join) and the errors stay here."""
        out: list[Raw] = []
        while True:
            pos, need = scan(self._view, self._pos, self._valid, self._runs, self._max, out)
            if need == 0:  # a malformed header at pos
                return out, self._fault_at(pos)
            if not self._join(pos, need):  # sets _pos when it cannot
                return out, None

    def _join(self, pos: int, need: int) -> bool:
        """Make the buffer hold `need` unread bytes from `pos`, if the queued reads have them.

        Only a message split across reads is copied: the unread tail and just the bytes of
        the next reads that complete it. The rest of a read stays queued as a view and
        later becomes the buffer as it is, so a bulk result split mid-row at every read
        boundary is not copied a second time.
        """
        chunks = self._chunks
        tail = len(self._buf) - pos
        if not chunks or tail + self._chunked < need:
            self._pos = pos
            return False
        if tail == 0 and len(chunks[0]) >= need:
            buf = chunks.pop(0)
            self._chunked -= len(buf)
        else:
            parts: list[bytes | memoryview] = [self._buf[pos:]]
            missing = need - tail
            while missing > 0:
                chunk = chunks[0]
                if len(chunk) <= missing:
                    parts.append(chunks.pop(0))
                    missing -= len(chunk)
                    self._chunked -= len(chunk)
                else:
                    view = memoryview(chunk)
                    parts.append(view[:missing])
                    chunks[0] = view[missing:]
                    self._chunked -= missing
                    missing = 0
            buf = b"".join(parts)
        self._buf = buf
        self._pos = 0
        self._view = memoryview(buf)
        return True

    def frames(self) -> Iterator[Frame]:
        """Yield every complete frame buffered so far."""
        while True:
            frame = self.next_frame()
            if frame is NEED_DATA:
                return
            yield frame

    def _short(self, need: int) -> Frame | NeedData:
        # The current buffer holds fewer than `need` bytes; join queued chunks if they
        # complete it, otherwise wait.
        if self._join(self._pos, need):
            return self.next_frame()
        return NEED_DATA

    def _next_tagged(self) -> Frame | NeedData:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 5:
            return self._short(5)
        tag = buf[pos]
        if not self._valid[tag]:
            raise self._error(f"unknown {self._side} message type {_tag_repr(tag)}")
        (length,) = _UNPACK_I(buf, pos + 1)
        if length < 4:
            raise self._error(f"invalid message length {length} (type {_tag_repr(tag)})")
        if length > self._max:
            raise self._error(
                f"message of {length} bytes (type {_tag_repr(tag)}) exceeds the limit of "
                f"{self._max} bytes"
            )
        end = pos + 1 + length
        if end > len(buf):
            return self._short(1 + length)
        self._pos = end
        return _frame(tag, self._view[pos:end])


_STARTUP: Final = 0
_TAGGED: Final = 1
_CANCELLED: Final = 2


class FrontendParser(_Framer):
    """Parses bytes from a client.

    While `expect_startup` holds, packets are untagged (Int32 length, Int32 code):
    SSLRequest and GSSENCRequest (each at most once, as the server allows) keep the parser in
    the startup phase, a StartupMessage of any protocol 3.x ends it, and after a
    CancelRequest nothing more is valid. Then every message is tagged.
    """

    __slots__ = ("_state", "_negotiated", "password_kind", "_tagged_scan")
    _error = ClientProtocolError
    _side = "frontend"

    def __init__(
        self,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        expect_startup: bool = True,
        scan: Scan | None = None,
    ) -> None:
        super().__init__(max_message_size, m.FRONTEND_TAGS, _FRONTEND_RUNS, scan)
        self._state = _STARTUP if expect_startup else _TAGGED
        # The compiled loop frames tagged messages only: it is taken up when the startup
        # phase ends, so `_Framer.feed_drain` (not an override: one call less per read on
        # the relay's path) refuses through `drain` until then.
        self._tagged_scan = scan
        if expect_startup:
            self._scan = None
        self._negotiated: set[int] = set()
        # 'p' is ambiguous on the wire; the authentication exchange says what comes next.
        self.password_kind: PasswordKind = "password"

    @property
    def expecting_startup(self) -> bool:
        return self._state == _STARTUP

    def expect_password(self, kind: PasswordKind) -> None:
        """Decode the next 'p' messages as `kind`: password, sasl_initial, sasl or gss."""
        if kind not in _PASSWORD_DECODERS:
            raise ValueError(f"unknown password message kind {kind!r}")
        self.password_kind = kind

    def next_frame(self) -> Frame | NeedData:
        state = self._state
        if state == _TAGGED:
            return self._next_tagged()
        if state == _STARTUP:
            return self._next_startup()
        if self.buffered:
            raise ClientProtocolError("unexpected data after CancelRequest")
        return NEED_DATA

    def drain(self) -> tuple[list[Raw], ProtocolError | None]:
        if self._state != _TAGGED:
            raise RuntimeError("drain() frames tagged messages; the startup phase is not over")
        return _Framer.drain(self)

    def next_message(self) -> m.FrontendMessage | NeedData:
        frame = self.next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        return decode_frontend(frame, password_kind=self.password_kind)

    def messages(self) -> Iterator[m.FrontendMessage]:
        """Yield every complete message buffered so far."""
        for frame in self.frames():
            yield decode_frontend(frame, password_kind=self.password_kind)

    def _next_startup(self) -> Frame | NeedData:  # noqa: C901 - flat table of startup codes, on the framing path
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 8:
            return self._short(8)
        length, code = _UNPACK_II(buf, pos)
        if length < 8 or length - 4 > MAX_STARTUP_PACKET_SIZE:
            raise ClientProtocolError(
                f"invalid startup packet length {length} (limit {MAX_STARTUP_PACKET_SIZE + 4} "
                "bytes)"
            )
        if code == m.SSL_REQUEST_CODE or code == m.GSSENC_REQUEST_CODE:
            if length != 8:
                raise ClientProtocolError(f"invalid length {length} of an encryption request")
            if code in self._negotiated:
                raise ClientProtocolError("encryption was already negotiated")
            state = _STARTUP
        elif code == m.CANCEL_REQUEST_CODE:
            if not 12 + MIN_CANCEL_KEY_SIZE <= length <= 12 + MAX_CANCEL_KEY_SIZE:
                raise ClientProtocolError(f"invalid length {length} of a CancelRequest")
            state = _CANCELLED
        elif code >> 16 == 3:
            state = _TAGGED
        else:
            raise ClientProtocolError(
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                "server supports 3.0 to 3.x"
            )
        end = pos + length
        if end > len(buf):
            return self._short(length)
        self._pos = end
        self._state = state
        if state == _STARTUP:
            self._negotiated.add(code)
        elif state == _TAGGED:
            self._scan = self._tagged_scan
        return _frame(m.TAG_UNTAGGED, self._view[pos:end])


class BackendParser(_Framer):
    """Parses bytes from a server; every backend message is tagged."""

    __slots__ = ()
    _error = ServerProtocolError
    _side = "backend"

    def __init__(
        self, *, max_message_size: int = MAX_MESSAGE_SIZE, scan: Scan | None = None
    ) -> None:
        super().__init__(max_message_size, m.BACKEND_TAGS, _BACKEND_RUNS, scan)

    def next_message(self) -> m.BackendMessage | NeedData:
        frame = self._next_tagged()
        if frame is NEED_DATA:
            return NEED_DATA
        return decode_backend(frame)

    def messages(self) -> Iterator[m.BackendMessage]:
        """Yield every complete message buffered so far."""
        for frame in self.frames():
            yield decode_backend(frame)


# =========================================================================== decoding
_T = TypeVar("_T")


class _Malformed(ValueError):
    """Raised inside decoders; the public decode_* functions turn it into a ProtocolError."""


def decode_frontend(frame: Frame, *, password_kind: PasswordKind = "password") -> m.FrontendMessage:
    """Decode one client message; raises ClientProtocolError if it is malformed."""
    tag = frame.tag
    if tag == m.TAG_PASSWORD_MESSAGE:
        entry = _PASSWORD_DECODERS.get(password_kind)
        if entry is None:  # a caller's bug, not the client's
            raise ValueError(f"unknown password message kind {password_kind!r}")
    else:
        found = _FRONTEND_DECODERS.get(tag)
        if found is None:
            raise ClientProtocolError(f"unknown frontend message type {_tag_repr(tag)}")
        entry = found
    name, decoder = entry
    try:
        return decoder(bytes(frame.body))
    except (ValueError, IndexError, struct.error) as exc:
        raise ClientProtocolError(f"malformed {name} message: {exc}") from exc


def decode_backend(frame: Frame) -> m.BackendMessage:
    """Decode one server message; raises ServerProtocolError if it is malformed."""
    entry = _BACKEND_DECODERS.get(frame.tag)
    if entry is None:
        raise ServerProtocolError(f"unknown backend message type {_tag_repr(frame.tag)}")
    name, decoder = entry
    try:
        return decoder(bytes(frame.body))
    except (ValueError, IndexError, struct.error) as exc:
        raise ServerProtocolError(f"malformed {name} message: {exc}") from exc


def cstring_body(raw: Raw, what: str) -> str:
    """The one NUL-terminated UTF-8 string a message consists of (Query, CommandComplete).

    The relay's fast accessors take a framed message's raw view (as drain() returns it,
    or `Frame.raw`) and make the decoders' checks (here: terminated, nothing after it,
    valid UTF-8) without building a message object.
    """
    end = len(raw) - 1
    text = bytes(raw[5:end])
    error = ClientProtocolError if raw[0] == m.TAG_QUERY else ServerProtocolError
    if end < 5 or raw[end] != 0 or b"\x00" in text:
        raise error(f"malformed {what} message: not one NUL-terminated string")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"malformed {what} message: {exc}") from exc


def execute_portal(raw: Raw) -> str:
    """The portal an Execute runs (fast accessor, the decoder's checks)."""
    name = bytes(raw[5:-5])
    if len(raw) < 10 or raw[-5] != 0 or b"\x00" in name:
        raise ClientProtocolError("malformed Execute message: bad portal name or row limit")
    return _utf8(name, "Execute")


def parse_statement(raw: Raw) -> tuple[str, str]:
    """(name, query text) of a Parse (fast accessor, the decoder's checks: the parameter
    type OIDs are not read, but must fill the rest of the message exactly)."""
    body = bytes(raw[5:])
    found = _two_cstrings(body)
    if found is None or len(body) < found[2] + 3:
        raise ClientProtocolError("malformed Parse message: bad name or query text")
    name, query, end = found
    (count,) = _UNPACK_U16(body, end + 1)
    if len(body) != end + 3 + 4 * count:
        raise ClientProtocolError("malformed Parse message: parameter types do not fit it")
    return _utf8(name, "Parse"), _utf8(query, "Parse")


# A Bind's names sit at its front: bind_names() copies this much of the message first.
_BIND_WINDOW: Final = 1024


def bind_names(raw: Raw) -> tuple[str, str]:
    """(portal, statement) of a Bind, without decoding its parameters (fast accessor).

    The rest of the message is framed (length-checked) but passed on undecoded; PostgreSQL
    validates the parameters itself. Bad names are a protocol error, as in the decoder. A
    small window is copied, and the whole body only when the names are longer: a Bind
    carrying megabytes of parameters is not copied to read two names.
    """
    body = raw[5:]
    found = _two_cstrings(bytes(body[:_BIND_WINDOW]))
    if found is None and len(body) > _BIND_WINDOW:
        found = _two_cstrings(bytes(body))
    if found is None:
        raise ClientProtocolError("malformed Bind: missing name terminator")
    try:
        return found[0].decode("utf-8"), found[1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientProtocolError("malformed Bind: names are not UTF-8") from exc


# What `extended_request` reads of a request: the Parse's (name, text), or ("", None)
# without one; the Bind's (portal, statement); the Describe's (kind, name) or (None, None).
ExtendedRequest: TypeAlias = tuple[str, str | None, str, str, bytes | None, str | None]


def extended_request(data: bytes, limit: int) -> ExtendedRequest | None:
    """The names of a read that is exactly one extended-protocol request of its common
    shape, `[Parse] Bind [Describe] Execute Sync` (libpq's PQexecParams and
    PQexecPrepared, pgjdbc's and asyncpg's steady state): each message whole, of a length
    from 4 to `limit`, well-formed by the fast accessors above (a Sync empty), and the
    Execute running the portal the Bind binds. None for anything else, which the caller
    frames and reads message by message (the errors are said there)."""
    size = len(data)
    found: list[tuple[int, bytes]] = []  # (tag, message)
    pos = 0
    while pos < size:
        if pos + 5 > size:
            return None
        (length,) = _UNPACK_I(data, pos + 1)
        end = pos + 1 + length
        if length < 4 or length > limit or end > size:
            return None
        found.append((data[pos], data[pos:end]))
        pos = end
    tags = bytes(tag for tag, _ in found)
    if tags not in (b"PBDES", b"PBES", b"BDES", b"BES") or len(found[-1][1]) != 5:
        return None
    messages = dict(found)
    try:
        name, query, kind, described = "", None, None, None
        if m.TAG_PARSE in messages:
            name, query = parse_statement(messages[m.TAG_PARSE])
        portal, statement = bind_names(messages[m.TAG_BIND])
        if m.TAG_DESCRIBE in messages:
            kind, described = describe_target(messages[m.TAG_DESCRIBE], "Describe")
        if execute_portal(messages[m.TAG_EXECUTE]) != portal:
            return None
    except ProtocolError:
        return None
    return name, query, portal, statement, kind, described


def data_rows(run: Raw) -> tuple[list[tuple[bytes | None, ...]], Raw | None]:
    """The values of each DataRow of a run (as drain() joins them), in order, up to the
    first row that is malformed, which comes back as it is (`fault`): decode_backend of
    its frame raises its error. (rows, None) when every row is well-formed."""
    rows: list[tuple[bytes | None, ...]] = []
    pos, end = 0, len(run)
    while pos < end:
        (length,) = _UNPACK_I(run, pos + 1)
        row = run[pos : pos + 1 + length]
        pos += 1 + length
        try:
            decoded = decode_backend(frame_of(row))
        except ServerProtocolError:
            return rows, row
        assert isinstance(decoded, m.DataRow)
        rows.append(decoded.values)
    return rows, None


def _two_cstrings(data: bytes) -> tuple[bytes, bytes, int] | None:
    """The two NUL-terminated strings at the front of `data` and the second's NUL position;
    None when there are not two."""
    end1 = data.find(b"\x00")
    end2 = data.find(b"\x00", end1 + 1) if end1 >= 0 else -1
    if end2 < 0:
        return None
    return data[:end1], data[end1 + 1 : end2], end2


def describe_target(raw: Raw, what: str) -> tuple[bytes, str]:
    """(b"S" or b"P", name) of a Describe or Close (fast accessor, the decoder's checks)."""
    kind = bytes(raw[5:6])
    name = bytes(raw[6:-1])
    if len(raw) < 7 or raw[-1] != 0 or kind not in (b"S", b"P") or b"\x00" in name:
        raise ClientProtocolError(f"malformed {what} message: bad kind or name")
    return kind, _utf8(name, what)


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientProtocolError(f"malformed {what} message: {exc}") from exc


# ---- field readers: each takes (body, pos) and returns (value, new pos)
def _cstr(body: bytes, pos: int) -> tuple[str, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise _Malformed("string without NUL terminator")
    return body[pos:end].decode("utf-8"), end + 1


def _count(body: bytes, pos: int, item_size: int) -> tuple[int, int]:
    # Checked before looping so a forged count costs nothing.
    (n,) = _UNPACK_U16(body, pos)
    if pos + 2 + n * item_size > len(body):
        raise _Malformed(f"count {n} overruns the message")
    return n, pos + 2


def _int16s(body: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    n, pos = _count(body, pos, 2)
    return struct.unpack_from(f"!{n}h", body, pos), pos + 2 * n


def _oids(body: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    n, pos = _count(body, pos, 4)
    return struct.unpack_from(f"!{n}I", body, pos), pos + 4 * n


def _values(body: bytes, pos: int) -> tuple[tuple[bytes | None, ...], int]:
    n, pos = _count(body, pos, 4)
    size = len(body)
    values: list[bytes | None] = []
    append = values.append
    for _ in range(n):
        (length,) = _UNPACK_I(body, pos)
        pos += 4
        if length < 0:
            if length != -1:
                raise _Malformed(f"invalid value length {length}")
            append(None)
            continue
        end = pos + length
        if end > size:
            raise _Malformed("value overruns the message")
        append(body[pos:end])
        pos = end
    return tuple(values), pos


def _nullable(body: bytes, pos: int) -> bytes | None:
    """An Int32 length (-1: NULL) and that many bytes, which must end the body."""
    (length,) = _UNPACK_I(body, pos)
    data: bytes | None
    if length == -1:
        data = None
        pos += 4
    elif length < 0:
        raise _Malformed(f"invalid value length {length}")
    else:
        data = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
    _end(body, pos)
    return data


def _end(body: bytes, pos: int) -> None:
    if pos != len(body):
        raise _Malformed(f"{len(body) - pos} unexpected bytes at the end")


def _kind(body: bytes) -> bytes:
    kind = body[:1]
    if kind != b"S" and kind != b"P":
        raise _Malformed(f"invalid target {kind!r} (expected b'S' or b'P')")
    return kind


def _fields(body: bytes) -> m.Fields:
    fields: list[tuple[str, str]] = []
    pos = 0
    while True:
        code = body[pos]  # IndexError if the terminator is missing
        if code == 0:
            _end(body, pos + 1)
            return tuple(fields)
        if code > 0x7F:
            raise _Malformed(f"invalid field code {_tag_repr(code)}")
        value, pos = _cstr(body, pos + 1)
        fields.append((chr(code), value))


def _empty(cls: type[_T]) -> Callable[[bytes], _T]:
    def decode(body: bytes) -> _T:
        _end(body, 0)
        return cls()

    return decode


def _cancel_key(key: bytes) -> bytes:
    if not MIN_CANCEL_KEY_SIZE <= len(key) <= MAX_CANCEL_KEY_SIZE:
        raise _Malformed(f"cancel key of {len(key)} bytes")
    return key


# ---- frontend decoders
def _startup(body: bytes) -> m.StartupPacket:
    (code,) = _UNPACK_I(body, 0)
    if code == m.SSL_REQUEST_CODE or code == m.GSSENC_REQUEST_CODE:
        _end(body, 4)
        return m.SSLRequest() if code == m.SSL_REQUEST_CODE else m.GSSENCRequest()
    if code == m.CANCEL_REQUEST_CODE:
        (pid,) = _UNPACK_I(body, 4)
        return m.CancelRequest(pid, _cancel_key(body[8:]))
    if code >> 16 != 3:
        raise _Malformed(f"unsupported protocol {code >> 16}.{code & 0xFFFF}")
    params: list[tuple[str, str]] = []
    pos = 4
    while body[pos] != 0:  # IndexError when the terminator is missing
        name, pos = _cstr(body, pos)
        value, pos = _cstr(body, pos)
        params.append((name, value))
    _end(body, pos + 1)
    return m.StartupMessage(code, tuple(params))


def _query(body: bytes) -> m.Query:
    sql, pos = _cstr(body, 0)
    _end(body, pos)
    return m.Query(sql)


def _parse(body: bytes) -> m.Parse:
    name, pos = _cstr(body, 0)
    query, pos = _cstr(body, pos)
    types, pos = _oids(body, pos)
    _end(body, pos)
    return m.Parse(name, query, types)


def _bind(body: bytes) -> m.Bind:
    portal, pos = _cstr(body, 0)
    statement, pos = _cstr(body, pos)
    param_formats, pos = _int16s(body, pos)
    params, pos = _values(body, pos)
    result_formats, pos = _int16s(body, pos)
    _end(body, pos)
    return m.Bind(portal, statement, param_formats, params, result_formats)


def _describe(body: bytes) -> m.Describe:
    kind = _kind(body)
    name, pos = _cstr(body, 1)
    _end(body, pos)
    return m.Describe(kind, name)


def _close(body: bytes) -> m.Close:
    kind = _kind(body)
    name, pos = _cstr(body, 1)
    _end(body, pos)
    return m.Close(kind, name)


def _execute(body: bytes) -> m.Execute:
    portal, pos = _cstr(body, 0)
    (max_rows,) = _UNPACK_I(body, pos)
    _end(body, pos + 4)
    return m.Execute(portal, max_rows)


def _function_call(body: bytes) -> m.FunctionCall:
    (oid,) = _UNPACK_U32(body, 0)
    formats, pos = _int16s(body, 4)
    args, pos = _values(body, pos)
    (result_format,) = _UNPACK_H(body, pos)
    _end(body, pos + 2)
    return m.FunctionCall(oid, formats, args, result_format)


def _copy_data(body: bytes) -> m.CopyData:
    return m.CopyData(body)


def _copy_fail(body: bytes) -> m.CopyFail:
    message, pos = _cstr(body, 0)
    _end(body, pos)
    return m.CopyFail(message)


def _password(body: bytes) -> m.PasswordMessage:
    # Exactly one NUL, at the end: what the server checks (strlen + 1 == length).
    if not body or body.find(b"\x00") != len(body) - 1:
        raise _Malformed("password is not one NUL-terminated string")
    return m.PasswordMessage(body[:-1])


def _sasl_initial(body: bytes) -> m.SASLInitialResponse:
    mechanism, pos = _cstr(body, 0)
    return m.SASLInitialResponse(mechanism, _nullable(body, pos))


def _sasl(body: bytes) -> m.SASLResponse:
    return m.SASLResponse(body)


def _gss(body: bytes) -> m.GSSResponse:
    return m.GSSResponse(body)


# ---- backend decoders
def _authentication(body: bytes) -> m.Authentication:
    (code,) = _UNPACK_I(body, 0)
    if code == m.AUTH_OK:
        _end(body, 4)
        return m.AuthenticationOk()
    if code == m.AUTH_SASL:
        mechanisms: list[str] = []
        pos = 4
        while body[pos] != 0:  # IndexError when the terminator is missing
            mechanism, pos = _cstr(body, pos)
            mechanisms.append(mechanism)
        _end(body, pos + 1)
        return m.AuthenticationSASL(tuple(mechanisms))
    if code == m.AUTH_SASL_CONTINUE:
        return m.AuthenticationSASLContinue(body[4:])
    if code == m.AUTH_SASL_FINAL:
        return m.AuthenticationSASLFinal(body[4:])
    if code == m.AUTH_MD5_PASSWORD:
        _end(body, 8)
        return m.AuthenticationMD5Password(body[4:8])
    if code == m.AUTH_CLEARTEXT_PASSWORD:
        _end(body, 4)
        return m.AuthenticationCleartextPassword()
    if code == m.AUTH_GSS_CONTINUE:
        return m.AuthenticationGSSContinue(body[4:])
    plain = _PLAIN_AUTH.get(code)
    if plain is None:
        raise _Malformed(f"unknown authentication request code {code}")
    _end(body, 4)
    return plain()


_PLAIN_AUTH: Final[dict[int, Callable[[], m.Authentication]]] = {
    m.AUTH_KERBEROS_V5: m.AuthenticationKerberosV5,
    m.AUTH_GSS: m.AuthenticationGSS,
    m.AUTH_SSPI: m.AuthenticationSSPI,
}


def _backend_key_data(body: bytes) -> m.BackendKeyData:
    (pid,) = _UNPACK_I(body, 0)
    return m.BackendKeyData(pid, _cancel_key(body[4:]))


def _parameter_status(body: bytes) -> m.ParameterStatus:
    name, pos = _cstr(body, 0)
    value, pos = _cstr(body, pos)
    _end(body, pos)
    return m.ParameterStatus(name, value)


def _ready_for_query(body: bytes) -> m.ReadyForQuery:
    if body != b"I" and body != b"T" and body != b"E":
        raise _Malformed(f"invalid transaction status {body[:8]!r}")
    return m.ReadyForQuery(body)


def _negotiate_protocol_version(body: bytes) -> m.NegotiateProtocolVersion:
    minor, count = _UNPACK_II(body, 0)
    if count < 0 or count > len(body) - 8:
        raise _Malformed(f"count {count} overruns the message")
    names: list[str] = []
    pos = 8
    for _ in range(count):
        name, pos = _cstr(body, pos)
        names.append(name)
    _end(body, pos)
    return m.NegotiateProtocolVersion(minor, tuple(names))


def _row_description(body: bytes) -> m.RowDescription:
    n, pos = _count(body, 0, 1 + _FIELD.size)
    fields: list[m.FieldDescription] = []
    for _ in range(n):
        name, pos = _cstr(body, pos)
        fields.append(m.FieldDescription(name, *_UNPACK_FIELD(body, pos)))
        pos += _FIELD.size
    _end(body, pos)
    return m.RowDescription(tuple(fields))


def _data_row(body: bytes) -> m.DataRow:
    values, pos = _values(body, 0)
    _end(body, pos)
    return m.DataRow(values)


def _command_complete(body: bytes) -> m.CommandComplete:
    tag, pos = _cstr(body, 0)
    _end(body, pos)
    return m.CommandComplete(tag)


def _parameter_description(body: bytes) -> m.ParameterDescription:
    oids, pos = _oids(body, 0)
    _end(body, pos)
    return m.ParameterDescription(oids)


def _function_call_response(body: bytes) -> m.FunctionCallResponse:
    return m.FunctionCallResponse(_nullable(body, 0))


_CopyResponse: TypeAlias = type[m.CopyInResponse | m.CopyOutResponse | m.CopyBothResponse]


def _copy_response(cls: _CopyResponse) -> Callable[[bytes], m.BackendMessage]:
    def decode(body: bytes) -> m.BackendMessage:
        overall = body[0]
        formats, pos = _int16s(body, 1)
        _end(body, pos)
        return cls(overall, formats)

    return decode


def _notification(body: bytes) -> m.NotificationResponse:
    (pid,) = _UNPACK_I(body, 0)
    channel, pos = _cstr(body, 4)
    payload, pos = _cstr(body, pos)
    _end(body, pos)
    return m.NotificationResponse(pid, channel, payload)


def _error_response(body: bytes) -> m.ErrorResponse:
    return m.ErrorResponse(_fields(body))


def _notice_response(body: bytes) -> m.NoticeResponse:
    return m.NoticeResponse(_fields(body))


_FRONTEND_DECODERS: Final[dict[int, tuple[str, Callable[[bytes], m.FrontendMessage]]]] = {
    m.TAG_UNTAGGED: ("startup", _startup),
    m.TAG_QUERY: ("Query", _query),
    m.TAG_PARSE: ("Parse", _parse),
    m.TAG_BIND: ("Bind", _bind),
    m.TAG_DESCRIBE: ("Describe", _describe),
    m.TAG_EXECUTE: ("Execute", _execute),
    m.TAG_CLOSE: ("Close", _close),
    m.TAG_SYNC: ("Sync", _empty(m.Sync)),
    m.TAG_FLUSH: ("Flush", _empty(m.Flush)),
    m.TAG_TERMINATE: ("Terminate", _empty(m.Terminate)),
    m.TAG_FUNCTION_CALL: ("FunctionCall", _function_call),
    m.TAG_COPY_DATA: ("CopyData", _copy_data),
    m.TAG_COPY_DONE: ("CopyDone", _empty(m.CopyDone)),
    m.TAG_COPY_FAIL: ("CopyFail", _copy_fail),
}

_PASSWORD_DECODERS: Final[dict[str, tuple[str, Callable[[bytes], m.FrontendMessage]]]] = {
    "password": ("PasswordMessage", _password),
    "sasl_initial": ("SASLInitialResponse", _sasl_initial),
    "sasl": ("SASLResponse", _sasl),
    "gss": ("GSSResponse", _gss),
}

_BACKEND_DECODERS: Final[dict[int, tuple[str, Callable[[bytes], m.BackendMessage]]]] = {
    m.TAG_AUTHENTICATION: ("Authentication", _authentication),
    m.TAG_BACKEND_KEY_DATA: ("BackendKeyData", _backend_key_data),
    m.TAG_PARAMETER_STATUS: ("ParameterStatus", _parameter_status),
    m.TAG_READY_FOR_QUERY: ("ReadyForQuery", _ready_for_query),
    m.TAG_NEGOTIATE_PROTOCOL_VERSION: ("NegotiateProtocolVersion", _negotiate_protocol_version),
    m.TAG_ROW_DESCRIPTION: ("RowDescription", _row_description),
    m.TAG_DATA_ROW: ("DataRow", _data_row),
    m.TAG_COMMAND_COMPLETE: ("CommandComplete", _command_complete),
    m.TAG_EMPTY_QUERY_RESPONSE: ("EmptyQueryResponse", _empty(m.EmptyQueryResponse)),
    m.TAG_PARSE_COMPLETE: ("ParseComplete", _empty(m.ParseComplete)),
    m.TAG_BIND_COMPLETE: ("BindComplete", _empty(m.BindComplete)),
    m.TAG_CLOSE_COMPLETE: ("CloseComplete", _empty(m.CloseComplete)),
    m.TAG_NO_DATA: ("NoData", _empty(m.NoData)),
    m.TAG_PORTAL_SUSPENDED: ("PortalSuspended", _empty(m.PortalSuspended)),
    m.TAG_PARAMETER_DESCRIPTION: ("ParameterDescription", _parameter_description),
    m.TAG_FUNCTION_CALL_RESPONSE: ("FunctionCallResponse", _function_call_response),
    m.TAG_COPY_IN_RESPONSE: ("CopyInResponse", _copy_response(m.CopyInResponse)),
    m.TAG_COPY_OUT_RESPONSE: ("CopyOutResponse", _copy_response(m.CopyOutResponse)),
    m.TAG_COPY_BOTH_RESPONSE: ("CopyBothResponse", _copy_response(m.CopyBothResponse)),
    m.TAG_COPY_DATA: ("CopyData", _copy_data),
    m.TAG_COPY_DONE: ("CopyDone", _empty(m.CopyDone)),
    m.TAG_NOTIFICATION_RESPONSE: ("NotificationResponse", _notification),
    m.TAG_ERROR_RESPONSE: ("ErrorResponse", _error_response),
    m.TAG_NOTICE_RESPONSE: ("NoticeResponse", _notice_response),
}
