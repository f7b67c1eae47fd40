"""One client connection through the gateway, after authentication: the sans-IO core.

No asyncio, no sockets, no files. Events go in as method calls (`from_client`,
`from_server`, `audit_written`, `audit_failed`, `approval_decided`, `approval_ended`,
`client_eof`, `server_eof`, `idle_for`, `incomplete_for`); each returns the commands
(`proxy.commands`) the shell must execute, in order. Every statement-bearing client
message (Query, Parse, Execute, FunctionCall) goes through `proxy.gate` first: its audit
records leave as a blocking `WriteAudit` command and the statement is forwarded only in
the commands that answer `audit_written` — so "recorded before forwarded" is visible in the
command order, and the shell may batch the writes.
Every result row is checked against the protected-column map before it is sent on.

The connection is a state machine (`State`):

    RELAYING ──WriteAudit──▶ PAUSED ──audit_written / audit_failed──▶ RELAYING
    PAUSED ──RequestApproval (a held statement)──▶ PAUSED ──approval_decided──▶ RELAYING
        (approved with a one-statement grant: PAUSED until EndApproval is answered)
    RELAYING ──client_eof──▶ HALF_CLOSED (responses still relayed until the database closes)
    any ──Terminate, protocol error, upstream FATAL, server_eof──▶ CLOSED
    any ──an exception inside the core──▶ FAILED (client gets FATAL XX000, upstream closed)

While PAUSED, client messages queue behind the statement that paused (they are decided and
forwarded in order once it resumes) and server messages are relayed as usual; a statement
held for approval lives in the same state.

How a refusal keeps PostgreSQL's exact semantics: instead of answering locally (which would
leave the upstream transaction and a pipelined batch in a state the client does not expect),
the refused message is replaced by a *poison* message whose only effect upstream is a syntax
error (`guard_refused_<nonce>`). PostgreSQL then aborts the transaction / skips to Sync just
as it would have for a real error, and the connection swaps that one ErrorResponse for the
refusal. The poison text is chosen by the gateway, never by the client.

Responses are matched to requests with a FIFO of `Pending` entries (PostgreSQL answers in
order), which is also how result row counts reach the audit record of their statement. The
extended protocol's steady state keeps its one transaction in `_tx` instead (`Transaction`),
while nothing else is pending: its answer then needs no entries built and taken apart.

Two builds: this module is the reference, and Cython compiles it as it is into
`proxy._cconnection` (declarations in `connection.pxd`); `proxy.core` picks the one that
runs. Write it as plain Python; a field added to `GatewayConnection` is declared in the
.pxd too (tests/proxy/test_core_twins.py holds the two builds to the same commands).
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any, cast

from guard.broker.masking.strategies import MaskStrategy
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.errors import ClientProtocolError, ProtocolError
from guard.broker.pgwire.messages import (  # the tags, compared as plain globals
    TAG_BIND,
    TAG_BIND_COMPLETE,
    TAG_CLOSE,
    TAG_CLOSE_COMPLETE,
    TAG_COMMAND_COMPLETE,
    TAG_COPY_BOTH_RESPONSE,
    TAG_COPY_DATA,
    TAG_COPY_DONE,
    TAG_COPY_FAIL,
    TAG_DATA_ROW,
    TAG_DESCRIBE,
    TAG_EMPTY_QUERY_RESPONSE,
    TAG_ERROR_RESPONSE,
    TAG_EXECUTE,
    TAG_FLUSH,
    TAG_FUNCTION_CALL,
    TAG_NO_DATA,
    TAG_PARAMETER_DESCRIPTION,
    TAG_PARAMETER_STATUS,
    TAG_PARSE,
    TAG_PARSE_COMPLETE,
    TAG_PORTAL_SUSPENDED,
    TAG_QUERY,
    TAG_READY_FOR_QUERY,
    TAG_ROW_DESCRIPTION,
    TAG_SYNC,
    TAG_TERMINATE,
)
from guard.broker.pgwire.parser import (
    MAX_MESSAGE_SIZE,
    BackendParser,
    FrontendParser,
    Raw,
    decode_backend,
    decode_frontend,
    frame_of,
)
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
from guard.broker.proxy.encoding import codec_for, decode_parse, decode_query
from guard.broker.proxy.events import ApprovalDecided
from guard.broker.proxy.gate import AUDIT_UNAVAILABLE, Decision, Gate
from guard.broker.proxy.names import Description, NameTables, Portal, Prepared, Undo
from guard.broker.proxy.speedups import (  # compiled, or pgwire.parser's (the reference)
    bind_names,
    cstring_body,
    data_row,
    data_rows,
    describe_target,
    execute_portal,
    extended_request,
    join_small,
    literal_shape,
    parse_statement,
    scan,
)
from guard.broker.proxy.state import State

# Below this many bytes one call's output is joined into one write; above it (bulk rows)
# the slices are written as they are rather than copied.
_JOIN_LIMIT = 1 << 16
_DESCRIBED_CACHE_SIZE = 256
_DESCRIBED_CACHE_BYTES = 1 << 20
_PLANS_PER_DESCRIPTION = 8  # result-format lists seen per description (client-chosen)
_TERMINATE = encode(m.Terminate())
_FLUSH = encode(m.Flush())

# (table OID, attribute number) of a protected base column → its mask strategy.
ProtectedMap = Mapping[tuple[int, int], MaskStrategy]
# Per protected result column: (column index, strategy, format code, type OID).
MaskPlan = tuple[tuple[int, MaskStrategy, int, int], ...]


# Module constants: an enum member read through its class costs a descriptor call per use.
_RELAYING, _PAUSED, _HALF_CLOSED, _CLOSED, _FAILED = State


class PendingKind(IntEnum):
    """What a forwarded request waits for PostgreSQL to answer."""

    QUERY = 0  # a simple Query (or a refused FunctionCall, answered like one)
    PARSE = 1
    BIND = 2
    DESCRIBE = 3
    EXECUTE = 4
    CLOSE = 5
    SYNC = 6


_QUERY, _PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE, _SYNC = PendingKind
_NAME_CHANGES = frozenset((_PARSE, _BIND, _CLOSE))  # requests answered by 1, 2 or 3
_TAG_CACHE_SIZE = 64
# CommandCompletes the express answers compare before the tag cache: a few, each compared
# in turn (a compare is ~40 instructions; a slice and a dict lookup cost TPC-B ~670 more a
# statement, measured with bench/relay_instructions.py --mode tpcb).
_DONE_RECENT = 6
# The dispatch loops test a tag against a few others with `in (...)` of the names
# themselves, not a set: the compiled twin makes that C comparisons of C integers
# (connection.pxd), where a set is a Python membership test per message.


# One forwarded request still waiting for its response(s): a list indexed by the constants
# below, built as a literal (one per forwarded message, the hot path: a class's __init__
# costs a Python frame per entry). Fields other than plan, planned and approval are fixed
# when the entry is built.
Pending = list[Any]
_KIND = 0  # PendingKind
_SEQS = 1  # audit seqs awaiting a result record (list[int] | None)
_PORTAL = 2  # describe of a portal / execute: the portal (Portal | None)
_UNDO = 3  # parse/bind/close: its name-table change (Undo | None)
_PREPARED = 4  # parse/describe of a statement: the statement (Prepared | None)
_SUBSTITUTE = 5  # poison: replaces the upstream error (m.ErrorResponse | None)
_SWALLOW = 6  # the responses are the gateway's own (an injected Describe): bool
_PLAN = 7  # execute: mask plan, worked out at its first row (MaskPlan | None)
_PLANNED = 8  # bool
_APPROVAL = 9  # an approved held statement: its request id (str | None)


# The steady state's extended transaction, `[Parse] Bind [Describe] Execute Sync` taken by
# the express lane while nothing else was pending (`_express_extended`): what its entries
# would hold, in one tuple, kept in `_tx` until its answer comes. The parsed statement and
# its name-table change (None, None without a Parse), the bound portal and its change, the
# Describe's kind (b"P", b"S" or None) and the bound statement, and the Execute's seqs.
# `_expand` makes it the entries the general path reads, and anything but its express
# answer does so first. An extended transaction is 4 or 5 entries, each a list to build,
# queue, take apart and free: without them, -11 % instructions per -S extended transaction
# through the pump, -9 % prepared (bench/relay_instructions.py).
Transaction = tuple[Prepared | None, Any, Portal, Any, bytes | None, Prepared, list[int]]


def _entry(
    kind: PendingKind,
    seqs: list[int] | None = None,
    portal: Portal | None = None,
    undo: Undo | None = None,
    prepared: Prepared | None = None,
    substitute: m.ErrorResponse | None = None,
    swallow: bool = False,
) -> Pending:
    """A Pending entry (the hot paths build theirs as literals, in this order)."""
    return [kind, seqs, portal, undo, prepared, substitute, swallow, None, False, None]


def _decision(
    gate: Gate, decisions: dict[str, Decision], shared: dict[str, Decision], sql: str
) -> Decision:
    """`gate.decide(sql)`, answered from the gate's caches where `decide` would answer
    from them: the exact text's decision, or the one its shape (`sql.shape`) shares with
    other literals (`Gate.shared`: the gate alone decides what is shared). A Python frame
    less per statement for the compiled core; anything else is decide's."""
    decision = decisions.get(sql)
    if decision is None:
        shape = literal_shape(sql)
        if shape is not None:
            decision = shared.get(shape)
        if decision is None:
            decision = gate.decide(sql)
    return decision


