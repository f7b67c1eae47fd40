"""In-memory credential issuer for unit tests only; warns `FakeComponentWarning` when built.

`FakeComponentWarning` is the one marker class for every fake component (it lives in
`guard.broker.fakes`, shared with the OIDC `StaticKeySource`) and is re-exported here.
"""

from __future__ import annotations

import secrets
import warnings
from datetime import UTC, datetime, timedelta

from guard.broker.credentials.issuer import IssuedCredentials
from guard.broker.fakes import FakeComponentWarning

__all__ = ["FakeComponentWarning", "FakeIssuer"]


class FakeIssuer:
    """Issues made-up credentials and records revocations; nothing reaches a database."""

    def __init__(self) -> None:
        warnings.warn("FakeIssuer is for unit tests only", FakeComponentWarning, stacklevel=2)
        self.active: dict[str, IssuedCredentials] = {}
        self.revoked: list[str] = []

    def issue(self, role: str, ttl_seconds: int) -> IssuedCredentials:
        lease = f"database/creds/{role}/{secrets.token_hex(4)}"
        creds = IssuedCredentials(
            username=f"v-{role}-{secrets.token_hex(3)}",
            password=secrets.token_hex(8),
            lease_id=lease,
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl_seconds),
        )
        self.active[lease] = creds
        return creds

    def renew(self, lease_id: str, ttl_seconds: int) -> datetime:
        creds = self.active[lease_id]
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl_seconds)
        self.active[lease_id] = IssuedCredentials(
            creds.username, creds.password, creds.lease_id, expires_at
        )
        return expires_at

    def revoke(self, lease_id: str) -> None:
        self.active.pop(lease_id, None)
        self.revoked.append(lease_id)
