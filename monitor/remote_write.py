"""Prometheus remote write 1.0: the daemon's own samples pushed to Prometheus-compatible storage.

After every round the daemon hands its registry (the same families /metrics shows) to each
`RemoteWriter`; the samples get the destination's labels (job, instance, vantage, shard and any
`external_labels`), one timestamp (the round's collection time), and become snappy-compressed
protobuf `WriteRequest`s stored in a `RemoteBuffer` on disk. A sender task replays the buffer
oldest first: a 2xx removes a segment; a 5xx, a 429, a refused connection, a timeout or a garbled
answer is counted and retried with exponential backoff (so a storage outage of an hour or more
loses nothing as long as the buffer cap holds it); any other 4xx means the storage will never
take that request, so it is dropped and counted rather than blocking everything behind it.

The protobuf is encoded by hand (four small messages, see WRITE_REQUEST_PROTO) to avoid a
protobuf runtime; snappy block compression comes from cramjam.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import cramjam
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from monitor.background import drain_then_stop
from monitor.config import Config
from monitor.remote_buffer import RemoteBuffer

log = logging.getLogger(__name__)

WRITE_REQUEST_PROTO: Final = """
message WriteRequest { repeated TimeSeries timeseries = 1; }
message TimeSeries { repeated Label labels = 1; repeated Sample samples = 2; }
message Label { string name = 1; string value = 2; }
message Sample { double value = 1; int64 timestamp = 2; }  // milliseconds since the epoch
"""
HEADERS: Final = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}
MAX_SAMPLES_PER_REQUEST: Final = 5000
BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
FAILURE_REASONS: Final = ("http_5xx", "http_429", "http_4xx", "connection", "timeout",
                          "bad_response")
LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Series:
    """One time series of a WriteRequest: sorted labels (with __name__) and (value, ms) pairs."""

    labels: Labels
    samples: tuple[tuple[float, int], ...]


# ---------------------------------------------------------------- protobuf, by hand


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL: Final = tuple(bytes((n,)) for n in range(0x80))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_DOUBLE: Final = struct.Struct("<d")


def _timestamp_varint(ms: int) -> bytes:
    # int64 on the wire: negative values take ten bytes in two's complement.
    return _varint(ms if ms >= 0 else ms + (1 << 64))


class LabelCache:
    """Encoded label sets are reused: every round repeats the same series."""

    def __init__(self) -> None:
        self._cache: dict[Labels, bytes] = {}
        self._pairs: dict[tuple[str, str], bytes] = {}  # one label, as a Label field

    def encode(self, labels: Labels) -> bytes:
        cached = self._cache.get(labels)
        if cached is None:
            if len(self._cache) > 200_000:
                self._cache.clear()
                self._pairs.clear()
            pairs = self._pairs
            parts = []
            for pair in labels:
                encoded = pairs.get(pair)
                if encoded is None:
                    encoded = pairs[pair] = _field(
                        1, _field(1, pair[0].encode()) + _field(2, pair[1].encode()))
                parts.append(encoded)
            cached = self._cache[labels] = b"".join(parts)
        return cached


def encode_write_request(series: Iterable[Series], cache: LabelCache | None = None) -> bytes:
    """The protobuf bytes of a WriteRequest (uncompressed)."""
    cache = cache or LabelCache()
    parts = []
    for one in series:
        body = [cache.encode(one.labels)]
        for value, ms in one.samples:
            sample = b"\x09" + _DOUBLE.pack(value) + b"\x10" + _timestamp_varint(ms)
            body.append(b"\x12" + _varint(len(sample)) + sample)
        parts.append(_field(1, b"".join(body)))
    return b"".join(parts)


def decode_write_request(data: bytes) -> list[Series]:
    """The inverse of encode_write_request (for tests and tools); ValueError on bad bytes."""
    def fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
        pos = 0
        while pos < len(buf):
            key, pos = _read_varint(buf, pos)
            number, wire = key >> 3, key & 7
            if wire == 2:
                length, pos = _read_varint(buf, pos)
                if pos + length > len(buf):
                    raise ValueError("a field runs past the end of the message")
                yield number, wire, buf[pos:pos + length]
                pos += length
            elif wire == 1:
                if pos + 8 > len(buf):
                    raise ValueError("a double runs past the end of the message")
                yield number, wire, buf[pos:pos + 8]
                pos += 8
            elif wire == 0:
                value, pos = _read_varint(buf, pos)
                yield number, wire, value
            else:
                raise ValueError(f"unexpected wire type {wire}")

    out = []
    for number, _, ts_bytes in fields(data):
        if number != 1 or not isinstance(ts_bytes, bytes):
            continue
        labels, samples = [], []
        for sub, _, body in fields(ts_bytes):
            if not isinstance(body, bytes):
                continue
            if sub == 1:
                pair = {n: v for n, _, v in fields(body) if isinstance(v, bytes)}
                labels.append((pair.get(1, b"").decode(), pair.get(2, b"").decode()))
            elif sub == 2:
                value, ms = math.nan, 0
                for n, _, v in fields(body):
                    if n == 1 and isinstance(v, bytes):
                        value = _DOUBLE.unpack(v)[0]
                    elif n == 2 and isinstance(v, int):
                        ms = v - (1 << 64) if v >= 1 << 63 else v
                samples.append((value, ms))
        out.append(Series(tuple(labels), tuple(samples)))
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def compress(data: bytes) -> bytes:
    """Snappy block format (not framed), as remote write requires."""
    return bytes(cramjam.snappy.compress_raw(data))


def decompress(data: bytes) -> bytes:
    return bytes(cramjam.snappy.decompress_raw(data))


# ---------------------------------------------------------------- registry -> series


def registry_series(
    registry: CollectorRegistry, timestamp_ms: int, labels: Mapping[str, str]
) -> list[Series]:
    """Every sample /metrics would show, one Series each, with `labels` added (a sample's own
    label wins over an added one, like Prometheus' honor_labels: false would not; the monitor
    never sets job/instance/vantage itself, so there is no clash in practice)."""
    out = []
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # creation timestamps, not measurements (and not in 0.0.4 text)
            merged = {**labels, **sample.labels, "__name__": sample.name}
            out.append(Series(tuple(sorted(merged.items())), ((float(sample.value),
                                                               timestamp_ms),)))
    return out


def batches(series: Sequence[Series], limit: int = MAX_SAMPLES_PER_REQUEST) -> Iterator[
        tuple[list[Series], int]]:
    """Requests of at most `limit` samples (a long series is never split)."""
    batch: list[Series] = []
    count = 0
    for one in series:
        if batch and count + len(one.samples) > limit:
            yield batch, count
            batch, count = [], 0
        batch.append(one)
        count += len(one.samples)
    if batch:
        yield batch, count


# ---------------------------------------------------------------- the writer


@dataclass(frozen=True, slots=True)
class RemoteWriteTarget:
    """One destination, as configured (monitor/config.py's RemoteWriteConfig maps onto it)."""

    url: str
    name: str
    buffer_dir: Path
    buffer_max_bytes: int = 256 * 1024 * 1024
    timeout_s: float = 30.0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Counters:
    samples_sent: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    rejected_samples: int = 0


class RemoteWriter:
    """Buffers batches on disk and sends them, oldest first, to one remote-write URL."""

    def __init__(self, target: RemoteWriteTarget, *, user_agent: str = "shutdown-monitor",
                 sleep: Callable[[float], Awaitable[None]] | None = None) -> None:
        for name in target.labels:
            if not LABEL_NAME.fullmatch(name):
                raise ValueError(f"remote_write {target.name}: label name {name!r}: expected "
                                 "letters, digits and '_', not starting with a digit")
        self.target = target
        self.buffer = RemoteBuffer(target.buffer_dir, target.buffer_max_bytes)
        self.counters = _Counters()
        self._labels = LabelCache()
        self._user_agent = user_agent
        self._sleep = sleep or asyncio.sleep
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.target.name

    # -- producing ------------------------------------------------------------------------
    def enqueue(self, series: Sequence[Series]) -> int:
        """Buffer these series (split into requests); returns the number of samples."""
        total = 0
        for batch, count in batches(series):
            payload = compress(encode_write_request(batch, self._labels))
            try:
                self.buffer.append(payload, count)
            except OSError as exc:  # a full or read-only disk: this batch is lost, say so
                self.buffer.dropped_samples += count
                log.error("remote write %s: cannot buffer %d samples in %s: %s", self.name,
                          count, self.buffer.directory, exc)
                continue
            total += count
        if total:
            self._idle.clear()
            self._wake.set()
        return total

    def enqueue_registry(self, registry: CollectorRegistry, timestamp_s: float) -> int:
        """The registry's samples now, with this destination's labels, at `timestamp_s`."""
        return self.enqueue(registry_series(registry, round(timestamp_s * 1000),
                                            self.target.labels))

    # -- sending --------------------------------------------------------------------------
    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.target.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout,
                                              headers={"User-Agent": self._user_agent})
        self._task = asyncio.create_task(self._run(), name=f"remote-write-{self.name}")
        self._wake.set()

    async def close(self, drain_s: float = 1.0) -> None:
        """Try to empty the buffer for up to `drain_s`; what is left stays on disk for the
        next start."""
        await drain_then_stop(self._task, self._session, self.drained, drain_s)
        self._task = self._session = None

    async def drained(self) -> None:
        """Returns once the buffer is empty (everything delivered or dropped)."""
        while len(self.buffer):
            self._idle.clear()
            await self._idle.wait()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            segment = self.buffer.oldest()
            if segment is None:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outcome = await self._send(segment.payload)
            except Exception:
                # A bug must not end delivery for the months the daemon runs: log, back off.
                log.exception("remote write %s: sending failed unexpectedly", self.name)
                outcome = "retry"
            if outcome == "ok" or outcome == "rejected":
                if outcome == "ok":
                    self.counters.samples_sent += segment.samples
                else:
                    self.counters.rejected_samples += segment.samples
                self.buffer.remove(segment)
                backoff = BACKOFF_MIN_S
                continue
            await self._sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _send(self, payload: bytes) -> str:
        """'ok', 'rejected' (a 4xx: never retried) or 'retry' (counted under a reason)."""
        assert self._session is not None
        reason: str
        try:
            async with self._session.post(self.target.url, data=payload,
                                          headers=HEADERS) as response:
                body = await response.read()
                if 200 <= response.status < 300:
                    self.last_error = None
                    return "ok"
                detail = body[:200].decode("utf-8", "replace").strip()
                self.last_error = f"HTTP {response.status}: {detail}"
                if response.status == 429:
                    reason = "http_429"
                elif 400 <= response.status < 500:
                    self.counters.failures["http_4xx"] += 1
                    log.error("remote write %s: rejected for good (%s): batch dropped",
                              self.name, self.last_error)
                    return "rejected"
                else:
                    reason = "http_5xx"
        except TimeoutError:
            reason, self.last_error = "timeout", f"no answer within {self.target.timeout_s} s"
        except (aiohttp.ClientConnectorError, ConnectionError) as exc:
            reason, self.last_error = "connection", str(exc)
        except aiohttp.ClientError as exc:
            # ServerDisconnectedError, a garbled status line, a broken chunked body...
            reason, self.last_error = "bad_response", f"{type(exc).__name__}: {exc}"
        self.counters.failures[reason] += 1
        log.warning("remote write %s: %s (%s); %d samples buffered, retrying", self.name,
                    reason, self.last_error, self.buffer.samples_buffered)
        return "retry"


