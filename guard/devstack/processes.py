"""Is a recorded process still the one we started? (Linux /proc, kill(0) elsewhere.)

Imports only the stdlib. Shared by the stack's `down` and the PostgreSQL cluster's stop, so
both treat zombies as gone and never mistake a recycled pid for their own process.
"""

from __future__ import annotations

import os
from pathlib import Path


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot), None if unknown/gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int | None, start_time: int | None = None) -> bool:
    """True if `pid` runs (not a zombie) and, when known, is the process we started."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust kill(0)
    if state in ("Z", "X"):
        return False
    return start_time is None or proc_start_time(pid) == start_time
