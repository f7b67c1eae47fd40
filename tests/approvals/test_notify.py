"""approvals.notify: Slack-compatible webhooks for requests and decisions, against a real
local HTTP receiver (an asyncio server on 127.0.0.1 that records what it is sent and answers
from a script: 500 a few times, 429 with Retry-After, 404, or never).

No test depends on the clock: the notifier's `sleep` is replaced by one that records the
delays it was asked for, so backoff and Retry-After are asserted as values, and deliveries as
counts and order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from guard.broker.approvals.model import Person, decide, expire, withdraw
from guard.broker.approvals.notify import (
    Notifier,
    NullNotifier,
    WebhookNotifier,
    message,
    webhook_host,
)
from guard.broker.settings import ApprovalSettings, BrokerSettings
from tests.approvals.approval_examples import ALICE, BOB, CAROL, T0, principal, request

GUARD = Person("guard", "guard", "guard", frozenset())
SECRET_PATH = "/services/T000/B000/s3cr3tpath"
SECRET_QUERY = "token=qu3rysecret"

# --- a local receiver -------------------------------------------------------------------------


class Receiver:
    """A tiny HTTP/1.1 server: one request per connection, answers from `script` (then 200)."""

    def __init__(self, script: list[tuple[int, dict[str, str]]] | None = None, *, hang=False):
        self.script = list(script or [])
        self.hang = hang
        self.hits: list[tuple[str, dict[str, Any]]] = []
        self.hit = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [body for _path, body in self.hits]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        assert method == "POST"
        assert headers["content-type"] == "application/json"
        self.hits.append((path, json.loads(body)))
        self.hit.set()
        if self.hang:
            await asyncio.Event().wait()  # never answers (cancelled when the server closes)
        status, extra = self.script.pop(0) if self.script else (200, {})
        more = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
        head = f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n{more}\r\n"
        writer.write(head.encode() + b"ok")
        await writer.drain()
        writer.close()

    async def wait_for(self, n: int) -> None:
        async def enough() -> None:
            while len(self.hits) < n:
                self.hit.clear()
                await self.hit.wait()

        await asyncio.wait_for(enough(), 30)  # a safety net, not a timing assertion


class Sleeps:
    """Stands in for asyncio.sleep: records the delay, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "guard.approvals" and r.levelno >= level
    ]


REQ = request(request_id="3f9a1c2e")


# --- delivery ---------------------------------------------------------------------------------


def test_every_url_gets_every_message_in_order():
    async def scenario():
        async with Receiver() as a, Receiver() as b:
            n = WebhookNotifier([a.url("/one?x=1"), b.url("/two")], sleep=Sleeps())
            await n.start()
            n.notify("requested", REQ, Person.of(ALICE))
            n.notify("approved", decide(REQ, BOB, approve=True, comment="", now=T0), Person.of(BOB))
            await n.drain()
            await n.close()
            return a.hits, b.hits

    a, b = run(scenario)
    assert [path for path, _ in a] == ["/one?x=1", "/one?x=1"]
    assert [path for path, _ in b] == ["/two", "/two"]
    assert [body for _, body in a] == [body for _, body in b]
    first, second = (body for _, body in a)
    assert first["text"].startswith("Alice asks for approval on demo")
    assert second["text"].startswith("Bob approved request 3f9a1c2e (1/1)")
    for body in (first, second):
        assert set(body) == {"text", "blocks"}
        [block] = body["blocks"]
        assert block["type"] == "section"
        assert block["text"]["type"] == "mrkdwn"
        assert "3f9a1c2e" in block["text"]["text"]


def test_5xx_is_retried_with_exponential_backoff_then_delivered(caplog):
    sleeps = Sleeps()

    async def scenario():
        async with Receiver([(500, {}), (502, {}), (503, {})]) as r:
            n = WebhookNotifier([r.url()], retries=5, base_delay=0.01, sleep=sleeps)
            await n.start()
            n.notify("requested", REQ, Person.of(ALICE))
            await n.drain()
            await n.close()
            return r.bodies

    bodies = run(scenario)
    assert len(bodies) == 4 and all(b == bodies[0] for b in bodies)
    assert sleeps.delays == [0.01, 0.02, 0.04]
    assert ours(caplog) == []


