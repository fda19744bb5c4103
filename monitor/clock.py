"""The daemon's clock, injected so the lab can run it in virtual time.

`RealClock` is wall time. `VirtualClock` starts at a given instant and jumps straight to whatever
time the daemon waits for, so rounds run back to back while lab time advances one interval per
round. Both give UTC-aware datetimes.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the daemon needs from time: the current instant, and a way to wait for one."""

    def now(self) -> datetime: ...

    async def sleep_until(self, when: datetime) -> None: ...


class RealClock:
    """Wall-clock time. Sleeps in short steps so a changed system clock is noticed."""

    max_step_s: float = 5.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        while True:
            remaining = (when - self.now()).total_seconds()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, self.max_step_s))


class VirtualClock:
    """Lab time: `sleep_until` moves the clock to the requested instant at once.

    `advance` moves it by hand (tests). Time never goes backwards.
    """

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("VirtualClock needs a timezone-aware start (UTC)")
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        if delta < timedelta(0):
            raise ValueError("a virtual clock does not go backwards")
        self._now += delta

    async def sleep_until(self, when: datetime) -> None:
        if when > self._now:
            self._now = when.astimezone(UTC)
        # Yield so signal handlers and the HTTP server get a turn between back-to-back rounds.
        await asyncio.sleep(0)


def next_round_time(now: datetime, interval_s: float) -> datetime:
    """The first instant at or after `now` that is a multiple of the interval since the epoch.

    Aligned rounds give every vantage and every restart the same bin edges.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    epoch_s = now.timestamp()
    slots = -(-epoch_s // interval_s)  # ceiling division on floats
    return datetime.fromtimestamp(slots * interval_s, tz=UTC)


def parse_utc(text: str) -> datetime:
    """An ISO 8601 instant ('2022-01-05T10:30:00Z'); a naive one is taken as UTC."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
