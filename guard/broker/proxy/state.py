"""The states of a gateway connection (`proxy.connection`'s state machine). Imports only
the stdlib.

A module of its own because the connection core has two builds (the reference,
`proxy.connection`, and its compiled twin, `proxy._cconnection`; see `proxy.core`): the
shell compares a connection's state with these members by identity, so both builds must
hand out the same objects.
"""

from __future__ import annotations

from enum import IntEnum


class State(IntEnum):
    RELAYING = 0  # statements decided and forwarded, responses relayed
    PAUSED = 1  # a blocking command is out (an audit write): client messages queue behind it
    HALF_CLOSED = 2  # the client sent EOF: a Terminate follows its last request upstream
    CLOSED = 3  # ended on purpose (Terminate, protocol error, upstream FATAL or EOF)
    FAILED = 4  # an internal error ended it: the client got FATAL XX000
