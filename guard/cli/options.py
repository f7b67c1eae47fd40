"""Parsers of option values shared by commands; a bad value is a usage error (exit 2).

Imports only the stdlib, click and `cli.entry` (the duration reader, shared with the fast
path): they run while the command line is parsed, before any command imports what it
needs. Each is a click `type=` (a callable): click names the option in the error
(`invalid value for '--ttl': …`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from guard.cli.entry import duration_seconds


def duration(text: str) -> int:
    """'90s', '15m', '1h', '2d' or plain seconds → seconds."""
    seconds = duration_seconds(text)
    if seconds is None:
        raise click.BadParameter(f"{text!r} is not a duration (use e.g. 30m, 1h, 8h or seconds)")
    return seconds


def http_url(text: str) -> str:
    """An http(s) URL with a host, e.g. an OIDC issuer."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/")[0]:
        raise click.BadParameter(f"{text!r} is not an http(s) URL")
    return text


F = TypeVar("F", bound=Callable[..., Any])


def session_options(command: F) -> F:
    """`--reason`, `--ttl` and `--unmasked`, spelled and parsed alike by every command that
    opens a session (connect, exec, proxy)."""
    command = click.option(
        "--unmasked",
        is_flag=True,
        help="Read protected columns raw, if the policy lets you (needs --reason; may wait "
        "for approval; recorded)",
    )(command)
    command = click.option(
        "--ttl", type=duration, metavar="DURATION", help="Session lifetime, e.g. 30m, 1h"
    )(command)
    return click.option("--reason", default="", help="Why you need access (recorded)")(command)
