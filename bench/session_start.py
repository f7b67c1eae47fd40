"""Benchmark: how long `guard exec --db demo -- true` takes, and where the time goes.

    .venv/bin/python bench/session_start.py [--runs 21]

Starts the real demo stack (`guard dev up` in a throwaway GUARD_HOME), logs alice in
(`guard dev login`, tokens in the 0600 file as on a server or CI runner), warms up, then
runs each of these `--runs` times, interleaved, and prints the median (p50) and p90 of the
wall time, and the median CPU time (user + system) of the process and its child:

- `python -c pass`: the interpreter alone, the floor under any Python CLI;
- `python -c "import guard.cli.main"`: the click application's start-up imports (every
  command but `guard exec`'s everyday command lines, which `guard.cli.entry` runs without
  click);
- `guard --help`: start-up and argument parsing, nothing else;
- `guard exec --db demo -- true`: the whole session as a user runs it (session opened
  through the broker with OpenBao role creation, child run, session ended and role revoked);
- the phases of that session measured inside one fresh process each run: importing what
  `exec` imports when it runs, reading the token, `POST /v1/sessions` (the broker's side:
  identity, policy, OpenBao role, audit), and `DELETE` (gateway connections closed, lease
  revoked, audit).

The goal (issue 13) is p50 ≤ 150 ms for `guard exec` on a warm stack. Numbers on a shared
2-core machine are noisy: compare lines within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import demo_stack, sh  # noqa: E402 - bench/run.py owns the stack helpers

GUARD_SCRIPT = str(Path(sys.executable).with_name("guard"))

PHASES = r"""
import json, sys, time
t = [time.perf_counter()]
from guard.cli.auth import current_id_token
from guard.cli.client import BrokerClient
from guard.cli.profile import load_profile
from guard.cli.runner import run_in_session  # noqa: F401 - what exec imports when it runs
t.append(time.perf_counter())
profile = load_profile()
token = current_id_token(profile)
t.append(time.perf_counter())
opener = BrokerClient(profile.broker_url, token)
created = opener.create_session("demo", heartbeat=True)
t.append(time.perf_counter())
ender = BrokerClient(profile.broker_url, created.session_token)
ender.end_session(created.session_id)
t.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(t, t[1:])]))
"""


CPU: dict[str, list[float]] = {}  # per line: user+system CPU seconds of the process tree


def wall(argv: list[str], env: dict[str, str], line: str | None = None) -> float:
    """Wall seconds of one run; its CPU (guard and its child, the broker excluded) is kept
    under `line`: on a loaded machine CPU time is steadier than wall time."""
    start = time.perf_counter()
    before = os.times()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    after = os.times()
    if line is not None:
        cpu = (after.children_user - before.children_user) + (
            after.children_system - before.children_system
        )
        CPU.setdefault(line, []).append(cpu)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    with demo_stack() as (env, _status):
        sh([GUARD_SCRIPT, "dev", "login", "alice"], env=env)
        exec_argv = [GUARD_SCRIPT, "exec", "--db", "demo", "--", "true"]
        for _ in range(3):
            wall(exec_argv, env)
        lines: dict[str, list[float]] = {}
        phases: list[list[float]] = []
        runs = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "import guard.cli.main": [sys.executable, "-c", "import guard.cli.main"],
            "guard --help": [GUARD_SCRIPT, "--help"],
            "guard exec --db demo -- true": exec_argv,
        }
        for _ in range(args.runs):
            for line, argv in runs.items():
                lines.setdefault(line, []).append(wall(argv, env, line))
            out = sh([sys.executable, "-c", PHASES], env=env).stdout
            phases.append(json.loads(out))
        names = ["  exec's imports", "  token", "  open (POST /v1/sessions)", "  end (DELETE)"]
        for i, name in enumerate(names):
            lines[name] = [p[i] for p in phases]
    print(f"guard exec session start+end, {args.runs} runs, cpus={os.cpu_count()}")
    print(f"{'':34s} {'p50 ms':>8s} {'p90 ms':>8s} {'CPU p50 ms':>11s}")
    for name, values in lines.items():
        values.sort()
        p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
        cpu = f"{statistics.median(CPU[name]) * 1000:11.1f}" if name in CPU else ""
        print(f"{name:34s} {statistics.median(values) * 1000:8.1f} {p90 * 1000:8.1f} {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
