"""Claim bindings of a trusted issuer: which verified tokens it admits and with which groups.

Pure: imports only the stdlib. A trusted issuer (`settings.TrustedIssuerSettings`) names
required claims (every one must match) and claim → group mappings (a mapping's group is
given when every claim of its `when` matches). Policy stays in terms of groups; this module
is the only place where a CI job's repository, branch or project becomes one.

Matching rules, each stopping a known attack on CI workload identity:
- A pattern is an exact string, or a glob whose `*` and `?` never match `/` or `:`, so
  `refs/heads/*` does not admit `refs/heads/x/../main`-style names in another segment and
  `repo:octo/*` cannot reach into `sub`'s next field (`repo:octo/app:environment:prod`
  is not `repo:octo/*`). There are no character classes (`[`), no `**`.
- Claim values are compared as strings: a string as it is, an integer in decimal, a
  boolean as `true`/`false` (GitLab's `ref_protected` is a string, GitHub's ids are
  strings, some issuers send numbers). A list, object or missing claim matches nothing.
- Nothing is ever taken from `sub` by position: its shape changes with environments,
  custom subject templates and GitHub's `owner@id/repo@id` form. Bind the claims that
  carry each fact (`repository_id`, `ref`, `environment`…) instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Name claims of the two big CI platforms and the numeric id that must be bound with
# them: a deleted and re-created repository, project or owner keeps its name, not its id.
NAME_CLAIM_IDS: dict[str, str] = {
    "repository": "repository_id",
    "repository_owner": "repository_owner_id",
    "project_path": "project_id",
    "namespace_path": "namespace_id",
}
# For GitHub and GitLab every admission must be bound to one of these (an owner, a
# repository, a project or a group), else any repository on the platform that asks for
# guard's audience would get in: the audience is public, anyone can request it.
OWNER_ID_CLAIMS: dict[str, tuple[str, ...]] = {
    "github": ("repository_owner_id", "repository_id"),
    "gitlab": ("namespace_id", "project_id"),
}
# What the audit keeps of a CI token beside the claims the bindings name: where the job
# ran and what it ran (the run, the commit), for an examiner's question "which job?".
AUDIT_CLAIMS: dict[str, tuple[str, ...]] = {
    "github": (
        "repository",
        "repository_id",
        "repository_owner_id",
        "ref",
        "sha",
        "workflow_ref",
        "job_workflow_ref",
        "environment",
        "event_name",
        "run_id",
        "run_attempt",
        "actor",
    ),
    "gitlab": (
        "project_path",
        "project_id",
        "namespace_id",
        "ref",
        "ref_protected",
        "sha",
        "environment",
        "pipeline_source",
        "pipeline_id",
        "job_id",
        "user_login",
    ),
    "generic": (),
}
_MAX_SHOWN = 80


def claim_text(value: Any) -> str | None:
    """A claim's value as the string patterns match against, or None (never matches)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return None


def _compile(pattern: str) -> re.Pattern[str]:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append("[^/:]*")
        elif char == "?":
            parts.append("[^/:]")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


@dataclass(frozen=True, slots=True)
class ClaimPattern:
    """One claim and the values it may have (any of them)."""

    claim: str
    patterns: tuple[str, ...]
    _compiled: tuple[re.Pattern[str], ...]

    @classmethod
    def of(cls, claim: str, patterns: Iterable[str]) -> ClaimPattern:
        pats = tuple(patterns)
        return cls(claim, pats, tuple(_compile(p) for p in pats))

    def matches(self, claims: Mapping[str, Any]) -> bool:
        text = claim_text(claims.get(self.claim))
        return text is not None and any(c.fullmatch(text) for c in self._compiled)

    def mismatch(self, claims: Mapping[str, Any]) -> str:
        """Why `claims` do not match, in one phrase (the token's value quoted, shortened:
        claim values such as repository ids are not secrets, and say what to fix)."""
        value = claims.get(self.claim)
        wanted = " or ".join(repr(p) for p in self.patterns)
        if value is None:
            return f"it has no {self.claim!r} claim (required: {wanted})"
        shown = repr(value)
        shown = shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + "…"
        return f"its {self.claim!r} is {shown}, required {wanted}"


