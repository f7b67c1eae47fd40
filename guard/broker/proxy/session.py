"""One proxied connection after authentication: the sans-IO relay state machine.

No asyncio, no sockets: `from_client(bytes)` and `from_server(bytes)` return the commands
the shell must execute, in order. Every statement-bearing client message (Query, Parse,
FunctionCall) goes through `proxy.gate` before anything is forwarded; every result row is
checked against the protected-column map before it is sent to the client.

How a refusal keeps PostgreSQL's exact semantics: instead of answering locally (which would
leave the upstream transaction and a pipelined batch in a state the client does not expect),
the refused message is replaced by a *poison* message whose only effect upstream is a syntax
error (`guard_refused_<nonce>`). PostgreSQL then aborts the transaction / skips to Sync just
as it would have for a real error, and the gateway swaps that one ErrorResponse for the
refusal. The poison text is chosen by the gateway, never by the client.

Responses are matched to requests with a FIFO of `_Pending` entries (PostgreSQL answers in
order), which is also how result row counts reach the audit record of their statement.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from guard.broker.masking.strategies import Strategy
from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode
from guard.broker.pgwire.errors import ClientProtocolError, ProtocolError
from guard.broker.pgwire.parser import (
    BackendParser,
    FrontendParser,
    bind_names,
    cstring_body,
    decode_backend,
    decode_frontend,
    describe_target,
    execute_portal,
    frame_of,
    parse_statement,
)
from guard.broker.proxy.commands import CloseConnection, Command, SendToClient, SendToServer
from guard.broker.proxy.encoding import codec_for, decode_parse, decode_query
from guard.broker.proxy.gate import Decision, Gate

log = logging.getLogger("guard.proxy")
_UNPACK_LENGTH = struct.Struct("!i").unpack_from

_Q, _P, _B, _D, _E, _C, _S, _H, _X, _F = (ord(c) for c in "QPBDECSHXF")
_COPY_DATA, _COPY_DONE, _COPY_FAIL = ord("d"), ord("c"), ord("f")
_PASSWORD = ord("p")

_ROW_DESCRIPTION, _DATA_ROW, _COMMAND_COMPLETE = ord("T"), ord("D"), ord("C")
_READY, _ERROR, _EMPTY = ord("Z"), ord("E"), ord("I")
_PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE = ord("1"), ord("2"), ord("3")
_NO_DATA, _PARAM_DESC, _PORTAL_SUSPENDED = ord("n"), ord("t"), ord("s")
_PARAMETER_STATUS, _COPY_BOTH = ord("S"), ord("W")

# Below this many bytes one call's output is joined into one write; above it (bulk rows)
# the slices are written as they are rather than copied.
_JOIN_LIMIT = 1 << 16
_PLAN_CACHE_SIZE = 256
_DESCRIBED_CACHE_BYTES = 1 << 20
_MAX_PORTALS = 4096

# (table OID, attribute number) of a protected base column → its mask strategy.
ProtectedMap = Mapping[tuple[int, int], Strategy]
# Per protected result column: (column index, strategy, format code, type OID).
MaskPlan = tuple[tuple[int, Strategy, int, int], ...]


class _Pending:
    """One forwarded request still waiting for its response(s)."""

    # A plain slotted class: one is built per forwarded message (hot path).
    __slots__ = (
        "kind",
        "swallow",
        "substitute",
        "statement",
        "portal",
        "seqs",
        "formats",
        "plan",
        "planned",
        "prepared",
    )

    def __init__(
        self,
        kind: str,  # query | parse | bind | describe | execute | close | sync
        *,
        swallow: bool = False,  # responses are the gateway's own (injected Describe)
        substitute: m.ErrorResponse | None = None,  # poison: replace the upstream error
        statement: str | None = None,  # parse/describe: statement name
        portal: str | None = None,  # describe of a portal / execute: portal name
        seqs: list[int] | None = None,  # audit seqs awaiting a result record
        formats: tuple[int, ...] = (),  # execute: result formats from Bind
        prepared: _Prepared | None = None,  # parse/describe/execute: the statement concerned
    ) -> None:
        self.kind = kind
        self.swallow = swallow
        self.substitute = substitute
        self.statement = statement
        self.portal = portal
        self.seqs = seqs
        self.formats = formats
        self.prepared = prepared
        self.plan: MaskPlan | None = None  # execute: mask plan, worked out at its first row
        self.planned = False


# Entries with no state of their own: one shared instance each (one per message otherwise).
_BIND, _CLOSE, _SYNC = _Pending("bind"), _Pending("close"), _Pending("sync")


@dataclass(slots=True)
class _Prepared:
    decision: Decision
    fields: tuple[m.FieldDescription, ...] | None = None  # from a Describe of the statement


class ProxyConnection:
    """Relay between one client and its own upstream backend, gated and masked."""

    def __init__(
        self,
        gate: Gate,
        *,
        protected: ProtectedMap,
        client_user: str,
        max_message_size: int | None = None,
        client_encoding: str = "UTF8",
    ) -> None:
        self.gate = gate
        # Statement text is decoded as PostgreSQL will read it (see proxy.encoding).
        self.codec = codec_for(client_encoding) or "utf-8"
        self.protected = protected
        self.client_user = client_user
        kwargs = {"max_message_size": max_message_size} if max_message_size else {}
        self._client = FrontendParser(expect_startup=False, **kwargs)
        self._server = BackendParser(**kwargs)
        self._pending: deque[_Pending] = deque()
        self._prepared: dict[str, _Prepared] = {}
        # portal → (the statement it was bound from, or None if guard never saw it parsed;
        # result formats). Upstream keeps a portal's statement even if the name is closed
        # or parsed again, so the Execute is decided and recorded as what it runs.
        self._portals: dict[str, tuple[_Prepared | None, tuple[int, ...]]] = {}
        self._portal_fields: dict[str, tuple[m.FieldDescription, ...]] = {}
        # What each forwarded Parse, Bind and Close changed in the name tables above, oldest
        # first, until PostgreSQL answers it: (table, name, value before) per change. When
        # a pipeline fails, PostgreSQL skips everything up to Sync, so the names those
        # messages would have changed keep their old meaning; undoing the entries keeps
        # every later Execute decided, masked and recorded as what actually runs.
        self._journal: deque[tuple[tuple[dict, str, object], ...]] = deque()
        self._plan: MaskPlan | None = None  # simple query: active row mask plan
        # A statement run again describes its result with the same RowDescription bytes:
        # decode each once, and work out each (fields, formats) mask plan once (bounded).
        self._described: dict[bytes, tuple[m.FieldDescription, ...]] = {}
        self._described_bytes = 0
        self._plans: dict[
            tuple[int, tuple[int, ...] | None],
            tuple[tuple[m.FieldDescription, ...], MaskPlan | None],
        ] = {}
        self._masked_cells = 0
        self.closed = False
        self.transaction_status = b"I"
        # What one from_client/from_server call produces, joined into few writes.
        self._to_server: list[bytes | memoryview] = []
        self._to_client: list[bytes | memoryview] = []
        self._close: str | None = None

    # ------------------------------------------------------------------ client → server
    def from_client(self, data: bytes) -> list[Command]:
        client = self._client
        client.feed(data)
        try:
            messages, error = client.drain()
            for raw in messages:
                if self.closed:
                    break
                self._on_client_message(raw[0], raw)
            if error is not None and not self.closed:
                raise error
        except ProtocolError as err:
            # A malformed message gets a FATAL ErrorResponse and the connection ends: a
            # framing error means we can no longer tell statements apart, so nothing more
            # may be forwarded.
            self._to_client.append(encode(err.to_error_response()))
            self._end(f"client protocol error: {err}")
        return self._commands()

    def _end(self, reason: str) -> None:
        self._close = reason
        self.closed = True

    def _commands(self) -> list[Command]:
        """This call's output: at most one write per direction (bulk rows excepted)."""
        out: list[Command] = []
        if self._to_server:
            chunks, self._to_server = self._to_server, []
            out.append(SendToServer(chunks[0] if len(chunks) == 1 else b"".join(chunks)))
        if self._to_client:
            chunks, self._to_client = self._to_client, []
            if len(chunks) == 1:
                out.append(SendToClient(chunks[0]))
            elif sum(map(len, chunks)) <= _JOIN_LIMIT:
                out.append(SendToClient(b"".join(chunks)))
            else:  # large row runs are written as they are, not copied into one buffer
                out.extend(SendToClient(chunk) for chunk in chunks)
        if self._close is not None:
            out.append(CloseConnection(self._close))
            self._close = None
        return out

    def _on_client_message(self, tag: int, raw: memoryview) -> None:  # noqa: C901 - a dispatch
        if tag == _Q:
            if self.codec == "utf-8":
                sql = cstring_body(raw, "Query")
            else:
                sql = self._decode(decode_query, raw, "Query")
            self._gate_statement(sql, raw)
        elif tag == _P:
            if self.codec == "utf-8":
                name, query = parse_statement(raw)
            else:
                # Only name and text matter to the gate; PostgreSQL validates the rest.
                name, query = self._decode(decode_parse, raw, "Parse")
            self._on_parse(name, query, raw)
        elif tag == _B:
            portal, statement = bind_names(raw)
            prepared = self._prepared.get(statement)
            formats: tuple[int, ...] = ()
            if self.protected and prepared is not None and prepared.decision.masked_columns:
                # Result formats matter only where rows may need masking: decode fully.
                formats = decode_frontend(frame_of(raw)).result_formats
            portals, portal_fields = self._portals, self._portal_fields
            self._journal.append(
                (
                    (portals, portal, portals.pop(portal, _GONE)),  # re-bound: now the newest
                    (portal_fields, portal, portal_fields.pop(portal, _GONE)),
                )
            )
            portals[portal] = (prepared, formats)
            if len(self._portals) > _MAX_PORTALS:
                # Portal names come from the client and upstream drops them only at
                # transaction end, which pipelining hides from this side: forget the
                # oldest. Executing a forgotten portal is refused (26000), never unrecorded.
                oldest = next(iter(self._portals))
                del self._portals[oldest]
                self._portal_fields.pop(oldest, None)
            self._to_server.append(raw)
            self._pending.append(_BIND)
        elif tag == _E:
            self._on_execute(execute_portal(raw), raw)
        elif tag == _D:
            kind, name = describe_target(raw, "Describe")
            self._to_server.append(raw)
            if kind == b"S":
                self._pending.append(
                    _Pending("describe", statement=name, prepared=self._prepared.get(name))
                )
            else:
                self._pending.append(_Pending("describe", portal=name))
        elif tag == _C:
            kind, name = describe_target(raw, "Close")
            table = self._prepared if kind == b"S" else self._portals
            self._journal.append(((table, name, table.pop(name, _GONE)),))
            self._to_server.append(raw)
            self._pending.append(_CLOSE)
        elif tag == _S:
            self._to_server.append(raw)
            self._pending.append(_SYNC)
        elif tag in (_H, _COPY_DATA, _COPY_DONE, _COPY_FAIL):
            # Flush and COPY FROM STDIN payload: the COPY statement itself was gated.
            self._to_server.append(raw)
        elif tag == _F:
            self._refuse_fast_path(decode_frontend(frame_of(raw)).function_oid)
        elif tag == _X:
            self._to_server.append(raw)
            self._end("client terminated")
        else:
            # 'p' after authentication, or anything else out of place.
            raise _unexpected(tag)

    def _decode(self, decoder, raw: memoryview, what: str):
        try:
            return decoder(bytes(raw[5:]), self.codec)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientProtocolError(f"malformed {what} message: {exc}") from exc

    def _gate_statement(self, sql: str, raw) -> None:
        decision = self.gate.decide(sql)
        recorded = self.gate.record(decision, "simple")
        refusal = decision.refusal
        if recorded.__class__ is m.ErrorResponse:
            refusal, recorded = recorded, None
        if refusal is None:
            self._to_server.append(raw)
            self._pending.append(_Pending("query", seqs=recorded))  # type: ignore[arg-type]
        else:
            self._send_poison_query(refusal)

    def _send_poison_query(self, refusal: m.ErrorResponse) -> None:
        self._to_server.append(encode(m.Query(_poison_sql())))
        self._pending.append(_Pending("query", substitute=refusal))

    def _refuse_fast_path(self, function_oid: int) -> None:
        # The fast-path FunctionCall names a function by OID and bypasses SQL analysis; its
        # callers are libpq's large-object functions, which the security contract refuses
        # whatever the policy, so no policy can allow it (the call is still decided and
        # recorded). Its response shape (ErrorResponse + ReadyForQuery) matches a failed
        # simple Query.
        self._send_poison_query(self.gate.refuse_fast_path(function_oid))

    def _on_parse(self, name: str, query: str, raw) -> None:
        decision = self.gate.decide(query)
        if decision.refusal is not None:
            recorded = self.gate.record(decision, "extended")
            refusal = recorded if isinstance(recorded, m.ErrorResponse) else decision.refusal
            self._prepared.pop(name, None)
            poison = m.Parse(name, _poison_sql(), ())
            self._to_server.append(encode(poison))
            self._pending.append(_Pending("parse", substitute=refusal))
            return
        # Allowed: nothing runs at Parse; the audit record is written at each Execute.
        self._journal.append(((self._prepared, name, self._prepared.get(name, _GONE)),))
        prepared = self._prepared[name] = _Prepared(decision)
        self._to_server.append(raw)
        self._pending.append(_Pending("parse", statement=name, prepared=prepared))
        if self.protected and decision.masked_columns:
            # Learn the result columns' table OIDs now, so rows of an Execute the client
            # did not Describe are still checked against protected base columns.
            self._to_server.append(encode(m.Describe(b"S", name)))
            self._pending.append(
                _Pending("describe", swallow=True, statement=name, prepared=prepared)
            )

    def _on_execute(self, portal: str, raw) -> None:
        prepared, formats = self._portals.get(portal, (None, ()))
        if prepared is None:
            # A portal guard did not see bound, or bound from a statement it did not see
            # parsed: one made by SQL PREPARE or DECLARE, or one upstream kept when a Parse
            # of its name failed. What it would run has no decision and no record here, so
            # it does not run (a poison Parse under a fresh name fails without side effects).
            self._to_server.append(encode(m.Parse(_poison_sql(), _poison_sql(), ())))
            refusal = m.ErrorResponse.build(
                "26000",
                f"guard: portal {portal!r} was not bound from a statement prepared through "
                "guard, so it cannot be executed",
            )
            self._pending.append(_Pending("parse", substitute=refusal))
            return
        recorded = self.gate.record(prepared.decision, "extended")
        if isinstance(recorded, m.ErrorResponse):
            # Audit unavailable: refuse this Execute in-band. A syntax-error Parse of the
            # unnamed statement puts upstream into error-until-Sync like a failed Execute.
            self._to_server.append(encode(m.Parse("", _poison_sql(), ())))
            self._pending.append(_Pending("parse", substitute=recorded))
            return
        self._to_server.append(raw)
        # The mask plan is worked out at the first row: the Describe responses that tell
        # the result columns' origins arrive (in order) before it, not before this point.
        self._pending.append(
            _Pending("execute", portal=portal, seqs=recorded, formats=formats, prepared=prepared)
        )

    # ------------------------------------------------------------------ server → client
    def from_server(self, data: bytes) -> list[Command]:
        server = self._server
        server.feed(data)
        to_client = self._to_client
        try:
            messages, error = server.drain()
            for raw in messages:
                if self.closed:
                    break
                tag = raw[0]
                if tag == _DATA_ROW:  # a run of rows
                    plan = self._plan
                    if plan is None and self.protected and self._pending:
                        plan = self._execute_plan(self._pending[0])
                    if plan:
                        self._mask_rows(raw, plan)
                    else:
                        # Bulk path: rows that need no masking go out as one slice, undecoded.
                        to_client.append(raw)
                elif tag == _COPY_DATA:
                    # COPY TO STDOUT data (a run of it): the COPY statement was gated, and
                    # its rows cannot be tied to table OIDs (protected tables are COPY-able
                    # only as masking views, which PostgreSQL refuses to COPY directly).
                    to_client.append(raw)
                else:
                    self._on_server_message(tag, raw)
            if error is not None and not self.closed:
                raise error
        except ProtocolError as err:
            to_client.append(
                encode(
                    m.ErrorResponse.build(
                        "08P01",
                        "guard: the database sent a malformed message; connection closed",
                        severity="FATAL",
                    )
                )
            )
            self._end(f"server protocol error: {err}")
        return self._commands()

    def _on_server_message(self, tag: int, raw: memoryview) -> None:  # noqa: C901 - a dispatch
        pending = self._pending
        head = pending[0] if pending else None
        if tag == _COMMAND_COMPLETE or tag == _EMPTY or tag == _PORTAL_SUSPENDED:
            self._plan = None
            if head is not None:
                seqs = head.seqs
                if seqs:
                    if tag == _COMMAND_COMPLETE:
                        tag_text = cstring_body(raw, "CommandComplete")
                        self.gate.record_result(
                            seqs.pop(0),
                            outcome="ok",
                            command_tag=tag_text.split(" ", 1)[0],
                            rows=_rows_from_tag(tag_text),
                            masked_cells=self._masked_cells,
                        )
                    elif tag == _PORTAL_SUSPENDED:
                        # The row limit was reached; a later Execute of the portal gets a
                        # record of its own.
                        self.gate.record_result(
                            seqs.pop(0), outcome="suspended", masked_cells=self._masked_cells
                        )
                    else:  # EmptyQueryResponse: nothing ran
                        seqs.pop(0)
                if head.kind == "execute":
                    pending.popleft()
            self._masked_cells = 0
            self._to_client.append(raw)
        elif tag == _READY:
            self._plan = None
            # Everything up to and including the matching Query/Sync is answered.
            while pending:
                entry = pending.popleft()
                if _journaled(entry) and self._journal:
                    self._journal.popleft()  # never answered (a server out of step): it stands
                kind = entry.kind
                if kind == "query" or kind == "sync":
                    break
            self.transaction_status = bytes(raw[5:6])
            self._to_client.append(raw)
        elif tag == _ROW_DESCRIPTION:
            self._on_row_description(raw, head)
        elif tag == _ERROR:
            self._on_error(raw, head)
        elif tag == _PARSE_COMPLETE or tag == _BIND_COMPLETE or tag == _CLOSE_COMPLETE:
            if head is not None and head.kind in ("parse", "bind", "close"):
                pending.popleft()
                if _journaled(head) and self._journal:
                    self._journal.popleft()  # done upstream: the change stands
                if head.swallow:
                    return
            self._to_client.append(raw)
        elif tag == _PARAM_DESC:
            if head is not None and head.kind == "describe" and head.swallow:
                return
            self._to_client.append(raw)
        elif tag == _NO_DATA:
            if head is not None and head.kind == "describe":
                pending.popleft()
                if head.swallow:
                    return
            self._to_client.append(raw)
        elif tag == _PARAMETER_STATUS:
            self._on_parameter_status(raw)
        elif tag == _COPY_BOTH:
            # CopyBoth only exists for replication, which sessions may not use.
            self._to_client.append(
                encode(
                    m.ErrorResponse.build(
                        "42501",
                        "guard: replication streams are not allowed through guard",
                        severity="FATAL",
                    )
                )
            )
            self._end("CopyBothResponse refused")
        else:
            # CopyIn/OutResponse, CopyDone, notices, notifications, FunctionCallResponse,
            # NegotiateProtocolVersion: forwarded as they are.
            self._to_client.append(raw)

    def _on_parameter_status(self, raw: memoryview) -> None:
        msg = decode_backend(frame_of(raw))
        if msg.name == "client_encoding":
            codec = codec_for(msg.value)
            if codec is None:
                # Refused before any statement is read in it (see proxy.encoding).
                self._to_client.append(
                    encode(
                        m.ErrorResponse.build(
                            "0A000",
                            f"guard: client_encoding {msg.value} is not supported; "
                            "use UTF8 (or a single-byte encoding)",
                            severity="FATAL",
                        )
                    )
                )
                self._end(f"unsupported client_encoding {msg.value}")
                return
            self.codec = codec
        if msg.name == "session_authorization":
            # The issued database role name stays on the broker side; the client sees the
            # session user it logged in with.
            self._to_client.append(encode(m.ParameterStatus(msg.name, self.client_user)))
        else:
            self._to_client.append(raw)

    def _on_row_description(self, raw: memoryview, head: _Pending | None) -> None:
        if head is not None and head.kind == "describe":
            self._pending.popleft()
            if self.protected:
                fields = self._fields(raw)
                if head.portal is not None:
                    self._portal_fields[head.portal] = fields
                elif head.prepared is not None:
                    # The statement the name meant when the Describe was sent: the name may
                    # have been parsed again since (the unnamed one, freely).
                    head.prepared.fields = fields
            if head.swallow:
                return
        elif self.protected:
            # Simple query (or Execute of a portal): rows that follow use these formats.
            self._plan = self._plan_of(self._fields(raw))
            if self._plan:
                log.warning(
                    "protected base column in a result stream (session %s): the database "
                    "masking objects may have drifted; masking in the gateway",
                    self.gate.session_id,
                )
        self._to_client.append(raw)

    def _on_error(self, raw: memoryview, head: _Pending | None) -> None:
        self._plan = None
        error = decode_backend(frame_of(raw))
        if head is not None and head.seqs:
            seq = head.seqs.pop(0)
            self.gate.record_result(seq, outcome="error", sqlstate=error.sqlstate)
        if head is not None and head.substitute is not None:
            self._to_client.append(encode(head.substitute))
        else:
            self._to_client.append(raw)
        if error.severity in ("FATAL", "PANIC"):
            self._end("upstream closed the session")
            return
        if head is None:
            return
        if head.kind == "query":  # a refused fast-path call is answered as a query
            if head.seqs:
                head.seqs.clear()  # the rest of a multi-statement string does not run
            return
        # Extended protocol: upstream discards everything until Sync; so do we, and the
        # name changes of the failed message and of those skipped do not take effect.
        undo = []
        pending = self._pending
        while pending and pending[0].kind != "sync":
            if _journaled(pending.popleft()) and self._journal:
                undo.append(self._journal.popleft())
        for changes in reversed(undo):
            for table, name, before in changes:
                if before is _GONE:
                    table.pop(name, None)
                else:
                    table[name] = before
        if undo and _journaled(head) and head.kind != "close":
            # The failed message itself: a Parse or Bind of the unnamed statement or portal
            # drops the old one upstream before it parses or binds, so there is none now
            # (after a failed Bind PostgreSQL may or may not have dropped it: none is the
            # answer that fails closed).
            for table, name, _before in undo[0]:
                if name == "":
                    table.pop("", None)

    def _execute_plan(self, head: _Pending) -> MaskPlan | None:
        if head.kind != "execute":
            return None
        if not head.planned:
            head.planned = True
            fields = self._portal_fields.get(head.portal or "")
            if fields is not None:
                # A portal's RowDescription carries the real result formats.
                head.plan = self._plan_of(fields)
            else:
                prepared = head.prepared
                if prepared is not None and prepared.fields:
                    head.plan = self._plan_of(prepared.fields, head.formats)
        return head.plan

    def _fields(self, raw: memoryview) -> tuple[m.FieldDescription, ...]:
        key = bytes(raw)
        fields = self._described.get(key)
        if fields is None:
            fields = decode_backend(frame_of(raw)).fields
            self._described_bytes += len(key)
            if (
                len(self._described) >= _PLAN_CACHE_SIZE
                or self._described_bytes > _DESCRIBED_CACHE_BYTES
            ):
                # Bounded in entries and in bytes (a RowDescription of 1,600 long column
                # names is ~100 KB); plans hold their own fields, so they may go too.
                self._described.clear()
                self._described_bytes = len(key)
                self._plans.clear()
            self._described[key] = fields
        return fields

    def _plan_of(
        self, fields: tuple[m.FieldDescription, ...], formats: tuple[int, ...] | None = None
    ) -> MaskPlan | None:
        """Mask plan for these fields; `formats` None: the RowDescription's own formats."""
        key = (id(fields), formats)
        cached = self._plans.get(key)
        # The entry holds its fields: an id is only unique while its object lives, and
        # fields kept by a statement or portal can outlive the description cache.
        if cached is not None and cached[0] is fields:
            return cached[1]
        codes = tuple(f.format_code for f in fields) if formats is None else formats
        if len(self._plans) >= _PLAN_CACHE_SIZE:
            self._plans.clear()  # result formats come from the client: keep this bounded too
        plan = _plan_for(fields, codes, self.protected)
        self._plans[key] = (fields, plan)
        return plan

    def _mask_rows(self, run: memoryview, plan: MaskPlan) -> None:
        """Mask a run of DataRows (drain() framed each; split them again here)."""
        to_client = self._to_client
        pos, end = 0, len(run)
        while pos < end:
            (length,) = _UNPACK_LENGTH(run, pos + 1)
            row = run[pos : pos + 1 + length]
            pos += 1 + length
            values = list(decode_backend(frame_of(row)).values)
            for index, strategy, fmt, type_oid in plan:
                value = values[index] if index < len(values) else None
                if value is None:
                    continue
                values[index] = (
                    strategy.mask_binary(type_oid, value) if fmt == 1 else strategy.mask_text(value)
                )
                self._masked_cells += 1
            to_client.append(encode(m.DataRow(tuple(values))))


_GONE = object()  # a journal's "the name had no entry"


def _journaled(pending: _Pending) -> bool:
    """Whether this forwarded message changed the name tables (see `_journal`)."""
    kind = pending.kind
    return kind == "bind" or kind == "close" or (kind == "parse" and pending.prepared is not None)


def _plan_for(fields, formats: tuple[int, ...], protected: ProtectedMap) -> MaskPlan | None:
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


def _rows_from_tag(tag: str) -> int | None:
    last = tag.rsplit(" ", 1)[-1]
    # isdigit() alone admits "²", which int() refuses: a server's odd tag must not crash.
    return int(last) if last.isascii() and last.isdigit() else None


def _poison_sql() -> str:
    return f"guard_refused_{secrets.token_hex(4)}"


def _unexpected(tag: int) -> ProtocolError:
    return ClientProtocolError(f"unexpected message type {chr(tag)!r} after authentication")
