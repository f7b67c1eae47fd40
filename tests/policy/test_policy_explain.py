"""policy.explain: the gateway's verdicts on SQL for groups on a target, with the deciding
rules, the reasons, the masks and the approval requirement (pure, no I/O)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import load_policy, load_policy_file
from guard.broker.policy.engine import CompiledPolicy, Effect
from guard.broker.policy.explain import ExplainError, explain, principal_for, window_text
from guard.broker.sql.analyze import analyze

REPO_POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"


@pytest.fixture(scope="module")
def demo() -> CompiledPolicy:
    return load_policy_file(REPO_POLICY)


def one(policy: CompiledPolicy, sql: str, *groups: str, user: str | None = "alice"):
    result = explain(policy, groups=groups, target="demo", sql=sql, user=user)
    (statement,) = result.statements
    return statement


def test_alice_reading_ssn_is_allowed_and_masked(demo):
    item = one(demo, "SELECT full_name, ssn FROM customers LIMIT 3", "engineers")
    assert item.effect is Effect.ALLOW
    assert item.verdict.rule_id == "engineers-read"
    assert [r.id for r in item.rules] == ["engineers-read"]
    assert item.rules[0].description.startswith("Reading (masked) data")
    assert item.masks == (("public.customers.ssn", "ssn_last4"),)
    assert item.approval is None
    assert "every operation (read) is covered by engineers-read" in item.reasons
    assert any("public.customers.ssn is protected" in r for r in item.reasons)


def test_drop_table_is_denied_by_deny_ddl(demo):
    item = one(demo, "DROP TABLE customers", "engineers")
    assert item.effect is Effect.DENY and item.verdict.rule_id == "deny-ddl"
    assert item.rules[0].description == "Schema and privilege changes never go through guard"
    assert not item.rules[0].built_in
    assert item.reasons == ("deny rule deny-ddl matches (any matching deny rule wins)",)


def test_transactions_need_one_security_lead_for_30_minutes(demo):
    item = one(demo, "SELECT * FROM transactions", "engineers")
    assert item.effect is Effect.REQUIRE_APPROVAL
    assert item.verdict.rule_id == "transactions-need-approval"
    assert item.approval is not None
    assert item.approval.approver_groups == frozenset({"security-leads"})
    assert item.approval.approvals_required == 1
    assert item.approval.window_seconds == 1800
    assert item.to_dict()["approval"]["window"] == "30m"
    assert any("held until a member of security-leads approves it" in r for r in item.reasons)
    assert not any("own request" in r for r in item.reasons)


def test_an_approver_asking_is_told_someone_else_must_approve(demo):
    item = one(demo, "SELECT * FROM transactions", "security-leads", user="bob")
    assert item.effect is Effect.REQUIRE_APPROVAL
    assert any("can never approve their own request" in r for r in item.reasons)


def test_the_verdicts_are_the_gateways(demo):
    # explain adds explanations, never a different decision.
    sql = (
        "SELECT ssn FROM customers; DROP TABLE customers; SELECT * FROM transactions;"
        " UPDATE products SET price = 1; SELECT customer_ssn(1); SET ROLE postgres"
    )
    for groups in ({"engineers"}, {"security-leads"}, {"service"}, set()):
        principal = Principal("https://idp.example", "x", frozenset(groups), display_name="x")
        gateway = demo.evaluate_analysis(principal, "demo", analyze(sql))
        result = explain(demo, groups=groups, target="demo", sql=sql, user="x")
        assert tuple(s.verdict for s in result.statements) == gateway
        assert [s.statement.text for s in result.statements] == [
            "SELECT ssn FROM customers",
            "DROP TABLE customers",
            "SELECT * FROM transactions",
            "UPDATE products SET price = 1",
            "SELECT customer_ssn(1)",
            "SET ROLE postgres",
        ]


def test_connect_is_reported_and_decides_every_statement(demo):
    result = explain(demo, groups=[], target="demo", sql="SELECT 1; SELECT 2", user="mallory")
    assert not result.can_connect
    assert result.connect_groups == frozenset({"engineers", "security-leads", "service"})
    assert "mallory may not connect" in result.connect.message
    assert [s.verdict.rule_id for s in result.statements] == ["guardrail:connect"] * 2
    assert result.statements[0].rules[0].built_in
    assert result.to_dict()["connect"]["allowed"] is False


def test_guardrails_and_default_deny_are_named_as_built_in(demo):
    guardrail = one(demo, "SET ROLE postgres", "engineers")
    assert guardrail.verdict.rule_id == "guardrail:role-switch"
    assert guardrail.rules[0].built_in
    assert guardrail.rules[0].description.startswith("Built-in guardrail")
    default = one(demo, "UPDATE products SET price = 1 WHERE id = 1", "service", user="ci")
    assert default.verdict.rule_id == "default-deny"
    assert default.rules[0].built_in
    assert default.reasons == ("no allow rule covers every operation of the statement",)


def test_several_covering_allow_rules_are_all_named():
    policy = load_policy(
        textwrap.dedent(
            """\
            version: 1
            targets:
              db: {connect_groups: [eng], session_ttl: {default: 1h, max: 8h}}
            rules:
              - {id: reads, description: Reading, effect: allow, when: {operations: [read]}}
              - {id: inserts, description: Inserting, effect: allow,
                 when: {operations: [insert], writes: [public.t]}}
            """
        )
    )
    result = explain(policy, groups=["eng"], target="db", sql="INSERT INTO t SELECT * FROM u")
    (item,) = result.statements
    assert item.effect is Effect.ALLOW
    assert [(r.id, r.description) for r in item.rules] == [
        ("inserts", "Inserting"),
        ("reads", "Reading"),
    ]


def test_an_approval_without_window_covers_one_statement():
    policy = load_policy(
        textwrap.dedent(
            """\
            version: 1
            targets:
              db: {connect_groups: [eng], session_ttl: {default: 1h, max: 8h}}
            rules:
              - id: payroll
                effect: require_approval
                when: {reads: [public.payroll]}
                approval: {approver_groups: [leads, cfo], approvals_required: 2}
            """
        )
    )
    result = explain(policy, groups=["eng"], target="db", sql="SELECT * FROM payroll")
    (item,) = result.statements
    assert item.approval is not None and item.approval.window_seconds is None
    assert item.to_dict()["approval"]["window"] == "one statement"
    assert any("2 different members of cfo, leads approve it" in r for r in item.reasons)
    assert "an approval covers exactly this one statement" in item.reasons


@pytest.mark.parametrize(
    ("target", "sql", "message"),
    [
        ("prod", "SELECT 1", 'the policy has no target "prod"'),
        ("demo", "SELEC 1", "cannot parse the SQL: syntax error"),
        ("demo", "", "the SQL holds no statement"),
        ("demo", "-- a comment", "the SQL holds no statement"),
    ],
)
def test_nothing_to_explain_is_an_error_with_a_hint(demo, target, sql, message):
    with pytest.raises(ExplainError) as caught:
        explain(demo, groups=["engineers"], target=target, sql=sql)
    assert caught.value.message.startswith(message)
    assert caught.value.hint


def test_principal_labels():
    assert principal_for(["engineers"], "alice").label == "alice"
    assert principal_for(["b", "a", ""]).label == "a member of a, b"
    assert principal_for(["b", "a", ""]).groups == frozenset({"a", "b"})
    assert principal_for([]).label == "a caller with no groups"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "one statement"), (1800, "30m"), (3600, "1h"), (86400, "1d"), (90, "90s"), (5, "5s")],
)
def test_window_text(seconds, text):
    assert window_text(seconds) == text