def patterns_of(rules: Mapping[str, str | list[str]]) -> tuple[ClaimPattern, ...]:
    return tuple(
        ClaimPattern.of(claim, [wanted] if isinstance(wanted, str) else wanted)
        for claim, wanted in sorted(rules.items())
    )


@dataclass(frozen=True, slots=True)
class GroupMapping:
    group: str
    when: tuple[ClaimPattern, ...]

    def applies(self, claims: Mapping[str, Any]) -> bool:
        return all(p.matches(claims) for p in self.when)


@dataclass(frozen=True, slots=True)
class ClaimBindings:
    """A trusted issuer's admission rules and group mappings, compiled."""

    required: tuple[ClaimPattern, ...] = ()
    mappings: tuple[GroupMapping, ...] = ()
    # Claims copied into the session's audit record when the token has them.
    audit_claims: tuple[str, ...] = ()

    def first_mismatch(self, claims: Mapping[str, Any]) -> str | None:
        for pattern in self.required:
            if not pattern.matches(claims):
                return pattern.mismatch(claims)
        return None

    def closest_miss(self, claims: Mapping[str, Any]) -> str | None:
        """Why no group mapping applies (each mapping's first mismatch), None if one does."""
        reasons = []
        for i, mapping in enumerate(self.mappings):
            miss = next((p for p in mapping.when if not p.matches(claims)), None)
            if miss is None:
                return None
            reasons.append(f"groups[{i}] ({mapping.group}): {miss.mismatch(claims)}")
        return "; ".join(reasons) if reasons else None

    def groups(self, claims: Mapping[str, Any]) -> frozenset[str]:
        return frozenset(m.group for m in self.mappings if m.applies(claims))

    def evidence(self, claims: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        """The bound and audited claims this token carried, as (claim, value) pairs."""
        names = dict.fromkeys(self.audit_claims)
        for pattern in self.required:
            names.setdefault(pattern.claim)
        for mapping in self.mappings:
            for pattern in mapping.when:
                names.setdefault(pattern.claim)
        pairs = []
        for name in names:
            text = claim_text(claims.get(name))
            if text is not None:
                pairs.append((name, text[:200]))
        return tuple(pairs)


def binding_problems(
    platform: str, required: Mapping[str, Any], mappings: Iterable[Mapping[str, Any]]
) -> list[str]:
    """What is unsafe in a workload issuer's bindings (empty: nothing). `required` and each
    mapping's `when` are claim → pattern(s); a mapping's effective binding is both."""
    problems = []
    # Each mapping is checked with `require` added (what admits a token to its group);
    # `require` alone only when there is no mapping (groups from a claim of the token).
    sets = [(f"groups[{i}]", set(required) | set(m)) for i, m in enumerate(mappings)]
    sets = sets or [("require", set(required))]
    for where, claims in sets:
        for name, id_claim in NAME_CLAIM_IDS.items():
            if name in claims and id_claim not in claims:
                problems.append(
                    f"{where} binds {name!r} without {id_claim!r}: a deleted and re-created "
                    f"{name.split('_')[0]} of the same name would match; bind {id_claim!r}"
                )
        if "sub" in claims and not claims & set(NAME_CLAIM_IDS.values()):
            problems.append(
                f"{where} binds 'sub' without a numeric id claim (repository_id, project_id…):"
                " 'sub' carries names, which can be re-created"
            )
    owner_ids = OWNER_ID_CLAIMS.get(platform)
    for where, claims in sets:
        if owner_ids is not None and claims.isdisjoint(owner_ids):
            problems.append(
                f"{where} is not bound to any of {', '.join(owner_ids)}: every {platform} "
                "job that asks for this audience would match"
            )
        elif owner_ids is None and not claims:
            problems.append(f"{where} binds no claim: every token of this issuer would match")
    return problems
