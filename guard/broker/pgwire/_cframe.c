/* guard.broker.pgwire._cframe: the relay's byte scanning, compiled.
 *
 * The compiled twin of parts of guard/broker/pgwire/parser.py (the reference): `scan`
 * frames the buffered tagged messages the way `_Framer.drain` does (the same bytes; a small
 * message as a bytes copy rather than a view), in the parser's buffer or, for
 * `_Framer.feed_drain`, in a read as it came (bytes), and the fast accessors
 * (`cstring_body`, `execute_portal`, `parse_statement`, `bind_names`, `describe_target`)
 * read a framed message's names as their namesakes there do; `data_rows` splits a run of
 * DataRows the gateway masks into their values (parser.data_rows) and `data_row` builds one
 * again (encoder.data_row). Selected by
 * guard.broker.proxy.speedups unless GUARD_PURE_PYTHON=1; tests/pgwire/test_speedups.py holds
 * the two equal on the same inputs.
 *
 * Only the well-formed case is handled here. Whenever an accessor's input is malformed (or
 * its names are not UTF-8) it calls the pure-Python function of the same name with the same
 * arguments, so every error a client or server can provoke is raised by the reference
 * itself, message for message; `data_rows` hands back a malformed row's bytes for the
 * reference decoder to raise on, as parser.data_rows does. `scan` reports a malformed header's position and leaves the
 * error to the parser, as the pure drain() does.
 *
 * CPython C API only; no guard import except the reference module, and only on those error
 * paths.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static inline long
read_int32(const unsigned char *p)
{
    /* Big-endian Int32, signed as PostgreSQL's length words are read. */
    return (long)(int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
                           ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

static inline void
write_int32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* ------------------------------------------------------------------ scan */

/* A message (or run) up to this many bytes is handed out as a bytes copy, not a memoryview
 * slice: the slice costs ~900 instructions (two ints, a slice object, a view object), the
 * copy ~150; and bytes are cheaper downstream too (indexing, joins, cache keys). 512 is
 * pymalloc's limit: above it each copy is a malloc, and runs of rows stay zero-copy. */
#define SMALL_MESSAGE 512


PyDoc_STRVAR(scan_doc,
"scan(view, pos, valid, runs, limit, out) -> (pos, need)\n\n"
"`view`: a memoryview, or bytes. Append to `out` a slice of it for every complete tagged message from `pos` on, a run\n"
"of consecutive messages of a `runs` type joined into one slice (as _Framer.drain does);\n"
"a slice of at most 512 bytes as a bytes copy.\n"
"Stops at the first message that is not complete: `need` is how many bytes from the\n"
"returned `pos` it takes (5 for the header, else 1 + its length); or at a malformed header\n"
"(a tag not in `valid`, a length under 4 or over `limit`): `need` is 0.");

static PyObject *steal_pair(PyObject *first, PyObject *second);

static PyObject *
scan(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 6 arguments");
        return NULL;
    }
    PyObject *view = args[0], *out = args[5];
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    long long limit = PyLong_AsLongLong(args[4]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(args[2]) || PyBytes_GET_SIZE(args[2]) != 256 ||
        !PyBytes_Check(args[3]) || PyBytes_GET_SIZE(args[3]) != 256) {
        PyErr_SetString(PyExc_TypeError, "scan(): valid and runs must be 256-byte tables");
        return NULL;
    }
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "scan(): out must be a list");
        return NULL;
    }
    const unsigned char *valid = (const unsigned char *)PyBytes_AS_STRING(args[2]);
    const unsigned char *runs = (const unsigned char *)PyBytes_AS_STRING(args[3]);

    Py_buffer buffer;
    if (PyObject_GetBuffer(view, &buffer, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *buf = buffer.buf;
    Py_ssize_t size = buffer.len;
    Py_ssize_t need = 0;
    /* What large messages are sliced from: the view itself, or a view of the bytes. */
    PyObject *sliceable = PyMemoryView_Check(view) ? Py_NewRef(view) : NULL;
    if (pos < 0 || pos > size) {
        Py_XDECREF(sliceable);
        PyBuffer_Release(&buffer);
        PyErr_SetString(PyExc_ValueError, "scan(): pos outside the buffer");
        return NULL;
    }
    for (;;) {
        if (size - pos < 5) {
            need = 5;
            break;
        }
        unsigned char kind = buf[pos];
        long long length = read_int32(buf + pos + 1);
        if (!valid[kind] || length < 4 || length > limit) {
            need = 0; /* malformed: the parser raises its error for it */
            break;
        }
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (end > size) {
            need = 1 + (Py_ssize_t)length;
            break;
        }
        if (runs[kind]) {
            /* One header read per message: this loop runs once per result row. */
            while (size - end >= 5) {
                long long next = read_int32(buf + end + 1);
                if (buf[end] != kind || next < 4 || next > limit)
                    break;
                Py_ssize_t after = end + 1 + (Py_ssize_t)next;
                if (after > size)
                    break;
                end = after;
            }
        }
        PyObject *slice;
        if (end - pos <= SMALL_MESSAGE) {
            slice = PyBytes_FromStringAndSize((const char *)buf + pos, end - pos);
        } else {
            if (sliceable == NULL) /* bytes given: its one view, made at its first large slice */
                sliceable = PyMemoryView_FromObject(view);
            slice = sliceable == NULL ? NULL : PySequence_GetSlice(sliceable, pos, end);
        }
        if (slice == NULL || PyList_Append(out, slice) < 0) {
            Py_XDECREF(slice);
            Py_XDECREF(sliceable);
            PyBuffer_Release(&buffer);
            return NULL;
        }
        Py_DECREF(slice);
        pos = end;
    }
    Py_XDECREF(sliceable);
    PyBuffer_Release(&buffer);
    /* (Py_BuildValue parses its format string at every call: ~450 instructions, twice per
     * transaction.) */
    PyObject *pos_obj = PyLong_FromSsize_t(pos);
    PyObject *need_obj = pos_obj == NULL ? NULL : PyLong_FromSsize_t(need);
    if (need_obj == NULL) {
        Py_XDECREF(pos_obj);
        return NULL;
    }
    return steal_pair(pos_obj, need_obj);
}

/* ------------------------------------------------------------------ accessors */

/* Call the pure-Python accessor `name` of guard.broker.pgwire.parser with these arguments:
 * the reference raises the error the input deserves (or, should this file be stricter than
 * it, returns its value). */
static PyObject *
reference(const char *name, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *parser = PyImport_ImportModule("guard.broker.pgwire.parser");
    if (parser == NULL)
        return NULL;
    PyObject *func = PyObject_GetAttrString(parser, name);
    Py_DECREF(parser);
    if (func == NULL)
        return NULL;
    PyObject *result = PyObject_Vectorcall(func, args, (size_t)nargs, NULL);
    Py_DECREF(func);
    return result;
}

/* The bytes of a framed message (a memoryview, or any contiguous buffer). */
static int
get_raw(PyObject *raw, Py_buffer *buffer)
{
    return PyObject_GetBuffer(raw, buffer, PyBUF_SIMPLE);
}

/* UTF-8 text, or NULL with no error set when the bytes are not UTF-8. */
static PyObject *
utf8_or_null(const unsigned char *p, Py_ssize_t n)
{
    PyObject *text = PyUnicode_DecodeUTF8((const char *)p, n, NULL);
    if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        PyErr_Clear();
    return text;
}

/* An accessor's fast path: its value for the message bytes p[0:n], or NULL, with an error
 * set (out of memory) or without one (input it does not handle: the reference decides). */
typedef PyObject *(*fast_path)(const unsigned char *p, Py_ssize_t n);

/* An accessor taking `expected` arguments, the message first: the fast path on its bytes,
 * else the pure-Python reference with the same arguments. */
static PyObject *
accessor(const char *name, fast_path fast, Py_ssize_t expected, PyObject *const *args,
         Py_ssize_t nargs)
{
    if (nargs != expected)
        return reference(name, args, nargs);
    Py_buffer b;
    if (get_raw(args[0], &b) < 0)
        return NULL;
    PyObject *value = fast((const unsigned char *)b.buf, b.len);
    PyBuffer_Release(&b);
    if (value != NULL || PyErr_Occurred())
        return value;
    return reference(name, args, nargs);
}

PyDoc_STRVAR(cstring_body_doc,
"cstring_body(raw, what) -> str: the one NUL-terminated UTF-8 string a message consists of.");

static PyObject *
cstring_body_fast(const unsigned char *p, Py_ssize_t n)
{
    if (n >= 6 && p[n - 1] == 0 && memchr(p + 5, 0, (size_t)(n - 6)) == NULL)
        return utf8_or_null(p + 5, n - 6);
    return NULL;
}

static PyObject *
cstring_body(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    return accessor("cstring_body", cstring_body_fast, 2, args, nargs);
}

PyDoc_STRVAR(execute_portal_doc, "execute_portal(raw) -> str: the portal an Execute runs.");

static PyObject *
execute_portal_fast(const unsigned char *p, Py_ssize_t n)
{
    if (n >= 10 && p[n - 5] == 0 && memchr(p + 5, 0, (size_t)(n - 10)) == NULL)
        return utf8_or_null(p + 5, n - 10);
    return NULL;
}

static PyObject *
execute_portal(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    return accessor("execute_portal", execute_portal_fast, 1, args, nargs);
}

/* The two NUL-terminated strings at the front of p[0:n]: their terminators' offsets. */
static int
two_cstrings(const unsigned char *p, Py_ssize_t n, Py_ssize_t *end1, Py_ssize_t *end2)
{
    const unsigned char *first = memchr(p, 0, (size_t)n);
    if (first == NULL)
        return 0;
    *end1 = first - p;
    const unsigned char *second = memchr(first + 1, 0, (size_t)(n - *end1 - 1));
    if (second == NULL)
        return 0;
    *end2 = second - p;
    return 1;
}

/* (first, second), stealing both references; NULL with both released when out of memory. */
static PyObject *
steal_pair(PyObject *first, PyObject *second)
{
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(first);
        Py_DECREF(second);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, first);
    PyTuple_SET_ITEM(pair, 1, second);
    return pair;
}

