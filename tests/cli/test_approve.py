"""`guard approve`, `guard deny` and `guard requests` against a fake broker
(a `guard.cli.http` transport), through CliRunner and `main()` alike: what reaches the broker,
what the user sees, and how the broker's refusals read."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from guard.cli import console, http
from guard.cli.client import BrokerClient
from guard.cli.main import main
from guard.cli.profile import Profile, save_profile
from tests.cli.invoke import guard  # noqa: F401

TOKEN = "header.bob-id-token.signature"


def request_info(id: str = "apr-7f3k", **changes) -> dict:
    # Times relative to when the request is built, so ages read the same however long
    # after collection the test runs.
    now = datetime.now(UTC)
    info = {
        "id": id,
        "state": "pending",
        "target": "demo",
        "session_id": "ses-1",
        "requester": "alice",
        "requester_groups": ["engineers"],
        "session_reason": "INC-123 refund stuck",
        "statement": "SELECT * FROM transactions WHERE amount > $1",
        "tables": ["public.transactions"],
        "rule": "approve-transactions",
        "approver_groups": ["security-leads"],
        "approvals_required": 2,
        "votes": [
            {
                "approver": "carol",
                "approver_groups": ["security-leads"],
                "approve": True,
                "comment": "fine by me",
                "at": (now - timedelta(minutes=1)).isoformat(),
            }
        ],
        "created_at": (now - timedelta(minutes=5)).isoformat(),
        "expires_at": (now + timedelta(minutes=10)).isoformat(),
        "can_decide": True,
        "why_not": None,
    }
    info.update(changes)
    return info


def error(status: int, code: str, message: str, hint: str | None = None) -> http.Response:
    return http.Response(status, json={"error": code, "message": message, "hint": hint})


class FakeBroker:
    """The approvals API as the contract describes it, recording every call."""

    def __init__(self) -> None:
        self.requests = {"apr-7f3k": request_info()}
        self.mine: list[dict] = []
        self.calls: list[tuple[str, str, dict | None]] = []
        self.answers: dict[tuple[str, str], http.Response] = {}  # forced answers

    def posts(self) -> list[tuple[str, dict | None]]:
        return [(path, body) for method, path, body in self.calls if method == "POST"]

    def __call__(self, request: http.Request) -> http.Response:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, path, body))
        if (request.method, path) in self.answers:
            return self.answers[(request.method, path)]
        if (request.method, path) == ("GET", "/v1/approvals"):
            return http.Response(200, json=list(self.requests.values()))
        if (request.method, path) == ("GET", "/v1/requests"):
            return http.Response(200, json=self.mine)
        parts = path.split("/")  # "", "v1", "approvals", id[, verb]
        info = self.requests.get(parts[3]) if len(parts) > 3 else None
        if info is None:
            return error(404, "not_found", "no such approval request")
        if request.method == "GET" and len(parts) == 4:
            return http.Response(200, json=info)
        vote = {
            "approver": "bob",
            "approver_groups": ["security-leads"],
            "approve": parts[4] == "approve",
            "comment": body["comment"],
            "at": datetime.now(UTC).isoformat(),
        }
        state = "approved" if parts[4] == "approve" else "denied"
        reason = "" if state == "approved" else f"denied by bob: {body['comment']}"
        decided = {**info, "state": state, "state_reason": reason, "votes": [*info["votes"], vote]}
        return http.Response(200, json=decided)


@pytest.fixture
def broker(tmp_path, monkeypatch) -> Iterator[FakeBroker]:
    monkeypatch.setenv("GUARD_HOME", str(tmp_path))
    monkeypatch.setenv("GUARD_KEYRING", "file")
    monkeypatch.setenv("GUARD_ID_TOKEN", TOKEN)
    for var in ("GUARD_ISSUER", "GUARD_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    # A wide terminal, so table cells are not wrapped (the consoles are made on first use).
    monkeypatch.setenv("COLUMNS", "240")
    console.stdout.cache_clear()
    save_profile(Profile(broker_url="http://broker.test", issuer="http://idp.test"))
    fake = FakeBroker()
    monkeypatch.setattr(BrokerClient, "transport", fake)
    yield fake
    console.stdout.cache_clear()


def assert_failed(outcome, code: int = 1) -> tuple[str, str]:
    """The failure's `error:` and `hint:` lines (the last two of stderr)."""
    assert "Traceback" not in outcome.out + outcome.err
    assert outcome.code == code, outcome
    lines = outcome.err.splitlines()
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), outcome.err
    return lines[-2], lines[-1]


# guard approve: the list ---------------------------------------------------------------


