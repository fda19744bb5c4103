"""One prober spread over N worker processes, for rates one Python thread cannot reach.

The parent is a ChunkedProber (probes/chunked.py): it keeps all politeness (the caller's Pacer
admits every target) and hands targets over in chunks, results coming back as packed records
(probes/records.py) decoded in bulk; only a result with more details than its RTT source
travels as a pickled row. Workers probe what they are given at once. An ICMP worker on datagram
sockets runs the batch engine (probes/icmp_batch.py); otherwise IcmpProber.probe_keyed takes
(key, address) pairs and writes the records itself, with no Target and no ProbeResult made in
the worker.

Workers are `python -m probes.workers FD` processes started from the calling thread, so they
live in that thread's network namespace. ICMP datagram sockets get a distinct echo id per
worker from the kernel, so each worker receives only its own replies.

Not the default anywhere: on a machine with one free core it only adds copying. Limits: extra
TCP ports of one target are not booked against the caller's rates (the worker tries them at
once), and a worker that dies ends its probes in flight as `Failure.OTHER`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import itertools
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from probes import eventloop
from probes.base import Failure, ProbeResult, ProbeSetupError, Target
from probes.chunked import CHUNK_BITS, Chunk, ChunkedProber, Extras, Taker
from probes.icmp_batch import BatchEcho, batch_engine_for
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.records import Records

# method -> "module:class" of the prober a worker runs.
PROBER_CLASSES = {
    "icmp": "probes.icmp:IcmpProber",
    "tcp": "probes.tcp:TcpProber",
    "http": "probes.http:HttpProber",
    "dns": "probes.dns:DnsProber",
}
_FRAME = struct.Struct("!I")
# How often a worker's counters ride along with its results (they always come with its goodbye).
_COUNTERS_EVERY_S = 0.2
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)

# A chunk on the wire: ("probe", first key, addresses, {place: (port, url, query)} for the targets
# that have any of those). Results come back as ("results", packed records, rows, counters).
def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    return pickle.loads(await reader.readexactly(size))


class _Worker(Taker):
    """One worker process, its stream, and how many results it owes."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__()
        self.process = process
        self.reader = reader
        self.writer = writer
        self.stats: dict[str, int] = {}
        self.blocklist: Blocklist | None = None
        self.alive = True
        self.info: dict[str, Any] = {}  # what the worker said when ready (pid, ICMP echo id)
        self.reader_task: asyncio.Task[None] | None = None


