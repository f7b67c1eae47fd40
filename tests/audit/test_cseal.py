"""The compiled record writer (`audit/_cseal.c`) against its Python references.

`serialize.seal_record_py` and `serialize.result_entries_py` are the references; the sink
(`sink.seal_record`, `sink.result_entries`) uses the compiled `seal` and `result_entries`
when they are built. Both must give the same bytes for any record, sequence number, time
and result values, or a chain written by one would not verify as the other's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard.broker.audit import serialize, sink
from guard.broker.audit.chain import GENESIS, split_record, verify_lines

try:
    from guard.broker.audit import _cseal
    from guard.broker.audit._cseal import result_entries, seal
except ImportError:  # no compiler or no OpenSSL headers
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("guard.broker.audit._cseal was not built (CI=true: a failure)", pytrace=False)
    pytest.skip("guard.broker.audit._cseal was not built", allow_module_level=True)

FIXED = st.binary(max_size=2000)
HASH = st.one_of(
    st.just(GENESIS.encode()), st.text("0123456789abcdef", min_size=64, max_size=64).map(str.encode)
)
SEQ = st.integers(min_value=0, max_value=2**62)
# From the epoch to 2262, the range of time.time_ns() in a signed 64-bit integer.
NS = st.integers(min_value=0, max_value=2**63 - 1)


@given(prev=HASH, fixed=FIXED, seq=SEQ, ns=NS)
def test_the_compiled_seal_writes_the_references_bytes(prev, fixed, seq, ns):
    assert seal(prev, fixed, seq, ns) == serialize.seal_record_py(prev, fixed, seq, ns)


def test_kept_hash_states_give_the_references_bytes_at_every_execution():
    # A cached statement's record is one `fixed` object sealed again and again (the C
    # writer keeps SHA-256's state after it, per object): 200 of them share 64 sets of two
    # slots, so slots are taken over and ways swapped, and a state must never be another
    # object's. Over the size the writer keeps states for, too.
    fixed = [b'{"kind":"statement","n":%d' % i + b"x" * (i % 7) for i in range(200)]
    fixed.append(b'{"kind":"results","results":[' + b"r" * 5000)
    prev = GENESIS.encode()
    for seq in range(1, 1500):
        record = fixed[(seq * 37) % len(fixed)]
        line, digest = seal(prev, record, seq, 1_764_806_400_000_000_000 + seq)
        assert (line, digest) == serialize.seal_record_py(
            prev, record, seq, 1_764_806_400_000_000_000 + seq
        )
        prev = digest
    # A record made again, equal but another object: no state of its twin is needed.
    again = bytes(bytearray(fixed[3]))
    assert seal(prev, again, 9, 5) == serialize.seal_record_py(prev, again, 9, 5)


def test_a_chain_sealed_in_c_verifies_and_its_bodies_carry_seq_and_time():
    prev, lines = GENESIS.encode(), []
    for seq in range(1, 6):
        line, prev = seal(prev, b'{"kind":"statement","n":%d' % seq, seq, 1_764_806_400_000_123_000)
        lines.append(line)
    report = verify_lines(lines)
    assert report.ok and report.records == 5 and report.last_hash == prev.decode()
    _, _, _, body = split_record(lines[-1])
    assert body == {"kind": "statement", "n": 5, "seq": 5, "time": "2025-12-04T00:00:00.000123Z"}


@pytest.mark.parametrize(
    "args, error",
    [
        (("0" * 64, b"{", 1, 0), TypeError),  # prev as str
        ((b"0" * 64, "{", 1, 0), TypeError),  # fixed as str
        ((b"0" * 64, b"{", -1, 0), ValueError),
        ((b"0" * 64, b"{", 1, -5), ValueError),
        ((b"0" * 64, b"{", 1), TypeError),
    ],
)
def test_bad_arguments_are_refused_not_sealed(args, error):
    with pytest.raises(error):
        seal(*args)


def test_the_sink_uses_the_compiled_writer_unless_pure_python_is_asked():
    pure = os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0")
    assert sink._compiled_seal() is (None if pure else _cseal)
    assert sink.seal_record is (serialize.seal_record_py if pure else seal)
    assert sink.result_entries is (serialize.result_entries_py if pure else result_entries)


# What a result record holds (record.RESULT_FIELDS): ids (str, a few of them, so that
# results share them), counts, a server-sent tag.
VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text()
)
ID = st.sampled_from(["s1", "c1", "", '\u00e9"\\\n']) | st.text(max_size=3)
RESULTS = st.lists(st.tuples(ID, ID, *[VALUE] * 8), max_size=4)
QUEUED = st.lists(st.tuples(RESULTS, NS), max_size=5)


@given(queued=QUEUED, known=st.lists(st.tuples(ID, ID), max_size=3, unique=True))
def test_compiled_result_entries_are_the_references_bytes(queued, known):
    # ...with the same pairs added to the batch's ids, in the same order, after those a
    # batch's earlier runs added.
    ids = {pair: i for i, pair in enumerate(known)}
    reference = dict(ids)
    assert result_entries(queued, ids) == serialize.result_entries_py(queued, reference)
    assert list(ids.items()) == list(reference.items())


@pytest.mark.parametrize(
    "queued, error",
    [
        ([([(1,) * 9], 0)], ValueError),  # nine values, not ten
        ([([("s", "c", *(1.5,) * 8)], 0)], TypeError),  # not a result value
        ([([("s", "c", *(2**64,) * 8)], 0)], TypeError),  # beyond JSON's 64 bits, as orjson says
        ([([("s", "c", *("\ud800",) * 8)], 0)], UnicodeEncodeError),  # a lone surrogate
        ([([("\ud800", "c", *(1,) * 8)], 0)], UnicodeEncodeError),  # ...in an id
        ([([(1, "c", *(1,) * 8)], 0)], TypeError),  # an id that is not str
        ([((), 0)], TypeError),  # not a list of results
        ([([], -(2**64))], OverflowError),
        ([([], -5)], ValueError),  # before 1970: never a record's time
    ],
)
def test_result_values_json_cannot_hold_are_refused(queued, error):
    with pytest.raises(error):
        result_entries(queued, {})
    with pytest.raises(TypeError):
        result_entries(queued)  # the batch's ids are needed


def test_result_entries_survive_a_time_whose_conversion_empties_the_queue():
    # A time that is not an int runs its __index__, which may empty the queue and free
    # the entry being read. With the debug allocator freed memory is overwritten, so
    # reading the freed results would crash the process; the entry is held instead.
    program = (
        "from guard.broker.audit._cseal import result_entries\n"
        "q = []\n"
        "class NS:\n"
        "    def __index__(self):\n"
        "        q.clear()\n"
        "        return 10**18\n"
        "q.append(([('s', 'c', 1, 2, 3, 4, 5, 6, 7, 8)], NS()))\n"
        "q.append(([('s', 'c', 9, 2, 3, 4, 5, 6, 7, 8)], 10**18))\n"
        "print(result_entries(q, {}).decode())\n"
    )
    env = {**os.environ, "PYTHONMALLOC": "debug"}
    out = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # The held entry's one result; the queue emptied under the loop ends it.
    assert out.stdout.strip() == '[0,1,2,3,4,5,6,7,8,"2001-09-09T01:46:40.000000Z"]'


def test_the_sinks_lock_behaves_as_threading_lock():
    lock = _cseal.Lock()
    assert lock.acquire() is True and lock.locked()
    assert lock.acquire(False) is False and lock.acquire(timeout=0.01) is False
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()
    with lock:
        assert lock.locked() and lock.acquire(blocking=False) is False
    assert not lock.locked()
    with pytest.raises(ValueError):
        lock.acquire(False, 1)
    with pytest.raises(ValueError):
        lock.acquire(timeout=-5)
    with pytest.raises(TypeError):
        _cseal.Lock(1)


def test_a_thread_waiting_for_the_sinks_lock_lets_others_run_and_gets_it():
    lock, order = _cseal.Lock(), []
    lock.acquire()

    def waiter():
        with lock:  # waits without the GIL: the main thread below goes on
            order.append("waiter")

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)
    order.append("main")
    lock.release()
    thread.join(5)
    assert order == ["main", "waiter"] and not lock.locked()


def test_a_signal_handler_runs_while_the_sinks_lock_is_waited_for():
    lock = _cseal.Lock()
    lock.acquire()

    class Alarm(Exception):
        pass

    def ring(signum, frame):
        raise Alarm

    previous = signal.signal(signal.SIGALRM, ring)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        with pytest.raises(Alarm):
            lock.acquire()  # for ever, but a signal's handler still runs, and may raise
        assert time.monotonic() - started < 5
        rung = []
        signal.signal(signal.SIGALRM, lambda signum, frame: rung.append(signum))
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        assert lock.acquire(timeout=0.3) is False  # the wait goes on after the handler
        assert rung == [signal.SIGALRM] and time.monotonic() - started >= 0.25
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    lock.release()
