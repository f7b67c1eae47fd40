"""The gateway's upstream login against a real PostgreSQL, for every method a server may ask.

A throwaway cluster serving TLS with a dev-CA certificate, and pg_hba rules that make the
server ask for SCRAM-SHA-256 (-PLUS over TLS), md5 or a cleartext password, per user.
Verification failures, a server without TLS and a wrong password must each end the login
with an UpstreamError that says what went wrong, never a connection that works anyway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import struct
from pathlib import Path

import psycopg
import pytest

from guard.broker.pgwire import messages as m
from guard.broker.pgwire import scram
from guard.broker.pgwire.encoder import encode
from guard.broker.proxy import tlstransport, upstream
from guard.devstack.postgres import PostgresCluster, find_pg_bindir
from guard.devstack.tls import make_dev_ca
from tests.fix_pg import require

pytestmark = pytest.mark.integration

PASSWORD = "upstream-test-pw"


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    require("PostgreSQL", find_pg_bindir() is not None, "install PostgreSQL 15")
    certs = tmp_path_factory.mktemp("ca")
    ca, _, _ = make_dev_ca(certs)
    with PostgresCluster().start(tls=(certs / "postgres.pem", certs / "postgres-key.pem")) as pg:
        with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE u_scram LOGIN PASSWORD '{PASSWORD}'")
            conn.execute(f"CREATE ROLE u_clear LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("SET password_encryption = 'md5'")
            conn.execute(f"CREATE ROLE u_md5 LOGIN PASSWORD '{PASSWORD}'")
            hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
            rules = (
                "host all u_md5 127.0.0.1/32 md5\n"
                "host all u_clear 127.0.0.1/32 password\n"
                "hostnossl all u_scram 127.0.0.1/32 scram-sha-256\n"
            )
            hba.write_text(rules + hba.read_text())
            conn.execute("SELECT pg_reload_conf()")
        yield pg, ca


def _context(ca: Path) -> ssl.SSLContext:
    """What a target with sslmode=verify-full and sslrootcert=ca builds."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _logged_in(
    pg: PostgresCluster, user: str, work, *, tls=None, host=None, password=PASSWORD, keys=None
):
    """(the upstream connection, what `work(connection)` returned), the connection closed."""

    async def run():
        conn = await upstream.login(
            host=host or pg.host,
            port=pg.port,
            user=user,
            password=password,
            database="postgres",
            params={"application_name": "upstream-test"},
            tls=tls,
            scram_keys=keys,
        )
        try:
            return conn, await work(conn)
        finally:
            conn.wire.close()

    return asyncio.run(run())


def _login(pg: PostgresCluster, user: str, **kwargs):
    sql = "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    return _logged_in(pg, user, lambda conn: upstream.query_rows(conn, sql), **kwargs)


@pytest.mark.parametrize("user", ["u_scram", "u_md5", "u_clear"])
def test_every_method_over_verified_tls(tls_cluster, user, monkeypatch):
    pg, ca = tls_cluster
    bindings = []
    real = upstream.ScramClient

    def spy(password, **kwargs):
        bindings.append(kwargs.get("channel_binding"))
        return real(password, **kwargs)

    monkeypatch.setattr(upstream, "ScramClient", spy)
    conn, rows = _login(pg, user, tls=_context(ca))
    assert rows == [(user.encode(), b"t")]  # logged in as that user, over TLS
    assert conn.wire.tls is not None and conn.backend_key is not None
    if user == "u_scram":
        # SCRAM over TLS binds to the server certificate (-PLUS), which stops a man in the
        # middle that terminates TLS with a certificate of its own.
        assert len(bindings) == 1 and bindings[0][0] == "tls-server-end-point"
    else:
        assert bindings == []


def test_the_tls_handshake_with_postgresql_takes_no_retry(tls_cluster, monkeypatch):
    # PostgreSQL (ssl_ecdh_curve prime256v1 by default) answered OpenSSL's X25519 key
    # share with a HelloRetryRequest on every upstream login: a round trip and a second
    # ClientHello. The gateway offers P-256 first: its client speaks twice, not three times.
    pg, ca = tls_cluster
    steps = []

    class Counted(upstream.TLSClient):
        def handshake(self, data=b""):
            steps.append(len(data))
            return super().handshake(data)

    monkeypatch.setattr(upstream, "TLSClient", Counted)
    _login(pg, "u_scram", tls=_context(ca))
    # Python's ssl cannot order groups: without the build (GUARD_PURE_PYTHON) it retries.
    assert len(steps) == (2 if tlstransport.usable() else 3), steps
    monkeypatch.setattr(tlstransport, "prefer_groups", lambda *a: False)
    steps.clear()
    _login(pg, "u_scram", tls=_context(ca))
    assert len(steps) == 3, steps  # the retry the test would miss if the server changed


