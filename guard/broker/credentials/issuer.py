"""The credential issuer seam: short-lived database credentials per session.

Imports only the stdlib (and the broker's domain errors). `credentials.openbao` is the real
implementation (OpenBao or HashiCorp Vault database secrets engine), `credentials.fake` the
unit-test one; only `service.py` picks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from guard.broker.errors import DependencyUnavailable


@dataclass(frozen=True, slots=True)
class IssuedCredentials:
    username: str
    password: str = field(repr=False)  # never printed, logged or sent to a client
    lease_id: str
    expires_at: datetime  # UTC


class CredentialIssuer(Protocol):
    def issue(self, role: str, ttl_seconds: int) -> IssuedCredentials:
        """Mint credentials whose lease lasts at most `ttl_seconds`."""
        ...

    def revoke(self, lease_id: str) -> None:
        """End the lease now; the secrets engine drops the role."""
        ...

    def renew(self, lease_id: str, ttl_seconds: int) -> datetime:
        """Make the lease last `ttl_seconds` from now (at most what the secrets engine's
        role allows); when it now ends (UTC)."""
        ...


class CredentialsUnavailable(DependencyUnavailable):
    """The secrets engine could not issue or revoke: fail closed, say what to check.

    HTTP 503 and SQLSTATE 08006 (from `DependencyUnavailable`); `message` says what
    failed, `hint` what to do; neither ever holds a token or a password.
    """

    code = "credentials_unavailable"
