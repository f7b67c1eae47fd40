"""`guard requests`: the caller's own approval requests, newest first, and their state.

Imported when `guard` starts: httpx, rich and pydantic are imported when it runs.
"""

from __future__ import annotations

import click

from guard.cli import console, show
from guard.cli.usage import GuardCommand


@click.command("requests", cls=GuardCommand, help="Your approval requests and their state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def requests(as_json: bool) -> int:
    from guard.cli import approvals

    with approvals.broker() as client:
        infos = approvals.call(client.my_requests)
    if as_json:
        show.print_json(approvals.as_json(infos))
    elif not infos:
        console.stderr().print("you have no approval requests")
    else:
        console.stdout().print(approvals.own_table(infos, show.now()))
    return 0
