"""`guard target check | plan | apply TARGET`: a target's database backstop (the masking
views, their twins, the session group's rights) against the policy and the live catalog,
through the broker (which holds the target's admin connection and records every apply).
For the broker's auditor groups.

Imported when `guard` starts: the broker client is imported when a command runs.
"""

from __future__ import annotations

import click

from guard.cli import show
from guard.cli.usage import GuardCommand, GuardGroup

APPLY_HINT = "`guard target apply {target}` restores it (recorded in the audit log)"


@click.group(
    "target", cls=GuardGroup, help="A target's database backstop (auditors).", no_args_is_help=True
)
def target() -> None:
    pass


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
    from guard.cli.client import of_caller

    with of_caller() as client:
        report = client.backstop(target_name)
    if as_json:
        show.print_json(report.model_dump(mode="json"))
        return 1 if report.drift else 0
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
    from guard.cli.client import of_caller

    with of_caller() as client:
        report = client.backstop(target_name, plan=True)
    if as_json:
        show.print_json(report.model_dump(mode="json"))
        return 0
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
    from guard.cli.client import of_caller

    with of_caller() as client:
        report = client.apply_backstop(target_name)
    if as_json:
        show.print_json(report.model_dump(mode="json"))
        return 1 if report.drift else 0
    print(f"{target_name}: applied {len(report.statements or [])} statements in one transaction")
    return _drift_lines(target_name, report.drift)
