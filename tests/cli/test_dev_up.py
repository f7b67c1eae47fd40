"""`guard dev up` on a stack that already runs, and the `next:` hint's `guard` command.

The "stack" here is a `stack.json` whose recorded processes are real `sleep` processes:
`up` reads it exactly as it reads a real one (pids and kernel start times), so nothing in
`guard.devstack` is mocked and nothing real is started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guard.cli.commands.dev import guard_command
from guard.devstack.processes import alive, proc_start_time
from tests.cli.invoke import Guard, guard, home  # noqa: F401

NAMES = ("openbao", "idp", "postgres", "broker")
POLICY = "/somewhere/policies.yaml"


@pytest.fixture
def sleepers() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "300"])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def record_stack(guard_home: Path, pids: dict[str, int]) -> Path:
    """A stack.json like `stack.up` saves, recording `pids`."""
    state = guard_home / "dev"
    state.mkdir(mode=0o700, exist_ok=True)
    data = {
        "state_dir": str(state),
        "policy_file": POLICY,
        "pids": pids,
        "pid_starts": {name: proc_start_time(pid) for name, pid in pids.items()},
        "logs": {},
        "broker_url": "https://127.0.0.1:4711",
        "gateway": "127.0.0.1:4712",
        "issuer": "http://127.0.0.1:4713",
        "upstream_dsn": "host=127.0.0.1 port=4714 user=guard_admin password=s3cret dbname=demo",
        "up_seconds": 3.5,
    }
    path = state / "stack.json"
    path.write_text(json.dumps(data))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("detach", [["--detach"], []])
def test_up_on_a_running_stack_shows_it_and_succeeds(guard: Guard, home, sleepers, detach):  # noqa: F811
    procs = {name: sleepers() for name in NAMES}
    path = record_stack(home, {name: proc.pid for name, proc in procs.items()})
    before = path.read_text()

    result = guard("dev", "up", *detach)

    assert result.code == 0, result.err
    assert result.err.startswith(f"the dev stack was already up (in {home / 'dev'})")
    assert "error:" not in result.err and "Traceback" not in result.err
    assert "guard dev login alice" in result.err.splitlines()[-1]
    # The table `guard dev status` prints, with this stack's values.
    assert "guard dev stack" in result.out
    assert "https://127.0.0.1:4711" in result.out and POLICY in result.out
    assert "s3cret" not in result.out
    # Nothing was started or stopped (foreground mode did not wait on it either).
    assert path.read_text() == before
    assert all(proc.poll() is None for proc in procs.values())


def test_up_on_a_running_stack_with_another_policy_is_refused(guard: Guard, home, sleepers):  # noqa: F811
    path = record_stack(home, {name: sleepers().pid for name in NAMES})
    other = home / "other.yaml"
    other.write_text("targets: {}\n")

    result = guard("dev", "up", "--detach", "--policy", str(other))

    assert result.code == 1
    assert result.err.splitlines() == [
        f"error: a dev stack is already running in {home / 'dev'} with the policy {POLICY}, "
        f"not {other.resolve()}",
        f"hint: run `guard dev down`, then `guard dev up --policy {other}`",
    ]
    assert "stopped" not in json.loads(path.read_text())


def test_up_on_a_half_running_stack_says_what_to_do_and_touches_nothing(
    guard: Guard,  # noqa: F811
    home,  # noqa: F811
    sleepers,
):
    live = {"openbao": sleepers(), "postgres": sleepers()}
    pids = {"openbao": live["openbao"].pid, "idp": dead_pid()}
    pids |= {"postgres": live["postgres"].pid, "broker": dead_pid()}
    path = record_stack(home, pids)
    before = path.read_text()

    result = guard("dev", "up", "--detach")

    assert result.code == 1
    assert result.err.splitlines() == [
        f"error: a dev stack is partly running in {home / 'dev'}: openbao, postgres still "
        f"running, idp, broker exited (logs: {home / 'dev' / 'logs'})",
        "hint: run `guard dev down` to stop what is left, then `guard dev up`",
    ]
    assert path.read_text() == before
    assert all(alive(proc.pid) for proc in live.values())


def test_foreground_up_on_a_running_stack_returns(home, sleepers, tmp_path):  # noqa: F811
    """A second foreground `guard dev up` does not attach to (and wait on) the first one;
    run as a program so a hang fails the test instead of blocking it."""
    record_stack(home, {name: sleepers().pid for name in NAMES})
    bin_dir = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != bin_dir)

    result = subprocess.run(
        [sys.executable, "-m", "guard.cli.main", "dev", "up"],
        env={**os.environ, "PATH": path},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    # `guard` is not on this PATH: the hint starts with the venv's activate line.
    assert result.stderr.splitlines()[-1] == (
        f"next: . {bin_dir / 'activate'} (puts guard on PATH), then guard dev login alice, "
        "then guard connect demo"
    )


# --- the `guard` command in the hint --------------------------------------------------


def make_script(directory: Path, *, activate: bool) -> Path:
    directory.mkdir(parents=True)
    script = directory / "guard"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (directory / "python").write_text("")
    if activate:
        (directory / "activate").write_text("")
    return script


def test_plain_guard_when_the_one_on_path_is_the_one_running(tmp_path):
    script = make_script(tmp_path / ".venv" / "bin", activate=True)
    python = str(script.parent / "python")

    assert guard_command(str(script), str(script), python, tmp_path) == (None, "guard")
    # Run by a relative path, found on PATH through a symlinked directory: the same file.
    (tmp_path / "link").symlink_to(script.parent)
    on_path = str(tmp_path / "link" / "guard")
    assert guard_command(".venv/bin/guard", on_path, python, tmp_path) == (None, "guard")


def test_activate_line_when_guard_is_not_on_path(tmp_path):
    script = make_script(tmp_path / ".venv" / "bin", activate=True)
    python = str(script.parent / "python")

    assert guard_command(".venv/bin/guard", None, python, tmp_path) == (
        ". .venv/bin/activate",
        "guard",
    )
    # Another guard on PATH (a system install) is not the one that started the stack.
    elsewhere = make_script(tmp_path / "usr" / "bin", activate=False)
    assert guard_command(str(script), str(elsewhere), python, tmp_path) == (
        ". .venv/bin/activate",
        "guard",
    )
    # From outside the checkout the path is absolute; from inside bin/ it keeps a slash.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert guard_command(str(script), None, python, outside) == (
        f". {script.parent / 'activate'}",
        "guard",
    )
    assert guard_command("guard", None, python, script.parent) == (". ./activate", "guard")


def test_full_path_when_there_is_no_activate(tmp_path):
    script = make_script(tmp_path / "my tools" / "bin", activate=False)

    first, command = guard_command(str(script), None, str(script.parent / "python"), tmp_path)

    assert first is None
    assert command == "'my tools/bin/guard'"  # quoted: the shell would split it


def test_python_m_uses_the_guard_next_to_the_interpreter(tmp_path):
    script = make_script(tmp_path / "venv" / "bin", activate=True)
    python = str(script.parent / "python")
    main_py = "/src/guard/cli/main.py"

    assert guard_command(main_py, None, python, tmp_path) == (". venv/bin/activate", "guard")
    assert guard_command(main_py, str(script), python, tmp_path) == (None, "guard")
    # No guard script anywhere to point at: the plain command, as before.
    assert guard_command(main_py, None, str(tmp_path / "python"), tmp_path) == (None, "guard")
