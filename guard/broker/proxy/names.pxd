# Declarations for `proxy/names.py` compiled by Cython as `proxy._cnames` (setup.py): its
# classes as extension types with their fields in C slots, and the two per-message changes
# (`parse`, `bind`) as C methods. The connection core's twin imports `_cnames` instead of
# `names` (setup.py rewrites that one import line in the twin's copy): an extended-protocol
# transaction made four Python frames here (two `__init__`s, `parse`, `bind`).
# names.py stays the reference the pure-Python core runs.

cdef class Description:
    cdef public object fields
    cdef public dict plans
    cdef public object view_masked

cdef class Prepared:
    cdef public object decision
    cdef public object records
    cdef public object description

cdef class Portal:
    cdef public Prepared prepared
    cdef public object formats
    cdef public object description

cdef class NameTables:
    cdef public dict statements
    cdef public dict portals
    cpdef tuple parse(self, name, prepared)
    cpdef tuple bind(self, name, portal)
