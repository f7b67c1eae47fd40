"""`guard approve [ID]`: the requests a reviewer can decide, and approving one.

Without an ID: the pending requests the caller may decide (a table, `--json`, or `--watch`
to keep it current). With an ID: the request in full, a confirmation on a terminal (not
with `--yes`, nor when stdin is not a terminal), then the approval and the request's new
state. Imported when `guard` starts: httpx, rich and pydantic are imported when it runs.
"""

from __future__ import annotations

import sys

import click

from guard.cli import console, show
from guard.cli.errors import EXIT_USAGE, CliError
from guard.cli.usage import GuardCommand

WATCH_SECONDS = 2.0
_PASSING = (None, 502, 503, 504)  # the broker unreachable or restarting: --watch retries


@click.command(
    "approve",
    cls=GuardCommand,
    help="List the requests you can decide, or show one (ID) and approve it.",
)
@click.argument(
    "request_id", metavar="[ID]", required=False, help="Request to approve (none: list them)"
)
@click.option("--comment", default="", help="Comment recorded with your approval")
@click.option("--yes", "-y", is_flag=True, help="Approve without asking")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@click.option("--watch", is_flag=True, help="Keep the list current until Ctrl-C")
def approve(request_id: str | None, comment: str, yes: bool, as_json: bool, watch: bool) -> int:
    if request_id is None:
        if comment or yes:
            raise CliError(
                "--comment and --yes need a request ID",
                hint="guard approve ID --comment TEXT (`guard approve` lists the IDs)",
                exit_code=EXIT_USAGE,
            )
        if watch and as_json:
            raise CliError(
                "--watch and --json cannot be combined",
                hint="guard approve --watch (a live table), or guard approve --json",
                exit_code=EXIT_USAGE,
            )
        return _watch() if watch else _list(as_json)
    if watch:
        raise CliError(
            "--watch lists requests; it takes no request ID",
            hint=f"guard approve --watch, or guard approve {request_id}",
            exit_code=EXIT_USAGE,
        )
    if not request_id.strip():
        raise CliError(
            "the request ID is empty", hint="`guard approve` lists the IDs", exit_code=EXIT_USAGE
        )
    return _approve(request_id, comment=comment, yes=yes, as_json=as_json)


def _list(as_json: bool) -> int:
    from guard.cli import approvals

    with approvals.broker() as client:
        infos = approvals.call(client.pending_approvals)
    if as_json:
        show.print_json(approvals.as_json(infos))
    elif not infos:
        console.stderr().print("no pending requests that you can decide")
    else:
        console.stdout().print(approvals.pending_table(infos, show.now()))
    return 0


def _watch() -> int:
    import time

    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from guard.cli import approvals
    from guard.cli.client import BrokerError

    def frame(client) -> Group:
        at = show.now()
        stamp = f"updated {at.astimezone().strftime('%H:%M:%S')} · every 2 s · Ctrl-C to stop"
        try:
            infos = client.pending_approvals()
        except BrokerError as err:
            if err.status not in _PASSING:
                raise approvals.explain(err, request_id=None) from err  # waiting won't fix it
            return Group(Text(f"error: {err.message} (retrying)", style="red"), Text(stamp))
        if not infos:
            return Group(Text("no pending requests that you can decide"), Text(stamp, style="dim"))
        return Group(approvals.pending_table(infos, at), Text(stamp, style="dim"))

    with approvals.broker() as client:
        try:
            with Live(frame(client), console=console.stdout(), auto_refresh=False) as live:
                while True:
                    time.sleep(WATCH_SECONDS)
                    live.update(frame(client), refresh=True)
        except KeyboardInterrupt:
            return 0


def _approve(request_id: str, *, comment: str, yes: bool, as_json: bool) -> int:
    from guard.cli import approvals

    # With --json, stdout holds only the JSON: the request is shown on stderr.
    screen = console.stderr() if as_json else console.stdout()
    with approvals.broker() as client:
        info = approvals.call(lambda: client.approval(request_id), request_id=request_id)
        screen.print(approvals.detail(info, show.now()))
        if info.state != "pending":
            raise CliError(
                f"request {request_id} is {info.state}"
                + (f": {info.state_reason}" if info.state_reason else "")
                + "; it can no longer be decided",
                hint=approvals.LIST_HINT,
            )
        if not info.can_decide and info.why_not:  # the broker would refuse it (403)
            why = " ".join(info.why_not.split())
            raise CliError(why, hint=approvals.ask_others(info.approver_groups))
        if not yes and sys.stdin.isatty() and not _confirm(request_id):
            raise CliError(f"request {request_id} was not approved", hint="answer y, or pass --yes")
        decided = approvals.call(
            lambda: client.decide(request_id, approve=True, comment=comment),
            request_id=request_id,
            groups=info.approver_groups,
        )
    if as_json:
        show.print_json(decided.model_dump(mode="json"))
    else:
        console.stdout().print(approvals.outcome(decided))
    return 0


def _confirm(request_id: str) -> bool:
    return click.confirm(f"Approve request {request_id}?", default=False, err=True)
