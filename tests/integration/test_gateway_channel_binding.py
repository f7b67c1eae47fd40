"""SCRAM-SHA-256-PLUS at the gateway (issue 13): over TLS the gateway offers channel
binding ("tls-server-end-point", RFC 5929) besides SCRAM-SHA-256, so a client that binds
proves its login ran over a TLS session with the gateway's own certificate. A man in the
middle with another certificate the client wrongly trusts cannot relay that login.

libpq binds by default when offered (`channel_binding=prefer`); `require` fails unless
the server binds, which is what these tests use to tell.
"""

from __future__ import annotations

import hashlib

import pytest

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.scram import ScramClient
from guard.broker.proxy.upstream import certificate_end_point
from tests.integration import test_gateway
from tests.integration.test_gateway_startup import PROTOCOL_3_0, gateway

pytestmark = pytest.mark.integration
session = test_gateway.session  # the module-scoped session fixture, shared


def test_libpq_requiring_channel_binding_logs_in(session):
    with test_gateway.connect(session, channel_binding="require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _sasl_request(wire, body: dict) -> m.AuthenticationSASL:
    params = (("user", body["user"]), ("database", body["database"]))
    wire.send(encode(m.StartupMessage(PROTOCOL_3_0, params)))
    msg = wire.message()
    assert isinstance(msg, m.AuthenticationSASL), msg
    return msg


def _bound_login(wire, body: dict, binding: bytes) -> m.BackendMessage:
    scram = ScramClient(body["password"], channel_binding=("tls-server-end-point", binding))
    wire.send(encode(m.SASLInitialResponse("SCRAM-SHA-256-PLUS", scram.client_first())))
    cont = wire.message()
    assert isinstance(cont, m.AuthenticationSASLContinue), cont
    wire.send(encode(m.SASLResponse(scram.handle_server_first(cont.data))))
    return wire.message()


def test_the_gateway_offers_plus_first_and_binds_to_its_certificate(session):
    with gateway(session) as wire:
        offered = _sasl_request(wire, session)
        assert tuple(offered.mechanisms) == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
        binding = certificate_end_point(wire.sock.getpeercert(binary_form=True))
        final = _bound_login(wire, session, binding)
        assert isinstance(final, m.AuthenticationSASLFinal), final
        assert isinstance(wire.message(), m.AuthenticationOk)


def test_a_login_bound_to_another_certificate_is_refused(session):
    """What a client behind a man in the middle computes: the hash of the certificate it
    was shown, not the gateway's."""
    with gateway(session) as wire:
        _sasl_request(wire, session)
        refused = _bound_login(wire, session, hashlib.sha256(b"the intruder's cert").digest())
        assert isinstance(refused, m.ErrorResponse), refused
        assert refused.sqlstate == "28P01"
        wire.assert_closed()


def test_plus_with_an_unbound_first_message_is_refused(session):
    """-PLUS named, but the gs2 header says "n" (no binding): a login that would look
    bound in the client's choice of mechanism and be unbound in fact."""
    with gateway(session) as wire:
        _sasl_request(wire, session)
        scram = ScramClient(session["password"])
        wire.send(encode(m.SASLInitialResponse("SCRAM-SHA-256-PLUS", scram.client_first())))
        refused = wire.message()
        assert isinstance(refused, m.ErrorResponse) and refused.sqlstate == "28P01", refused
