"""`guard policy explain`: the verdict on SQL for a dev IdP user or for groups, with the rule,
the reasons, the masked columns and who can approve, through CliRunner and `main()` alike;
offline (the repository's policies.yaml, no broker, no dev stack)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from guard.cli import console
from tests.cli.invoke import guard, home  # noqa: F401

REPO_POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"


@pytest.fixture
def wide(home, monkeypatch):  # noqa: F811
    # A wide terminal, so lines are not wrapped (the consoles are made on first use).
    monkeypatch.setenv("COLUMNS", "240")
    console.stdout.cache_clear()
    yield home
    console.stdout.cache_clear()


def explain(guard, *args: str):  # noqa: F811
    return guard("policy", "explain", "--policy", str(REPO_POLICY), *args)


def explained(guard, *args: str) -> dict:  # noqa: F811
    outcome = explain(guard, *args, "--json")
    assert outcome.code == 0, outcome
    return json.loads(outcome.out)


def assert_failed(outcome, code: int = 1) -> tuple[str, str]:
    assert "Traceback" not in outcome.out + outcome.err
    assert outcome.code == code, outcome
    assert outcome.out == ""
    error, hint = outcome.err.splitlines()
    assert error.startswith("error: ") and hint.startswith("hint: ")
    return error, hint


def rows(out: str) -> list[str]:
    return [" ".join(line.split()) for line in out.splitlines()]


# --- the README tour, explained ----------------------------------------------------------


def test_alice_reading_ssn_is_allowed_with_the_column_masked(wide, guard):  # noqa: F811
    sql = "SELECT full_name, ssn FROM customers"
    outcome = explain(guard, "--as", "alice", "--db", "demo", sql)
    assert outcome.code == 0, outcome
    assert outcome.err == ""
    lines = rows(outcome.out)
    assert "as alice (engineers)" in lines
    assert "connect yes (connect_groups: engineers, security-leads, service)" in lines
    assert "statement 1: SELECT full_name, ssn FROM customers" in lines
    assert "verdict allow" in lines
    assert any(line.startswith("rule engineers-read — Reading (masked) data") for line in lines)
    assert "masked public.customers.ssn (ssn_last4)" in lines
    assert "approvers" not in outcome.out


def test_alice_drop_table_is_denied_by_deny_ddl(wide, guard):  # noqa: F811
    outcome = explain(guard, "--as", "alice", "--db", "demo", "DROP TABLE customers")
    assert outcome.code == 0, outcome
    lines = rows(outcome.out)
    assert "verdict deny" in lines
    assert "rule deny-ddl — Schema and privilege changes never go through guard" in lines
    assert (
        'message guard: statement refused by rule "deny-ddl": '
        "Schema and privilege changes never go through guard"
    ) in lines
    assert "analysis DropStmt: ddl" in lines


def test_alice_reading_transactions_needs_a_security_leads_approval(wide, guard):  # noqa: F811
    outcome = explain(guard, "--as", "alice", "--db", "demo", "SELECT * FROM transactions")
    assert outcome.code == 0, outcome
    lines = rows(outcome.out)
    assert "verdict require_approval" in lines
    assert any(line.startswith("rule transactions-need-approval — ") for line in lines)
    assert "approvers security-leads (1 approval needed)" in lines
    assert "window 30m" in lines
    assert "requester is in an approver group" not in outcome.out


def test_bob_in_security_leads_still_needs_someone_else(wide, guard):  # noqa: F811
    outcome = explain(guard, "--as", "bob", "--db", "demo", "SELECT * FROM transactions")
    assert outcome.code == 0, outcome
    assert "as bob (security-leads)" in rows(outcome.out)
    assert "verdict require_approval" in rows(outcome.out)
    assert "can never approve their own request" in " ".join(rows(outcome.out))


def test_carol_may_read_customers_but_not_write_products(wide, guard):  # noqa: F811
    data = explained(
        guard,
        "--as",
        "carol",
        "--db",
        "demo",
        "SELECT email FROM customers; UPDATE products SET price = 1 WHERE id = 1",
    )
    assert data["user"] == "carol" and data["groups"] == ["security-leads"]
    read, write = data["statements"]
    assert read["verdict"] == "allow"
    assert read["masked_columns"] == [
        {"column": "public.customers.email", "mask": "email_first_char"}
    ]
    assert write["verdict"] == "deny" and write["rule"] == "default-deny"
    assert "carol" in write["message"]


def test_mallory_may_not_connect_at_all(wide, guard):  # noqa: F811
    outcome = explain(guard, "--as", "mallory", "--db", "demo", "SELECT 1")
    assert outcome.code == 0, outcome
    lines = rows(outcome.out)
    assert "as mallory (no groups)" in lines
    assert "connect no (connect_groups: engineers, security-leads, service)" in lines
    assert "verdict deny" in lines
    assert any(line.startswith("rule guardrail:connect — ") for line in lines)


def test_groups_are_given_directly_for_real_idps(wide, guard):  # noqa: F811
    data = explained(
        guard, "--groups", "engineers, contractors", "--db", "demo", "UPDATE products SET price = 2"
    )
    assert data["user"] is None
    assert data["groups"] == ["contractors", "engineers"]
    assert data["connect"]["allowed"] is True
    (only,) = data["statements"]
    # A guardrail, not a rule of the policy.
    assert only["rule"] == "guardrail:update-without-where"
    assert only["rules"][0]["built_in"] is True
    data = explained(
        guard, "--groups", "engineers", "--db", "demo", "UPDATE products SET price = 2 WHERE id = 1"
    )
    assert data["statements"][0]["verdict"] == "allow"
    assert data["statements"][0]["rule"] == "engineers-write-products"


def test_json_shape(wide, guard):  # noqa: F811
    data = explained(
        guard,
        "--as",
        "alice",
        "--db",
        "demo",
        "SELECT ssn FROM customers; DROP TABLE customers; SELECT * FROM transactions",
    )
    assert data["policy"] == str(REPO_POLICY)
    assert data["target"] == "demo"
    assert data["connect"] == {
        "allowed": True,
        "connect_groups": ["engineers", "security-leads", "service"],
        "message": "connection allowed",
    }
    allow, deny, held = data["statements"]
    keys = {
        "statement",
        "verdict",
        "rule",
        "rules",
        "message",
        "reasons",
        "masked_columns",
        "approval",
        "analysis",
    }
    assert set(allow) == set(deny) == set(held) == keys
    assert allow["statement"] == "SELECT ssn FROM customers"
    assert (allow["verdict"], deny["verdict"], held["verdict"]) == (
        "allow",
        "deny",
        "require_approval",
    )
    assert allow["masked_columns"] == [{"column": "public.customers.ssn", "mask": "ssn_last4"}]
    assert allow["approval"] is None and deny["approval"] is None
    assert deny["rules"] == [
        {
            "id": "deny-ddl",
            "description": "Schema and privilege changes never go through guard",
            "built_in": False,
        }
    ]
    assert held["approval"] == {
        "approver_groups": ["security-leads"],
        "approvals_required": 1,
        "window_seconds": 1800,
        "window": "30m",
    }
    assert held["analysis"] == {
        "command": "SelectStmt",
        "operations": ["read"],
        "reads": ["transactions"],
        "writes": [],
        "functions": [],
    }
    assert all(isinstance(r, str) for s in data["statements"] for r in s["reasons"])


def test_an_approval_without_window_covers_one_statement(wide, guard, tmp_path):  # noqa: F811
    policy = tmp_path / "one.yaml"
    policy.write_text(
        textwrap.dedent(
            """\
            version: 1
            targets:
              prod:
                connect_groups: [engineers]
                session_ttl: {default: 1h, max: 8h}
            rules:
              - id: two-leads
                effect: require_approval
                when: {reads: [public.payroll]}
                approval: {approver_groups: [leads, cfo], approvals_required: 2}
            """
        )
    )
    outcome = guard(
        "policy", "explain", "--policy", str(policy), "--groups", "engineers", "--db", "prod",
        "SELECT * FROM payroll",
    )  # fmt: skip
    assert outcome.code == 0, outcome
    lines = rows(outcome.out)
    assert "approvers cfo, leads (2 approvals needed)" in lines
    assert "window one statement" in lines


# --- which policy ------------------------------------------------------------------------


def small_policy(path: Path, description: str) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            targets:
              demo:
                description: {description}
                connect_groups: [engineers]
                session_ttl: {{default: 1h, max: 8h}}
            rules: []
            """
        )
    )
    return path


