"""policy.compile: loading policies.yaml strictly, with every problem reported by YAML path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from guard.broker.masking.strategies import STRATEGIES
from guard.broker.policy.compile import PolicyError, PolicyProblem, load_policy, load_policy_file
from guard.broker.policy.model import ColumnId, Effect
from guard.broker.policy.schema import MASK_STRATEGIES, duration_seconds
from guard.broker.sql.model import Operation

REPO_POLICY = Path(__file__).resolve().parents[2] / "policies.yaml"

BASE = """\
version: 1
targets:
  demo:
    connect_groups: [engineers]
    session_ttl: {default: 1h, max: 8h}
    protected_columns:
      public.customers.ssn: ssn_last4
rules:
  - id: r1
    effect: allow
    when: {operations: [read]}
"""


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        load_policy(textwrap.dedent(text))
    return [(p.path, p.message) for p in info.value.errors]


def paths(text: str) -> list[str]:
    return [path for path, _ in problems(text)]


def test_repo_policy_compiles():
    policy = load_policy_file(REPO_POLICY)
    assert policy.version == 1
    demo = policy.targets["demo"]
    assert demo.connect_groups == {"engineers", "security-leads", "service"}
    assert (demo.default_ttl_seconds, demo.max_ttl_seconds) == (3600, 8 * 3600)
    assert demo.protected_columns == {
        ColumnId("public", "customers", "ssn"): "ssn_last4",
        ColumnId("public", "customers", "email"): "email_first_char",
        ColumnId("public", "customers", "dob"): "year_only",
        ColumnId("public", "accounts", "account_number"): "last4",
    }
    assert demo.gated_tables == {("public", "transactions")}
    ids = [r.id for r in policy.rules]
    assert ids[0] == "deny-ddl" and "transactions-need-approval" in ids
    approval = next(r for r in policy.rules if r.effect is Effect.REQUIRE_APPROVAL).approval
    assert approval is not None
    assert approval.approver_groups == {"security-leads"}
    assert (approval.approvals_required, approval.window_seconds) == (1, 1800)


def test_compiled_rule_fields():
    policy = load_policy(BASE)
    (rule,) = policy.rules
    assert rule.operations == {Operation.READ}
    assert rule.groups is None and rule.targets is None and rule.reads is None


def test_column_id_str():
    column = ColumnId("public", "customers", "ssn")
    assert str(column) == "public.customers.ssn"
    assert column.short == "customers.ssn"


def test_mask_strategy_names_come_from_masking():
    assert MASK_STRATEGIES == set(STRATEGIES)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("8h", 28800), ("1d", 86400)]
)
def test_durations(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["0s", "1", "1w", "1.5h", "h", " 1h", "-1h", "1H"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="invalid duration"):
        duration_seconds(text)


def test_missing_version():
    assert problems("targets: {}\n") == [
        ("version", "required key is missing (this guard reads version 1)")
    ]


@pytest.mark.parametrize("version", ["2", "'1'", "true", "1.0"])
def test_unknown_version(version):
    ((path, message),) = problems(BASE.replace("version: 1", f"version: {version}"))
    assert path == "version" and "unsupported policy version" in message


def test_unknown_keys_everywhere():
    text = (
        BASE.replace("rules:", "extra: 1\nrules:")
        .replace("    effect: allow", "    effect: allow\n    effct: deny")
        .replace("    connect_groups:", "    conect_groups: [x]\n    connect_groups:")
    )
    found = problems(text)
    assert ("extra", "unknown key 'extra'") in found
    assert ("rules[0].effct", "unknown key 'effct'") in found
    assert ("targets.demo.conect_groups", "unknown key 'conect_groups'") in found


def test_missing_and_bad_effect():
    assert ("rules[0].effect", "required key is missing") in problems(
        BASE.replace("    effect: allow\n", "")
    )
    ((path, message),) = problems(BASE.replace("effect: allow", "effect: permit"))
    assert path == "rules[0].effect" and "'allow'" in message


def test_bad_duration_has_path():
    ((path, message),) = problems(BASE.replace("default: 1h", "default: 1 hour"))
    assert path == "targets.demo.session_ttl.default"
    assert "invalid duration '1 hour'" in message


def test_default_ttl_longer_than_max():
    assert paths(BASE.replace("default: 1h", "default: 9h")) == ["targets.demo.session_ttl.default"]


def test_unknown_mask_strategy_has_column_path():
    ((path, message),) = problems(BASE.replace("ssn_last4", "sha256"))
    assert path == "targets.demo.protected_columns.public.customers.ssn"
    assert "unknown mask strategy 'sha256'" in message and "ssn_last4" in message


@pytest.mark.parametrize("column", ["customers.ssn", "a.b.c.d", "public..ssn", "ssn"])
def test_column_id_must_be_schema_table_column(column):
    ((path, message),) = problems(BASE.replace("public.customers.ssn", column))
    assert path == f"targets.demo.protected_columns.{column}"
    assert "schema.table.column" in message


def test_unknown_operation_has_index_path():
    ((path, message),) = problems(BASE.replace("[read]", "[read, select]"))
    assert path == "rules[0].when.operations[1]"
    assert "unknown operation 'select'" in message and "read" in message


def test_tables_must_be_schema_qualified():
    ((path, message),) = problems(BASE.replace("{operations: [read]}", "{reads: [transactions]}"))
    assert path == "rules[0].when.reads[0]"
    assert "schema-qualified" in message


def test_duplicate_rule_ids():
    text = BASE + "  - id: r1\n    effect: deny\n"
    assert problems(text) == [("rules[1].id", "duplicate rule id 'r1' (also rules[0])")]


def test_approval_only_on_require_approval():
    text = BASE.replace(
        "    when: {operations: [read]}",
        "    when: {operations: [read]}\n    approval: {approver_groups: [leads], window: 30m}",
    )
    ((path, message),) = problems(text)
    assert path == "rules[0].approval" and "require_approval" in message


def test_require_approval_needs_approval_block():
    text = BASE.replace("effect: allow", "effect: require_approval")
    assert problems(text) == [("rules[0].approval", "required for effect require_approval")]


def test_unknown_target_in_rule():
    text = BASE.replace("    effect: allow", "    effect: allow\n    targets: [demo, prod]")
    assert problems(text) == [("rules[0].targets[1]", "unknown target 'prod'")]


def test_strict_types():
    found = paths(
        BASE.replace("connect_groups: [engineers]", "connect_groups: engineers").replace(
            "effect: allow", "effect: allow\n    description: 12"
        )
    )
    assert "targets.demo.connect_groups" in found
    assert "rules[0].description" in found


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (("[read]", "[]"), "rules[0].when.operations"),
        (("connect_groups: [engineers]", "connect_groups: []"), "targets.demo.connect_groups"),
        (("id: r1", "id: 'guardrail:x'"), "rules[0].id"),
        (("id: r1", "id: default-deny"), "rules[0].id"),
        (("id: r1", "id: 'has space'"), "rules[0].id"),
    ],
)
def test_empty_lists_and_reserved_ids(change, path):
    assert path in paths(BASE.replace(*change))


def test_approval_fields_validated():
    text = BASE.replace("effect: allow", "effect: require_approval").replace(
        "    when: {operations: [read]}",
        "    when: {reads: [public.t]}\n"
        "    approval: {approver_groups: [], approvals_required: 0, window: soon}",
    )
    found = paths(text)
    assert {
        "rules[0].approval.approver_groups",
        "rules[0].approval.approvals_required",
        "rules[0].approval.window",
    } <= set(found)


def test_duplicate_yaml_keys_are_errors():
    text = BASE.replace(
        "      public.customers.ssn: ssn_last4",
        "      public.customers.ssn: ssn_last4\n      public.customers.ssn: null",
    )
    ((path, message),) = problems(text)
    assert path == "" and "duplicate key 'public.customers.ssn'" in message and "line 8" in message


def test_invalid_yaml_and_non_mapping():
    ((_, message),) = problems("version: 1\ntargets: [\n")
    assert message.startswith("invalid YAML")
    assert problems("- 1\n- 2\n") == [("", "the policy must be a YAML mapping")]


def test_many_problems_reported_at_once_and_str_lists_them():
    text = BASE.replace("ssn_last4", "nope").replace("[read]", "[reed]").replace("1h", "1y")
    with pytest.raises(PolicyError) as info:
        load_policy(text, source="p.yaml")
    err = info.value
    assert len(err.errors) == 3
    lines = str(err).splitlines()
    assert lines[0] == "p.yaml: invalid policy (3 problem(s))"
    assert any(line.strip().startswith("rules[0].when.operations[0]: ") for line in lines)
    assert all(isinstance(p, PolicyProblem) for p in err.errors)
    assert str(PolicyProblem("", "x")) == "x"


def test_load_policy_file_missing(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy_file(tmp_path / "nope.yaml")
    assert "cannot read policy file" in info.value.errors[0].message


def test_load_policy_file_reports_its_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\n")
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert info.value.source == str(path)
    assert ("targets", "required key is missing") in [
        (p.path, p.message) for p in info.value.errors
    ]


def test_compiled_objects_are_immutable():
    policy = load_policy(BASE)
    target = policy.targets["demo"]
    with pytest.raises(TypeError):
        policy.targets["x"] = target  # type: ignore[index]
    with pytest.raises(TypeError):
        target.protected_columns[ColumnId("a", "b", "c")] = "null"  # type: ignore[index]
    with pytest.raises(AttributeError):
        target.name = "other"  # type: ignore[misc]


def test_max_connections_per_session_defaults_to_20():
    assert load_policy(BASE).targets["demo"].max_connections_per_session == 20


def test_max_connections_per_session_is_read_per_target():
    text = BASE.replace(
        "    session_ttl: {default: 1h, max: 8h}\n",
        "    session_ttl: {default: 1h, max: 8h}\n    max_connections_per_session: 3\n",
    )
    assert load_policy(text).targets["demo"].max_connections_per_session == 3


@pytest.mark.parametrize("value", ["0", "-1", "'5'", "2.5", "true", "10001"])
def test_max_connections_per_session_must_be_a_positive_integer(value):
    text = BASE.replace(
        "    session_ttl: {default: 1h, max: 8h}\n",
        f"    session_ttl: {{default: 1h, max: 8h}}\n    max_connections_per_session: {value}\n",
    )
    assert paths(text) == ["targets.demo.max_connections_per_session"]


def test_session_ttl_is_clamped():
    target = load_policy(BASE).targets["demo"]
    assert target.session_ttl() == 3600
    assert target.session_ttl(600) == 600
    assert target.session_ttl(100_000) == 8 * 3600


@pytest.mark.parametrize("value", ["null", "~", "", "'null'"])
def test_yaml_null_means_the_null_strategy(value):
    target = load_policy(BASE.replace(" ssn_last4", f" {value}")).targets["demo"]
    assert target.protected_columns == {ColumnId("public", "customers", "ssn"): "null"}
