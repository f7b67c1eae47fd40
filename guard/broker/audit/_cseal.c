/* guard.broker.audit._cseal: one statement record completed and sealed, in C.
 *
 * The compiled twin of `audit.serialize.seal_record_py` (complete + chain.seal_line), the
 * sink's per-statement work before its write: the record's fixed fields get `seq` and the
 * time, the body is hashed into the chain, and the stored line is built. In Python that
 * is three bytes formats, a sha256 object, a hexdigest and its encoding (3.8-5.9 us per
 * record on the idle VM); here it is one buffer and one digest. The Python function stays
 * the reference: tests/audit/test_cseal.py holds both to the same bytes.
 *
 *   seal(prev, fixed, seq, ns) -> (line, digest)
 *       prev   bytes: the previous line's hash (64 hex) or GENESIS
 *       fixed  bytes: the record's fields without the closing brace (serialize.fixed_fields)
 *       seq    int >= 0, ns int >= 0 (time.time_ns())
 *       line   b'{"body":<body>,"link":"<digest>","prev":"<prev>"}\n'
 *       digest sha256(body + b"\n" + prev) as 64 lowercase hex bytes
 *
 * SHA-256 is OpenSSL's (the libcrypto Python's own ssl and hashlib use), fetched once:
 * OpenSSL 3 looks the algorithm up on every one-shot call otherwise. The body comes first
 * in the hash (`audit.chain`) so that the state after `fixed` can be kept: a cached
 * statement's record is the same `fixed` object at every execution, and only its seq,
 * time and prev are hashed then (3 SHA-256 blocks of a statement record's 11: measured
 * 0.47 us a record here with `openssl speed -evp sha256 -bytes 640`).
 *
 * Also here: `HotPath`, the sink's common case (one statement record sealed into its
 * journal, result records queued) without the sink's Python frames; see its comment below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <structmember.h>

#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static EVP_MD *sha256;
static EVP_MD_CTX *hasher;
/* The formatted second of the last call (the GIL serialises callers). */
static long long cached_second = -1;
static char second_text[32];
static size_t second_len;

static const char HEAD[] = "{\"body\":";
static const char HASH[] = ",\"link\":\"";
static const char PREV[] = "\",\"prev\":\"";
static const char TAIL[] = "\"}\n";

/* The decimal digits of v at p; returns the end. (snprintf costs ~1,400 instructions a
 * call, more than the rest of a record's formatting.) */
static char *
put_decimal(char *p, long long v)
{
    char digits[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        digits[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *p++ = '-';
    while (n)
        *p++ = digits[--n];
    return p;
}

/* `record.iso_from_ns(ns)` into out (40 bytes): RFC 3339 UTC with microseconds. The
 * formatted second is cached. -1 with an exception when the time is out of range
 * (ns < 0 too: Python's floor division and C's would disagree before 1970). */
static int
format_time(long long ns, char *out)
{
    if (ns < 0) {
        PyErr_SetString(PyExc_ValueError, "audit time out of range");
        return -1;
    }
    long long micros_total = ns / 1000;
    long long second = micros_total / 1000000;
    long micros = (long)(micros_total % 1000000);
    if (second != cached_second) {
        time_t t = (time_t)second;
        struct tm tm;
        size_t n;
        if (gmtime_r(&t, &tm) == NULL
            || (n = strftime(second_text, sizeof second_text, "%Y-%m-%dT%H:%M:%S", &tm)) == 0
            || n > 30) {
            PyErr_SetString(PyExc_ValueError, "audit time out of range");
            return -1;
        }
        cached_second = second;
        second_len = n;
    }
    char *p = out;
    memcpy(p, second_text, second_len);
    p += second_len;
    *p++ = '.';
    for (int k = 5; k >= 0; k--) {
        p[k] = (char)('0' + micros % 10);
        micros /= 10;
    }
    p += 6;
    *p++ = 'Z';
    return (int)(p - out);
}

/* SHA-256's state after a record's fixed fields, kept per `fixed` object: a table keyed by
 * the object's address, each slot holding a reference to its object (so the address cannot
 * be another object's while it is cached) and the state after hashing it. Only
 * statement-sized fields are kept: a results batch is sealed once and never again.
 *
 * Two ways per set, the more recently used first, and the set chosen by a multiplicative
 * hash of the address (objects allocated side by side spread over the sets): a gateway
 * worker seals each connection's statements with that connection's own fixed fields (they
 * hold its id), so TPC-B's 7 statements on 8 connections are 56 hot objects. Direct-mapped
 * into 64 slots, about half of them shared a slot with another and were hashed whole at
 * every execution: 56 objects sealed in turn took 707 ns a seal against 490 for 8 (and
 * TPC-B's instructions per transaction swung by 8 % with where its objects were
 * allocated). */
#define MIDSTATE_SETS 64
#define MIDSTATE_MAX_FIXED 4096
typedef struct {
    PyObject *fixed; /* NULL, or an object whose state `ctx` holds (then never NULL) */
    EVP_MD_CTX *ctx;
} Midstate;
static Midstate midstates[MIDSTATE_SETS][2];

/* `hasher` set to the state after hashing `fixed`; 0, or -1 when OpenSSL failed. */
static int
hash_fixed(PyObject *fixed)
{
    Py_ssize_t n = PyBytes_GET_SIZE(fixed);
    if (n > MIDSTATE_MAX_FIXED)
        return EVP_DigestInit_ex(hasher, sha256, NULL)
                       && EVP_DigestUpdate(hasher, PyBytes_AS_STRING(fixed), (size_t)n)
                   ? 0
                   : -1;
    Midstate *set = midstates[(uint64_t)(uintptr_t)fixed * UINT64_C(0x9E3779B97F4A7C15) >> 58];
    if (set[0].fixed != fixed) {
        /* The other way becomes the first: `fixed` itself, or the less recently used
           slot, which `fixed` then takes over. */
        Midstate other = set[1];
        set[1] = set[0];
        set[0] = other;
        if (other.fixed != fixed) {
            Midstate *slot = &set[0];
            if (slot->ctx == NULL && (slot->ctx = EVP_MD_CTX_new()) == NULL)
                return -1;
            if (!EVP_DigestInit_ex(slot->ctx, sha256, NULL)
                || !EVP_DigestUpdate(slot->ctx, PyBytes_AS_STRING(fixed), (size_t)n)) {
                Py_CLEAR(slot->fixed);
                return -1;
            }
            Py_INCREF(fixed);
            Py_XSETREF(slot->fixed, fixed);
        }
    }
    return EVP_MD_CTX_copy_ex(hasher, set[0].ctx) ? 0 : -1;
}

/* PyLong_AsLongLong without its slow path: CPython 3.11 converts an int of more than one
 * 30-bit digit (a time in ns, a monotonic clock) through _PyLong_AsByteArray, about 300
 * instructions; this reads the digits. OverflowError as PyLong_AsLongLong raises it. */
static long long
as_long_long(PyObject *v)
{
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "Python int too large to convert to C long long");
        return -1;
    }
    return x;
}

