# Cython declarations for compiling proxy/connection.py, unchanged, into its compiled twin
# guard.broker.proxy._cconnection (setup.py; proxy/core.py picks which one runs).
#
# connection.py stays plain Python and the reference; this file only tells Cython that
# GatewayConnection is an extension type, so its fields are C slots instead of a
# per-instance dict and the methods below are C calls between each other (measured with
# bench/relay_instructions.py: -14 % instructions per -S simple transaction, -17 %
# prepared). Every field is an object: types would change behaviour (an int field rejects
# None). `public` keeps each one readable and writable from Python, as in the reference.
# The methods declared `cdef` are called only from inside the class; the ones used as
# values (continuations: _after_*, _queued, _end, ...) stay Python methods.
# Keep the field list in step with GatewayConnection.__init__: a field missing here is an
# AttributeError in the compiled twin, which tests/proxy/test_core_twins.py finds.
cdef class GatewayConnection:
    cdef public object gate
    cdef public object holds
    cdef public object _eager
    cdef public object codec
    cdef public object protected
    cdef public object _view_columns
    cdef public object _view_masked
    cdef public object _unmasked
    cdef public object client_user
    cdef public object state
    cdef public object _frontend
    cdef public object _backend
    cdef public object _pending
    cdef public object names
    cdef public object _backlog
    cdef public object _backlog_pos
    cdef public object _backlog_error
    cdef public object _continuation
    cdef public object _blocking
    cdef public object _held
    cdef public object _fed_while_paused
    cdef public object _eof_after_pause
    cdef public object _plan
    cdef public object _described
    cdef public object _described_bytes
    cdef public object _masked_cells
    cdef public object _drift_logged
    cdef public object _tags
    cdef public object _to_server
    cdef public object _to_client
    cdef public object _results
    cdef public object _logs
    cdef public object _close

    cdef _flush(self)
    cdef _record(self, records, then, a, b)
    cdef _relay_client(self, fed)
    cdef _on_query(self, raw)
    cdef _on_bind(self, raw)
    cdef _on_describe(self, raw)
    cdef _on_function_call(self, raw)
    cdef _on_parse(self, raw)
    cdef _on_execute(self, portal_name, raw)
    cdef _approval_done(self, entry)
    cdef _on_server_message(self, tag, raw)
    cdef _on_complete(self, tag, raw)
    cdef _result(self, seq, outcome, command_tag, rows, sqlstate, view_masked=*)
    cdef _on_parameter_status(self, raw)
    cdef _on_row_description(self, raw, head)
    cdef _on_error(self, raw, head)
    cdef _skip_to_sync(self, failed)
    cdef _execute_plan(self, head)
    cdef _describe(self, raw)
    cdef _mask_rows(self, run, plan)
