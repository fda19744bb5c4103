"""The event loop every entry point runs on: uvloop when it is installed, else asyncio's own.

uvloop (libuv, in Cython) halves the event loop's share of a probe: the HTTP prober needs
~0.10 ms of CPU per probe on it against ~0.16 ms on asyncio's loop
(benchmarks/results/probe_engine_http.md). The probers use only the portable loop API
(add_reader, create_connection, start_tls, getaddrinfo), so they run the same on both.

`run` also tunes the garbage collector while the loop runs (see `tuned_collector`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# The collector's thresholds while `run` runs (CPython's defaults are 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)
_tuning_lock = threading.Lock()
_tuned_runs = 0  # runs in progress in this process (benchmarks and tests run loops in threads)
_saved_thresholds: tuple[int, int, int] = gc.get_threshold()


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


@contextlib.contextmanager
def tuned_collector() -> Iterator[None]:
    """Freeze what exists now (modules, configuration: it lives as long as the process) and
    collect young objects less often, until the last such block in the process ends.

    Why: a prober keeps up to rate x timeout probes in flight, a few objects each that live
    for the timeout; with the default thresholds the collector rescans them again and again
    (profiled: ~8% of the ICMP engine's CPU, ~1 us per probe). The probe paths make no
    reference cycles, so rarer young collections cost little memory. On the way out the frozen
    objects go back to the collector and the thresholds are restored.
    """
    global _tuned_runs, _saved_thresholds
    with _tuning_lock:
        _tuned_runs += 1
        if _tuned_runs == 1:
            _saved_thresholds = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        with _tuning_lock:
            _tuned_runs -= 1
            if _tuned_runs == 0:
                gc.set_threshold(*_saved_thresholds)
                gc.unfreeze()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Like asyncio.run(coro), on the loop `loop_factory` picks, with `tuned_collector`."""
    with tuned_collector(), asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)
