"""`guard dev up|down|status|login|token`: the local demo stack (see `guard.devstack.stack`).

`login`/`token` live in `cli.commands.dev_login`; this module adds them to the `dev` group.
The stack and rich are imported when a command runs, not when `guard` starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from guard.cli import console
from guard.cli.commands.dev_login import dev_login, dev_token
from guard.cli.errors import CliError
from guard.cli.profile import dev_state_dir
from guard.cli.usage import GuardGroup

SHOWN = (
    "broker_url",
    "gateway",
    "gateway_ca",
    "issuer",
    "openbao_addr",
    "upstream_dsn",
    "state_dir",
    "audit_log",
    "policy_file",
)


@click.group(
    "dev",
    cls=GuardGroup,
    help="Local demo stack (PostgreSQL, OpenBao, dev IdP, broker) on 127.0.0.1.",
    no_args_is_help=True,
)
def dev() -> None:
    pass


def _hide_password(dsn: str) -> str:
    return re.sub(r"password=\S+", "password=***", dsn)


def _escape(text: str) -> str:
    """`text` shown as is by rich (a path may hold `[`)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _print_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="guard dev stack", show_header=False)
    table.add_row("running", "[green]yes[/green]" if status.get("running") else "[red]no[/red]")
    for key in SHOWN:
        if key in status:
            value = str(status[key])
            if key == "upstream_dsn":
                value = _hide_password(value) + "  [dim](full: guard dev status --json)[/dim]"
            table.add_row(key, value)
    pids = status.get("pids") or {}
    if pids:
        table.add_row("pids", ", ".join(f"{name} {pid}" for name, pid in pids.items()))
    if "up_seconds" in status and status.get("running"):
        table.add_row("started in", f"{status['up_seconds']} s")
    console.stdout().print(table)


def _as_cli_error(exc: Exception, state: Path) -> CliError:
    from guard.devstack.stack import StackError

    if isinstance(exc, StackError):
        return CliError(str(exc), hint=exc.hint)
    return CliError(
        f"guard dev up failed: {exc}",
        hint=f"see the logs in {state / 'logs'}; `guard dev down` cleans up",
    )


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@dev.command("up", help="Start the demo stack on 127.0.0.1.")
@click.option("--detach", is_flag=True, help="Return once the stack is up; stop it with `down`.")
@click.option(
    "--policy",
    type=click.Path(path_type=Path),
    help="Policy file (default: ./policies.yaml, else the bundled demo policy).",
)
def up(detach: bool, policy: Path | None) -> int:
    import signal

    from guard.devstack import stack

    state = dev_state_dir()
    # SIGTERM while starting tears down what was started, like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        status = stack.up(
            state, policy, lambda step: console.stderr().print(f"[dim]starting {step}…[/dim]")
        )
    except stack.AlreadyRunning as running:
        # Not this process's stack: report it and leave it be, in foreground mode too.
        console.stderr().print(
            f"the dev stack was already up (in {_escape(str(state))}); `guard dev down` stops it",
            soft_wrap=True,
        )
        _print_status(running.status)
        _print_next()
        return 0
    except Exception as exc:
        raise _as_cli_error(exc, state) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_status(status)
    _print_next()
    if detach:
        return 0
    return _serve_until_stopped(state)


def guard_command(
    argv0: str, on_path: str | None, executable: str, cwd: Path
) -> tuple[str | None, str]:
    """How to type `guard` in the user's shell: (a line to run first or None, the command).

    `guard` when the program on PATH is the one running; else the venv's `activate` line
    when the running script has one next to it (`. .venv/bin/activate`), else the script's
    full path. The running script is `argv0` when that names a `guard` script, else the
    `guard` next to the interpreter (`python -m guard.cli.main`)."""
    script = cwd / argv0
    if script.name != "guard" or not script.is_file():
        script = Path(executable).parent / "guard"
        if not script.is_file():
            return None, "guard"  # no script to point at: nothing better to say
    if on_path and Path(on_path).resolve() == script.resolve():
        return None, "guard"
    activate = script.parent / "activate"
    if activate.is_file():
        return f". {_shown_path(activate, cwd)}", "guard"
    return None, _shown_path(script, cwd)


def _shown_path(path: Path, cwd: Path) -> str:
    """`path` as the user types it: relative when under `cwd` (with a slash, so `.` and the
    shell do not search PATH), else absolute; quoted for the shell."""
    import os
    import shlex

    absolute = Path(os.path.normpath(cwd / path))
    try:
        text = str(absolute.relative_to(cwd))
    except ValueError:
        text = str(absolute)
    else:
        text = text if os.sep in text else f".{os.sep}{text}"
    return shlex.quote(text)


def _print_next() -> None:
    import os
    import shutil
    import sys

    first, guard = guard_command(
        sys.argv[0], shutil.which("guard"), sys.executable, Path(os.getcwd())
    )
    steps = [f"{guard} dev login alice", f"{guard} connect demo"]
    text = ", then ".join(f"[bold]{_escape(step)}[/bold]" for step in steps)
    if first is not None:
        text = f"[bold]{_escape(first)}[/bold] (puts guard on PATH), then {text}"
    console.stderr().print(f"next: {text}", soft_wrap=True)


def _serve_until_stopped(state: Path) -> int:
    """Foreground mode: wait for Ctrl-C/SIGTERM (or a dead process), then tear down."""
    import signal
    import threading
    import time

    from guard.devstack import stack

    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    console.stderr().print("[dim]press Ctrl-C to stop the stack[/dim]")
    code = 0
    try:
        while not stop.wait(1.0):
            current = stack.read_status(state)
            if current is None or current.get("stopped"):
                console.stderr().print("the dev stack was stopped elsewhere (`guard dev down`)")
                return 0
            if not current.get("running"):
                dead = [
                    name
                    for name, pid in current.get("pids", {}).items()
                    if not stack.alive(pid, current.get("pid_starts", {}).get(name))
                ]
                console.stderr().print(
                    f"[red]{', '.join(dead)} exited[/red]; see {state / 'logs'}; stopping the rest"
                )
                code = 1
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.stderr().print("[dim]stopping…[/dim]")
    started = time.monotonic()
    stack.down(state)
    console.stderr().print(f"dev stack stopped ({time.monotonic() - started:.1f} s)")
    return code


@dev.command("down", help="Stop everything `guard dev up` started.")
def down() -> int:
    from guard.devstack import stack

    try:
        stopped = stack.down(dev_state_dir())
    except stack.StackError as exc:
        raise CliError(str(exc), hint=exc.hint) from exc
    console.stderr().print("dev stack stopped" if stopped else "no dev stack recorded")
    return 0


@dev.command("status", help="Where the demo stack runs (exit 1 if it is not running).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def status(json_output: bool) -> int:
    from guard.devstack import stack

    try:
        data = stack.read_status(dev_state_dir())
    except stack.StackError as exc:
        raise CliError(str(exc), hint=exc.hint) from exc
    if data is None:
        raise CliError("no dev stack has been started", hint="run `guard dev up`")
    if json_output:
        print(json.dumps(data, indent=2))
    else:
        _print_status(data)
    return 0 if data.get("running") else 1


dev.add_command(dev_login)
dev.add_command(dev_token)
