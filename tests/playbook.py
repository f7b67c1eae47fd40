"""Shared helpers for tests of the sans-IO gateway core (`proxy.connection`).

Two ways to drive a `GatewayConnection`, both with the real codec, analyser, demo policy
and an in-memory audit sink:

- `Playbook` asserts the exact ordered dialogue, after mitmproxy's
  `test/mitmproxy/proxy/tutils.py`: events go in with `>>`, the commands expected from them
  with `<<`, in order, both directions and the audit included; `assert playbook` plays it and
  on a mismatch prints both transcripts side by side. `Placeholder` stands for a value the
  gateway picks (a poison statement name) and must be the same wherever it appears again.

      assert (
          Playbook(connection())
          >> ClientSends(m.Query(sql))
          << Audit({"verdict": "allow"})
          >> AuditWritten()
          << ToServer(m.Query(sql))
      )

- `make()` returns a `Driver`, which carries out the audit commands as the shell does
  (writes to the sink, feeds the answer back) and returns what goes on the wire: for
  property and regression tests that look at what was forwarded, not at the dialogue.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from guard.broker.audit.record import RESULT_FIELDS
from guard.broker.audit.sink import AuditUnavailable, MemoryAuditSink
from guard.broker.identity.principal import Principal
from guard.broker.masking.strategies import get_strategy
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.parser import BackendParser, FrontendParser
from guard.broker.policy.compile import load_policy_file
from guard.broker.proxy.commands import (
    CloseConnection,
    Command,
    EndApproval,
    Log,
    RecordResults,
    RequestApproval,
    SendToClient,
    SendToServer,
    WriteAudit,
)
from guard.broker.proxy.core import GatewayConnection  # the build that runs (compiled twin)
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.proxy.gate import Gate

POLICY = load_policy_file(Path(__file__).resolve().parents[1] / "policies.yaml")
ALICE = Principal(issuer="https://idp.test", subject="alice-sub", groups=frozenset({"engineers"}))
CUSTOMERS_OID, SSN_ATTNUM, DOB_ATTNUM = 16400, 3, 5
POISON_PATTERN = r"guard_refused_[0-9a-f]{8}"


# ---------------------------------------------------------------------------- messages
def wire(*msgs: Any) -> bytes:
    return b"".join(encode(x) for x in msgs)


def field(name: str, table: int = 0, attnum: int = 0, type_oid: int = 25, fmt: int = 0):
    return m.FieldDescription(name, table, attnum, type_oid, -1, -1, fmt)


def to_server(cmds: Iterable[Command]) -> list:
    data = b"".join(bytes(c.data) for c in cmds if isinstance(c, SendToServer))
    p = FrontendParser(expect_startup=False)
    p.feed(data)
    return list(p.messages())


def to_client(cmds: Iterable[Command]) -> list:
    data = b"".join(bytes(c.data) for c in cmds if isinstance(c, SendToClient))
    p = BackendParser()
    p.feed(data)
    return list(p.messages())


def alice_gate() -> Gate:
    """The gate of alice's session s1 (connection c1) on the demo target."""
    return Gate(policy=POLICY, target="demo", principal=ALICE, session_id="s1", connection_id="c1")


def connection(
    *,
    protected: bool = True,
    gate: Gate | None = None,
    holds: bool = False,
    audit_answers_later: bool = False,
) -> GatewayConnection:
    """A connection of alice's session s1 (connection c1) on the demo target; `holds`:
    statements that need approval are held for a decision, not refused."""
    gate = gate or alice_gate()
    pmap = (
        {
            (CUSTOMERS_OID, SSN_ATTNUM): get_strategy("ssn_last4"),
            (CUSTOMERS_OID, DOB_ATTNUM): get_strategy("year_only"),
        }
        if protected
        else {}
    )
    return GatewayConnection(
        gate,
        protected=pmap,
        client_user="guard_s1",
        holds=holds,
        audit_answers_later=audit_answers_later,
    )


