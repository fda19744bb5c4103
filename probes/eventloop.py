"""The event loop every entry point runs on: uvloop when it is installed, else asyncio's own.

uvloop (libuv, in Cython) halves the event loop's share of a probe: the HTTP prober needs
~0.10 ms of CPU per probe on it against ~0.16 ms on asyncio's loop
(benchmarks/results/probe_engine_http.md). The probers use only the portable loop API
(add_reader, create_connection, start_tls, getaddrinfo), so they run the same on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None (asyncio's default loop) when uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    """'uvloop' or 'asyncio': which loop `run` uses here (for logs and benchmark reports)."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Like asyncio.run(coro), on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)