class WorkerPoolProber(ChunkedProber):
    """Runs the prober of `method` (built with `options`) in `workers` processes.

    Use a subclass that names the method (IcmpWorkerPool, TcpWorkerPool, ...) or `worker_pool`.
    `stats`: the workers' counters summed (for ICMP: sent, echo_replies, malformed, wrong_id...).
    """

    method: ClassVar[str] = ""
    label: ClassVar[str] = "worker pool"

    def __init__(self, workers: int = 2, **options: Any) -> None:
        if self.method not in PROBER_CLASSES:
            raise ProbeSetupError(f"worker pool: no prober for method {self.method!r}")
        if workers < 1:
            raise ProbeSetupError(f"worker pool: workers must be at least 1, got {workers}")
        _prober_class(self.method)(**options)  # bad options fail here, not in a worker
        super().__init__()
        self.workers = workers
        self.options = options
        self._workers: list[_Worker] = []
        self._last_workers: list[_Worker] = []

    @property
    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for worker in self._workers or self._last_workers:
            for key, value in worker.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers if worker.alive]

    @property
    def worker_info(self) -> list[dict[str, Any]]:
        """Per live worker: its pid and, for ICMP, its echo id and socket kind."""
        return [dict(worker.info) for worker in self._workers if worker.alive]

    async def start(self) -> None:
        """Start the workers now (probe_many starts them on first use). Raises ProbeSetupError
        when a worker cannot run the prober (bad options, no ICMP socket permission)."""
        await self._start()

    async def close(self) -> None:
        """Ask the workers to finish, wait a moment, then kill what is left."""
        self._closed = True
        workers, self._workers = self._workers, []
        self._last_workers = workers  # their final counters stay readable in `stats`
        for worker in workers:
            if worker.alive:
                with contextlib.suppress(Exception):
                    worker.writer.write(_frame(("close",)))
                    await asyncio.wait_for(worker.writer.drain(), 1)
        deadline = time.monotonic() + 2
        for worker in workers:
            if worker.reader_task is not None:
                # The worker's last frame carries its final counters; then it hangs up.
                with contextlib.suppress(TimeoutError):
                    timeout = max(0.0, deadline - time.monotonic())
                    await asyncio.wait_for(asyncio.shield(worker.reader_task), timeout)
                worker.reader_task.cancel()
            with contextlib.suppress(Exception):
                worker.writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.process.wait(), max(0.0, deadline - time.monotonic()))
            if worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()
        self._close_calls(ProbeSetupError("worker pool: closed during probe_many"))

    # -- workers --------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._claim_loop():  # workers started under an earlier loop cannot serve this one
            await self._discard_workers()
        if not self._workers:
            for _ in range(self.workers):
                self._workers.append(await self._spawn())

    async def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "probes.workers", str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), env=env,
            )  # fmt: skip
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 24)
        writer.write(_frame(("init", self.method, self.options)))
        worker = _Worker(process, reader, writer)
        try:
            reply = await asyncio.wait_for(_read_frame(reader), 60)
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            process.kill()
            raise ProbeSetupError(f"worker pool: a {self.method} worker did not start") from exc
        if reply[0] != "ready":
            process.kill()
            raise ProbeSetupError(f"worker pool: {reply[1]}")
        worker.info = reply[1]
        worker.reader_task = asyncio.get_running_loop().create_task(self._read(worker))
        return worker

    async def _discard_workers(self) -> None:
        """Workers started under an event loop that is gone (`_claim_loop` gave their chunks'
        slots back): end them, start fresh ones."""
        for worker in self._workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signal.SIGKILL)
        self._workers = []

    # -- sending --------------------------------------------------------------------------

    async def _send(
        self, number: int, chunk: Chunk, addresses: list[str], extras: Extras, pacer: Pacer
    ) -> None:
        alive = [w for w in self._workers if w.alive]
        if not alive:
            raise ProbeSetupError("worker pool: every worker process has exited")
        worker = min(alive, key=lambda w: w.load)
        chunk.taker = worker
        worker.load += chunk.left
        if worker.blocklist is not pacer.blocklist:
            worker.blocklist = pacer.blocklist
            worker.writer.write(_frame(("blocklist", pacer.blocklist.networks)))
        worker.writer.write(_frame(("probe", number << CHUNK_BITS, addresses, extras)))
        await worker.writer.drain()
        await asyncio.sleep(0)  # let results in: they free the slots the feeder needs

    # -- receiving ------------------------------------------------------------------------

    async def _read(self, worker: _Worker) -> None:
        try:
            while True:
                message = await _read_frame(worker.reader)
                if message[0] == "results":
                    self._on_results(message[1], message[2])
                    if message[3] is not None:
                        worker.stats = message[3]
                elif message[0] == "error":
                    error = ProbeSetupError(f"worker pool: {message[2]}")
                    self._chunk_failed(message[1] >> CHUNK_BITS, error)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._on_worker_lost(worker)

    def _on_worker_lost(self, worker: _Worker) -> None:
        """A worker exited: its probes in flight end as OTHER, naming the exit."""
        worker.alive = False
        details = {"error": f"worker process exited (code {worker.process.returncode})"}
        self._end_chunks_of(worker, Failure.OTHER, details)


class IcmpWorkerPool(WorkerPoolProber):
    method: ClassVar[str] = "icmp"


class TcpWorkerPool(WorkerPoolProber):
    method: ClassVar[str] = "tcp"


class HttpWorkerPool(WorkerPoolProber):
    method: ClassVar[str] = "http"


class DnsWorkerPool(WorkerPoolProber):
    method: ClassVar[str] = "dns"


POOL_CLASSES: dict[str, type[WorkerPoolProber]] = {
    cls.method: cls for cls in (IcmpWorkerPool, TcpWorkerPool, HttpWorkerPool, DnsWorkerPool)
}


def worker_pool(method: str, workers: int = 2, **options: Any) -> WorkerPoolProber:
    """The worker pool for `method` ("icmp", "tcp", "http", "dns")."""
    cls = POOL_CLASSES.get(method)
    if cls is None:
        raise ProbeSetupError(f"worker pool: no prober for method {method!r}")
    return cls(workers, **options)


def _prober_class(method: str) -> Any:
    module, name = PROBER_CLASSES[method].split(":")
    return getattr(importlib.import_module(module), name)


# -- the worker process ---------------------------------------------------------------------


