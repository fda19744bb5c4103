"""The caller's side of a prober whose engine takes targets in chunks and answers in records.

All politeness stays here: the caller's Pacer decides the blocklist, the in-flight cap and the
rates before a target is handed on, and a slot comes back when the target's result does. The
hand-over is priced per chunk, not per probe, as it is a good part of a ~10 µs ICMP probe: a
chunk of up to CHUNK targets goes to an engine as a list of address strings (plus the few
targets that carry a port, URL or query), and results come back as packed records
(probes/records.py) decoded in bulk. A key is the chunk's number and the target's place in it,
so the bookkeeping here is one entry per chunk.

Two engines take chunks: worker processes (probes/workers.py, WorkerPoolProber) and the ICMP
batch engine in this process (probes/icmp_batch.py, IcmpBatchProber). A subclass says how a
chunk goes out (`_send`) and calls `_on_results` with what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any, ClassVar

from probes.base import Failure, ProbeResult, ProbeSetupError, ResultSink, Target, blocked_result
from probes.calls import ProbeCall
from probes.pacing import Pacer
from probes.records import Row, decode

# Targets per chunk (a chunk also goes out early when the feeder must wait). A power of two:
# a result's key is chunk number << CHUNK_BITS | place in the chunk.
CHUNK_BITS = 8
CHUNK = 1 << CHUNK_BITS
_PLACE_MASK = CHUNK - 1
# The longest the feeder waits for a batch of free slots before taking them one by one.
_ROOM_WAIT_S = 0.005

# A chunk's targets that carry more than an address: {place: (port, url, query)}.
Extras = dict[int, tuple[int | None, str | None, Any]]


class Taker:
    """Who a chunk went to (a worker process, the engine in this process), and how many
    results it still owes."""

    def __init__(self) -> None:
        self.load = 0


class ChunkCall(ProbeCall):
    """One probe_many call, and the pacer whose in-flight slots its results give back;
    `stopped` once probe_many returned (its late results only give their slots back)."""

    __slots__ = ("pacer", "stopped")

    def __init__(self, on_result: ResultSink, pacer: Pacer, done: asyncio.Future[None]) -> None:
        super().__init__(on_result, done)
        self.pacer = pacer
        self.stopped = False


class Chunk:
    """Up to CHUNK targets of one call, handed to one taker; a target becomes None once its
    result is given."""

    __slots__ = ("call", "left", "taker", "targets")

    def __init__(self, call: ChunkCall) -> None:
        self.call = call
        self.targets: list[Target | None] = []
        self.left = 0  # results still owed (the slots it holds)
        self.taker: Taker | None = None  # None until it went out


class ChunkedProber:
    """A Prober that feeds chunks to an engine (see the module docstring); `method` names the
    method its results carry."""

    method: ClassVar[str] = ""
    label: ClassVar[str] = ""  # what its error messages begin with

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chunks: dict[int, Chunk] = {}  # by chunk number
        self._calls: set[ChunkCall] = set()
        self._next_chunk = 0
        self._room = asyncio.Event()  # set when the in-flight count fell to `_room_at`
        self._room_at = -1
        self._closed = False

    async def _start(self) -> None:
        """Make the engine ready on the running loop (see `_claim_loop`)."""
        raise NotImplementedError

    async def _send(
        self, number: int, chunk: Chunk, addresses: list[str], extras: Extras, pacer: Pacer
    ) -> None:
        """Hand chunk `number` on (its keys start at number << CHUNK_BITS); set its taker."""
        raise NotImplementedError

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None:
        await self._start()
        loop = asyncio.get_running_loop()
        call = ChunkCall(on_result, pacer, loop.create_future())
        self._calls.add(call)
        try:
            await self._feed(targets, pacer, call)
            call.fed = True
            if call.outstanding and call.error is None:
                await call.done
            if call.error is not None:
                raise call.error
        finally:
            self._calls.discard(call)
            # Stopped early (cancelled, failed, a sink that raised): no more results are given.
            # A chunk that never went out gives its slots back now; one that did keeps them
            # until its probes end, as they are still on the wire (the in-flight cap holds).
            # A call that ran to its end has none left.
            call.stopped = True
            for number, chunk in list(self._chunks.items()):
                if chunk.call is call and chunk.taker is None:
                    self._drop_chunk(number, chunk)

    def _drop_chunk(self, number: int, chunk: Chunk) -> None:
        """Forget a chunk whose results will not come (never sent, or its engine failed) and
        give its slots back."""
        if self._chunks.get(number) is not chunk:
            return
        del self._chunks[number]
        if chunk.taker is not None:
            chunk.taker.load -= chunk.left
        for _ in range(chunk.left):
            chunk.call.pacer.release_slot()
        chunk.call.outstanding -= chunk.left
        chunk.left = 0
        if self._room_at >= 0 and chunk.call.pacer.in_flight <= self._room_at:
            self._room.set()

    def _chunk_failed(self, number: int, error: BaseException) -> None:
        """A chunk's engine call failed: its call fails with `error` (the others go on) and the
        slots of the results that will not come are given back."""
        chunk = self._chunks.get(number)
        if chunk is None:  # its call ended already
            return
        self._drop_chunk(number, chunk)
        chunk.call.fail(error)

    def _claim_loop(self) -> bool:
        """Bind to the running event loop; True when probing starts on it (first use, or a move
        from an earlier loop): the subclass then sets its engine up for it. Raises
        ProbeSetupError when closed, or while the earlier loop may still run calls; one that is
        closed took its calls with it (their tasks will not run again), so their slots come
        back."""
        if self._closed:
            raise ProbeSetupError(f"{self.label}: probe_many on a closed prober")
        loop = asyncio.get_running_loop()
        old = self._loop
        if old is loop:
            return False
        if old is not None:
            if not old.is_closed() and (self._calls or old.is_running()):
                raise ProbeSetupError(f"{self.label}: the prober is in use on another event loop")
            self._calls.clear()
            self._drop_all_chunks()
        self._loop = loop
        self._room = asyncio.Event()
        return True

    def _fail_calls(self, exc: BaseException) -> None:
        for call in list(self._calls):
            call.fail(exc)

    def _close_calls(self, exc: BaseException) -> None:
        """On close: fail the calls still running and give back every slot still held."""
        self._fail_calls(exc)
        self._drop_all_chunks()

    def _drop_all_chunks(self) -> None:
        """The engine is gone (closed, or left behind with its event loop): no result comes
        any more, also not for the probes of stopped calls that were still on the wire."""
        for number, chunk in list(self._chunks.items()):
            self._drop_chunk(number, chunk)

    def _blocked(self) -> None:
        """A target was refused by the blocklist (for a subclass's counters)."""

    # -- sending --------------------------------------------------------------------------

    def _open_chunk(self, call: ChunkCall) -> tuple[int, Chunk]:
        number = self._next_chunk
        self._next_chunk += 1
        chunk = self._chunks[number] = Chunk(call)
        return number, chunk

    async def _feed(self, targets: Iterable[Target], pacer: Pacer, call: ChunkCall) -> None:
        has_blocklist = len(pacer.blocklist) > 0
        cap = pacer.policy.max_in_flight
        acquire_slot = pacer.acquire_slot
        reserve = pacer.reserve
        number, chunk = self._open_chunk(call)
        held = chunk.targets
        addresses: list[str] = []
        extras: Extras = {}
        for target in targets:
            if call.error is not None:
                return
            if has_blocklist and pacer.is_blocked(target.address):
                self._blocked()
                call.give(blocked_result(target, self.method, time.time()))
                continue
            if pacer.in_flight >= cap:
                if addresses:  # the slots we wait for may be in this chunk
                    await self._send(number, chunk, addresses, extras, pacer)
                    number, chunk = self._open_chunk(call)
                    held, addresses, extras = chunk.targets, [], {}
                await self._room_for_a_batch(pacer, cap)
            await acquire_slot()
            delay = reserve(target.address)
            if delay > 0:
                if addresses:
                    await self._send(number, chunk, addresses, extras, pacer)
                    number, chunk = self._open_chunk(call)
                    held, addresses, extras = chunk.targets, [], {}
                try:
                    await asyncio.sleep(delay)
                except BaseException:
                    pacer.release_slot()
                    raise
            if call.error is not None:  # failed (or closed) while it waited: not this one too
                pacer.release_slot()
                return
            if target.port is not None or target.url is not None or target.query is not None:
                extras[len(addresses)] = (target.port, target.url, target.query)
            held.append(target)
            addresses.append(target.address)
            chunk.left += 1
            call.outstanding += 1
            if len(addresses) >= CHUNK:
                await self._send(number, chunk, addresses, extras, pacer)
                number, chunk = self._open_chunk(call)
                held, addresses, extras = chunk.targets, [], {}
        if addresses and call.error is None:
            await self._send(number, chunk, addresses, extras, pacer)
        elif not addresses:
            del self._chunks[number]

    async def _room_for_a_batch(self, pacer: Pacer, cap: int) -> None:
        """Wait until a batch of slots is free, so the engine gets chunks, not single targets:
        a chunk of one costs a loop turn (and a worker a frame each way and a wake-up). Bounded,
        as the pacer may be shared with other probers whose slots our results do not free."""
        self._room_at = cap - max(1, min(CHUNK, cap // 8))
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), _ROOM_WAIT_S)
        self._room_at = -1

    # -- receiving ------------------------------------------------------------------------

    def _on_results(self, packed: bytes, rows: list[Row]) -> None:
        chunks = self._chunks
        method = self.method
        number = -1
        chunk: Chunk | None = None
        for key, reachable, success, failure, rtt, started_at, details in decode(packed, rows):
            if key >> CHUNK_BITS != number:
                number = key >> CHUNK_BITS
                chunk = chunks.get(number)
            if chunk is not None:  # else its call stopped early
                self._give(number, chunk, key & _PLACE_MASK, reachable, success, failure, rtt,
                           started_at, details, method)  # fmt: skip

    def _give(
        self,
        number: int,
        chunk: Chunk,
        place: int,
        reachable: bool,
        success: bool,
        failure: Failure | None,
        rtt: float | None,
        started_at: float,
        details: dict[str, Any],
        method: str,
    ) -> None:
        """Hand one result to its call and give its slot back (at most once per target)."""
        targets = chunk.targets
        target = targets[place]
        if target is None:
            return
        targets[place] = None
        chunk.left -= 1
        if chunk.left == 0:
            del self._chunks[number]
        if chunk.taker is not None:
            chunk.taker.load -= 1
        call = chunk.call
        pacer = call.pacer
        pacer.release_slot()
        call.outstanding -= 1
        if not call.stopped:
            call.give(
                ProbeResult(target, method, reachable, success, failure, rtt, started_at, details)
            )
            call.finish_if_complete()
        if self._room_at >= 0 and pacer.in_flight <= self._room_at:
            self._room.set()

    def _end_chunks_of(self, taker: Taker, failure: Failure, details: dict[str, Any]) -> None:
        """End every probe a taker still owes with `failure` (it is gone)."""
        now = time.time()
        for number, chunk in list(self._chunks.items()):
            if chunk.taker is taker:
                for place in range(len(chunk.targets)):
                    self._give(number, chunk, place, False, False, failure, None, now,
                               dict(details), self.method)  # fmt: skip
