"""Run a child process inside a guard session: session → child → teardown.

Shared by `guard connect` (psql), `guard exec` (any program) and `guard proxy` (a local
relay for clients that cannot do TLS). The child talks to the gateway itself, over TLS
verified against the gateway's CA (`sslmode=verify-full`) with the session secret: no
second hop re-encrypting every byte. Only `guard proxy` starts the loopback relay, the one
path that imports asyncio; `guard exec` and `guard connect` need nothing heavier than
`subprocess` and the CLI's own HTTP client (`cli.http`), so a session starts fast. The
session is ended (gateway connections closed, lease revoked) whatever way the child ends,
and the child's exit status comes back unchanged (128+N for signal N, 127 when the program
does not exist, 126 when it cannot be executed).

The ID token opens the session and nothing else: heartbeats (a thread, every
`heartbeat_interval_seconds` the broker asked for) and the end use the session credential
the broker returned, so a session outliving its ID token still ends cleanly, and a killed
CLI's session ends when its heartbeats stop. A teardown that fails is one line on stderr;
the child's status is returned all the same.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from urllib.parse import quote, urlencode

from guard.cli.client import BrokerClient, BrokerError
from guard.cli.errors import EXIT_USAGE, CliError
from guard.cli.show import span
from guard.cli.wire import SessionCreated

# Variables removed from the child's environment: the identity token could open further
# sessions, and libpq service/options variables could point the client somewhere else.
SCRUBBED_ENV = (
    "GUARD_ID_TOKEN",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGHOSTADDR",
    "PGOPTIONS",
    "PGPASSFILE",
    "PGREQUIRESSL",
)

# Heartbeat period when the broker names none (an older broker: it ignores them).
DEFAULT_HEARTBEAT_SECONDS = 10.0
# A session's holder is told this long before its TTL runs out (a quarter of a shorter one).
EXPIRY_WARNING_SECONDS = 300.0
# A session the policy lets `guard exec` extend is extended this long before its end (or
# two heartbeats, when they are further apart).
EXTEND_BEFORE_SECONDS = 60.0
# A target that requires reauthentication gets a fresh ID token this long before the
# session's login lapses (its token then has under a minute left, so the stored login is
# refreshed: `auth.MIN_VALIDITY`).
LOGIN_RENEW_SECONDS = 90.0


def session_env(
    created: SessionCreated, *, host: str, port: int, tls: dict[str, str]
) -> dict[str, str]:
    """libpq variables and DATABASE_URL for a client of the session at host:port; `tls`
    holds the libpq TLS settings (sslmode, and sslrootcert when there is a CA file)."""
    url = (
        f"postgresql://{quote(created.user, safe='')}:{quote(created.password, safe='')}"
        f"@{host}:{port}/{quote(created.database, safe='')}?{urlencode(tls)}"
    )
    env = {
        "PGHOST": host,
        "PGPORT": str(port),
        "PGUSER": created.user,
        "PGPASSWORD": created.password,
        "PGDATABASE": created.database,
        "DATABASE_URL": url,
    }
    env.update({f"PG{key.upper()}": value for key, value in tls.items()})
    return env


def gateway_tls(created: SessionCreated, ca_file: str | None) -> dict[str, str]:
    """How a client verifies the gateway: verify-full against the CA file, when the
    gateway serves TLS (one without a certificate is plain, and refuses nothing)."""
    if not created.gateway_tls:
        return {"sslmode": "disable"}
    if ca_file is None:
        # No CA named: the system's trust store (libpq 16+ reads sslrootcert=system).
        return {"sslmode": "verify-full", "sslrootcert": "system"}
    return {"sslmode": "verify-full", "sslrootcert": ca_file}


@contextlib.contextmanager
def gateway_ca(created: SessionCreated, configured: str | None) -> Iterator[str | None]:
    """The CA file to verify the gateway with: the profile's, else the PEM the broker sent
    in a private temporary file that lasts as long as the session."""
    if configured is not None or not created.gateway_ca_pem:
        yield configured
        return
    import tempfile  # only here: with shutil and random, ~4 ms of every start-up

    with tempfile.TemporaryDirectory(prefix="guard-") as folder:
        path = os.path.join(folder, "gateway-ca.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(created.gateway_ca_pem)
        yield path


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(extra)
    return env


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _run_child(argv: Sequence[str], env: dict[str, str]) -> int:
    """Run the child to its end; its exit status. Signals sent to guard reach it."""
    try:
        proc = subprocess.Popen(argv, env=env)
    except FileNotFoundError:
        print(f"guard: {argv[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"guard: {argv[0]}: permission denied", file=sys.stderr)
        return 126
    interactive = sys.stdin.isatty()

    def forward(sig: int, _frame: object) -> None:
        # A terminal's Ctrl-C already reaches the child (same foreground process group);
        # sending it again would interrupt twice. Signals sent to guard alone are forwarded.
        if sig == signal.SIGINT and interactive:
            return
        if proc.returncode is None:
            proc.send_signal(sig)

    with _signals_handled_by(forward):
        # wait() is retried after each handler (PEP 475): guard lives as long as the child.
        return exit_status(proc.wait())


@contextlib.contextmanager
def _signals_handled_by(handler: Callable[[int, object], None]) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP go to `handler` while the block runs."""
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in handled}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _until_interrupted(ready: Callable[[], None], stop: threading.Event) -> None:
    """Call `ready`, then block until SIGINT, SIGTERM or SIGHUP, or until `stop` is set
    (the broker ended the session): --print-env's session lasts until then. The handlers
    come first: a signal sent as soon as `ready` has printed the variables ends the
    session instead of killing guard mid-session."""
    with _signals_handled_by(lambda _sig, _frame: stop.set()):
        ready()
        # Not signal.pause(): a signal landing between a check and pause() would be
        # missed. The handler runs while wait() blocks (it retries after EINTR); the
        # timeout only bounds the damage should that ever not hold.
        while not stop.wait(1.0):
            pass