/* The stored line of a record (a new reference), its hash in *digest_out (a new
 * reference); NULL with an exception. prev and fixed are bytes, seq >= 0. */
static PyObject *
seal_line(PyObject *prev, PyObject *fixed, long long seq, long long ns, PyObject **digest_out)
{
    /* The body's tail: ,"seq":N,"time":"YYYY-MM-DDTHH:MM:SS.ffffffZ"} */
    char when[40];
    int when_len = format_time(ns, when);
    if (when_len < 0)
        return NULL;
    char tail[128]; /* 7 + 20 + 9 + 40 + 2 at most */
    char *t = tail;
    memcpy(t, ",\"seq\":", 7);
    t = put_decimal(t + 7, seq);
    memcpy(t, ",\"time\":\"", 9);
    t += 9;
    memcpy(t, when, (size_t)when_len);
    t += when_len;
    *t++ = '"';
    *t++ = '}';
    int tail_len = (int)(t - tail);
    Py_ssize_t prev_len = PyBytes_GET_SIZE(prev), fixed_len = PyBytes_GET_SIZE(fixed);
    Py_ssize_t body_len = fixed_len + tail_len;
    Py_ssize_t line_len = (Py_ssize_t)(sizeof HEAD - 1) + body_len + (Py_ssize_t)(sizeof HASH - 1)
                          + 64 + (Py_ssize_t)(sizeof PREV - 1) + prev_len
                          + (Py_ssize_t)(sizeof TAIL - 1);
    PyObject *line = PyBytes_FromStringAndSize(NULL, line_len);
    if (line == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(line);
    char *p = out;
    memcpy(p, HEAD, sizeof HEAD - 1);
    p += sizeof HEAD - 1;
    memcpy(p, PyBytes_AS_STRING(fixed), (size_t)fixed_len);
    p += fixed_len;
    memcpy(p, tail, (size_t)tail_len);
    p += tail_len;

    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    /* body + "\n" + prev, the body's fixed part from its kept state. */
    if (hash_fixed(fixed) < 0 || !EVP_DigestUpdate(hasher, tail, (size_t)tail_len)
        || !EVP_DigestUpdate(hasher, "\n", 1)
        || !EVP_DigestUpdate(hasher, PyBytes_AS_STRING(prev), (size_t)prev_len)
        || !EVP_DigestFinal_ex(hasher, md, &md_len) || md_len != 32) {
        Py_DECREF(line);
        PyErr_SetString(PyExc_RuntimeError, "seal: sha256 failed");
        return NULL;
    }
    static const char hexdigits[] = "0123456789abcdef";
    memcpy(p, HASH, sizeof HASH - 1);
    p += sizeof HASH - 1;
    char *digest = p;
    for (unsigned int i = 0; i < 32; i++) {
        *p++ = hexdigits[md[i] >> 4];
        *p++ = hexdigits[md[i] & 0x0f];
    }
    memcpy(p, PREV, sizeof PREV - 1);
    p += sizeof PREV - 1;
    memcpy(p, PyBytes_AS_STRING(prev), (size_t)prev_len);
    p += prev_len;
    memcpy(p, TAIL, sizeof TAIL - 1);

    *digest_out = PyBytes_FromStringAndSize(digest, 64);
    if (*digest_out == NULL) {
        Py_DECREF(line);
        return NULL;
    }
    return line;
}

static PyObject *
seal(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "seal(prev, fixed, seq, ns) takes 4 arguments");
        return NULL;
    }
    PyObject *prev = args[0], *fixed = args[1];
    if (!PyBytes_Check(prev) || !PyBytes_Check(fixed)) {
        PyErr_SetString(PyExc_TypeError, "seal: prev and fixed must be bytes");
        return NULL;
    }
    long long seq = as_long_long(args[2]);
    if (seq == -1 && PyErr_Occurred())
        return NULL;
    long long ns = as_long_long(args[3]);
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    if (seq < 0) { /* (a negative ns is format_time's to refuse) */
        PyErr_SetString(PyExc_ValueError, "seal: seq must not be negative");
        return NULL;
    }
    PyObject *digest;
    PyObject *line = seal_line(prev, fixed, seq, ns, &digest);
    if (line == NULL)
        return NULL;
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(line);
        Py_DECREF(digest);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, line);
    PyTuple_SET_ITEM(result, 1, digest);
    return result;
}

