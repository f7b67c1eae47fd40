"""Database-enforced approvals: GRANT and REVOKE `guard_approved_<table>` to a session's role.

The backstop (`masking.objects`) gives every approval-gated table a gate view that raises
42501 unless `current_user` is a member of `guard_approved_<table>`. When an approval is
decided, the broker grants that role to the session's database role for exactly the
approved scope and revokes it afterwards, so an approval cannot be stretched, and a
spelling the gateway's analysis missed still meets the gate.

`DatabaseGrants` keeps one autocommit psycopg connection per target, opened on first use
with the DSN in the target's `grants_dsn_file` (else `admin_dsn_file`), re-read at every
(re)connect so a rotated credential is picked up; a connection that broke is re-opened
once. A grant is one round trip (one statement for all the tables); a revoke is one round
trip too (the REVOKE and a check that no membership is left, pipelined). Role names are
always `psycopg.sql.Identifier`s. Every failure is a `DependencyUnavailable` with a hint;
DSNs and passwords never reach a message or a log line.

`MemoryGrants` records calls for the unit tests of the modules that use `Grants`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from guard.broker.errors import DependencyUnavailable
from guard.broker.masking.objects import UNMASKED_ROLE, approved_role_name
from guard.broker.settings import TargetSettings

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_MAX_DETAIL = 300
_APPLICATION_NAME = "guard-broker-grants"
_HINT_PRIVILEGE = (
    "the grants role needs ADMIN OPTION on the guard_approved_* roles (GRANT "
    "guard_approved_<table> TO <role> WITH ADMIN OPTION), or CREATEROLE/superuser: "
    "check grants_dsn_file (or admin_dsn_file) of the target in the broker config"
)
_HINT_UNDEFINED = (
    "apply the target's database backstop (it creates the guard_approved_* roles), "
    "or the session's database role has already been dropped (its lease ended)"
)
# Memberships of `role` in any of the given roles that are left (a REVOKE only removes the
# grants the current role made, since PostgreSQL 16).
_HELD = (
    "SELECT g.rolname FROM pg_catalog.pg_auth_members m"
    " JOIN pg_catalog.pg_roles g ON g.oid = m.roleid"
    " JOIN pg_catalog.pg_roles u ON u.oid = m.member"
    " WHERE u.rolname = %s AND g.rolname = ANY(%s) ORDER BY 1"
)


def approved_roles(tables: Sequence[str]) -> list[str]:
    """`guard_approved_<table>` of "schema.table" names, deduplicated and sorted.

    The table is what follows the first dot, as the gate function reads its argument.
    """
    return sorted({approved_role_name(t.split(".", 1)[-1]) for t in tables})


class Grants(Protocol):
    """Grant/revoke the approval roles of `tables` to/from a session's database `role`."""

    async def grant(self, target: str, role: str, tables: Sequence[str]) -> None: ...

    async def revoke(self, target: str, role: str, tables: Sequence[str]) -> None: ...

    async def grant_unmasked(self, target: str, role: str) -> None:
        """Grant `guard_unmasked` to a session's role: it reads the raw views for the rest
        of its life (the role is dropped with its lease, nothing to take back)."""
        ...

    async def close(self) -> None: ...


@dataclass
class MemoryGrants:
    """`Grants` in memory: `calls` in order, `held` memberships; `error` is raised if set."""

    calls: list[tuple[str, str, str, tuple[str, ...]]] = field(default_factory=list)
    held: set[tuple[str, str, str]] = field(default_factory=set)  # (target, role, approved)
    error: Exception | None = None
    closed: bool = False

    def _call(self, action: str, target: str, role: str, tables: Sequence[str]) -> list[str]:
        self.calls.append((action, target, role, tuple(tables)))
        if self.error is not None:
            raise self.error
        return approved_roles(tables)

    async def grant(self, target: str, role: str, tables: Sequence[str]) -> None:
        for approved in self._call("grant", target, role, tables):
            self.held.add((target, role, approved))

    async def revoke(self, target: str, role: str, tables: Sequence[str]) -> None:
        for approved in self._call("revoke", target, role, tables):
            self.held.discard((target, role, approved))

    async def grant_unmasked(self, target: str, role: str) -> None:
        self._call("grant_unmasked", target, role, ())
        self.held.add((target, role, UNMASKED_ROLE))

    async def close(self) -> None:
        self.closed = True