# ---------------------------------------------------------------------------- the driver
class Driver:
    """A connection with the shell's audit duties done at once, against a memory sink."""

    def __init__(self, conn: GatewayConnection, audit: MemoryAuditSink) -> None:
        self.connection = conn
        self.audit = audit

    # What tests read or replace on the connection itself.
    @property
    def gate(self) -> Any:
        return self.connection.gate

    @gate.setter
    def gate(self, value: Any) -> None:
        self.connection.gate = value

    @property
    def codec(self) -> str:
        return self.connection.codec

    @property
    def closed(self) -> bool:
        return self.connection.closed

    def from_client(self, data: bytes) -> list[Command]:
        return self._shell(self.connection.from_client(data))

    def from_server(self, data: bytes) -> list[Command]:
        return self._shell(self.connection.from_server(data))

    def _shell(self, commands: list[Command]) -> list[Command]:
        """What goes on the wire (sends and the close), in order; the audit commands are
        carried out here, as the shell does, answers fed back in order."""
        out: list[Command] = []
        while True:
            for cmd in commands:
                if isinstance(cmd, RecordResults):
                    # As the pump: the statements ran, their records exist; a result
                    # record the log cannot take is lost (and logged there), not fatal.
                    with contextlib.suppress(AuditUnavailable):
                        self.audit.append_results(cmd.results)
                elif not isinstance(cmd, WriteAudit):
                    out.append(cmd)
            if not commands or not isinstance(commands[-1], WriteAudit):
                return out
            try:
                seqs = self.audit.append_statements(commands[-1].records)
            except AuditUnavailable:
                commands = self.connection.audit_failed()
            else:
                commands = self.connection.audit_written(seqs)


def make(
    audit: MemoryAuditSink | None = None, protected: bool = True
) -> tuple[Driver, MemoryAuditSink]:
    audit = audit or MemoryAuditSink()
    return Driver(connection(protected=protected), audit), audit


# ---------------------------------------------------------------------------- playbook
class Placeholder:
    """A value the gateway chooses: matches anything (of `pattern`, if given) the first
    time, and afterwards only what it matched then."""

    def __init__(self, pattern: str = ".*") -> None:
        self.pattern = re.compile(pattern, re.S)
        self.value: Any = None
        self.bound = False

    def __eq__(self, other: object) -> bool:
        if self.bound:
            return bool(other == self.value)
        if not isinstance(other, str) or not self.pattern.fullmatch(other):
            return False
        self.value, self.bound = other, True
        return True

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"<{self.value!r}>" if self.bound else f"<?{self.pattern.pattern}>"


def poison() -> Placeholder:
    """The name of a poison statement the gateway sends in place of a refused one."""
    return Placeholder(POISON_PATTERN)


class Error:
    """Matches an ErrorResponse by SQLSTATE, severity and words in its message."""

    def __init__(self, sqlstate: str, *words: str, severity: str = "ERROR") -> None:
        self.sqlstate, self.words, self.severity = sqlstate, words, severity

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, m.ErrorResponse)
            and other.sqlstate == self.sqlstate
            and other.severity == self.severity
            and all(w in other.message for w in self.words)
        )

    def __repr__(self) -> str:
        return f"Error({self.sqlstate}, {self.severity}, {' '.join(self.words)!r})"


