"""The sink gives the page cache back its log's past (the sink's "The page cache"): what
`mincore` says of a real log's pages after megabytes of records, the last
`RELEASE_KEEP` bytes excepted."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from guard.broker.audit import sink as sink_module
from guard.broker.audit.serialize import fixed_fields
from guard.broker.audit.sink import JsonlAuditSink
from tests.audit.audit_logs import stmt, verify

if not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self/maps"):
    pytest.skip("posix_fadvise and mincore are Linux's here", allow_module_level=True)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident(path: Path) -> list[bool]:
    """Whether each page of `path` is in the page cache (mapping it touches none)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return [bool(v & 1) for v in vec]
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_the_logs_past_leaves_the_page_cache_and_its_last_bytes_stay(tmp_path, monkeypatch):
    control = tmp_path / "control"
    control.write_bytes(os.urandom(1 << 20))
    fd = os.open(control, os.O_RDONLY)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if any(resident(control)):
        pytest.skip("this file system keeps a clean file's pages (tmpfs?)")

    step = keep = 256 << 10
    monkeypatch.setattr(sink_module, "RELEASE_STEP", step)
    monkeypatch.setattr(sink_module, "RELEASE_KEEP", keep)
    path = tmp_path / "audit.jsonl"
    # With fsync each write is clean once the append returns: its pages can go at once.
    sink = JsonlAuditSink(path, fsync=True)
    records = [fixed_fields(stmt(i)) for i in range(100)]
    while path.stat().st_size < 3 << 20:
        sink.append_statements(records)
    pages = resident(path)
    size = path.stat().st_size
    # Released: everything before the kept tail, but for the last step written (its
    # release is due at the next step).
    past = (size - keep - step) // mmap.PAGESIZE
    assert past > 256 and sum(pages[:past]) <= past // 20, sum(pages[:past])
    # Kept: the last bytes (the ones a tail -f or a crash's recovery would read).
    assert all(pages[-(keep // 2) // mmap.PAGESIZE :])
    sink.close()
    verify(path)  # advice changes no byte of the log
