"""policies.yaml text -> `CompiledPolicy`, or a `PolicyError` listing every problem by path.

Imports yaml, pydantic, the stdlib and the `policy`/`sql` packages. The only I/O in the
policy package is `load_policy_file` reading the file. Parsing is strict: duplicate YAML
keys are errors (PyYAML would silently keep the last one, so a second `demo:` target or a
repeated protected column would quietly replace the first), and every problem carries the
YAML path it was found at, e.g. `rules[2].when.operations[0]` or
`targets.demo.protected_columns.public.customers.ssn`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import ValidationError

from guard.broker.policy.engine import CompiledPolicy
from guard.broker.policy.model import (
    ApprovalRequirement,
    ColumnId,
    Effect,
    FunctionSet,
    ProtectedTable,
    Rule,
    TableSet,
    Target,
    UnmaskedAccess,
)
from guard.broker.policy.schema import (
    SUPPORTED_VERSION,
    PolicyDocument,
    RuleSpec,
    TargetSpec,
    duration_seconds,
)
from guard.broker.sql.model import Operation


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PolicyError(Exception):
    """The policy is invalid; `errors` lists every problem found."""

    def __init__(self, errors: Sequence[PolicyProblem], source: str = "<policy>") -> None:
        self.errors = tuple(errors)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{self.source}: invalid policy ({len(self.errors)} problem(s))"]
        lines.extend(f"  {problem}" for problem in self.errors)
        return "\n".join(lines)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _problems_from(exc: ValidationError) -> list[PolicyProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        kind = err["type"]
        if kind == "missing":
            message = "required key is missing"
        elif kind == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        problems.append(PolicyProblem(_path(loc), message))
    return problems


def load_policy(text: str, *, source: str = "<policy>") -> CompiledPolicy:
    """Parse, validate and compile a policy document; raises PolicyError."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([PolicyProblem("", f"invalid YAML{where}: {problem}")], source) from None
    if not isinstance(raw, dict):
        raise PolicyError([PolicyProblem("", "the policy must be a YAML mapping")], source)
    if "version" not in raw:
        message = f"required key is missing (this guard reads version {SUPPORTED_VERSION})"
        raise PolicyError([PolicyProblem("version", message)], source)
    if type(raw["version"]) is not int or raw["version"] != SUPPORTED_VERSION:
        message = f"unsupported policy version {raw['version']!r} (expected {SUPPORTED_VERSION})"
        raise PolicyError([PolicyProblem("version", message)], source)
    try:
        document = PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(_problems_from(exc), source) from None
    return compile_document(document, source=source)