/* (first, second) decoded, or NULL (no error set: not UTF-8). */
static PyObject *
utf8_pair(const unsigned char *p, Py_ssize_t end1, Py_ssize_t end2)
{
    PyObject *first = utf8_or_null(p, end1);
    if (first == NULL)
        return NULL;
    PyObject *second = utf8_or_null(p + end1 + 1, end2 - end1 - 1);
    if (second == NULL) {
        Py_DECREF(first);
        return NULL;
    }
    return steal_pair(first, second);
}

PyDoc_STRVAR(parse_statement_doc,
"parse_statement(raw) -> (name, query): the statement name and text of a Parse.");

static PyObject *
parse_statement_fast(const unsigned char *p, Py_ssize_t len)
{
    if (len < 5)
        return NULL;
    const unsigned char *body = p + 5;
    Py_ssize_t n = len - 5, end1, end2;
    if (!two_cstrings(body, n, &end1, &end2) || n < end2 + 3)
        return NULL;
    Py_ssize_t count = ((Py_ssize_t)body[end2 + 1] << 8) | body[end2 + 2];
    if (n != end2 + 3 + 4 * count)
        return NULL;
    return utf8_pair(body, end1, end2);
}

static PyObject *
parse_statement(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    return accessor("parse_statement", parse_statement_fast, 1, args, nargs);
}

