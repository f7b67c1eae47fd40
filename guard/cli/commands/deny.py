"""`guard deny ID --reason TEXT`: deny a request; the requester sees who denied it and why.

The reason is required (a denial without one is a usage error). Imported when `guard`
starts: httpx, rich and pydantic are imported when it runs.
"""

from __future__ import annotations

import click

from guard.cli import console, show
from guard.cli.errors import EXIT_USAGE, CliError
from guard.cli.usage import GuardCommand


@click.command("deny", cls=GuardCommand, help="Deny request ID, saying why.")
@click.argument("request_id", metavar="ID", help="Request to deny")
@click.option("--reason", required=True, help="Why (the requester sees it; recorded)")
@click.option("--json", "as_json", is_flag=True, help="Print the request as JSON")
def deny(request_id: str, reason: str, as_json: bool) -> int:
    if not reason.strip():
        raise CliError(
            "the reason is empty",
            hint=f'guard deny {request_id} --reason "why the statement must not run"',
            exit_code=EXIT_USAGE,
        )
    from guard.cli import approvals

    with approvals.broker() as client:
        decided = approvals.call(
            lambda: client.decide(request_id, approve=False, comment=reason),
            request_id=request_id,
        )
    if as_json:
        show.print_json(decided.model_dump(mode="json"))
    else:
        console.stdout().print(approvals.outcome(decided))
    return 0