class RemoteWriteCollector(Collector):
    """shutdown_monitor_remote_write_* for every writer, labelled by `remote` (its name)."""

    def __init__(self, writers: Callable[[], Sequence[RemoteWriter]]) -> None:
        self._writers = writers

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        prefix = "shutdown_monitor_remote_write"
        sent = CounterMetricFamily(f"{prefix}_samples", "Samples delivered to the remote "
                                   "storage (2xx).", labels=["remote"])
        buffered = GaugeMetricFamily(f"{prefix}_samples_buffered", "Samples waiting in the "
                                     "on-disk buffer.", labels=["remote"])
        size = GaugeMetricFamily(f"{prefix}_bytes_buffered", "Bytes of the on-disk buffer.",
                                 labels=["remote"])
        dropped = CounterMetricFamily(f"{prefix}_dropped_samples", "Samples lost: the oldest "
                                      "evicted from a full buffer, or rejected by the storage "
                                      "with a 4xx.", labels=["remote", "cause"])
        failures = CounterMetricFamily(f"{prefix}_failures", "Failed send attempts by reason "
                                       "(each is retried, except http_4xx).",
                                       labels=["remote", "reason"])
        corrupt = CounterMetricFamily(f"{prefix}_corrupt_segments", "Unreadable buffer segments "
                                      "removed.", labels=["remote"])
        for writer in self._writers():
            name = writer.name
            sent.add_metric([name], writer.counters.samples_sent)
            buffered.add_metric([name], writer.buffer.samples_buffered)
            size.add_metric([name], writer.buffer.bytes_buffered)
            dropped.add_metric([name, "buffer_full"], writer.buffer.dropped_samples)
            dropped.add_metric([name, "rejected"], writer.counters.rejected_samples)
            for reason in FAILURE_REASONS:
                failures.add_metric([name, reason], writer.counters.failures[reason])
            corrupt.add_metric([name], writer.buffer.corrupt_segments)
        yield from (sent, buffered, size, dropped, failures, corrupt)