PyDoc_STRVAR(bind_names_doc,
"bind_names(raw) -> (portal, statement) of a Bind, its parameters not read.");

static PyObject *
bind_names_fast(const unsigned char *p, Py_ssize_t len)
{
    /* The reference reads a window first, then the whole body: the first two NULs of the
     * body either way. */
    Py_ssize_t end1, end2;
    if (len < 5 || !two_cstrings(p + 5, len - 5, &end1, &end2))
        return NULL;
    return utf8_pair(p + 5, end1, end2);
}

static PyObject *
bind_names(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    return accessor("bind_names", bind_names_fast, 1, args, nargs);
}

PyDoc_STRVAR(describe_target_doc,
"describe_target(raw, what) -> (b'S' or b'P', name) of a Describe or Close.");

static PyObject *
describe_target_fast(const unsigned char *p, Py_ssize_t n)
{
    if (n < 7 || p[n - 1] != 0 || (p[5] != 'S' && p[5] != 'P') ||
        memchr(p + 6, 0, (size_t)(n - 7)) != NULL)
        return NULL;
    PyObject *name = utf8_or_null(p + 6, n - 7);
    if (name == NULL)
        return NULL;
    PyObject *kind = PyBytes_FromStringAndSize((const char *)p + 5, 1);
    if (kind == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    return steal_pair(kind, name);
}

static PyObject *
describe_target(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    return accessor("describe_target", describe_target_fast, 2, args, nargs);
}

PyDoc_STRVAR(extended_request_doc,
"extended_request(data, limit) -> (parse name, query, portal, statement, describe kind,\n"
"describe name) or None: the names of a read that is exactly one `[Parse] Bind [Describe]\n"
"Execute Sync` request, each message whole and well-formed, the Execute running the Bind's\n"
"portal (parser.extended_request). Without a Parse its two are \"\" and None, without a\n"
"Describe None and None.");

/* result[at] and result[at + 1]: the two values an accessor's fast path reads of the message
 * p[0:n]. 0 when it does not take the message; `*failed` set when that is an error (out of
 * memory) rather than input the fast path leaves to the reference. */
static int
put_part(PyObject *result, Py_ssize_t at, fast_path fast, const unsigned char *p, Py_ssize_t n,
         int *failed)
{
    PyObject *pair = fast(p, n);
    if (pair == NULL) {
        *failed = PyErr_Occurred() != NULL;
        return 0;
    }
    PyTuple_SET_ITEM(result, at, Py_NewRef(PyTuple_GET_ITEM(pair, 0)));
    PyTuple_SET_ITEM(result, at + 1, Py_NewRef(PyTuple_GET_ITEM(pair, 1)));
    Py_DECREF(pair);
    return 1;
}

static PyObject *
extended_request(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "extended_request() takes bytes and a limit");
        return NULL;
    }
    long long limit = PyLong_AsLongLong(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    /* Where each of the (at most five) messages starts and ends, and its tag. */
    Py_ssize_t start[6], end[6];
    char tags[6];
    int count = 0;
    Py_ssize_t pos = 0;
    while (pos < size) {
        if (count == 5 || size - pos < 5)
            Py_RETURN_NONE;
        long long length = read_int32(buf + pos + 1);
        if (length < 4 || length > limit || (long long)(size - pos - 1) < length)
            Py_RETURN_NONE;
        tags[count] = (char)buf[pos];
        start[count] = pos;
        pos += 1 + (Py_ssize_t)length;
        end[count++] = pos;
    }
    int parse = -1, bind, describe = -1, execute, sync;
    if (count == 5 && memcmp(tags, "PBDES", 5) == 0) {
        parse = 0, bind = 1, describe = 2, execute = 3, sync = 4;
    } else if (count == 4 && memcmp(tags, "PBES", 4) == 0) {
        parse = 0, bind = 1, execute = 2, sync = 3;
    } else if (count == 4 && memcmp(tags, "BDES", 4) == 0) {
        bind = 0, describe = 1, execute = 2, sync = 3;
    } else if (count == 3 && memcmp(tags, "BES", 3) == 0) {
        bind = 0, execute = 1, sync = 2;
    } else {
        Py_RETURN_NONE;
    }
    if (end[sync] - start[sync] != 5)
        Py_RETURN_NONE;
    /* The Execute runs the Bind's portal: its name, NUL-terminated with none inside (as
     * execute_portal_fast checks), is the Bind's first string with its NUL, whose UTF-8
     * bind_names_fast checks below: the name is not decoded twice. */
    const unsigned char *e = buf + start[execute];
    Py_ssize_t en = end[execute] - start[execute];
    const unsigned char *b = buf + start[bind];
    Py_ssize_t bn = end[bind] - start[bind];
    if (en < 10 || e[en - 5] != 0 || memchr(e + 5, 0, (size_t)(en - 10)) != NULL ||
        bn < en - 4 || memcmp(e + 5, b + 5, (size_t)(en - 9)) != 0)
        Py_RETURN_NONE;

    int failed = 0;
    PyObject *result = PyTuple_New(6);
    if (result == NULL)
        return NULL;
    if (parse >= 0) {
        if (!put_part(result, 0, parse_statement_fast, buf + start[parse],
                      end[parse] - start[parse], &failed))
            goto none;
    } else {
        PyObject *empty = PyUnicode_FromStringAndSize("", 0);
        if (empty == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, 0, empty);
        PyTuple_SET_ITEM(result, 1, Py_NewRef(Py_None));
    }
    if (!put_part(result, 2, bind_names_fast, b, bn, &failed))
        goto none;
    if (describe >= 0) {
        if (!put_part(result, 4, describe_target_fast, buf + start[describe],
                      end[describe] - start[describe], &failed))
            goto none;
    } else {
        PyTuple_SET_ITEM(result, 4, Py_NewRef(Py_None));
        PyTuple_SET_ITEM(result, 5, Py_NewRef(Py_None));
    }
    return result;
none:
    /* Slots not yet set are NULL, which tuple deallocation skips. */
    Py_DECREF(result);
    return failed ? NULL : Py_NewRef(Py_None);
}