def test_the_upstream_login_offers_no_group_its_context_does_not(tls_cluster):
    # The login reorders the groups its context offers and adds none: a context narrowed
    # to P-384 (as a host's crypto policy may narrow every context) is not given P-256
    # back, so PostgreSQL, which takes only prime256v1 here, finds no group to share.
    pg, ca = tls_cluster
    narrowed = _context(ca)
    narrowed.set_ecdh_curve("secp384r1")
    with pytest.raises(upstream.UpstreamError, match="TLS to the database failed"):
        _login(pg, "u_scram", tls=narrowed)
    _login(pg, "u_scram", tls=_context(ca))  # the same login with the context's defaults


@pytest.mark.parametrize("tls", [True, False])
def test_a_sessions_logins_derive_the_scram_keys_once(tls_cluster, tls, monkeypatch):
    # A client that connects per statement makes the gateway log in per statement; the
    # session's ScramKeys spare every login after the first its PBKDF2 (~1 ms of CPU).
    pg, ca = tls_cluster
    runs = []
    real = scram._salted_password
    monkeypatch.setattr(scram, "_salted_password", lambda *a: runs.append(a[1:]) or real(*a))
    keys = scram.ScramKeys()
    context = _context(ca) if tls else None
    # The plain login is the u_scram hostnossl rule; over TLS the same role binds (-PLUS).
    for _ in range(3):
        _, rows = _login(pg, "u_scram", tls=context, keys=keys)
        assert rows == [(b"u_scram", b"t" if tls else b"f")]
    assert len(runs) == 1 and runs[0][1] == 4096  # the server's salt and count, once
    # The server's verifier is the judge: a wrong password is still refused with keys kept.
    with pytest.raises(upstream.UpstreamError) as err:
        _login(pg, "u_scram", tls=context, keys=keys, password="not-it")
    assert err.value.error is not None and err.value.error.sqlstate == "28P01"
    _login(pg, "u_scram", tls=context, keys=keys)


