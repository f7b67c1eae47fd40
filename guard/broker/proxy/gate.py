"""The one place that owns the security ordering: analyze → decide → record → forward.

Pure decision logic: no asyncio, no sockets, no files (imports `sql`, `policy`, `audit`
records and `pgwire` messages). `proxy.connection` asks the gate about every statement
before a byte of it is forwarded; the gate analyses it (cached), evaluates the policy and
serializes the audit records the statement needs. The connection hands those records to the
shell as a blocking `WriteAudit` command and forwards the statement only once the shell says
they are written. Anything that goes wrong on that path — unparseable SQL, an unknown
statement kind, a policy error, an audit log that cannot be written — is a refusal (fail
closed), never a pass-through.
"""

from __future__ import annotations

from guard.broker.audit.record import StatementRecord
from guard.broker.audit.serialize import fixed_fields
from guard.broker.identity.principal import Principal
from guard.broker.masking.objects import MASKED_SCHEMA, UNMASKED_SCHEMA
from guard.broker.pgwire.messages import ErrorResponse
from guard.broker.policy.engine import CompiledPolicy, Effect, Verdict
from guard.broker.policy.guardrails import derived_protected_uses
from guard.broker.proxy.speedups import literal_shape
from guard.broker.sql.analyze import Analysis, StatementAnalysis, analyze, fast_path_analysis
from guard.broker.sql.fingerprint import UNNORMALIZABLE, normalize
from guard.broker.sql.redirect import redirect, refill

# Decisions are cached per connection by exact statement text: the principal and policy are
# fixed for a session, so the same text always gets the same verdict. Bounded so a client
# sending endless distinct statements cannot grow the gateway's memory.
_DECISION_CACHE_SIZE = 2048

SQLSTATE_INSUFFICIENT_PRIVILEGE = "42501"

# What a statement gets instead of running when its audit record could not be written.
AUDIT_UNAVAILABLE = ErrorResponse.build(
    "58030",
    "guard: the audit log cannot be written, so the statement was refused",
    hint="ask the guard operator to check the broker's audit log storage",
)


class Decision:
    """The gate's answer for one protocol-level statement text (one Query or one Parse).

    Immutable in meaning; a decision is cached per connection and reused for every run of
    its text, so it also carries its audit records, serialized once per protocol.
    """

    __slots__ = (
        "analysis",
        "verdicts",
        "refusal",
        "hold",
        "masked_columns",
        "records",
        "forward_sql",
        "redirected",
        "simple_records",
        "extended_records",
    )

    def __init__(
        self,
        analysis: Analysis,
        verdicts: tuple[Verdict, ...],
        refusal: ErrorResponse | None,  # None: forward
    ) -> None:
        self.analysis = analysis
        self.verdicts = verdicts
        self.refusal = refusal
        # A statement that only needs approval (no verdict denies it) can be held for a
        # decision instead of refused: the verdict that asks for it.
        self.hold: Verdict | None = None
        if refusal is not None and verdicts:
            effects = {v.effect for v in verdicts}
            if Effect.REQUIRE_APPROVAL in effects and Effect.DENY not in effects:
                self.hold = next(v for v in verdicts if v.effect is Effect.REQUIRE_APPROVAL)
        seen: dict[str, None] = {}
        for v in verdicts:
            for col in v.masked_columns:
                seen[str(col)] = None
        self.masked_columns: tuple[str, ...] = tuple(seen)
        # protocol → the fixed fields of one audit record per statement (see Gate.record)
        self.records: dict[str, tuple[bytes, ...]] = {}
        # The text to forward instead of the client's (`sql.redirect`): reads of protected
        # tables pointed at their masking views, the masking schema kept first in a
        # search_path the client sets. None: forward the client's bytes as they are.
        self.forward_sql: str | None = None
        self.redirected: tuple[str, ...] = ()
        # The records of a run in the simple protocol when the statement is forwarded as
        # the client sent it (allowed, not rewritten, nothing to hold), once they are made
        # (`statement_records`); None otherwise. The connection's one-lookup steady state.
        self.simple_records: tuple[bytes, ...] | None = None
        # The same for a Parse of it, when its result has no masked column either (nothing
        # for the connection to describe itself).
        self.extended_records: tuple[bytes, ...] | None = None