/* ------------------------------------------------------------------ result rows */

/* The function `name` of the pure-Python module `module`, called with these arguments. */
static PyObject *
reference_in(const char *module, const char *name, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *mod = PyImport_ImportModule(module);
    if (mod == NULL)
        return NULL;
    PyObject *func = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    if (func == NULL)
        return NULL;
    PyObject *result = PyObject_Vectorcall(func, args, (size_t)nargs, NULL);
    Py_DECREF(func);
    return result;
}

/* The values of the DataRow body p[0:n] as a tuple; NULL without an error set when the
 * body is malformed by the reference decoder's rules (parser._data_row: an Int16 count
 * whose Int32 lengths fit, -1 for NULL and no other negative length, each value within the
 * body, nothing after the last). */
static PyObject *
row_values(const unsigned char *p, Py_ssize_t n)
{
    if (n < 2)
        return NULL;
    Py_ssize_t count = ((Py_ssize_t)p[0] << 8) | p[1];
    if (2 + 4 * count > n)
        return NULL;
    PyObject *values = PyTuple_New(count);
    if (values == NULL)
        return NULL;
    Py_ssize_t pos = 2;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (n - pos < 4)
            goto malformed;
        long length = read_int32(p + pos);
        pos += 4;
        PyObject *value;
        if (length == -1) {
            value = Py_NewRef(Py_None);
        } else {
            if (length < 0 || length > n - pos)
                goto malformed;
            value = PyBytes_FromStringAndSize((const char *)p + pos, length);
            if (value == NULL) {
                Py_DECREF(values);
                return NULL;
            }
            pos += length;
        }
        PyTuple_SET_ITEM(values, i, value);
    }
    if (pos == n)
        return values;
