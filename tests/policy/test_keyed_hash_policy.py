"""A keyed_hash column may decide rows and join tables (its view hands out keyed digests);
every other strategy's columns still may not, and no strategy's may feed an expression."""

from __future__ import annotations

import pytest

from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import load_policy
from guard.broker.policy.engine import Effect
from guard.broker.sql.analyze import analyze

POLICY = """
version: 1
targets:
  kh:
    connect_groups: [g]
    session_ttl: {default: 1h, max: 1h}
    protected_columns:
      public.people.ssn: keyed_hash
      public.cards.holder_ssn: keyed_hash
      public.people.email: email_first_char
rules:
  - id: read
    effect: allow
    groups: [g]
    when: {operations: [read]}
"""
ALICE = Principal("https://idp.example", "alice", frozenset({"g"}))


def verdict(sql: str):
    (result,) = load_policy(POLICY).evaluate_analysis(ALICE, "kh", analyze(sql))
    return result


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT p.id FROM people p JOIN cards c ON c.holder_ssn = p.ssn",
        "SELECT id FROM people WHERE ssn = 'kh:0123456789abcdef01234567'",
        "SELECT ssn, count(*) FROM people GROUP BY ssn ORDER BY ssn",
        "SELECT id FROM people WHERE ssn IN (SELECT holder_ssn FROM cards)",
    ],
)
def test_keyed_hash_columns_may_decide_rows_and_join(sql):
    assert verdict(sql).effect is Effect.ALLOW


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT upper(ssn) FROM people",  # an expression over it: still derived
        "SELECT id FROM people WHERE email = 'a@b.c'",  # another strategy: an oracle
        "SELECT id FROM people ORDER BY email",
    ],
)
def test_other_uses_stay_refused(sql):
    result = verdict(sql)
    assert result.effect is Effect.DENY
    assert result.rule_id == "guardrail:protected-column-derived"