def test_list_shows_what_a_reviewer_needs_in_a_table(broker, guard):  # noqa: F811
    broker.requests["apr-2"] = request_info("apr-2", requester="dave", votes=[])
    outcome = guard("approve")
    assert outcome.code == 0, outcome
    assert broker.calls == [("GET", "/v1/approvals", None)]
    for text in ("apr-7f3k", "apr-2", "alice", "dave", "demo", "approve-transactions"):
        assert text in outcome.out
    assert "SELECT * FROM transactions" in outcome.out
    assert "1/2" in outcome.out and "0/2" in outcome.out  # approvals so far / required
    assert "5m 0" in outcome.out  # age
    assert "9m 5" in outcome.out or "10m 0" in outcome.out  # expires in


def test_list_shortens_long_statements(broker, guard):  # noqa: F811
    long = "SELECT " + ", ".join(f"column_{n}" for n in range(40)) + " FROM transactions"
    broker.requests = {"apr-long": request_info("apr-long", statement=long)}
    outcome = guard("approve")
    assert outcome.code == 0
    assert "…" in outcome.out and "column_39" not in outcome.out


def test_list_as_json_is_the_broker_requests(broker, guard):  # noqa: F811
    outcome = guard("approve", "--json")
    assert outcome.code == 0
    listed = json.loads(outcome.out)
    assert [item["id"] for item in listed] == ["apr-7f3k"]
    assert listed[0]["requester"] == "alice" and listed[0]["approvals_required"] == 2


def test_empty_list_says_so(broker, guard):  # noqa: F811
    broker.requests = {}
    outcome = guard("approve")
    assert outcome.code == 0 and outcome.out == ""
    assert "no pending requests" in outcome.err
    assert json.loads(guard("approve", "--json").out) == []


def test_watch_refreshes_until_ctrl_c_and_exits_quietly(broker, guard, monkeypatch):  # noqa: F811
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt
        if len(naps) == 1:
            broker.requests["apr-new"] = request_info("apr-new", requester="erin")

    monkeypatch.setattr("time.sleep", sleep)
    outcome = guard("approve", "--watch")
    assert outcome.code == 0, outcome
    assert outcome.err == ""
    assert naps == [2.0, 2.0, 2.0]
    assert [c for c in broker.calls if c[1] == "/v1/approvals"] == [
        ("GET", "/v1/approvals", None)
    ] * 3
    assert "apr-new" in outcome.out and "erin" in outcome.out  # a later refresh