malformed:
    Py_DECREF(values);
    return NULL;
}

PyDoc_STRVAR(data_rows_doc,
"data_rows(run) -> (rows, fault): the values of each DataRow of a run, up to the first\n"
"malformed row, which is `fault` (its bytes; None when there is none).");

static PyObject *
data_rows(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1)
        return reference_in("guard.broker.pgwire.parser", "data_rows", args, nargs);
    Py_buffer b;
    if (get_raw(args[0], &b) < 0)
        return NULL;
    const unsigned char *p = b.buf;
    Py_ssize_t end = b.len, pos = 0;
    PyObject *rows = PyList_New(0), *fault = NULL;
    if (rows == NULL)
        goto error;
    while (pos < end) {
        long long length = end - pos >= 5 ? read_int32(p + pos + 1) : -1;
        if (p[pos] != 'D' || length < 4 || length > end - pos - 1) {
            /* Not a run drain() framed: the reference reads it, whatever it is. */
            Py_DECREF(rows);
            PyBuffer_Release(&b);
            return reference_in("guard.broker.pgwire.parser", "data_rows", args, nargs);
        }
        PyObject *values = row_values(p + pos + 5, (Py_ssize_t)length - 4);
        if (values == NULL) {
            if (PyErr_Occurred())
                goto error;
            fault = PyBytes_FromStringAndSize((const char *)p + pos, 1 + (Py_ssize_t)length);
            if (fault == NULL)
                goto error;
            break;
        }
        int failed = PyList_Append(rows, values);
        Py_DECREF(values);
        if (failed < 0)
            goto error;
        pos += 1 + (Py_ssize_t)length;
    }
    PyBuffer_Release(&b);
    return steal_pair(rows, fault == NULL ? Py_NewRef(Py_None) : fault);
error:
    Py_XDECREF(rows);
    PyBuffer_Release(&b);
    return NULL;
}

PyDoc_STRVAR(data_row_doc,
"data_row(values) -> bytes: the DataRow of these values (bytes or None), as\n"
"encoder.data_row encodes it.");

static PyObject *
data_row(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 || !(PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0])))
        return reference_in("guard.broker.pgwire.encoder", "data_row", args, nargs);
    PyObject *seq = args[0];
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t total = 4 + 2 + 4 * count;
    if (count > 0xFFFF)
        return reference_in("guard.broker.pgwire.encoder", "data_row", args, nargs);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = items[i];
        if (value == Py_None)
            continue;
        if (!PyBytes_CheckExact(value) || PyBytes_GET_SIZE(value) > INT32_MAX - total)
            return reference_in("guard.broker.pgwire.encoder", "data_row", args, nargs);
        total += PyBytes_GET_SIZE(value);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, 1 + total);
    if (out == NULL)
        return NULL;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    *w++ = 'D';
    write_int32(w, (uint32_t)total);
    w += 4;
    *w++ = (unsigned char)(count >> 8);
    *w++ = (unsigned char)count;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = items[i];
        if (value == Py_None) {
            write_int32(w, 0xFFFFFFFFu);
            w += 4;
            continue;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(value);
        write_int32(w, (uint32_t)n);
        memcpy(w + 4, PyBytes_AS_STRING(value), (size_t)n);
        w += 4 + n;
    }
    return out;
}

