"""`guard audit verify [FILE...] [--pubkey PEM] [--json]`: check audit logs offline — the hash
chain, the signed checkpoints and the unsigned tail — and name the first damage. With
gateway worker processes the broker writes one chain per process (`audit.gateway-<i>.jsonl`
beside its own log); without FILE the dev stack's log and those are checked together.
`guard audit pubkey [--log FILE | --key KEYFILE]`: print the checkpoint signing key's public
half as PEM, to keep it (and hand it to examiners) away from the broker host.

From `guard.broker` this imports only `guard.broker.audit.verify` (and through it
`audit.chain` and `audit.checkpoint`: stdlib and cryptography, no broker): an examiner checks
a copied log with the public key alone. FILE defaults to the running dev stack's audit log
(`guard dev status`) and its gateway worker logs. Exit codes: 0 every log is intact, 1 one
is damaged (or not a guard audit log), 2 usage (no such file, no key to check with).
Messages never show record contents or key material.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from guard.cli.errors import EXIT_FAILURE, EXIT_USAGE, CliError
from guard.cli.profile import dev_state_dir
from guard.cli.usage import GuardGroup


@click.group("audit", cls=GuardGroup, help="Audit log tools.", no_args_is_help=True)
def audit() -> None:
    pass


def _dev_audit_log() -> Path:
    from guard.devstack import stack

    try:
        status = stack.read_status(dev_state_dir())
    except stack.StackError:
        status = None
    if status and status.get("audit_log"):
        return Path(status["audit_log"])
    raise CliError(
        "no audit log given and no dev stack to take it from",
        hint="pass the log: guard audit verify FILE --pubkey PEM_FILE",
        exit_code=EXIT_USAGE,
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CliError(
            f"{path}: no such file", hint=f"pass the {what}", exit_code=EXIT_USAGE
        ) from None
    except IsADirectoryError:
        raise CliError(
            f"{path}: is a directory", hint=f"pass the {what}", exit_code=EXIT_USAGE
        ) from None
    except OSError as exc:
        raise CliError(
            f"cannot read {path}: {exc.strerror}",
            hint=f"pass a readable {what}",
            exit_code=EXIT_USAGE,
        ) from None


def _public_key_files(log: Path, pubkeys: list[Path]) -> list[Path]:
    if pubkeys:
        return pubkeys
    beside = log.with_name(log.name + ".pub")  # what the broker writes by default
    if beside.is_file():
        return [beside]
    # A gateway worker's log (`audit.gateway-1.jsonl`) is signed with the broker's key,
    # whose public half is beside the broker's log (`audit.jsonl.pub`).
    stem, dot, rest = log.name.partition(".gateway-")
    index, _, suffix = rest.partition(".")
    if dot and index.isdigit():
        broker_pub = log.with_name(f"{stem}.{suffix}.pub")
        if broker_pub.is_file():
            return [broker_pub]
    raise CliError(
        f"no public key to check {log}'s checkpoints with (looked for {beside})",
        hint="pass --pubkey PEM_FILE (`guard audit pubkey` on the broker host prints it)",
        exit_code=EXIT_USAGE,
    )


@audit.command(
    "verify", help="Check audit logs' chains and signed checkpoints; name the first damage."
)
@click.argument(
    "files",
    nargs=-1,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Audit logs (default: the dev stack's, with its gateway workers' logs)",
)
@click.option(
    "--pubkey",
    "pubkeys",
    multiple=True,
    type=click.Path(path_type=Path),
    metavar="PEM_FILE",
    help="Public key the checkpoints are signed with (repeat for rotated keys; "
    "default: FILE.pub beside the log — keep a copy elsewhere for a real check)",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Slack past the checkpoint interval before an unsigned tail counts as possibly truncated",
)
def verify(files: tuple[Path, ...], pubkeys: tuple[Path, ...], as_json: bool, grace: float) -> int:
    if files:
        logs = list(files)
    else:
        main_log = _dev_audit_log()
        logs = [main_log, *_gateway_logs(main_log)]
    reports = [_verify_one(log, list(pubkeys), grace) for log in logs]
    damaged = [(log, r) for log, (r, _keys) in zip(logs, reports, strict=True) if r.damage]
    if as_json:
        data = [
            {"file": str(log), "public_keys": [str(k) for k in keys], **report.to_json()}
            for log, (report, keys) in zip(logs, reports, strict=True)
        ]
        # One file: its report, as before; several: a list of them.
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        return EXIT_FAILURE if damaged else 0
    for log, (report, _keys) in zip(logs, reports, strict=True):
        _print_report(log, report)
    if files and len(files) == 1 and not damaged:
        beside = _gateway_logs(files[0])
        if beside:
            print(
                f"note: {len(beside)} gateway worker log(s) beside it"
                f" ({beside[0].name}, …) are separate chains: verify them too"
            )
    if not damaged:
        return 0
    log, report = damaged[0]
    damage = report.damage
    assert damage is not None
    where = f"line {damage.line}" + (f" (seq {damage.seq})" if damage.seq is not None else "")
    if damage.kind == "not-a-log":
        raise CliError(
            f"{log} is not a guard audit log: {damage.detail}",
            hint="pass the broker's audit log (`guard dev status` shows the dev stack's)",
        )
    more = f" (and {len(damaged) - 1} more damaged log(s))" if len(damaged) > 1 else ""
    raise CliError(
        f"{log} is damaged: {damage.kind} at {where}{more}",
        hint=f"records up to line {damage.line - 1} are intact"
        if damage.line > 1
        else "no record of it can be trusted",
    )


def _gateway_logs(log: Path) -> list[Path]:
    """The gateway worker logs the broker writes beside `log` (`audit.gateway-0.jsonl`, …),
    each its own chain (`gateway.workers` > 1)."""
    stem, dot, suffix = log.name.rpartition(".")
    if not dot:
        stem, suffix = log.name, ""
    return sorted(
        p
        for p in log.parent.glob(f"{stem}.gateway-*{'.' + suffix if suffix else ''}")
        if p.name.removeprefix(f"{stem}.gateway-").split(".")[0].isdigit()
    )


def _verify_one(log: Path, pubkeys: list[Path], grace: float):  # -> (VerifyReport, key files)
    import time

    from guard.broker.audit.checkpoint import load_public_pem
    from guard.broker.audit.verify import keys_by_id, verify_log

    if not log.exists():
        raise CliError(f"{log}: no such file", hint="pass the audit log", exit_code=EXIT_USAGE)
    keys = []
    key_files = _public_key_files(log, pubkeys)
    for key_file in key_files:
        try:
            keys.append(load_public_pem(_read(key_file, "public key (PEM)")))
        except ValueError as exc:
            raise CliError(
                f"{key_file}: {exc}",
                hint="pass the PEM that `guard audit pubkey` prints",
                exit_code=EXIT_USAGE,
            ) from None
    try:
        with log.open("rb") as fh:
            report = verify_log(fh, keys_by_id(keys), now=time.time(), grace=grace)
    except OSError as exc:
        raise CliError(
            f"cannot read {log}: {exc.strerror}",
            hint="pass a readable audit log",
            exit_code=EXIT_USAGE,
        ) from None
    return report, key_files


def _print_report(log: Path, report) -> None:  # noqa: ANN001 - VerifyReport, imported lazily
    damage = report.damage
    if damage is None:
        keys_text = ", ".join(report.key_ids) or "none"
        print(
            f"ok {log}: {report.records} records, {report.checkpoints} signed checkpoint(s) "
            f"(key id {keys_text}), chain intact"
        )
        for note in report.notes:
            print(f"note: {note}")
        return
    if damage.kind == "not-a-log":
        return  # said by the error
    where = f"line {damage.line}" + (f" (seq {damage.seq})" if damage.seq is not None else "")
    print(f"{log}: {where}: {damage.kind}: {damage.detail}")


@audit.command("pubkey", help="Print the checkpoint signing key's public key (PEM).")
@click.option(
    "--log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Audit log whose key (LOG.key) to use",
)
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The signing key file (audit.signing_key_file)",
)
def pubkey(log: Path | None, key: Path | None) -> int:
    from guard.broker.audit.checkpoint import load_private_pem, load_public_pem, public_pem

    if log is not None and key is not None:
        raise CliError(
            "pass one of --log and --key",
            hint="guard audit pubkey --key KEYFILE",
            exit_code=EXIT_USAGE,
        )
    if key is None:
        log = log or _dev_audit_log()
        key = log.with_name(log.name + ".key")  # the broker's default
    key_file = key
    beside = (
        key_file.with_suffix(".pub")
        if key_file.suffix == ".key"
        else key_file.with_name(key_file.name + ".pub")
    )
    try:
        data = key_file.read_bytes()
    except OSError:
        data = b""
    try:
        if data:
            print(public_pem(load_private_pem(data).public_key()).decode("ascii"), end="")
            return 0
        if beside.is_file():
            print(public_pem(load_public_pem(_read(beside, "public key"))).decode("ascii"), end="")
            return 0
    except ValueError as exc:
        raise CliError(
            f"{key_file if data else beside}: {exc}",
            hint="pass the broker's audit.signing_key_file with --key",
            exit_code=EXIT_USAGE,
        ) from None
    raise CliError(
        f"cannot read the signing key {key_file}, and there is no {beside}",
        hint="run it as the broker's user, or pass --key KEYFILE",
        exit_code=EXIT_USAGE,
    )
