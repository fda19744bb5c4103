"""A bounded worker pool that runs one probe per target under the Pacer.

A fixed number of workers pull targets lazily from one shared iterator, so probing a million
targets keeps a few hundred coroutines alive, never one task per target.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from probes.base import (
    Failure,
    ProbeResult,
    ProbeSetupError,
    ResultSink,
    Target,
    blocked_result,
    unanswered,
)
from probes.pacing import Pacer

log = logging.getLogger(__name__)

ProbeOne = Callable[[Target], Awaitable[ProbeResult]]


async def run_pool(
    targets: Iterable[Target],
    pacer: Pacer,
    on_result: ResultSink,
    probe_one: ProbeOne,
    method: str,
    workers: int | None = None,
) -> None:
    """Probe every target once with at most `workers` (default: the pacer's in-flight cap).

    Blocklisted targets get `blocked_result` without a packet. `probe_one` runs between
    `pacer.admit` and `pacer.release_slot`. A bug inside `probe_one` becomes `Failure.OTHER` for
    that target (logged), so one odd target cannot stop a round of a million; a ProbeSetupError
    (a target the method cannot probe at all) propagates.
    """
    iterator = iter(targets)
    size = max(1, workers if workers is not None else pacer.policy.max_in_flight)

    async def worker() -> None:
        # next() never awaits, so the workers can share one iterator safely.
        for target in iterator:
            if pacer.is_blocked(target.address):
                on_result(blocked_result(target, method, time.time()))
                continue
            await pacer.admit(target.address)
            try:
                result = await probe_one(target)
            except ProbeSetupError:
                raise  # the caller's mistake (a target the method cannot probe): say so loudly
            except Exception as exc:
                log.exception("%s probe of %s failed unexpectedly", method, target)
                result = unexpected_result(target, method, exc)
            finally:
                pacer.release_slot()
            on_result(result)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(size):
                group.create_task(worker())
    except* ProbeSetupError as refused:  # every worker may have met one: the first says it
        raise refused.exceptions[0] from None


def unexpected_result(target: Target, method: str, exc: BaseException) -> ProbeResult:
    """The result for a probe that ended in an exception no mapping foresaw."""
    return unanswered(target, method, Failure.OTHER, time.time(),
                      {"error": f"{type(exc).__name__}: {exc}"})
