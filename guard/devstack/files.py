"""Writing secrets to disk for the demo stack: owner-only from the first byte.

Imports only the stdlib. The file is created with mode 0600 (never world-readable, not even
for an instant between create and chmod) and replaced atomically, so a reader sees the old
or the new content, never half of it.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