def _subset(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    return all(k in actual and v == actual[k] for k, v in expected.items())


# Events: what happens to the connection.
class Event:
    def play(self, pb: Playbook) -> list[Command]:
        raise NotImplementedError


class ClientSends(Event):
    def __init__(self, *msgs: Any) -> None:
        self.data = b"".join(x if isinstance(x, bytes) else encode(x) for x in msgs)
        self.msgs = msgs

    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.from_client(self.data)

    def __repr__(self) -> str:
        return f">> client: {', '.join(map(_short, self.msgs))}"


class ServerSends(ClientSends):
    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.from_server(self.data)

    def __repr__(self) -> str:
        return f">> server: {', '.join(map(_short, self.msgs))}"


class AuditWritten(Event):
    """The shell wrote the last WriteAudit's records (seqs numbered by the playbook)."""

    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.audit_written(pb.written())

    def __repr__(self) -> str:
        return ">> audit written"


class AuditFailed(Event):
    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.audit_failed()

    def __repr__(self) -> str:
        return ">> audit failed"


class ClientEOF(Event):
    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.client_eof()

    def __repr__(self) -> str:
        return ">> client EOF"


class ServerEOF(Event):
    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.server_eof()

    def __repr__(self) -> str:
        return ">> server EOF"


class Decided(Event):
    """The held statement's request is settled (the id is the one the gateway chose)."""

    def __init__(
        self,
        request: Placeholder,
        approved: bool,
        error: m.ErrorResponse | None = None,
        per_statement: bool = True,
    ) -> None:
        self.request, self.approved, self.error = request, approved, error
        self.per_statement = per_statement

    def play(self, pb: Playbook) -> list[Command]:
        event = ApprovalDecided(self.request.value, self.approved, self.error, self.per_statement)
        return pb.connection.approval_decided(event)

    def __repr__(self) -> str:
        verdict = "approved" if self.approved else "not approved"
        return f">> request {self.request!r} {verdict}"


class GrantEnded(Event):
    def __init__(self, request: Placeholder) -> None:
        self.request = request

    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.approval_ended(self.request.value)

    def __repr__(self) -> str:
        return f">> grant of {self.request!r} taken back"


class IncompleteFor(Event):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.incomplete_for(self.seconds)

    def __repr__(self) -> str:
        return f">> a message incomplete for {self.seconds} s"


class IdleFor(Event):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def play(self, pb: Playbook) -> list[Command]:
        return pb.connection.idle_for(self.seconds)

    def __repr__(self) -> str:
        return f">> idle for {self.seconds} s"


# Expectations: the commands that must come out, exactly and in order.
class Expect:
    def matches(self, cmd: Command, pb: Playbook) -> bool:
        raise NotImplementedError


class ToServer(Expect):
    command: type = SendToServer

    def __init__(self, *msgs: Any) -> None:
        self.msgs = msgs

    def _decode(self, data: bytes) -> list:
        p = FrontendParser(expect_startup=False)
        p.feed(data)
        return list(p.messages())

    def matches(self, cmd: Command, pb: Playbook) -> bool:
        if not isinstance(cmd, self.command):
            return False
        got = self._decode(bytes(cmd.data))  # type: ignore[attr-defined]
        if len(got) != len(self.msgs):
            return False
        return all(e == g for e, g in zip(self.msgs, got, strict=True))

    def __repr__(self) -> str:
        return f"<< server gets: {', '.join(map(_short, self.msgs))}"


class ToClient(ToServer):
    command = SendToClient

    def _decode(self, data: bytes) -> list:
        p = BackendParser()
        p.feed(data)
        return list(p.messages())

    def __repr__(self) -> str:
        return f"<< client gets: {', '.join(map(_short, self.msgs))}"


class Audit(Expect):
    """A WriteAudit of exactly these records, each given by fields it must have."""

    def __init__(self, *records: dict[str, Any]) -> None:
        self.records = records

    def matches(self, cmd: Command, pb: Playbook) -> bool:
        if not isinstance(cmd, WriteAudit) or len(cmd.records) != len(self.records):
            return False
        bodies = [json.loads(fixed + b"}") for fixed in cmd.records]
        if not all(_subset(e, a) for e, a in zip(self.records, bodies, strict=True)):
            return False
        pb.pending_records = bodies
        return True

    def __repr__(self) -> str:
        return f"<< write audit: {', '.join(map(repr, self.records))}"


class Results(Expect):
    """A RecordResults of exactly these results, each given by fields it must have."""

    def __init__(self, *results: dict[str, Any]) -> None:
        self.results = results

    def matches(self, cmd: Command, pb: Playbook) -> bool:
        if not isinstance(cmd, RecordResults) or len(cmd.results) != len(self.results):
            return False
        got = [dict(zip(RESULT_FIELDS, values, strict=True)) for values in cmd.results]
        return all(_subset(e, a) for e, a in zip(self.results, got, strict=True))

    def __repr__(self) -> str:
        return f"<< record results: {', '.join(map(repr, self.results))}"


class Close(Expect):
    def __init__(self, *words: str) -> None:
        self.words = words

    def matches(self, cmd: Command, pb: Playbook) -> bool:
        return isinstance(cmd, CloseConnection) and all(w in cmd.reason for w in self.words)

    def __repr__(self) -> str:
        return f"<< close ({' '.join(self.words)})"


class Held(Expect):
    """A RequestApproval for the held statement (its id bound to `request`)."""

    def __init__(self, request: Placeholder, rule: str, protocol: str = "simple") -> None:
        self.request, self.rule, self.protocol = request, rule, protocol

    def matches(self, cmd: Command, pb: Playbook) -> bool:
        return (
            isinstance(cmd, RequestApproval)
            and self.request == cmd.request_id
            and cmd.decision.hold is not None
            and cmd.decision.hold.rule_id == self.rule
            and cmd.protocol == self.protocol
        )

    def __repr__(self) -> str:
        return f"<< hold for approval {self.request!r} ({self.rule}, {self.protocol})"


class GrantEnds(Expect):
    def __init__(self, request: Placeholder) -> None:
        self.request = request

    def matches(self, cmd: Command, pb: Playbook) -> bool:
        return isinstance(cmd, EndApproval) and self.request == cmd.request_id

    def __repr__(self) -> str:
        return f"<< end the grant of {self.request!r}"


class Notice:
    """Matches a NoticeResponse whose message and hint have these words."""

    def __init__(self, *words: str) -> None:
        self.words = words

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, m.NoticeResponse):
            return False
        text = f"{other.message} {other.hint or ''}"
        return all((w.value if isinstance(w, Placeholder) else w) in text for w in self.words)

    def __repr__(self) -> str:
        return f"Notice({' '.join(map(str, self.words))!r})"