def test_429_retry_after_seconds_is_honoured_and_a_date_falls_back_to_backoff():
    sleeps = Sleeps()
    date = "Wed, 21 Oct 2015 07:28:00 GMT"

    async def scenario():
        script = [(429, {"Retry-After": "7"}), (503, {"Retry-After": date}), (429, {})]
        async with Receiver(script) as r:
            n = WebhookNotifier([r.url()], retries=5, base_delay=0.5, sleep=sleeps)
            await n.start()
            n.notify("requested", REQ, Person.of(ALICE))
            await n.drain()
            await n.close()
            return len(r.hits)

    assert run(scenario) == 4
    assert sleeps.delays == [7.0, 1.0, 2.0]


def test_gives_up_after_retries_with_one_log_line_and_goes_on(caplog):
    sleeps = Sleeps()

    async def scenario():
        async with Receiver([(500, {})] * 3) as r:
            n = WebhookNotifier([r.url(SECRET_PATH)], retries=2, base_delay=0.25, sleep=sleeps)
            await n.start()
            n.notify("requested", REQ, Person.of(ALICE))
            await n.drain()
            given_up = len(r.hits)
            n.notify("expired", expire(REQ, T0 + timedelta(hours=1)), GUARD)
            await n.drain()
            await n.close()
            return given_up, r.bodies, r.port

    given_up, bodies, port = run(scenario)
    assert given_up == 3  # the first attempt and 2 retries
    assert sleeps.delays == [0.25, 0.5]
    assert bodies[-1]["text"].startswith("request 3f9a1c2e expired")  # the task lives on
    [line] = ours(caplog)
    assert "gave up" in line and "3 attempts" in line and "HTTP 500" in line
    assert f"127.0.0.1:{port}" in line and "services" not in line


def test_a_4xx_is_not_retried(caplog):
    sleeps = Sleeps()

    async def scenario():
        async with Receiver([(404, {})]) as r:
            n = WebhookNotifier([r.url()], sleep=sleeps)
            await n.start()
            n.notify("requested", REQ, Person.of(ALICE))
            await n.drain()
            await n.close()
            return len(r.hits)

    assert run(scenario) == 1
    assert sleeps.delays == []
    [line] = ours(caplog)
    assert "HTTP 404" in line and "not retried" in line


def test_a_full_queue_drops_the_oldest(caplog):
    async def scenario():
        async with Receiver() as r:
            n = WebhookNotifier([r.url()], queue_size=3, sleep=Sleeps())
            for i in range(5):  # not started yet: all of them queue
                n.notify("requested", replace(REQ, id=f"req-{i}"), Person.of(ALICE))
            await n.start()
            await n.drain()
            await n.close()
            return r.bodies

    bodies = run(scenario)
    assert [b["text"].rsplit(" ", 1)[-1].split("\n")[0] for b in bodies] == [
        "req-2",
        "req-3",
        "req-4",
    ]
    [line] = ours(caplog)  # the first drop is logged; then every 100th
    assert "full" in line and "req-0" in line


def test_notify_never_raises_and_a_dead_receiver_is_given_up(caplog):
    sleeps = Sleeps()
    port = free_port()  # nothing listens there

    async def scenario():
        n = WebhookNotifier([f"http://127.0.0.1:{port}/hook"], retries=1, sleep=sleeps)
        n.notify("requested", REQ, Person.of(ALICE))  # before start: queued
        await n.start()
        n.notify("requested", None, Person.of(ALICE))  # type: ignore[arg-type]
        n.notify("approved", REQ, None)  # type: ignore[arg-type]
        await n.drain()
        await n.close()
        await n.close()  # idempotent
        n.notify("requested", REQ, Person.of(ALICE))  # after close: ignored

    run(scenario)
    lines = ours(caplog)
    assert sum("not queued" in line for line in lines) == 2
    [gave_up] = [line for line in lines if "gave up" in line]
    assert "ConnectError" in gave_up and "2 attempts" in gave_up
    assert sleeps.delays == [0.5]


def test_a_receiver_that_never_answers_holds_up_no_other():
    async def scenario():
        async with Receiver(hang=True) as slow, Receiver() as fine:
            n = WebhookNotifier([slow.url(), fine.url()], timeout=3600, sleep=Sleeps())
            await n.start()
            for i in range(3):
                n.notify("requested", replace(REQ, id=f"req-{i}"), Person.of(ALICE))
            await fine.wait_for(3)
            await slow.wait_for(1)
            await n.close()  # cancels the hung delivery
            return len(slow.hits), len(fine.hits)

    assert run(scenario) == (1, 3)


