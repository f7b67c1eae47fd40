/* guard.broker.proxy._ctls: a TLS stream transport whose records C moves.
 *
 *   TLSTransport(ssl_socket, fd, loop, extra)
 *       ssl_socket  the `_ssl._SSLSocket` of a finished handshake over memory BIOs
 *                   (`ssl.SSLObject._sslobj`): OpenSSL's SSL object, its context and its
 *                   verification stay Python's `ssl`'s; only the records move here
 *       fd          the connected socket, now this transport's (it closes it)
 *       loop        the event loop (its add_reader/add_writer drive the socket)
 *       extra       get_extra_info's answers (peername, sslcontext, ssl_object, ...)
 *
 * An asyncio.Transport by its methods (write, writelines, pause/resume_reading, close, abort,
 * flow control with the protocol's pause_writing/resume_writing), for the gateway's pump
 * (proxy/pump.py) and for asyncio streams. Why it exists: per pgbench transaction, moving
 * four TLS records through uvloop's TLS transport and `proxy.tlslayer` costs the gateway
 * about 3.4 us of CPU more than this (bench/floor_relay.py, `c` against `bio`): one recv
 * and one send per record batch, no Python frame per record, no bytes object for
 * ciphertext.
 *
 * OpenSSL's functions are looked up in the library `_ssl` itself loaded (dlopen with
 * RTLD_NOLOAD): the SSL object is `_ssl`'s, so only that library's functions may touch it.
 * The object's layout is CPython's (`Modules/_ssl.c`: the SSL pointer follows the socket
 * weakref) and is checked before use: the SSL's app data must be the object itself (CPython
 * sets it so) and both its BIOs memory BIOs; anything else is a TypeError, and the caller
 * keeps its Python transport (`proxy.tlstransport`). The memory BIOs are then replaced by
 * the transport's own (see "The BIO").
 *
 * What it must not do: relay a record that does not decrypt (the connection ends with an
 * ssl.SSLError, as a tampered record would), write after close, or lose ciphertext the
 * handshake's reader had already received (taken from the read BIO when adopted, and
 * delivered first when reading starts). It reads one recv's worth per readiness event (the
 * loop is level-triggered: no extra recv to see EAGAIN) and sends at once while the socket
 * takes it; writelines sends its pieces together.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct ssl_st SSL;
typedef struct bio_st BIO;

/* CPython's _ssl._SSLSocket starts so (Modules/_ssl.c, 3.8 to 3.13); checked at wrap time
   against the SSL's app data, which CPython sets to that object. */
typedef struct { PyObject_HEAD PyObject *Socket; SSL *ssl; } SSLSocketHead;

#define WANT_READ 2
#define CTRL_CLEAR_MODE 78          /* SSL_clear_mode is this SSL_ctrl (a macro in ssl.h) */
#define CTRL_SET_GROUPS_LIST 92     /* SSL_set1_groups_list, likewise */
#define MODE_RELEASE_BUFFERS 0x10L  /* SSL_MODE_RELEASE_BUFFERS */
#define ZERO_RETURN 6
#define BIO_TYPE_MEM (1 | 0x0400)
#define BIO_TYPE_SOURCE_SINK 0x0400
#define BIO_FLAGS_READ 0x01
#define BIO_FLAGS_RWS 0x07        /* read, write, special: what BIO_clear_retry_flags clears */
#define BIO_FLAGS_SHOULD_RETRY 0x08
#define BIO_CTRL_PENDING 10
#define BIO_CTRL_FLUSH 11
#define OUT_KEEP (256 * 1024)  /* the largest send buffer kept once empty */
#define HANDSHAKE_MAX (1 << 30) /* more than any handshake leaves in a memory BIO */
#define OUT_FIRST (16 * 1024)  /* a connection's first send buffer: a few records' worth */
#define MAX_PLAIN (16 * 1024)  /* a TLS record's largest plaintext (RFC 8446 5.1) */

