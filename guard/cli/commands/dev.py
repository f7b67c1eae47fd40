"""`guard dev up|down|status|login|token`: the local demo stack (see `guard.devstack.stack`)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from guard.cli.errors import CliError
from guard.cli.profile import Profile, dev_state_dir, save_profile

_out = Console()
_err = Console(stderr=True)

SHOWN = (
    "broker_url",
    "gateway",
    "issuer",
    "openbao_addr",
    "upstream_dsn",
    "state_dir",
    "audit_log",
)


def _print_status(status: dict) -> None:
    table = Table(title="guard dev stack", show_header=False)
    table.add_row("running", "[green]yes[/green]" if status.get("running") else "[red]no[/red]")
    for key in SHOWN:
        if key in status:
            table.add_row(key, str(status[key]))
    _out.print(table)


def up(
    detach: Annotated[bool, typer.Option("--detach", help="Return once the stack is up")] = False,
    policy: Annotated[
        Path | None, typer.Option(help="Policy file (default: ./policies.yaml)")
    ] = None,
) -> int:
    from guard.devstack.stack import StackError
    from guard.devstack.stack import down as stack_down
    from guard.devstack.stack import up as stack_up

    state = dev_state_dir()
    try:
        status = stack_up(state, policy, lambda step: _err.print(f"[dim]starting {step}…[/dim]"))
    except StackError as exc:
        raise CliError(str(exc), hint=exc.hint) from exc
    except Exception as exc:
        raise CliError(
            f"guard dev up failed: {exc}",
            hint=f"see the logs in {state / 'logs'}; `guard dev down` cleans up",
        ) from exc
    save_profile(
        Profile(
            broker_url=status["broker_url"],
            issuer=status["issuer"],
            gateway_ca_file=status["gateway_ca"],
        )
    )
    _print_status(status)
    _err.print("next: [bold]guard dev login alice[/bold], then [bold]guard connect demo[/bold]")
    if detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _err.print("[dim]press Ctrl-C to stop the stack[/dim]")
    stop.wait()
    stack_down(state)
    return 0


def down() -> int:
    from guard.devstack.stack import down as stack_down

    if stack_down(dev_state_dir()):
        _err.print("dev stack stopped")
    else:
        _err.print("no dev stack recorded")
    return 0


def status(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
) -> int:
    from guard.devstack.stack import read_status

    data = read_status(dev_state_dir())
    if data is None:
        raise CliError("no dev stack has been started", hint="run `guard dev up`")
    if json_output:
        print(json.dumps(data, indent=2))
    else:
        _print_status(data)
    return 0 if data.get("running") else 1


def register(app: typer.Typer) -> None:
    from guard.cli.commands import dev_login

    dev_app = typer.Typer(
        help="Local demo stack (PostgreSQL, OpenBao, dev IdP, broker).", no_args_is_help=True
    )
    dev_app.command("up", help="Start the demo stack on 127.0.0.1.")(up)
    dev_app.command("down", help="Stop everything `guard dev up` started.")(down)
    dev_app.command("status", help="Where the demo stack runs.")(status)
    dev_login.register(dev_app)
    app.add_typer(dev_app, name="dev")
