/* guard.broker.sql._cshape: the normalized text of the simplest literal-bearing
 * statements, in C.
 *
 * The compiled twin of `sql.shape.literal_shape` (read its docstring for what is accepted
 * and why the answer is libpg_query's normalization or None). That function is the
 * reference, and this one follows it token kind for token kind: tests/sql/test_sql_shape.py
 * holds the two equal with Hypothesis. The point is speed: libpg_query's normalization
 * parses the statement (~7 us); this is one pass over ASCII bytes.
 *
 *   literal_shape(text: str) -> str | None
 *
 * At most MAX_PARAMS constants are replaced; a text with more gets None (libpg_query).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#define MAX_PARAMS 64

enum { START, WORD, NUMBER, OPERATOR, OPEN };
enum { NO_VALUES, VALUES_WORD, IN_VALUES }; /* see shape.py */

/* Character classes (ASCII only: non-ASCII text is refused before these are read). */
#define C_SPACE 1
#define C_DIGIT 2
#define C_WORD_START 4
#define C_OPERATOR 8
#define C_PUNCT 16
static unsigned char cls[128];

static void
init_classes(void)
{
    const char *p;
    for (p = " \t\n\r\f\v"; *p; p++)
        cls[(unsigned char)*p] |= C_SPACE;
    for (int c = '0'; c <= '9'; c++)
        cls[c] |= C_DIGIT;
    for (int c = 'a'; c <= 'z'; c++)
        cls[c] |= C_WORD_START;
    for (int c = 'A'; c <= 'Z'; c++)
        cls[c] |= C_WORD_START;
    cls['_'] |= C_WORD_START;
    for (p = "*<>=!+-"; *p; p++)
        cls[(unsigned char)*p] |= C_OPERATOR;
    for (p = "(),.;"; *p; p++)
        cls[(unsigned char)*p] |= C_PUNCT;
}

#define IS(c, k) (cls[(unsigned char)(c)] & (k))
#define IS_WORD(c) IS(c, C_WORD_START | C_DIGIT)

/* Case-insensitive: is s[0:len] the lowercase word w? */
static int
word_is(const char *s, Py_ssize_t len, const char *w)
{
    Py_ssize_t k;
    for (k = 0; k < len; k++) {
        char c = s[k];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (w[k] == '\0' || c != w[k])
            return 0;
    }
    return w[k] == '\0';
}

/* Where the unsigned number at i ends, or -1 (see shape._number_end). */
static Py_ssize_t
number_end(const char *s, Py_ssize_t n, Py_ssize_t i)
{
    Py_ssize_t j = i;
    while (j < n && IS(s[j], C_DIGIT))
        j++;
    if (j < n && s[j] == '.') {
        j++;
        if (j >= n || !IS(s[j], C_DIGIT))
            return -1;
        while (j < n && IS(s[j], C_DIGIT))
            j++;
    }
    if (j < n && (IS_WORD(s[j]) || s[j] == '.'))
        return -1;
    return j;
}

/* Is s[i:j] one of the operators a number may follow? */
static int
known_operator(const char *s, Py_ssize_t len)
{
    if (len == 1)
        return s[0] == '=' || s[0] == '<' || s[0] == '>' || s[0] == '+' || s[0] == '-' ||
               s[0] == '*';
    if (len == 2)
        return (s[0] == '<' && (s[1] == '=' || s[1] == '>')) ||
               (s[0] == '>' && s[1] == '=') || (s[0] == '!' && s[1] == '=');
    return 0;
}