static int (*SSL_read_ex_)(SSL *, void *, size_t, size_t *);
static int (*SSL_write_ex_)(SSL *, const void *, size_t, size_t *);
static int (*SSL_get_error_)(const SSL *, int);
static int (*SSL_pending_)(const SSL *);
static int (*SSL_has_pending_)(const SSL *);
static BIO *(*SSL_get_rbio_)(const SSL *);
static BIO *(*SSL_get_wbio_)(const SSL *);
static void *(*SSL_get_ex_data_)(const SSL *, int);
static int (*SSL_shutdown_)(SSL *);
static long (*SSL_ctrl_)(SSL *, int, long, void *);
static int (*BIO_read_)(BIO *, void *, int);
static size_t (*BIO_ctrl_pending_)(BIO *);
static int (*BIO_method_type_)(const BIO *);
typedef struct bio_method_st BIO_METHOD;
static int (*BIO_get_new_index_)(void);
static BIO_METHOD *(*BIO_meth_new_)(int, const char *);
static int (*BIO_meth_set_write_)(BIO_METHOD *, int (*)(BIO *, const char *, int));
static int (*BIO_meth_set_read_)(BIO_METHOD *, int (*)(BIO *, char *, int));
static int (*BIO_meth_set_ctrl_)(BIO_METHOD *, long (*)(BIO *, int, long, void *));
static int (*BIO_meth_set_create_)(BIO_METHOD *, int (*)(BIO *));
static BIO *(*BIO_new_)(const BIO_METHOD *);
static int (*BIO_up_ref_)(BIO *);
static int (*BIO_free_)(BIO *);
static void (*BIO_set_data_)(BIO *, void *);
static void *(*BIO_get_data_)(BIO *);
static void (*BIO_set_init_)(BIO *, int);
static void (*BIO_set_flags_)(BIO *, int);
static void (*BIO_clear_flags_)(BIO *, int);
static void (*SSL_set0_rbio_)(SSL *, BIO *);
static void (*SSL_set0_wbio_)(SSL *, BIO *);
static unsigned long (*ERR_get_error_)(void);
static void (*ERR_clear_error_)(void);
static unsigned long (*ERR_peek_error_)(void);
static void (*ERR_error_string_n_)(unsigned long, char *, size_t);

static PyObject *SSLError;            /* ssl.SSLError */
static PyObject *str_add_reader, *str_remove_reader, *str_add_writer, *str_remove_writer,
    *str_call_soon, *str_data_received, *str_eof_received, *str_connection_lost,
    *str_pause_writing, *str_resume_writing, *str_call_exception_handler;

static char rbuf[1 << 16]; /* one read's ciphertext: the GIL is held from recv until TLS has
                              taken all of it (deliver) */
static BIO_METHOD *transport_bio; /* the records' BIO: see "The BIO" below */

typedef struct {
    PyObject_HEAD
    int fd;
    SSL *ssl;
    BIO *bio;                  /* the SSL's BIO now, both ways (this transport's reference) */
    const char *in;            /* ciphertext TLS has yet to take: of this read (rbuf) ... */
    size_t in_left;
    char *carry;               /* ... or left by the handshake's reader, taken first */
    size_t carry_start, carry_end;
    PyObject *sslobj, *loop, *protocol, *extra, *read_ready, *write_ready;
    char *out;                 /* ciphertext the socket has not taken yet */
    Py_ssize_t out_start, out_end, out_cap, high, low;
    char reading, writer_on, protocol_paused, closing, closed;
} Transport;

static PyTypeObject TransportType;

static Py_ssize_t buffered(Transport *t) { return t->out_end - t->out_start; }

/* The loop watches the socket for reading (`reading`) or writing (`writer_on`), or stops:
   add_reader/remove_reader or add_writer/remove_writer, and the flag follows. */
static int watch(Transport *t, int for_reading, int on) {
    if (on && t->closed) return 0;  /* finished: its callbacks are gone (finish) */
    PyObject *fd = PyLong_FromLong(t->fd), *r;
    if (!fd) return -1;
    if (on)
        r = PyObject_CallMethodObjArgs(t->loop, for_reading ? str_add_reader : str_add_writer, fd,
                                       for_reading ? t->read_ready : t->write_ready, NULL);
    else
        r = PyObject_CallMethodOneArg(t->loop, for_reading ? str_remove_reader : str_remove_writer, fd);
    Py_DECREF(fd);
    if (!r) return -1;
    Py_DECREF(r);
    if (for_reading) t->reading = (char)on;
    else t->writer_on = (char)on;
    return 0;
}

static void finish(Transport *t, PyObject *exc) {
    if (t->closed) return;
    t->closed = t->closing = 1;
    /* The socket closes either way: a failure to unwatch it is not reported. */
    if (t->reading && watch(t, 1, 0) < 0) PyErr_Clear();
    if (t->writer_on && watch(t, 0, 0) < 0) PyErr_Clear();
    t->reading = t->writer_on = 0;
    close(t->fd);
    t->fd = -1;
    t->out_start = t->out_end = 0;
    if (t->protocol != Py_None) {
        PyObject *cb = PyObject_GetAttr(t->protocol, str_connection_lost);
        if (cb) {
            PyObject *r = PyObject_CallMethodObjArgs(t->loop, str_call_soon, cb, exc ? exc : Py_None, NULL);
            Py_DECREF(cb); if (!r) PyErr_Clear(); Py_XDECREF(r);
        } else PyErr_Clear();
    }
    /* Nothing calls the protocol or the loop's callbacks again (asyncio's transports drop
       the protocol too): without these references a closed connection is freed by its
       reference counts, not left to the cycle collector (the bound methods hold this
       transport; the protocol holds it back). */
    Py_SETREF(t->protocol, Py_NewRef(Py_None));
    Py_CLEAR(t->read_ready);
    Py_CLEAR(t->write_ready);
}

