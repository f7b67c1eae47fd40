"""`guard target check | plan | apply` and the broker's refusal to open sessions on a
target whose database backstop has drifted (issue 16), on the real demo stack."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.fix_stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bob(dev_stack: Stack) -> dict[str, str]:
    """An auditor's (security-leads) token for the CLI, without touching the stack's login."""
    token = dev_stack.guard("dev", "token", "bob")
    assert token.returncode == 0, token.stderr
    return {"GUARD_ID_TOKEN": token.stdout.strip()}


def _drift(stack: Stack) -> None:
    with psycopg.connect(stack.admin_dsn, autocommit=True) as admin:
        admin.execute("GRANT SELECT (ssn) ON customers TO guard_session")
        admin.execute("DROP VIEW guard_masked.v_customer_contacts")


def test_check_plan_apply_and_no_session_on_a_drifted_target(dev_stack: Stack, bob):
    check = dev_stack.guard("target", "check", "demo", env=bob)
    assert check.returncode == 0, check.stderr + check.stdout
    assert "in place" in check.stdout
    _drift(dev_stack)
    try:
        check = dev_stack.guard("target", "check", "demo", "--json", env=bob)
        assert check.returncode == 1
        drift = json.loads(check.stdout)["drift"]
        assert "public.customers.ssn: guard_session may read the raw column" in drift
        assert "public.v_customer_contacts: has no masked twin" in drift
        # A drifted target gets no new session: the database would not mask.
        token = dev_stack.guard("dev", "token", "alice").stdout.strip()
        refused = dev_stack.request_session(token)
        assert refused.status_code == 503
        assert "backstop of demo has drifted" in refused.json()["message"]
        plan = dev_stack.guard("target", "plan", "demo", env=bob)
        assert plan.returncode == 0, plan.stderr
        assert 'CREATE VIEW "guard_masked"."v_customer_contacts" AS' in plan.stdout
        assert "-- drift: public.customers.ssn" in plan.stdout
        # What the apply changes, object by object (the catalog before and after, in a
        # transaction rolled back), and nothing it leaves as it is.
        assert "-- + relation guard_masked.v_customer_contacts" in plan.stdout
        assert "-- ~ column public.customers.ssn: rights" in plan.stdout
        assert "guard_masked.customers" not in "".join(
            line for line in plan.stdout.splitlines() if line.startswith("-- ~")
        )
    finally:
        applied = dev_stack.guard("target", "apply", "demo", env=bob)
    assert applied.returncode == 0, applied.stderr + applied.stdout
    assert "in place" in applied.stdout
    again = dev_stack.guard("target", "plan", "demo", env=bob)
    assert "-- no change: the database already matches the policy" in again.stdout
    body, headers = dev_stack.open_session()  # sessions open again
    dev_stack.end_session(body["session_id"], headers)
    events = [r for r in dev_stack.audit_records() if r.get("kind") == "backstop"]
    assert [e["event"] for e in events[-2:]] == ["requested", "applied"]
    assert events[-1]["actor"] == "bob" and events[-1]["statements"] > 0
    assert len(events[-1]["digest"]) == 64


def test_the_definer_function_that_reads_ssn_is_not_executable(dev_stack: Stack):
    # customer_ssn(int) is SECURITY DEFINER and reads customers.ssn with its owner's
    # rights: the backstop revokes EXECUTE from sessions, whatever the gateway decides.
    with psycopg.connect(dev_stack.admin_dsn) as admin:
        (allowed,) = admin.execute(
            "SELECT has_function_privilege('guard_session', 'public.customer_ssn(integer)',"
            " 'EXECUTE')"
        ).fetchone()
    assert allowed is False


def test_only_auditors_see_or_change_the_backstop(dev_stack: Stack):
    alice = {"GUARD_ID_TOKEN": dev_stack.guard("dev", "token", "alice").stdout.strip()}
    for command in ("check", "plan", "apply"):
        result = dev_stack.guard("target", command, "demo", env=alice)
        assert result.returncode != 0
        assert "auditor groups" in result.stderr and "Traceback" not in result.stderr


def test_unknown_target_is_one_line(dev_stack: Stack, bob):
    result = dev_stack.guard("target", "check", "nope", env=bob)
    assert result.returncode != 0
    assert "no target 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_policy_check_against_the_live_catalog(dev_stack: Stack, bob, tmp_path):
    from tests.fix_stack import DEMO_POLICY

    good = tmp_path / "good.yaml"
    good.write_text(DEMO_POLICY.read_text())
    ok = dev_stack.guard("policy", "check", str(good), "--target", "demo", env=bob)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "every table and column" in ok.stdout
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        DEMO_POLICY.read_text()
        .replace("public.customers.ssn:", "public.customers.social:")
        .replace("public.accounts.account_number:", "public.acounts.account_number:")
    )
    bad = dev_stack.guard("policy", "check", str(typo), "--target", "demo", env=bob)
    assert bad.returncode == 1
    assert "public.customers.social: no such column in the database" in bad.stdout
    assert "public.acounts: no such table in the database" in bad.stdout
    assert "2 name(s) not in demo's database" in bad.stderr
    missing = dev_stack.guard("policy", "check", str(good), "--target", "prod", env=bob)
    assert missing.returncode == 2 and "has no target 'prod'" in missing.stderr


def test_check_finds_a_twin_that_reads_the_base_table(dev_stack: Stack, bob):
    label = 'guard: masked twin of {"schema": "public", "name": "v_evil"}'
    with psycopg.connect(dev_stack.admin_dsn, autocommit=True) as admin:
        admin.execute("CREATE VIEW guard_masked.v_evil AS SELECT ssn FROM public.customers")
        admin.execute(f"COMMENT ON VIEW guard_masked.v_evil IS '{label}'")
    try:
        check = dev_stack.guard("target", "check", "demo", "--json", env=bob)
        assert check.returncode == 1
        assert (
            "guard_masked.v_evil: a masked twin reads public.customers itself"
            in (json.loads(check.stdout)["drift"])
        )
    finally:
        with psycopg.connect(dev_stack.admin_dsn, autocommit=True) as admin:
            admin.execute("DROP VIEW guard_masked.v_evil")
    assert dev_stack.guard("target", "check", "demo", env=bob).returncode == 0
