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

_MAX_DETAIL = 300


class OpenBaoIssuer:
    """`CredentialIssuer` over the database secrets engine mounted at `mount`."""

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
        self._token = token
        self._client = hvac.Client(url=addr, token=token, verify=verify, timeout=timeout)

    def __repr__(self) -> str:
        return f"OpenBaoIssuer(addr={self.addr!r}, mount={self.mount!r})"

    def _detail(self, exc: BaseException) -> str:
        """The server's own error text, shortened, with our token scrubbed out."""
        errors = getattr(exc, "errors", None)
        text = "; ".join(str(e) for e in errors) if errors else type(exc).__name__
        if self._token:
            text = text.replace(self._token, "***")
        return text[:_MAX_DETAIL]

    @contextlib.contextmanager
    def _map_exceptions(self, action: str) -> Iterator[None]:
        """The one place foreign exceptions become `CredentialsUnavailable`."""
        try:
            yield
        except (requests.ConnectionError, requests.Timeout) as exc:
            reason = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} is unreachable ({reason}) while trying to {action}",
                hint="check that OpenBao/Vault is running and reachable from the broker "
                "(openbao.addr in the broker config)",
            ) from exc
        except requests.RequestException as exc:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} could not be asked to {action}: {type(exc).__name__}",
                hint="check openbao.addr (and verify_tls) in the broker config",
            ) from exc
        except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} refused to {action}: {self._detail(exc)}",
                hint="check that the broker's OpenBao token is valid (not expired or revoked) "
                "and that its policy allows this path",
            ) from exc
        except hvac.exceptions.InvalidPath as exc:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} has no such path while trying to {action}: "
                f"{self._detail(exc)}",
                hint=f"check that the database secrets engine is mounted at {self.mount!r} and "
                "the target's openbao_role exists there",
            ) from exc
        except hvac.exceptions.VaultError as exc:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} could not {action}: {self._detail(exc)}",
                hint="check OpenBao's log and the database secrets engine configuration "
                "(connection to the database, role statements)",
            ) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} gave an unexpected answer while trying to {action} "
                f"({type(exc).__name__})",
                hint="is openbao.addr really an OpenBao/Vault server?",
            ) from exc

    def issue(self, role: str, ttl_seconds: int) -> IssuedCredentials:
        """Mint a login role; its lease renewed to `ttl_seconds` (cut when the role's is
        longer, stretched up to the role's max_ttl when it is shorter)."""
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        with self._map_exceptions(f"issue credentials for role {role!r}"):
            response = self._client.secrets.database.generate_credentials(
                name=role, mount_point=self.mount
            )
            lease_id = str(response["lease_id"])
            duration = int(response.get("lease_duration") or 0)
            username = str(response["data"]["username"])
            password = str(response["data"]["password"])
        if duration != ttl_seconds:
            # Fit the lease to the session: cut (the credential must not outlive it), or
            # stretched up to the role's max_ttl (a role's default_ttl must not silently
            # shorten a session the policy allows).
            try:
                with self._map_exceptions("fit the new lease to the session TTL"):
                    renewed = self._client.sys.renew_lease(lease_id=lease_id, increment=ttl_seconds)
                    duration = int(renewed.get("lease_duration") or 0)
            except CredentialsUnavailable:
                self._revoke_quietly(lease_id)
                raise
            if duration > ttl_seconds or duration <= 0:
                self._revoke_quietly(lease_id)
                raise CredentialsUnavailable(
                    f"OpenBao at {self.addr} kept a lease of {duration}s for role {role!r}, "
                    f"not the session's {ttl_seconds}s; the credentials were revoked",
                    hint="lower the role's default_ttl to at most the session TTL",
                )
        return IssuedCredentials(
            username=username,
            password=password,
            lease_id=lease_id,
            expires_at=datetime.now(UTC) + timedelta(seconds=duration),
        )

    def renew(self, lease_id: str, ttl_seconds: int) -> datetime:
        """Renew the lease to `ttl_seconds` from now (OpenBao caps it at the role's max_ttl
        and moves the role's VALID UNTIL); when it now ends."""
        with self._map_exceptions("renew a lease"):
            renewed = self._client.sys.renew_lease(lease_id=lease_id, increment=ttl_seconds)
            duration = int(renewed.get("lease_duration") or 0)
        if duration <= 0:
            raise CredentialsUnavailable(
                f"OpenBao at {self.addr} did not renew lease {lease_id!r}",
                hint="check the role's max_ttl and that the lease still exists",
            )
        return datetime.now(UTC) + timedelta(seconds=duration)

    def revoke(self, lease_id: str) -> None:
        """Revoke the lease now (OpenBao runs the role's revocation statements)."""
        with self._map_exceptions("revoke a lease"):
            self._client.sys.revoke_lease(lease_id=lease_id)

    def _revoke_quietly(self, lease_id: str) -> None:
        with contextlib.suppress(CredentialsUnavailable):
            self.revoke(lease_id)