/* The protocol raised, or the connection broke: report and end it (asyncio's
   _fatal_error). Returns None for the loop's callback. */
static PyObject *fatal(Transport *t, const char *message) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value && !PyErr_GivenExceptionMatches(value, PyExc_OSError)) {
        PyObject *ctx = Py_BuildValue("{s:s,s:O,s:O,s:O}", "message", message, "exception", value,
                                      "transport", (PyObject *)t, "protocol", t->protocol);
        if (ctx) {
            PyObject *r = PyObject_CallMethodOneArg(t->loop, str_call_exception_handler, ctx);
            Py_DECREF(ctx); if (!r) PyErr_Clear(); Py_XDECREF(r);
        } else PyErr_Clear();
    }
    finish(t, value);
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
    Py_RETURN_NONE;
}

static int call_protocol(Transport *t, PyObject *name) {
    PyObject *r = PyObject_CallMethodNoArgs(t->protocol, name);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* Too many bytes wait for the socket: the protocol is told to stop writing (once, until
   they drain to the low-water mark). */
static int check_high_water(Transport *t) {
    if (t->protocol_paused || t->closing || buffered(t) <= t->high) return 0;
    t->protocol_paused = 1;
    return call_protocol(t, str_pause_writing);
}

/* Send what the socket takes; what it does not waits for the loop's writer. */
static int send_out(Transport *t) {
    while (buffered(t) > 0) {
        ssize_t s = send(t->fd, t->out + t->out_start, (size_t)buffered(t), MSG_NOSIGNAL);
        if (s < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        t->out_start += s;
    }
    if (buffered(t) == 0) {
        t->out_start = t->out_end = 0;
        if (t->out_cap > OUT_KEEP) {  /* a burst's buffer is not kept for the connection's life */
            free(t->out);
            t->out = NULL;
            t->out_cap = 0;
        }
        if (t->writer_on && watch(t, 0, 0) < 0) return -1;
        if (t->protocol_paused && !t->closing) {
            t->protocol_paused = 0;
            if (call_protocol(t, str_resume_writing) < 0) return -1;
        }
    } else {
        if (!t->writer_on && watch(t, 0, 1) < 0) return -1;
        if (check_high_water(t) < 0) return -1;
        if (t->protocol_paused && buffered(t) <= t->low) {
            t->protocol_paused = 0;
            if (call_protocol(t, str_resume_writing) < 0) return -1;
        }
    }
    return 0;
}

/* Room for `p` more bytes at the out buffer's end (what is sent already is dropped first). */
static int reserve(Transport *t, size_t p) {
    if (t->out_start && t->out_start == t->out_end) t->out_start = t->out_end = 0;
    if ((size_t)(t->out_cap - t->out_end) >= p) return 0;
    if (t->out_start) {
        memmove(t->out, t->out + t->out_start, (size_t)buffered(t));
        t->out_end -= t->out_start;
        t->out_start = 0;
    }
    if ((size_t)(t->out_cap - t->out_end) >= p) return 0;
    Py_ssize_t cap = t->out_end + (Py_ssize_t)p;
    if (cap < 2 * t->out_cap) cap = 2 * t->out_cap;
    if (cap < OUT_FIRST) cap = OUT_FIRST;
    char *n = realloc(t->out, (size_t)cap);
    if (!n) return -1;
    t->out = n;
    t->out_cap = cap;
    return 0;
}

/* The ciphertext TLS produced is in the out buffer (the BIO put it there): to the socket,
   unless the loop's writer is waiting for it (order is kept). */
static int flush_tls(Transport *t) {
    /* Behind bytes the socket has not taken, nothing is sent before the loop's writer. */
    return t->writer_on ? check_high_water(t) : send_out(t);
}

/* The BIO. Python's `ssl` handshakes over two memory BIOs; once the records are this
 * transport's, both are replaced by one BIO of its own whose read takes ciphertext straight
 * from the read's buffer into TLS's record buffer, and whose write appends TLS's records
 * straight to the out buffer. Through the memory BIOs each byte was copied once more each
 * way (into the BIO, then out of it), and the read BIO cleared the memory it grew into:
 * together 10-17 % of a bulk relay's CPU (bench/tls_bulk_relay.py), and 11 % of the
 * gateway's on a COPY TO (186 -> 166 ns a row, medians of 12 runs). It never asks for a
 * retry on write (the out buffer takes everything: flow control is the protocol's, by the
 * high-water mark), and asks for one on read when this read's bytes are all taken. Its data
 * is the transport, or NULL once the transport is gone (the SSL object may outlive it: any
 * later I/O on it fails, and touches nothing freed). It calls nothing of Python's: `ssl`
 * runs SSL_write with the GIL released, so the buffers it fills are malloc's, not PyMem's. */
static int bio_write(BIO *b, const char *buf, int len) {
    Transport *t = BIO_get_data_(b);
    BIO_clear_flags_(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    if (!t || len < 0 || reserve(t, (size_t)len) < 0) return -1;
    memcpy(t->out + t->out_end, buf, (size_t)len);
    t->out_end += len;
    return len;
}

static int bio_read(BIO *b, char *buf, int len) {
    Transport *t = BIO_get_data_(b);
    BIO_clear_flags_(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    if (!t || len < 0) return -1;
    int carried = t->carry_start < t->carry_end;  /* the handshake's leftovers come first */
    size_t left = carried ? t->carry_end - t->carry_start : t->in_left;
    if (!left) {
        BIO_set_flags_(b, BIO_FLAGS_READ | BIO_FLAGS_SHOULD_RETRY);
        return -1;
    }
    size_t n = left < (size_t)len ? left : (size_t)len;
    memcpy(buf, carried ? t->carry + t->carry_start : t->in, n);
    if (carried) t->carry_start += n;
    else { t->in += n; t->in_left -= n; }
    return (int)n;
}

static size_t unread(Transport *t) { return t->in_left + (t->carry_end - t->carry_start); }

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
    Transport *t = BIO_get_data_(b);
    if (cmd == BIO_CTRL_FLUSH) return 1;
    if (cmd == BIO_CTRL_PENDING) return t ? (long)unread(t) : 0;
    return 0;  /* no kTLS, no fd, nothing else a socket BIO would answer */
}

static int bio_create(BIO *b) {
    BIO_set_init_(b, 1);
    return 1;
}

/* SSL_get_error reads the thread's error queue: stale entries (anyone's) must go before a
   call, or a want-read would read as a failure. Clearing an empty queue costs more than
   looking (OpenSSL 3 walks all its slots), and it is empty on the hot path. */
static void clear_errors(void) {
    if (ERR_peek_error_()) ERR_clear_error_();
}

static PyObject *tls_error(const char *what) {
    unsigned long e = ERR_get_error_();
    char msg[256];
    if (e) ERR_error_string_n_(e, msg, sizeof msg);
    else snprintf(msg, sizeof msg, "%s", what);
    PyErr_SetString(SSLError, msg);
    return NULL;
}

static PyObject *T_close(Transport *t, PyObject *unused);

/* The peer ended (close_notify or FIN): the protocol is told, then the transport closes
   once what it has to send is sent (TLS cannot half-close; uvloop's closes so too). */
static PyObject *peer_ended(Transport *t) {
    PyObject *r = PyObject_CallMethodNoArgs(t->protocol, str_eof_received);
    if (!r) return fatal(t, "Fatal error: protocol.eof_received() call failed.");
    Py_DECREF(r);
    return T_close(t, NULL);
}

/* Decrypt what the read BIO holds and hand it to the protocol. */
static PyObject *deliver(Transport *t) {
    /* The plaintext is at most the ciphertext waiting plus what TLS already decrypted,
       plus, when a record begun in an earlier read completes, that record's: TLS holds
       its start and counts it in neither, so room for a record's plaintext is added (or
       the buffer would grow, copying, on nearly every read of a bulk result, whose
       records straddle the reads). Should more be pending once this is full, the buffer
       grows: nothing more may come to deliver it (a stall). */
    size_t cap = unread(t) + (size_t)SSL_pending_(t->ssl);
    if (cap && SSL_has_pending_(t->ssl)) cap += MAX_PLAIN;
    int peer_closed = 0;
    PyObject *plain = NULL;
    size_t used = 0;
    if (cap) {
        plain = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
        if (!plain) return fatal(t, "out of memory");
        clear_errors();
        for (;;) {
            if (used == cap) {
                size_t more = unread(t) + (size_t)SSL_pending_(t->ssl);
                if (!more) break;
                cap += more;
                if (_PyBytes_Resize(&plain, (Py_ssize_t)cap) < 0) return fatal(t, "out of memory");
            }
            size_t n = 0;
            if (SSL_read_ex_(t->ssl, PyBytes_AS_STRING(plain) + used, cap - used, &n)) {
                used += n;
                continue;
            }
            int e = SSL_get_error_(t->ssl, 0);
            if (e == WANT_READ) break;
            if (e == ZERO_RETURN) { peer_closed = 1; break; }
            Py_DECREF(plain);
            t->in_left = 0;
            tls_error("TLS record error");  /* a record that does not decrypt: nothing of it */
            return fatal(t, "TLS error");
        }
    }
    /* The read's buffer is shared: what TLS did not take (after a close_notify) goes. */
    t->in_left = 0;
    /* TLS's own replies (a key update's) go out now. */
    if (flush_tls(t) < 0) { Py_XDECREF(plain); return fatal(t, "send failed"); }
    if (used) {
        if (_PyBytes_Resize(&plain, (Py_ssize_t)used) < 0) return fatal(t, "out of memory");
        PyObject *r = PyObject_CallMethodOneArg(t->protocol, str_data_received, plain);
        Py_DECREF(plain);
        if (!r) return fatal(t, "Fatal error: protocol.data_received() call failed.");
        Py_DECREF(r);
    } else Py_XDECREF(plain);
    if (peer_closed && !t->closing) return peer_ended(t);
    Py_RETURN_NONE;
}

static PyObject *T_read_ready(Transport *t, PyObject *unused) {
    if (t->closed || !t->reading) Py_RETURN_NONE;
    ssize_t n;
    do n = recv(t->fd, rbuf, sizeof rbuf, 0); while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) Py_RETURN_NONE;
        PyErr_SetFromErrno(PyExc_OSError);
        return fatal(t, "recv failed");
    }
    if (n == 0) return peer_ended(t);  /* its FIN (without close_notify: truncation is
                                          the protocol's to judge, as with ssl) */
    t->in = rbuf;
    t->in_left = (size_t)n;
    return deliver(t);
}

static PyObject *T_drain(Transport *t, PyObject *unused) {
    if (t->closed || !t->reading) Py_RETURN_NONE;
    return deliver(t);
}

static PyObject *T_write_ready(Transport *t, PyObject *unused) {
    if (t->closed) Py_RETURN_NONE;
    if (send_out(t) < 0) return fatal(t, "send failed");
    if (t->closing && buffered(t) == 0) finish(t, NULL);
    Py_RETURN_NONE;
}

/* Encrypt one buffer into the write BIO: 0, or -1 for an object that is not a buffer (its
   TypeError raised), or -2 for a TLS failure (its SSLError raised). */
static int encrypt(Transport *t, PyObject *data) {
    Py_buffer v;
    if (PyObject_GetBuffer(data, &v, PyBUF_SIMPLE) < 0) return -1;
    size_t n = 0;
    int ok = !v.len || SSL_write_ex_(t->ssl, v.buf, (size_t)v.len, &n);
    PyBuffer_Release(&v);
    if (ok) return 0;
    tls_error("TLS write failed");
    return -2;
}

static PyObject *T_write(Transport *t, PyObject *data) {
    if (t->closing) Py_RETURN_NONE;
    clear_errors();
    int e = encrypt(t, data);
    if (e == -1) return NULL;
    if (e == -2) return fatal(t, "TLS write failed");
    if (flush_tls(t) < 0) return fatal(t, "send failed");
    Py_RETURN_NONE;
}

/* Several buffers, one after another, sent together: each is encrypted as write() does, and
   the socket is offered them once. One read's output can be several pieces (a row split
   across reads, then the run after it, neither copied into one buffer): a send per piece
   would wake the client once for a 100-byte record and again for the rest, per read. */
static PyObject *T_writelines(Transport *t, PyObject *pieces) {
    if (t->closing) Py_RETURN_NONE;
    PyObject *seq = PySequence_Fast(pieces, "writelines() takes an iterable of buffers");
    if (!seq) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < count; i++)  /* all or nothing, as a join before write() */
        if (!PyObject_CheckBuffer(PySequence_Fast_GET_ITEM(seq, i))) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "writelines() takes buffers");
            return NULL;
        }
    clear_errors();
    for (Py_ssize_t i = 0; i < count; i++) {
        int e = encrypt(t, PySequence_Fast_GET_ITEM(seq, i));
        if (e) {
            Py_DECREF(seq);
            return e == -1 ? NULL : fatal(t, "TLS write failed");
        }
    }
    Py_DECREF(seq);
    if (flush_tls(t) < 0) return fatal(t, "send failed");
    Py_RETURN_NONE;
}

