"""Benchmark: the CPU an audit log's appends cost with the sink giving the page cache its
pages back (`JsonlAuditSink`'s "The page cache") and without.

    .venv/bin/python bench/audit_pages.py [--mb 1024] [--pairs 2] [--dir DIR]

Writes `--mb` MB of real statement records (~600 bytes sealed) through `JsonlAuditSink`
with its journal, as the gateway does with `audit.fsync: false`: records copied into the
ring, the log written once per 4000 records (~2.5 MB, about what a 200 ms flush writes
at 19k statements/s), to a log on DIR's file system (default: the system temp dir; put
it on the disk the broker's audit log lives on). Each pair runs the sink with the pages
kept (`RELEASE_STEP` out of reach), then as built, and prints the process's CPU per KB
written, in all and in the log's write() calls alone.

A broker's log grows for weeks: the pages its writes need come from memory the kernel
has not handed out lately, not from a log just deleted. So every log stays until the
end of the run (2 x pairs x MB of page cache, at most), and each run's pages are new to
it; the first run may still find pages other processes freed a moment ago (cheaper).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from audit_commit import record  # noqa: E402 - the same real statement record

from guard.broker.audit import sink as sink_module  # noqa: E402

RECORD = record(0)
FLUSH_EVERY = 4000


def run(directory: Path, megabytes: int, release: bool) -> tuple[float, float]:
    """CPU µs per KB written of one new log of `megabytes` in `directory` (left there):
    in all, and in the log's write() calls."""
    step = sink_module.RELEASE_STEP
    if not release:
        sink_module.RELEASE_STEP = 1 << 62
    in_write = [0.0]
    write = os.write

    def timed_write(fd: int, data: bytes) -> int:
        start = time.thread_time()
        try:
            return write(fd, data)
        finally:
            in_write[0] += time.thread_time() - start

    sink_module.os.write = timed_write  # type: ignore[assignment]
    try:
        sink = sink_module.JsonlAuditSink(
            Path(tempfile.mkdtemp(dir=directory)) / "a.jsonl", journal=True
        )
        path = sink.path
        records = 0
        start = time.process_time()
        while True:
            for _ in range(FLUSH_EVERY):
                sink.append_statements((RECORD,))
            records += FLUSH_EVERY
            sink.flush()
            if records % (FLUSH_EVERY * 16) == 0 and path.stat().st_size >= megabytes << 20:
                break
        cpu = time.process_time() - start
        kb = path.stat().st_size / 1024
        sink.close()
    finally:
        sink_module.RELEASE_STEP = step
        sink_module.os.write = write  # type: ignore[assignment]
    return cpu / kb * 1e6, in_write[0] / kb * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    print(f"{'pages':<10} {'µs CPU/KB':>10} {'in write()':>11}   ({args.mb} MB each, {args.dir})")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="guard-bench-pages-") as tmp:
        for _ in range(args.pairs):
            for release in (False, True):
                os.sync()
                time.sleep(3)  # the last run's pages written back: each run starts alike
                per_kb, in_write = run(Path(tmp), args.mb, release)
                label = "given back" if release else "kept"
                print(f"{label:<10} {per_kb:10.3f} {in_write:11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
