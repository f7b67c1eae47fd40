"""Notifications of approval requests and decisions: Slack-compatible webhooks, off the hot path.

The approval service calls `notify(event, request, actor)` after it audits an event. That
call returns at once and never raises: it renders the message and puts it on a bounded
in-memory queue per webhook URL. A background task per URL POSTs the messages in order,
retrying a delivery with exponential backoff on connection errors, timeouts, 5xx and 429
(a `Retry-After` in seconds is honoured), and gives up after `retries` retries with one log
line. A receiver that is down or slow never holds up the gateway, the API, or another URL.
When a queue is full the oldest message is dropped (and logged): new requests matter more
than old ones.

What a message says (the `text` is what Slack, Mattermost and Teams show in notifications;
the `blocks` hold one mrkdwn section for Slack): the request id, requester, target, rule,
tables, approver groups, approvals so far and required, the session's reason, who acted
and their comment, and for a new request the `guard approve <id>` command. Never the
statement (not even its normalized text), tokens or secrets. Text that people typed (the
reason, comments, names) is flattened to one line, cut short, and defused: `<`, `>` and
`&` are escaped and `@` gets a zero-width joiner, so nobody can ping `@channel` or
`<!here>` through a request.

A vote that settles the request ("vote-approve" by the last approver needed, "vote-deny")
is not sent on its own: the settling event that follows it ("approved", "denied") says the
same with the outcome.

Webhook URLs are secrets (a Slack URL's path is its credential; other receivers put tokens
in the query string): logs name the host only, and httpx's own request log lines get the
URL cut to its host too.

Imports asyncio, httpx and the approval model; the one task helper is `proxy.tasks.spawn`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from guard.broker.approvals.model import ApprovalRequest, Person
from guard.broker.proxy.tasks import spawn

log = logging.getLogger("guard.approvals")

QUEUE_SIZE = 1000
MAX_BACKOFF = 60.0  # seconds between two attempts, at most (exponential backoff's ceiling)
MAX_RETRY_AFTER = 300.0  # a receiver's Retry-After is honoured up to this many seconds
_FIELD_MAX = 200  # characters of a reason, comment or name in a message
_DROP_LOG_EVERY = 100  # a full queue logs its first dropped message, then every 100th

Payload = dict[str, Any]
Sleep = Callable[[float], Awaitable[None]]


class Notifier(Protocol):
    def notify(self, event: str, request: ApprovalRequest, actor: Person) -> None:
        """Tell people about `event`; returns at once and never raises."""


class NullNotifier:
    """No webhooks configured: nothing is sent."""

    def notify(self, event: str, request: ApprovalRequest, actor: Person) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------- the message


def _clean(value: str, limit: int = _FIELD_MAX) -> str:
    """Text someone typed, safe in a chat message: one line, short, no markup, no mentions."""
    flat = " ".join(value.split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    flat = flat.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return flat.replace("@", "@\u2060")


_READS = {"SELECT", "TABLE", "SHOW", "VALUES", "FETCH"}
_WRITES = {"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "COPY"}


def _verb(statement: str) -> str:
    words = statement.split(None, 1)
    first = words[0].upper().strip("(") if words else ""
    if first in _READS:
        return "reads"
    if first in _WRITES:
        return "writes"
    return "touches"


@dataclass(frozen=True, slots=True)
class _Parts:
    """One message, as plain text pieces and their mrkdwn twins."""

    headline: str
    headline_md: str
    details: list[tuple[str, str]] = field(default_factory=list)  # empty: the usual ones


def _counts(request: ApprovalRequest) -> str:
    return f"{len(request.approvers)}/{request.approvals_required}"


def _comment(request: ApprovalRequest, actor: Person, event: str) -> str:
    """The actor's comment on their decision (a denial's reason is the request's too)."""
    for decision in reversed(request.decisions):
        if decision.approver.subject == actor.subject:
            return decision.comment
    return request.state_reason if event == "denied" else ""