def _in_session(
    created: SessionCreated,
    argv: Sequence[str] | None,
    on_ready: Callable[[dict[str, str]], None] | None,
    ca_file: str | None,
    gone: threading.Event,
) -> int:
    """The child (or the wait for Ctrl-C) talking to the gateway itself."""
    env = session_env(
        created,
        host=created.gateway_host,
        port=created.gateway_port,
        tls=gateway_tls(created, ca_file),
    )
    if argv is None:
        _until_interrupted(lambda: on_ready(env) if on_ready is not None else None, gone)
        return 0
    if on_ready is not None:
        on_ready(env)
    return _run_child(argv, child_environment(env))


def _through_relay(
    created: SessionCreated,
    on_ready: Callable[[dict[str, str]], None] | None,
    ca_file: str | None,
    relay_port: int,
    gone: threading.Event,
) -> int:
    """guard proxy: a plain loopback port for clients that cannot do TLS; the relay speaks
    verified TLS to the gateway. The only path that needs asyncio (imported here)."""
    import asyncio

    from guard.cli.tunnel import LoopbackRelay, client_tls_context

    async def serve() -> int:
        tls = client_tls_context(ca_file) if created.gateway_tls else None
        relay = LoopbackRelay(created.gateway_host, created.gateway_port, tls, port=relay_port)
        port = await relay.start()
        env = session_env(created, host="127.0.0.1", port=port, tls={"sslmode": "disable"})
        try:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # before anything is printed
                loop.add_signal_handler(sig, stop.set)
            if on_ready is not None:
                on_ready(env)
            # Until a signal, or the broker ends the session (a thread's event: polled).
            while not gone.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                    break
            return 0
        finally:
            await relay.close()

    try:
        import uvloop  # its loop's transports cost less per relayed chunk
    except ImportError:  # pragma: no cover - a platform without uvloop
        return asyncio.run(serve())
    return uvloop.run(serve())


