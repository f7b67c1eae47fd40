"""The audit journal: records in a memory-mapped ring file until the log has them.

Without fsync, a record is safe from `kill -9` once the kernel holds it: a `write` to the
log does that, but under load its ext4 path costs ~5 µs a statement, the gateway's largest
single item (issue 13). A store into a shared file mapping also lands in the page cache,
with no system call. So `audit.sink` copies each sealed line into this ring first (the
statement is forwarded after that) and appends the lines it holds to the log itself in one
write per flush (every 200 ms, and whenever the ring is half full). The log stays a plain
append-only file that tailers and log shippers read as before, a flush later.

The ring is `<log>.journal`, 0600, its blocks allocated when it is made (posix_fallocate:
a store into a mapped page with no block behind it on a full disk is SIGBUS, not an
error), lines stored one after another and the next one at the start when it would not
fit. Nothing marks where the ring starts: the records' hash chain does. After a crash the
sink reads the ring and appends what continues the log's chain (`chain.continuation`);
stale lines (already in the log), lines a crash cut off or a later lap overwrote in part,
and a ring of another log never continue it.

Imports errno, mmap, os and pathlib; no other guard module.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

# 4 MiB per log, so per gateway worker (a 64-core host runs 64): one process seals at most
# ~30k records/s of ~600 bytes, 3.6 MB per 200 ms flush; past half the ring (2 MiB, about
# 3,500 records) its lines go to the log in one write before the flush is due.
SIZE = 4 << 20


def journal_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".journal")


def read(path: Path) -> bytes | None:
    """What a journal holds (None: there is none)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class Journal:
    """A new, empty ring at `path` (one left there is replaced: read it first)."""

    # What the sink's C hot path reads and stores (`_cseal.HotPath`): slots, at fixed offsets.
    __slots__ = ("size", "_map", "_pos", "__dict__")

    def __init__(self, path: Path, size: int = SIZE) -> None:
        self.path = path
        self.size = size
        allocate = getattr(os, "posix_fallocate", None)
        if allocate is None:  # macOS: the sink writes each line to the log at once instead
            raise OSError(errno.ENOTSUP, "posix_fallocate is not available on this system")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            allocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # the mapping keeps the file
        self._pos = 0

    def put(self, line: bytes) -> None:
        """Store one or more whole lines (len ≤ size) after the last, or at the start."""
        n = len(line)
        pos = self._pos
        if pos + n > self.size:
            pos = 0
        self._map[pos : pos + n] = line
        self._pos = pos + n

    def close(self, *, remove: bool) -> None:
        """Unmap; `remove` when the log holds everything the ring held."""
        self._map.close()
        if remove:
            self.path.unlink(missing_ok=True)