@pytest.mark.parametrize("tls", [True, False])
def test_hand_over_keeps_the_logins_leftover_and_the_records_order(tls_cluster, tls):
    """What the pump gets: the login's leftover first, then what the server sends next, on
    the transport the records move in (C over TLS where `_ctls` is built)."""
    pg, ca = tls_cluster

    async def relay(conn: upstream.UpstreamConnection):
        conn = dataclasses.replace(conn, leftover=encode(m.NoticeResponse(())))
        received = bytearray()
        transport, tls_layer, pending = await conn.hand_over()
        assert pending == conn.leftover
        if tls and tlstransport.usable():
            assert tls_layer is None and type(transport).__name__ == "TLSTransport"

        class Into(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.extend(data if tls_layer is None else tls_layer.decrypt(data))

        transport.set_protocol(Into())
        transport.resume_reading()
        query = encode(m.Query("SELECT 'handed over'"))
        transport.write(query if tls_layer is None else tls_layer.encrypt(query))
        async with asyncio.timeout(10):
            while not received.endswith(encode(m.ReadyForQuery(b"I"))):
                await asyncio.sleep(0.01)
        transport.close()
        return bytes(received)

    _conn, answer = _logged_in(pg, "u_scram", relay, tls=_context(ca) if tls else None)
    assert b"handed over" in answer


@pytest.mark.parametrize("user", ["u_md5", "u_clear"])
def test_plain_connection_when_tls_is_not_configured(tls_cluster, user):
    pg, _ = tls_cluster
    conn, rows = _login(pg, user)
    assert rows == [(user.encode(), b"f")] and conn.wire.tls is None


def test_hostname_mismatch_is_refused(tls_cluster, monkeypatch):
    # The certificate names localhost and 127.0.0.1; the target says db.example.com (which
    # this test routes to the same server): the name the target gives is the one checked.
    pg, ca = tls_cluster
    real = asyncio.open_connection
    monkeypatch.setattr(
        upstream.asyncio, "open_connection", lambda host, port: real("127.0.0.1", port)
    )
    with pytest.raises(upstream.UpstreamError, match="Hostname mismatch"):
        _login(pg, "u_scram", tls=_context(ca), host="db.example.com")


def test_unknown_ca_is_refused(tls_cluster, tmp_path):
    pg, _ = tls_cluster
    other_ca, _, _ = make_dev_ca(tmp_path / "other")
    with pytest.raises(upstream.UpstreamError, match="certificate verification: "):
        _login(pg, "u_scram", tls=_context(other_ca))


def test_wrong_password_is_the_servers_error(tls_cluster):
    pg, ca = tls_cluster
    with pytest.raises(upstream.UpstreamError) as err:
        _login(pg, "u_md5", tls=_context(ca), password="not-it")
    assert err.value.error is not None and err.value.error.sqlstate == "28P01"


def test_server_without_tls_is_refused_not_downgraded(pg_cluster, tmp_path):
    ca, _, _ = make_dev_ca(tmp_path / "ca")
    user = psycopg.conninfo.conninfo_to_dict(pg_cluster.admin_dsn())
    with pytest.raises(upstream.UpstreamError, match="refused TLS"):
        asyncio.run(
            upstream.login(
                host=pg_cluster.host,
                port=pg_cluster.port,
                user=user["user"],
                password=user["password"],
                database="postgres",
                params={},
                tls=_context(ca),
            )
        )


@pytest.mark.parametrize("over_tls", [True, False])
def test_cancel_goes_the_way_the_session_connection_does(tls_cluster, over_tls):
    # The cancel key stops that backend's queries: when the session reaches the database
    # over TLS, so does its CancelRequest (as libpq 17 sends it). A recording hop in front
    # of the server shows what crosses the network.
    pg, ca = tls_cluster
    tls = _context(ca) if over_tls else None

    async def run():
        wire_bytes = bytearray()

        async def hop(creader, cwriter):
            sreader, swriter = await asyncio.open_connection(pg.host, pg.port)

            async def pipe(reader, writer, record):
                while data := await reader.read(65536):
                    if record:
                        wire_bytes.extend(data)
                    writer.write(data)
                    await writer.drain()
                writer.close()

            await asyncio.gather(pipe(creader, swriter, True), pipe(sreader, cwriter, False))

        relay = await asyncio.start_server(hop, "127.0.0.1", 0)
        conn = await upstream.login(
            host=pg.host,
            port=pg.port,
            user="u_clear",
            password=PASSWORD,
            database="postgres",
            params={},
            tls=tls,
        )
        try:
            conn.wire.write(encode(m.Query("SELECT pg_sleep(30)")))
            await conn.wire.drain()
            await asyncio.sleep(0.5)
            key = conn.backend_key
            await upstream.cancel("127.0.0.1", relay.sockets[0].getsockname()[1], key, tls)
            parser = upstream.BackendParser()
            while True:
                msg = await asyncio.wait_for(upstream._next(conn.wire, parser), 10)
                if isinstance(msg, m.ErrorResponse):
                    return msg, bytes(wire_bytes), key
        finally:
            conn.wire.close()
            relay.close()

    error, sent, key = asyncio.run(run())
    assert error.sqlstate == "57014"  # the cancel reached its backend
    secret = struct.pack("!i", key.process_id) + key.secret_key
    plain_cancel = encode(m.CancelRequest(key.process_id, key.secret_key))
    if over_tls:
        assert sent[:8] == encode(m.SSLRequest()) and sent[8] == 0x16  # then a TLS record
        assert secret not in sent
    else:
        assert sent == plain_cancel


def test_protected_columns_are_looked_up_by_parameters_not_spliced_sql(tls_cluster):
    # A policy may name any identifier, quotes included: the names travel as parameters,
    # so `o'brien` is a column name to find, never SQL that runs.
    from guard.broker.policy.compile import load_policy
    from guard.broker.proxy.protected import ProtectedColumns

    pg, ca = tls_cluster
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute("""CREATE TABLE IF NOT EXISTS "we'ird" (id int, "o'brien" text, ok text)""")
        conn.execute('GRANT SELECT ON "we\'ird" TO u_scram')
        oid, attnum = conn.execute(
            "SELECT attrelid::int, attnum FROM pg_attribute "
            """WHERE attrelid = '"we''ird"'::regclass AND attname = 'o''brien'"""
        ).fetchone()
    policy = load_policy(
        """
version: 1
targets:
  t:
    connect_groups: [engineers]
    session_ttl: {default: 1h, max: 1h}
    protected_columns:
      "public.we'ird.o'brien": ssn_last4
rules:
  - {id: read, effect: allow, groups: [engineers], when: {operations: [read]}}
""",
        source="inline",
    )

    lookup = ProtectedColumns(policy)
    _, found = _logged_in(pg, "u_scram", lambda conn: lookup("t", conn), tls=_context(ca))
    assert set(found) == {(oid, attnum)}
    assert found[(oid, attnum)].name == "ssn_last4"
