"""`sql.redirect.refill`: a redirected statement run with ever new literals gets the text
`redirect` would give it, made from its normalized text's redirection, or None.

The property: whatever the literals, `refill` returns exactly `redirect(exact).text` or
None (the gate then redirects the exact text itself); for the everyday shapes it returns
the text. The gate uses it (`Gate.decide`), so its decision for each new literal forwards
that text with the normalized decision's verdicts and audit records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import load_policy_file
from guard.broker.proxy.gate import Gate
from guard.broker.sql.fingerprint import normalize
from guard.broker.sql.redirect import redirect, refill

SPECIAL = frozenset({("public", "customers"), ("public", "accounts")})
TEMPLATES = [
    "SELECT * FROM public.customers WHERE id = {int}",
    'SELECT ssn FROM "public"."customers" c WHERE c.full_name = {text} AND c.id > {int}',
    "SELECT * FROM public.customers WHERE dob > DATE {text} -- {int} stays a comment",
    "COPY (SELECT * FROM public.customers WHERE id = {int}) TO STDOUT",
    "SELECT a.account_number FROM public.accounts a WHERE a.id IN ({int}, {int}) AND $1 = 1",
    "SELECT {text}, customers.ssn FROM public.customers LIMIT {int}",
    "SELECT id FROM public.customers WHERE id - {int} > {float}::numeric",
]


def literal_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def fill(template: str, ints, texts, floats) -> str:
    out, i, t, f = template, iter(ints), iter(texts), iter(floats)
    while "{int}" in out:
        out = out.replace("{int}", str(next(i)), 1)
    while "{text}" in out:
        out = out.replace("{text}", literal_text(next(t)), 1)
    while "{float}" in out:
        out = out.replace("{float}", repr(next(f)), 1)
    return out


def expected(sql: str) -> str:
    result = redirect(sql, SPECIAL, "guard_masked")
    assert result is not None and result.refusal is None
    return result.text


def refilled(sql: str) -> str | None:
    normalized = normalize(sql)
    return refill(sql, normalized, expected(normalized))


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_everyday_shapes_are_refilled_exactly(template):
    sql = fill(template, [7, -3, 12], ["O'Brien", "2000-01-01"], [1.5])
    assert refilled(sql) == expected(sql)


@settings(max_examples=150, deadline=None)
@given(
    template=st.sampled_from(TEMPLATES),
    ints=st.lists(st.integers(-(10**12), 10**12), min_size=3, max_size=3),
    texts=st.lists(st.text(min_size=0, max_size=12), min_size=2, max_size=2),
    floats=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=1),
)
def test_refill_is_the_redirection_of_the_exact_text_or_nothing(template, ints, texts, floats):
    texts = [t.replace("\x00", "") for t in texts]  # PostgreSQL text holds no NUL
    sql = fill(template, ints, texts, floats)
    got = refilled(sql)
    assert got is None or got == expected(sql)


def test_a_redirection_that_moves_or_adds_a_constant_is_left_to_redirect():
    # TABLESAMPLE's percentage moves into a WHERE with a new constant (100).
    sql = "SELECT * FROM public.customers TABLESAMPLE bernoulli (10) WHERE id = 5"
    assert refilled(sql) is None


@pytest.mark.parametrize(
    ("sql", "normalized"),
    [
        ("SELECT * FROM public.customers WHERE id = 1", "SELECT * FROM public.customers"),
        (
            "SELECT * FROM public.customers WHERE id = 1",
            "SELECT * FROM public.accounts WHERE id = $1",
        ),
        (
            "SELECT * FROM public.customers WHERE id = x",
            "SELECT * FROM public.customers WHERE id = $1",
        ),
    ],
)
def test_texts_that_do_not_line_up_give_nothing(sql, normalized):
    assert refill(sql, normalized, expected("SELECT * FROM public.customers WHERE id = $1")) is None


def test_the_gate_forwards_each_literal_with_the_shared_verdicts_and_records():
    policy = load_policy_file(Path(__file__).resolve().parents[2] / "policies.yaml")
    alice = Principal("https://idp", "alice", frozenset({"engineers"}))
    gate = Gate(policy=policy, target="demo", principal=alice, session_id="s", connection_id="c")
    first = gate.decide("SELECT * FROM public.customers WHERE id = 1")
    second = gate.decide("SELECT * FROM public.customers WHERE id = 2")
    assert first.forward_sql == "SELECT * FROM guard_masked.customers WHERE id = 1"
    assert second.forward_sql == "SELECT * FROM guard_masked.customers WHERE id = 2"
    assert first.verdicts == second.verdicts and first.refusal is second.refusal is None
    assert gate.statement_records(first, "simple") == gate.statement_records(second, "simple")
    # A refused shape is decided on its own text, as before.
    copy = gate.decide("INSERT INTO products(name) SELECT ssn FROM public.customers WHERE id = 3")
    assert copy.refusal is not None and copy.forward_sql is None
