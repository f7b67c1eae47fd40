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
#include <stdio.h>
#include <string.h>
#include <time.h>

static EVP_MD *sha256;
static EVP_MD_CTX *hasher;
/* The formatted second of the last call (the GIL serialises callers). */
static long long cached_second = -1;
static char second_text[32];

static const char HEAD[] = "{\"body\":";
static const char HASH[] = ",\"hash\":\"";
static const char PREV[] = "\",\"prev\":\"";
static const char TAIL[] = "\"}\n";

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
    if (seq < 0 || ns < 0) {
        PyErr_SetString(PyExc_ValueError, "seal: seq and ns must not be negative");
        return NULL;
    }
    long long micros_total = ns / 1000;
    long long second = micros_total / 1000000;
    long micros = (long)(micros_total % 1000000);
    if (second != cached_second) {
        time_t t = (time_t)second;
        struct tm tm;
        if (gmtime_r(&t, &tm) == NULL
            || strftime(second_text, sizeof second_text, "%Y-%m-%dT%H:%M:%S", &tm) == 0) {
            PyErr_SetString(PyExc_ValueError, "seal: time out of range");
            return NULL;
        }
        cached_second = second;
    }
    /* The body's tail: ,"seq":N,"time":"YYYY-MM-DDTHH:MM:SS.ffffffZ"} */
    char tail[128];
    int tail_len = snprintf(tail, sizeof tail, ",\"seq\":%lld,\"time\":\"%s.%06ldZ\"}", seq,
                            second_text, micros);
    if (tail_len < 0 || tail_len >= (int)sizeof tail) {
        PyErr_SetString(PyExc_ValueError, "seal: time out of range");
        return NULL;
    }
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

static PyMethodDef methods[] = {
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(prev, fixed, seq, ns) -> (line, digest): a statement record completed and chained"},
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
