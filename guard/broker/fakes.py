"""Marker warning for fake components (in-memory issuers, static key sets): tests only."""

from __future__ import annotations


class FakeComponentWarning(UserWarning):
    """Emitted whenever a fake stands in for a real part; production code never builds one."""
