"""Rich consoles for command output, made on first use.

Importing rich costs tens of milliseconds; `guard --version`, `--help` of a sub-command and
every usage error should not pay for it, so commands ask for a console when they print.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@cache
def stdout() -> Console:
    from rich.console import Console

    return Console()


@cache
def stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True)
