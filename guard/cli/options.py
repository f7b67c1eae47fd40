"""Parsers of option values shared by commands; a bad value is a usage error (exit 2).

Imports only the stdlib and click: they run while the command line is parsed, before any
command imports what it needs. Each is a click `type=` (a callable): click names the option
in the error (`invalid value for '--ttl': …`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """'90s', '15m', '1h', '2d' or plain seconds → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration (use e.g. 30m, 1h, 8h or seconds)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def http_url(text: str) -> str:
    """An http(s) URL with a host, e.g. an OIDC issuer."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/")[0]:
        raise click.BadParameter(f"{text!r} is not an http(s) URL")
    return text


F = TypeVar("F", bound=Callable[..., Any])


def session_options(command: F) -> F:
    """`--reason` and `--ttl`, spelled and parsed alike by every command that opens a
    session (connect, exec, proxy)."""
    command = click.option(
        "--ttl", type=duration, metavar="DURATION", help="Session lifetime, e.g. 30m, 1h"
    )(command)
    return click.option("--reason", default="", help="Why you need access (recorded)")(command)
