"""A gateway with a certificate refuses plaintext logins, like `hostssl` in pg_hba.conf
(finding 4 of the hardening issue: `sslmode=disable` logged in to a TLS gateway).

What the gateway must answer a StartupMessage that arrives without TLS (straight away, or
after a GSSENCRequest it answered 'N'), before any authentication request:

    ErrorResponse  S=FATAL  V=FATAL  C=28000
                   M="guard: this gateway requires TLS (sslmode=verify-full)"

and then close the connection. A CancelRequest stays accepted in plaintext (libpq's
PQcancel sends it so), and an SSLRequest is still answered 'S'.

"""

from __future__ import annotations

import ssl

import psycopg
import pytest

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from tests.fix_stack import Stack
from tests.integration import test_gateway
from tests.integration.test_gateway_startup import PROTOCOL_3_0, gateway, scalar

pytestmark = pytest.mark.integration
session = test_gateway.session  # the module-scoped session fixture, shared

SQLSTATE = "28000"  # invalid_authorization_specification, as PostgreSQL's hostssl refusal
MESSAGE = "guard: this gateway requires TLS (sslmode=verify-full)"


def _startup(session: dict) -> bytes:
    params = (("user", session["user"]), ("database", session["database"]))
    return encode(m.StartupMessage(PROTOCOL_3_0, params))


def test_plaintext_startup_gets_fatal_28000_before_authentication(session):
    with gateway(session, tls=False) as wire:
        wire.send(_startup(session))
        first = wire.message()  # no AuthenticationSASL: the refusal comes first
        assert isinstance(first, m.ErrorResponse), first
        assert (first.severity, first.sqlstate, first.message) == ("FATAL", SQLSTATE, MESSAGE)
        wire.assert_closed()


def test_plaintext_startup_after_gssenc_refusal_gets_fatal_28000(session):
    with gateway(session, tls=False) as wire:
        wire.send(encode(m.GSSENCRequest()))
        assert wire.byte() == b"N"
        wire.send(_startup(session))
        first = wire.message()
        assert isinstance(first, m.ErrorResponse), first
        assert (first.severity, first.sqlstate, first.message) == ("FATAL", SQLSTATE, MESSAGE)
        wire.assert_closed()


def test_psycopg_with_sslmode_disable_is_refused(session):
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(
            host=session["gateway_host"],
            port=session["gateway_port"],
            user=session["user"],
            password=session["password"],
            dbname=session["database"],
            sslmode="disable",
            connect_timeout=10,
        )
    assert MESSAGE in str(refused.value)


# Controls, not pending: what must keep working once plaintext logins are refused.
def test_verified_tls_login_still_works(session):
    with gateway(session) as wire:
        wire.login(session)
        assert scalar(wire.query("SELECT 28000")) == b"28000"


def test_psycopg_with_verify_full_against_the_dev_ca(dev_stack: Stack, session):
    with test_gateway.connect(session) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_ssl_request_is_still_answered_s(session):
    with gateway(session, tls=False) as wire:
        wire.send(encode(m.SSLRequest()))
        assert wire.byte() == b"S"


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_the_gateway_offers_no_session_resumption(session, version):
    """As PostgreSQL: no TLS session tickets (a libpq client never resumes, so making them
    cost every login; a resumed session would skip the fresh key exchange)."""
    with gateway(session, tls=False) as wire:
        wire.send(encode(m.SSLRequest()))
        assert wire.byte() == b"S"
        context = ssl.create_default_context(cafile=session["gateway_ca"])
        context.minimum_version = context.maximum_version = getattr(ssl.TLSVersion, version)
        wire.sock = context.wrap_socket(wire.sock, server_hostname=wire.host)
        wire.login(session)
        # TLS 1.3 tickets arrive after the handshake, with the first records read: the
        # login's answers have been read by now.
        assert scalar(wire.query("SELECT 1")) == b"1"
        assert wire.sock.session is not None and not wire.sock.session.has_ticket