class DatabaseGrants:
    """`Grants` against each target's PostgreSQL, one lazily opened connection per target."""

    def __init__(self, targets: Mapping[str, TargetSettings], *, timeout: float = 5.0) -> None:
        self._targets = dict(targets)
        self._timeout = timeout
        self._conns: dict[str, psycopg.AsyncConnection[tuple[object, ...]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"DatabaseGrants(targets={sorted(self._targets)!r})"

    async def grant(self, target: str, role: str, tables: Sequence[str]) -> None:
        roles = approved_roles(tables)
        if roles:
            await self._grant(target, role, roles, "grant")

    async def grant_unmasked(self, target: str, role: str) -> None:
        await self._grant(target, role, [UNMASKED_ROLE], "grant unmasked access")

    async def _grant(self, target: str, role: str, roles: list[str], action: str) -> None:
        """GRANT `roles` TO `role`, in one statement on the target's connection."""
        statement = sql.SQL("GRANT {} TO {}").format(_idents(roles), sql.Identifier(role))

        async def op(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
            await conn.execute(statement)

        started = time.perf_counter()
        await self._run(target, action, op)
        _log.info(
            "granted %s to %s on %s (%.1f ms)",
            ", ".join(roles),
            role,
            target,
            (time.perf_counter() - started) * 1000,
        )

    async def revoke(self, target: str, role: str, tables: Sequence[str]) -> None:
        roles = approved_roles(tables)
        if not roles:
            return

        async def op(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[str]:
            return await _revoke(conn, role, roles)

        left = await self._run(target, "revoke", op)
        if left:
            raise DependencyUnavailable(
                f"approval grants on target {target!r}: {role} is still a member of "
                f"{', '.join(left)} after REVOKE (granted by another role)",
                hint="revoke it as the role that granted it, or as a superuser; keep "
                "grants_dsn_file pointing at one role",
            )
        _log.info("revoked %s from %s on %s", ", ".join(roles), role, target)

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.close()

    # --- connection handling -------------------------------------------------------------

    async def _run(
        self,
        target: str,
        action: str,
        op: Callable[[psycopg.AsyncConnection[tuple[object, ...]]], Awaitable[_T]],
    ) -> _T:
        """`op` on the target's connection, re-opened once if it broke; errors mapped."""
        settings = self._settings(target)
        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            for attempt in (1, 2):
                conn = await self._connection(target, settings)
                try:
                    async with asyncio.timeout(self._timeout):
                        return await op(conn)
                except asyncio.CancelledError:
                    # The caller gave up mid-statement: the connection's state is unknown.
                    await self._drop(target)
                    raise
                except TimeoutError as exc:
                    await self._drop(target)
                    raise DependencyUnavailable(
                        f"approval grants on target {target!r}: {action} timed out after "
                        f"{self._timeout:g} s",
                        hint="check that the database is reachable and no transaction holds "
                        "a lock on the roles",
                    ) from exc
                except psycopg.OperationalError as exc:
                    if not (conn.broken or conn.closed):
                        raise _server_error(target, action, exc) from exc
                    await self._drop(target)
                    if attempt == 2:
                        raise DependencyUnavailable(
                            f"approval grants on target {target!r}: the connection broke "
                            f"during {action} ({type(exc).__name__})",
                            hint="check that the database is running and reachable",
                        ) from exc
                    _log.warning("grants connection to %s broke; reconnecting", target)
                except psycopg.Error as exc:
                    raise _server_error(target, action, exc) from exc
        raise AssertionError("unreachable")

    def _settings(self, target: str) -> TargetSettings:
        settings = self._targets.get(target)
        if settings is None:
            raise DependencyUnavailable(
                f"approval grants: unknown target {target!r}",
                hint="the target must be configured under targets: in the broker config",
            )
        return settings

    async def _connection(
        self, target: str, settings: TargetSettings
    ) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = self._conns.get(target)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        await self._drop(target)
        dsn = _read_dsn(target, settings)
        conn = None
        try:
            async with asyncio.timeout(self._timeout):
                conn = await psycopg.AsyncConnection.connect(
                    dsn,
                    autocommit=True,
                    connect_timeout=max(2, math.ceil(self._timeout)),
                    application_name=_APPLICATION_NAME,
                )
                # Server-side bounds too, and no WARNING/NOTICE traffic (REVOKE of a
                # membership that does not exist only warns).
                await conn.execute(
                    sql.SQL("SET statement_timeout = {}; SET client_min_messages = error").format(
                        # before the client's own timeout, so the connection stays usable
                        sql.Literal(max(1, int(self._timeout * 800)))
                    )
                )
        except (psycopg.Error, TimeoutError) as exc:
            if conn is not None:
                await conn.close()
            raise DependencyUnavailable(
                f"approval grants on target {target!r}: cannot connect to the database "
                f"({_scrub(exc, dsn)})",
                hint="check that the database is running and the DSN in grants_dsn_file "
                "(or admin_dsn_file) of the target",
            ) from None  # the driver's own text may quote the DSN: only the scrubbed one
        self._conns[target] = conn
        return conn

    async def _drop(self, target: str) -> None:
        conn = self._conns.pop(target, None)
        if conn is not None and not conn.closed:
            try:
                await conn.close()
            except psycopg.Error:  # already broken: nothing more to release
                pass


async def _revoke(
    conn: psycopg.AsyncConnection[tuple[object, ...]], role: str, roles: list[str]
) -> list[str]:
    """REVOKE and read what is left in one round trip; the approval roles still held."""
    try:
        async with conn.pipeline():
            await conn.execute(
                sql.SQL("REVOKE {} FROM {}").format(_idents(roles), sql.Identifier(role))
            )
            cur = await conn.execute(_HELD, (role, roles))
        return [str(name) for (name,) in await cur.fetchall()]
    except psycopg.errors.UndefinedObject:
        pass
    # A role that does not exist holds no membership (the session role was dropped, or a
    # table's approval role was never created): revoke the others one by one.
    for approved in roles:
        try:
            await conn.execute(
                sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(approved), sql.Identifier(role))
            )
        except psycopg.errors.UndefinedObject:
            continue
    cur = await conn.execute(_HELD, (role, roles))
    return [str(name) for (name,) in await cur.fetchall()]


def _idents(names: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def _read_dsn(target: str, settings: TargetSettings) -> str:
    path: Path | None = settings.grants_dsn_file or settings.admin_dsn_file
    if path is None:
        raise DependencyUnavailable(
            f"approval grants on target {target!r}: no DSN configured",
            hint="set grants_dsn_file (or admin_dsn_file) for the target in the broker config",
        )
    try:
        dsn = path.read_text().strip()
    except OSError as exc:
        raise DependencyUnavailable(
            f"approval grants on target {target!r}: cannot read the DSN file {path} "
            f"({exc.strerror or type(exc).__name__})",
            hint="check grants_dsn_file (or admin_dsn_file) of the target and its permissions",
        ) from exc
    if not dsn:
        raise DependencyUnavailable(
            f"approval grants on target {target!r}: the DSN file {path} is empty",
            hint="write the grants role's DSN into it",
        )
    return dsn


def _scrub(exc: BaseException, dsn: str) -> str:
    """An exception's text, shortened, without the DSN or its password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    secrets = [dsn]
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        return type(exc).__name__  # unparseable: the text may quote any part of it
    if password:
        secrets.append(str(password))
    for secret in secrets:
        text = text.replace(" ".join(secret.split()), "***").replace(secret, "***")
    return text[:_MAX_DETAIL]


def _server_error(target: str, action: str, exc: psycopg.Error) -> DependencyUnavailable:
    detail = (exc.diag.message_primary or type(exc).__name__)[:_MAX_DETAIL]
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        hint = _HINT_PRIVILEGE
    elif isinstance(exc, psycopg.errors.UndefinedObject):
        hint = _HINT_UNDEFINED
    elif isinstance(exc, psycopg.errors.QueryCanceled):
        hint = "a lock kept the statement waiting: look for a long transaction on the database"
    else:
        hint = "check the database's log for the failed statement"
    return DependencyUnavailable(
        f"approval grants on target {target!r}: {action} failed: {detail}", hint=hint
    )
