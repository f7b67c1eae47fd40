"""policy.engine: guardrails, rule precedence, coverage, default deny and the demo policy."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from guard.broker.identity.principal import Principal
from guard.broker.policy.compile import load_policy, load_policy_file
from guard.broker.policy.engine import ColumnId, CompiledPolicy, Effect, Verdict
from guard.broker.sql.analyze import analyze, fast_path_analysis

REPO_POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"


def who(*groups: str, name: str = "alice") -> Principal:
    return Principal("https://idp.example", name, frozenset(groups), display_name=name)


ALICE = who("engineers")
LEAD = who("security-leads", name="sam")
SERVICE = who("service", name="ci")
MALLORY = who("contractors", name="mallory")


@pytest.fixture(scope="module")
def demo() -> CompiledPolicy:
    return load_policy_file(REPO_POLICY)


def decide(policy: CompiledPolicy, sql: str, principal: Principal = ALICE) -> Verdict:
    verdicts = policy.evaluate_analysis(principal, "demo", analyze(sql))
    assert len(verdicts) == 1, verdicts
    return verdicts[0]


# --- the demo policy (scenarios from the task) ---------------------------------------------


def test_plain_read_of_protected_column_is_allowed_and_masked(demo):
    verdict = decide(demo, "SELECT full_name, ssn FROM customers LIMIT 3")
    assert verdict.allowed and verdict.effect is Effect.ALLOW
    assert verdict.masked_columns == (ColumnId("public", "customers", "ssn"),)
    assert verdict.rule_id == "engineers-read"


def test_group_by_bare_protected_column_is_a_masked_read(demo):
    # Contract 2.1: GROUP BY on the column works; the masking view groups masked values.
    verdict = decide(demo, "SELECT email, count(*) FROM customers GROUP BY email")
    assert verdict.allowed
    assert verdict.masked_columns == (ColumnId("public", "customers", "email"),)


def test_drop_table_denied_by_deny_ddl(demo):
    verdict = decide(demo, "DROP TABLE customers")
    assert verdict.effect is Effect.DENY and verdict.rule_id == "deny-ddl"
    assert verdict.message == (
        'guard: statement refused by rule "deny-ddl": '
        "Schema and privilege changes never go through guard"
    )


def test_transactions_require_approval(demo):
    verdict = decide(demo, "SELECT * FROM transactions")
    assert verdict.effect is Effect.REQUIRE_APPROVAL
    assert verdict.rule_id == "transactions-need-approval"
    assert "approval" in verdict.message
    assert "public.transactions" in verdict.message
    assert verdict.approval is not None
    assert verdict.approval.approver_groups == {"security-leads"}
    assert verdict.approval.window_seconds == 1800
    assert not verdict.allowed


@pytest.mark.parametrize(
    "sql",
    [
        'SELECT * FROM "transactions"',
        "SELECT * FROM public.TRANSACTIONS",
        "TABLE transactions",
        "WITH t AS (SELECT * FROM transactions) SELECT count(*) FROM t",
        "SELECT c.id FROM customers c JOIN transactions t ON t.customer_id = c.id",
        "SELECT (SELECT sum(amount) FROM transactions)",
        "DECLARE cur CURSOR FOR SELECT * FROM transactions",
        "COPY transactions TO STDOUT",
        "COPY (SELECT * FROM transactions) TO STDOUT",
        "PREPARE p AS SELECT * FROM transactions",
        "EXPLAIN ANALYZE SELECT * FROM transactions",
    ],
)
def test_every_spelling_of_a_gated_read_requires_approval(demo, sql):
    verdict = decide(demo, sql)
    assert verdict.effect is Effect.REQUIRE_APPROVAL, verdict
    assert "approval" in verdict.message


def test_derived_use_of_protected_column_denied(demo):
    verdict = decide(demo, "SELECT upper(ssn) FROM customers")
    assert verdict.effect is Effect.DENY
    assert verdict.rule_id == "guardrail:protected-column-derived"
    assert "customers.ssn" in verdict.message and "derived use" in verdict.message


def test_order_by_protected_column_denied(demo):
    verdict = decide(demo, "SELECT * FROM customers ORDER BY ssn")
    assert verdict.rule_id == "guardrail:protected-column-derived"


def test_update_without_where_denied(demo):
    verdict = decide(demo, "UPDATE products SET name='x'")
    assert verdict.rule_id == "guardrail:update-without-where"


def test_update_with_where_allowed_for_engineers(demo):
    verdict = decide(demo, "UPDATE products SET name='x' WHERE id=1")
    assert verdict.allowed and verdict.rule_id == "engineers-write-products"


def test_service_may_read_but_not_write(demo):
    assert decide(demo, "SELECT * FROM products", SERVICE).allowed
    verdict = decide(demo, "UPDATE products SET name='x' WHERE id=1", SERVICE)
    assert verdict.rule_id == "default-deny"
    assert "update" in verdict.message and "ci" in verdict.message


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "SELECT count(*) FROM customers",
        "SELECT full_name, phone FROM customers WHERE id = 1",
        "SELECT c.id, a.balance FROM customers c JOIN accounts a ON a.customer_id = c.id",
        "SELECT sum(balance) FROM accounts GROUP BY customer_id",
        "SELECT * FROM products ORDER BY price DESC LIMIT 5",
        "BEGIN",
        "SAVEPOINT a",
        "COMMIT",
        "SET DateStyle = 'SQL, DMY'",
        "SHOW search_path",
        "SET search_path = guard_masked, public",
        "COPY products TO STDOUT",
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM products",
        "FETCH 10 FROM c",
        "CLOSE c",
        "PREPARE q AS SELECT * FROM products WHERE id = $1",
        "DEALLOCATE q",
        "EXPLAIN SELECT * FROM products",
        "INSERT INTO products (name, price) VALUES ('x', 1)",
        "DELETE FROM products WHERE id = 7",
        "SELECT ssn, email, dob FROM customers",
        "SELECT c, c::text, (c).ssn FROM customers c",
        "SELECT DISTINCT ssn FROM customers",
        "SELECT * FROM (SELECT ssn FROM customers) s",
    ],
)
def test_legitimate_use_keeps_working(demo, sql):
    assert decide(demo, sql).allowed, decide(demo, sql)


def test_select_star_lists_every_masked_column_of_the_tables(demo):
    verdict = decide(demo, "SELECT * FROM customers c JOIN accounts a ON a.customer_id = c.id")
    assert {str(c) for c in verdict.masked_columns} == {
        "public.customers.ssn",
        "public.customers.email",
        "public.customers.dob",
        "public.accounts.account_number",
    }


def test_definer_function_denied_by_policy(demo):
    assert decide(demo, "SELECT customer_ssn()").rule_id == "deny-definer-functions"
    assert decide(demo, "SELECT * FROM public.customer_ssn()").rule_id == "deny-definer-functions"


# --- guardrails ---------------------------------------------------------------------------

GUARDRAILS = [
    ("SET ROLE postgres", "guardrail:role-switch"),
    ("SET LOCAL ROLE postgres", "guardrail:role-switch"),
    ('SET "role" = postgres', "guardrail:role-switch"),
    ("RESET ROLE", "guardrail:role-switch"),
    ("SET SESSION AUTHORIZATION postgres", "guardrail:role-switch"),
    ("SELECT set_config('role', 'postgres', false)", "guardrail:role-switch"),
    ("SELECT set_config('session_authorization', 'postgres', false)", "guardrail:role-switch"),
    ("ALTER ROLE alice SUPERUSER", "guardrail:role-switch"),
    ("ALTER USER alice SET role = 'postgres'", "guardrail:role-switch"),
    ("ALTER SYSTEM SET log_statement = 'none'", "guardrail:alter-system"),
    ("COPY products TO '/tmp/x'", "guardrail:server-copy"),
    ("COPY products FROM '/etc/passwd'", "guardrail:server-copy"),
    ("COPY products TO PROGRAM 'id'", "guardrail:server-copy"),
    ("COPY (SELECT 1) TO PROGRAM 'id'", "guardrail:server-copy"),
    ("SELECT pg_read_file('/etc/passwd')", "guardrail:server-file-access"),
    ("SELECT pg_read_binary_file('/etc/passwd')", "guardrail:server-file-access"),
    ("SELECT * FROM pg_ls_dir('.')", "guardrail:server-file-access"),
    ("SELECT pg_stat_file('x')", "guardrail:server-file-access"),
    ("SELECT * FROM pg_ls_logdir()", "guardrail:server-file-access"),
    ("SELECT * FROM pg_catalog.pg_ls_waldir()", "guardrail:server-file-access"),
    ("SELECT * FROM pg_ls_tmpdir()", "guardrail:server-file-access"),
    ("SELECT * FROM pg_ls_archive_statusdir()", "guardrail:server-file-access"),
    ("SELECT pg_file_write('x', 'y', false)", "guardrail:server-file-access"),
    ("SELECT dblink('host=x', 'select 1')", "guardrail:dblink"),
    ("SELECT dblink_exec('host=x', 'drop table t')", "guardrail:dblink"),
    ("SELECT dblink_connect('c', 'host=x')", "guardrail:dblink"),
    ("SELECT lo_import('/etc/passwd')", "guardrail:large-object"),
    ("SELECT lo_export(1, '/tmp/x')", "guardrail:large-object"),
    ("SELECT lo_create(0)", "guardrail:large-object"),
    ("SELECT lo_creat(-1)", "guardrail:large-object"),
    ("SELECT lo_from_bytea(0, 'x')", "guardrail:large-object"),
    ("SELECT lo_get(1)", "guardrail:large-object"),
    ("SELECT lo_put(1, 0, 'x')", "guardrail:large-object"),
    ("SELECT loread(0, 10)", "guardrail:large-object"),
    ("SELECT lowrite(0, 'x')", "guardrail:large-object"),
    ("DO $$ BEGIN EXECUTE 'DROP TABLE customers'; END $$", "guardrail:dynamic-sql"),
    ("SELECT query_to_xml('SELECT ssn FROM customers', true, true, '')", "guardrail:dynamic-sql"),
    ("SELECT table_to_xml('customers', true, true, '')", "guardrail:dynamic-sql"),
    ("SELECT * FROM ts_stat('SELECT to_tsvector(ssn) FROM customers')", "guardrail:dynamic-sql"),
    ("EXECUTE p(1)", "guardrail:sql-execute"),
    ("UPDATE products SET name = 'x' /* WHERE id = 1 */", "guardrail:update-without-where"),
    ("UPDATE products SET name = 'x' WHERE true", "guardrail:update-without-where"),
    ("DELETE FROM products", "guardrail:delete-without-where"),
    ("DELETE FROM products -- WHERE id = 1", "guardrail:delete-without-where"),
    (
        "WITH d AS (DELETE FROM products RETURNING *) SELECT * FROM d",
        "guardrail:delete-without-where",
    ),
    ("PREPARE p AS DELETE FROM products", "guardrail:delete-without-where"),
    ("EXPLAIN ANALYZE DELETE FROM products", "guardrail:delete-without-where"),
    (
        "MERGE INTO products p USING products s ON p.id = s.id WHEN MATCHED THEN DELETE",
        "guardrail:merge-unrestricted",
    ),
    ("SELECT md5(ssn) FROM customers", "guardrail:protected-column-derived"),
    ("SELECT 1 FROM customers WHERE ssn LIKE '1%'", "guardrail:protected-column-derived"),
    ("SELECT row_to_json(c) FROM customers c", "guardrail:protected-column-derived"),
    ("SELECT count(*) FROM customers GROUP BY lower(email)", "guardrail:protected-column-derived"),
    ("SELECT * FROM customers ORDER BY 3", "guardrail:protected-column-derived"),
    ("SELECT dob::text FROM customers", "guardrail:protected-column-derived"),
    ("SELECT right(account_number, 5) FROM accounts", "guardrail:protected-column-derived"),
    ("INSERT INTO products (name) SELECT ssn FROM customers", "guardrail:protected-column-derived"),
    (
        "UPDATE products SET name = (SELECT email FROM customers LIMIT 1) WHERE id = 1",
        "guardrail:protected-column-derived",
    ),
    (
        "SELECT upper(x) FROM (SELECT ssn AS x FROM customers) s",
        "guardrail:protected-column-derived",
    ),
    ("SELECT 1 FROM public.customers c WHERE c.ssn = '1'", "guardrail:protected-column-derived"),
    ("SELECT pg_notify('c', ssn) FROM customers", "guardrail:protected-column-derived"),
    ("SELECT set_config('x.y', ssn, false) FROM customers", "guardrail:protected-column-derived"),
    ("EXPLAIN SELECT 1 FROM customers WHERE ssn = '1'", "guardrail:protected-column-derived"),
    ("SELEC 1", "guardrail:unparseable"),
]


@pytest.mark.parametrize(("sql", "rule_id"), GUARDRAILS)
def test_guardrails(demo, sql, rule_id):
    verdict = decide(demo, sql)
    assert verdict.effect is Effect.DENY
    assert verdict.rule_id == rule_id, verdict.message
    assert verdict.message.startswith(f'guard: statement refused by rule "{rule_id}"')


@pytest.mark.parametrize(("sql", "rule_id"), GUARDRAILS[:20])
def test_guardrails_beat_any_policy(sql, rule_id):
    everything = load_policy(
        "version: 1\ntargets:\n  t:\n    connect_groups: [g]\n"
        "    session_ttl: {default: 1h, max: 1h}\n"
        "rules:\n  - {id: all, effect: allow}\n"
    )
    verdicts = everything.evaluate_analysis(who("g"), "t", analyze(sql))
    assert verdicts[0].rule_id == rule_id


def test_fast_path_refused(demo):
    verdict = demo.evaluate(ALICE, "demo", fast_path_analysis(764))
    assert verdict.rule_id == "guardrail:fast-path"


def test_unanalysable_refused(demo):
    from guard.broker.sql.statements import analyze_statement

    statement = analyze_statement(("ImaginaryStmt", {}), "IMAGINE", "")
    verdict = demo.evaluate(ALICE, "demo", statement)
    assert verdict.rule_id == "guardrail:unanalysable"
    assert "ImaginaryStmt" in verdict.message


def test_protected_columns_through_unqualified_and_other_schema(demo):
    # unqualified may be public.customers: protected
    assert not decide(demo, "SELECT upper(ssn) FROM customers").allowed
    # another schema's customers table is not the protected one
    assert decide(demo, "SELECT upper(ssn) FROM archive.customers").allowed


# --- rule semantics -----------------------------------------------------------------------


def policy(rules: str, *, protected: str = "") -> CompiledPolicy:
    text = textwrap.dedent(
        """\
        version: 1
        targets:
          t:
            connect_groups: [eng, ops]
            session_ttl: {default: 1h, max: 8h}
        """
    )
    if protected:
        text += f"    protected_columns: {{{protected}}}\n"
    text += "rules:\n" + textwrap.indent(textwrap.dedent(rules), "  ") if rules.strip() else ""
    return load_policy(text)


ENG = who("eng")


def verdict_of(p: CompiledPolicy, sql: str, principal: Principal = ENG) -> Verdict:
    return p.evaluate(principal, "t", analyze(sql).statements[0])


def test_empty_rule_set_denies_everything():
    empty = policy("")
    for sql in ("SELECT 1", "BEGIN", "SHOW work_mem"):
        verdict = verdict_of(empty, sql)
        assert verdict.rule_id == "default-deny"


def test_deny_beats_allow_in_any_order():
    rules_a = """\
    - {id: allow-all, effect: allow}
    - {id: no-products, effect: deny, when: {reads: [public.products]}}
    """
    rules_b = """\
    - {id: no-products, effect: deny, when: {reads: [public.products]}}
    - {id: allow-all, effect: allow}
    """
    for rules in (rules_a, rules_b):
        p = policy(rules)
        assert verdict_of(p, "SELECT * FROM products").rule_id == "no-products"
        assert verdict_of(p, "SELECT * FROM orders").allowed


def test_approval_beats_allow_and_deny_beats_approval():
    p = policy(
        """\
        - {id: allow-all, effect: allow}
        - id: gate
          effect: require_approval
          when: {reads: [public.orders]}
          approval: {approver_groups: [ops], window: 1h}
        - {id: no-drop, effect: deny, when: {operations: [ddl]}}
        """
    )
    assert verdict_of(p, "SELECT * FROM orders").effect is Effect.REQUIRE_APPROVAL
    assert verdict_of(p, "CREATE TABLE x AS SELECT * FROM orders").rule_id == "no-drop"


def test_every_operation_must_be_covered():
    p = policy(
        """\
        - {id: ins, effect: allow, when: {operations: [insert]}}
        """
    )
    assert verdict_of(p, "INSERT INTO a VALUES (1)").allowed
    verdict = verdict_of(p, "INSERT INTO a SELECT * FROM b")
    assert verdict.rule_id == "default-deny" and "read" in verdict.message
    p2 = policy(
        """\
        - {id: ins, effect: allow, when: {operations: [insert]}}
        - {id: rd, effect: allow, when: {operations: [read]}}
        """
    )
    verdict = verdict_of(p2, "INSERT INTO a SELECT * FROM b")
    assert verdict.allowed and verdict.rule_id == "ins,rd"


def test_allow_resources_are_upper_bounds():
    p = policy(
        """\
        - id: write-products
          effect: allow
          when: {operations: [update, read], writes: [public.products]}
        """
    )
    assert verdict_of(p, "UPDATE products SET a = 1 WHERE id = 1").allowed
    sneaky = (
        "WITH x AS (UPDATE customers SET a = 1 WHERE id = 1 RETURNING id)"
        " UPDATE products SET a = 1 WHERE id IN (SELECT id FROM x)"
    )
    assert verdict_of(p, sneaky).rule_id == "default-deny"
    # a writes-only allow rule does not allow plain reads
    assert verdict_of(p, "SELECT * FROM products").rule_id == "default-deny"


def test_reads_allow_rule_is_an_upper_bound():
    p = policy("- {id: r, effect: allow, when: {operations: [read], reads: [public.products]}}\n")
    assert verdict_of(p, "SELECT * FROM products").allowed
    assert verdict_of(p, "SELECT * FROM public.products").allowed
    assert not verdict_of(p, "SELECT * FROM products, orders").allowed
    assert not verdict_of(p, "SELECT * FROM other.products").allowed
    assert not verdict_of(p, "SELECT 1").allowed  # reads nothing: not this rule's business


def test_deny_triggers_on_unqualified_names_in_any_schema():
    p = policy(
        """\
        - {id: all, effect: allow}
        - {id: no-secrets, effect: deny, when: {reads: [vault.secrets]}}
        """
    )
    assert verdict_of(p, "SELECT * FROM secrets").rule_id == "no-secrets"
    assert verdict_of(p, "SELECT * FROM vault.secrets").rule_id == "no-secrets"
    assert verdict_of(p, "SELECT * FROM public.secrets").allowed


def test_groups_and_targets_scope_rules():
    p = policy(
        """\
        - {id: eng-read, effect: allow, groups: [eng], when: {operations: [read]}}
        - {id: elsewhere, effect: allow, targets: [t], groups: [nobody]}
        """
    )
    assert verdict_of(p, "SELECT 1").allowed
    assert verdict_of(p, "SELECT 1", who("ops")).rule_id == "default-deny"


def test_rule_for_other_target_does_not_apply():
    text = textwrap.dedent(
        """\
        version: 1
        targets:
          a: {connect_groups: [g], session_ttl: {default: 1h, max: 1h}}
          b: {connect_groups: [g], session_ttl: {default: 1h, max: 1h}}
        rules:
          - {id: only-a, effect: allow, targets: [a]}
        """
    )
    p = load_policy(text)
    statement = analyze("SELECT 1").statements[0]
    assert p.evaluate(who("g"), "a", statement).allowed
    assert p.evaluate(who("g"), "b", statement).rule_id == "default-deny"


def test_function_conditions():
    p = policy(
        """\
        - {id: all, effect: allow}
        - {id: no-sleep, effect: deny, when: {functions: [pg_sleep]}}
        - {id: no-f, effect: deny, when: {functions: [app.f]}}
        """
    )
    assert verdict_of(p, "SELECT pg_sleep(10)").rule_id == "no-sleep"
    assert verdict_of(p, "SELECT pg_catalog.pg_sleep(10)").rule_id == "no-sleep"
    assert verdict_of(p, "SELECT f()").rule_id == "no-f"
    assert verdict_of(p, "SELECT app.f()").rule_id == "no-f"
    assert verdict_of(p, "SELECT other.f()").allowed


def test_deny_conditions_must_all_hold():
    p = policy(
        """\
        - {id: all, effect: allow}
        - {id: no-del-orders, effect: deny, when: {operations: [delete], reads: [public.orders]}}
        """
    )
    assert verdict_of(p, "DELETE FROM orders WHERE id = 1").rule_id == "no-del-orders"
    assert verdict_of(p, "SELECT * FROM orders").allowed
    assert verdict_of(p, "DELETE FROM items WHERE id = 1").allowed


def test_require_approval_without_reads_names_the_statement():
    p = policy(
        """\
        - {id: all, effect: allow}
        - id: careful
          effect: require_approval
          when: {operations: [delete]}
          approval: {approver_groups: [ops, leads], approvals_required: 2, window: 2h}
        """
    )
    verdict = verdict_of(p, "DELETE FROM orders WHERE id = 1")
    assert verdict.effect is Effect.REQUIRE_APPROVAL
    assert verdict.message.startswith("guard: this statement requires approval")
    assert "leads, ops" in verdict.message
    assert verdict.approval is not None and verdict.approval.approvals_required == 2


def test_approval_verdict_lists_masked_columns():
    p = policy(
        """\
        - id: gate
          effect: require_approval
          when: {reads: [public.customers]}
          approval: {approver_groups: [ops], window: 1h}
        """,
        protected="public.customers.ssn: ssn_last4",
    )
    verdict = verdict_of(p, "SELECT ssn FROM customers")
    assert verdict.masked_columns == (ColumnId("public", "customers", "ssn"),)
    assert p.targets["t"].gated_tables == {("public", "customers")}


# --- connecting -----------------------------------------------------------------------------


def test_can_connect(demo):
    assert demo.can_connect(ALICE, "demo").allowed
    assert demo.can_connect(LEAD, "demo").allowed
    denied = demo.can_connect(MALLORY, "demo")
    assert denied.effect is Effect.DENY and denied.rule_id == "guardrail:connect"
    assert "mallory" in denied.message and "engineers" in denied.message
    unknown = demo.can_connect(ALICE, "prod")
    assert unknown.rule_id == "guardrail:unknown-target" and "prod" in unknown.message


def test_evaluate_checks_target_and_membership(demo):
    statement = analyze("SELECT 1").statements[0]
    assert demo.evaluate(MALLORY, "demo", statement).rule_id == "guardrail:connect"
    assert demo.evaluate(ALICE, "prod", statement).rule_id == "guardrail:unknown-target"


def test_evaluate_analysis_shapes(demo):
    assert demo.evaluate_analysis(ALICE, "demo", analyze("-- nothing")) == ()
    verdicts = demo.evaluate_analysis(
        ALICE, "demo", analyze("BEGIN; SELECT ssn FROM customers; DROP TABLE x; COMMIT")
    )
    assert [v.effect for v in verdicts] == [Effect.ALLOW, Effect.ALLOW, Effect.DENY, Effect.ALLOW]
    (error,) = demo.evaluate_analysis(ALICE, "demo", analyze("SELECT 1; SELEC 2"))
    assert error.rule_id == "guardrail:unparseable" and "syntax error" in error.message


def test_verdicts_are_immutable(demo):
    verdict = decide(demo, "SELECT 1")
    with pytest.raises(AttributeError):
        verdict.effect = Effect.DENY  # type: ignore[misc]
