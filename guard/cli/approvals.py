"""What `guard approve`, `guard deny` and `guard requests` share: the broker call with its
errors said for approvals, and how requests look (tables, the full view, the outcome).

Imported when one of those commands runs (it imports rich, httpx and pydantic through
`cli.client`), never when `guard` starts. Statements are printed as the broker sends them:
normalized, literals replaced by $n, so no typed value reaches a reviewer's screen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TypeVar

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from guard.broker.api.schemas import ApprovalInfo
from guard.cli.client import BrokerClient, BrokerError, of_caller
from guard.cli.errors import CliError
from guard.cli.show import aware as _aware
from guard.cli.show import span, until

T = TypeVar("T")
STATEMENT_WIDTH = 60
_STATE_STYLE = {
    "pending": "yellow",
    "approved": "green",
    "denied": "red",
    "expired": "dim",
    "withdrawn": "dim",
}
LIST_HINT = "`guard approve` lists the requests you can decide, `guard requests` your own"


# ---------------------------------------------------------------- calling the broker
@contextmanager
def broker() -> Iterator[BrokerClient]:
    """A client of the profile's broker, with the caller's ID token."""
    with of_caller() as client:
        yield client


def call(
    action: Callable[[], T], *, request_id: str | None = None, groups: Iterable[str] = ()
) -> T:
    """`action()`, with the broker's 403/404/409 said in terms of approval requests."""
    try:
        return action()
    except BrokerError as err:
        raise explain(err, request_id=request_id, groups=groups) from err


def explain(err: BrokerError, *, request_id: str | None, groups: Iterable[str] = ()) -> CliError:
    message = " ".join(err.message.split())  # one line, whatever the broker sent
    if err.status == 404 and request_id is not None:
        return CliError(f"no such request: {request_id}", hint=LIST_HINT)
    if err.status == 403:
        return CliError(message, hint=ask_others(groups) if groups else err.hint or ask_others())
    if err.status == 409:
        return CliError(message, hint=err.hint or "it can no longer be decided; " + LIST_HINT)
    return CliError(message, hint=err.hint, exit_code=err.exit_code)


def ask_others(groups: Iterable[str] = ()) -> str:
    names = ", ".join(sorted(groups))
    if not names:
        return "ask another member of the request's approver groups (not the requester)"
    return f"ask another member of {names} to decide it"


# ---------------------------------------------------------------- words and numbers
def age(info: ApprovalInfo, at: datetime) -> str:
    return span((at - _aware(info.created_at)).total_seconds())


def expires_in(info: ApprovalInfo, at: datetime) -> str:
    return until(info.expires_at, at) if info.state == "pending" else "-"


def approvers(info: ApprovalInfo) -> list[str]:
    """Who approved so far, each person once."""
    return list(dict.fromkeys(v.approver for v in info.votes if v.approve))


def tally(info: ApprovalInfo) -> str:
    return f"{len(approvers(info))}/{info.approvals_required}"