static PyObject *
literal_shape(PyObject *self, PyObject *arg)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "literal_shape: text must be str");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(arg))
        Py_RETURN_NONE;
    const char *s = (const char *)PyUnicode_1BYTE_DATA(arg);
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    /* The replaced spans, in order. */
    Py_ssize_t span_start[MAX_PARAMS], span_end[MAX_PARAMS];
    int params = 0, previous = START, ended = 0, last_minus = 0;
    int values = NO_VALUES;
    Py_ssize_t depth = 0; /* in a VALUES list: 1 inside a row */
    Py_ssize_t i = 0;

    while (i < n) {
        char c = s[i];
        if (IS(c, C_SPACE)) {
            i++;
            continue;
        }
        if (ended)
            Py_RETURN_NONE;
        if (IS(c, C_WORD_START)) {
            Py_ssize_t j = i + 1;
            while (j < n && IS_WORD(s[j]))
                j++;
            if (previous == START && !word_is(s + i, j - i, "select") &&
                !word_is(s + i, j - i, "insert") && !word_is(s + i, j - i, "update") &&
                !word_is(s + i, j - i, "delete"))
                Py_RETURN_NONE;
            if (word_is(s + i, j - i, "true") || word_is(s + i, j - i, "false") ||
                word_is(s + i, j - i, "null"))
                Py_RETURN_NONE;
            if (word_is(s + i, j - i, "values"))
                values = VALUES_WORD;
            else if (values == VALUES_WORD || depth == 0)
                values = NO_VALUES;
            previous = WORD;
            i = j;
            continue;
        }
        if (previous == START)
            Py_RETURN_NONE;
        Py_ssize_t number = -1; /* where the digits of a constant starting at i are */
        if (IS(c, C_OPERATOR)) {
            Py_ssize_t j = i + 1, k;
            int bang = c == '!';
            while (j < n && IS(s[j], C_OPERATOR)) {
                if (s[j] == '-' && s[j - 1] == '-')
                    Py_RETURN_NONE; /* a comment, or a double sign */
                bang |= s[j] == '!';
                j++;
            }
            if (!bang)
                while (j - i > 1 && (s[j - 1] == '+' || s[j - 1] == '-'))
                    j--;
            if (!known_operator(s + i, j - i))
                Py_RETURN_NONE;
            if (j - i == 1 && c == '-') {
                k = j;
                while (k < n && IS(s[k], C_SPACE))
                    k++;
                if (k < n && IS(s[k], C_DIGIT)) {
                    if ((previous == OPERATOR && !last_minus) ||
                        (previous == OPEN && values == IN_VALUES && depth == 1))
                        number = k; /* a sign: the constant starts at it */
                    else if (previous != NUMBER)
                        Py_RETURN_NONE;
                }
            }
            if (number < 0) {
                last_minus = j - i == 1 && c == '-';
                previous = OPERATOR;
                i = j;
                continue;
            }
        }
        else if (IS(c, C_DIGIT)) {
            if (previous != OPERATOR && !(previous == OPEN && values == IN_VALUES && depth == 1))
                Py_RETURN_NONE;
            number = i;
        }
        else if (IS(c, C_PUNCT)) {
            if (c == '.' && (previous == NUMBER || (i + 1 < n && IS(s[i + 1], C_DIGIT))))
                Py_RETURN_NONE;
            if (c == ';')
                ended = 1;
            else if (c == '(') {
                if (values == VALUES_WORD)
                    values = IN_VALUES;
                if (values == IN_VALUES)
                    depth++;
            }
            else if (c == ')' && values == IN_VALUES) {
                if (depth == 0)
                    values = NO_VALUES;
                else
                    depth--;
            }
            previous = (c == '(' || c == ',') ? OPEN : WORD;
            i++;
            continue;
        }
        else
            Py_RETURN_NONE;
        /* A constant, from i (its sign or its first digit) to the end of its number. */
        Py_ssize_t end = number_end(s, n, number);
        if (end < 0 || params == MAX_PARAMS)
            Py_RETURN_NONE;
        span_start[params] = i;
        span_end[params++] = end;
        previous = NUMBER;
        i = end;
    }
    if (previous == START)
        Py_RETURN_NONE;
    if (params == 0) {
        Py_INCREF(arg);
        return arg;
    }

    /* "$1".."$64": the output's length first, then one ASCII string filled in place. */
    Py_ssize_t length = n;
    for (int p = 0; p < params; p++)
        length += (p + 1 < 10 ? 2 : 3) - (span_end[p] - span_start[p]);
    PyObject *out = PyUnicode_New(length, 127);
    if (out == NULL)
        return NULL;
    char *o = (char *)PyUnicode_1BYTE_DATA(out);
    Py_ssize_t copied = 0;
    for (int p = 0; p < params; p++) {
        memcpy(o, s + copied, (size_t)(span_start[p] - copied));
        o += span_start[p] - copied;
        *o++ = '$';
        if (p + 1 >= 10)
            *o++ = (char)('0' + (p + 1) / 10);
        *o++ = (char)('0' + (p + 1) % 10);
        copied = span_end[p];
    }
    memcpy(o, s + copied, (size_t)(n - copied));
    return out;
}

static PyMethodDef methods[] = {
    {"literal_shape", literal_shape, METH_O,
     "libpg_query's normalization of a plain literal-bearing statement, else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "guard.broker.sql._cshape",
    "The compiled twin of guard.broker.sql.shape.literal_shape.", -1, methods,
};

PyMODINIT_FUNC
PyInit__cshape(void)
{
    init_classes();
    return PyModule_Create(&module);
}
