"""Politeness: a global probes/s cap, a cap on probes in flight, a per-/24 cap, and a blocklist.

Probing a country's address space is scanning, so every prober asks the Pacer before each send.
Rates use GCRA (a token bucket written as "theoretical arrival time"): each request reserves the
next free slot at once, so many concurrent callers share one rate exactly, and a fast sender
(ICMP at tens of thousands of probes/s) sleeps once per burst rather than once per packet.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from probes.base import content_lines

# A /24 for IPv4 and a /48 for IPv6 are the "blocks" politeness is counted on.
_V4_BLOCK_SHIFT = 8
_V6_BLOCK_SHIFT = 80


def address_key(address: str) -> tuple[int, int] | None:
    """(family, integer) for an IP address literal, None for anything else (a host name)."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except OSError:
        pass
    try:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, address.split("%")[0]), "big")
    except OSError:
        return None


def block_of(address: str) -> tuple[int, int] | None:
    """The politeness block (/24 or /48) an address falls in, as (family, block number)."""
    key = address_key(address)
    if key is None:
        return None
    family, value = key
    return family, value >> (_V4_BLOCK_SHIFT if family == 4 else _V6_BLOCK_SHIFT)


class Blocklist:
    """CIDR ranges that are never probed. Lookups are a bisect over merged integer ranges."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()):
        self._networks = sorted(set(networks), key=lambda n: (n.version, n.network_address))
        self._ranges: dict[int, tuple[list[int], list[int]]] = {4: ([], []), 6: ([], [])}
        for net in self._networks:
            starts, ends = self._ranges[net.version]
            start, end = int(net.network_address), int(net.broadcast_address)
            if ends and start <= ends[-1] + 1:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> Blocklist:
        return cls(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())

    @classmethod
    def from_file(cls, path: str | Path) -> Blocklist:
        """One CIDR per line; `#` starts a comment. Raises ValueError naming file:line."""
        networks = []
        for lineno, text in content_lines(Path(path).read_text().splitlines()):
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a CIDR range: {text!r} ({exc})") from None
        return cls(networks)

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return list(self._networks)

    def __len__(self) -> int:
        return len(self._networks)

    def contains(self, address: str) -> bool:
        key = address_key(address)
        if key is None:
            return False
        family, value = key
        return self.covers(family, value, value)

    def covers(self, family: int, first: int, last: int) -> bool:
        """Whether every address from `first` to `last` (integers, IPv4 or IPv6) is blocked."""
        starts, ends = self._ranges[family]
        i = bisect.bisect_right(starts, first) - 1
        return i >= 0 and last <= ends[i]


@dataclass(frozen=True, slots=True)
class PacingPolicy:
    """Polite defaults: 500 probes/s, 512 in flight, one probe per /24 per second (bursts of 3)."""

    rate_pps: float | None = 500.0
    max_in_flight: int = 512
    per_block_pps: float | None = 1.0
    per_block_burst: int = 3
    # How far ahead of its rate the global bucket may run: a burst of rate * burst_s probes.
    burst_s: float = 0.01

    def __post_init__(self) -> None:
        if self.rate_pps is not None and self.rate_pps <= 0:
            raise ValueError("rate_pps must be positive (or None for no cap)")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.per_block_pps is not None and self.per_block_pps <= 0:
            raise ValueError("per_block_pps must be positive (or None for no cap)")
        if self.per_block_burst < 1:
            raise ValueError("per_block_burst must be at least 1")


class _Gcra:
    """One rate: `reserve(now)` books the next slot and returns when it starts."""

    __slots__ = ("interval", "tat", "tolerance")

    def __init__(self, rate: float, burst: float) -> None:
        self.interval = 1.0 / rate
        self.tolerance = max(0.0, burst - 1.0) * self.interval
        self.tat = 0.0

    def reserve(self, now: float) -> float:
        tat = self.tat if self.tat > now else now
        self.tat = tat + self.interval
        start = tat - self.tolerance
        return start if start > now else now


class Pacer:
    """Decides when each probe may go. Shared by all probers of a process or a round."""

    def __init__(
        self,
        policy: PacingPolicy | None = None,
        blocklist: Blocklist | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or PacingPolicy()
        self.blocklist = blocklist or Blocklist()
        self._clock = clock
        rate = self.policy.rate_pps
        self._global = _Gcra(rate, max(1.0, rate * self.policy.burst_s)) if rate else None
        self._blocks: dict[tuple[int, int], _Gcra] = {}
        self._last_prune = 0.0
        self._in_flight = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self.admitted = 0
        self.refused = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def is_blocked(self, address: str) -> bool:
        if self.blocklist.contains(address):
            self.refused += 1
            return True
        return False

    def reserve(self, address: str) -> float:
        """Book a send slot for `address` under the global and per-block rates.

        Returns how many seconds the caller must wait before sending (0.0 when it may go now).
        Does not take an in-flight slot; see `acquire_slot`.
        """
        now = self._clock()
        start = now
        per_block = self.policy.per_block_pps
        if per_block is not None:
            block = block_of(address)
            if block is not None:
                bucket = self._blocks.get(block)
                if bucket is None:
                    bucket = self._blocks[block] = _Gcra(per_block, self.policy.per_block_burst)
                start = bucket.reserve(now)
                if now - self._last_prune > 10.0:
                    self._prune(now)
        if self._global is not None:
            start = self._global.reserve(start)
        self.admitted += 1
        return start - now

    def _prune(self, now: float) -> None:
        # A bucket whose booked slots are all in the past is the same as a new one: drop it,
        # so a scan over millions of /24s does not keep millions of buckets.
        self._last_prune = now
        stale = [key for key, bucket in self._blocks.items() if bucket.tat < now]
        for key in stale:
            del self._blocks[key]

    async def acquire_slot(self) -> None:
        """Wait until fewer than `max_in_flight` probes are outstanding, then take a slot."""
        while self._in_flight >= self.policy.max_in_flight:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future in self._slot_waiters:
                    self._slot_waiters.remove(future)
                raise
        self._in_flight += 1

    def release_slot(self) -> None:
        self._in_flight -= 1
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def admit(self, address: str) -> None:
        """Take an in-flight slot and wait for the rate: the common path of a prober."""
        await self.acquire_slot()
        delay = self.reserve(address)
        if delay > 0:
            await asyncio.sleep(delay)