/* ------------------------------------------------------------------ result entries */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buffer;

static int
reserve(Buffer *b, Py_ssize_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more)
        cap *= 2;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int
put(Buffer *b, const char *s, Py_ssize_t n)
{
    if (reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

/* A str as a JSON string, escaped as orjson escapes it: \" \\ \b \f \n \r \t, other
 * control characters as \u00XX, everything else (non-ASCII too) as its UTF-8 bytes. */
static int
put_json_str(Buffer *b, PyObject *str)
{
    static const char hexdigits[] = "0123456789abcdef";
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(str, &n);
    if (s == NULL)
        return -1;
    if (reserve(b, 6 * n + 2) < 0) /* the worst case: every byte \u00XX */
        return -1;
    char *o = b->data + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hexdigits[c >> 4];
            *o++ = hexdigits[c & 0x0f];
        }
    }
    *o++ = '"';
    b->len = o - b->data;
    return 0;
}

/* A result value: str, int, bool or None (what `record.RESULT_FIELDS` hold). */
static int
put_json_value(Buffer *b, PyObject *v)
{
    if (v == Py_None)
        return put(b, "null", 4);
    if (v == Py_True)
        return put(b, "true", 4);
    if (v == Py_False)
        return put(b, "false", 5);
    if (PyUnicode_Check(v))
        return put_json_str(b, v);
    if (PyLong_Check(v)) {
        long long x = as_long_long(v);
        if (x == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "Integer exceeds 64-bit range");
            return -1;
        }
        char text[24];
        return put(b, text, (Py_ssize_t)(put_decimal(text, x) - text));
    }
    PyErr_Format(PyExc_TypeError, "Type is not JSON serializable: %s", Py_TYPE(v)->tp_name);
    return -1;
}

/* Room for one result's JSON to begin with (a -S result's array is about 70 bytes): the
 * buffer grows by copies only past it. */
#define RESULT_ROOM 96

/* The index of the pair (session, connection) in `ids` (a dict of (str, str) -> int), added
 * when new; -1 with an exception. The ids must be str that UTF-8 can hold (JSON strings),
 * as in the reference. */
static Py_ssize_t
id_index(PyObject *ids, PyObject *session, PyObject *connection)
{
    if (!PyUnicode_CheckExact(session) || !PyUnicode_CheckExact(connection)) {
        PyErr_SetString(PyExc_TypeError,
                        "result_entries: session_id and connection_id must be str");
        return -1;
    }
    PyObject *key = PyTuple_Pack(2, session, connection);
    if (key == NULL)
        return -1;
    PyObject *found = PyDict_GetItemWithError(ids, key);
    Py_ssize_t index = -1;
    if (found != NULL) {
        index = PyLong_AsSsize_t(found);
    } else if (!PyErr_Occurred() && PyUnicode_AsUTF8(session) != NULL
               && PyUnicode_AsUTF8(connection) != NULL) {
        index = PyDict_GET_SIZE(ids);
        PyObject *value = PyLong_FromSsize_t(index);
        if (value == NULL || PyDict_SetItem(ids, key, value) < 0)
            index = -1;
        Py_XDECREF(value);
    }
    Py_DECREF(key);
    return index;
}