def _parts(event: str, request: ApprovalRequest, actor: Person) -> _Parts:  # noqa: C901 - a flat table of events
    rid = _clean(request.id, 80)
    who = _clean(actor.label, 80)
    requester = _clean(request.requester.label, 80)
    target = _clean(request.target, 80)
    rule = _clean(request.rule_id, 120)
    tables = ", ".join(_clean(t, 120) for t in request.tables)
    groups = ", ".join(_clean(g, 80) for g in sorted(request.approver_groups))
    reason = _clean(request.session_reason)
    counts = _counts(request)
    said = _clean(_comment(request, actor, event))
    tail = f" — {said}" if said else ""

    if event == "requested":
        reads = f" {_verb(request.statement)} {tables}" if tables else ""
        reads_md = f" {_verb(request.statement)} `{tables}`" if tables else ""
        why = f" — {reason}" if reason else ""
        need = request.approvals_required
        ask = f"{need} approval{'s' if need != 1 else ''} from {groups or 'nobody'}"
        return _Parts(
            f"{requester} asks for approval on {target}: rule {rule}{reads}{why}. "
            f"Approve: guard approve {rid}",
            f"*{requester}* asks for approval on *{target}*: rule `{rule}`{reads_md}{why}\n"
            f"Approve: `guard approve {rid}`",
            [("needs", ask), ("approvals", counts), ("request", rid)],
        )
    if event in ("vote-approve", "approved"):
        head = f"{who} approved request {rid} ({counts}){tail}"
        head_md = f"*{who}* approved request `{rid}` ({counts}){tail}"
        if event == "vote-approve":
            more = max(request.approvals_required - len(request.approvers), 0)
            head += f". Waiting for {more} more from {groups}"
            head_md += f". Waiting for {more} more from {groups}"
        return _Parts(head, head_md)
    if event in ("vote-deny", "denied"):
        return _Parts(
            f"{who} denied request {rid} ({counts}){tail}",
            f"*{who}* denied request `{rid}` ({counts}){tail}",
        )
    if event == "expired":
        return _Parts(
            f"request {rid} expired with no decision ({counts})",
            f"request `{rid}` expired with no decision ({counts})",
        )
    if event == "withdrawn":
        why = _clean(request.state_reason)
        because = f": {why}" if why else ""
        return _Parts(
            f"request {rid} was withdrawn{because}",
            f"request `{rid}` was withdrawn{because}",
        )
    event_text = _clean(event, 40)
    return _Parts(
        f"request {rid}: {event_text} by {who}{tail}",
        f"request `{rid}`: {event_text} by *{who}*{tail}",
    )


def message(event: str, request: ApprovalRequest, actor: Person) -> Payload:
    """The Slack-compatible JSON body for one event: `text` (the fallback every receiver
    shows) and one mrkdwn section block."""
    parts = _parts(event, request, actor)
    context = [
        ("requester", _clean(request.requester.label, 80)),
        ("target", _clean(request.target, 80)),
        ("rule", _clean(request.rule_id, 120)),
        ("tables", ", ".join(_clean(t, 120) for t in request.tables) or "-"),
        ("approvers", ", ".join(_clean(g, 80) for g in sorted(request.approver_groups))),
        ("approvals", _counts(request)),
        ("reason", _clean(request.session_reason) or "-"),
    ]
    details = parts.details or context  # a new request's headline says the rest
    text = parts.headline + "\n" + " · ".join(f"{k}: {v}" for k, v in details)
    mrkdwn = parts.headline_md + "\n" + " · ".join(f"{k}: {v}" for k, v in details)
    return {
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": mrkdwn}}],
    }


def _settled_by_next_event(event: str, request: ApprovalRequest) -> bool:
    """A vote that settles the request: its "approved"/"denied" event says the same."""
    return event in ("vote-approve", "vote-deny") and request.final


# --------------------------------------------------------------------------- the webhooks


def webhook_host(url: str) -> str:
    """What a log may say about a webhook URL: its host (and a non-default port)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "?"


class _RedactWebhooks(logging.Filter):
    """Cuts our webhook URLs to their host in httpx's own log records ("HTTP Request: …")."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if self.urls and isinstance(record.args, tuple):
            record.args = tuple(self._redact(a) for a in record.args)
        if self.urls and isinstance(record.msg, str):
            record.msg = self._redact(record.msg)
        return True

    def _redact(self, value: object) -> object:
        if not isinstance(value, str | httpx.URL):
            return value
        text = str(value)
        for url, host in self.urls.items():
            if url in text:
                text = text.replace(url, f"<webhook {host}>")
        return text if text != str(value) else value


_REDACT = _RedactWebhooks()


def _protect(url: str) -> None:
    """Register `url` (and the spelling httpx logs) with the redacting filter."""
    host = webhook_host(url)
    _REDACT.urls[url] = host
    try:
        _REDACT.urls[str(httpx.URL(url))] = host
    except Exception:  # noqa: BLE001 - an unparsable URL fails at delivery, logged there
        pass
    logger = logging.getLogger("httpx")
    if _REDACT not in logger.filters:
        logger.addFilter(_REDACT)


@dataclass(slots=True)
class _Channel:
    url: str
    host: str
    queue: asyncio.Queue[tuple[str, str, Payload]]
    dropped: int = 0
    task: asyncio.Task[None] | None = None