def refusal_for(verdict: Verdict) -> ErrorResponse:
    hint = None
    if verdict.effect is Effect.REQUIRE_APPROVAL:
        hint = "this gateway cannot hold statements for approval here: ask the guard operator"
    return ErrorResponse.build(SQLSTATE_INSUFFICIENT_PRIVILEGE, verdict.message, hint=hint)


class Gate:
    """Per-connection gate: one principal, one target; decisions cached by statement text."""

    def __init__(
        self,
        *,
        policy: CompiledPolicy,
        target: str,
        principal: Principal,
        session_id: str,
        connection_id: str,
        redirects: frozenset[tuple[str, str]] = frozenset(),
        unmasked: bool = False,
    ) -> None:
        self.policy = policy
        # An unmasked session (its role holds guard_unmasked): spellings of protected
        # tables go to the raw views, derived use is refused only where a raw value could
        # leave guard's sight, and the audit says the columns were read unmasked.
        self.unmasked = unmasked
        self._schema = UNMASKED_SCHEMA if unmasked else MASKED_SCHEMA
        self.target = target
        self.principal = principal
        self.session_id = session_id
        self.connection_id = connection_id
        self._groups = tuple(sorted(principal.groups))
        # Decisions by statement text, exact and normalized (bounded, see _store). Callers
        # may read it (the connection looks an exact text up here before calling decide: a
        # hit is what decide answers, without its call); only the gate writes it, and it is
        # never replaced.
        self.decisions: dict[str, Decision] = {}
        # The normalized texts whose decision a text with other literals shares (`decide`
        # puts them here: allowed, not redirected; see there), for callers that normalize
        # a text themselves (`sql.shape`) and look it up: a hit is what decide answers for
        # that text. Cleared with `decisions`, so always a part of it.
        self.shared: dict[str, Decision] = {}
        # The relations with a view in the masking schema: protected or gated tables, and
        # (`redirects`, from the catalog) the views that have masked twins. Reads of them
        # in any spelling are pointed there.
        spec = policy.targets.get(target)
        self._twins = redirects
        self._special = redirects | (spec.masked_tables() if spec is not None else frozenset())

    # -- analyze + decide -------------------------------------------------------------
    def decide(self, sql: str) -> Decision:
        """Analyse and evaluate without recording (used at Parse: nothing runs yet)."""
        decision = self.decisions.get(sql)
        if decision is not None:
            return decision
        # Clients that inline literals (pgbench -M simple, ORMs without binds) send a new
        # text every time. Decide on the text with its constants replaced by parameters
        # first (one cheap parse), and reuse that decision — but only when it *allows*:
        # the analyser treats an unknown value as the worst case (`set_config($1, ...)` is
        # a role switch, a `$1` SET value or DO body does not parse), so a constant can
        # only make a statement safer than its parameter, never riskier. Anything short of
        # an allow is decided again on the exact text. (libpg_query leaves ORDER BY and
        # GROUP BY positions as they are: `ORDER BY 2` never shares `ORDER BY 1`'s answer.)
        # The plainest such texts get the same normalized text without libpg_query's parse
        # (`sql.shape`: its answer is libpg_query's, or None).
        shape = literal_shape(sql)
        # The exact text is cached only when finding its decision again costs more than
        # a lookup: libpg_query's normalization (3 µs), or a refilled redirection. Texts
        # `sql.shape` normalizes (0.1 µs) are not: a client inlining fresh literals (pgbench
        # -M simple's random keys) would only churn the cache with texts never seen twice.
        store = shape is None
        normalized = normalize(sql) if shape is None else shape
        if normalized != sql and normalized != UNNORMALIZABLE:
            decision = self.decisions.get(normalized) or self._compute(normalized)
            if decision.refusal is None and decision.verdicts:
                if decision.forward_sql is not None:
                    # Redirected: the forwarded text is the exact one's, literals and all,
                    # made from the normalized one's redirection (`sql.redirect.refill`).
                    decision = self._refilled(sql, normalized, decision)
                    store = True
                if decision is not None:
                    if store:
                        self._store(sql, decision)
                    elif normalized in self.decisions:
                        # The shape's own decision, which its other literals share.
                        self.shared[normalized] = decision
                    return decision
        return self._compute(sql)

    def _refilled(self, sql: str, normalized: str, template: Decision) -> Decision | None:
        """`template` (the normalized text's allowed, redirected decision) for `sql`: the
        same verdicts and audit records, its own forwarded text; None when that text
        cannot be made without redirecting `sql` itself."""
        assert template.forward_sql is not None
        text = refill(sql, normalized, template.forward_sql)
        if text is None:
            return None
        decision = Decision(template.analysis, template.verdicts, None)
        decision.records = template.records  # they depend on none of the literals
        decision.forward_sql = text
        decision.redirected = template.redirected
        return decision

    def _compute(self, sql: str) -> Decision:
        decision = self._evaluate(sql)
        self._store(sql, decision)
        return decision

    def _store(self, sql: str, decision: Decision) -> None:
        if len(self.decisions) >= _DECISION_CACHE_SIZE:
            # Bounded so a client sending endless distinct statements cannot grow the
            # gateway's memory; starting over is cheaper than keeping LRU order per hit.
            self.decisions.clear()
            self.shared.clear()
        self.decisions[sql] = decision

    def _evaluate(self, sql: str) -> Decision:
        try:
            analysis = analyze(sql)
            verdicts = tuple(
                self.policy.evaluate_analysis(
                    self.principal, self.target, analysis, unmasked=self.unmasked
                )
            )
        except Exception as exc:  # noqa: BLE001 - any analyser/policy bug must refuse
            analysis = Analysis(
                statements=(), error=f"internal analysis error: {type(exc).__name__}"
            )
            denial = ErrorResponse.build(
                SQLSTATE_INSUFFICIENT_PRIVILEGE,
                "guard: statement refused: it could not be analysed safely",
            )
            return Decision(analysis, (), denial)
        if not verdicts:
            # An empty statement list (e.g. only a comment) runs nothing upstream.
            return Decision(analysis, (), None)
        for verdict in verdicts:
            if verdict.effect is not Effect.ALLOW:
                decision = Decision(analysis, verdicts, refusal_for(verdict))
                if decision.hold is not None:
                    return self._redirected(sql, decision)
                return decision
        return self._redirected(sql, Decision(analysis, verdicts, None))

    def _redirected(self, sql: str, decision: Decision) -> Decision:
        """`decision` with the text to forward when `sql` must be redirected, or refused
        when it cannot be run with the masking views kept first (see `sql.redirect`)."""
        if not self._special:
            return decision
        try:
            result = redirect(sql, self._special, self._schema)
        except Exception:  # noqa: BLE001 - a redirection bug must not let anything through
            result = None
        if result is None:
            return decision  # as written: the database's rights decide what it reads
        if result.refusal is not None:
            denial = ErrorResponse.build(SQLSTATE_INSUFFICIENT_PRIVILEGE, result.refusal)
            return Decision(decision.analysis, decision.verdicts, denial)
        decision.forward_sql = result.text
        decision.redirected = result.relations
        return decision

    # -- record -----------------------------------------------------------------------
    def statement_records(self, decision: Decision, protocol: str) -> tuple[bytes, ...]:
        """The audit records (fixed fields, see `audit.serialize.fixed_fields`) of one run.

        One per statement of the decision's text; empty when nothing runs (a comment). The
        caller has them written, in order, before it forwards the statement or its refusal.
        """
        records = decision.records.get(protocol)
        if records is None:
            records = decision.records[protocol] = self._records_for(decision, protocol)
            plain = (
                decision.refusal is None and decision.hold is None and decision.forward_sql is None
            )
            if plain and protocol == "simple" and records:
                decision.simple_records = records
            elif plain and protocol == "extended" and not decision.masked_columns:
                decision.extended_records = records
        return records

    def _records_for(self, decision: Decision, protocol: str) -> tuple[bytes, ...]:
        # Everything but seq and time is fixed for a (decision, protocol): a statement run
        # many times reuses its serialized fields (hot path).
        statements = decision.analysis.statements
        verdicts = decision.verdicts
        if not statements:
            verdict = verdicts[0] if verdicts else None
            if verdict is None and decision.refusal is None:
                return ()  # nothing to run, nothing to record
            return (self._fixed(None, verdict, protocol, decision),)
        return tuple(
            self._fixed(stmt, verdicts[i] if i < len(verdicts) else None, protocol, decision)
            for i, stmt in enumerate(statements)
        )

    def _fixed(
        self,
        stmt: StatementAnalysis | None,
        verdict: Verdict | None,
        protocol: str,
        decision: Decision,
    ) -> bytes:
        return fixed_fields(self._statement_record(stmt, verdict, protocol, decision))

    def _statement_record(
        self,
        stmt: StatementAnalysis | None,
        verdict: Verdict | None,
        protocol: str,
        decision: Decision,
    ) -> StatementRecord:
        masked: tuple[str, ...] = ()
        if verdict is None:
            effect, rule = "deny", "guard:unanalysable"
        else:
            effect, rule = verdict.effect.value, verdict.rule_id
            if not self.unmasked:  # read raw: `masking` says so
                masked = tuple(str(c) for c in verdict.masked_columns)
        if decision.refusal is not None and effect == "allow":
            # Allowed on its own but refused with the rest of its multi-statement string.
            effect, rule = "deny", "guard:refused-with-batch"
        fingerprint, text = "", ""
        ops: tuple[str, ...] = ()
        tables: tuple[str, ...] = ()
        if stmt is not None:
            fingerprint = stmt.fingerprint
            text = stmt.normalized  # literals replaced: no typed value reaches the log
            ops = tuple(sorted(op.value for op in stmt.operations))
            tables = tuple(
                sorted(
                    {_rel(r) for r in stmt.relations_read}
                    | {_rel(r) for r in stmt.relations_written}
                )
            )
        masking = self._masking(stmt, verdict, decision) if stmt is not None else ()
        return StatementRecord(
            session_id=self.session_id,
            connection_id=self.connection_id,
            principal=self.principal.subject,
            issuer=self.principal.issuer,
            groups=self._groups,
            target=self.target,
            protocol=protocol,
            fingerprint=fingerprint,
            statement=text,
            operations=ops,
            tables=tables,
            verdict=effect,
            rule=rule,
            masked_columns=masked,
            masking=masking,
        )

    def _masking(
        self, stmt: StatementAnalysis, verdict: Verdict | None, decision: Decision
    ) -> tuple[str, ...]:
        """The statement's mask report (`StatementRecord.masking`): which layer masks each
        protected column it reads, and which twin views it reads. Static: what the text
        and the catalog say, decided once per text (hot path: nothing per run)."""
        if verdict is None or verdict.effect is not Effect.ALLOW and decision.hold is None:
            return ()
        redirected = set(decision.redirected)
        report: dict[str, None] = {}
        for column in verdict.masked_columns:
            spelled = {f"{column.schema}.{column.table}", f"*.{column.table}"}
            layer = "redirected" if spelled & redirected else "view"
            if self.unmasked:
                layer = "unmasked"
            report[f"{column}:{layer}"] = None
        if self.unmasked:
            # Raw values that decide rows or feed expressions were read unmasked too.
            spec = self.policy.targets[self.target]
            for column, _context in derived_protected_uses(stmt, spec):
                report[f"{column}:unmasked"] = None
        for relation in stmt.relations_read:
            for schema, name in self._twins:
                if relation.name == name and relation.schema in (None, schema):
                    report[f"{schema}.{name}:twin"] = None
        return tuple(report)

    def fast_path(self, function_oid: int) -> Decision:
        """Decide a fast-path FunctionCall through the same policy path as SQL: refused.

        It names a function by OID only and bypasses SQL analysis entirely, so the policy's
        built-in `guardrail:fast-path` refuses it; the decision still carries the records
        of the attempt. This method exists so the connection need not build an Analysis.
        """
        stmt = fast_path_analysis(function_oid)
        analysis = Analysis(statements=(stmt,), error=None)
        verdicts = tuple(self.policy.evaluate_analysis(self.principal, self.target, analysis))
        verdict = verdicts[0] if verdicts else None
        refusal = (
            refusal_for(verdict)
            if verdict is not None and verdict.effect is not Effect.ALLOW
            else ErrorResponse.build(
                SQLSTATE_INSUFFICIENT_PRIVILEGE,
                "guard: fast-path function calls are not allowed through guard",
            )
        )
        return Decision(analysis, verdicts, refusal)


def _rel(ref: object) -> str:
    schema = getattr(ref, "schema", None)
    name = getattr(ref, "name", "")
    return f"{schema}.{name}" if schema else str(name)
