"""`guard status`, `guard targets`, `guard sessions`, `guard extend`, `guard end` and
`guard revoke`: who you are to the broker, where you may go, which sessions are open, and
making them last longer or end.

Imported when `guard` starts: rich, pydantic and the broker client are imported when a
command runs. Every command that lists or shows something takes `--json` (stdout then
holds only the JSON).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from guard.cli import console, show
from guard.cli.errors import EXIT_USAGE, CliError
from guard.cli.options import duration
from guard.cli.usage import GuardCommand

if TYPE_CHECKING:
    from rich.table import Table

    from guard.broker.api.schemas import SessionInfo
    from guard.cli.client import BrokerError

SESSIONS_HINT = "`guard sessions` lists yours"


@click.command("status", cls=GuardCommand, help="Who you are to the broker, and your sessions.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def status(as_json: bool) -> int:
    from guard.cli.auth import current_id_token, per_call_token, seconds_left
    from guard.cli.client import BrokerClient
    from guard.cli.profile import load_profile

    profile = load_profile()
    token = current_id_token(profile)
    fresh = per_call_token(profile)
    with BrokerClient(profile.broker_url, token, fresh_token=fresh) as client:
        me = client.whoami()
        mine = client.sessions()
    left = seconds_left(token)
    if as_json:
        show.print_json(
            {
                **me.model_dump(mode="json"),
                "broker_url": profile.broker_url,
                "token_expires_in_seconds": int(left),
                "sessions": [s.model_dump(mode="json") for s in mine],
            }
        )
        return 0
    # Plain lines, as written: names and groups come from the IdP (no markup), and a URL
    # is not wrapped.
    name = me.principal if me.principal == me.subject else f"{me.principal} ({me.subject})"
    if me.kind == "workload":
        print(f"CI job {name}, admitted by the trusted issuer {me.via} ({me.issuer})")
    else:
        print(f"logged in as {name} at {me.issuer}")
    print(f"groups: {', '.join(me.groups) or '(none)'}" + (" · auditor" if me.auditor else ""))
    print(f"ID token valid for {show.span(left)}" if left > 0 else "ID token expired")
    print(f"broker: {profile.broker_url}")
    if mine:
        console.stdout().print(_sessions_table(mine, "Your sessions", every=False))
    else:
        print("no open sessions")
    return 0


@click.command("targets", cls=GuardCommand, help="The targets you may open a session on.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def targets(as_json: bool) -> int:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from guard.cli.client import of_caller

    with of_caller() as client:
        infos = client.targets()
    if as_json:
        show.print_json([t.model_dump(mode="json") for t in infos])
        return 0
    table = Table(title="Targets", title_justify="left", box=box.SIMPLE_HEAD)
    unmasked = any(t.unmasked for t in infos)  # the column only where someone may ask
    columns = ["target", "you may connect", "default TTL", "max TTL", "why not"]
    for column in columns[:4] + (["unmasked (--unmasked)"] if unmasked else []) + columns[4:]:
        table.add_column(column)
    for t in infos:
        cells = [
            Text(t.name),
            Text("yes") if t.allowed else Text("no", style="red"),
            show.span(t.default_ttl_seconds),
            show.span(t.max_ttl_seconds),
        ]
        if unmasked:
            cells.append(Text(t.unmasked))
        table.add_row(*cells, Text((t.why_not or "").removeprefix("guard: ")))
    console.stdout().print(table)
    return 0


@click.command("sessions", cls=GuardCommand, help="Your open sessions (--all: everyone's).")
@click.option("--all", "every", is_flag=True, help="Every session (auditor groups only)")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def sessions(every: bool, as_json: bool) -> int:
    from guard.cli.client import BrokerError, of_caller

    with of_caller() as client:
        try:
            infos = client.sessions(every=every)
        except BrokerError as err:
            raise _said(err) from err
    if as_json:
        show.print_json([s.model_dump(mode="json") for s in infos])
    elif not infos:
        _say("no open sessions" if every else "you have no open sessions")
    else:
        title = "Open sessions" if every else "Your sessions"
        console.stdout().print(_sessions_table(infos, title, every=every))
    return 0


@click.command(
    "extend", cls=GuardCommand, help="Make one of your sessions last longer (up to its maximum)."
)
@click.argument("session_id", metavar="SESSION", help="Session ID, from `guard sessions`")
@click.option(
    "--ttl",
    type=duration,
    metavar="DURATION",
    help="From now, e.g. 30m, 1h (default: the target's)",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def extend(session_id: str, ttl: int | None, as_json: bool) -> int:
    from guard.cli.client import BrokerError, of_caller

    with of_caller() as client:
        try:
            extended = client.extend(session_id, ttl)
        except BrokerError as err:
            if err.status == 404:
                raise CliError(
                    f"you have no open session {session_id}", hint=SESSIONS_HINT
                ) from err
            raise _said(err) from err
    if as_json:
        show.print_json(extended.model_dump(mode="json"))
        return 0
    ends = show.aware(extended.expires_at)
    line = (
        f"session {session_id} now ends at {ends:%H:%M:%S} UTC (in {show.until(ends, show.now())})"
    )
    _say(line + (f"; {extended.notice}" if extended.notice else ""))
    return 0


@click.command("end", cls=GuardCommand, help="End one of your sessions (ID from `guard sessions`).")
@click.argument("session_id", metavar="SESSION", help="Session ID, from `guard sessions`")
def end(session_id: str) -> int:
    from guard.cli.client import BrokerError, of_caller

    with of_caller() as client:
        if session_id not in {s.session_id for s in client.sessions()}:
            raise CliError(f"you have no open session {session_id}", hint=SESSIONS_HINT)
        try:
            client.end_session(session_id)
        except BrokerError as err:
            raise _said(err) from err
    _say(f"session {session_id} ended: its connections closed, its role revoked")
    return 0


@click.command(
    "revoke",
    cls=GuardCommand,
    help="End every session matching SESSION, --user and --target (auditor groups only).",
)
@click.argument("session_id", metavar="[SESSION]", required=False, help="Session ID")
@click.option(
    "--user", "subject", metavar="USER", help="The sessions of this user (subject or name)"
)
@click.option("--target", help="The sessions on this target")
@click.option("--reason", required=True, help="Why (recorded in the audit log)")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def revoke(
    session_id: str | None, subject: str | None, target: str | None, reason: str, as_json: bool
) -> int:
    if session_id is None and subject is None and target is None:
        raise CliError(
            "nothing to revoke: name a session, a user or a target",
            hint="guard revoke SESSION | --user USER | --target TARGET --reason WHY",
            exit_code=EXIT_USAGE,
        )
    if not reason.strip():
        raise CliError("an empty --reason", hint="say why: it is recorded", exit_code=EXIT_USAGE)
    from guard.cli.client import BrokerError, of_caller

    with of_caller() as client:
        try:
            ended = client.revoke(
                reason=reason, session_id=session_id, subject=subject, target=target
            )
        except BrokerError as err:
            raise _said(err) from err
    if as_json:
        show.print_json({"revoked": ended})
    elif ended:
        _say(f"revoked {len(ended)} session(s): {', '.join(ended)}")
    else:
        _say("no open session matched: nothing revoked")
    return 0


def _say(line: str) -> None:
    """One line on stderr, as written: not wrapped to the terminal, no markup (it may
    hold names and reasons from the broker)."""
    print(line, file=sys.stderr)


def _said(err: BrokerError) -> CliError:
    """A broker error, in one line, with the broker's hint (403: who may)."""
    return CliError(" ".join(err.message.split()), hint=err.hint, exit_code=err.exit_code)


def _unmask_cell(info: SessionInfo) -> str:
    if info.unmask_state == "granted":
        return "yes"
    if info.unmask_state == "pending":
        return f"asked ({info.unmask_request})"
    return f"no ({info.unmask_state})" if info.unmask_state else ""


def _sessions_table(infos: list[SessionInfo], title: str, *, every: bool) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    at = show.now()
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("session", no_wrap=True, style="bold")
    columns: list[tuple[str, Any]] = [("target", lambda s: s.target)]
    if every:
        columns.append(("user", lambda s: s.principal))
    columns += [
        ("expires in", lambda s: show.until(s.expires_at, at)),
        ("connections", lambda s: str(s.connections)),
        ("reason", lambda s: s.reason),
    ]
    if any(s.unmask_state for s in infos):
        # Who reads protected columns raw (or is waiting to): a security lead looks here.
        columns.append(("unmasked", lambda s: _unmask_cell(s)))
    for name, _ in columns:
        table.add_column(name)
    for s in infos:
        table.add_row(Text(s.session_id), *(Text(cell(s)) for _, cell in columns))
    return table
