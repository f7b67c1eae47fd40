"""masking.strategies: Python masks vs documented examples, and the shape of the SQL masks.

The SQL expressions were checked against PostgreSQL 15 with the same example table; the
integration suite repeats that comparison against a live server.
"""

from __future__ import annotations

import struct

import pytest

from guard.broker.masking.strategies import (
    BPCHAR_OID,
    DATE_OID,
    STRATEGIES,
    TEXT_OID,
    TIMESTAMP_OID,
    TIMESTAMPTZ_OID,
    VARCHAR_OID,
    MaskStrategy,
    get_strategy,
)

# (strategy, input, masked output) for text cells; None = SQL NULL.
EXAMPLES = [
    ("ssn_last4", "123-45-6789", "***-**-6789"),
    ("ssn_last4", "123456789", "***-**-6789"),
    ("ssn_last4", "12345678", "***-**-****"),
    ("ssn_last4", "6789", "***-**-****"),
    ("ssn_last4", "", "***-**-****"),
    ("ssn_last4", "a", "***-**-****"),
    ("last4", "123456789012", "********9012"),
    ("last4", "12345678", "****5678"),
    ("last4", "1234567", "*******"),
    ("last4", "1234", "****"),
    ("last4", "", ""),
    ("email_first_char", "john@example.com", "j***@example.com"),
    ("email_first_char", "john.doe@mail.example.org", "j***@mail.example.org"),
    ("email_first_char", "jo@example.com", "j***@example.com"),
    ("email_first_char", "j@example.com", "***@example.com"),
    ("email_first_char", "@example.com", "***@example.com"),
    ("email_first_char", '"a@b"@example.com', '"***@example.com'),
    ("email_first_char", "x@", "***@"),
    ("email_first_char", "noatsign", "***"),
    ("email_first_char", "", "***"),
    ("email_first_char", "éva@exämple.de", "é***@exämple.de"),
    ("redact", "anything", "****"),
    ("redact", "", "****"),
    ("fixed:N/A", "123-45-6789", "N/A"),
    ("fixed:withheld (see KYC)", "", "withheld (see KYC)"),
    ("null", "anything", None),
    ("year_only", "1990-05-17", "1990-01-01"),
    ("year_only", "2024-12-31", "2024-01-01"),
    ("year_only", "0044-03-15 BC", "0044-01-01 BC"),
    ("year_only", "4713-12-31 BC", "4713-01-01 BC"),
    ("year_only", "4714-12-31 BC", None),
    ("year_only", "294276-12-31", "294276-01-01"),
    ("year_only", "294277-01-01", None),
    ("year_only", "infinity", None),
    ("year_only", "-infinity", None),
    ("year_only", "05/17/1990", None),  # DateStyle SQL, MDY: day/month ambiguity -> NULL
    ("year_only", "17.05.1990", None),
    ("year_only", "Thu May 17 1990", None),
    ("year_only", "1990-05-17 10:00:00", None),
]


@pytest.mark.parametrize(("name", "value", "masked"), EXAMPLES)
def test_text_examples(name, value, masked):
    result = get_strategy(name).mask_text(value.encode("utf-8"))
    assert result == (masked.encode("utf-8") if masked is not None else None)


@pytest.mark.parametrize(("name", "value", "masked"), [e for e in EXAMPLES if e[0] != "year_only"])
@pytest.mark.parametrize("oid", [TEXT_OID, VARCHAR_OID])
def test_binary_text_types_mask_like_text(name, value, masked, oid):
    result = get_strategy(name).mask_binary(oid, value.encode("utf-8"))
    assert result == (masked.encode("utf-8") if masked is not None else None)


def test_bpchar_binary_strips_padding_like_sql_cast():
    assert get_strategy("last4").mask_binary(BPCHAR_OID, b"123456789012   ") == b"********9012"


@pytest.mark.parametrize("name", ["ssn_last4", "last4", "email_first_char", "redact"])
def test_non_text_binary_becomes_null(name):
    assert get_strategy(name).mask_binary(20, struct.pack(">q", 123456789012)) is None


@pytest.mark.parametrize(
    ("name", "fallback"),
    [
        ("ssn_last4", b"***-**-****"),
        ("last4", b"********"),
        ("email_first_char", b"***"),
        ("redact", b"****"),
    ],
)
def test_undecodable_text_is_fully_masked(name, fallback):
    assert get_strategy(name).mask_text(b"\xff\xfe123-45-6789") == fallback


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_never_returns_the_raw_value(name):
    strategy = get_strategy(name)
    for raw in ["123-45-6789", "123456789012", "john@example.com", "1990-05-17", "a", "ab@c"]:
        assert strategy.mask_text(raw.encode()) != raw.encode()


def _date_days(y: int, m: int, d: int) -> int:
    import datetime

    return (datetime.date(y, m, d) - datetime.date(2000, 1, 1)).days


@pytest.mark.parametrize(
    ("date", "jan1"),
    [
        ((1990, 5, 17), (1990, 1, 1)),
        ((2000, 1, 1), (2000, 1, 1)),
        ((2024, 2, 29), (2024, 1, 1)),
        ((1, 12, 31), (1, 1, 1)),
        ((9999, 12, 31), (9999, 1, 1)),
    ],
)
def test_year_only_binary_date(date, jan1):
    packed = struct.pack(">i", _date_days(*date))
    assert get_strategy("year_only").mask_binary(DATE_OID, packed) == struct.pack(
        ">i", _date_days(*jan1)
    )