static PyObject *T_pause_reading(Transport *t, PyObject *unused) {
    if (t->reading && !t->closed && watch(t, 1, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *T_resume_reading(Transport *t, PyObject *unused) {
    if (t->reading || t->closing) Py_RETURN_NONE;
    if (watch(t, 1, 1) < 0) return NULL;
    if (unread(t) || SSL_pending_(t->ssl)) {
        /* Records that came before (the handshake's reader's): delivered from the loop. */
        PyObject *drain = PyObject_GetAttrString((PyObject *)t, "_drain");
        if (!drain) return NULL;
        PyObject *r = PyObject_CallMethodOneArg(t->loop, str_call_soon, drain);
        Py_DECREF(drain);
        if (!r) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static PyObject *T_close(Transport *t, PyObject *unused) {
    if (t->closing) Py_RETURN_NONE;
    PyObject *r = T_pause_reading(t, NULL);
    if (!r) return NULL;
    Py_DECREF(r);
    t->closing = 1;
    ERR_clear_error_();
    SSL_shutdown_(t->ssl);  /* close_notify; the peer's is not waited for */
    ERR_clear_error_();
    if (flush_tls(t) < 0) return fatal(t, "send failed");
    if (buffered(t) == 0) finish(t, NULL);
    Py_RETURN_NONE;
}

static PyObject *T_abort(Transport *t, PyObject *unused) {
    finish(t, NULL);
    Py_RETURN_NONE;
}

static PyObject *T_is_closing(Transport *t, PyObject *unused) { return PyBool_FromLong(t->closing); }
static PyObject *T_is_reading(Transport *t, PyObject *unused) { return PyBool_FromLong(t->reading); }
static PyObject *T_get_write_buffer_size(Transport *t, PyObject *unused) { return PyLong_FromSsize_t(buffered(t)); }
static PyObject *T_get_protocol(Transport *t, PyObject *unused) { Py_INCREF(t->protocol); return t->protocol; }
static PyObject *T_set_protocol(Transport *t, PyObject *p) { Py_INCREF(p); Py_SETREF(t->protocol, p); Py_RETURN_NONE; }

static PyObject *T_set_write_buffer_limits(Transport *t, PyObject *args, PyObject *kw) {
    static char *names[] = {"high", "low", NULL};
    PyObject *high = Py_None, *low = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO", names, &high, &low)) return NULL;
    Py_ssize_t h, l;
    if (high == Py_None) h = low == Py_None ? 64 * 1024 : 4 * PyLong_AsSsize_t(low);
    else h = PyLong_AsSsize_t(high);
    if (low == Py_None) l = h / 4; else l = PyLong_AsSsize_t(low);
    if (PyErr_Occurred()) return NULL;
    if (!(h >= l && l >= 0)) { PyErr_Format(PyExc_ValueError, "high (%zd) must be >= low (%zd) must be >= 0", h, l); return NULL; }
    t->high = h; t->low = l;
    Py_RETURN_NONE;
}

static PyObject *T_get_extra_info(Transport *t, PyObject *args) {
    PyObject *name, *dflt = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &name, &dflt)) return NULL;
    PyObject *v = PyDict_GetItemWithError(t->extra, name);
    if (!v) { if (PyErr_Occurred()) return NULL; v = dflt; }
    Py_INCREF(v);
    return v;
}

/* The SSL an `_ssl._SSLSocket` holds, its layout checked (see the top); NULL and a
   TypeError when it is not one or not laid out as this code was built for. */
static SSL *ssl_of(PyObject *sslobj) {
    if (strcmp(Py_TYPE(sslobj)->tp_name, "_ssl._SSLSocket") != 0) {
        PyErr_SetString(PyExc_TypeError, "not an _ssl._SSLSocket");
        return NULL;
    }
    SSL *ssl = ((SSLSocketHead *)sslobj)->ssl;
    if (!ssl || SSL_get_ex_data_(ssl, 0) != (void *)sslobj) {
        PyErr_SetString(PyExc_TypeError, "_ssl._SSLSocket's layout is not the expected one");
        return NULL;
    }
    return ssl;
}

/* The construction (from T_new: no TLSTransport exists uninitialized, whose methods would
   reach a NULL SSL). -1 with an exception, and then the fd is still the caller's: a
   TypeError before anything of the SSL object changed (the caller keeps its own path),
   anything else after (the connection cannot go on). */
static int T_adopt(Transport *t, PyObject *args) {
    PyObject *sslobj, *loop, *extra;
    int fd;
    if (!PyArg_ParseTuple(args, "OiOO!", &sslobj, &fd, &loop, &PyDict_Type, &extra)) return -1;
    SSL *ssl = ssl_of(sslobj);
    if (!ssl) return -1;
    BIO *rbio = SSL_get_rbio_(ssl), *wbio = SSL_get_wbio_(ssl);
    if (!rbio || !wbio || BIO_method_type_(rbio) != BIO_TYPE_MEM || BIO_method_type_(wbio) != BIO_TYPE_MEM) {
        PyErr_SetString(PyExc_TypeError, "the SSL object does not run over memory BIOs");
        return -1;
    }
    /* CPython sets SSL_MODE_RELEASE_BUFFERS on every context: OpenSSL then frees its record
       buffers whenever they are empty and allocates them again for the next record, a
       malloc and free of ~17 KB per record each way (four records a pgbench transaction:
       2.2 % of the gateway's CPU in a perf profile under load, with malloc's locks and
       cache misses). The records here keep their buffers for the connection's life, as
       pgbouncer's do: about 34 KB a TLS leg. */
    SSL_ctrl_(ssl, CTRL_CLEAR_MODE, MODE_RELEASE_BUFFERS, NULL);
    /* The memory BIOs give up what they hold, then the transport's BIO takes their place:
       ciphertext the handshake's reader received is delivered first (carry), and what TLS
       wrote but nobody sent yet (session tickets) goes out first. */
    size_t held = BIO_ctrl_pending_(rbio), unsent = BIO_ctrl_pending_(wbio);
    if (held > HANDSHAKE_MAX || unsent > HANDSHAKE_MAX) {  /* BIO_read takes an int */
        PyErr_SetString(PyExc_TypeError, "the SSL object's BIOs hold more than a handshake's bytes");
        return -1;
    }
    BIO *bio = BIO_new_(transport_bio);
    if (!bio) { PyErr_NoMemory(); return -1; }
    if (held) {
        t->carry = malloc(held);
        if (!t->carry) { BIO_free_(bio); PyErr_NoMemory(); return -1; }
        int n = BIO_read_(rbio, t->carry, (int)held);
        if (n <= 0) { BIO_free_(bio); PyErr_SetString(PyExc_RuntimeError, "the read BIO gave nothing"); return -1; }
        t->carry_end = (size_t)n;
    }
    if (unsent) {
        if (reserve(t, unsent) < 0) { BIO_free_(bio); PyErr_NoMemory(); return -1; }
        int n = BIO_read_(wbio, t->out, (int)unsent);
        if (n <= 0) { BIO_free_(bio); PyErr_SetString(PyExc_RuntimeError, "the write BIO gave nothing"); return -1; }
        t->out_end = n;
    }
    BIO_set_data_(bio, t);
    BIO_up_ref_(bio);  /* one reference each for the SSL's read and write side, one ours */
    BIO_up_ref_(bio);
    SSL_set0_rbio_(ssl, bio);  /* the memory BIOs stay alive: Python's MemoryBIO objects */
    SSL_set0_wbio_(ssl, bio);  /* hold their own references */
    t->bio = bio;
    t->ssl = ssl;
    Py_INCREF(sslobj); t->sslobj = sslobj;
    Py_INCREF(loop); t->loop = loop;
    Py_INCREF(extra); t->extra = extra;
    Py_INCREF(Py_None); t->protocol = Py_None;
    t->read_ready = PyObject_GetAttrString((PyObject *)t, "_read_ready");
    t->write_ready = PyObject_GetAttrString((PyObject *)t, "_write_ready");
    if (!t->read_ready || !t->write_ready) return -1;
    t->high = 64 * 1024; t->low = 16 * 1024;
    t->fd = fd;  /* the transport's now: closed by it */
    return 0;
}

static int T_traverse(Transport *t, visitproc visit, void *arg) {
    Py_VISIT(t->sslobj); Py_VISIT(t->loop); Py_VISIT(t->protocol); Py_VISIT(t->extra);
    Py_VISIT(t->read_ready); Py_VISIT(t->write_ready);
    return 0;
}

static int T_clear(Transport *t) {
    Py_CLEAR(t->loop); Py_CLEAR(t->protocol); Py_CLEAR(t->extra);
    Py_CLEAR(t->read_ready); Py_CLEAR(t->write_ready);
    return 0;
}

static void T_dealloc(Transport *t) {
    PyObject_GC_UnTrack(t);
    if (t->fd >= 0 && !t->closed) close(t->fd);
    T_clear(t);
    if (t->bio) {  /* the SSL object may live on: its BIO no longer knows this transport */
        BIO_set_data_(t->bio, NULL);
        BIO_free_(t->bio);
    }
    Py_CLEAR(t->sslobj);
    free(t->carry);
    free(t->out);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *T_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (kw && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "TLSTransport takes no keyword arguments");
        return NULL;
    }
    Transport *t = (Transport *)type->tp_alloc(type, 0);
    if (!t) return NULL;
    t->fd = -1;
    if (T_adopt(t, args) < 0) {
        Py_DECREF(t);
        return NULL;
    }
    return (PyObject *)t;
}

static PyMethodDef T_methods[] = {
    {"write", (PyCFunction)T_write, METH_O, NULL},
    {"writelines", (PyCFunction)T_writelines, METH_O, NULL},
    {"pause_reading", (PyCFunction)T_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)T_resume_reading, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)T_is_reading, METH_NOARGS, NULL},
    {"is_closing", (PyCFunction)T_is_closing, METH_NOARGS, NULL},
    {"close", (PyCFunction)T_close, METH_NOARGS, NULL},
    {"abort", (PyCFunction)T_abort, METH_NOARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)T_get_write_buffer_size, METH_NOARGS, NULL},
    {"set_write_buffer_limits", (PyCFunction)(void (*)(void))T_set_write_buffer_limits, METH_VARARGS | METH_KEYWORDS, NULL},
    {"get_extra_info", (PyCFunction)T_get_extra_info, METH_VARARGS, NULL},
    {"get_protocol", (PyCFunction)T_get_protocol, METH_NOARGS, NULL},
    {"set_protocol", (PyCFunction)T_set_protocol, METH_O, NULL},
    {"_read_ready", (PyCFunction)T_read_ready, METH_NOARGS, NULL},
    {"_write_ready", (PyCFunction)T_write_ready, METH_NOARGS, NULL},
    {"_drain", (PyCFunction)T_drain, METH_NOARGS, NULL},
    {NULL}};

