"""`guard target check | plan | apply TARGET`: a target's database backstop (the masking
views, their twins, the session group's rights) against the policy and the live catalog,
through the broker (which holds the target's admin connection and records every apply).
For the broker's auditor groups.

Imported when `guard` starts: the broker client is imported when a command runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from guard.cli import show
from guard.cli.usage import GuardCommand, GuardGroup

if TYPE_CHECKING:
    from guard.broker.api.schemas import BackstopReport
    from guard.cli.client import BrokerClient

APPLY_HINT = "`guard target apply {target}` restores it (recorded in the audit log)"


@click.group(
    "target", cls=GuardGroup, help="A target's database backstop (auditors).", no_args_is_help=True
)
def target() -> None:
    pass


def _report(call: Callable[[BrokerClient], BackstopReport]) -> BackstopReport:
    """The broker's report, by `call` on a client that speaks for the caller."""
    from guard.cli.client import of_caller

    with of_caller() as client:
        return call(client)


def _json(report: BackstopReport, code: int) -> int:
    show.print_json(report.model_dump(mode="json"))
    return code


def _drift_lines(target_name: str, drift: list[str]) -> int:
    if not drift:
        print(f"{target_name}: the database backstop is in place")
        return 0
    print(f"{target_name}: the database backstop has drifted ({len(drift)}):")
    for line in drift:
        print(f"  {line}")
    return 1


@target.command("check", cls=GuardCommand, help="Check the backstop as sessions see it.")
@click.argument("target_name", metavar="TARGET")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def check(target_name: str, as_json: bool) -> int:
    report = _report(lambda client: client.backstop(target_name))
    if as_json:
        return _json(report, 1 if report.drift else 0)
    code = _drift_lines(target_name, report.drift)
    if code:
        print(APPLY_HINT.format(target=target_name))
    return code


@target.command(
    "plan", cls=GuardCommand, help="What an apply would change, its SQL, and the drift."
)
@click.argument("target_name", metavar="TARGET")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def plan(target_name: str, as_json: bool) -> int:
    report = _report(lambda client: client.backstop(target_name, plan=True))
    if as_json:
        return _json(report, 0)
    print(f"-- guard target plan {target_name}: run in one transaction by `guard target apply`")
    for statement in report.statements or []:
        # The changes come first, as comments; then the statements, each ended.
        print(statement if statement.startswith("-- ") else statement.rstrip() + ";")
    print("--")
    for line in report.drift or ["(no drift: the backstop is in place)"]:
        print(f"-- drift: {line}")
    return 0


@target.command("apply", cls=GuardCommand, help="Create or restore the backstop (recorded).")
@click.argument("target_name", metavar="TARGET")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def apply(target_name: str, as_json: bool) -> int:
    report = _report(lambda client: client.apply_backstop(target_name))
    if as_json:
        return _json(report, 1 if report.drift else 0)
    print(f"{target_name}: applied {len(report.statements or [])} statements in one transaction")
    return _drift_lines(target_name, report.drift)
