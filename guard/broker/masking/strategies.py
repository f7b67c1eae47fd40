"""Mask strategies: one SQL expression for the database views, one Python twin for the stream.

Pure: imports only the stdlib. Each strategy gives

* `sql_expression(column_sql)`: a PostgreSQL expression used in the `guard_masked` views.
  It never raises on any stored value (NULL stays NULL; short or odd values are masked
  completely, never passed through), and uses only cheap built-ins: right/left/length/
  repeat/split_part/strpos, `date_part` (not `extract`, which computes in numeric) and
  make_date. No regexes: they cost ~5x more per row.
* `mask_text(value)`: the same mask applied to a text-format result cell (bytes in the
  client encoding; anything that is not valid UTF-8 gets the fully masked form).
* `mask_binary(type_oid, value)`: the same for a binary-format cell; text types are their
  bytes, `date` is int32 days since 2000-01-01, `timestamp[tz]` int64 microseconds. A cell
  the strategy cannot mask safely gives None, which the caller sends as SQL NULL.

The Python twins agree with the SQL on ordinary values (tests hold a table of examples; the
integration tests compare with PostgreSQL). Known, harmless differences: a `char(n)` value in
text format keeps its padding here while `::text` strips it in SQL; `year_only` on a
timestamptz cell uses the UTC year, SQL the session time zone's.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from types import MappingProxyType

TEXT_OID, VARCHAR_OID, BPCHAR_OID, NAME_OID = 25, 1043, 1042, 19
DATE_OID, TIMESTAMP_OID, TIMESTAMPTZ_OID = 1082, 1114, 1184
TEXT_LIKE_OIDS = frozenset({TEXT_OID, VARCHAR_OID, BPCHAR_OID, NAME_OID})

_POSTGRES_EPOCH_JDATE = 2451545  # 2000-01-01
_USECS_PER_DAY = 86_400_000_000
_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
# year_only keeps years whose 1 January PostgreSQL can represent for every date/timestamp
# type: from 4713 BC to 294276 AD; anything else (infinity included) becomes NULL.
_MIN_YEAR_BC = 4713
_MAX_YEAR = 294276
_ISO_DATE = re.compile(r"^([0-9]{4,})-([0-9]{2})-([0-9]{2})( BC)?$")


def _text(column_sql: str) -> str:
    return f"({column_sql})::text"


class MaskStrategy:
    """Base: text strategies mask the decoded string; subclasses define both forms."""

    name = ""
    description = ""
    # The fully masked form used when the value cannot be read as text.
    fallback = b"****"

    def sql_expression(self, column_sql: str) -> str:
        raise NotImplementedError

    def mask_str(self, value: str) -> str:
        raise NotImplementedError

    def mask_text(self, value: bytes) -> bytes | None:
        try:
            decoded = value.decode("utf-8")
        except UnicodeDecodeError:
            return self.fallback
        return self.mask_str(decoded).encode("utf-8")

    def mask_binary(self, type_oid: int, value: bytes) -> bytes | None:
        if type_oid not in TEXT_LIKE_OIDS:
            return None
        if type_oid == BPCHAR_OID:
            value = value.rstrip(b" ")  # as bpchar::text does
        return self.mask_text(value)


class SsnLast4(MaskStrategy):
    name = "ssn_last4"
    description = "***-**-6789: only the last 4 characters of a full-length SSN"
    fallback = b"***-**-****"

    def sql_expression(self, column_sql: str) -> str:
        v = _text(column_sql)
        # Shorter than a 9-digit SSN: the last 4 could be most or all of it.
        return (
            f"CASE WHEN {v} IS NULL THEN NULL WHEN length({v}) >= 9"
            f" THEN '***-**-' || right({v}, 4) ELSE '***-**-****' END"
        )

    def mask_str(self, value: str) -> str:
        return "***-**-" + value[-4:] if len(value) >= 9 else "***-**-****"


class Last4(MaskStrategy):
    name = "last4"
    description = "********9012: every character but the last 4 replaced by '*'"
    fallback = b"********"

    def sql_expression(self, column_sql: str) -> str:
        v = _text(column_sql)
        # Fewer than 8 characters: showing 4 would reveal half or more of the value.
        return (
            f"CASE WHEN {v} IS NULL THEN NULL WHEN length({v}) >= 8"
            f" THEN repeat('*', length({v}) - 4) || right({v}, 4)"
            f" ELSE repeat('*', length({v})) END"
        )

    def mask_str(self, value: str) -> str:
        if len(value) >= 8:
            return "*" * (len(value) - 4) + value[-4:]
        return "*" * len(value)


class EmailFirstChar(MaskStrategy):
    name = "email_first_char"
    description = "j***@example.com: first character of the local part and the domain"
    fallback = b"***"

    def sql_expression(self, column_sql: str) -> str:
        v = _text(column_sql)
        domain = f"split_part({v}, '@', -1)"  # after the last '@'
        # A one-character local part would be shown whole: hide it too.
        return (
            f"CASE WHEN {v} IS NULL THEN NULL WHEN strpos({v}, '@') = 0 THEN '***'"
            f" WHEN length({v}) - length({domain}) >= 3 THEN left({v}, 1) || '***@' || {domain}"
            f" ELSE '***@' || {domain} END"
        )

    def mask_str(self, value: str) -> str:
        at = value.rfind("@")
        if at < 0:
            return "***"
        domain = value[at + 1 :]
        return (value[0] + "***@" + domain) if at >= 2 else "***@" + domain


class YearOnly(MaskStrategy):
    name = "year_only"
    description = "1 January of the same year (a date); NULL when unrepresentable"
    fallback = b""

    def sql_expression(self, column_sql: str) -> str:
        c = f"({column_sql})"
        # The range test also turns +/-infinity into NULL: date_part would return
        # Infinity and the ::int cast would raise.
        return (
            f"CASE WHEN {c} >= '4713-01-01 BC' AND {c} <= '294276-12-31'"
            f" THEN make_date(date_part('year', {c})::int, 1, 1) END"
        )

    def mask_text(self, value: bytes) -> bytes | None:
        # Only ISO dates are read: the DateStyle of the session decides the format and
        # guessing between MDY and DMY could put a day in the "year".
        match = _ISO_DATE.match(value.decode("ascii", "replace"))
        if not match:
            return None
        year, bc = int(match.group(1)), bool(match.group(4))
        if (bc and year > _MIN_YEAR_BC) or (not bc and year > _MAX_YEAR) or year == 0:
            return None
        return f"{match.group(1)}-01-01{' BC' if bc else ''}".encode("ascii")

    def mask_binary(self, type_oid: int, value: bytes) -> bytes | None:
        if type_oid == DATE_OID and len(value) == 4:
            days = _INT32.unpack(value)[0]
            jan1 = _jan1_days(days)
            return None if jan1 is None else _INT32.pack(jan1)
        if type_oid in (TIMESTAMP_OID, TIMESTAMPTZ_OID) and len(value) == 8:
            usecs = _INT64.unpack(value)[0]
            if usecs in (2**63 - 1, -(2**63)):
                return None
            jan1 = _jan1_days(usecs // _USECS_PER_DAY)
            return None if jan1 is None else _INT64.pack(jan1 * _USECS_PER_DAY)
        return None


class Redact(MaskStrategy):
    name = "redact"
    description = "the constant ****"

    def sql_expression(self, column_sql: str) -> str:
        return f"CASE WHEN ({column_sql}) IS NULL THEN NULL ELSE '****' END"

    def mask_str(self, value: str) -> str:
        return "****"


class Null(MaskStrategy):
    name = "null"
    description = "always NULL (keeps the column's type)"

    def sql_expression(self, column_sql: str) -> str:
        return f"(CASE WHEN false THEN ({column_sql}) END)"

    def mask_text(self, value: bytes) -> bytes | None:
        return None

    def mask_binary(self, type_oid: int, value: bytes) -> bytes | None:
        return None


def _j2date(jd: int) -> int:
    """Astronomical year of a Julian day (PostgreSQL's j2date, year part)."""
    julian = jd + 32044
    quad = julian // 146097
    extra = (julian - quad * 146097) * 4 + 3
    julian += 60 + quad * 3 + extra // 146097
    quad = julian // 1461
    julian -= quad * 1461
    y = julian * 4 // 1461
    return y + quad * 4 - 4800


def _date2j(year: int, month: int, day: int) -> int:
    """Julian day of an astronomical date (PostgreSQL's date2j)."""
    if month > 2:
        month += 1
        year += 4800
    else:
        month += 13
        year += 4799
    century = year // 100
    julian = year * 365 - 32167 + year // 4 - century + century // 4
    return julian + 7834 * month // 256 + day


def _jan1_days(days: int) -> int | None:
    """Days since 2000-01-01 of 1 January of the same year, or None if out of range."""
    if days in (2**31 - 1, -(2**31)):  # +/-infinity
        return None
    jd = days + _POSTGRES_EPOCH_JDATE
    if jd < 0:
        return None
    year = _j2date(jd)  # astronomical: 0 = 1 BC
    if year < 1 - _MIN_YEAR_BC or year > _MAX_YEAR:
        return None
    return _date2j(year, 1, 1) - _POSTGRES_EPOCH_JDATE


class Fixed(MaskStrategy):
    """`fixed:<value>`: every non-NULL value becomes the given constant (text)."""

    description = "fixed:<value>: the constant <value> (NULL stays NULL)"
    # A constant must not smuggle SQL or a value into the views: printable ASCII only,
    # no quote or backslash, at most 64 characters.
    _ALLOWED = re.compile(r"^[ -&(-\[\]-~]{0,64}$")

    def __init__(self, value: str) -> None:
        if not self._ALLOWED.match(value):
            raise KeyError(
                f"fixed:{value!r}: the constant must be at most 64 printable ASCII characters"
                " without quotes or backslashes"
            )
        self.value = value
        self.name = f"fixed:{value}"
        self.fallback = value.encode("ascii")

    def sql_expression(self, column_sql: str) -> str:
        return f"CASE WHEN ({column_sql}) IS NULL THEN NULL ELSE '{self.value}'::text END"

    def mask_str(self, value: str) -> str:
        return self.value


# The keyed_hash key: one row, readable by the masking views' owner only (masking.objects
# creates it). The views read it with their owner's rights; a session cannot.
KEY_TABLE = "guard_masked.mask_key"


class KeyedHash(MaskStrategy):
    """`kh:` + 24 hex digits of SHA-256(key ‖ value): deterministic and joinable (the same
    value hashes alike in every column of the database), useless without the key.

    The key is a random 256-bit value in a table only the views' owner may read, not in
    the view's source (pg_views is world-readable) and not behind a function: PostgreSQL
    checks EXECUTE against the caller even inside a view, so a hashing function sessions
    may call would be an oracle (hash candidate SSNs, compare). A scalar subquery of the
    view reads the table with the owner's rights; sha256 is the built-in. A session
    reading `customers` sees only the digests."""

    name = "keyed_hash"
    description = "kh:<24 hex>: a keyed SHA-256, deterministic and joinable (key in the database)"
    fallback = b"kh:************************"

    def sql_expression(self, column_sql: str) -> str:
        return (
            f"CASE WHEN ({column_sql}) IS NULL THEN NULL ELSE 'kh:' || pg_catalog.left("
            f"pg_catalog.encode(pg_catalog.sha256((SELECT k.key FROM {KEY_TABLE} k) || "
            f"pg_catalog.convert_to({_text(column_sql)}, 'UTF8')), 'hex'), 24) END"
        )

    def mask_str(self, value: str) -> str:
        # The gateway has no key (its tripwire, for drift only): the fully masked form.
        return self.fallback.decode("ascii")


STRATEGIES: Mapping[str, MaskStrategy] = MappingProxyType(
    {
        s.name: s
        for s in (
            SsnLast4(),
            Last4(),
            EmailFirstChar(),
            YearOnly(),
            Redact(),
            Null(),
            KeyedHash(),
        )
    }
)


def get_strategy(name: str) -> MaskStrategy:
    """The strategy called `name` (or `fixed:<value>`); KeyError if there is none."""
    if name.startswith("fixed:"):
        return Fixed(name[len("fixed:") :])
    return STRATEGIES[name]
