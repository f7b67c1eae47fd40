"""Composition root: settings → running broker (API + PG gateway) in one event loop.

The only module that picks real implementations (OpenBao issuer, OIDC discovery, JSONL
audit sink, SQLite state). Run as `guard-broker --config broker.yaml`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from guard.broker.approvals.grants import DatabaseGrants
from guard.broker.approvals.notify import NullNotifier, WebhookNotifier
from guard.broker.approvals.service import ApprovalService
from guard.broker.approvals.store import SqliteApprovalStore
from guard.broker.audit.sink import AuditSink, AuditUnavailable, JsonlAuditSink
from guard.broker.backstop import BackstopMonitor
from guard.broker.health import BrokerHealth, WatchedAuditSink, flush_audit_forever
from guard.broker.policy.compile import PolicyError, PolicyProblem, load_policy
from guard.broker.policy.engine import CompiledPolicy
from guard.broker.proxy.directory import SessionDirectory
from guard.broker.proxy.listener import Gateway, GatewayApprovals
from guard.broker.proxy.protected import ProtectedColumns
from guard.broker.proxy.supervisor import GatewayStartFailed, GatewayWorkers
from guard.broker.proxy.tasks import spawn
from guard.broker.proxy.tlslayer import DirectSSLObject
from guard.broker.revocation import RevocationQueue
from guard.broker.sessions import SessionManager
from guard.broker.settings import BrokerSettings, load_settings
from guard.broker.state import SqliteStateStore

log = logging.getLogger("guard.broker")


@dataclass
class _Address:
    host: str
    port: int
    tls: bool
    ca_pem: str | None = None


def build_principal_resolver(settings: BrokerSettings):
    import httpx

    from guard.broker.identity.oidc import DiscoveryKeySource, TrustedIssuers

    http = httpx.Client(timeout=5.0)
    issuers = TrustedIssuers.from_settings(
        settings.issuers(), lambda issuer: DiscoveryKeySource(issuer.issuer, http)
    )
    return issuers.principal


async def run(settings: BrokerSettings) -> None:
    stop = _StopSignals()
    stop.install(asyncio.get_running_loop())
    try:
        await _run(settings, stop)
    finally:
        stop.uninstall()


class _StopSignals:
    """SIGTERM and SIGINT ask the broker to stop (uvicorn's `should_exit`), so the cleanup
    after `serve()` runs: sessions ended, leases revoked, 'broker shutting down' records.
    (uvicorn's own handlers re-raise the signal after `serve()`, killing the process before
    any cleanup: `_Server` turns them off.) A second signal stops waiting for open
    requests."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.server: object | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self._handle, sig)

    def uninstall(self) -> None:
        if self._loop is not None:
            for sig in self.SIGNALS:
                self._loop.remove_signal_handler(sig)

    def _handle(self, sig: int) -> None:
        log.info("%s received: stopping", signal.Signals(sig).name)
        if self.requested and self.server is not None:
            self.server.force_exit = True  # type: ignore[attr-defined]
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True  # type: ignore[attr-defined]


async def _run(settings: BrokerSettings, stop: _StopSignals) -> None:  # noqa: C901 - composition
    import uvicorn

    from guard.broker.api.app import create_app
    from guard.broker.credentials.openbao import OpenBaoIssuer

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            # Our loop handlers (`_StopSignals`) ask the server to exit; nothing is re-raised.
            yield

    policy_text = read_policy_text(settings.policy_file)
    policy = load_policy(policy_text, source=str(settings.policy_file))
    # Every audit write goes through the watch: /v1/health knows the sink's last failure.
    audit = WatchedAuditSink(JsonlAuditSink.from_settings(settings.audit))
    state = SqliteStateStore(settings.database_path)
    issuer = OpenBaoIssuer(
        settings.openbao.addr,
        settings.openbao.token(),
        mount=settings.openbao.mount,
        verify=settings.openbao.verify_tls,
    )
    limits = settings.sessions
    revocations = RevocationQueue(
        issuer,
        state,
        initial_backoff=limits.revoke_retry_initial_seconds,
        max_backoff=limits.revoke_retry_max_seconds,
    )
    backstop = BackstopMonitor(policy, settings.targets)
    grants = DatabaseGrants(settings.targets)
    sessions = SessionManager(
        policy=policy,
        targets=dict(settings.targets),
        issuer=issuer,
        audit=audit,
        state=state,
        settings=limits,
        revocations=revocations,
        verify_target=backstop,
        grants=grants,
    )
    # Leases a previous run left open, and revocations it still owed.
    await sessions.revoke_orphans()
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
    sessions.request_unmask = approvals.request_unmasked
    approvals.unmask, approvals.unmask_refused = sessions.unmask, sessions.unmask_refused
    workers = settings.gateway.worker_count()
    gateway: Gateway | GatewayWorkers
    if workers > 1:
        gateway = GatewayWorkers(
            count=workers,
            settings=settings,
            policy=policy,
            policy_text=policy_text,
            sessions=sessions,
            approvals=approvals,
            audit=audit,
        )
        gateway_reasons = gateway.reasons
    else:
        gateway = build_gateway(
            settings, policy=policy, audit=audit, approvals=approvals, sessions=sessions
        )
        gateway_reasons = None
    backstop.on_applied.append(gateway.forget_catalog)
    host, port = await gateway.start(settings.gateway.host, settings.gateway.port)
    gateway_ca = settings.gateway_tls.ca_file if settings.gateway_tls is not None else None
    address = _Address(
        settings.gateway.advertise_host or host,
        port,
        settings.gateway_tls is not None,
        gateway_ca.read_text() if gateway_ca is not None else None,
    )
    log.info("PG gateway listening on %s:%s (%d worker process(es))", host, port, workers)

    app = create_app(
        sessions=sessions,
        resolve_principal=build_principal_resolver(settings),
        gateway=address,
        approvals=approvals,
        health=BrokerHealth(audit, revocations, gateway_reasons).reasons,
        backstop=backstop,
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
    server = _Server(config)
    stop.server = server
    if stop.requested:  # a signal came while the broker was starting
        server.should_exit = True

    async def session_watchdog() -> None:
        loop = asyncio.get_running_loop()
        next_reconcile = loop.time() + limits.reconcile_interval_seconds
        while True:
            await asyncio.sleep(limits.expiry_check_seconds)
            try:
                # TTLs and lost heartbeats; then owed revocations whose time has come.
                await sessions.end_expired()
                if loop.time() >= next_reconcile:
                    next_reconcile = loop.time() + limits.reconcile_interval_seconds
                    await sessions.reconcile()
                else:
                    await revocations.retry_due()
            except Exception:  # noqa: BLE001 - the watchdog must outlive one bad round
                log.exception("session watchdog round failed")

    loops = [
        spawn(flush_audit_forever(audit), name="audit-flush"),
        spawn(session_watchdog(), name="session-watchdog"),
    ]
    try:
        if not server.should_exit:
            await server.serve()
    finally:
        for task in loops:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task

        # Each step runs even if one before it failed: sessions first (their leases).
        async def drain_notifier() -> None:
            if isinstance(notifier, WebhookNotifier):
                await notifier.close(grace=2.0)
            else:
                await notifier.close()

        steps: list[tuple[str, Callable[[], Awaitable[None] | None]]] = [
            ("ending sessions", lambda: sessions.end_all("broker shutting down")),
            ("closing the gateway", gateway.close),
            ("closing the approval grants", grants.close),
            ("draining the notifier", drain_notifier),
            ("closing the approval store", approval_store.close),
            ("closing the audit log", audit.close),
            ("closing the state", state.close),
        ]
        for what, step in steps:
            try:
                result = step()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - the remaining steps still run
                log.exception("shutdown: %s failed", what)
        log.info("broker stopped")


def read_policy_text(path: Path) -> str:
    """The policy file's text, read once: the broker and its gateway workers compile the
    same text, whatever happens to the file later."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = PolicyProblem("", f"cannot read policy file: {exc}")
        raise PolicyError([problem], str(path)) from None


def build_gateway(
    settings: BrokerSettings,
    *,
    policy: CompiledPolicy,
    audit: AuditSink,
    approvals: GatewayApprovals | None,
    sessions: SessionManager | None = None,
    directory: SessionDirectory | None = None,
    worker: tuple[int, int] = (0, 1),
    forward_cancel: Callable[[int, bytes], Awaitable[None]] | None = None,
) -> Gateway:
    """The PG gateway `settings` describe (in the broker's process, or in a worker's)."""
    tls = None
    certificate = None
    if settings.gateway_tls is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        # No session tickets, as PostgreSQL sends none (SSL_OP_NO_TICKET): libpq never
        # resumes, so each login's two TLS 1.3 tickets were sealed and sent for nothing
        # (~40 us of the handshake's CPU and a write), and a client that could resume
        # gets the full handshake, with fresh keys, it gets from PostgreSQL itself.
        tls.num_tickets = 0
        tls.options |= ssl.OP_NO_TICKET
        tls.load_cert_chain(settings.gateway_tls.cert_file, settings.gateway_tls.key_file)
        tls.sslobject_class = DirectSSLObject  # no Python frame per record on the client leg
        certificate = leaf_certificate(Path(settings.gateway_tls.cert_file))
    return Gateway(
        sessions=sessions,
        directory=directory,
        policy=policy,
        audit=audit,
        protected_map=ProtectedColumns(policy),
        tls=tls,
        tls_certificate=certificate,
        idle_timeout=settings.gateway.idle_timeout_seconds or None,
        approvals=approvals,
        login_timeout=settings.gateway.login_timeout_seconds,
        max_logging_in=settings.gateway.max_logging_in,
        message_timeout=settings.gateway.message_timeout_seconds,
        worker=worker,
        forward_cancel=forward_cancel,
    )


def leaf_certificate(cert_file: Path) -> bytes:
    """The DER of the first certificate in a PEM chain file (the one the server presents;
    `load_cert_chain` has already accepted the file)."""
    pem = cert_file.read_text()
    begin = "-----BEGIN CERTIFICATE-----"
    end = "-----END CERTIFICATE-----"
    start = pem.index(begin)
    return ssl.PEM_cert_to_DER_cert(pem[start : pem.index(end, start) + len(end)])


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
    except GatewayStartFailed as exc:
        print(f"guard-broker: {exc}; its error is in the log above", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