def load_policy_file(path: str | os.PathLike[str]) -> CompiledPolicy:
    """Read and compile a policy file; raises PolicyError (also when it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        problem = PolicyProblem("", f"cannot read policy file: {exc}")
        raise PolicyError([problem], str(path)) from None
    return load_policy(text, source=str(path))


def compile_document(document: PolicyDocument, *, source: str = "<policy>") -> CompiledPolicy:
    """Cross-field checks and compilation of a validated document."""
    problems: list[PolicyProblem] = []
    rules = tuple(_compile_rules(document, problems))
    targets = {}
    for name, spec in document.targets.items():
        target = _compile_target(name, spec, rules, problems)
        if target is not None:
            targets[name] = target
    if problems:
        raise PolicyError(problems, source)
    return CompiledPolicy(version=document.version, targets=targets, rules=rules)


def _compile_target(
    name: str, spec: TargetSpec, rules: Sequence[Rule], problems: list[PolicyProblem]
) -> Target | None:
    path = f"targets.{name}"
    default_ttl = duration_seconds(spec.session_ttl.default)
    max_ttl = duration_seconds(spec.session_ttl.max)
    if default_ttl > max_ttl:
        problems.append(
            PolicyProblem(f"{path}.session_ttl.default", "must not be longer than session_ttl.max")
        )
    protected: dict[ColumnId, str] = {}
    for key, strategy in spec.protected_columns.items():
        parts = key.split(".")
        if len(parts) != 3 or not all(parts) or any(p != p.strip() for p in parts):
            problems.append(
                PolicyProblem(
                    f"{path}.protected_columns.{key}",
                    f"column id {key!r} must have the form schema.table.column",
                )
            )
            continue
        protected[ColumnId(*parts)] = strategy
    by_table: dict[tuple[str, str], dict[str, ColumnId]] = {}
    for column in sorted(protected):
        by_table.setdefault((column.schema, column.table), {})[column.column] = column
    by_name: dict[str, list[ProtectedTable]] = {}
    for (schema, table), columns in by_table.items():
        entry = ProtectedTable(schema, table, MappingProxyType(columns))
        by_name.setdefault(table, []).append(entry)
    gated = frozenset(
        table
        for rule in rules
        if rule.effect is Effect.REQUIRE_APPROVAL and rule.reads is not None
        if rule.targets is None or name in rule.targets
        for table in rule.reads.tables
    )
    unmasked = _compile_unmasked(path, spec, max_ttl, protected, problems)
    if problems:
        return None
    return Target(
        name=name,
        description=spec.description,
        connect_groups=frozenset(spec.connect_groups),
        default_ttl_seconds=default_ttl,
        max_ttl_seconds=max_ttl,
        protected_columns=MappingProxyType(protected),
        gated_tables=gated,
        max_connections_per_session=spec.max_connections_per_session,
        reauthenticate=spec.session_ttl.reauthenticate,
        auto_extend=spec.session_ttl.auto_extend,
        unmasked=unmasked,
        _protected_by_name=MappingProxyType({k: tuple(v) for k, v in by_name.items()}),
    )


def _compile_unmasked(
    path: str,
    spec: TargetSpec,
    max_ttl: int,
    protected: Mapping[ColumnId, str],
    problems: list[PolicyProblem],
) -> UnmaskedAccess | None:
    access = spec.unmasked_access
    if access is None:
        return None
    path = f"{path}.unmasked_access"
    if not protected:
        problems.append(PolicyProblem(path, "the target has no protected_columns to unmask"))
    approval = None
    if access.approval is not None:
        if access.approval.window is not None:
            # The approval covers the whole session; its length is max_ttl's to say.
            problems.append(
                PolicyProblem(
                    f"{path}.approval.window",
                    "an approval of unmasked access covers the session: set "
                    "unmasked_access.max_ttl to limit it",
                )
            )
        approval = ApprovalRequirement(
            approver_groups=frozenset(access.approval.approver_groups),
            approvals_required=access.approval.approvals_required,
            window_seconds=None,
        )
    # Never longer than the target's own maximum (a policy that shortens session_ttl.max
    # shortens unmasked sessions with it).
    limit = max_ttl if access.max_ttl is None else duration_seconds(access.max_ttl)
    return UnmaskedAccess(
        groups=frozenset(access.groups), approval=approval, max_ttl_seconds=min(limit, max_ttl)
    )


def _compile_rules(document: PolicyDocument, problems: list[PolicyProblem]) -> list[Rule]:
    seen: dict[str, int] = {}
    compiled = []
    for index, spec in enumerate(document.rules):
        path = f"rules[{index}]"
        if spec.id in seen:
            problems.append(
                PolicyProblem(
                    f"{path}.id", f"duplicate rule id {spec.id!r} (also rules[{seen[spec.id]}])"
                )
            )
        seen.setdefault(spec.id, index)
        for position, target in enumerate(spec.targets or ()):
            if target not in document.targets:
                problems.append(
                    PolicyProblem(f"{path}.targets[{position}]", f"unknown target {target!r}")
                )
        compiled.append(_compile_rule(spec, path, problems))
    return compiled


def _schema_table(name: str) -> tuple[str, str]:
    # The policy schema admits only `schema.table` (one dot) here.
    schema, table = name.split(".", 1)
    return schema, table


def _compile_rule(spec: RuleSpec, path: str, problems: list[PolicyProblem]) -> Rule:
    effect = Effect(spec.effect)
    approval = None
    if effect is Effect.REQUIRE_APPROVAL:
        if spec.approval is None:
            problems.append(
                PolicyProblem(f"{path}.approval", "required for effect require_approval")
            )
        else:
            approval = ApprovalRequirement(
                approver_groups=frozenset(spec.approval.approver_groups),
                approvals_required=spec.approval.approvals_required,
                window_seconds=(
                    duration_seconds(spec.approval.window) if spec.approval.window else None
                ),
            )
    elif spec.approval is not None:
        problems.append(
            PolicyProblem(
                f"{path}.approval", f"only allowed with effect require_approval, not {effect}"
            )
        )
    when = spec.when

    def tables(names: list[str] | None) -> TableSet | None:
        if names is None:
            return None
        return TableSet.of(_schema_table(n) for n in names)

    return Rule(
        id=spec.id,
        description=spec.description,
        effect=effect,
        targets=frozenset(spec.targets) if spec.targets is not None else None,
        groups=frozenset(spec.groups) if spec.groups is not None else None,
        operations=(
            frozenset(Operation(o) for o in when.operations)
            if when.operations is not None
            else None
        ),
        reads=tables(when.reads),
        writes=tables(when.writes),
        functions=FunctionSet(frozenset(when.functions)) if when.functions is not None else None,
        approval=approval,
    )