/* ------------------------------------------------------------------ writes */

/* A released view must be refused as len() refuses it: left to the reference. */
#ifdef _Py_MEMORYVIEW_RELEASED
#define VIEW_RELEASED(o) (((PyMemoryViewObject *)(o))->flags & _Py_MEMORYVIEW_RELEASED)
#else
#define VIEW_RELEASED(o) 1 /* cannot tell here: every view goes to the reference */
#endif

PyDoc_STRVAR(join_small_doc,
"join_small(chunks, limit) -> bytes or None: the chunks joined, or None when together\n"
"they are over `limit` bytes (as encoder.join_small).");

static PyObject *
join_small(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_CheckExact(args[0]) || !PyLong_CheckExact(args[1]))
        return reference_in("guard.broker.pgwire.encoder", "join_small", args, nargs);
    long long limit = PyLong_AsLongLong(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *chunks = args[0];
    Py_ssize_t count = PyList_GET_SIZE(chunks), total = 0;
    /* Only bytes and views of bytes (C-contiguous, one byte per item): their len() is
     * their size. Anything else is the reference's to join (or refuse). */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *chunk = PyList_GET_ITEM(chunks, i);
        Py_ssize_t n;
        if (PyBytes_CheckExact(chunk)) {
            n = PyBytes_GET_SIZE(chunk);
        } else if (PyMemoryView_Check(chunk)) {
            Py_buffer *view = PyMemoryView_GET_BUFFER(chunk);
            if (VIEW_RELEASED(chunk) || view->itemsize != 1 || view->ndim != 1 ||
                !PyBuffer_IsContiguous(view, 'C'))
                return reference_in("guard.broker.pgwire.encoder", "join_small", args, nargs);
            n = view->len;
        } else {
            return reference_in("guard.broker.pgwire.encoder", "join_small", args, nargs);
        }
        total += n; /* every chunk looked at first, as the reference's sum() does */
    }
    if (total > limit)
        Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    char *w = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *chunk = PyList_GET_ITEM(chunks, i);
        if (PyBytes_CheckExact(chunk)) {
            memcpy(w, PyBytes_AS_STRING(chunk), (size_t)PyBytes_GET_SIZE(chunk));
            w += PyBytes_GET_SIZE(chunk);
        } else {
            Py_buffer *view = PyMemoryView_GET_BUFFER(chunk);
            memcpy(w, view->buf, (size_t)view->len);
            w += view->len;
        }
    }
    return out;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL, scan_doc},
    {"cstring_body", (PyCFunction)(void (*)(void))cstring_body, METH_FASTCALL,
     cstring_body_doc},
    {"execute_portal", (PyCFunction)(void (*)(void))execute_portal, METH_FASTCALL,
     execute_portal_doc},
    {"parse_statement", (PyCFunction)(void (*)(void))parse_statement, METH_FASTCALL,
     parse_statement_doc},
    {"bind_names", (PyCFunction)(void (*)(void))bind_names, METH_FASTCALL, bind_names_doc},
    {"describe_target", (PyCFunction)(void (*)(void))describe_target, METH_FASTCALL,
     describe_target_doc},
    {"extended_request", (PyCFunction)(void (*)(void))extended_request, METH_FASTCALL,
     extended_request_doc},
    {"data_rows", (PyCFunction)(void (*)(void))data_rows, METH_FASTCALL, data_rows_doc},
    {"data_row", (PyCFunction)(void (*)(void))data_row, METH_FASTCALL, data_row_doc},
    {"join_small", (PyCFunction)(void (*)(void))join_small, METH_FASTCALL, join_small_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "guard.broker.pgwire._cframe",
    "The relay's byte scanning, compiled (parser.py is the reference).",
    0,
    methods,
};

PyMODINIT_FUNC
PyInit__cframe(void)
{
    return PyModule_Create(&module);
}