def test_close_stops_a_delivery_that_is_backing_off():
    async def forever(delay: float) -> None:
        await asyncio.Event().wait()

    async def scenario():
        async with Receiver([(500, {})]) as r:
            n = WebhookNotifier([r.url()], sleep=forever)
            await n.start()
            await n.start()  # idempotent
            n.notify("requested", REQ, Person.of(ALICE))
            await r.wait_for(1)
            await asyncio.wait_for(n.close(), 30)
            return len(r.hits)

    assert run(scenario) == 1


def test_logs_show_the_webhook_host_never_its_path_or_query(caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario():
        async with Receiver([(200, {}), (500, {}), (500, {}), (404, {})]) as r:
            url = r.url(f"{SECRET_PATH}?{SECRET_QUERY}")
            dead = f"http://127.0.0.1:{free_port()}{SECRET_PATH}?{SECRET_QUERY}"
            n = WebhookNotifier([url, dead], retries=1, sleep=Sleeps())
            await n.start()
            for event in ("requested", "expired", "withdrawn"):
                n.notify(event, REQ, Person.of(ALICE))
            await n.drain()
            await n.close()
            return r.port, len(r.hits)

    port, hits = run(scenario)
    assert hits == 4  # delivered; 500, 500 given up; 404 refused
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "s3cr3tpath" not in text and "qu3rysecret" not in text and "B000" not in text
    assert any(r.name == "httpx" for r in caplog.records)  # httpx's own lines were redacted
    assert f"<webhook 127.0.0.1:{port}>" in text
    assert sum("gave up" in line for line in ours(caplog)) == 4  # 1 + 3 for the dead one


def test_webhook_host_is_all_a_log_may_name():
    assert webhook_host("https://hooks.slack.com/services/T/B/X?a=b") == "hooks.slack.com"
    assert webhook_host("http://127.0.0.1:8080/x") == "127.0.0.1:8080"
    assert webhook_host("http://[::1]:x/") == "?"


def test_a_settling_vote_is_announced_by_the_settling_event_only():
    async def scenario():
        async with Receiver() as r:
            n = WebhookNotifier([r.url()], sleep=Sleeps())
            await n.start()
            two = replace(REQ, approvals_required=2)
            first = decide(two, BOB, approve=True, comment="fine", now=T0)
            second = decide(first, CAROL, approve=True, comment="", now=T0)
            n.notify("vote-approve", first, Person.of(BOB))
            n.notify("vote-approve", second, Person.of(CAROL))  # settles it: not sent
            n.notify("approved", second, Person.of(CAROL))
            await n.drain()
            await n.close()
            return [b["text"].split("\n")[0] for b in r.bodies]

    assert run(scenario) == [
        "Bob approved request 3f9a1c2e (1/2) — fine. Waiting for 1 more from security-leads",
        "Carol approved request 3f9a1c2e (2/2)",
    ]


def test_null_notifier_and_both_satisfy_the_protocol():
    async def scenario():
        null = NullNotifier()
        await null.start()
        null.notify("requested", REQ, Person.of(ALICE))
        await null.close()

    run(scenario)
    notifiers: list[Notifier] = [NullNotifier(), WebhookNotifier([])]
    for n in notifiers:
        n.notify("requested", REQ, Person.of(ALICE))


# --- what a message says ----------------------------------------------------------------------


def headline(event, req, actor) -> tuple[str, str]:
    body = message(event, req, Person.of(actor) if not isinstance(actor, Person) else actor)
    return body["text"], body["blocks"][0]["text"]["text"]


def test_a_new_request_names_everything_a_reviewer_needs():
    text, md = headline("requested", REQ, ALICE)
    first, details = text.split("\n")
    assert first == (
        "Alice asks for approval on demo: rule transactions-need-approval reads "
        "public.transactions — INC-123. Approve: guard approve 3f9a1c2e"
    )
    assert details == "needs: 1 approval from security-leads · approvals: 0/1 · request: 3f9a1c2e"
    assert "`guard approve 3f9a1c2e`" in md and "*Alice*" in md


def test_decisions_name_who_acted_their_comment_and_the_counts():
    two = request(request_id="3f9a1c2e", approvals_required=2)
    voted = decide(two, BOB, approve=True, comment="looks fine", now=T0)
    text, md = headline("vote-approve", voted, BOB)
    assert text.split("\n")[0] == (
        "Bob approved request 3f9a1c2e (1/2) — looks fine. Waiting for 1 more from security-leads"
    )
    assert "*Bob* approved request `3f9a1c2e` (1/2)" in md

    approved = decide(REQ, BOB, approve=True, comment="", now=T0)
    text, _ = headline("approved", approved, BOB)
    first, details = text.split("\n")
    assert first == "Bob approved request 3f9a1c2e (1/1)"
    assert details == (
        "requester: Alice · target: demo · rule: transactions-need-approval · "
        "tables: public.transactions · approvers: security-leads · approvals: 1/1 · "
        "reason: INC-123"
    )

    denied = decide(REQ, CAROL, approve=False, comment="not during the freeze", now=T0)
    for event in ("vote-deny", "denied"):
        text, _ = headline(event, denied, CAROL)
        assert text.split("\n")[0] == "Carol denied request 3f9a1c2e (0/1) — not during the freeze"


def test_expiry_withdrawal_and_unknown_events():
    text, _ = headline("expired", expire(REQ, T0 + timedelta(hours=1)), GUARD)
    assert text.split("\n")[0] == "request 3f9a1c2e expired with no decision (0/1)"
    assert "requester: Alice" in text and "reason: INC-123" in text
    text, _ = headline("withdrawn", withdraw(REQ, "the session ended"), GUARD)
    assert text.split("\n")[0] == "request 3f9a1c2e was withdrawn: the session ended"
    text, _ = headline("reopened", REQ, BOB)
    assert text.split("\n")[0] == "request 3f9a1c2e: reopened by Bob"


@pytest.mark.parametrize(
    "event",
    ["requested", "vote-approve", "vote-deny", "approved", "denied", "expired", "withdrawn"],
)
def test_no_message_carries_the_statement(event):
    secretive = replace(REQ, statement="SELECT secret_column FROM transactions WHERE id = $1")
    body = json.dumps(message(event, secretive, Person.of(BOB)))
    assert "secret_column" not in body and "$1" not in body
    assert "3f9a1c2e" in body


def test_typed_text_cannot_ping_or_inject_markup():
    mallory = principal("mallory", "engineering")
    req = replace(
        request(request_id="r1", requester=mallory),
        session_reason="<!channel> @here & <https://evil.example|click>\nsecond line " + "x" * 500,
    )
    text, md = headline("requested", req, mallory)
    for shown in (text, md):
        assert "<!channel>" not in shown and "<https" not in shown and "@here" not in shown
        assert "&lt;!channel&gt;" in shown and "&amp;" in shown
        assert "second line" in shown.split("\n")[0]  # flattened to one line
        assert "x" * 200 not in shown  # cut short
    denied = decide(req, BOB, approve=False, comment="@channel <!here>", now=T0)
    text, _ = headline("denied", denied, BOB)
    assert "@channel" not in text and "<!here>" not in text


# --- settings ---------------------------------------------------------------------------------

BASE = {
    "state_dir": "/var/lib/guard",
    "policy_file": "/etc/guard/policies.yaml",
    "oidc": {"issuer": "https://idp.example"},
    "openbao": {"addr": "https://bao.example"},
    "targets": {},
    "audit": {"path": "/var/log/guard/audit.jsonl"},
}


def test_settings_take_http_and_https_webhooks_and_keep_them_out_of_repr():
    assert BrokerSettings.model_validate(BASE).approvals.webhooks == []
    urls = ["https://hooks.slack.com/services/T/B/XSECRET", "http://mattermost.internal:8065/h"]
    settings = BrokerSettings.model_validate({**BASE, "approvals": {"webhooks": urls}})
    assert settings.approvals.webhooks == urls
    assert "XSECRET" not in repr(settings)


@pytest.mark.parametrize(
    "url", ["ftp://hooks.example/x", "hooks.slack.com/services/x", "https://", "http://h:99999/"]
)
def test_settings_refuse_other_webhook_urls(url):
    with pytest.raises(ValidationError, match=r"webhooks\[1\] is not an http\(s\) URL"):
        ApprovalSettings(webhooks=["https://ok.example/h", url])
    with pytest.raises(ValidationError, match="Extra inputs"):
        ApprovalSettings.model_validate({"webhooks": [], "webhook": "x"})