/* result_entries(queued, ids): `serialize.result_entries_py`'s bytes (see it). */
static PyObject *
result_entries(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "result_entries(queued, ids): a list and a dict");
        return NULL;
    }
    PyObject *queued = args[0], *ids = args[1];
    Buffer b = {NULL, 0, 0};
    int first = 1;
    Py_ssize_t count = 0;
    for (Py_ssize_t q = 0; q < PyList_GET_SIZE(queued); q++) {
        PyObject *entry = PyList_GET_ITEM(queued, q);
        if (PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2
            && PyList_Check(PyTuple_GET_ITEM(entry, 0)))
            count += PyList_GET_SIZE(PyTuple_GET_ITEM(entry, 0));
    }
    if (reserve(&b, count * RESULT_ROOM) < 0)
        return NULL;
    /* The last pair looked up: a connection's results share their id objects. Held, as
       is the entry being read: an `ns` that is not an int runs its __index__, which may
       empty `queued` (then the entry and its results would be freed under this loop, and
       another object could take the last pair's address). */
    PyObject *last_session = NULL, *last_connection = NULL, *entry = NULL;
    Py_ssize_t last_index = -1;
    for (Py_ssize_t q = 0; q < PyList_GET_SIZE(queued); q++) {
        Py_XDECREF(entry);
        entry = PyList_GET_ITEM(queued, q);
        Py_INCREF(entry);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2
            || !PyList_Check(PyTuple_GET_ITEM(entry, 0))) {
            PyErr_SetString(PyExc_TypeError,
                            "result_entries: each entry must be (list of values, ns)");
            goto fail;
        }
        PyObject *results = PyTuple_GET_ITEM(entry, 0);
        long long ns = as_long_long(PyTuple_GET_ITEM(entry, 1));
        if (ns == -1 && PyErr_Occurred())
            goto fail;
        char when[40];
        int when_len = format_time(ns, when);
        if (when_len < 0)
            goto fail;
        for (Py_ssize_t r = 0; r < PyList_GET_SIZE(results); r++) {
            PyObject *values = PyList_GET_ITEM(results, r);
            if (!PyTuple_Check(values) || PyTuple_GET_SIZE(values) != 10) {
                PyErr_SetString(PyExc_ValueError,
                                "result_entries: a result must be a tuple of 10 values");
                goto fail;
            }
            PyObject *session = PyTuple_GET_ITEM(values, 0);
            PyObject *connection = PyTuple_GET_ITEM(values, 1);
            if (session != last_session || connection != last_connection) {
                last_index = id_index(ids, session, connection);
                if (last_index < 0)
                    goto fail;
                Py_INCREF(session);
                Py_INCREF(connection);
                Py_XSETREF(last_session, session);
                Py_XSETREF(last_connection, connection);
            }
            char text[24];
            if (put(&b, first ? "[" : ",[", first ? 1 : 2) < 0
                || put(&b, text, (Py_ssize_t)(put_decimal(text, last_index) - text)) < 0)
                goto fail;
            first = 0;
            for (int k = 2; k < 10; k++) {
                if (put(&b, ",", 1) < 0 || put_json_value(&b, PyTuple_GET_ITEM(values, k)) < 0)
                    goto fail;
            }
            if (put(&b, ",\"", 2) < 0 || put(&b, when, when_len) < 0 || put(&b, "\"]", 2) < 0)
                goto fail;
        }
    }
    Py_XDECREF(entry);
    Py_XDECREF(last_session);
    Py_XDECREF(last_connection);
    PyObject *out = PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
    PyMem_Free(b.data);
    return out;
fail:
    Py_XDECREF(entry);
    Py_XDECREF(last_session);
    Py_XDECREF(last_connection);
    PyMem_Free(b.data);
    return NULL;
}

/* ------------------------------------------------------------------ the sink's hot path */

/* Lock(): the sink's lock, a `threading.Lock` whose hot-path callers take it in C.
 *
 * `HotPath` takes the sink's lock without waiting at every statement and every batch of
 * results: through `threading.Lock`'s methods that was a call with its arguments parsed
 * by PyArg_ParseTupleAndKeywords and another to release, about 1,400 instructions a
 * transaction. This one is the same OS lock (PyThread_type_lock) with the same Python
 * methods (acquire(blocking=True, timeout=-1), release, locked, the context manager), and
 * HotPath calls PyThread_acquire_lock on it directly. A blocking acquire releases the GIL
 * while it waits and runs signal handlers when a signal interrupts the wait, as
 * threading.Lock does. */

typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    char locked;
} Lock;

static PyObject *
Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    Lock *self = (Lock *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if ((self->lock = PyThread_allocate_lock()) == NULL) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "Lock: cannot allocate a lock");
        return NULL;
    }
    return (PyObject *)self;
}

