"""The compiled byte scanning (`pgwire._cframe`) is held to the pure-Python reference
(`pgwire.parser`): on the same input, the same frames, values, and errors (type and
message), well-formed or not; and GUARD_PURE_PYTHON=1 selects the reference."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guard.broker.pgwire import encoder, parser
from guard.broker.pgwire.parser import BackendParser, FrontendParser

try:
    from guard.broker.pgwire import _cframe
except ImportError:  # not built: fine on a machine without a compiler, not in CI
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("the C extension is not built (no compiler?)", allow_module_level=True)


def _outcome(call):
    """A call's value, or its exception as (type, message): what must be equal."""
    try:
        return ("value", call())
    except Exception as exc:  # noqa: BLE001 - any exception, compared
        return ("raised", type(exc), str(exc))


# ------------------------------------------------------------------------- framing
def _message(tag: bytes, body: bytes, length: int | None = None) -> bytes:
    return tag + struct.pack("!i", len(body) + 4 if length is None else length) + body


# Streams of messages that are mostly well-formed, runs of DataRow / CopyData included, with
# now and then a bad tag or length, split into reads at arbitrary points.
TAGS = st.sampled_from([b"D", b"D", b"D", b"d", b"d", b"T", b"C", b"Z", b"E", b"Q", b"P", b"\x00"])
MESSAGE = st.one_of(
    st.builds(_message, TAGS, st.binary(max_size=12)),
    st.builds(_message, TAGS, st.binary(max_size=4), st.integers(-8, 40)),  # lengths off
)


