"""The compiled statement seal (`audit/_cseal.c`) against its Python reference.

`serialize.seal_record_py` is the reference; the sink (`sink.seal_record`) uses the
compiled `seal` when it is built. Both must give the same stored line and hash for any
record, sequence number and time, or a chain written by one would not verify as the
other's.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard.broker.audit import serialize, sink
from guard.broker.audit.chain import GENESIS, split_record, verify_lines

try:
    from guard.broker.audit._cseal import seal
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


def test_the_sink_uses_the_compiled_seal_unless_pure_python_is_asked():
    expected = None if os.environ.get("GUARD_PURE_PYTHON", "") not in ("", "0") else seal
    assert sink._compiled_seal() is expected
    assert sink.seal_record is (expected or serialize.seal_record_py)