static void
Lock_dealloc(Lock *self)
{
    if (self->lock != NULL) {
        if (self->locked)
            PyThread_release_lock(self->lock);
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static long long
monotonic_micros(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* Take the lock, waiting at most `micros` (-1: for ever); 1 taken, 0 not, -1 with an
 * exception (a signal handler raised while waiting). */
static int
lock_take(Lock *self, PY_TIMEOUT_T micros)
{
    PyLockStatus r = PyThread_acquire_lock_timed(self->lock, 0, 0);
    if (r == PY_LOCK_FAILURE && micros != 0) {
        long long deadline = micros > 0 ? monotonic_micros() + micros : 0;
        for (;;) {
            Py_BEGIN_ALLOW_THREADS
            r = PyThread_acquire_lock_timed(self->lock, micros, 1);
            Py_END_ALLOW_THREADS
            if (r != PY_LOCK_INTR)
                break;
            if (Py_MakePendingCalls() < 0)
                return -1;
            if (micros > 0) {
                micros = (PY_TIMEOUT_T)(deadline - monotonic_micros());
                if (micros <= 0) {
                    r = PyThread_acquire_lock_timed(self->lock, 0, 0);
                    break;
                }
            }
        }
    }
    if (r != PY_LOCK_ACQUIRED)
        return 0;
    self->locked = 1;
    return 1;
}

static PyObject *
Lock_acquire(Lock *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pd:acquire", kwlist, &blocking, &timeout))
        return NULL;
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (timeout < 0 && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    PY_TIMEOUT_T micros = !blocking ? 0 : timeout == -1 ? -1 : (PY_TIMEOUT_T)(timeout * 1e6);
    if (blocking && timeout > 0 && micros == 0)
        micros = 1;
    int taken = lock_take(self, micros);
    if (taken < 0)
        return NULL;
    return PyBool_FromLong(taken);
}

static PyObject *
Lock_enter(Lock *self, PyObject *unused)
{
    int taken = lock_take(self, -1);
    if (taken < 0)
        return NULL;
    return PyBool_FromLong(taken);
}

static void
lock_give(Lock *self)
{
    self->locked = 0;
    PyThread_release_lock(self->lock);
}

static PyObject *
Lock_release(Lock *self, PyObject *unused)
{
    if (!self->locked) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    lock_give(self);
    Py_RETURN_NONE;
}

static PyObject *
Lock_exit(Lock *self, PyObject *const *args, Py_ssize_t nargs)
{
    return Lock_release(self, NULL);
}

static PyObject *
Lock_locked(Lock *self, PyObject *unused)
{
    return PyBool_FromLong(self->locked);
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Lock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool, as threading.Lock's"},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "release(), as threading.Lock's"},
    {"locked", (PyCFunction)Lock_locked, METH_NOARGS, "locked() -> bool"},
    {"__enter__", (PyCFunction)Lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Lock_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "guard.broker.audit._cseal.Lock",
    .tp_basicsize = sizeof(Lock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The audit sink's lock: a threading.Lock that HotPath takes in C.",
    .tp_new = Lock_new,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_methods = Lock_methods,
};

/* HotPath(sink, watcher=None): `audit.sink.JsonlAuditSink.append_statements` and
 * `append_results` for the common case, without their Python frames (2.0-2.8 us a statement
 * through the broker's health watcher, of which sealing is 0.65).
 *
 * The sink stays the owner of its state and the reference: this reads and writes the same
 * attributes its Python code does, does exactly what that code does for one statement
 * record into the journal or for queued result records, and answers None (False for
 * results) whenever anything is unusual, so the caller runs the Python path: no journal,
 * fsync on, a failure remembered (the sink's or the watcher's last_error), a checkpoint
 * due, the file check due and not passed, a line too long for the ring or the ring's
 * pending half full, the deferred queue full, or the sink's lock held by another thread.
 * Its one system call is the file check's stat (at most every check_interval, as `_check`
 * does it): a failed or differing stat is the Python path's, which checks again and says
 * what is wrong, so it cannot fail the way a write does; an exception from it is a bug.
 *
 * The file check in C: the Python path took it, and with it the statement due then, every
 * 10 ms (WriteAudit, the shell's pause and the general path: about 90,000 instructions,
 * 1.1-1.6 % of the gateway's CPU under pgbench -S, issue 13). Here it is `_check`'s common
 * case: the path's st_dev/st_ino still the log's, the log not gone, no checkpoint due by
 * time; the next check is scheduled and the records checked so far counted as `_check`
 * does. The path and the identity are the sink's at construction (neither changes).
 *
 * Those attributes are declared in their classes' __slots__ (the sink's, its journal's,
 * the watcher's), so an instance keeps each at a fixed offset: this reads and stores them
 * there, found once per class from the slot's member descriptor, instead of looking each
 * name up in an instance dict (14 lookups and 5 stores a statement, about 3,500
 * instructions, were 6 % of a -S transaction through the pump).
 *
 * The lock: another thread (the group commit, a flush) may be between reading and storing
 * the chain head with the GIL released; sealing on that head would fork the chain (two
 * records with the same seq and prev, the tamper evidence the log exists for). So the
 * lock is taken without waiting, and a held lock means the Python path, which waits. */

typedef struct {
    PyObject_HEAD
    PyObject *sink;
    PyObject *watcher;       /* the health watcher, or NULL */
    /* Offsets of the sink's slots, and of the watcher's last_error. */
    Py_ssize_t broken, fsync, next_check, journal, pending_error, seq, prev, cp_due, pending,
        pending_bytes, lock_slot, deferred, deferred_count, last_error, gone, checked_seq,
        cp_seq, cp_time;
    /* The file check's: the log's path (its filesystem encoding) and identity, the check
     * interval and the checkpoint period by time, in ns. */
    PyObject *path;
    unsigned long long dev, ino;
    long long interval_ns, seconds_ns;
    PyObject *journal_type;  /* the journal class the three offsets below are of, or NULL */
    Py_ssize_t size, pos, map;
    long long max_deferred;
} HotPath;

static PyObject *s_broken, *s_fsync, *s_next_check, *s_journal, *s_pending_error, *s_seq,
    *s_prev, *s_cp_due, *s_pending, *s_pending_bytes, *s_lock, *s_map, *s_pos, *s_size,
    *s_last_error, *s_deferred, *s_deferred_count, *s_max_deferred, *s_gone, *s_checked_seq,
    *s_cp_seq, *s_cp_time;

/* The attribute an instance keeps at `offset` (borrowed; NULL while unset). */
#define SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

/* Where instances of `type` keep `name`, which the class declares in __slots__; -1 with
 * a TypeError when it does not (a property or a plain attribute is the Python path's). */
static Py_ssize_t
slot_offset(PyTypeObject *type, PyObject *name)
{
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name);
    if (descr == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear(); /* not declared at all: the TypeError below */
    }
    Py_ssize_t offset = -1;
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY))
            offset = member->offset;
    }
    Py_XDECREF(descr);
    if (offset < 0)
        PyErr_Format(PyExc_TypeError, "HotPath: %s.%U is not declared in __slots__",
                     type->tp_name, name);
    return offset;
}

static long long
clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The integer `obj` keeps at `offset`; 0 and *ok = 0 when it is unset or not an int. */
static long long
get_int(PyObject *obj, Py_ssize_t offset, int *ok)
{
    PyObject *v = SLOT(obj, offset);
    if (v == NULL || !PyLong_CheckExact(v)) {
        *ok = 0;
        return 0;
    }
    long long x = as_long_long(v);
    if (x == -1 && PyErr_Occurred()) {
        PyErr_Clear(); /* out of range: the Python path */
        *ok = 0;
    }
    return x;
}

static int
set_int(PyObject *obj, Py_ssize_t offset, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    if (o == NULL)
        return -1;
    Py_XSETREF(SLOT(obj, offset), o); /* (the old value is an int: freeing it runs no code) */
    return 0;
}

/* The sink's path (os.fsencode), its identity (st_dev, st_ino), check interval and
 * checkpoint period, read once: set in its constructor and never changed. */
static int
file_check_state(HotPath *self, PyObject *sink)
{
    PyObject *path = PyObject_GetAttrString(sink, "path");
    if (path == NULL)
        return -1;
    int ok = PyUnicode_FSConverter(path, &self->path);
    Py_DECREF(path);
    if (!ok)
        return -1;
    PyObject *identity = PyObject_GetAttrString(sink, "_identity");
    if (identity == NULL)
        return -1;
    if (!PyTuple_CheckExact(identity) || PyTuple_GET_SIZE(identity) != 2) {
        Py_DECREF(identity);
        PyErr_SetString(PyExc_TypeError, "HotPath: the sink's _identity is not (st_dev, st_ino)");
        return -1;
    }
    self->dev = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(identity, 0));
    self->ino = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(identity, 1));
    Py_DECREF(identity);
    if (PyErr_Occurred())
        return -1;
    const char *names[] = {"_interval_ns", "_seconds_ns"};
    long long *values[] = {&self->interval_ns, &self->seconds_ns};
    for (int i = 0; i < 2; i++) {
        PyObject *v = PyObject_GetAttrString(sink, names[i]);
        if (v == NULL)
            return -1;
        *values[i] = PyLong_AsLongLong(v);
        Py_DECREF(v);
        if (*values[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static PyObject *
HotPath_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *sink, *watcher = Py_None;
    static char *kwlist[] = {"sink", "watcher", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:HotPath", kwlist, &sink, &watcher))
        return NULL;
    PyObject *max = PyObject_GetAttr(sink, s_max_deferred);
    if (max == NULL)
        return NULL;
    long long max_deferred = PyLong_AsLongLong(max);
    Py_DECREF(max);
    if (max_deferred == -1 && PyErr_Occurred())
        return NULL;
    HotPath *self = (HotPath *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->max_deferred = max_deferred;
    self->sink = Py_NewRef(sink);
    PyTypeObject *t = Py_TYPE(sink);
    struct {
        Py_ssize_t *offset;
        PyObject *name;
    } slots[] = {
        {&self->broken, s_broken},   {&self->fsync, s_fsync},
        {&self->next_check, s_next_check}, {&self->journal, s_journal},
        {&self->pending_error, s_pending_error}, {&self->seq, s_seq},
        {&self->prev, s_prev},       {&self->cp_due, s_cp_due},
        {&self->pending, s_pending}, {&self->pending_bytes, s_pending_bytes},
        {&self->lock_slot, s_lock},  {&self->deferred, s_deferred},
        {&self->deferred_count, s_deferred_count}, {&self->gone, s_gone},
        {&self->checked_seq, s_checked_seq}, {&self->cp_seq, s_cp_seq},
        {&self->cp_time, s_cp_time},
    };
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
        if ((*slots[i].offset = slot_offset(t, slots[i].name)) < 0) {
            Py_DECREF(self);
            return NULL;
        }
    if (file_check_state(self, sink) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if (watcher != Py_None) {
        self->watcher = Py_NewRef(watcher);
        if ((self->last_error = slot_offset(Py_TYPE(watcher), s_last_error)) < 0) {
            Py_DECREF(self);
            return NULL;
        }
    }
    return (PyObject *)self;
}

static int
HotPath_traverse(HotPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sink);
    Py_VISIT(self->watcher);
    Py_VISIT(self->journal_type);
    return 0;
}

static int
HotPath_clear(HotPath *self)
{
    Py_CLEAR(self->sink);
    Py_CLEAR(self->watcher);
    Py_CLEAR(self->journal_type);
    Py_CLEAR(self->path);
    return 0;
}

static void
HotPath_dealloc(HotPath *self)
{
    PyObject_GC_UnTrack(self);
    HotPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* `_check` at `now` (monotonic ns) when all is well, before the record after `seq`: 1
 * having scheduled the next check; 0 for the Python path (the log gone, replaced or not
 * to be stat'ed, or a checkpoint due by time: `_check` writes it, or says what is
 * wrong); -1 with an exception. */
static int
file_checked(HotPath *self, PyObject *d, long long seq, long long now)
{
    int ok = 1;
    long long cp_seq = get_int(d, self->cp_seq, &ok);
    long long cp_time = get_int(d, self->cp_time, &ok);
    if (!ok || SLOT(d, self->gone) != Py_None || (seq > cp_seq && now - cp_time >= self->seconds_ns))
        return 0;
    struct stat st;
    if (stat(PyBytes_AS_STRING(self->path), &st) != 0 || (unsigned long long)st.st_dev != self->dev
        || (unsigned long long)st.st_ino != self->ino)
        return 0;
    if (set_int(d, self->next_check, now + self->interval_ns) < 0
        || set_int(d, self->checked_seq, seq) < 0)
        return -1;
    return 1;
}

/* One record sealed into the journal under the lock: its seq (new list), Py_None for the
 * Python path, NULL with an exception. Mirrors `_seal_write` (its file check included)
 * and `_write` of sink.py. */
static PyObject *
statement_locked(HotPath *self, PyObject *fixed)
{
    PyObject *d = self->sink;
    int ok = 1;
    if (SLOT(d, self->broken) != Py_None || SLOT(d, self->pending_error) != Py_None
        || SLOT(d, self->fsync) != Py_False)
        Py_RETURN_NONE;
    long long next_check = get_int(d, self->next_check, &ok);
    long long seq = get_int(d, self->seq, &ok) + 1;
    long long due = get_int(d, self->cp_due, &ok);
    long long pending_bytes = get_int(d, self->pending_bytes, &ok);
    PyObject *prev = SLOT(d, self->prev);
    PyObject *pending = SLOT(d, self->pending);
    PyObject *journal = SLOT(d, self->journal);
    if (!ok || prev == NULL || !PyBytes_Check(prev) || pending == NULL
        || !PyList_CheckExact(pending) || journal == NULL || journal == Py_None
        || seq >= due)
        Py_RETURN_NONE;
    long long now = clock_ns(CLOCK_MONOTONIC);
    if (now >= next_check) {
        int checked = file_checked(self, d, seq - 1, now);
        if (checked <= 0)
            return checked < 0 ? NULL : Py_NewRef(Py_None);
    }
    if ((PyObject *)Py_TYPE(journal) != self->journal_type) {
        PyTypeObject *jt = Py_TYPE(journal);
        Py_ssize_t size = slot_offset(jt, s_size), pos = size < 0 ? -1 : slot_offset(jt, s_pos),
                   map = pos < 0 ? -1 : slot_offset(jt, s_map);
        if (map < 0)
            return NULL;
        self->size = size;
        self->pos = pos;
        self->map = map;
        Py_INCREF(jt);
        Py_XSETREF(self->journal_type, (PyObject *)jt);
    }
    /* (Read before sealing: the journal and its values are borrowed, and nothing below
     * runs Python code until they are stored.) */
    long long size = get_int(journal, self->size, &ok);
    long long pos = get_int(journal, self->pos, &ok);
    PyObject *map = SLOT(journal, self->map);
    if (!ok || map == NULL)
        Py_RETURN_NONE;

    PyObject *digest;
    PyObject *line = seal_line(prev, fixed, seq, clock_ns(CLOCK_REALTIME), &digest);
    if (line == NULL)
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(line);
    Py_buffer ring;
    if (n > size / 4 || pending_bytes + n > size / 2) /* `_write`'s rules: the Python path */
        goto python_path;
    if (PyObject_GetBuffer(map, &ring, PyBUF_WRITABLE) < 0) {
        PyErr_Clear(); /* a closed map: the Python path says what is wrong */
        goto python_path;
    }
    if (pos + n > size) /* `Journal.put`: the next line at the start */
        pos = 0;
    if (size > ring.len || pos < 0) { /* (never from `Journal`: a write outside the map) */
        PyBuffer_Release(&ring);
        goto python_path;
    }
    memcpy((char *)ring.buf + pos, PyBytes_AS_STRING(line), (size_t)n);
    PyBuffer_Release(&ring);
    /* Stored: now the bookkeeping, in `_write`'s order, then the chain head. */
    if (set_int(journal, self->pos, pos + n) < 0 || PyList_Append(pending, line) < 0
        || set_int(d, self->pending_bytes, pending_bytes + n) < 0
        || set_int(d, self->seq, seq) < 0)
        goto fail;
    Py_XSETREF(SLOT(d, self->prev), digest); /* (takes the reference) */
    Py_DECREF(line);
    PyObject *seqs = PyList_New(1);
    PyObject *seq_obj = seqs == NULL ? NULL : PyLong_FromLongLong(seq);
    if (seq_obj == NULL) {
        Py_XDECREF(seqs);
        return NULL;
    }
    PyList_SET_ITEM(seqs, 0, seq_obj);
    return seqs;
python_path:
    Py_DECREF(line);
    Py_DECREF(digest);
    Py_RETURN_NONE;
fail:
    Py_DECREF(line);
    Py_DECREF(digest);
    return NULL;
}

/* body(self, arg) under the sink's lock, taken without waiting; a new reference to
 * `declined` (Py_None or Py_False: the Python path) when the lock is held elsewhere. */
static PyObject *
under_lock(HotPath *self, PyObject *(*body)(HotPath *, PyObject *), PyObject *arg,
           PyObject *declined)
{
    PyObject *lock = SLOT(self->sink, self->lock_slot);
    if (lock == NULL || !Py_IS_TYPE(lock, &LockType))
        return Py_NewRef(declined); /* another kind of lock: the Python path takes it */
    Py_INCREF(lock); /* (body may store into the sink, never its lock: kept all the same) */
    Lock *l = (Lock *)lock;
    PyObject *out;
    if (PyThread_acquire_lock(l->lock, NOWAIT_LOCK)) {
        l->locked = 1;
        out = body(self, arg);
        lock_give(l);
    } else {
        out = Py_NewRef(declined);
    }
    Py_DECREF(lock);
    return out;
}

static PyObject *
HotPath_statements(HotPath *self, PyObject *records)
{
    PyObject *fixed;
    if (PyTuple_CheckExact(records) && PyTuple_GET_SIZE(records) == 1)
        fixed = PyTuple_GET_ITEM(records, 0);
    else if (PyList_CheckExact(records) && PyList_GET_SIZE(records) == 1)
        fixed = PyList_GET_ITEM(records, 0);
    else
        Py_RETURN_NONE;
    if (!PyBytes_Check(fixed))
        Py_RETURN_NONE;
    if (self->watcher != NULL && SLOT(self->watcher, self->last_error) != Py_None)
        Py_RETURN_NONE; /* a success must clear the watcher's last error: the Python path */
    return under_lock(self, statement_locked, fixed, Py_None);
}

/* The results queued under the lock: True, or False for the Python path. */
static PyObject *
results_locked(HotPath *self, PyObject *results)
{
    int ok = 1;
    Py_ssize_t n = PyList_GET_SIZE(results);
    PyObject *deferred = SLOT(self->sink, self->deferred);
    long long count = get_int(self->sink, self->deferred_count, &ok);
    if (!ok || deferred == NULL || !PyList_CheckExact(deferred)
        || count + n >= self->max_deferred)
        Py_RETURN_FALSE; /* (a full queue: the Python path queues and flushes) */
    PyObject *entry = PyTuple_New(2); /* (results, time_ns), as `append_results` queues */
    PyObject *now = entry == NULL ? NULL : PyLong_FromLongLong(clock_ns(CLOCK_REALTIME));
    if (now == NULL) {
        Py_XDECREF(entry);
        return NULL;
    }
    PyTuple_SET_ITEM(entry, 0, Py_NewRef(results));
    PyTuple_SET_ITEM(entry, 1, now);
    int failed = PyList_Append(deferred, entry) < 0
                 || set_int(self->sink, self->deferred_count, count + n) < 0;
    Py_XDECREF(entry);
    if (failed)
        return NULL;
    Py_RETURN_TRUE;
}

/* `append_results` for a list of results while the deferred queue has room: True, or
 * False for the Python path (which also flushes a full queue). */
static PyObject *
HotPath_results(HotPath *self, PyObject *results)
{
    if (!PyList_CheckExact(results))
        Py_RETURN_FALSE;
    if (PyList_GET_SIZE(results) == 0)
        Py_RETURN_TRUE; /* nothing to say: no entry, as in the Python path */
    return under_lock(self, results_locked, results, Py_False);
}

static PyMethodDef HotPath_methods[] = {
    {"statements", (PyCFunction)HotPath_statements, METH_O,
     "statements(records) -> [seq] | None: one record sealed into the journal, or None for "
     "the Python path"},
    {"results", (PyCFunction)HotPath_results, METH_O,
     "results(results) -> bool: queued, or False for the Python path"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HotPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "guard.broker.audit._cseal.HotPath",
    .tp_basicsize = sizeof(HotPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The audit sink's common case in C (see the module's comments).",
    .tp_new = HotPath_new,
    .tp_traverse = (traverseproc)HotPath_traverse,
    .tp_clear = (inquiry)HotPath_clear,
    .tp_dealloc = (destructor)HotPath_dealloc,
    .tp_methods = HotPath_methods,
};

static PyMethodDef methods[] = {
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(prev, fixed, seq, ns) -> (line, digest): a statement record completed and chained"},
    {"result_entries", (PyCFunction)(void (*)(void))result_entries, METH_FASTCALL,
     "result_entries(queued, ids) -> bytes: the JSON of queued result records, "
     "comma-separated, their ids indexes into `ids`"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "guard.broker.audit._cseal",
    "One statement record completed and sealed into the audit chain, in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__cseal(void)
{
    if (sha256 == NULL) {
        sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
        hasher = EVP_MD_CTX_new();
        if (sha256 == NULL || hasher == NULL) {
            PyErr_SetString(PyExc_ImportError, "_cseal: OpenSSL has no SHA256");
            return NULL;
        }
    }
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&s_broken, "_broken"}, {&s_fsync, "_fsync"}, {&s_next_check, "_next_check"},
        {&s_journal, "_journal"}, {&s_pending_error, "_pending_error"}, {&s_seq, "_seq"},
        {&s_prev, "_prev"}, {&s_cp_due, "_cp_due"}, {&s_pending, "_pending"},
        {&s_pending_bytes, "_pending_bytes"}, {&s_lock, "_lock"}, {&s_map, "_map"},
        {&s_pos, "_pos"}, {&s_size, "size"}, {&s_last_error, "last_error"},
        {&s_deferred, "_deferred"}, {&s_deferred_count, "_deferred_count"},
        {&s_max_deferred, "MAX_DEFERRED"}, {&s_gone, "_gone"},
        {&s_checked_seq, "_checked_seq"}, {&s_cp_seq, "_cp_seq"}, {&s_cp_time, "_cp_time"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    if (PyType_Ready(&HotPathType) < 0 || PyType_Ready(&LockType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "HotPath", (PyObject *)&HotPathType) < 0
        || PyModule_AddObjectRef(m, "Lock", (PyObject *)&LockType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