class Logged(Expect):
    """A Log command of this level whose message has these words."""

    def __init__(self, level: str, *words: str) -> None:
        self.level, self.words = level, words

    def matches(self, cmd: Command, pb: Playbook) -> bool:
        return (
            isinstance(cmd, Log)
            and cmd.level == self.level
            and all(w in cmd.message for w in self.words)
        )

    def __repr__(self) -> str:
        return f"<< log {self.level}: {' '.join(self.words)}"


DRIFT = Logged("warning", "may have drifted")  # a protected base column reached the stream


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 90 else text[:87] + "..."


def _describe(cmd: Command) -> str:
    if isinstance(cmd, SendToServer):
        return f"<< server gets: {', '.join(map(_short, to_server([cmd])))}"
    if isinstance(cmd, SendToClient):
        return f"<< client gets: {', '.join(map(_short, to_client([cmd])))}"
    if isinstance(cmd, WriteAudit):
        return f"<< write audit: {[json.loads(r + b'}') for r in cmd.records]}"
    if isinstance(cmd, RecordResults):
        results = [dict(zip(RESULT_FIELDS, v, strict=True)) for v in cmd.results]
        return f"<< record results: {results}"
    if isinstance(cmd, RequestApproval):
        rule = cmd.decision.hold.rule_id if cmd.decision.hold else None
        return f"<< hold for approval {cmd.request_id} ({rule}, {cmd.protocol})"
    if isinstance(cmd, EndApproval):
        return f"<< end the grant of {cmd.request_id}"
    return f"<< {cmd!r}"


class Playbook:
    """An exact ordered dialogue with one connection (see the module docstring)."""

    def __init__(self, conn: GatewayConnection | None = None) -> None:
        self.connection = conn or connection()
        self.script: list[Event | Expect] = []
        self.audit: list[dict[str, Any]] = []  # records written by AuditWritten, in order
        self.pending_records: list[dict[str, Any]] = []
        self._seq = 0
        self._played = 0
        self._transcript: list[str] = []

    def __rshift__(self, event: Event) -> Playbook:
        self.script.append(event)
        return self

    def __lshift__(self, expected: Expect) -> Playbook:
        self.script.append(expected)
        return self

    def written(self) -> list[int]:
        seqs = []
        for body in self.pending_records:
            self._seq += 1
            self.audit.append({**body, "seq": self._seq})
            seqs.append(self._seq)
        self.pending_records = []
        return seqs

    def __bool__(self) -> bool:
        """Play the events not yet played; True if every command came exactly as expected,
        else AssertionError with both transcripts side by side (expected | actual).

        A playbook can be extended and asserted again: the dialogue continues."""
        expected: list[Expect] = []
        actual: list[Command] = []
        ok = True
        for step in self.script[self._played :]:
            if isinstance(step, Event):
                ok = self._settle(expected, actual) and ok
                self._transcript.append(repr(step))
                actual = list(step.play(self))
                expected = []
            else:
                expected.append(step)
        ok = self._settle(expected, actual) and ok
        self._played = len(self.script)
        if not ok:
            raise AssertionError("\n".join(["the dialogue differs:", *self._transcript]))
        return True

    def _settle(self, expected: list[Expect], actual: list[Command]) -> bool:
        ok = len(expected) == len(actual)
        for i in range(max(len(expected), len(actual))):
            e = expected[i] if i < len(expected) else None
            a = actual[i] if i < len(actual) else None
            good = e is not None and a is not None and e.matches(a, self)
            ok = ok and good
            line = f"{e!r:60} | {_describe(a) if a is not None else '-'}"
            self._transcript.append(("   " if good else "!! ") + line)
        return ok
