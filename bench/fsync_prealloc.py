"""Measure the cost of a durable small append vs. overwriting preallocated space.

Question: is ``os.fdatasync`` after an *append* (file size grows, so the
filesystem must commit metadata / a journal transaction) much slower than
``os.fdatasync`` after overwriting bytes inside a region that was preallocated
beforehand?  Modes measured, each writing N sequential ~300-byte records
(like one JSON audit line) with a sync after every record:

  append          open(O_APPEND), write, fdatasync
  append_fsync    same, but os.fsync
  zero_fdatasync  file pre-filled with zeros + fsync'd once (as PostgreSQL does
                  for WAL segments), then pwrite at increasing offsets + fdatasync
  zero_fsync      same, os.fsync
  falloc          os.posix_fallocate (unwritten extents), pwrite + fdatasync
  odsync_append   open(O_APPEND|O_DSYNC), write, no explicit sync
  odsync_zero     open(O_DSYNC) on a zero-prefilled file, pwrite, no explicit sync

Plus a concurrent variant (--threads, default 4) for append and zero-prefilled:
T threads each do their own write + fdatasync on the same file (the project
uses 4 fsync threads); offsets are reserved under a lock, the write+sync is not.

The whole set of modes is repeated --repeat times interleaved; the report shows
the median over repeats of syncs/s, p50 and p99 latency (microseconds, timed
around write+sync).  Setup (prefill/fallocate) is not timed.

Run:
    python bench/fsync_prealloc.py                 # tempdir under /tmp
    python bench/fsync_prealloc.py --dir /work/tmp-fsync -n 2000 --repeat 3

Standard library only.  Temp files are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time

RECORD_LEN = 300


def make_record(i: int) -> bytes:
    head = (
        f'{{"ts":{time.time():.6f},"seq":{i},"actor":"bench","action":"query","detail":"'.encode()
    )
    tail = b'"}\n'
    return head + b"x" * (RECORD_LEN - len(head) - len(tail)) + tail


def _fsync_dir(path: str) -> None:
    """The file's directory entry made durable too (setup, not timed)."""
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)


def prefill_zeros(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\0" * (1 << 20)
        left = size
        while left > 0:
            left -= os.write(fd, chunk[: min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path)


def prefill_falloc(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path)


def new_empty(path: str, size: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fsync(fd)
    os.close(fd)
    _fsync_dir(path)


# mode -> (setup, open flags, use pwrite?, sync fn or None)
MODES = {
    "append": (new_empty, os.O_WRONLY | os.O_APPEND, False, os.fdatasync),
    "append_fsync": (new_empty, os.O_WRONLY | os.O_APPEND, False, os.fsync),
    "zero_fdatasync": (prefill_zeros, os.O_WRONLY, True, os.fdatasync),
    "zero_fsync": (prefill_zeros, os.O_WRONLY, True, os.fsync),
    "falloc": (prefill_falloc, os.O_WRONLY, True, os.fdatasync),
    "odsync_append": (new_empty, os.O_WRONLY | os.O_APPEND | os.O_DSYNC, False, None),
    "odsync_zero": (prefill_zeros, os.O_WRONLY | os.O_DSYNC, True, None),
}

THREAD_MODES = {
    "append_T": (new_empty, os.O_WRONLY | os.O_APPEND, False, os.fdatasync),
    "zero_T": (prefill_zeros, os.O_WRONLY, True, os.fdatasync),
}


def run_mode(path: str, spec, n: int, threads: int = 1):
    setup, flags, use_pwrite, sync = spec
    size = n * RECORD_LEN + (1 << 20)
    setup(path, size)
    records = [make_record(i) for i in range(n)]
    fd = os.open(path, flags)
    lat: list[float] = []
    lock = threading.Lock()
    next_idx = [0]

    def worker():
        mine = []
        while True:
            with lock:
                i = next_idx[0]
                if i >= n:
                    break
                next_idx[0] = i + 1
            rec = records[i]
            t0 = time.perf_counter()
            if use_pwrite:
                os.pwrite(fd, rec, i * RECORD_LEN)
            else:
                os.write(fd, rec)
            if sync is not None:
                sync(fd)
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    try:
        t_start = time.perf_counter()
        if threads == 1:
            worker()
        else:
            ts = [threading.Thread(target=worker) for _ in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        elapsed = time.perf_counter() - t_start
    finally:
        os.close(fd)
        os.unlink(path)
    lat.sort()
    return {
        "rate": n / elapsed,
        "p50": lat[len(lat) // 2] * 1e6,
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir", default=None, help="directory for test files (default: new tempdir under /tmp)"
    )
    ap.add_argument("-n", type=int, default=2000, help="records per mode")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()

    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="fsync-bench-", dir=args.dir)
    else:
        workdir = tempfile.mkdtemp(prefix="fsync-bench-", dir="/tmp")
    all_modes = {k: (v, 1) for k, v in MODES.items()}
    for k, v in THREAD_MODES.items():
        all_modes[k.replace("_T", f"_{args.threads}thr")] = (v, args.threads)
    results: dict[str, list[dict]] = {k: [] for k in all_modes}
    try:
        for r in range(args.repeat):
            for name, (spec, threads) in all_modes.items():
                path = os.path.join(workdir, f"{name}.{r}.log")
                results[name].append(run_mode(path, spec, args.n, threads))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"dir={workdir} n={args.n} repeat={args.repeat} (medians over repeats)")
    print(f"{'mode':18s} {'syncs/s':>10s} {'p50_us':>10s} {'p99_us':>10s}")
    for name, rs in results.items():
        rate, p50, p99 = (statistics.median(x[key] for x in rs) for key in ("rate", "p50", "p99"))
        print(f"{name:18s} {rate:10.0f} {p50:10.0f} {p99:10.0f}")


if __name__ == "__main__":
    main()