def test_watch_survives_a_broker_restart(broker, guard, monkeypatch):  # noqa: F811
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 1:
            broker.answers[("GET", "/v1/approvals")] = error(503, "unavailable", "restarting")
        if len(naps) == 2:
            del broker.answers[("GET", "/v1/approvals")]
        if len(naps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr("time.sleep", sleep)
    outcome = guard("approve", "--watch")
    assert outcome.code == 0, outcome
    assert "apr-7f3k" in outcome.out


def test_watch_stops_on_a_refusal(broker, guard, monkeypatch):  # noqa: F811
    broker.answers[("GET", "/v1/approvals")] = error(401, "unauthorized", "token expired")
    monkeypatch.setattr("time.sleep", lambda s: pytest.fail("no refresh after a 401"))
    first, hint = assert_failed(guard("approve", "--watch"))
    assert first == "error: token expired" and "guard login" in hint


# guard approve ID --------------------------------------------------------------------


def test_approve_shows_the_request_in_full_then_approves_with_the_comment(broker, guard):  # noqa: F811
    outcome = guard("approve", "apr-7f3k", "--comment", "ok for INC-123")
    assert outcome.code == 0, outcome
    assert broker.calls == [
        ("GET", "/v1/approvals/apr-7f3k", None),
        ("POST", "/v1/approvals/apr-7f3k/approve", {"comment": "ok for INC-123"}),
    ]  # stdin is not a terminal: no question asked
    for text in (
        "alice (engineers)",  # requester and groups
        "demo",
        "ses-1",
        "INC-123 refund stuck",
        "SELECT * FROM transactions WHERE amount > $1",
        "public.transactions",
        "approve-transactions",
        "security-leads",
        "1 of 2 so far",
        "carol",  # votes so far
        "fine by me",
        "5m 0",  # age
    ):
        assert text in outcome.out, text
    assert "approved request apr-7f3k" in outcome.out


def test_approve_says_when_more_approvals_are_needed(broker, guard):  # noqa: F811
    broker.requests["apr-7f3k"]["votes"] = []
    broker.answers[("POST", "/v1/approvals/apr-7f3k/approve")] = http.Response(
        200,
        json=request_info(
            votes=[
                {
                    "approver": "bob",
                    "approver_groups": ["security-leads"],
                    "approve": True,
                    "at": datetime.now(UTC).isoformat(),
                }
            ]
        ),
    )
    outcome = guard("approve", "apr-7f3k")
    assert outcome.code == 0
    assert broker.posts() == [("/v1/approvals/apr-7f3k/approve", {"comment": ""})]
    assert "1/2" in outcome.out and "waiting for 1 more from security-leads" in outcome.out


def test_approve_json_prints_the_resulting_request_only(broker, guard):  # noqa: F811
    outcome = guard("approve", "apr-7f3k", "--json", "--comment", "ok")
    assert outcome.code == 0
    result = json.loads(outcome.out)
    assert result["id"] == "apr-7f3k" and result["state"] == "approved"
    assert result["votes"][-1]["approver"] == "bob" and result["votes"][-1]["comment"] == "ok"
    assert "alice (engineers)" in outcome.err  # the request was still shown, on stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "posted"), [("y\n", True), ("n\n", False), ("\n", False)])
def test_a_terminal_is_asked_first(broker, monkeypatch, capsys, answer, posted):
    monkeypatch.setattr("sys.stdin", Terminal(answer))
    code = main(["approve", "apr-7f3k"])
    out, err = capsys.readouterr()
    assert "Approve request apr-7f3k?" in err
    assert bool(broker.posts()) is posted
    if posted:
        assert code == 0 and "approved request apr-7f3k" in out
    else:
        assert code == 1
        assert "error: request apr-7f3k was not approved" in err and "--yes" in err


def test_yes_skips_the_question_on_a_terminal(broker, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", Terminal(""))
    assert main(["approve", "apr-7f3k", "--yes"]) == 0
    assert "Approve request" not in capsys.readouterr().err
    assert broker.posts() == [("/v1/approvals/apr-7f3k/approve", {"comment": ""})]


def test_the_id_is_one_path_segment(broker, guard):  # noqa: F811
    first, hint = assert_failed(guard("approve", "../sessions"))
    assert broker.calls == [("GET", "/v1/approvals/..%2Fsessions", None)]
    assert first == "error: no such request: ../sessions"


# guard deny ----------------------------------------------------------------------------


def test_deny_posts_the_reason_and_prints_the_result(broker, guard):  # noqa: F811
    outcome = guard("deny", "apr-7f3k", "--reason", "use the reporting replica")
    assert outcome.code == 0, outcome
    assert broker.posts() == [
        ("/v1/approvals/apr-7f3k/deny", {"comment": "use the reporting replica"})
    ]
    assert "request apr-7f3k is denied" in outcome.out
    assert "use the reporting replica" in outcome.out


def test_deny_json(broker, guard):  # noqa: F811
    outcome = guard("deny", "apr-7f3k", "--reason", "no", "--json")
    assert outcome.code == 0
    assert json.loads(outcome.out)["state"] == "denied"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deny", "apr-7f3k"], "error: missing option '--reason'"),
        (["deny", "apr-7f3k", "--reason", "  "], "error: the reason is empty"),
        (["deny", "--reason", "no"], "error: missing argument 'ID'"),
        (["approve", "--comment", "ok"], "error: --comment and --yes need a request ID"),
        (["approve", "--watch", "--json"], "error: --watch and --json cannot be combined"),
        (["approve", "apr-7f3k", "--watch"], "error: --watch lists requests"),
    ],
)
def test_usage_errors_reach_no_broker(broker, guard, argv, message):  # noqa: F811
    first, _ = assert_failed(guard(*argv), code=2)
    assert first.startswith(message)
    assert broker.calls == []
    assert len(guard(*argv).err.splitlines()) == 2


# The broker's refusals -----------------------------------------------------------------

SOD = "segregation of duties: you cannot approve your own request"


def test_403_on_approve_is_the_broker_message_and_who_else_can(broker, guard):  # noqa: F811
    broker.answers[("POST", "/v1/approvals/apr-7f3k/approve")] = error(403, "forbidden", SOD)
    first, hint = assert_failed(guard("approve", "apr-7f3k"))
    assert first == f"error: {SOD}"
    assert hint == "hint: ask another member of security-leads to decide it"


def test_a_request_the_caller_cannot_decide_is_refused_before_asking(
    broker,
    monkeypatch,
    capsys,
):
    broker.requests["apr-7f3k"].update(can_decide=False, why_not=SOD)
    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert main(["approve", "apr-7f3k"]) == 1
    out, err = capsys.readouterr()
    assert "Approve request" not in err and broker.posts() == []
    assert err.splitlines()[-2:] == [
        f"error: {SOD}",
        "hint: ask another member of security-leads to decide it",
    ]
    assert "alice" in out  # the request is still shown