static PyTypeObject TransportType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guard.broker.proxy._ctls.TLSTransport",
    .tp_basicsize = sizeof(Transport),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = T_new,
    .tp_dealloc = (destructor)T_dealloc,
    .tp_traverse = (traverseproc)T_traverse,
    .tp_clear = (inquiry)T_clear,
    .tp_methods = T_methods,
};

/* prefer_groups(sslobj, groups): the key exchange groups an SSL object not yet handshaken
   offers, in this order (SSL_set1_groups_list, e.g. b"P-256:X25519"): a TLS 1.3 client
   sends a key share for the first. False, and nothing changed, when OpenSSL refuses the
   list (a group this build lacks). */
static PyObject *prefer_groups(PyObject *self, PyObject *args) {
    PyObject *sslobj;
    const char *groups;
    if (!PyArg_ParseTuple(args, "Oy", &sslobj, &groups)) return NULL;
    SSL *ssl = ssl_of(sslobj);
    if (!ssl) return NULL;
    long ok = SSL_ctrl_(ssl, CTRL_SET_GROUPS_LIST, 0, (void *)groups);
    if (ok != 1) ERR_clear_error_();  /* not left for the next SSL call to report */
    return PyBool_FromLong(ok == 1);
}

static PyMethodDef module_methods[] = {
    {"prefer_groups", prefer_groups, METH_VARARGS, "The groups an SSL object offers, in order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "guard.broker.proxy._ctls",
    "A TLS stream transport whose records C moves.", -1, module_methods};

PyMODINIT_FUNC PyInit__ctls(void) {
    PyObject *m = PyImport_ImportModule("_ssl");
    if (!m) return NULL;
    PyObject *f = PyObject_GetAttrString(m, "__file__");
    Py_DECREF(m);
    if (!f) return NULL;
    void *h = dlopen(PyUnicode_AsUTF8(f), RTLD_NOW | RTLD_NOLOAD);
    Py_DECREF(f);
    if (!h) { PyErr_SetString(PyExc_ImportError, "_ssl's library not found"); return NULL; }
#define R(x) x##_ = dlsym(h, #x); if (!x##_) { PyErr_SetString(PyExc_ImportError, #x); return NULL; }
    R(SSL_read_ex) R(SSL_write_ex) R(SSL_get_error) R(SSL_pending) R(SSL_has_pending) R(SSL_get_rbio) R(SSL_get_wbio)
    R(SSL_get_ex_data) R(SSL_shutdown) R(SSL_ctrl) R(BIO_read) R(BIO_ctrl_pending) R(BIO_method_type)
    R(ERR_get_error) R(ERR_clear_error) R(ERR_peek_error) R(ERR_error_string_n)
    R(BIO_get_new_index) R(BIO_meth_new) R(BIO_meth_set_write) R(BIO_meth_set_read) R(BIO_meth_set_ctrl)
    R(BIO_meth_set_create) R(BIO_new) R(BIO_up_ref) R(BIO_free) R(BIO_set_data) R(BIO_get_data)
    R(BIO_set_init) R(BIO_set_flags) R(BIO_clear_flags) R(SSL_set0_rbio) R(SSL_set0_wbio)
    transport_bio = BIO_meth_new_(BIO_get_new_index_() | BIO_TYPE_SOURCE_SINK, "guard transport");
    if (!transport_bio || !BIO_meth_set_write_(transport_bio, bio_write) || !BIO_meth_set_read_(transport_bio, bio_read)
        || !BIO_meth_set_ctrl_(transport_bio, bio_ctrl) || !BIO_meth_set_create_(transport_bio, bio_create)) {
        PyErr_SetString(PyExc_ImportError, "BIO_meth_new");
        return NULL;
    }
    PyObject *ssl = PyImport_ImportModule("ssl");
    if (!ssl) return NULL;
    SSLError = PyObject_GetAttrString(ssl, "SSLError");
    Py_DECREF(ssl);
    if (!SSLError) return NULL;
#define S(x) if (!(str_##x = PyUnicode_InternFromString(#x))) return NULL;
    S(add_reader) S(remove_reader) S(add_writer) S(remove_writer) S(call_soon) S(data_received)
    S(eof_received) S(connection_lost) S(pause_writing) S(resume_writing) S(call_exception_handler)
    if (PyType_Ready(&TransportType) < 0) return NULL;
    PyObject *mm = PyModule_Create(&mod);
    if (!mm) return NULL;
    Py_INCREF(&TransportType);
    if (PyModule_AddObject(mm, "TLSTransport", (PyObject *)&TransportType) < 0) return NULL;
    return mm;
}
