"""The control channel between the broker and one gateway worker process: calls and notices.

A worker asks the broker what only the broker knows (`call`: find a session, admit a
connection, hold a statement for approval) and tells it what happened (`notify`: a connection
gone, a cancel for another worker, a withdrawn request); the broker tells a worker to close a
connection or to pass on a cancel. Frames are a 4-byte big-endian length and a pickle of
`("call", id, method, args)`, `("reply", id, ok, value)` or `("notice", kind, args)`.

Pickle is used only because of how the channel is made: a `socket.socketpair()` the broker
creates and hands to the one child it spawns (`pass_fds`), so nothing but those two
processes of the same program can write to it. Never use this over a socket anyone can
connect to. And the broker does not trust a worker as it trusts itself: a worker parses
every client's bytes, so a flaw there could hand an attacker the worker, and a plain
unpickler in the broker would hand them the broker too (with the OpenBao token the worker
is never given). The broker's end therefore unpickles with an allowlist of classes
(`allowed`): strings, numbers, bytes, tuples and the few plain value classes a worker
sends; any other global in a frame closes the channel.

Imports asyncio and pickle; knows no session, policy or gateway types.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import pickle
import struct
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("guard.control")

# A frame carries a session snapshot or an approval request: a few KiB. Anything near this
# is a bug on the other side, and reading it would only take memory.
MAX_FRAME = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")

Call = Callable[..., Awaitable[Any]]
Notice = Callable[..., None]


class ControlClosed(ConnectionError):
    """The other process is gone (or the channel broke): no answer will come."""


class RemoteError(Exception):
    """The other side's handler raised; its message (never a traceback) is carried."""


class _Restricted(pickle.Unpickler):
    """Resolves only the globals in `allowed` (module, name); anything else is refused, so
    a frame cannot name a callable (os.system, builtins.eval, …) to be run while loading."""

    def __init__(self, data: bytes, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(io.BytesIO(data))
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a control frame")
        return super().find_class(module, name)


def frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_frame(
    reader: asyncio.StreamReader, allowed: frozenset[tuple[str, str]] | None = None
) -> tuple[Any, ...]:
    """One frame's message; `allowed`: the only globals it may name (None: any, for the
    worker's end, which trusts the broker that started it)."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(4))
        if length > MAX_FRAME:
            raise ControlClosed(f"control frame of {length} bytes refused")
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ControlClosed(str(exc) or "control channel closed") from None
    try:
        message = pickle.loads(body) if allowed is None else _Restricted(body, allowed).load()
    except Exception as exc:  # noqa: BLE001 - any malformed frame ends the channel
        raise ControlClosed(f"unreadable control frame: {exc}") from None
    if not isinstance(message, tuple) or not message:
        raise ControlClosed("malformed control frame")
    return message


class Channel:
    """One end of the channel: `serve()` reads until the other side is gone, answering its
    calls with `calls[method](*args)` and passing its notices to `notices[kind](*args)`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        calls: dict[str, Call] | None = None,
        notices: dict[str, Notice] | None = None,
        name: str = "control",
        allowed: frozenset[tuple[str, str]] | None = None,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.calls = calls or {}
        self.notices = notices or {}
        self.name = name
        self.allowed = allowed  # globals the other side's frames may name (None: any)
        self.closed = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, method: str, *args: Any) -> Any:
        """Ask the other side; its handler's result, or RemoteError / ControlClosed."""
        if self.closed:
            raise ControlClosed(f"{self.name}: channel closed")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        try:
            self.writer.write(frame(("call", call_id, method, args)))
            return await future
        finally:
            self._waiting.pop(call_id, None)

    def notify(self, kind: str, *args: Any) -> None:
        """Tell the other side; dropped (logged) when the channel is closed."""
        if self.closed:
            log.debug("%s: notice %s dropped: channel closed", self.name, kind)
            return
        self.writer.write(frame(("notice", kind, args)))

    async def serve(self) -> None:
        try:
            while True:
                message = await read_frame(self.reader, self.allowed)
                try:
                    self._dispatch(message)
                except (ValueError, TypeError) as exc:  # a frame of the wrong shape
                    raise ControlClosed(f"malformed control frame: {exc}") from None
        except ControlClosed as exc:
            log.debug("%s: %s", self.name, exc)
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ControlClosed(f"{self.name}: the other side is gone"))
        for task in self._tasks:
            task.cancel()
        self.writer.close()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "reply":
            _, call_id, ok, value = message
            future = self._waiting.get(call_id)
            if future is not None and not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(RemoteError(value))
        elif kind == "notice":
            _, notice, args = message
            handler = self.notices.get(notice)
            if handler is None:
                log.error("%s: unknown notice %r", self.name, notice)
                return
            try:
                handler(*args)
            except Exception:  # noqa: BLE001 - one bad notice must not end the channel
                log.exception("%s: notice %s failed", self.name, notice)
        elif kind == "call":
            _, call_id, method, args = message
            task = asyncio.get_running_loop().create_task(self._answer(call_id, method, args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            log.error("%s: unknown frame kind %r", self.name, kind)

    async def _answer(self, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        handler = self.calls.get(method)
        try:
            if handler is None:
                raise RemoteError(f"unknown call {method!r}")
            reply = ("reply", call_id, True, await handler(*args))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the caller gets the message, not a trace
            log.exception("%s: call %s failed", self.name, method)
            reply = ("reply", call_id, False, f"{type(exc).__name__}: {exc}")
        if not self.closed:
            self.writer.write(frame(reply))
