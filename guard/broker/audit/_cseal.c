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
 *       line   b'{"body":<body>,"hash":"<digest>","prev":"<prev>"}\n'
 *       digest sha256(prev + b"\n" + body) as 64 lowercase hex bytes
 *
 * SHA-256 is OpenSSL's (the libcrypto Python's own ssl and hashlib use), fetched once:
 * OpenSSL 3 looks the algorithm up on every one-shot call otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/evp.h>
#include <string.h>
#include <time.h>

static EVP_MD *sha256;
static EVP_MD_CTX *hasher;
/* The formatted second of the last call (the GIL serialises callers). */
static long long cached_second = -1;
static char second_text[32];
static size_t second_len;

static const char HEAD[] = "{\"body\":";
static const char HASH[] = ",\"hash\":\"";
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
    long long seq = PyLong_AsLongLong(args[2]);
    if (seq == -1 && PyErr_Occurred())
        return NULL;
    long long ns = PyLong_AsLongLong(args[3]);
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    if (seq < 0) { /* (a negative ns is format_time's to refuse) */
        PyErr_SetString(PyExc_ValueError, "seal: seq must not be negative");
        return NULL;
    }
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
    char *body = p;
    memcpy(p, PyBytes_AS_STRING(fixed), (size_t)fixed_len);
    p += fixed_len;
    memcpy(p, tail, (size_t)tail_len);
    p += tail_len;

    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    if (!EVP_DigestInit_ex(hasher, sha256, NULL)
        || !EVP_DigestUpdate(hasher, PyBytes_AS_STRING(prev), (size_t)prev_len)
        || !EVP_DigestUpdate(hasher, "\n", 1)
        || !EVP_DigestUpdate(hasher, body, (size_t)body_len)
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

    PyObject *digest_bytes = PyBytes_FromStringAndSize(digest, 64);
    if (digest_bytes == NULL) {
        Py_DECREF(line);
        return NULL;
    }
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(line);
        Py_DECREF(digest_bytes);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, line);
    PyTuple_SET_ITEM(result, 1, digest_bytes);
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
        long long x = PyLong_AsLongLong(v);
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

/* The keys before each of the ten values, then the two the writer adds (record.result_body). */
static const char *const RESULT_KEYS[] = {
    "{\"session_id\":",   ",\"connection_id\":", ",\"statement_seq\":",
    ",\"outcome\":",      ",\"command_tag\":",   ",\"rows\":",
    ",\"masked_cells\":", ",\"sqlstate\":",      ",\"view_masked_cells\":",
    ",\"unmasked_cells\":",
};
static const char RESULT_TAIL[] = ",\"kind\":\"result\",\"time\":\"";

static PyObject *
result_entries(PyObject *self, PyObject *queued)
{
    if (!PyList_Check(queued)) {
        PyErr_SetString(PyExc_TypeError, "result_entries: queued must be a list");
        return NULL;
    }
    Buffer b = {NULL, 0, 0};
    int first = 1;
    for (Py_ssize_t q = 0; q < PyList_GET_SIZE(queued); q++) {
        PyObject *entry = PyList_GET_ITEM(queued, q);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2
            || !PyList_Check(PyTuple_GET_ITEM(entry, 0))) {
            PyErr_SetString(PyExc_TypeError,
                            "result_entries: each entry must be (list of values, ns)");
            goto fail;
        }
        PyObject *results = PyTuple_GET_ITEM(entry, 0);
        long long ns = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 1));
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
            if (!first && put(&b, ",", 1) < 0)
                goto fail;
            first = 0;
            for (int k = 0; k < 10; k++) {
                if (put(&b, RESULT_KEYS[k], (Py_ssize_t)strlen(RESULT_KEYS[k])) < 0
                    || put_json_value(&b, PyTuple_GET_ITEM(values, k)) < 0)
                    goto fail;
            }
            if (put(&b, RESULT_TAIL, (Py_ssize_t)(sizeof RESULT_TAIL - 1)) < 0
                || put(&b, when, when_len) < 0 || put(&b, "\"}", 2) < 0)
                goto fail;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
    PyMem_Free(b.data);
    return out;
fail:
    PyMem_Free(b.data);
    return NULL;
}

static PyMethodDef methods[] = {
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(prev, fixed, seq, ns) -> (line, digest): a statement record completed and chained"},
    {"result_entries", result_entries, METH_O,
     "result_entries(queued) -> bytes: the JSON of queued result records, comma-separated"},
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
    return PyModule_Create(&module);
}
