# Cython declarations for compiling proxy/connection.py, unchanged, into its compiled twin
# guard.broker.proxy._cconnection (setup.py; proxy/core.py picks which one runs).
#
# connection.py stays plain Python and the reference; this file only tells Cython that
# GatewayConnection is an extension type, so its fields are C slots instead of a
# per-instance dict and the methods below are C calls between each other (measured with
# bench/relay_instructions.py: -14 % instructions per -S simple transaction, -17 %
# prepared). Fields are objects, except the output lists and caches that are never
# anything but a list or a dict (a typed field rejects anything else, so only those):
# -2 % prepared. `public` keeps each one readable and writable from Python, as in the
# reference.
# The methods declared `cdef` are called only from inside the class; the ones used as
# values (continuations: _after_*, _queued, _end, ...) stay Python methods.
# Keep the field list in step with GatewayConnection.__init__: a field missing here is an
# AttributeError in the compiled twin, which tests/proxy/test_core_twins.py finds.
#
# C integers only where a value can be nothing else: the message tags (protocol bytes) and
# the Pending entry's indices, module constants the twin then compares and indexes with in
# C (the twin's module no longer offers them as attributes: import them from
# pgwire.messages or proxy.connection), and the tag of the loops that dispatch on it
# (-3 % instructions for extended, -1 to -2 % for the other -S modes, through the pump).
cimport cython
# The name tables' twin (setup.py builds the core's twin against it): its fields are read
# as C struct members where a local is typed with its class (an extended-protocol
# transaction read ~20 of them through the generic attribute lookup).
from guard.broker.proxy._cnames cimport Description, NameTables, Portal, Prepared

cdef int TAG_BIND, TAG_EXECUTE, TAG_SYNC, TAG_QUERY, TAG_PARSE, TAG_DESCRIBE, TAG_CLOSE
cdef int TAG_FUNCTION_CALL, TAG_TERMINATE, TAG_DATA_ROW, TAG_COPY_DATA, TAG_READY_FOR_QUERY
cdef int TAG_COMMAND_COMPLETE, TAG_PORTAL_SUSPENDED, TAG_EMPTY_QUERY_RESPONSE
cdef int TAG_PARSE_COMPLETE, TAG_BIND_COMPLETE, TAG_CLOSE_COMPLETE
cdef int TAG_FLUSH, TAG_COPY_DONE, TAG_COPY_FAIL
cdef Py_ssize_t _KIND, _SEQS, _PORTAL, _UNDO, _PREPARED, _SUBSTITUTE, _SWALLOW, _PLAN
cdef Py_ssize_t _PLANNED, _APPROVAL

cdef object _decision(object gate, dict decisions, dict shared, object sql)
@cython.locals(description=Description)
cdef object _view_masked_of(Portal portal)
cdef object _send_to_server(object data)
cdef object _send_to_client(object data)

cdef class GatewayConnection:
    cdef public object gate
    cdef public object holds
    cdef public object _eager
    cdef public object recorder
    cdef public object result_recorder
    cdef public object codec
    cdef public object protected
    cdef public object _view_columns
    cdef public object _view_masked
    cdef public object _unmasked
    cdef public object client_user
    cdef public object state
    cdef public object _frontend
    cdef public object _backend
    cdef public Py_ssize_t _limit
    cdef public bytes _express_t
    cdef public object _express_t_description
    cdef public bytes _declined_t
    cdef public object _front_tables
    cdef public object _back_tables
    cdef public bint _front_empty
    cdef public bint _back_empty
    cdef public dict _decisions
    cdef public dict _shared
    cdef public object _pending
    cdef public tuple _tx
    cdef public NameTables names
    cdef public list _backlog
    cdef public object _backlog_pos
    cdef public object _backlog_error
    cdef public object _continuation
    cdef public object _blocking
    cdef public object _held
    cdef public object _fed_while_paused
    cdef public object _eof_after_pause
    cdef public object _plan
    cdef public dict _described
    cdef public object _described_bytes
    cdef public object _masked_cells
    cdef public object _drift_logged
    cdef public dict _tags
    cdef public list _done_recent
    cdef public object _session_id
    cdef public object _connection_id
    cdef public list _to_server
    cdef public list _to_client
    cdef public list _results
    cdef public list _logs
    cdef public object _close

    cpdef relay_from_client(self, data)
    cdef _feed_paused(self, data)
    cdef _express_request(self, bytes data)
    cdef _express_query(self, bytes data)
    @cython.locals(names=NameTables, parsed=Prepared, prepared=Prepared, portal=Portal)
    cdef _express_extended(self, bytes data)
    cdef _queue(self, tuple tx)
    cdef _expand(self)
    @cython.locals(pos=Py_ssize_t)
    cdef bint _express_answer(self, bytes data) except -1
    @cython.locals(size=Py_ssize_t, pos=Py_ssize_t, start=Py_ssize_t, rows=Py_ssize_t,
                   portal=Portal)
    cdef bint _express_tx_answer(self, bytes data, tuple tx) except -1
    @cython.locals(size=Py_ssize_t, length=Py_ssize_t, end=Py_ssize_t)
    cdef Py_ssize_t _express_end(self, bytes data, Py_ssize_t pos, Py_ssize_t least) except -2
    cdef _express_description(self, bytes data, Py_ssize_t start, Py_ssize_t end)
    @cython.locals(size=Py_ssize_t)
    cdef Py_ssize_t _express_rows(self, bytes data, Py_ssize_t pos) except -2
    @cython.locals(end=Py_ssize_t, known=bytes)
    cdef _express_done(self, bytes data, Py_ssize_t pos)
    @cython.locals(tag=int, fresh=bint)
    cpdef relay_from_server(self, data)
    cdef _express_output(self, bytes data)
    cdef _flush(self)
    cdef _record(self, records, then, a, b)
    @cython.locals(tag=int, pos=Py_ssize_t, count=Py_ssize_t)
    cdef _relay_client(self, fed)
    cdef _on_query(self, raw)
    @cython.locals(prepared=Prepared)
    cdef _on_bind(self, raw)
    @cython.locals(prepared=Prepared, portal=Portal)
    cdef _on_describe(self, raw)
    cdef _on_function_call(self, raw)
    @cython.locals(prepared=Prepared)
    cdef _on_parse(self, raw)
    @cython.locals(portal=Portal)
    cdef _on_execute(self, portal_name, raw)
    cdef _approval_done(self, entry)
    cdef _on_server_message(self, int tag, raw)
    cdef _on_complete(self, int tag, raw)
    cdef _result(self, seq, outcome, command_tag, rows, sqlstate, view_masked=*)
    cdef _on_parameter_status(self, raw)
    cdef _on_row_description(self, raw, head)
    cdef _on_error(self, raw, head)
    cdef _skip_to_sync(self, failed)
    cdef _execute_plan(self, head)
    cdef _portal_plan(self, Portal portal)
    cdef _describe(self, raw)
    cdef _plan_of(self, description, formats)
    cdef _mask_rows(self, run, plan)
