"""Credential issuer backed by the OpenBao / HashiCorp Vault database secrets engine (hvac).

Uses only standard API paths (`<mount>/creds/<role>`, `sys/leases/renew`,
`sys/leases/revoke`), so it works unchanged against both. Blocking: the broker calls it
from a worker thread. Every hvac/requests exception is translated in `_map_exceptions`
into `CredentialsUnavailable`, whose message never includes the token or a password.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import hvac
import hvac.exceptions
import requests

from guard.broker.credentials.issuer import CredentialsUnavailable, IssuedCredentials


class OpenBaoIssuer:
    def __init__(
        self,
        addr: str,
        token: str,
        *,
        mount: str = "database",
        verify: bool | str = True,
        timeout: float = 5.0,
    ) -> None:
        self.addr = addr
        self.mount = mount
        self._client = hvac.Client(url=addr, token=token, verify=verify, timeout=timeout)

    @contextlib.contextmanager
    def _map_exceptions(self, action: str) -> Iterator[None]:
        try:
            yield
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} is unreachable while trying to {action}",
                hint="check that OpenBao/Vault is running and reachable from the broker",
            ) from exc
        except hvac.exceptions.Forbidden as exc:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} refused to {action} (permission denied)",
                hint="check the broker's OpenBao token and its policy",
            ) from exc
        except hvac.exceptions.VaultError as exc:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} could not {action}: {type(exc).__name__}",
                hint="check the database secrets engine configuration for this role",
            ) from exc

    def issue(self, role: str, ttl_seconds: int) -> IssuedCredentials:
        with self._map_exceptions(f"issue credentials for role {role!r}"):
            response = self._client.secrets.database.generate_credentials(
                name=role, mount_point=self.mount
            )
        lease_id = response["lease_id"]
        duration = int(response.get("lease_duration") or 0)
        data = response["data"]
        if duration > ttl_seconds:
            # Cut the lease to the session: the credential must not outlive it.
            try:
                with self._map_exceptions("cut the lease to the session TTL"):
                    renewed = self._client.sys.renew_lease(lease_id=lease_id, increment=ttl_seconds)
                duration = int(renewed.get("lease_duration") or ttl_seconds)
            except CredentialsUnavailable:
                self.revoke_quietly(lease_id)
                raise
            if duration > ttl_seconds:
                self.revoke_quietly(lease_id)
                raise CredentialsUnavailable(
                    f"OpenBao kept a lease of {duration}s for role {role!r}, longer than the "
                    f"session's {ttl_seconds}s",
                    hint="lower the role's default_ttl to at most the session TTL",
                )
        return IssuedCredentials(
            username=data["username"],
            password=data["password"],
            lease_id=lease_id,
            expires_at=datetime.now(UTC) + timedelta(seconds=duration or ttl_seconds),
        )

    def revoke(self, lease_id: str) -> None:
        with self._map_exceptions("revoke a lease"):
            self._client.sys.revoke_lease(lease_id=lease_id)

    def revoke_quietly(self, lease_id: str) -> None:
        with contextlib.suppress(CredentialsUnavailable):
            self.revoke(lease_id)
