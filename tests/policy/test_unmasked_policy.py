"""Unmasked access in the policy: who may ask (`can_unmask`), what its approval and
lifetime are, and which derived uses an unmasked session may still not make."""

from __future__ import annotations

import pytest

from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import PolicyError, load_policy
from guard.broker.policy.engine import Effect
from guard.broker.sql.analyze import analyze

POLICY = """
version: 1
targets:
  bank:
    connect_groups: [eng, fraud, leads]
    session_ttl: {default: 1h, max: 8h}
    protected_columns:
      public.customers.ssn: ssn_last4
      public.customers.email: email_first_char
    unmasked_access:
      groups: [fraud]
      max_ttl: 2h
  plain:
    connect_groups: [eng]
    session_ttl: {default: 1h, max: 8h}
    protected_columns: {public.customers.ssn: redact}
rules:
  - id: read
    effect: allow
    when: {operations: [read, explain, copy]}
  - id: write-products
    effect: allow
    when: {operations: [insert, update], writes: [public.products]}
"""
DAVE = Principal("https://idp.example", "dave", frozenset({"eng", "fraud"}))
ALICE = Principal("https://idp.example", "alice", frozenset({"eng"}))


def policy(text: str = POLICY):
    return load_policy(text)


def verdict(sql: str, *, unmasked: bool = True):
    (result,) = policy().evaluate_analysis(DAVE, "bank", analyze(sql), unmasked=unmasked)
    return result


def test_compiled_unmasked_access():
    access = policy().targets["bank"].unmasked
    assert access is not None
    assert access.groups == {"fraud"} and access.approval is None
    assert access.max_ttl_seconds == 2 * 3600
    assert policy().targets["plain"].unmasked is None


def test_without_max_ttl_the_session_ttl_max_bounds_it():
    text = POLICY.replace("      max_ttl: 2h\n", "")
    assert policy(text).targets["bank"].unmasked.max_ttl_seconds == 8 * 3600


def test_max_ttl_never_exceeds_the_targets_maximum():
    text = POLICY.replace("      max_ttl: 2h\n", "      max_ttl: 9h\n")
    assert policy(text).targets["bank"].unmasked.max_ttl_seconds == 8 * 3600


def test_an_approval_window_is_refused_the_approval_covers_the_session():
    text = POLICY.replace(
        "      max_ttl: 2h\n", "      approval: {approver_groups: [leads], window: 1h}\n"
    )
    with pytest.raises(PolicyError) as err:
        policy(text)
    assert "unmasked_access.approval.window" in str(err.value)
    assert "covers the session" in str(err.value)


def test_unmasked_access_needs_protected_columns():
    text = POLICY.replace(
        "    protected_columns: {public.customers.ssn: redact}",
        "    unmasked_access: {groups: [eng]}",
    )
    with pytest.raises(PolicyError, match="no protected_columns to unmask"):
        policy(text)


def test_unknown_keys_are_refused():
    with pytest.raises(PolicyError, match="grops"):
        policy(POLICY.replace("      groups: [fraud]", "      grops: [fraud]"))


def test_who_may_ask():
    compiled = policy()
    assert compiled.can_unmask(DAVE, "bank").effect is Effect.ALLOW
    refused = compiled.can_unmask(ALICE, "bank")
    assert refused.effect is Effect.DENY and "fraud" in refused.message
    # A target without unmasked_access refuses everyone, its connect groups included.
    assert "allows no unmasked" in compiled.can_unmask(ALICE, "plain").message
    # Connecting at all comes first.
    outsider = Principal("https://idp.example", "eve", frozenset({"fraud-elsewhere"}))
    assert compiled.can_unmask(outsider, "bank").rule_id == "guardrail:connect"


def test_an_approval_is_asked_for_when_the_policy_says_so():
    text = POLICY.replace(
        "      max_ttl: 2h\n",
        "      approval: {approver_groups: [leads], approvals_required: 2}\n",
    )
    answer = policy(text).can_unmask(DAVE, "bank")
    assert answer.effect is Effect.REQUIRE_APPROVAL
    assert answer.approval is not None and answer.approval.approvals_required == 2
    assert answer.approval.approver_groups == {"leads"}
    assert answer.approval.window_seconds is None  # the whole session