@st.composite
def reads(draw: st.DrawFn) -> list[bytes]:
    stream = b"".join(draw(st.lists(MESSAGE, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def _drains(make, chunks: list[bytes]) -> list[object]:
    """What drain() hands out after each read: frame bytes, error, bytes still buffered."""
    p = make()
    seen: list[object] = []
    for chunk in chunks:
        p.feed(chunk)
        frames, error = p.drain()
        got = None if error is None else (type(error), str(error))
        seen.append(([bytes(f) for f in frames], got, p.buffered))
    return seen


@pytest.mark.parametrize("side", ["backend", "frontend"])
@pytest.mark.parametrize("limit", [parser.MAX_MESSAGE_SIZE, 16])
@given(chunks=reads())
@settings(max_examples=300)
def test_scan_frames_as_the_pure_drain_does(side, limit, chunks):
    def make(scan=None):
        if side == "backend":
            return BackendParser(max_message_size=limit, scan=scan)
        return FrontendParser(max_message_size=limit, expect_startup=False, scan=scan)

    assert _drains(lambda: make(_cframe.scan), chunks) == _drains(make, chunks)


def _feed_drains(make, chunks: list[bytes]) -> list[object]:
    """_drains(), each read given with feed_drain(); what stays buffered, in bytes too."""
    p = make()
    seen: list[object] = []
    for chunk in chunks:
        frames, error = p.feed_drain(chunk)
        got = None if error is None else (type(error), str(error))
        seen.append(([bytes(f) for f in frames], got, p.buffered, p.unconsumed()))
    return seen


@pytest.mark.parametrize("side", ["backend", "frontend"])
@pytest.mark.parametrize("limit", [parser.MAX_MESSAGE_SIZE, 16])
@given(chunks=reads(), wrap=st.sampled_from([bytes, bytearray, memoryview]))
@settings(max_examples=300)
def test_feed_drain_frames_as_feed_then_drain(side, limit, chunks, wrap):
    # The compiled feed_drain frames a read where it is; the pure one is feed() + drain().
    def make(scan=None):
        if side == "backend":
            return BackendParser(max_message_size=limit, scan=scan)
        return FrontendParser(max_message_size=limit, expect_startup=False, scan=scan)

    reads_ = [wrap(c) for c in chunks]
    pure = _feed_drains(make, reads_)
    assert [x[:3] for x in pure] == _drains(make, reads_)
    assert _feed_drains(lambda: make(_cframe.scan), reads_) == pure


def test_feed_drain_of_a_parser_in_its_startup_phase_refuses_as_drain_does():
    p = FrontendParser(scan=_cframe.scan)
    with pytest.raises(RuntimeError, match="startup phase"):
        p.feed_drain(b"")


def test_a_run_of_rows_split_everywhere_is_framed_alike():
    rows = b"".join(_message(b"D", struct.pack("!hi", 1, 3) + b"abc") for _ in range(50))
    stream = _message(b"T", b"\x00\x00") + rows + _message(b"C", b"SELECT 50\x00")
    for size in (1, 2, 5, 7, 13, 64, len(stream)):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        compiled = _drains(lambda: BackendParser(scan=_cframe.scan), chunks)
        assert compiled == _drains(BackendParser, chunks)
        assert b"".join(b"".join(frames) for frames, _, _ in compiled) == stream


def test_scan_copies_small_messages_and_keeps_large_runs_as_views():
    small = _message(b"C", b"x" * 506 + b"\x00")  # 512 bytes: copied
    large = _message(b"C", b"x" * 507 + b"\x00")  # 513: a view into the buffer
    rows = b"".join(_message(b"D", struct.pack("!hi", 1, 3) + b"abc") for _ in range(40))
    for framed_where_it_is in (False, True):  # drain(), or feed_drain() on the read itself
        p = BackendParser(scan=_cframe.scan)
        data = small + large + rows + small[:7]
        if framed_where_it_is:
            frames, error = p.feed_drain(data)
        else:
            p.feed(data)
            frames, error = p.drain()
        assert error is None
        assert [type(f) for f in frames] == [bytes, memoryview, memoryview]
        assert frames == [small, large, rows]
        assert p.unconsumed() == small[:7]


def test_scan_rejects_what_is_not_its_input():
    table = bytes(256)
    with pytest.raises(TypeError):
        _cframe.scan(memoryview(b""), 0, b"", table, 10, [])
    with pytest.raises(ValueError):
        _cframe.scan(memoryview(b"abc"), 4, table, table, 10, [])


# ------------------------------------------------------------------------- accessors
# Bodies built from the bytes that matter (NUL, kind letters, UTF-8 lead and bad bytes,
# counts) so that both well-formed and subtly malformed messages come up often.
BODIES = st.one_of(
    st.lists(
        st.sampled_from(
            [b"\x00", b"S", b"P", b"a", b"\xc3\xa9", b"\xff", b"\xed\xa0\x80", b"\x00\x01"]
            + [b"\x00\x00\x00\x05", b"\x00\x00\x00\x17"]
        ),
        max_size=10,
    ).map(b"".join),
    st.binary(max_size=24),
)


def _raw(tag: bytes, body: bytes) -> memoryview:
    return memoryview(_message(tag, body))


def _agree(name: str, raw: memoryview, *rest: str) -> None:
    compiled, pure = getattr(_cframe, name), getattr(parser, name)
    assert _outcome(lambda: compiled(raw, *rest)) == _outcome(lambda: pure(raw, *rest))


@given(BODIES, st.sampled_from([(b"Q", "Query"), (b"C", "CommandComplete")]))
@example(b"select 1\x00", (b"Q", "Query"))
@example(b"\xff\x00", (b"C", "CommandComplete"))
@example(b"", (b"Q", "Query"))
def test_cstring_body(body, tag_what):
    tag, what = tag_what
    _agree("cstring_body", _raw(tag, body), what)


@given(BODIES)
@example(b"portal\x00\x00\x00\x00\x00")
@example(b"\x00\x00\x00\x00\x00")
@example(b"\xc3\x00\x00\x00\x00\x00")
def test_execute_portal(body):
    _agree("execute_portal", _raw(b"E", body))


@given(BODIES)
@example(b"s\x00select $1\x00\x00\x01\x00\x00\x00\x17")  # one parameter type, well-formed
@example(b"s\x00select $1\x00\x00\x01\x00\x00\x00\x17\x00")  # one byte too many
@example(b"\x00\x00\x00\x00")  # unnamed, empty text, no types
@example(b"\x00\xff\x00\x00\x00")  # text not UTF-8
def test_parse_statement(body):
    _agree("parse_statement", _raw(b"P", body))


@given(BODIES)
@example(b"\x00s1\x00\x00\x00\x00\x00\x00\x00")
@example(b"\x00" + b"x" * 2000 + b"\x00")  # names beyond the window the reference reads first
@example(b"\xed\xa0\x80\x00\x00")  # a surrogate is not UTF-8
def test_bind_names(body):
    _agree("bind_names", _raw(b"B", body))


@given(BODIES, st.sampled_from([(b"D", "Describe"), (b"C", "Close")]))
@example(b"Sname\x00", (b"D", "Describe"))
@example(b"P\x00", (b"C", "Close"))
@example(b"X\x00", (b"D", "Describe"))
def test_describe_target(body, tag_what):
    tag, what = tag_what
    _agree("describe_target", _raw(tag, body), what)


def test_accessors_take_any_buffer_and_refuse_other_arguments():
    raw = _message(b"E", b"p\x00\x00\x00\x00\x00")
    assert _cframe.execute_portal(raw) == parser.execute_portal(memoryview(raw)) == "p"
    with pytest.raises(TypeError):
        _cframe.execute_portal("not bytes")
    # A wrong argument count is the reference's TypeError, as a call to it would be.
    assert _outcome(lambda: _cframe.execute_portal()) == _outcome(lambda: parser.execute_portal())


# ------------------------------------------------------------------------- whole requests
_NAMES = st.sampled_from([b"", b"p", b"s1", b"\xc3\xa9", b"\xff"])
# The five messages of a request, each well-formed (names from _NAMES, which can still be
# bad UTF-8) or a body of the accessors' noise.
_PART = {
    b"P": st.one_of(st.builds(lambda n: n + b"\x00SELECT 1\x00\x00\x00", _NAMES), BODIES),
    b"B": st.one_of(
        st.builds(lambda p, s: p + b"\x00" + s + b"\x00\x00\x00\x00\x00\x00\x00", _NAMES, _NAMES),
        BODIES,
    ),
    b"D": st.one_of(
        st.builds(lambda k, n: k + n + b"\x00", st.sampled_from([b"P", b"S"]), _NAMES), BODIES
    ),
    b"E": st.one_of(st.builds(lambda n: n + b"\x00\x00\x00\x00\x00", _NAMES), BODIES),
    b"S": st.one_of(st.just(b""), BODIES),
}


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Mostly the request's shapes, now and then another order, a message more or less, a
    length off, or a read cut short."""
    shape = draw(
        st.one_of(
            st.sampled_from([b"PBDES", b"PBES", b"BDES", b"BES"]),
            st.lists(st.sampled_from(list(_PART)), max_size=6).map(b"".join),
        )
    )
    parts = []
    for tag in shape:
        body = draw(_PART[bytes([tag])])
        off = draw(st.one_of(st.none(), st.none(), st.integers(-6, 6)))
        parts.append(_message(bytes([tag]), body, None if off is None else len(body) + 4 + off))
    data = b"".join(parts)
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@given(requests(), st.sampled_from([parser.MAX_MESSAGE_SIZE, 12]))
@example(b"P\x00\x00\x00\x0c\x00SELECT 1\x00\x00\x00", parser.MAX_MESSAGE_SIZE)  # alone
def test_extended_request(data, limit):
    assert _outcome(lambda: _cframe.extended_request(data, limit)) == _outcome(
        lambda: parser.extended_request(data, limit)
    )


def test_extended_request_reads_the_common_request():
    bind = _message(b"B", b"p\x00s1\x00\x00\x00\x00\x00\x00\x00")
    run = _message(b"E", b"p\x00\x00\x00\x00\x00") + _message(b"S", b"")
    parse = _message(b"P", b"s1\x00SELECT 1\x00\x00\x00")
    described = _message(b"D", b"Pp\x00")
    for f in (_cframe.extended_request, parser.extended_request):
        assert f(parse + bind + described + run, 100) == ("s1", "SELECT 1", "p", "s1", b"P", "p")
        assert f(bind + run, 100) == ("", None, "p", "s1", None, None)
        other = _message(b"E", b"q\x00\x00\x00\x00\x00") + _message(b"S", b"")
        assert f(bind + other, 100) is None  # another portal runs
        assert f(bind + run + run[-5:], 100) is None  # a message more
        assert f(parse + bind + run, 12) is None  # a message over the limit


# ------------------------------------------------------------------------- result rows
VALUES = st.lists(st.one_of(st.none(), st.binary(max_size=6)), max_size=5)


def _row_body(values: list[bytes | None]) -> bytes:
    return struct.pack("!H", len(values)) + b"".join(
        struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values
    )


# A DataRow body: well-formed, cut short or extended, its count or a length forged, or noise.
ROW_BODY = st.one_of(
    VALUES.map(_row_body),
    VALUES.map(_row_body).map(lambda b: b[:-1]),
    VALUES.map(_row_body).map(lambda b: b + b"\x00"),
    st.tuples(VALUES.map(_row_body), st.integers(0, 20), st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
    ),
    st.binary(max_size=14),
)
# Runs as drain() joins them, and now and then one it would not (another tag, a bad length).
RUN_ROW = st.one_of(
    ROW_BODY.map(lambda body: _message(b"D", body)),
    st.builds(_message, st.sampled_from([b"C", b"d"]), st.binary(max_size=6)),
    st.builds(_message, st.just(b"D"), st.binary(max_size=4), st.integers(-2, 12)),
)


def _split(result):
    rows, fault = result
    return rows, None if fault is None else bytes(fault)


@given(
    st.lists(ROW_BODY.map(lambda body: _message(b"D", body)), max_size=6).map(b"".join),
    st.sampled_from([bytes, memoryview]),
)
@example(_message(b"D", _row_body([b"123-45-6789", None, b""])), bytes)
@example(_message(b"D", b"\x00\x01\xff\xff\xff\xfe"), bytes)  # a length of -2
@example(_message(b"D", b"\x00\x02\x00\x00\x00\x01a"), bytes)  # count over the values
def test_data_rows(run, wrap):
    # The rows before a malformed one, and that one's bytes, whose decoding raises.
    compiled = _outcome(lambda: _split(_cframe.data_rows(wrap(run))))
    assert compiled == _outcome(lambda: _split(parser.data_rows(wrap(run))))


@given(st.lists(RUN_ROW, max_size=5).map(b"".join), st.sampled_from([bytes, memoryview]))
def test_data_rows_of_what_drain_would_not_join(run, wrap):
    compiled = _outcome(lambda: _split(_cframe.data_rows(wrap(run))))
    assert compiled == _outcome(lambda: _split(parser.data_rows(wrap(run))))


@given(
    st.one_of(
        VALUES,
        VALUES.map(tuple),
        st.lists(st.one_of(st.none(), st.binary(max_size=4), st.text(max_size=2), st.integers())),
    )
)
def test_data_row(values):
    assert _outcome(lambda: _cframe.data_row(values)) == _outcome(lambda: encoder.data_row(values))


def test_data_row_takes_any_sequence_and_refuses_as_the_reference_does():
    assert _cframe.data_row([b"a", None]) == encoder.data_row((b"a", None))
    assert _outcome(lambda: _cframe.data_row(iter([b"a"]))) == _outcome(
        lambda: encoder.data_row(iter([b"a"]))  # type: ignore[arg-type]
    )
    many = [None] * 70_000  # more columns than an Int16 count holds
    assert _outcome(lambda: _cframe.data_row(many)) == _outcome(lambda: encoder.data_row(many))


# ------------------------------------------------------------------------- writes
def _released() -> memoryview:
    view = memoryview(b"gone")
    view.release()
    return view


CHUNK = st.one_of(
    st.binary(max_size=20),
    st.binary(max_size=20).map(memoryview),
    st.tuples(st.binary(max_size=20), st.integers(0, 8)).map(lambda t: memoryview(t[0])[t[1] :]),
    # What the relay never writes, left to the reference: copies, wider items, gaps, text.
    st.binary(max_size=8).map(bytearray),
    st.builds(lambda: memoryview(b"\x00\x01\x02\x03\x04\x05\x06\x07").cast("i")),
    st.builds(lambda: memoryview(b"abcdef")[::2]),
    st.builds(_released),
    st.just("text"),
)


@given(st.lists(CHUNK, max_size=6), st.integers(-1, 80))
@example([], -1)
@example([b"\x00", _released()], 0)  # over the limit, but a released view is refused first
def test_join_small(chunks, limit):
    assert _outcome(lambda: _cframe.join_small(chunks, limit)) == _outcome(
        lambda: encoder.join_small(chunks, limit)
    )


def test_join_small_joins_what_fits_only():
    assert _cframe.join_small([b"ab", memoryview(b"xcd")[1:]], 4) == b"abcd"
    assert _cframe.join_small([b"ab", memoryview(b"xcd")[1:]], 3) is None
    assert _cframe.join_small([], 0) == b""


# ------------------------------------------------------------------------- selection
def _selected(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GUARD_PURE_PYTHON"}
    if env_value is not None:
        env["GUARD_PURE_PYTHON"] = env_value
    code = (
        "from guard.broker.proxy import speedups, connection as c\n"
        "print(speedups.COMPILED, speedups.scan is None, c.bind_names.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_guard_pure_python_selects_the_reference():
    assert _selected("1") == "False True guard.broker.pgwire.parser"
    assert _selected(None) == "True False guard.broker.pgwire._cframe"
    assert _selected("0") == "True False guard.broker.pgwire._cframe"


def test_a_parser_given_a_scan_drains_with_it():
    calls: list[int] = []

    def counting(view, pos, valid, runs, limit, out):
        calls.append(pos)
        return _cframe.scan(view, pos, valid, runs, limit, out)

    p = BackendParser(scan=counting)
    p.feed(_message(b"Z", b"I"))
    assert [bytes(f) for f in p.drain()[0]] == [_message(b"Z", b"I")]
    assert calls == [0]


def test_a_row_split_across_reads_is_completed_and_the_rest_framed_where_it_is():
    """feed_drain of the read after a split row: the row, joined from its two parts, then
    the rest of the read as views into it (not copied into a buffer first), and the next
    split row kept; a read that does not complete the row, or a malformed header, goes
    through feed() and drain() as before."""
    row = _message(b"D", struct.pack("!hi", 1, 100) + b"r" * 100)
    stream = row * 30
    p = BackendParser(scan=_cframe.scan)
    first, second = stream[:250], stream[250:2000]
    frames, error = p.feed_drain(first)
    assert error is None and b"".join(frames) == row * 2
    frames, error = p.feed_drain(second)
    assert error is None
    whole = (2000 - 3 * len(row)) // len(row)  # the rows after the one completed
    assert [bytes(f) for f in frames] == [row, row * whole]
    assert isinstance(frames[1], memoryview) and frames[1].obj is second
    assert p.unconsumed() == stream[(3 + whole) * len(row) : 2000]
    # A read too short to complete the row: buffered, framed once the row is whole.
    assert p.feed_drain(stream[2000:2010]) == ([], None)
    frames, error = p.feed_drain(stream[2010:])
    assert error is None and b"".join(frames) == stream[(3 + whole) * len(row) :]
    assert p.buffered == 0
    # The header split, then a bad length in it: the fault the pure drain reports.
    for cut in (1, 3):
        bad = b"D" + struct.pack("!i", 2) + b"xx"
        pure, fast = BackendParser(), BackendParser(scan=_cframe.scan)
        for parser_ in (pure, fast):
            parser_.feed_drain(row + bad[:cut])
        expected = pure.feed_drain(bad[cut:])
        got = fast.feed_drain(bad[cut:])
        assert got[0] == expected[0] == []
        assert (type(got[1]), str(got[1])) == (type(expected[1]), str(expected[1]))
