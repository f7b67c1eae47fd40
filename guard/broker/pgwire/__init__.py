"""Sans-IO PostgreSQL wire protocol (3.0, with 3.2's long cancel keys): messages, parsers,
encoder and SCRAM-SHA-256.

Stdlib only, enforced by tests/pgwire/test_pgwire_imports.py and tests/test_import_rules.py:
nothing in this package may import guard's other packages or any third-party module, so the
codec can be fuzzed, benchmarked and reused (gateway, CLI relay) on its own.
"""

from .encoder import encode, encode_many
from .errors import ClientProtocolError, ProtocolError, ServerProtocolError
from .messages import *  # noqa: F403 - the message classes and tag constants are the API
from .messages import __all__ as _messages_all
from .parser import (
    MAX_MESSAGE_SIZE,
    MAX_STARTUP_PACKET_SIZE,
    NEED_DATA,
    BackendParser,
    Frame,
    FrontendParser,
    NeedData,
    decode_backend,
    decode_frontend,
)
from .scram import (
    AuthenticationFailed,
    ScramClient,
    ScramServer,
    ScramVerifier,
    make_verifier,
    md5_password,
)

__all__ = [
    *_messages_all,
    "MAX_MESSAGE_SIZE",
    "MAX_STARTUP_PACKET_SIZE",
    "NEED_DATA",
    "AuthenticationFailed",
    "BackendParser",
    "ClientProtocolError",
    "Frame",
    "FrontendParser",
    "NeedData",
    "ProtocolError",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "ServerProtocolError",
    "decode_backend",
    "decode_frontend",
    "encode",
    "encode_many",
    "make_verifier",
    "md5_password",
]