def test_year_only_binary_limits():
    year_only = get_strategy("year_only")
    for special in (2**31 - 1, -(2**31)):  # +/-infinity
        assert year_only.mask_binary(DATE_OID, struct.pack(">i", special)) is None
    # 4714-11-24 BC (Julian day 0) has no representable 1 January: NULL, as in SQL
    assert year_only.mask_binary(DATE_OID, struct.pack(">i", -2451545)) is None
    # 4713-06-01 BC -> 4713-01-01 BC (astronomical -4712); days checked against PostgreSQL
    assert year_only.mask_binary(DATE_OID, struct.pack(">i", -2451355)) == struct.pack(
        ">i", -2451507
    )
    assert year_only.mask_binary(DATE_OID, b"\x00") is None
    assert year_only.mask_binary(TEXT_OID, b"1990-05-17") is None


@pytest.mark.parametrize("oid", [TIMESTAMP_OID, TIMESTAMPTZ_OID])
def test_year_only_binary_timestamps(oid):
    usecs = (_date_days(2024, 3, 5) * 86400 + 12 * 3600) * 1_000_000
    expected = _date_days(2024, 1, 1) * 86400 * 1_000_000
    year_only = get_strategy("year_only")
    assert year_only.mask_binary(oid, struct.pack(">q", usecs)) == struct.pack(">q", expected)
    assert year_only.mask_binary(oid, struct.pack(">q", 2**63 - 1)) is None
    before_2000 = (_date_days(1969, 7, 20) * 86400 + 3600) * 1_000_000
    assert year_only.mask_binary(oid, struct.pack(">q", before_2000)) == struct.pack(
        ">q", _date_days(1969, 1, 1) * 86400 * 1_000_000
    )


# --- SQL expressions ----------------------------------------------------------------------

FORBIDDEN_IN_SQL = ("regexp", "~", "similar", "extract(", "substring(")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sql_expressions_use_only_cheap_builtins(name):
    sql = get_strategy(name).sql_expression('"col"')
    assert '"col"' in sql
    for word in FORBIDDEN_IN_SQL:
        assert word not in sql.lower()


@pytest.mark.parametrize("name", ["ssn_last4", "last4", "email_first_char", "redact"])
def test_sql_expressions_keep_null(name):
    sql = get_strategy(name).sql_expression("c")
    assert sql.startswith("CASE WHEN") and "IS NULL THEN NULL" in sql


def test_year_only_sql_guards_the_range_and_uses_date_part():
    sql = get_strategy("year_only").sql_expression("dob")
    assert "date_part('year', (dob))::int" in sql
    assert "'4713-01-01 BC'" in sql and "'294276-12-31'" in sql
    assert "make_date(" in sql


def test_null_keeps_column_type():
    assert get_strategy("null").sql_expression("c") == "(CASE WHEN false THEN (c) END)"


def test_strategy_by_name_and_unknown_name():
    assert isinstance(get_strategy("redact"), MaskStrategy)
    with pytest.raises(KeyError):
        get_strategy("sha256")
    assert set(STRATEGIES) == {
        "ssn_last4",
        "last4",
        "email_first_char",
        "year_only",
        "redact",
        "null",
        "keyed_hash",
    }


@pytest.mark.parametrize(
    "value", ["it's", "back\\slash", "x" * 65, "tab\there", "é", "'); DROP TABLE t; --"]
)
def test_fixed_constants_cannot_carry_sql_or_odd_bytes(value):
    with pytest.raises(KeyError, match="printable ASCII"):
        get_strategy(f"fixed:{value}")


def test_fixed_keeps_null_and_is_a_constant():
    strategy = get_strategy("fixed:N/A")
    assert strategy.sql_expression("c") == "CASE WHEN (c) IS NULL THEN NULL ELSE 'N/A'::text END"
    assert strategy.mask_text(b"\xff\xfe") == b"N/A"


def test_policy_takes_fixed_and_names_it_among_the_strategies():
    from guard.broker.policy.compile import PolicyError, load_policy

    text = (
        "version: 1\ntargets:\n  t:\n    connect_groups: [g]\n"
        "    session_ttl: {default: 1h, max: 1h}\n    protected_columns: {s.t.x: %s}\n"
    )
    target = load_policy(text % "'fixed:N/A'").targets["t"]
    assert list(target.protected_columns.values()) == ["fixed:N/A"]
    with pytest.raises(PolicyError, match="printable ASCII"):
        load_policy(text % '"fixed:it\'s"')
    with pytest.raises(PolicyError, match="fixed:<value>"):
        load_policy(text % "sha256")


@pytest.mark.parametrize(
    ("name", "value", "masked"),
    [e for e in EXAMPLES if e[0] not in ("year_only", "null")],
)
def test_sql_expression_agrees_with_the_python_twin_in_postgresql(pg_cluster, name, value, masked):
    import psycopg

    expression = get_strategy(name).sql_expression("%s::text")
    with psycopg.connect(pg_cluster.admin_dsn("postgres")) as conn:
        (got,) = conn.execute(f"SELECT {expression}", (value,) * expression.count("%s")).fetchone()
    assert got == masked
