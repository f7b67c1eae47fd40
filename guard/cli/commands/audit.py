"""`guard audit verify [FILE] [--pubkey PEM] [--json]`: check an audit log offline — the hash
chain, the signed checkpoints and the unsigned tail — and name the first damage.
`guard audit pubkey [--log FILE | --key KEYFILE]`: print the checkpoint signing key's public
half as PEM, to keep it (and hand it to examiners) away from the broker host.

From `guard.broker` this imports only `guard.broker.audit.verify` (and through it
`audit.chain` and `audit.checkpoint`: stdlib and cryptography, no broker): an examiner checks
a copied log with the public key alone. FILE defaults to the running dev stack's audit log
(`guard dev status`). Exit codes: 0 the log is intact, 1 it is damaged (or not a guard audit
log), 2 usage (no such file, no key to check with). Messages never show record contents or
key material.
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
    "verify", help="Check an audit log's chain and signed checkpoints; name the first damage."
)
@click.argument(
    "file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=False,
    help="Audit log (default: the dev stack's)",
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
def verify(file: Path | None, pubkeys: tuple[Path, ...], as_json: bool, grace: float) -> int:
    import time

    from guard.broker.audit.checkpoint import load_public_pem
    from guard.broker.audit.verify import keys_by_id, verify_log

    log = file or _dev_audit_log()
    if not log.exists():
        raise CliError(f"{log}: no such file", hint="pass the audit log", exit_code=EXIT_USAGE)
    keys = []
    key_files = _public_key_files(log, list(pubkeys))
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
    damage = report.damage
    if as_json:
        data = {"file": str(log), "public_keys": [str(k) for k in key_files], **report.to_json()}
        print(json.dumps(data, indent=2))
        return EXIT_FAILURE if damage is not None else 0
    if damage is None:
        keys_text = ", ".join(report.key_ids) or "none"
        print(
            f"ok {log}: {report.records} records, {report.checkpoints} signed checkpoint(s) "
            f"(key id {keys_text}), chain intact"
        )
        for note in report.notes:
            print(f"note: {note}")
        return 0
    where = f"line {damage.line}" + (f" (seq {damage.seq})" if damage.seq is not None else "")
    if damage.kind == "not-a-log":
        raise CliError(
            f"{log} is not a guard audit log: {damage.detail}",
            hint="pass the broker's audit log (`guard dev status` shows the dev stack's)",
        )
    print(f"{log}: {where}: {damage.kind}: {damage.detail}")
    raise CliError(
        f"{log} is damaged: {damage.kind} at {where}",
        hint=f"records up to line {damage.line - 1} are intact"
        if damage.line > 1
        else "no record of it can be trusted",
    )


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
