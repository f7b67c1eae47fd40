"""Composition root: settings → running broker (API + PG gateway) in one event loop.

The only module that picks real implementations (OpenBao issuer, OIDC discovery, JSONL
audit sink, SQLite state). Run as `guard-broker --config broker.yaml`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from guard.broker.approvals.grants import DatabaseGrants
from guard.broker.approvals.notify import NullNotifier, WebhookNotifier
from guard.broker.approvals.service import ApprovalService
from guard.broker.approvals.store import SqliteApprovalStore
from guard.broker.audit.sink import AuditUnavailable, JsonlAuditSink
from guard.broker.policy.compile import PolicyError, load_policy_file
from guard.broker.proxy.listener import Gateway
from guard.broker.proxy.protected import ProtectedColumns
from guard.broker.proxy.tasks import spawn
from guard.broker.sessions import SessionManager
from guard.broker.settings import BrokerSettings, load_settings
from guard.broker.state import SqliteStateStore

log = logging.getLogger("guard.broker")


@dataclass
class _Address:
    host: str
    port: int
    tls: bool


def build_principal_resolver(settings: BrokerSettings):
    import httpx

    from guard.broker.identity.oidc import DiscoveryKeySource, OIDCVerifier, principal_from_token

    http = httpx.Client(timeout=5.0)
    keys = DiscoveryKeySource(settings.oidc.issuer, http)
    verifier = OIDCVerifier(
        issuer=settings.oidc.issuer,
        audience=settings.oidc.audience,
        algorithms=list(settings.oidc.algorithms),
        groups_claim=settings.oidc.groups_claim,
        leeway=settings.oidc.leeway_seconds,
        key_source=keys,
    )
    return lambda token: principal_from_token(verifier, token)


async def run(settings: BrokerSettings) -> None:
    import uvicorn

    from guard.broker.api.app import create_app
    from guard.broker.credentials.openbao import OpenBaoIssuer

    policy = load_policy_file(settings.policy_file)
    audit = JsonlAuditSink(settings.audit.path)
    state = SqliteStateStore(settings.database_path)
    issuer = OpenBaoIssuer(
        settings.openbao.addr,
        settings.openbao.token(),
        mount=settings.openbao.mount,
        verify=settings.openbao.verify_tls,
    )
    sessions = SessionManager(
        policy=policy, targets=dict(settings.targets), issuer=issuer, audit=audit, state=state
    )
    await sessions.revoke_orphans()
    grants = DatabaseGrants(settings.targets)
    approval_store = SqliteApprovalStore(settings.database_path)
    notifier = (
        WebhookNotifier(settings.approvals.webhooks)
        if settings.approvals.webhooks
        else NullNotifier()
    )
    await notifier.start()
    approvals = ApprovalService(
        notifier=notifier,
        store=approval_store,
        audit=audit,
        policy=policy,
        grants=grants,
        end_session=sessions.end,
        # Statements are held only where the broker can enforce an approval in the
        # database (it can grant guard_approved_<table>); elsewhere they are refused.
        holding_targets=frozenset(
            name
            for name, target in settings.targets.items()
            if target.grants_dsn_file is not None or target.admin_dsn_file is not None
        ),
    )
    approvals.expire_left_over()
    sessions.on_end.append(approvals.session_ended)
    tls = None
    if settings.gateway_tls is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(settings.gateway_tls.cert_file, settings.gateway_tls.key_file)
    gateway = Gateway(
        sessions=sessions,
        policy=policy,
        audit=audit,
        protected_map=ProtectedColumns(policy),
        tls=tls,
        idle_timeout=settings.gateway.idle_timeout_seconds or None,
        approvals=approvals,
    )
    host, port = await gateway.start(settings.gateway.host, settings.gateway.port)
    address = _Address(settings.gateway.advertise_host or host, port, tls is not None)
    log.info("PG gateway listening on %s:%s", host, port)

    app = create_app(
        sessions=sessions,
        resolve_principal=build_principal_resolver(settings),
        gateway=address,
        approvals=approvals,
    )
    config = uvicorn.Config(
        app,
        host=settings.api.host,
        port=settings.api.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # HTTPS when api_tls is set (main() refuses plain HTTP off loopback without it).
        ssl_certfile=str(settings.api_tls.cert_file) if settings.api_tls else None,
        ssl_keyfile=str(settings.api_tls.key_file) if settings.api_tls else None,
    )
    server = uvicorn.Server(config)

    async def expiry_watchdog() -> None:
        ticks = 0
        while True:
            await asyncio.sleep(0.2)
            # Result records are chained at once but written in batches: flush them.
            try:
                audit.flush()
            except AuditUnavailable:
                log.error("audit log unwritable: statements will be refused until it is fixed")
            ticks += 1
            if ticks % 5 == 0:
                await sessions.end_expired()

    watchdog = spawn(expiry_watchdog(), name="session-expiry")
    try:
        await server.serve()
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        await sessions.end_all("broker shutting down")
        await gateway.close()
        await grants.close()
        await notifier.close(grace=2.0)
        approval_store.close()
        audit.close()
        state.close()


def api_tls_refusal(settings: BrokerSettings) -> str | None:
    """One line saying why the API must not start (plain HTTP off loopback, or an api_tls
    certificate that does not load), else None."""
    refusal = settings.api_plaintext_refusal()
    if refusal is not None or settings.api_tls is None:
        return refusal
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.api_tls.cert_file, settings.api_tls.key_file
        )
    except (OSError, ssl.SSLError) as exc:
        return (
            f"cannot load the API certificate {settings.api_tls.cert_file} / key"
            f" {settings.api_tls.key_file}: {exc}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="guard-broker", description="guard broker: API + PG gateway"
    )
    parser.add_argument("--config", required=True, type=Path, help="broker YAML config")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings(args.config)
    except Exception as exc:  # noqa: BLE001 - pydantic/yaml/OS errors all mean "fix the config"
        print(f"guard-broker: invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    refusal = api_tls_refusal(settings)
    if refusal is not None:
        print(f"guard-broker: {refusal}", file=sys.stderr)
        return 2
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(run(settings))
        else:
            uvloop.run(run(settings))
    except PolicyError as exc:
        print(f"guard-broker: invalid policy {settings.policy_file}:\n{exc}", file=sys.stderr)
        return 2
    except AuditUnavailable as exc:
        print(f"guard-broker: {exc}; fix the audit path or its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