_new = object.__new__


def _send_to_server(data: bytes | memoryview) -> SendToServer:
    """SendToServer(data), built without its __init__ (a Python frame, even for the
    compiled core): two of these are made per statement."""
    cmd = _new(SendToServer)
    cmd.data = data
    return cmd


def _send_to_client(data: bytes | memoryview) -> SendToClient:
    """SendToClient(data), as _send_to_server."""
    cmd = _new(SendToClient)
    cmd.data = data
    return cmd


class _Held:
    """A statement held for approval: what to forward once approved."""

    __slots__ = ("request_id", "raw", "portal", "seqs", "running")

    def __init__(self, request_id: str, raw: Raw, portal: Portal | None, seqs: list[int]) -> None:
        self.request_id = request_id
        self.raw = raw  # the Query, or the Execute of `portal`
        self.portal = portal
        self.seqs = seqs
        self.running = False  # approved with a per-statement grant, not completed yet


# What to do once the audit records of a paused statement are written (seqs) or could not
# be (None): one of the connection's `_after_*` methods and its arguments.
_Continuation = tuple[Callable[[list[int] | None, Any, Any], None], Any, Any]


class GatewayConnection:
    """Relay between one client and its own upstream backend, gated and masked."""

    def __init__(
        self,
        gate: Gate,
        *,
        protected: ProtectedMap,
        client_user: str,
        max_message_size: int | None = None,
        client_encoding: str = "UTF8",
        holds: bool = False,
        audit_answers_later: bool = False,
    ) -> None:
        self.gate = gate
        # Whether a statement that needs approval is held for a decision (the shell can
        # answer RequestApproval) or refused at once.
        self.holds = holds
        # Whether the shell answers WriteAudit later (group commit: after an fsync). Then
        # upstream bytes whose records are already written go at once instead of waiting
        # to join the next paused statement's bytes: in a pipeline, each statement would
        # otherwise wait for the next one's fsync too.
        self._eager = audit_answers_later
        # The shell's synchronous writer of statement records, or None. Given records, it
        # writes them and answers their seqs, or answers None and writes nothing (then the
        # statement pauses for a WriteAudit as without it). The audit sink's common case
        # (`JsonlAuditSink.hot_path`): recorded at once, nothing pauses.
        self.recorder: Callable[[tuple[bytes, ...]], list[int] | None] | None = None
        # The shell's queue for result records, or None. Given this call's results, it
        # queues them and answers True, or answers False and queues nothing (then they go
        # out as a RecordResults command, as without it). The sink's common case again:
        # one C call per call of the core instead of a command the shell dispatches.
        self.result_recorder: Callable[[list[tuple[Any, ...]]], bool] | None = None
        # Statement text is decoded as PostgreSQL will read it (see proxy.encoding).
        self.codec = codec_for(client_encoding) or "utf-8"
        self.protected = protected
        # The masking views' masked columns (view OID, attnum): the audit counts their cells.
        self._view_columns: frozenset[tuple[int, int]] = getattr(
            protected, "view_columns", frozenset()
        )
        self._view_masked = 0  # simple query: masked view columns of the current result
        # An unmasked session's counted columns are guard_unmasked's raw ones: its counts
        # are unmasked cells, not view-masked ones.
        self._unmasked = gate.unmasked
        self.client_user = client_user
        self.state = State.RELAYING
        kwargs = {"max_message_size": max_message_size} if max_message_size else {}
        self._frontend = FrontendParser(expect_startup=False, scan=scan, **kwargs)
        # Both parsers' size limit, which the express lanes check too (`_express_end`).
        self._limit = max_message_size or MAX_MESSAGE_SIZE
        self._express_t = b""  # see _express_description
        self._express_t_description: Description | None = None
        self._declined_t = b""
        self._backend = BackendParser(scan=scan, **kwargs)
        # With the compiled scan, a read is framed here while its parser holds nothing (most
        # reads are whole messages): what `feed_drain` does then, without its call. The
        # flags say the parser holds nothing (`buffered` is 0); they change where the
        # parsers are fed or drained below, and nowhere else.
        self._front_tables = self._frontend.scan_tables()
        self._back_tables = self._backend.scan_tables()
        self._front_empty = True
        self._back_empty = True
        self._decisions = gate.decisions  # exact texts' decisions: a hit needs no decide call
        self._shared = gate.shared  # shapes' decisions their other literals share
        self._pending: deque[Pending] = deque()
        self._tx: Transaction | None = None  # only while _pending is empty (see Transaction)
        self.names = NameTables()
        # Client messages framed but not yet handled (the connection paused before them).
        self._backlog: list[Raw] = []
        self._backlog_pos = 0
        self._backlog_error: ProtocolError | None = None
        self._continuation: _Continuation | None = None
        # The blocking command of this call (always emitted last), and the held statement.
        self._blocking: WriteAudit | RequestApproval | EndApproval | None = None
        self._held: _Held | None = None
        self._fed_while_paused = False  # bytes queued in the parser behind the pause
        self._eof_after_pause = False
        self._plan: MaskPlan | None = None  # simple query: active row mask plan
        # A statement run again describes its result with the same RowDescription bytes:
        # decode each once (bounded); each Description caches its own mask plans.
        self._described: dict[bytes, Description] = {}
        self._described_bytes = 0
        self._masked_cells = 0
        self._drift_logged = False  # the drift warning was given on this connection
        self._tags: dict[bytes, tuple[str, int | None]] = {}  # CommandComplete → (tag, rows)
        self._done_recent: list[tuple[bytes, tuple[str, int | None]]] = []  # _express_done
        # A result record's first two fields (`_result`), read once.
        self._session_id = gate.session_id
        self._connection_id = gate.connection_id
        # What one call produces, joined into few writes.
        self._to_server: list[bytes | memoryview] = []
        self._to_client: list[bytes | memoryview] = []
        self._results: list[tuple[Any, ...]] = []
        self._logs: list[Log] = []
        self._close: str | None = None

    @property
    def closed(self) -> bool:
        """Nothing more will be relayed (CLOSED or FAILED)."""
        return self.state >= _CLOSED

    @property
    def held_request(self) -> str | None:
        """The request id of the statement held for approval (waiting, or running under its
        grant), if any: what a client's cancel or disconnect withdraws."""
        return self._held.request_id if self._held is not None else None

    @property
    def awaiting_approval(self) -> str | None:
        """The request id while a held statement waits for its decision (not once it runs)."""
        held = self._held
        return held.request_id if held is not None and not held.running else None

    @property
    def partial_message(self) -> bool:
        """Bytes of a client message are in, its end is not (while relaying)."""
        return self.state is _RELAYING and not self._front_empty

    @property
    def queued_client_bytes(self) -> int:
        """Client bytes received but not yet handled (queued behind a pause, or partial)."""
        return self._frontend.buffered

    @property
    def idle(self) -> bool:
        """No request outstanding and nothing paused: the client is thinking, not waiting."""
        return self.state is _RELAYING and not self._pending and self._tx is None

    # ============================================================== events from the shell
    def from_client(self, data: bytes) -> list[Command]:
        """Bytes the client sent, in order: the commands that relay them.

        While PAUSED the bytes only queue (the result is empty); after the connection
        ended they are dropped. Never raises.
        """
        said = self.relay_from_client(data)
        return said if isinstance(said, list) else [_send_to_server(data)]

    def relay_from_client(self, data: bytes) -> list[Command] | bytes:
        """`from_client` for a shell that writes what it is given: `data` itself (the
        same object) when the call's whole output is that read forwarded upstream as it
        came (an express lane's), which the shell sends as it would `[SendToServer(data)]`;
        otherwise from_client's commands. The steady state without a command, its list and
        the shell's dispatch of it."""
        if self.state is not _RELAYING:
            self._feed_paused(data)
            return []
        try:
            # RELAYING: nothing is queued behind a pause (_queued handled it all).
            if self._tx is not None:  # a request before the last one's answer: in order
                self._expand()
            fresh = self._front_empty and data.__class__ is bytes  # a read framed on its own
            if fresh:
                said = self._express_request(data)
                if said is not None:
                    return said  # (the read itself, or the pause for its record)
            tables = self._front_tables
            if fresh and tables is not None:
                frame, valid, runs, limit = tables
                backlog: list[Raw] = []
                pos, need = frame(data, 0, valid, runs, limit, backlog)
                error = None
                if pos != len(data):
                    error = self._frontend.keep(data, pos, need)
                    self._front_empty = False
                self._backlog, self._backlog_error = backlog, error
            else:
                self._backlog, self._backlog_error = self._frontend.feed_drain(data)
                self._front_empty = self._frontend.buffered == 0
            self._backlog_pos = 0
            self._relay_client(False)
        except Exception as exc:  # noqa: BLE001 - see _failed: nothing escapes the core
            self._failed(exc)
        blocking = self._blocking
        if blocking is not None and not (
            self._to_client or self._results or self._logs or (self._eager and self._to_server)
        ):
            self._blocking = None
            return [blocking]  # a statement paused for its record (the common pause)
        return self._flush()

    def _feed_paused(self, data: bytes) -> None:
        """While PAUSED, the client's bytes queue in its parser; after the end, nothing."""
        if self.state is _PAUSED:
            self._frontend.feed(data)
            self._fed_while_paused = True
            if data:
                self._front_empty = False

    def _express_request(self, data: bytes) -> list[Command] | bytes | None:
        """The steady state of a client: a read that is one whole request, a Query or an
        extended-protocol `[Parse] Bind [Describe] Execute Sync`, of a statement whose
        decision forwards it as the client sent it, with nothing else pending in this call.
        What `_relay_client`, the `_on_*` steps, `_record`, the `_after_*` steps and
        `_flush` give for it, without framing copies, the steps' calls, or the decision's
        other attributes: `data`, to go upstream as it is (or a Query's pause for its
        record). None, having changed nothing: anything else, for the general path (a
        malformed message included: it says why)."""
        if (
            len(data) < 6  # (a Query of one NUL, the least of them)
            or self.codec != "utf-8"
            or self._to_server
            or self._to_client
            or self._results
            or self._logs
            or self._blocking is not None
            or self._close is not None
        ):
            return None
        if data[0] == TAG_QUERY:
            return self._express_query(data)
        if data[0] == TAG_PARSE or data[0] == TAG_BIND:
            return self._express_extended(data)
        return None

    def _express_query(self, data: bytes) -> list[Command] | bytes | None:
        if self._express_end(data, 0, 5) != len(data):  # one whole message (a NUL at least)
            return None
        try:
            sql = cstring_body(data, "Query")
        except ProtocolError:
            return None
        records = _decision(self.gate, self._decisions, self._shared, sql).simple_records
        if records is None:
            return None
        recorder = self.recorder
        seqs = recorder(records) if recorder is not None else None
        if seqs is None:  # paused for its record, as `_record` pauses
            self._continuation = (self._after_query_record, data, None)
            self.state = _PAUSED
            return [WriteAudit(records)]
        self._pending.append([_QUERY, seqs, None, None, None, None, False, None, False, None])
        return data

    def _express_extended(self, data: bytes) -> bytes | None:  # noqa: C901 - checks, then effects
        request = extended_request(data, self._limit)
        if request is None:
            return None
        parse_name, query, portal_name, statement, kind, described = request
        names = self.names
        parsed = None  # the Parse's statement
        if query is not None:
            decision = _decision(self.gate, self._decisions, self._shared, query)
            fixed = decision.extended_records
            if fixed is None:
                return None  # refused, held, redirected, masked: _on_parse's other cases
            parsed = Prepared(decision, fixed)
        if parsed is not None and statement == parse_name:
            prepared: Prepared | None = parsed
        else:
            prepared = names.statements.get(statement)
        if prepared is None:
            return None  # the Execute is refused: the general path says so
        decision = prepared.decision
        if decision.hold is not None or (self.protected and decision.masked_columns):
            return None  # held, or the Bind's result formats are needed for masking
        if not prepared.records:
            return None
        if kind is not None and described != (portal_name if kind == b"P" else statement):
            return None  # something else described: the general path looks it up
        # What the general path does, in its order but for the record, which is written
        # first here so that nothing has changed when the recorder declines (the name
        # tables, which it sets first, are the core's own; nothing sees them in between).
        recorder = self.recorder
        seqs = recorder(prepared.records) if recorder is not None else None
        if seqs is None:
            return None  # the general path pauses for its record
        parse_undo = names.parse(parse_name, parsed) if parsed is not None else None
        portal = Portal(prepared, ())
        tx = (parsed, parse_undo, portal, names.bind(portal_name, portal), kind, prepared, seqs)
        if self._pending:
            self._queue(tx)  # behind what else is pending (a pipeline)
        else:
            self._tx = tx
        return data

    def _queue(self, tx: Transaction) -> None:
        """Queue the Pending entries of an express transaction, as the general path's
        `_on_parse`, `_on_bind`, `_on_describe`, `_on_execute` and Sync would."""
        parsed, parse_undo, portal, bind_undo, kind, prepared, seqs = tx
        pending = self._pending
        if parsed is not None:
            pending.append([_PARSE, None, None, parse_undo, parsed, None, False, None, False, None])
        pending.append([_BIND, None, None, bind_undo, None, None, False, None, False, None])
        if kind == b"P":
            pending.append([_DESCRIBE, None, portal, None, None, None, False, None, False, None])
        elif kind is not None:
            pending.append([_DESCRIBE, None, None, None, prepared, None, False, None, False, None])
        pending.append([_EXECUTE, seqs, portal, None, None, None, False, None, False, None])
        pending.append([_SYNC, None, None, None, None, None, False, None, False, None])

    def _expand(self) -> None:
        """`_tx` as the Pending entries it stands for: before anything but its express
        answer reads or adds to the queue."""
        tx = self._tx
        assert tx is not None
        self._tx = None
        self._queue(tx)

    def from_server(self, data: bytes) -> list[Command]:
        """Bytes PostgreSQL sent, in order: the commands that relay them (masked). Never
        raises."""
        said = self.relay_from_server(data)
        return said if isinstance(said, list) else [_send_to_client(data)]

    def relay_from_server(self, data: bytes) -> list[Command] | bytes:  # noqa: C901 - the dispatch on the message type, inline: it runs per message
        """`from_server` for a shell that writes what it is given: `data` itself when the
        call's whole output is that read relayed to the client as it came, as
        `relay_from_client`."""
        if self.state >= _CLOSED:
            return []
        try:
            fresh = self._back_empty and data.__class__ is bytes  # a read framed on its own
            tx = self._tx
            if tx is not None:
                if fresh and self._express_tx_answer(data, tx):
                    return self._express_output(data)
                self._expand()
            elif fresh and self._express_answer(data):
                return self._express_output(data)
            tables = self._back_tables
            if fresh and tables is not None:
                frame, valid, runs, limit = tables
                messages: list[Raw] = []
                pos, need = frame(data, 0, valid, runs, limit, messages)
                error = None
                if pos != len(data):  # a row or message split across reads (bulk results)
                    error = self._backend.keep(data, pos, need)
                    self._back_empty = False
            else:
                messages, error = self._backend.feed_drain(data)
                self._back_empty = self._backend.buffered == 0
            to_client = self._to_client
            pending = self._pending
            for raw in messages:
                tag = raw[0]
                if tag == TAG_DATA_ROW:  # a run of rows
                    plan = self._plan
                    if plan is None and self.protected and pending:
                        plan = self._execute_plan(pending[0])
                    if plan:
                        self._mask_rows(raw, plan)
                    else:
                        # Bulk path: rows that need no masking go out as one slice, undecoded.
                        to_client.append(raw)
                elif tag == TAG_COPY_DATA:
                    # COPY TO STDOUT data (a run of it): the COPY statement was gated, and
                    # its rows cannot be tied to table OIDs (protected tables are COPY-able
                    # only as masking views, which PostgreSQL refuses to COPY directly).
                    to_client.append(raw)
                elif tag in (TAG_COMMAND_COMPLETE, TAG_EMPTY_QUERY_RESPONSE, TAG_PORTAL_SUSPENDED):
                    # The end of one statement.
                    self._on_complete(tag, raw)
                elif tag == TAG_READY_FOR_QUERY:
                    self._plan = None
                    # Everything up to and including the matching Query/Sync is answered;
                    # a name change never answered (a server out of step) stands.
                    while pending:
                        entry = pending.popleft()
                        if entry[_APPROVAL] is not None:
                            self._approval_done(entry)
                        kind = entry[_KIND]
                        if kind is _QUERY or kind is _SYNC:
                            break
                    to_client.append(raw)
                elif tag in (TAG_PARSE_COMPLETE, TAG_BIND_COMPLETE, TAG_CLOSE_COMPLETE):
                    # ParseComplete, BindComplete, CloseComplete: the name change stands.
                    if pending and pending[0][_KIND] in _NAME_CHANGES:
                        if pending.popleft()[_SWALLOW]:
                            continue  # the answer to the gateway's own Describe
                    to_client.append(raw)
                else:
                    self._on_server_message(tag, raw)
                    if self.state >= _CLOSED:
                        break
            else:
                if error is not None:
                    raise error
        except Exception as exc:  # noqa: BLE001 - see _failed: nothing escapes the core
            self._failed(exc)
        return self._flush()

    def _express_output(self, data: bytes) -> list[Command] | bytes:
        """What `_flush` gives after an express answer, `data` itself when that is all of
        it: the read relayed, its result record queued by the result recorder."""
        if (
            len(self._to_client) != 1
            or self._to_server
            or self._logs
            or self._blocking is not None
            or self._close is not None
        ):
            return self._flush()
        results = self._results
        if results:
            self._results = []
            recorder = self.result_recorder
            if recorder is None or not recorder(results):
                self._to_client = []
                return [_send_to_client(data), RecordResults(results)]  # as `_flush` orders them
        self._to_client = []
        return data

    def _express_answer(self, data: bytes) -> bool:
        """The steady state of the answers: a read that is one whole answer to the recorded
        Query at the head of the queue, `[RowDescription] DataRow* CommandComplete
        ReadyForQuery`, whose rows need no masking and whose RowDescription and
        CommandComplete were seen before (their caches hold them). Does what the general
        path does for those messages and relays the read as it is (not framed into copies
        and joined again): True. False, having changed nothing the general path would not:
        anything else. (`_express_tx_answer` is the extended protocol's.)"""
        pending = self._pending
        if not pending or len(data) < 6:
            return False
        head = pending[0]
        seqs = head[_SEQS]
        if head[_KIND] is not _QUERY or not seqs or head[_APPROVAL] is not None:
            return False
        pos = 0
        description = None
        if data[0] == TAG_ROW_DESCRIPTION:
            pos = self._express_end(data, 0, 6)
            if pos < 0:
                return False
            if self.protected:
                description = self._express_description(data, 0, pos)
                if description is None:
                    return False
        if description is None and self._plan is not None:
            return False
        pos = self._express_rows(data, pos)
        done = self._express_done(data, pos) if pos >= 0 else None
        if done is None:
            return False
        # Now what the general path does for these messages, in its order.
        if description is not None:  # RowDescription (its plan: none)
            self._view_masked = description.view_masked
        self._plan = None  # CommandComplete
        self._result(seqs.pop(0), "ok", done[0], done[1], None, self._view_masked)
        self._masked_cells = 0
        self._view_masked = 0
        pending.popleft()  # ReadyForQuery: the Query is answered
        self._to_client.append(data)
        return True

    def _express_tx_answer(self, data: bytes, tx: Transaction) -> bool:  # noqa: C901 - checks, then effects
        """`_express_answer` for the extended transaction in `_tx`: a read that is its
        whole answer, `[ParseComplete] BindComplete [RowDescription] DataRow*
        CommandComplete ReadyForQuery` (a RowDescription answering the Describe of the
        portal run; a statement's Describe is the general path's), on the same terms.
        True having done what the general path does with its entries, which it empties
        `_tx` of; False having changed nothing."""
        size = len(data)
        if self._plan is not None or size < 6:
            return False
        parsed, _, portal, _, kind, _, seqs = tx
        pos = 0
        if parsed is not None:
            if data[0] != TAG_PARSE_COMPLETE:
                return False
            pos = self._express_end(data, 0, 4)
            if pos < 0:
                return False
        if pos >= size or data[pos] != TAG_BIND_COMPLETE:
            return False
        pos = self._express_end(data, pos, 4)
        if pos < 0:
            return False
        description = None
        if kind is not None:
            if kind != b"P" or pos >= size or data[pos] != TAG_ROW_DESCRIPTION:
                return False
            start = pos
            pos = self._express_end(data, pos, 6)
            if pos < 0:
                return False
            if self.protected:
                description = self._express_description(data, start, pos)
                if description is None:
                    return False
        rows = pos
        pos = self._express_rows(data, pos)
        if pos < 0:
            return False
        if pos > rows and self.protected and kind is None:
            # The rows' plan, as the general path works it out at the first row (from
            # the portal's or its statement's description, described before).
            if self._portal_plan(portal) is not None:
                return False
        done = self._express_done(data, pos)
        if done is None:
            return False
        # Now what the general path does for these messages, in its order: ParseComplete,
        # BindComplete (the names stand), the Describe, the Execute's CommandComplete, and
        # the ReadyForQuery that answers the Sync.
        if description is not None:
            portal.description = description
        self._plan = None  # CommandComplete
        self._result(seqs[0], "ok", done[0], done[1], None, _view_masked_of(portal))
        self._masked_cells = 0
        self._view_masked = 0
        self._tx = None
        self._to_client.append(data)
        return True

    def _express_end(self, data: bytes, pos: int, least: int) -> int:
        """Where the message at `pos` of `data` ends, or -1: its length (`least` at
        least, the parser's limit at most) runs past the read."""
        size = len(data)
        if pos + 5 > size:
            return -1
        length = data[pos + 1] << 24 | data[pos + 2] << 16 | data[pos + 3] << 8 | data[pos + 4]
        end = pos + 1 + length
        if length < least or length > self._limit or end > size:
            return -1
        return end

    def _express_description(self, data: bytes, start: int, end: int) -> Description | None:
        """The description of the RowDescription `data[start:end]` when its rows need no
        masking, or None: they do, or it is malformed (the general path says which). The
        last one taken, and the last one left to the general path, are compared without
        a copy: a statement run again sends the same."""
        known = self._express_t
        if end - start == len(known) and data.startswith(known, start):
            return self._express_t_description
        declined = self._declined_t
        if end - start == len(declined) and data.startswith(declined, start):
            return None
        key = data[start:end]
        try:
            description = self._describe(key)
            if self._plan_of(description, None) is not None:
                self._declined_t = key
                return None  # rows to mask: the general path masks and logs
        except ProtocolError:
            return None
        self._express_t, self._express_t_description = key, description
        return description

    def _express_rows(self, data: bytes, pos: int) -> int:
        """Where the DataRows from `pos` end (not decoded: the general path relays unmasked
        rows as framed), or -1: a length out of bounds."""
        size = len(data)
        while pos + 5 <= size and data[pos] == TAG_DATA_ROW:
            pos = self._express_end(data, pos, 6)  # (a DataRow holds its column count)
            if pos < 0:
                return -1
        return pos

    def _express_done(self, data: bytes, pos: int) -> tuple[str, int | None] | None:
        """The (tag, rows) of the CommandComplete at `pos`, read before, when a
        ReadyForQuery follows it and ends the read; None otherwise."""
        if pos + 5 > len(data) or data[pos] != TAG_COMMAND_COMPLETE:
            return None
        end = self._express_end(data, pos, 5)
        if (
            end < 0
            or end + 6 != len(data)
            or data[end] != TAG_READY_FOR_QUERY
            or data[end + 1] != 0
            or data[end + 2] != 0
            or data[end + 3] != 0
            or data[end + 4] != 5
        ):
            return None
        # The last ones taken, compared without a copy (as RowDescriptions; their length is
        # in the bytes compared): a connection's statements end with a few tags in turn
        # (TPC-B's five: BEGIN, UPDATE 1, SELECT 1, INSERT 0 1, COMMIT).
        recent = self._done_recent
        for known, known_done in recent:
            if data.startswith(known, pos):
                return known_done
        key = data[pos:end]
        done = self._tags.get(key)  # None: the general path reads it, once
        if done is not None:
            if len(recent) >= _DONE_RECENT:
                del recent[0]
            recent.append((key, done))
        return done

    def audit_written(self, seqs: list[int] | None) -> list[Command]:
        """The records of the last `WriteAudit` are in the log, with these sequence numbers:
        the statement goes on, and the client messages queued behind it after it. (None
        is `audit_failed`.)"""
        continuation = self._continuation
        if continuation is None or self.state is not _PAUSED:
            return []  # ended while the write was out
        self._continuation = None
        self.state = _RELAYING
        then, a, b = continuation
        try:
            then(seqs, a, b)  # may pause again: a statement held for approval
            if self.state is _RELAYING:
                self._queued()
        except Exception as exc:  # noqa: BLE001 - see _failed: nothing escapes the core
            self._failed(exc)
        return self._flush()

    def audit_failed(self) -> list[Command]:
        """The records of the last `WriteAudit` could not be written: the statement is
        refused (58030) instead of run; the connection goes on."""
        return self.audit_written(None)

    def approval_decided(self, event: ApprovalDecided) -> list[Command]:
        """The held statement's request is settled (see `events.ApprovalDecided`).

        Approved: the statement is forwarded now; with a per-statement grant the connection
        stays PAUSED until it completed and `EndApproval` is answered, so nothing queued
        behind it runs under the grant. Not approved: the client gets `event.error` in the
        statement's place (the transaction and a pipeline react as to any error), and the
        queued messages go on.
        """
        held = self._held
        if held is None or held.request_id != event.request_id or held.running:
            return []  # not (or no longer) waiting for this request
        if self.state is not _PAUSED:
            return []
        return self._run(self._settle, held, event)

    def approval_ended(self, request_id: str) -> list[Command]:
        """The grant of the approved statement is taken back: the queue goes on."""
        held = self._held
        if held is None or held.request_id != request_id or not held.running:
            return []
        if self.state is not _PAUSED:
            return []
        self._held = None
        self.state = _RELAYING
        return self._run(self._queued)

    def client_eof(self) -> list[Command]:
        """The client will send nothing more (half-close, or gone).

        Its complete requests still run (a partial one is dropped) and PostgreSQL is told
        the client terminated, after them; responses are relayed until the database closes.
        """
        if self.state is _PAUSED:
            self._eof_after_pause = True
            return []
        if self.state is not _RELAYING:
            return []
        return self._run(self._half_close)

    def server_eof(self) -> list[Command]:
        """PostgreSQL closed its side: what it sent is relayed, then the connection ends."""
        if self.state >= _CLOSED:
            return []
        if self.state is _HALF_CLOSED:  # after the Terminate the half-close sent
            return self._run(self._end, "the client closed its side")
        return self._run(self._end, "the database closed the connection")

    def idle_for(self, seconds: float) -> list[Command]:
        """The shell's watchdog: nothing crossed either side for `seconds`. An idle
        connection is ended (FATAL 57P05, like PostgreSQL's idle_session_timeout); one
        that is waiting for a response, or paused, is left alone."""
        if not self.idle:
            return []
        return self._run(
            self._end_fatal,
            "57P05",
            f"guard: terminating the connection after {seconds:.0f} s idle",
            f"idle for {seconds:.0f} s",
            "reconnect; the gateway ends connections idle longer than its idle timeout",
        )

    def incomplete_for(self, seconds: float) -> list[Command]:
        """The shell's watchdog: a client message has stayed incomplete for `seconds`.
        Its bytes are dropped and the connection ends (FATAL 08P01): a client that starts
        a huge message and never finishes it holds nothing for long."""
        if not self.partial_message:
            return []
        return self._run(
            self._end_fatal,
            "08P01",
            f"guard: a message stayed incomplete for {seconds:.0f} s; connection closed",
            f"message incomplete for {seconds:.0f} s",
        )

    # ============================================================== running and failing
    def _run(self, step: Callable[..., None], *args: Any) -> list[Command]:
        """Run one event's work and collect its commands (the hot events inline this)."""
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - see _failed: nothing escapes the core
            self._failed(exc)
        return self._flush()

    def _failed(self, exc: Exception) -> None:
        """Any exception ends the connection: a protocol error as the protocol says, any
        other (a bug) in the FAILED state."""
        if isinstance(exc, ProtocolError):
            self._protocol_error(exc)
        else:
            self._fail(exc)

    def _protocol_error(self, err: ProtocolError) -> None:
        if isinstance(err, ClientProtocolError):
            # A malformed message gets a FATAL ErrorResponse and the connection ends: a
            # framing error means we can no longer tell statements apart, so nothing more
            # may be forwarded.
            self._to_client.append(encode(err.to_error_response()))
            self._end(f"client protocol error: {err}")
        else:
            self._end_fatal(
                "08P01",
                "guard: the database sent a malformed message; connection closed",
                f"server protocol error: {err}",
            )

    def _fail(self, exc: Exception) -> None:
        """An internal error: nothing of this call leaves, the client gets FATAL, both end.

        Like h11's ERROR state: after an unexpected exception the connection's own state
        cannot be trusted, so it forwards nothing more in either direction.
        """
        self._to_server.clear()
        self._to_client.clear()
        self._blocking = None
        self._to_client.append(
            encode(
                m.ErrorResponse.build(
                    "XX000",
                    "guard: internal error in the gateway; the connection was closed",
                    severity="FATAL",
                    hint=f"report connection {self.gate.connection_id} to the guard operator",
                )
            )
        )
        self._close = f"internal error ({type(exc).__name__})"
        self._logs.append(
            Log(
                "error",
                f"internal error in connection {self.gate.connection_id} of session "
                f"{self.gate.session_id}; connection closed",
                exc,
            )
        )
        self.state = _FAILED

    def _end_fatal(self, sqlstate: str, message: str, reason: str, hint: str | None = None) -> None:
        """End the connection, telling the client why with a FATAL ErrorResponse."""
        fatal = m.ErrorResponse.build(sqlstate, message, severity="FATAL", hint=hint)
        self._to_client.append(encode(fatal))
        self._end(reason)

    def _end(self, reason: str) -> None:
        self._close = reason
        self._blocking = None
        self.state = _CLOSED

    def _queued(self) -> None:
        """RELAYING again: the client messages queued behind the pause, then a pending EOF."""
        fed = self._fed_while_paused
        if fed or self._backlog_pos < len(self._backlog) or self._backlog_error:
            self._fed_while_paused = False
            self._relay_client(fed)
        if self._eof_after_pause and self.state is _RELAYING:
            self._half_close()

    def _half_close(self) -> None:
        self._to_server.append(_TERMINATE)
        self.state = _HALF_CLOSED

    def _flush(self) -> list[Command]:  # noqa: C901 - the output in its order, inline: it runs per call
        """This call's output: log lines, then at most one write per direction (bulk rows
        excepted), then results to record, then the blocking command or the close."""
        blocking = self._blocking
        if blocking is not None and not (
            self._to_client or self._results or self._logs or (self._eager and self._to_server)
        ):
            self._blocking = None
            return [blocking]  # a statement paused for its record (the common pause)
        out: list[Command] = []
        if self._logs:
            out += self._logs
            self._logs = []
        declined = None
        if self._results:
            results, self._results = self._results, []
            recorder = self.result_recorder
            if recorder is None or not recorder(results):
                declined = RecordResults(results)
        # While an audit write is out the bytes for upstream wait for it: they join the
        # statement's own bytes in one write (they may go first, but need not; with a
        # shell that answers later they do). A held statement may wait for minutes: what
        # came before it goes now. Only bytes whose records are written are ever here.
        if self._to_server and (self.state is not _PAUSED or self._held is not None or self._eager):
            chunks, self._to_server = self._to_server, []
            out.append(_send_to_server(chunks[0] if len(chunks) == 1 else b"".join(chunks)))
        if self._to_client:
            chunks, self._to_client = self._to_client, []
            if len(chunks) == 1:
                out.append(_send_to_client(chunks[0]))
            else:
                joined = join_small(chunks, _JOIN_LIMIT)
                if joined is not None:
                    out.append(_send_to_client(joined))
                else:  # large row runs are written as they are, not copied into one buffer
                    out.extend(SendToClient(chunk) for chunk in chunks)
        if declined is not None:
            # After the writes: result records are after-the-fact bookkeeping (queued, and
            # written at the log's next flush), and the sink's way of queueing them when
            # its hot path declines flushes a full queue, a write of some 200 KB the
            # client's answer need not wait for.
            out.append(declined)
        if blocking is not None:
            out.append(blocking)  # always last: the shell answers it before more
            self._blocking = None
        elif self._close is not None:
            out.append(CloseConnection(self._close))
            self._close = None
        return out

    # ============================================================== pausing for the audit
    def _record(
        self,
        records: tuple[bytes, ...],
        then: Callable[[list[int] | None, Any, Any], None],
        a: Any,
        b: Any,
    ) -> None:
        """Have `records` written, then `then(seqs, a, b)`; seqs None: they could not be."""
        if not records:
            then([], a, b)
            return
        recorder = self.recorder
        if recorder is not None:
            seqs = recorder(records)
            if seqs is not None:  # written: the statement goes on without a pause
                then(seqs, a, b)
                return
        self._blocking = WriteAudit(records)
        self._continuation = (then, a, b)
        self.state = _PAUSED

    # ============================================================== client → server
    def _relay_client(self, fed: bool) -> None:  # noqa: C901 - the dispatch on the message type, inline: it runs per message
        """Handle the client messages framed and queued, then (if `fed`, there are new
        bytes) those the parser frames now, until the connection pauses or ends."""
        backlog, pos, error = self._backlog, self._backlog_pos, self._backlog_error
        drained = not fed
        while True:
            count = len(backlog)
            while pos < count:
                raw = backlog[pos]
                pos += 1
                tag = raw[0]
                if tag == TAG_BIND:
                    self._on_bind(raw)
                elif tag == TAG_EXECUTE:
                    self._on_execute(execute_portal(raw), raw)
                elif tag == TAG_SYNC:
                    self._to_server.append(raw)
                    self._pending.append(
                        [_SYNC, None, None, None, None, None, False, None, False, None]
                    )
                elif tag == TAG_QUERY:
                    self._on_query(raw)
                elif tag == TAG_PARSE:
                    self._on_parse(raw)
                elif tag == TAG_DESCRIBE:
                    self._on_describe(raw)
                elif tag == TAG_CLOSE:
                    kind, name = describe_target(raw, "Close")
                    undo = self.names.close(kind, name)
                    self._to_server.append(raw)
                    self._pending.append(_entry(_CLOSE, undo=undo))
                elif tag in (TAG_FLUSH, TAG_COPY_DATA, TAG_COPY_DONE, TAG_COPY_FAIL):
                    # Flush and COPY FROM STDIN payload: the COPY statement itself was gated.
                    self._to_server.append(raw)
                elif tag == TAG_FUNCTION_CALL:
                    self._on_function_call(raw)
                elif tag == TAG_TERMINATE:
                    self._to_server.append(raw)
                    self._end("client terminated")
                else:
                    # 'p' after authentication, or anything else out of place.
                    raise ClientProtocolError(
                        f"unexpected message type {chr(tag)!r} after authentication"
                    )
                if self.state is not _RELAYING:
                    self._backlog, self._backlog_pos, self._backlog_error = backlog, pos, error
                    if not drained:  # paused before new bytes were framed: they wait
                        self._fed_while_paused = True
                    return
            if error is not None:
                # Messages before a malformed one are acted on, as if they had come in an
                # earlier read; then the connection fails.
                raise error
            if drained:
                break
            backlog, error = self._frontend.drain()
            self._front_empty = self._frontend.buffered == 0
            pos, drained = 0, True
        self._backlog, self._backlog_pos, self._backlog_error = backlog, pos, error

    def _on_query(self, raw: Raw) -> None:
        if self.codec == "utf-8":
            sql = cstring_body(raw, "Query")
        else:
            sql = self._decode(decode_query, raw, "Query")
        decision = _decision(self.gate, self._decisions, self._shared, sql)
        if decision.forward_sql is not None:
            raw = self._rewritten_query(decision.forward_sql)
        records = decision.records.get("simple") or self.gate.statement_records(decision, "simple")
        if decision.hold is not None and self.holds:
            self._record(records, self._after_held_record, raw, (decision, None))
        else:
            self._record(records, self._after_query_record, raw, decision.refusal)

    def _on_bind(self, raw: Raw) -> None:
        portal_name, statement = bind_names(raw)
        prepared = self.names.statements.get(statement)
        formats: tuple[int, ...] = ()
        if self.protected and prepared is not None and prepared.decision.masked_columns:
            # Result formats matter only where rows may need masking: decode fully.
            formats = cast(m.Bind, decode_frontend(frame_of(raw))).result_formats
        undo = self.names.bind(portal_name, Portal(prepared, formats))
        self._to_server.append(raw)
        self._pending.append([_BIND, None, None, undo, None, None, False, None, False, None])

    def _on_describe(self, raw: Raw) -> None:
        kind, name = describe_target(raw, "Describe")
        self._to_server.append(raw)
        if kind == b"S":
            prepared = self.names.statements.get(name)
            self._pending.append(
                [_DESCRIBE, None, None, None, prepared, None, False, None, False, None]
            )
        else:
            # A portal nobody bound describes nothing: a placeholder keeps the FIFO.
            portal = self.names.portals.get(name) or Portal(None, ())
            self._pending.append(
                [_DESCRIBE, None, portal, None, None, None, False, None, False, None]
            )

    def _on_function_call(self, raw: Raw) -> None:
        # The fast-path FunctionCall names a function by OID and bypasses SQL analysis; its
        # callers are libpq's large-object functions, which the security contract refuses
        # whatever the policy (the call is still decided and recorded). Its response shape
        # (ErrorResponse + ReadyForQuery) matches a failed simple Query.
        call = cast(m.FunctionCall, decode_frontend(frame_of(raw)))
        decision = self.gate.fast_path(call.function_oid)
        records = self.gate.statement_records(decision, "fast-path")
        self._record(records, self._after_query_record, raw, decision.refusal)

    def _rewritten_query(self, sql: str) -> bytes:
        """A Query carrying `sql` (the gate's redirected text) in the client's encoding."""
        body = sql.encode(self.codec) + b"\x00"
        return b"Q" + (len(body) + 4).to_bytes(4, "big") + body

    def _rewritten_parse(self, raw: Raw, sql: str) -> bytes:
        """`raw` (a Parse already checked by the decoder) with its text replaced by `sql`:
        name and parameter types kept byte for byte."""
        body = bytes(raw[5:])
        name_end = body.index(b"\x00")
        text_end = body.index(b"\x00", name_end + 1)
        new = body[: name_end + 1] + sql.encode(self.codec) + body[text_end:]
        return b"P" + (len(new) + 4).to_bytes(4, "big") + new

    def _decode(self, decoder: Callable[[bytes, str], Any], raw: Raw, what: str) -> Any:
        try:
            return decoder(bytes(raw[5:]), self.codec)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientProtocolError(f"malformed {what} message: {exc}") from exc

    def _after_query_record(
        self, seqs: list[int] | None, raw: Raw, refusal: m.ErrorResponse | None
    ) -> None:
        if seqs is None:
            refusal = AUDIT_UNAVAILABLE  # a statement whose record does not exist must not run
        if refusal is None:
            self._to_server.append(raw)
            self._pending.append([_QUERY, seqs, None, None, None, None, False, None, False, None])
        else:
            self._to_server.append(encode(m.Query(_poison_sql())))
            self._pending.append(_entry(_QUERY, substitute=refusal))

    def _on_parse(self, raw: Raw) -> None:
        if self.codec == "utf-8":
            name, query = parse_statement(raw)
        else:
            # Only name and text matter to the gate; PostgreSQL validates the rest.
            name, query = self._decode(decode_parse, raw, "Parse")
        decision = _decision(self.gate, self._decisions, self._shared, query)
        # The steady state (a text forwarded as sent, no column to mask) has its records
        # at hand; anything else is refused, rewritten, or has them looked up.
        fixed = decision.extended_records
        if fixed is None:
            if decision.refusal is not None and (decision.hold is None or not self.holds):
                records = self.gate.statement_records(decision, "extended")
                self._record(records, self._after_parse_refusal_record, name, decision.refusal)
                return
            # Allowed: nothing runs at Parse; the audit record is written at each Execute.
            if decision.forward_sql is not None:
                raw = self._rewritten_parse(raw, decision.forward_sql)
            fixed = decision.records.get("extended")  # made once per decision (a frame less)
            if fixed is None:
                fixed = self.gate.statement_records(decision, "extended")
        prepared = Prepared(decision, fixed)
        undo = self.names.parse(name, prepared)
        self._to_server.append(raw)
        self._pending.append([_PARSE, None, None, undo, prepared, None, False, None, False, None])
        if self.protected and decision.masked_columns:
            # Learn the result columns' table OIDs now, so rows of an Execute the client
            # did not Describe are still checked against protected base columns.
            self._to_server.append(encode(m.Describe(b"S", name)))
            self._pending.append(_entry(_DESCRIBE, swallow=True, prepared=prepared))

    def _after_parse_refusal_record(
        self, seqs: list[int] | None, name: str, refusal: m.ErrorResponse
    ) -> None:
        # The name means nothing now: a later Bind of it is refused, never run unrecorded
        # (upstream may keep an older statement of that name; see NameTables).
        self.names.statements.pop(name, None)
        self._to_server.append(encode(m.Parse(name, _poison_sql(), ())))
        substitute = AUDIT_UNAVAILABLE if seqs is None else refusal
        self._pending.append(_entry(_PARSE, substitute=substitute))

    def _on_execute(self, portal_name: str, raw: Raw) -> None:
        portal = self.names.portals.get(portal_name)
        if portal is None or portal.prepared is None:
            # A portal guard did not see bound, or bound from a statement it did not see
            # parsed: one made by SQL PREPARE or DECLARE, or one upstream kept when a Parse
            # of its name failed. What it would run has no decision and no record here, so
            # it does not run (a poison Parse under a fresh name fails without side effects).
            self._to_server.append(encode(m.Parse(_poison_sql(), _poison_sql(), ())))
            refusal = m.ErrorResponse.build(
                "26000",
                f"guard: portal {portal_name!r} was not bound from a statement prepared "
                "through guard, so it cannot be executed",
            )
            self._pending.append(_entry(_PARSE, substitute=refusal))
            return
        decision = portal.prepared.decision
        if decision.hold is not None:  # only parsed if this connection holds (see _on_parse)
            self._record(portal.prepared.records, self._after_held_record, raw, (decision, portal))
        else:
            self._record(portal.prepared.records, self._after_execute_record, raw, portal)

    def _after_execute_record(self, seqs: list[int] | None, raw: Raw, portal: Portal) -> None:
        if seqs is None:
            # Audit unavailable: refuse this Execute in-band. A syntax-error Parse of the
            # unnamed statement puts upstream into error-until-Sync like a failed Execute.
            self._to_server.append(encode(m.Parse("", _poison_sql(), ())))
            self._pending.append(_entry(_PARSE, substitute=AUDIT_UNAVAILABLE))
            return
        self._to_server.append(raw)
        # The mask plan is worked out at the first row: the Describe responses that tell
        # the result columns' origins arrive (in order) before it, not before this point.
        self._pending.append([_EXECUTE, seqs, portal, None, None, None, False, None, False, None])

    # ============================================================== server → client
    # ============================================================== holding for approval
    def _after_held_record(
        self, seqs: list[int] | None, raw: Raw, held: tuple[Decision, Portal | None]
    ) -> None:
        """The record of a statement that needs approval is written: hold it."""
        decision, portal = held
        if seqs is None:  # no record, no request: refused like any unrecorded statement
            if portal is None:
                self._after_query_record(None, raw, None)
            else:
                self._after_execute_record(None, raw, portal)
            return
        verdict = decision.hold
        assert verdict is not None and verdict.approval is not None
        request_id = secrets.token_hex(6)  # also the key of the request in the store
        groups = ", ".join(sorted(verdict.approval.approver_groups))
        self._to_client.append(
            encode(
                m.NoticeResponse.build(
                    "01000",
                    f"guard: {verdict.message.removeprefix('guard: ')}; request {request_id} "
                    "is waiting for a decision",
                    hint=f"a member of {groups} approves it with: guard approve {request_id}",
                )
            )
        )
        self._held = _Held(request_id, raw, portal, seqs)
        protocol = "simple" if portal is None else "extended"
        self._blocking = RequestApproval(request_id, decision, protocol, seqs)
        self.state = _PAUSED

    def _settle(self, held: _Held, event: ApprovalDecided) -> None:
        if not event.approved:
            self._held = None
            error = event.error or m.ErrorResponse.build(
                "42501", f"guard: request {held.request_id} was not approved"
            )
            if held.portal is None:
                self._to_server.append(encode(m.Query(_poison_sql())))
                self._pending.append(_entry(_QUERY, substitute=error))
            else:  # the unnamed statement's poison puts upstream into error-until-Sync
                self._to_server.append(encode(m.Parse("", _poison_sql(), ())))
                self._pending.append(_entry(_PARSE, substitute=error))
            self.state = _RELAYING
            self._queued()
            return
        if held.portal is None:
            entry = _entry(_QUERY, held.seqs)
            self._to_server.append(held.raw)
        else:
            entry = _entry(_EXECUTE, held.seqs, held.portal)
            # The client's Sync is still queued behind the Execute: a Flush makes
            # PostgreSQL send the result now, so the statement's end can be seen.
            self._to_server.append(held.raw)
            self._to_server.append(_FLUSH)
        self._pending.append(entry)
        if event.per_statement:
            entry[_APPROVAL] = held.request_id
            held.running = True  # still PAUSED: the queue waits for the grant's end
        else:
            self._held = None
            self.state = _RELAYING
            self._queued()

    def _approval_done(self, entry: Pending) -> None:
        """The approved statement completed: its grant must go before anything else runs."""
        assert entry[_APPROVAL] is not None
        self._blocking = EndApproval(entry[_APPROVAL])

    def _on_server_message(self, tag: int, raw: Raw) -> None:
        """The server messages `from_server` does not handle inline."""
        pending = self._pending
        head = pending[0] if pending else None
        if tag == TAG_ROW_DESCRIPTION:
            self._on_row_description(raw, head)
        elif tag == TAG_ERROR_RESPONSE:
            self._on_error(raw, head)
        elif tag == TAG_PARAMETER_DESCRIPTION:
            if head is None or head[_KIND] is not _DESCRIBE or not head[_SWALLOW]:
                self._to_client.append(raw)
        elif tag == TAG_NO_DATA:
            if head is not None and head[_KIND] is _DESCRIBE:
                pending.popleft()
                if head[_SWALLOW]:
                    return
            self._to_client.append(raw)
        elif tag == TAG_PARAMETER_STATUS:
            self._on_parameter_status(raw)
        elif tag == TAG_COPY_BOTH_RESPONSE:
            # CopyBoth only exists for replication, which sessions may not use.
            self._end_fatal(
                "42501",
                "guard: replication streams are not allowed through guard",
                "CopyBothResponse refused",
            )
        else:
            # CopyIn/OutResponse, CopyDone, notices, notifications, FunctionCallResponse,
            # NegotiateProtocolVersion: forwarded as they are.
            self._to_client.append(raw)

    def _on_complete(self, tag: int, raw: Raw) -> None:
        """CommandComplete, EmptyQueryResponse or PortalSuspended: one statement is done."""
        self._plan = None
        pending = self._pending
        if pending:
            head = pending[0]
            seqs = head[_SEQS]
            if seqs:
                seq = seqs.pop(0)
                if tag == TAG_COMMAND_COMPLETE:
                    # A statement run again completes with the same tag: read each once.
                    key = bytes(raw)
                    done = self._tags.get(key)
                    if done is None:
                        if len(self._tags) >= _TAG_CACHE_SIZE:
                            self._tags.clear()  # row counts vary: keep it bounded
                        text = cstring_body(raw, "CommandComplete")
                        done = self._tags[key] = (text.split(" ", 1)[0], _rows_from_tag(text))
                    view_masked = self._view_masked
                    if head[_KIND] is _EXECUTE and head[_PORTAL] is not None:
                        view_masked = _view_masked_of(head[_PORTAL])
                    self._result(seq, "ok", done[0], done[1], None, view_masked)
                elif tag == TAG_PORTAL_SUSPENDED:
                    # The row limit was reached; a later Execute of the portal gets a
                    # record of its own.
                    self._result(seq, "suspended", "", None, None)
                # EmptyQueryResponse: nothing ran, nothing to count.
            if head[_KIND] is _EXECUTE:
                pending.popleft()
                if head[_APPROVAL] is not None:
                    self._approval_done(head)
        self._masked_cells = 0
        self._view_masked = 0
        self._to_client.append(raw)

    def _result(
        self,
        seq: int,
        outcome: str,
        command_tag: str,
        rows: int | None,
        sqlstate: str | None,
        view_masked: int = 0,
    ) -> None:
        """Queue a result record (values in `audit.record.RESULT_FIELDS` order)."""
        cells = rows * view_masked if rows and view_masked else 0
        unmasked = self._unmasked
        self._results.append(
            (
                self._session_id,
                self._connection_id,
                seq,
                outcome,
                command_tag,
                rows,
                self._masked_cells,
                sqlstate,
                0 if unmasked else cells,
                cells if unmasked else 0,
            )
        )

    def _on_parameter_status(self, raw: Raw) -> None:
        msg = decode_backend(frame_of(raw))
        assert isinstance(msg, m.ParameterStatus)
        if msg.name == "client_encoding":
            codec = codec_for(msg.value)
            if codec is None:
                # Refused before any statement is read in it (see proxy.encoding).
                self._end_fatal(
                    "0A000",
                    f"guard: client_encoding {msg.value} is not supported; "
                    "use UTF8 (or a single-byte encoding)",
                    f"unsupported client_encoding {msg.value}",
                )
                return
            self.codec = codec
        if msg.name == "session_authorization":
            # The issued database role name stays on the broker side; the client sees the
            # session user it logged in with.
            self._to_client.append(encode(m.ParameterStatus(msg.name, self.client_user)))
        else:
            self._to_client.append(raw)

    def _on_row_description(self, raw: Raw, head: Pending | None) -> None:
        if head is not None and head[_KIND] is _DESCRIBE:
            self._pending.popleft()
            if self.protected:
                # The statement or portal the name meant when the Describe was sent: the
                # name may have been parsed or bound again since (the unnamed one, freely).
                description = self._describe(raw)
                if head[_PORTAL] is not None:
                    head[_PORTAL].description = description
                elif head[_PREPARED] is not None:
                    head[_PREPARED].description = description
            if head[_SWALLOW]:
                return
        elif self.protected:
            # Simple query (or Execute of a portal): rows that follow use these formats.
            description = self._describe(raw)
            self._view_masked = description.view_masked
            self._plan = self._plan_of(description, None)
            if self._plan and not self._drift_logged:
                # Once per connection: a drifted database would otherwise put a line in the
                # operator log for every statement (thousands a second, and ~80k
                # instructions each). Every occurrence is still in the audit records
                # (`masked_cells` of each result).
                self._drift_logged = True
                self._logs.append(
                    Log(
                        "warning",
                        f"protected base column in a result stream (session "
                        f"{self.gate.session_id}): the database masking objects may have "
                        "drifted; masking in the gateway (said once per connection; the "
                        "audit counts every masked cell)",
                    )
                )
        self._to_client.append(raw)

    def _on_error(self, raw: Raw, head: Pending | None) -> None:
        self._plan = None
        error = decode_backend(frame_of(raw))
        assert isinstance(error, m.ErrorResponse)
        if head is not None and head[_SEQS]:
            self._result(head[_SEQS].pop(0), "error", "", None, error.sqlstate)
        if head is not None and head[_SUBSTITUTE] is not None:
            self._to_client.append(encode(head[_SUBSTITUTE]))
        else:
            self._to_client.append(raw)
        if error.severity in ("FATAL", "PANIC"):
            self._end("upstream closed the session")
            return
        if head is None:
            return
        if head[_KIND] is _QUERY:  # a refused fast-path call is answered as a query
            if head[_SEQS]:
                head[_SEQS].clear()  # the rest of a multi-statement string does not run
            return
        self._skip_to_sync(head)

    def _skip_to_sync(self, failed: Pending) -> None:
        """Extended protocol: upstream discards everything until Sync; so do we, and the
        name changes of the failed message and of those skipped do not take effect."""
        pending = self._pending
        skipped = []
        while pending and pending[0][_KIND] is not _SYNC:
            entry = pending.popleft()
            if entry[_APPROVAL] is not None:
                self._approval_done(entry)
            skipped.append(entry)
        for entry in reversed(skipped):
            if entry[_UNDO] is not None:
                self.names.rollback(entry[_UNDO])
        if failed[_UNDO] is not None and failed[_KIND] is not _CLOSE:
            # The failed message itself: a Parse or Bind of the unnamed statement or portal
            # drops the old one upstream before it parses or binds, so there is none now
            # (after a failed Bind PostgreSQL may or may not have dropped it: none is the
            # answer that fails closed).
            self.names.forget_unnamed(failed[_UNDO])

    # ============================================================== masking
    def _execute_plan(self, head: Pending) -> MaskPlan | None:
        if head[_KIND] is not _EXECUTE:
            return None
        if not head[_PLANNED]:
            head[_PLANNED] = True
            head[_PLAN] = self._portal_plan(head[_PORTAL])
        plan: MaskPlan | None = head[_PLAN]
        return plan

    def _portal_plan(self, portal: Portal) -> MaskPlan | None:
        """The mask plan of the rows an Execute of `portal` returns."""
        if portal.description is not None:
            # A portal's RowDescription carries the real result formats.
            return self._plan_of(portal.description, None)
        if portal.prepared is not None and portal.prepared.description is not None:
            return self._plan_of(portal.prepared.description, portal.formats)
        return None

    def _describe(self, raw: Raw) -> Description:
        # (Framed RowDescriptions are bytes already; the compiled core calls bytes() as a
        # type, not for free.)
        key = raw if raw.__class__ is bytes else bytes(raw)
        description = self._described.get(key)
        if description is None:
            decoded = decode_backend(frame_of(raw))
            assert isinstance(decoded, m.RowDescription)
            view = self._view_columns
            counted = (
                sum((f.table_oid, f.column_attnum) in view for f in decoded.fields) if view else 0
            )
            description = Description(decoded.fields, counted)
            self._described_bytes += len(key)
            if (
                len(self._described) >= _DESCRIBED_CACHE_SIZE
                or self._described_bytes > _DESCRIBED_CACHE_BYTES
            ):
                # Bounded in entries and in bytes (a RowDescription of 1,600 long column
                # names is ~100 KB); statements and portals keep their own.
                self._described.clear()
                self._described_bytes = len(key)
            self._described[key] = description
        return description

    def _plan_of(
        self, description: Description, formats: tuple[int, ...] | None
    ) -> MaskPlan | None:
        """Mask plan for a RowDescription; `formats` None: the description's own formats."""
        plans = description.plans
        if formats in plans:
            return plans[formats]
        fields = description.fields
        codes = tuple(f.format_code for f in fields) if formats is None else formats
        if len(plans) >= _PLANS_PER_DESCRIPTION:
            plans.clear()  # result formats come from the client: keep this bounded too
        plan = plans[formats] = _plan_for(fields, codes, self.protected)
        return plan

    def _mask_rows(self, run: Raw, plan: MaskPlan) -> None:
        """Mask a run of DataRows (drain() framed each; split them again here). The rows
        before a malformed one are masked and relayed, then its error is raised."""
        to_client = self._to_client
        rows, fault = data_rows(run)
        for row in rows:
            values = list(row)
            for index, strategy, fmt, type_oid in plan:
                value = values[index] if index < len(values) else None
                if value is None:
                    continue
                values[index] = (
                    strategy.mask_binary(type_oid, value) if fmt == 1 else strategy.mask_text(value)
                )
                self._masked_cells += 1
            to_client.append(data_row(values))
        if fault is not None:
            decode_backend(frame_of(fault))  # raises the row's error (the reference's)
            raise AssertionError("a DataRow split as malformed decodes")  # never relayed


def _plan_for(
    fields: tuple[m.FieldDescription, ...], formats: tuple[int, ...], protected: ProtectedMap
) -> MaskPlan | None:
    """Which result columns are protected base columns, with their mask and format."""
    if not protected or not fields:
        return None
    plan = []
    for index, f in enumerate(fields):
        strategy = protected.get((f.table_oid, f.column_attnum))
        if strategy is None:
            continue
        if not formats:
            fmt = 0
        elif len(formats) == 1:
            fmt = formats[0]
        else:
            fmt = formats[index] if index < len(formats) else 0
        plan.append((index, strategy, fmt, f.type_oid))
    return tuple(plan) or None


def _view_masked_of(portal: Portal) -> int:
    """Masked view columns of a portal's result (its own description, else its statement's)."""
    description = portal.description
    if description is None and portal.prepared is not None:
        description = portal.prepared.description
    return description.view_masked if description is not None else 0


def _rows_from_tag(tag: str) -> int | None:
    last = tag.rsplit(" ", 1)[-1]
    # isdigit() alone admits "²", which int() refuses: a server's odd tag must not crash.
    return int(last) if last.isascii() and last.isdigit() else None


def _poison_sql() -> str:
    return f"guard_refused_{secrets.token_hex(4)}"