def test_403_on_deny_keeps_the_broker_message_and_hint(broker, guard):  # noqa: F811
    broker.answers[("POST", "/v1/approvals/apr-7f3k/deny")] = error(
        403, "forbidden", "you are not in\nsecurity-leads", "ask a member of security-leads"
    )
    first, hint = assert_failed(guard("deny", "apr-7f3k", "--reason", "no"))
    assert first == "error: you are not in security-leads"  # one line
    assert hint == "hint: ask a member of security-leads"


@pytest.mark.parametrize("argv", [["approve", "apr-nope"], ["deny", "apr-nope", "--reason", "x"]])
def test_404_is_no_such_request(broker, guard, argv):  # noqa: F811
    first, hint = assert_failed(guard(*argv))
    assert first == "error: no such request: apr-nope"
    assert "`guard approve` lists" in hint
    assert all(path.startswith("/v1/approvals/apr-nope") for _, path, _ in broker.calls)


def test_409_is_the_broker_message(broker, guard):  # noqa: F811
    broker.answers[("POST", "/v1/approvals/apr-7f3k/deny")] = error(
        409, "conflict", "request apr-7f3k was already approved by carol, dave"
    )
    first, hint = assert_failed(guard("deny", "apr-7f3k", "--reason", "too late"))
    assert first == "error: request apr-7f3k was already approved by carol, dave"
    assert "no longer be decided" in hint


def test_409_on_approve_after_the_request_was_shown(broker, guard):  # noqa: F811
    broker.answers[("POST", "/v1/approvals/apr-7f3k/approve")] = error(
        409, "conflict", "request apr-7f3k expired"
    )
    first, _ = assert_failed(guard("approve", "apr-7f3k"))
    assert first == "error: request apr-7f3k expired"


def test_a_decided_request_is_not_decided_again(broker, guard):  # noqa: F811
    broker.requests["apr-7f3k"].update(state="denied", state_reason="denied by carol: no")
    first, _ = assert_failed(guard("approve", "apr-7f3k"))
    assert (
        first
        == "error: request apr-7f3k is denied: denied by carol: no; it can no longer be decided"
    )
    assert broker.posts() == []


def test_401_asks_to_log_in(broker, guard):  # noqa: F811
    broker.answers[("GET", "/v1/requests")] = error(401, "unauthorized", "token expired")
    first, hint = assert_failed(guard("requests"))
    assert first == "error: token expired" and "guard login" in hint


def test_503_and_an_unreachable_broker_are_one_error(broker, guard, monkeypatch):  # noqa: F811
    broker.answers[("GET", "/v1/approvals")] = error(
        503, "unavailable", "the approval store is unavailable", "try again shortly"
    )
    first, hint = assert_failed(guard("approve"))
    assert first == "error: the approval store is unavailable" and hint == "hint: try again shortly"

    def down(request):
        raise http.ConnectError("refused")

    monkeypatch.setattr(BrokerClient, "transport", down)
    first, _ = assert_failed(guard("approve", "--json"))
    assert first.startswith("error: cannot reach the guard broker at http://broker.test")


def test_a_malformed_answer_is_an_error_not_a_traceback(broker, guard):  # noqa: F811
    broker.answers[("GET", "/v1/approvals")] = http.Response(200, json=[{"id": "x"}])
    first, hint = assert_failed(guard("approve"))
    assert "is not a list of approval requests" in first and "versions" in hint
    assert TOKEN not in first + hint


# guard requests ----------------------------------------------------------------------


def test_requests_lists_the_callers_own_with_their_state(broker, guard):  # noqa: F811
    broker.mine = [
        request_info("apr-3", state="pending", votes=[]),
        request_info("apr-2", state="denied", state_reason="denied by carol: use the replica"),
        request_info("apr-1", state="approved"),
    ]
    outcome = guard("requests")
    assert outcome.code == 0, outcome
    assert broker.calls == [("GET", "/v1/requests", None)]
    out = outcome.out
    assert out.index("apr-3") < out.index("apr-2") < out.index("apr-1")  # the broker's order
    for text in ("pending", "denied", "use the replica", "approved", "approve-transactions"):
        assert text in out


def test_requests_json_and_none(broker, guard):  # noqa: F811
    broker.mine = [request_info("apr-9", state="expired")]
    listed = json.loads(guard("requests", "--json").out)
    assert [(r["id"], r["state"]) for r in listed] == [("apr-9", "expired")]
    broker.mine = []
    outcome = guard("requests")
    assert outcome.code == 0 and outcome.out == "" and "no approval requests" in outcome.err