async def _serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    loop = asyncio.get_running_loop()
    _init, method, options = await _read_frame(reader)
    # One frame per burst of results: the first result after a flush schedules the next.
    records = Records(on_first=lambda: loop.call_soon(flush))
    batch: BatchEcho | None = None
    try:
        prober = _prober_class(method)(**options)
        info: dict[str, Any] = {"pid": os.getpid()}
        if method == "icmp":
            # Fails now, with the hint, if ICMP sockets are not permitted. IPv4 literals go in
            # batches where the engine can run; names and IPv6 still go to the prober.
            batch = batch_engine_for(records, prober)
            info |= {"echo_id": prober.echo_id(False), "mode": prober.mode["ipv4"]}
            if batch is not None:
                info["batch_echo_ids"] = batch.echo_ids
    except Exception as exc:
        writer.write(_frame(("failed", str(exc))))
        await writer.drain()
        return
    writer.write(_frame(("ready", info)))
    # eventloop.run (main) raised the collector's thresholds and froze what start-up made;
    # the prober's own set-up lives as long as the worker too
    gc.freeze()
    blocklist = Blocklist()
    tasks: set[asyncio.Task[None]] = set()
    stats = getattr(prober, "stats", None)
    counters_sent = 0.0
    # The ICMP prober writes records itself: no Target and no ProbeResult per probe.
    keyed = getattr(prober, "probe_keyed", None)

    def counters() -> dict[str, int] | None:
        return stats.as_dict() if stats is not None and hasattr(stats, "as_dict") else None

    def flush() -> None:
        nonlocal counters_sent
        now = time.monotonic()
        fresh = now - counters_sent >= _COUNTERS_EVERY_S
        if fresh:
            counters_sent = now
        packed, rows = records.take()
        writer.write(_frame(("results", packed, rows, counters() if fresh else None)))

    async def probe(
        first_key: int,
        addresses: list[str],
        extras: Extras,
        blocklist: Blocklist,
        fed: asyncio.Event,
    ) -> None:
        def fed_after(items: Iterable[Any]) -> Iterator[Any]:
            yield from items
            fed.set()

        try:  # a chunk it cannot probe fails its call in the parent, it does not hang it
            if keyed is not None:
                pairs = zip(itertools.count(first_key), addresses, strict=False)
                if batch is not None:
                    await batch.probe_keyed(fed_after(pairs), blocklist)
                else:
                    await keyed(fed_after(pairs), records, blocklist)
                return
            targets = list(map(Target, addresses))
            for place, (port, url, query) in extras.items():
                targets[place] = Target(addresses[place], port, url, query)
            keys = dict(zip(map(id, targets), itertools.count(first_key), strict=False))

            def sink(result: ProbeResult) -> None:
                records.result(keys[id(result.target)], result)

            await prober.probe_many(fed_after(targets), _Paced(blocklist), sink)
        except Exception as exc:  # the parent fails this chunk's call, not the others
            writer.write(_frame(("error", first_key, f"{type(exc).__name__}: {exc}")))
        finally:
            fed.set()

    async def dispatch() -> None:
        # One chunk is fed at a time: many feeders at once would send a burst per loop turn
        # and leave replies waiting in the socket buffer (an overflow is false loss).
        while True:
            first_key, addresses, extras, chunk_blocklist = await queue.get()
            fed = asyncio.Event()
            task = loop.create_task(probe(first_key, addresses, extras, chunk_blocklist, fed))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await fed.wait()

    queue: asyncio.Queue[tuple[int, list[str], Extras, Blocklist]] = asyncio.Queue()
    dispatcher = loop.create_task(dispatch())
    try:
        while True:
            message = await _read_frame(reader)
            if message[0] == "probe":
                queue.put_nowait((message[1], message[2], message[3], blocklist))
            elif message[0] == "blocklist":
                blocklist = Blocklist(message[1])
            elif message[0] == "close":
                break
    except asyncio.IncompleteReadError:
        pass  # the parent went away
    finally:
        dispatcher.cancel()
        for task in tasks:
            task.cancel()
        if batch is not None:
            await batch.close()
        await prober.close()
        with contextlib.suppress(Exception):
            packed, rows = records.take()
            writer.write(_frame(("results", packed, rows, counters())))
            await writer.drain()
            writer.close()


class _Paced(Pacer):
    """The worker's pacer: the parent's Pacer already admitted every target of a chunk (rates,
    in-flight slots), so here only the blocklist is asked (for host names resolved here)."""

    def __init__(self, blocklist: Blocklist) -> None:
        super().__init__(PacingPolicy(rate_pps=None, per_block_pps=None), blocklist)

    def reserve(self, address: str) -> float:
        return 0.0

    async def acquire_slot(self) -> None:
        pass

    def release_slot(self) -> None:
        pass


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].isdigit():
        sys.exit("usage: python -m probes.workers FD  (started by WorkerPoolProber)")
    sock = socket.socket(fileno=int(argv[0]))
    eventloop.run(_serve(sock))


if __name__ == "__main__":
    main(sys.argv[1:])
