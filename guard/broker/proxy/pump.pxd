# Cython declarations for compiling proxy/pump.py, unchanged, into its compiled twin
# guard.broker.proxy._cpump (setup.py; proxy/core.py picks which one runs).
#
# pump.py stays plain Python and the reference; this file only tells Cython that Pump and
# _Side are extension types: their fields C slots instead of a per-instance dict, a side's
# pump typed so `pump.run` is a C call, and the per-read methods below called in C.
# Measured with bench/relay_instructions.py --shell pump: -6,000 instructions per -S
# transaction (-6 % simple, -5 % extended); the same file compiled without these
# declarations saved 1,000. `public` keeps each field readable and writable from Python,
# as in the reference. Keep the field list in step with Pump.__init__ and _Side.__init__:
# a field missing here is an AttributeError in the twin, which the suite finds (the
# listener, and so every gateway test, runs the twin).

cdef class _Side:
    cdef public Pump pump
    cdef public object feed
    cdef public object forward
    cdef public object eof
    cdef public object name
    cdef public object other
    cdef public bint keep_open_on_eof
    cdef public object previous

cdef class Pump:
    cdef public object connection
    cdef public object message_timeout
    cdef public object _message_timer
    cdef public bint _queue_full
    cdef public object approvals
    cdef public object _tasks
    cdef public object client_transport
    cdef public object upstream_transport
    cdef public object audit
    cdef public object _group_commit
    cdef public object _hot
    cdef public object tls
    cdef public object idle_timeout
    cdef public object loop
    cdef public object last_activity
    cdef public bint active
    cdef public object end_reason
    cdef public object done
    cdef public object _watchdog
    cdef public _Side _client_side
    cdef public _Side _upstream_side
    cdef public object _to_server
    cpdef run(self, list commands)
    cpdef client_read(self)
    cdef _write_audit(self, cmd)
    cdef _record_results(self, cmd)