class Heartbeat:
    """Tells the broker every `interval` seconds that this CLI still runs the session (a
    daemon thread: a blocked event loop or a busy child cannot starve it). Says once on
    stderr when the session nears its expiry (`warn_at`), and stops by itself when the
    broker says the session is gone, saying why."""

    def __init__(
        self,
        client: BrokerClient,
        session_id: str,
        interval: float,
        *,
        expires_at: datetime | None = None,
        login_expires_at: datetime | None = None,
        fresh_token: Callable[[], str] | None = None,
        opened_with: str | None = None,
        auto_extend: bool = False,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.interval = interval
        self.expires_at = expires_at
        # The target requires reauthentication: a fresh ID token before this.
        self.login_expires_at = login_expires_at
        self.fresh_token = fresh_token
        self._presented = opened_with  # the ID token the broker has seen last
        self._renewal_failed = False
        # Warned this long before the end: 5 minutes, or a quarter of a shorter session,
        # but at least one heartbeat's interval (the check runs once per beat).
        total = (expires_at - datetime.now(UTC)).total_seconds() if expires_at else 0.0
        self.warn_before = min(max(min(EXPIRY_WARNING_SECONDS, total / 4), interval), total)
        # The policy lets this session be extended while its program runs: each time it
        # nears its end, until it reaches its maximum (then the warning above applies).
        self.auto_extend = auto_extend
        self.extend_before = max(2 * interval, EXTEND_BEFORE_SECONDS)
        self.ended_by_broker = False
        self.gone = threading.Event()  # set when the broker says the session ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guard-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.interval):
            self._mind_expiry()
            try:
                self._renew_login()
                self.client.heartbeat(self.session_id)
                warned = False
            except BrokerError as err:
                if self._stop.is_set():
                    return
                if err.status == 404:
                    self.ended_by_broker = True
                    self.gone.set()
                    print(
                        f"guard: {ended_by_broker(self.session_id, err.message)}", file=sys.stderr
                    )
                    return
                if not warned:  # once per outage; it keeps trying
                    print(f"guard: heartbeat failed (retrying): {err.message}", file=sys.stderr)
                    warned = True

    def _extend(self, ends: datetime) -> bool:
        """Extend the session by its target's default; whether it now ends later. At its
        maximum (or when the broker refuses) automatic extension stops, said once."""
        try:
            extended = self.client.extend(self.session_id)
        except BrokerError as err:
            if err.status == 404:
                raise  # ended: the heartbeat loop says why
            print(
                f"guard: could not extend session {self.session_id}: {err.message}", file=sys.stderr
            )
            self.auto_extend = False
            return False
        new = extended.expires_at.astimezone(UTC)
        if new <= ends:
            self.auto_extend = False  # at its maximum: the TTL warning takes over
            return False
        self.expires_at = new
        notice = f"; {extended.notice}" if extended.notice else ""
        print(
            f"guard: session {self.session_id} extended to {new:%H:%M:%S} UTC{notice}",
            file=sys.stderr,
        )
        return True

    def _renew_login(self) -> None:
        """Near its ID token's expiry, present a fresh one (the login refreshed as every
        command refreshes it). The IdP's refusal is said once; the broker then ends the
        session when the old token lapses, and says why."""
        until = self.login_expires_at
        if until is None or self.fresh_token is None:
            return
        if (until - datetime.now(UTC)).total_seconds() > LOGIN_RENEW_SECONDS:
            return
        try:
            token = self.fresh_token()
        except CliError as err:
            if not self._renewal_failed:
                print(
                    f"guard: could not renew your login ({err.message}); the broker ends "
                    f"session {self.session_id} at {until:%H:%M:%S} UTC",
                    file=sys.stderr,
                )
                self._renewal_failed = True
            return
        if token == self._presented:
            return  # nothing fresher yet (a CI job's token)
        self._presented = token
        try:
            self.login_expires_at = self.client.reauthenticate(self.session_id, token)
        except BrokerError as err:
            if err.status != 403:
                raise  # 404: the session ended (the caller says why); else retried
            # Another person's token (GUARD_ID_TOKEN changed?): said once, not sent again.
            print(f"guard: {err.message}", file=sys.stderr)
            return
        self._renewal_failed = False

    def _mind_expiry(self) -> None:
        """Near the session's end: extend it (when the policy lets this run do so), else
        warn once."""
        if self.expires_at is None:
            return
        left = (self.expires_at - datetime.now(UTC)).total_seconds()
        if self.auto_extend and (left > self.extend_before or self._extend(self.expires_at)):
            return
        if left <= self.warn_before:
            print(
                f"guard: session {self.session_id} ends in {span(left)} (its TTL)",
                file=sys.stderr,
            )
            self.expires_at = None  # once


def ended_by_broker(session_id: str, message: str) -> str:
    """What the broker's 404 for a session means, in a line: its reason when it gave one
    (TTL, revocation, lost heartbeats), else that it is gone."""
    _, said, reason = message.partition(" ended: ")
    why = reason if said else "expired or ended elsewhere"
    return f"the broker ended session {session_id}: {why}"


def end_session(client: BrokerClient, session_id: str, outcome: str, *, quiet: bool) -> bool:
    """End the session with its own credential and say so (not when `quiet`: the end was
    said already), with why (`outcome`) or, when the broker had ended it, the broker's
    reason; a failure is one line."""
    try:
        gone = client.end_session(session_id)
    except CliError as err:
        print(
            f"guard: could not end session {session_id}: {err.message} "
            "(the broker ends it when its heartbeats stop, or at its expiry)",
            file=sys.stderr,
        )
        return False
    if not quiet:
        if gone is None:
            line = f"session {session_id} ended: {outcome}"
        else:
            line = ended_by_broker(session_id, gone)
        print(f"guard: {line}", file=sys.stderr)
    return True


def run_in_session(
    *,
    broker_url: str,
    token: str,
    target: str,
    reason: str,
    ttl_seconds: int | None,
    argv: Sequence[str] | None,
    on_ready: Callable[[dict[str, str]], None] | None = None,
    gateway_ca_file: str | None = None,
    relay_port: int | None = None,
    fresh_token: Callable[[], str] | None = None,
    auto_extend: bool = False,
    token_from: str | None = None,
    unmasked: bool = False,
) -> int:
    """Open a session, run `argv` in it (None: wait for Ctrl-C), end it; the exit status.
    `relay_port` (guard proxy) serves the session on a plain loopback port instead;
    `unmasked` asks to read protected columns raw, waiting for approval when the policy
    wants it (the program starts only once it is granted)."""
    if unmasked and not reason.strip():
        raise CliError(
            "--unmasked needs a reason: it is recorded, and approvers read it",
            hint=f'guard connect {target} --unmasked --reason "fraud case 1234"',
            exit_code=EXIT_USAGE,
        )
    ender = BrokerClient(broker_url, token)
    try:
        created = ender.create_session(
            target, reason=reason, ttl_seconds=ttl_seconds, heartbeat=True, unmasked=unmasked
        )
    except BrokerError as err:
        ender.close()
        source = token_from
        if err.status == 401 and source is not None:
            # A CI job cannot `guard login`: say which token was refused, and why.
            # The broker's own hint when it has one for a job (which bindings, a fresh
            # token per call); its `guard login` advice means nothing to a CI job.
            hint = err.hint
            if not hint or "guard login" in hint:
                hint = (
                    "a CI job's token must be unexpired, for the broker's audience, and "
                    "from an issuer the broker trusts; check the job's OIDC settings"
                )
            raise CliError(
                f"the broker refused the ID token from {source}: {err.message}", hint=hint
            ) from err
        raise
    except BaseException:
        ender.close()
        raise
    # From here on the session's own credential (an older broker gives none: the ID token).
    # The end goes on the opening request's connection (no second TLS handshake when the
    # child was quick); heartbeats have their own client: they run in another thread.
    credential = created.session_token or token
    ender.use_token(credential)
    expires_at = created.expires_at.astimezone(UTC)
    left = span((expires_at - datetime.now(UTC)).total_seconds())
    print(
        f"guard: session {created.session_id} on {target} for {left}"
        f" (until {expires_at:%H:%M:%S} UTC)"
        + (f"; {created.ttl_notice}" if created.ttl_notice else ""),
        file=sys.stderr,
    )
    beats = BrokerClient(broker_url, credential)
    heartbeat = Heartbeat(
        beats,
        created.session_id,
        created.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_SECONDS,
        expires_at=expires_at,
        login_expires_at=created.login_expires_at,
        fresh_token=fresh_token,
        opened_with=token,
        auto_extend=auto_extend and created.auto_extend,
    )
    heartbeat.start()
    code: int | None = None
    try:
        try:
            if unmasked:
                _wait_for_unmask(ender, created, heartbeat.gone)
            with gateway_ca(created, gateway_ca_file) as ca_file:
                if relay_port is not None:
                    code = _through_relay(created, on_ready, ca_file, relay_port, heartbeat.gone)
                else:
                    code = _in_session(created, argv, on_ready, ca_file, heartbeat.gone)
                return code
        except KeyboardInterrupt:
            code = 130
            return code
    finally:
        heartbeat.stop()
        outcome = _outcome(argv, code)
        end_session(ender, created.session_id, outcome, quiet=heartbeat.ended_by_broker)
        beats.close()
        ender.close()


# How often `guard connect --unmasked` asks whether approvers have decided.
UNMASK_POLL_SECONDS = 1.0


def _wait_for_unmask(client: BrokerClient, created: SessionCreated, gone: threading.Event) -> None:
    """Return once the session reads unmasked; CliError when it will not (denied, expired,
    the grant failed, the session ended). Says what it waits for, and for whom."""
    state, detail, request = created.unmask_state, created.unmask_detail, created.unmask_request
    if state == "pending":
        print(
            f"guard: {detail.removeprefix('guard: ')}: request {request};"
            f" waiting (an approver runs `guard approve {request}`; Ctrl-C gives up)",
            file=sys.stderr,
        )
    while state == "pending":
        if gone.wait(UNMASK_POLL_SECONDS):
            raise CliError(
                "the session ended while waiting for approval",
                hint="ask again: guard connect … --unmasked --reason …",
            )
        info = client.session(created.session_id)
        state, detail = info.unmask_state, info.unmask_detail
    if state != "granted":
        raise CliError(
            f"unmasked access was not granted: {detail or state}",
            hint="leave out --unmasked for a masked session, or ask an approver and retry",
        )
    print(
        f"guard: session {created.session_id} reads protected columns UNMASKED ({detail});"
        " every statement is recorded",
        file=sys.stderr,
    )


def _outcome(argv: Sequence[str] | None, code: int | None) -> str:
    """Why guard ends the session, in words: the program's exit, or guard's own stop."""
    if code is None:
        return "guard stopped on an error"
    if argv is None or code == 130:
        return "stopped (Ctrl-C or a signal)"
    return f"{os.path.basename(argv[0])} exited with status {code}"
