"""Who is asking: the principal derived from verified OIDC claims.

Pure: imports only the stdlib. The only constructor that should be used outside tests is
`Principal.from_claims`, which takes `VerifiedClaims` (claims whose signature, issuer,
audience and lifetime were checked by `identity.oidc`). Keeping the trust boundary in the
types stops an unverified token body from ever becoming an identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NewType

VerifiedClaims = NewType("VerifiedClaims", Mapping[str, Any])


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: issuer + subject identify it, groups drive policy."""

    issuer: str
    subject: str
    groups: frozenset[str]
    display_name: str | None = None
    # When the ID token this principal came from expires (epoch seconds): a session whose
    # target requires reauthentication lasts no longer unless a fresh token comes. Not
    # part of who the principal is (equality).
    token_expires: float | None = field(default=None, compare=False)
    # How the identity was proven, for the audit (not part of who it is): the trusted
    # issuer's name and kind (`person`: an ID token from a login; `workload`: a CI job's
    # token), and the claims its bindings looked at or the audit keeps (repository, ref,
    # workflow, run id…), as (claim, value) pairs.
    via: str = field(default="", compare=False)
    kind: str = field(default="person", compare=False)
    evidence: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @classmethod
    def from_claims(
        cls,
        claims: VerifiedClaims,
        *,
        groups_claim: str | None = "groups",
        subject_claim: str = "sub",
        name_claims: tuple[str, ...] = ("preferred_username", "email", "name"),
        extra_groups: frozenset[str] = frozenset(),
        via: str = "",
        kind: str = "person",
        evidence: tuple[tuple[str, str], ...] = (),
    ) -> Principal:
        raw = claims.get(groups_claim, ()) if groups_claim else ()
        if isinstance(raw, str):
            # Some IdPs send a single group as a string; a space-separated list is not split
            # on purpose: a group name containing a space must not become two groups.
            raw = (raw,)
        if not isinstance(raw, list | tuple):
            raw = ()
        groups = frozenset(g for g in raw if isinstance(g, str) and g) | extra_groups
        name = next((claims[c] for c in name_claims if isinstance(claims.get(c), str)), None)
        exp = claims.get("exp")
        return cls(
            issuer=str(claims["iss"]),
            subject=str(claims[subject_claim]),
            groups=groups,
            display_name=str(name) if name else None,
            token_expires=float(exp) if isinstance(exp, int | float) else None,
            via=via,
            kind=kind,
            evidence=evidence,
        )

    @property
    def label(self) -> str:
        """Human label for messages and audit: display name, else subject."""
        return self.display_name or self.subject
