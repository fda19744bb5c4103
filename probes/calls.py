"""One probe_many call of a batched engine (icmp, tcp, the worker pool): what it still owes.

The engines hand results to the caller's sink from their own callbacks, not from the caller's
task, so a sink that raises must not escape into the event loop: it stops the call, and
probe_many raises it in the caller once `done` is set.
"""

from __future__ import annotations

import asyncio

from probes.base import ProbeResult, ResultSink


class ProbeCall:
    """The sink of one call, the results still owed, whether every target was fed, the error."""

    __slots__ = ("done", "error", "fed", "on_result", "outstanding")

    def __init__(self, on_result: ResultSink, done: asyncio.Future[None]) -> None:
        self.on_result = on_result
        self.done = done
        self.outstanding = 0  # targets admitted whose result is not given yet
        self.fed = False  # every target was admitted (or refused)
        self.error: BaseException | None = None

    def give(self, result: ProbeResult) -> None:
        """Hand one result to the sink; a sink that raises stops the call."""
        if self.error is not None:
            return
        try:
            self.on_result(result)
        except Exception as exc:  # the caller's sink failed: stop this call, report it there
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Stop the call: probe_many raises `exc` (the first one) in the caller."""
        if self.error is None:
            self.error = exc
        if not self.done.done():
            self.done.set_result(None)

    def finish_if_complete(self) -> None:
        """Set `done` once every target was fed and every result given."""
        if self.outstanding == 0 and self.fed and not self.done.done():
            self.done.set_result(None)