class WebhookNotifier:
    """POSTs Slack-compatible JSON to every URL, in the background, with retries.

    `retries` is the number of retries after the first attempt (so `retries + 1` POSTs at
    most per message and URL); the n-th retry waits `base_delay * 2**(n-1)` seconds (at most
    `MAX_BACKOFF`), or the receiver's `Retry-After` seconds. `client` is for tests (it is
    not closed by `close()`); `sleep` too (to record the delays instead of waiting them).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        retries: int = 5,
        base_delay: float = 0.5,
        timeout: float = 5.0,
        client: httpx.AsyncClient | None = None,
        queue_size: int = QUEUE_SIZE,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.retries = max(retries, 0)
        self.base_delay = max(base_delay, 0.0)
        self.timeout = timeout
        self._client = client
        self._own_client = client is None
        self._sleep = sleep
        self._closed = False
        self._channels = [
            _Channel(url, webhook_host(url), asyncio.Queue(maxsize=max(queue_size, 1)))
            for url in dict.fromkeys(urls)
        ]
        for url in dict.fromkeys(urls):
            _protect(url)

    # ------------------------------------------------------------------ the gateway's side
    def notify(self, event: str, request: ApprovalRequest, actor: Person) -> None:
        try:
            if self._closed or not self._channels or _settled_by_next_event(event, request):
                return
            payload = message(event, request, actor)
            for channel in self._channels:
                self._enqueue(channel, (event, request.id, payload))
        except Exception:  # noqa: BLE001 - a notification must never fail the caller
            log.exception("approval notification of %s not queued", event)

    def _enqueue(self, channel: _Channel, item: tuple[str, str, Payload]) -> None:
        while True:
            try:
                channel.queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                old_event, old_id, _ = channel.queue.get_nowait()
                channel.queue.task_done()
                channel.dropped += 1
                if channel.dropped % _DROP_LOG_EVERY == 1:
                    log.warning(
                        "webhook queue for %s is full: dropped the oldest notification "
                        "(%s of request %s; %d dropped so far)",
                        channel.host,
                        old_event,
                        old_id,
                        channel.dropped,
                    )

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start one delivery task per URL (idempotent); call it in the broker's loop."""
        if self._closed:
            raise RuntimeError("this notifier is closed")
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        for channel in self._channels:
            if channel.task is None:
                channel.task = spawn(self._run(channel), name=f"webhook {channel.host}")

    async def drain(self) -> None:
        """Wait until every queued message was delivered or given up (tests, shutdown)."""
        await asyncio.gather(*(c.queue.join() for c in self._channels))

    async def close(self, grace: float = 0.0) -> None:
        """Stop the delivery tasks, first waiting up to `grace` seconds for the queues to
        drain; messages still queued are lost. Idempotent."""
        if grace > 0 and not self._closed and all(c.task for c in self._channels):
            try:
                await asyncio.wait_for(self.drain(), grace)
            except TimeoutError:
                pending = sum(c.queue.qsize() for c in self._channels)
                log.warning("closing the webhooks with %d notifications undelivered", pending)
        self._closed = True
        tasks = [c.task for c in self._channels if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels:
            channel.task = None
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ delivery
    async def _run(self, channel: _Channel) -> None:
        while True:
            event, request_id, payload = await channel.queue.get()
            try:
                await self._deliver(channel, event, request_id, payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the task must outlive any one message
                log.error(
                    "webhook %s: notification %s of request %s not sent (%s)",
                    channel.host,
                    event,
                    request_id,
                    type(exc).__name__,
                )
            finally:
                channel.queue.task_done()

    async def _deliver(
        self, channel: _Channel, event: str, request_id: str, payload: Payload
    ) -> None:
        assert self._client is not None
        last, wait = "no answer", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                await self._sleep(wait)
            wait = min(self.base_delay * 2**attempt, MAX_BACKOFF)  # before the next retry
            try:
                response = await self._client.post(channel.url, json=payload, timeout=self.timeout)
            except httpx.TransportError as exc:  # connect, timeout, protocol errors
                last = type(exc).__name__
                continue
            status = response.status_code
            if response.is_success:
                return
            if status == 429 or status >= 500:
                last = f"HTTP {status}"
                retry_after = _retry_after(response)
                wait = wait if retry_after is None else retry_after
                continue
            log.error(
                "webhook %s refused notification %s of request %s: HTTP %d (not retried)",
                channel.host,
                event,
                request_id,
                status,
            )
            return
        log.error(
            "webhook %s: gave up on notification %s of request %s after %d attempts (%s)",
            channel.host,
            event,
            request_id,
            self.retries + 1,
            last,
        )


def _retry_after(response: httpx.Response) -> float | None:
    """A `Retry-After` in seconds (an HTTP date is not honoured: backoff applies)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, MAX_RETRY_AFTER)