@pytest.mark.parametrize(
    ("sql", "refused_masked"),
    [
        ("SELECT ssn FROM customers", False),
        ("SELECT id FROM customers WHERE ssn = '123-45-6789'", True),  # a lookup by raw value
        ("SELECT id FROM customers ORDER BY email", True),
        ("SELECT lower(email), count(*) FROM customers GROUP BY lower(email)", True),
        ("SELECT right(ssn, 4) FROM customers WHERE upper(email) LIKE 'J%'", True),
        ("SELECT ssn || '' FROM public.customers", True),
        ("COPY (SELECT upper(email) FROM customers) TO STDOUT", True),
        ("EXPLAIN SELECT id FROM customers WHERE ssn = '1'", True),
        # Rows decided by a raw value, the value itself not written.
        (
            "UPDATE products SET name = 'x' WHERE id IN (SELECT id FROM customers WHERE ssn = '1')",
            True,
        ),
    ],
)
def test_an_unmasked_session_reads_filters_and_computes(sql, refused_masked):
    assert verdict(sql).effect is Effect.ALLOW, verdict(sql).message
    # The same text in a masked session: its derived uses are refused.
    assert (verdict(sql, unmasked=False).effect is Effect.DENY) is refused_masked


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        # A raw value copied into a table masked sessions read.
        ("INSERT INTO products(name) SELECT ssn FROM customers", "copied into a table"),
        ("INSERT INTO products(name) SELECT lower(email) FROM customers", "writes"),
        ("UPDATE products SET name = (SELECT max(ssn) FROM customers) WHERE id = 1", "writes"),
        (
            "WITH c AS (SELECT ssn || '' s FROM customers)"
            " INSERT INTO products(name) SELECT s FROM c",
            "customers.ssn",
        ),
        # A notification carries it to any listener; a user function anywhere.
        ("SELECT pg_notify('c', ssn) FROM customers", "function"),
        ("SELECT public.audit_it(ssn) FROM customers", "function"),
        ("SELECT my_schema.lower(ssn) FROM customers", "function"),
        ("SELECT set_config('app.x', ssn, false) FROM customers", "function"),
    ],
)
def test_an_unmasked_session_may_not_carry_a_raw_value_away(sql, words):
    result = verdict(sql)
    assert result.effect is Effect.DENY
    assert result.rule_id == "guardrail:unmasked-copy" and words in result.message


def test_other_guardrails_still_apply_unmasked():
    assert verdict("SET ROLE postgres").effect is Effect.DENY
    assert verdict("DELETE FROM products").effect is Effect.DENY


# A view of the backstop's schemas stands for its table in every check: spelling the view
# must not step around a rule, a guardrail or the unmasked copy refusal.
VIEWS_POLICY = (
    POLICY
    + """
  - id: no-accounts-for-contractors
    effect: deny
    groups: [eng]
    when: {reads: [public.accounts]}
"""
)


@pytest.mark.parametrize("schema", ["guard_masked", "guard_unmasked", '"guard_unmasked"'])
def test_a_backstop_view_is_its_table_to_the_policy(schema):
    compiled = load_policy(VIEWS_POLICY)

    def decide(sql: str, *, unmasked: bool):
        (result,) = compiled.evaluate_analysis(DAVE, "bank", analyze(sql), unmasked=unmasked)
        return result

    for unmasked in (False, True):
        refused = decide(f"SELECT * FROM {schema}.accounts", unmasked=unmasked)
        assert refused.rule_id == "no-accounts-for-contractors"
    copy = decide(f"INSERT INTO products(name) SELECT ssn FROM {schema}.customers", unmasked=True)
    assert copy.rule_id == "guardrail:unmasked-copy"
    derived = decide(f"SELECT lower(ssn) FROM {schema}.customers", unmasked=False)
    assert derived.rule_id == "guardrail:protected-column-derived"
    read = decide(f"SELECT ssn FROM {schema}.customers", unmasked=False)
    assert read.effect is Effect.ALLOW
    assert [str(c) for c in read.masked_columns] == ["public.customers.ssn"]
