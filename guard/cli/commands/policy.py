"""`guard policy check [FILE]`: validate a policies.yaml and report errors with YAML paths.
`guard policy explain (--as USER | --groups G1,G2) --db TARGET "SQL"`: the verdict on SQL,
the deciding rule, the reasons and, for `require_approval`, who can approve.

Imports the pure `guard.broker.policy` package (no I/O besides reading FILE): validation
must work offline, without a broker, e.g. in a pre-commit hook; `explain` evaluates with the
same engine as the gateway (`guard.broker.policy.explain`). `--as` reads the dev IdP's users
(`guard.devstack.idp`). The compiler, the dev stack and rich are imported when a command
runs, not when `guard` starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from guard.cli import console
from guard.cli.errors import EXIT_USAGE, CliError
from guard.cli.profile import dev_state_dir
from guard.cli.usage import GuardGroup


@click.group("policy", cls=GuardGroup, help="Policy tools.", no_args_is_help=True)
def policy() -> None:
    pass


@policy.command("check", help="Validate a policies.yaml.")
@click.argument(
    "file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("policies.yaml"),
    help="Policy file (default: policies.yaml)",
)
@click.option(
    "--target",
    "target_name",
    metavar="TARGET",
    help="Also check the names it protects against TARGET's live database (through the "
    "broker; auditor groups)",
)
def check(file: Path, target_name: str | None) -> int:
    from guard.broker.policy.compile import PolicyError, load_policy_file

    out = console.stdout()

    if not file.exists():
        raise CliError(f"{file}: no such file", hint="pass the path of your policies.yaml")
    try:
        policy = load_policy_file(file)
    except PolicyError as err:
        for problem in err.errors:
            out.print(
                f"[red]{file}[/red]: [bold]{problem.path}[/bold]: {problem.message}",
                highlight=False,
            )
        raise CliError(
            f"{file}: {len(err.errors)} problem(s)", hint="fix them and run again"
        ) from err
    out.print(
        f"[green]ok[/green] {file}: version {policy.version}, {len(policy.targets)} target(s), "
        f"{len(policy.rules)} rule(s)",
        highlight=False,
    )
    if target_name is None:
        return 0
    if target_name not in policy.targets:
        raise CliError(
            f"{file} has no target {target_name!r}",
            hint=f"its targets: {', '.join(sorted(policy.targets)) or 'none'}",
            exit_code=EXIT_USAGE,
        )
    from guard.cli.client import of_caller

    with of_caller() as client:
        problems = client.policy_catalog_check(target_name, file.read_text())
    if not problems:
        out.print(
            f"[green]ok[/green] every table and column {file} protects on {target_name} exists",
            highlight=False,
        )
        return 0
    for problem in problems:
        out.print(f"[red]{file}[/red]: {target_name}: {problem}", highlight=False)
    raise CliError(
        f"{file}: {len(problems)} name(s) not in {target_name}'s database",
        hint="a misspelt protected column leaves the real one unprotected: fix the names",
    )


def _default_policy() -> Path:
    """The running dev stack's policy file (what `guard dev status` shows), else
    ./policies.yaml."""
    from guard.devstack import stack

    try:
        status = stack.read_status(dev_state_dir())
    except stack.StackError:
        status = None
    if status and status.get("running") and status.get("policy_file"):
        return Path(status["policy_file"])
    return Path("policies.yaml")


def _load(file: Path):
    from guard.broker.policy.compile import PolicyError, load_policy_file

    if not file.is_file():
        raise CliError(
            f"{file}: no such file" if not file.exists() else f"{file}: not a file",
            hint="pass the policy with --policy FILE",
        )
    try:
        return load_policy_file(file)
    except PolicyError as err:
        first = err.errors[0]
        where = f"{first.path}: " if first.path else ""
        raise CliError(
            f"{file}: not a valid policy ({len(err.errors)} problem(s); first: "
            f"{where}{first.message})",
            hint=f"run `guard policy check {file}` to see every problem",
        ) from err


def _dev_user_groups(user: str) -> list[str]:
    from guard.devstack.idp import load_users

    users = load_users()
    if user not in users:
        raise CliError(
            f"the dev IdP has no user {user!r}",
            hint=f"dev IdP users: {', '.join(users)}; for a real IdP pass --groups G1,G2",
        )
    return list(users[user].get("groups") or [])


@policy.command("explain", help="What the policy decides on SQL for a user or groups, and why.")
@click.argument("sql", metavar="SQL", help="The SQL to explain (quoted)")
@click.option("--db", required=True, help="Target, as in the policy's `targets:`")
@click.option("--as", "as_user", metavar="USER", help="A dev IdP user, e.g. alice")
@click.option("--groups", metavar="G1,G2", help="Groups, comma-separated (any IdP)")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Policy file (default: the running dev stack's, else ./policies.yaml)",
)
@click.option(
    "--unmasked", is_flag=True, help="As an unmasked session (whether one may be had, too)"
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def explain(
    sql: str,
    db: str,
    as_user: str | None,
    groups: str | None,
    policy_file: Path | None,
    unmasked: bool,
    as_json: bool,
) -> int:
    if (as_user is None) == (groups is None):
        raise CliError(
            "pass exactly one of --as USER and --groups G1,G2",
            hint='guard policy explain --as alice --db demo "SELECT 1"',
            exit_code=EXIT_USAGE,
        )
    from guard.broker.policy.explain import ExplainError
    from guard.broker.policy.explain import explain as explain_sql

    file = policy_file or _default_policy()
    compiled = _load(file)
    if as_user is not None:
        member_of = _dev_user_groups(as_user)
    else:
        member_of = [g.strip() for g in (groups or "").split(",") if g.strip()]
    try:
        result = explain_sql(
            compiled, groups=member_of, target=db, sql=sql, user=as_user, unmasked=unmasked
        )
    except ExplainError as err:
        raise CliError(err.message, hint=err.hint) from err
    if as_json:
        print(json.dumps({"policy": str(file), **result.to_dict()}, indent=2, ensure_ascii=False))
    else:
        _print(file, compiled.targets[db].description, result)
    return 0


_COLOURS = {"allow": "green", "deny": "red", "require_approval": "yellow"}


def _print(file: Path, description: str, result: Any) -> None:
    from rich.markup import escape
    from rich.padding import Padding
    from rich.table import Table

    from guard.broker.policy.explain import window_text

    out = console.stdout()

    def grid() -> Table:
        table = Table.grid(padding=(0, 2, 0, 0))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        return table

    head = grid()
    groups = ", ".join(sorted(result.groups)) or "no groups"
    head.add_row("policy", escape(str(file)))
    head.add_row("target", escape(result.target + (f" — {description}" if description else "")))
    head.add_row("as", escape(f"{result.user} ({groups})" if result.user else groups))
    allowed = escape(", ".join(sorted(result.connect_groups)))
    head.add_row(
        "connect",
        f"[green]yes[/green] (connect_groups: {allowed})"
        if result.can_connect
        else f"[red]no[/red] (connect_groups: {allowed})",
    )
    if result.unmasked is not None:
        effect = result.unmasked.effect.value
        head.add_row(
            "unmasked",
            f"[{_COLOURS[effect]}]{effect}[/]: {escape(result.unmasked.message)}",
        )
    out.print(head, highlight=False)
    for number, item in enumerate(result.statements, 1):
        data = item.to_dict()
        out.print()
        out.print(f"[bold]statement {number}[/bold]: {escape(data['statement'])}", highlight=False)
        table = grid()
        effect = data["verdict"]
        table.add_row("verdict", f"[bold {_COLOURS[effect]}]{effect}[/]")
        for index, rule in enumerate(data["rules"]):
            text = rule["id"] + (f" — {rule['description']}" if rule["description"] else "")
            table.add_row("rule" if index == 0 else "", escape(text))
        table.add_row("message", escape(data["message"]))
        for index, reason in enumerate(data["reasons"]):
            table.add_row("reasons" if index == 0 else "", escape(reason))
        if data["masked_columns"]:
            masked = ", ".join(f"{m['column']} ({m['mask']})" for m in data["masked_columns"])
            table.add_row("masked", escape(masked))
        approval = item.approval
        if approval is not None:
            needed = approval.approvals_required
            approvers = ", ".join(sorted(approval.approver_groups))
            table.add_row(
                "approvers",
                escape(f"{approvers} ({needed} approval{'' if needed == 1 else 's'} needed)"),
            )
            table.add_row("window", escape(window_text(approval.window_seconds)))
        seen = data["analysis"]
        parts = [f"{seen['command']}: {', '.join(seen['operations']) or 'no operation'}"]
        parts += [f"{k} {', '.join(seen[k])}" for k in ("reads", "writes", "functions") if seen[k]]
        table.add_row("analysis", escape("; ".join(parts)))
        out.print(Padding(table, (0, 0, 0, 2), expand=False), highlight=False)