def test_policy_defaults_to_the_running_dev_stacks(wide, guard, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    small_policy(tmp_path / "policies.yaml", "the one in the working directory")
    stack_policy = small_policy(tmp_path / "stack.yaml", "the dev stack's")
    state = wide / "dev"
    state.mkdir()
    # This process stands in for the stack's processes: the stack counts as running.
    (state / "stack.json").write_text(
        json.dumps({"pids": {"broker": os.getpid()}, "policy_file": str(stack_policy)})
    )
    outcome = guard("policy", "explain", "--as", "alice", "--db", "demo", "SELECT 1")
    assert outcome.code == 0, outcome
    assert f"policy {stack_policy}" in rows(outcome.out)
    assert "target demo — the dev stack's" in rows(outcome.out)
    assert "rule default-deny — " in " ".join(rows(outcome.out))


def test_policy_defaults_to_the_working_directorys_without_a_running_stack(
    wide,
    guard,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.chdir(tmp_path)
    small_policy(tmp_path / "policies.yaml", "the one in the working directory")
    state = wide / "dev"
    state.mkdir()
    (state / "stack.json").write_text(
        json.dumps({"pids": {}, "policy_file": str(REPO_POLICY), "stopped": True})
    )
    outcome = guard("policy", "explain", "--as", "alice", "--db", "demo", "SELECT 1")
    assert outcome.code == 0, outcome
    assert "policy policies.yaml" in rows(outcome.out)
    assert "target demo — the one in the working directory" in rows(outcome.out)


# --- errors: one line and a hint, never a traceback ----------------------------------------


def test_unknown_target(wide, guard):  # noqa: F811
    error, hint = assert_failed(explain(guard, "--as", "alice", "--db", "prod", "SELECT 1"))
    assert error == 'error: the policy has no target "prod"'
    assert hint == "hint: targets in this policy: demo"


def test_unparseable_sql(wide, guard):  # noqa: F811
    error, hint = assert_failed(explain(guard, "--as", "alice", "--db", "demo", "SELEC 1"))
    assert error.startswith("error: cannot parse the SQL: syntax error")
    assert "SQL" in hint


@pytest.mark.parametrize("sql", ["", " ; ", "/* nothing */"])
def test_no_statement(wide, guard, sql):  # noqa: F811
    error, _ = assert_failed(explain(guard, "--as", "alice", "--db", "demo", sql))
    assert error == "error: the SQL holds no statement"


def test_missing_policy(wide, guard, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # no policies.yaml here, no dev stack
    error, hint = assert_failed(guard("policy", "explain", "--as", "alice", "--db", "demo", "x"))
    assert error == "error: policies.yaml: no such file"
    assert "--policy FILE" in hint


def test_invalid_policy(wide, guard, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntargets: {demo: {connect_groups: []}}\nrules: []\n")
    error, hint = assert_failed(
        guard("policy", "explain", "--policy", str(bad), "--as", "alice", "--db", "demo", "x")
    )
    assert error.startswith(f"error: {bad}: not a valid policy (")
    assert hint == f"hint: run `guard policy check {bad}` to see every problem"


def test_unknown_dev_user(wide, guard):  # noqa: F811
    error, hint = assert_failed(explain(guard, "--as", "zed", "--db", "demo", "SELECT 1"))
    assert error == "error: the dev IdP has no user 'zed'"
    assert "alice, bob, carol, dave, ci" in hint and "--groups" in hint


@pytest.mark.parametrize(
    "who",
    [pytest.param([], id="neither"), pytest.param(["--as", "alice", "--groups", "x"], id="both")],
)
def test_exactly_one_of_as_and_groups(wide, guard, who):  # noqa: F811
    error, hint = assert_failed(explain(guard, *who, "--db", "demo", "SELECT 1"), code=2)
    assert error == "error: pass exactly one of --as USER and --groups G1,G2"
    assert "guard policy explain --as alice --db demo" in hint


def test_unmasked_explains_whether_one_may_be_had_and_decides_as_in_one(wide, guard):  # noqa: F811
    lookup = "SELECT id FROM customers WHERE ssn = '123-45-6789'"
    dave = explained(guard, "--as", "dave", "--db", "demo", "--unmasked", lookup)
    assert dave["unmasked"]["effect"] == "require_approval"
    assert "security-leads" in dave["unmasked"]["message"]
    (statement,) = dave["statements"]
    assert statement["verdict"] == "allow"  # a lookup by the raw value, in such a session
    copy = "INSERT INTO products(name, price) SELECT ssn, 1 FROM customers"
    (refused,) = explained(guard, "--as", "dave", "--db", "demo", "--unmasked", copy)["statements"]
    assert refused["verdict"] == "deny" and "unmasked-copy" in refused["message"]
    # Alice may not have one: said, and her statements are decided as in a masked session.
    alice = explained(guard, "--as", "alice", "--db", "demo", "--unmasked", lookup)
    assert alice["unmasked"]["effect"] == "deny"
    assert "fraud-investigators" in alice["unmasked"]["message"]
    assert alice["statements"][0]["verdict"] == "deny"
    outcome = explain(guard, "--as", "alice", "--db", "demo", "--unmasked", lookup)
    assert any(line.startswith("unmasked deny: guard: alice may not") for line in rows(outcome.out))
    # Without --unmasked nothing is said about it.
    assert "unmasked" not in explained(guard, "--as", "dave", "--db", "demo", lookup)
