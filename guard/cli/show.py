"""How times and JSON look in every command's output: durations as `5m 03s`, instants in
UTC, `--json` as indented JSON. Imports only the standard library."""

from __future__ import annotations

import json
from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """`moment` with a time zone (UTC when the broker sent none)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def span(seconds: float) -> str:
    """A short duration: 42s, 5m 03s, 2h 10m, 3d 4h. Rounded to the second: a 1h
    session looked at a moment after it opened is 1h 00m, not 59m 59s."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def until(moment: datetime, at: datetime) -> str:
    """The time left from `at` to `moment`, or "now" when it has come."""
    left = (aware(moment) - at).total_seconds()
    return span(left) if left > 0 else "now"


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))