# ---------------------------------------------------------------- from the configuration


def writer_targets(config: Config, instance: str) -> list[RemoteWriteTarget]:
    """The configured destinations with the labels a scraping Prometheus would have added
    (job, instance) plus vantage and shard, so shards and vantages never collide in storage;
    `external_labels` of a destination win over these."""
    base = {"job": "shutdown-monitor", "instance": instance, "vantage": config.vantage_name}
    if config.shard is not None:
        base["shard"] = f"{config.shard[0]}/{config.shard[1]}"
    return [
        RemoteWriteTarget(url=remote.url, name=remote.name, buffer_dir=remote.buffer_dir,
                          buffer_max_bytes=remote.buffer_max_bytes, timeout_s=remote.timeout_s,
                          labels={**base, **remote.external_labels})
        for remote in config.remote_write
    ]


async def start_writers(config: Config, instance: str) -> list[RemoteWriter]:
    """A started writer per destination; one whose buffer cannot be opened is logged and left
    out (the daemon keeps monitoring and its own /metrics keeps working)."""
    writers = []
    agent = f"shutdown-monitor (+{config.contact_url})"
    for target in writer_targets(config, instance):
        try:
            writer = RemoteWriter(target, user_agent=agent)
        except (OSError, ValueError) as exc:
            log.error("remote_write %s: cannot open its buffer %s: %s", target.name,
                      target.buffer_dir, exc)
            continue
        await writer.start()
        writers.append(writer)
    return writers
