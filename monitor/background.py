"""Stopping a background sender (webhook, Alertmanager, remote write) without losing its queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp


async def drain_then_stop(
    task: asyncio.Task[None] | None,
    session: aiohttp.ClientSession | None,
    idle: Callable[[], Awaitable[Any]],
    drain_s: float,
) -> None:
    """Give `task` up to `drain_s` seconds to reach `idle()`, then cancel it and close `session`.

    What the sender had not delivered by then stays in its queue or buffer for the next start.
    """
    if task is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle(), timeout=drain_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if session is not None:
        await session.close()