def shorten(statement: str, width: int = STATEMENT_WIDTH) -> str:
    flat = " ".join(statement.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def state_text(info: ApprovalInfo) -> Text:
    text = Text(info.state, style=_STATE_STYLE.get(info.state, ""))
    if info.state_reason:
        text.append(f" ({info.state_reason})", style="dim")
    return text


# ---------------------------------------------------------------- output
def as_json(infos: Iterable[ApprovalInfo]) -> list[dict[str, object]]:
    return [info.model_dump(mode="json") for info in infos]


def pending_table(infos: list[ApprovalInfo], at: datetime) -> Table:
    """Requests waiting for the caller: what each would run and how far it has got."""
    who = ("requester", lambda info: Text(info.requester))
    return _requests_table("Requests you can decide", infos, at, who)


def own_table(infos: list[ApprovalInfo], at: datetime) -> Table:
    """The caller's requests and where each stands."""
    return _requests_table("Your requests", infos, at, ("state", state_text))


def _requests_table(
    title: str,
    infos: list[ApprovalInfo],
    at: datetime,
    first: tuple[str, Callable[[ApprovalInfo], Text]],
) -> Table:
    """One row per request: id, `first` (who asked, or the state), target, rule, the
    statement, its age, approvals so far and the time left."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True, style="bold")
    for name in (first[0], "target", "rule"):
        table.add_column(name)
    table.add_column("statement", min_width=24)
    for name in ("age", "approvals", "expires in"):
        table.add_column(name, justify="right", no_wrap=True)
    for info in infos:
        table.add_row(
            Text(info.id),
            first[1](info),
            Text(info.target),
            Text(info.rule),
            Text(shorten(info.statement)),
            age(info, at),
            tally(info),
            expires_in(info, at),
        )
    return table


def _groups(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"


def detail(info: ApprovalInfo, at: datetime) -> RenderableType:
    """One request in full, as a reviewer needs it to decide."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    if info.kind == "unmasked":
        scope = "the whole session: it reads the protected columns of these tables raw"
    elif info.window_seconds:
        scope = f"rule {info.rule}'s statements in that session for {span(info.window_seconds)}"
    else:
        scope = "this one statement (same text, same parameters)"
    rows: list[tuple[str, Text]] = [
        ("request", Text(info.id)),
        ("state", state_text(info)),
        ("requester", Text(f"{info.requester} ({_groups(info.requester_groups)})")),
        ("target", Text(info.target)),
        ("session", Text(info.session_id)),
        ("session reason", Text(info.session_reason or "(none given)")),
        ("tables", Text(", ".join(info.tables) or "-")),
        ("rule", Text(info.rule)),
        ("approver groups", Text(_groups(info.approver_groups))),
        ("approvals", Text(f"{len(approvers(info))} of {info.approvals_required} so far")),
        ("approval covers", Text(scope)),
        ("age", Text(age(info, at))),
        ("expires in", Text(expires_in(info, at))),
    ]
    for label, value in rows:
        grid.add_row(label, value)
    parts: list[RenderableType] = [grid, Text("statement", style="bold"), _indented(info.statement)]
    parts.append(_votes(info))
    if not info.can_decide and info.why_not:
        parts.append(Text(f"you cannot decide it: {info.why_not}", style="yellow"))
    return Group(*parts)


def _indented(statement: str) -> Text:
    return Text("\n".join("  " + line for line in statement.strip().splitlines()), style="cyan")


def _votes(info: ApprovalInfo) -> RenderableType:
    if not info.votes:
        return Text("votes: none yet", style="dim")
    table = Table(title="votes", title_justify="left", show_edge=False)
    for name in ("who", "groups", "decision", "comment", "when"):
        table.add_column(name)
    for vote in info.votes:
        table.add_row(
            Text(vote.approver),
            Text(_groups(vote.approver_groups)),
            Text("approve", style="green") if vote.approve else Text("deny", style="red"),
            Text(vote.comment),
            _aware(vote.at).strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
    return table


def outcome(info: ApprovalInfo) -> Text:
    """One line saying where a request stands after a decision."""
    if info.state == "approved":
        now = (
            "the session reads unmasked now"
            if info.kind == "unmasked"
            else "the held statement runs now"
        )
        what = f"approved request {info.id} ({tally(info)}): {now}"
        if info.window_seconds:
            what += (
                f"; rule {info.rule} is approved in that session for {span(info.window_seconds)}"
            )
        return Text(what, style="green")
    if info.state == "pending":
        missing = info.approvals_required - len(approvers(info))
        return Text(
            f"approval recorded for request {info.id} ({tally(info)}): waiting for {missing} "
            f"more from {_groups(info.approver_groups)}",
            style="yellow",
        )
    text = Text(f"request {info.id} is {info.state}", style=_STATE_STYLE.get(info.state, ""))
    if info.state_reason:
        text.append(f": {info.state_reason}")
    return text
