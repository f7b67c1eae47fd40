"""Task helper for the asyncio shell: every task gets a name (for debugging hung gateways).

Imports only asyncio. Bare `asyncio.create_task` is banned by ruff (TID251) elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    return asyncio.create_task(coro, name=name)  # noqa: TID251 - the one allowed place
