"""Remote write: the encoding, the on-disk buffer, and real storage on loopback.

Real Prometheus (--web.enable-remote-write-receiver) and real VictoriaMetrics receive the
daemon's samples; storage outages are real (the server process is stopped and restarted on the
same data directory); bad answers come from real local servers. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from monitor.clock import RealClock
from monitor.config import load_config
from monitor.daemon import Daemon
from monitor.errors import ConfigError
from monitor.export import MetricsState, make_registry
from monitor.remote_buffer import RemoteBuffer
from monitor.remote_write import (
    RemoteWriter,
    RemoteWriteTarget,
    Series,
    compress,
    decode_write_request,
    decompress,
    encode_write_request,
    registry_series,
    writer_targets,
)
from monitor.rounds import RoundOutcome, TargetCount
from tests.prom import PrometheusServer, needs_prometheus
from tests.scale.storage import (
    VictoriaMetrics,
    needs_victoria_metrics,
    restart_prometheus,
    stop_prometheus,
)
from tests.scale.worlds import World, write_config

LABELS = {"job": "shutdown-monitor", "instance": "127.0.0.1:9310", "vantage": "ams"}


async def quick_sleep(_seconds: float) -> None:
    await asyncio.sleep(0.02)  # backoff shortened: the test is about what is retried


def writer(url: str, directory: Path, max_bytes: int = 1 << 20,
           sleep: Callable[[float], Awaitable[None]] = quick_sleep) -> RemoteWriter:
    return RemoteWriter(RemoteWriteTarget(url=url, name="store", buffer_dir=directory,
                                          buffer_max_bytes=max_bytes, timeout_s=2.0,
                                          labels=LABELS), sleep=sleep)


def one_series(name: str, samples: list[tuple[float, int]], **labels: str) -> Series:
    return Series(tuple(sorted({"__name__": name, **labels}.items())), tuple(samples))


def round_state(up: int, when: datetime) -> MetricsState:
    state = MetricsState()
    state.record_round(RoundOutcome(
        time=when, duration_s=1.5, counts=[TargetCount("KZ", 9198, "icmp", 40, up),
                                           TargetCount("KZ", None, "icmp", 10, 10)],
        probes=Counter({("icmp", "success"): up + 10, ("icmp", "timeout"): 40 - up}),
        control_total=2, control_up=2))
    return state


# ---------------------------------------------------------------- encoding


def test_write_request_round_trips_through_protobuf_and_snappy() -> None:
    series = [
        one_series("a_metric", [(1.5, 1_700_000_000_000), (-2.0, 1_700_000_001_000)], x="1"),
        one_series("b_metric", [(float("inf"), -5)], country="KZ", asn="9198"),
    ]
    body = compress(encode_write_request(series))
    back = decode_write_request(decompress(body))
    assert back == series
    # The snappy *block* format: its first bytes are the uncompressed length as a varint.
    raw = encode_write_request(series)
    assert body[0] == len(raw) & 0x7F | (0x80 if len(raw) > 0x7F else 0)


def test_registry_series_are_what_metrics_shows_with_the_destination_labels() -> None:
    state = round_state(30, datetime(2026, 1, 1, tzinfo=UTC))
    series = registry_series(make_registry(state, process_metrics=False), 1234, LABELS)
    by_name = {dict(s.labels)["__name__"]: s for s in series if dict(s.labels).get("asn") in
               ("9198", None)}
    up = by_name["shutdown_monitor_targets_up"]
    assert dict(up.labels) == {"__name__": "shutdown_monitor_targets_up", "country": "KZ",
                               "asn": "9198", "method": "icmp", **LABELS}
    assert up.samples == ((30.0, 1234),)
    assert [name for name, _ in up.labels] == sorted(name for name, _ in up.labels)
    assert not any(dict(s.labels)["__name__"].endswith("_created") for s in series)


# ---------------------------------------------------------------- the buffer


def test_buffer_replays_in_order_after_reopen_and_drops_oldest_when_full(tmp_path: Path) -> None:
    buffer = RemoteBuffer(tmp_path, max_bytes=400)
    for index in range(3):
        buffer.append(bytes([index]) * 100, samples=10 + index)
    assert len(buffer) == 3 and buffer.samples_buffered == 33
    reopened = RemoteBuffer(tmp_path, max_bytes=400)  # a restart: the same queue, in order
    first = reopened.oldest()
    assert first is not None and first.payload == b"\x00" * 100 and first.samples == 10
    reopened.append(b"\x03" * 100, samples=13)  # 4 x 117 bytes > 400: the oldest goes
    assert reopened.dropped_samples == 10 and reopened.samples_buffered == 11 + 12 + 13
    reopened.remove(first)  # already evicted: harmless
    payloads = []
    while (segment := reopened.oldest()) is not None:
        payloads.append(segment.payload[0])
        reopened.remove(segment)
    assert payloads == [1, 2, 3] and reopened.bytes_buffered == 0
    reopened.append(b"x" * 500, samples=7)  # can never fit: dropped, counted
    assert len(reopened) == 0 and reopened.dropped_samples == 17


def test_buffer_counts_and_removes_a_corrupt_segment(tmp_path: Path) -> None:
    buffer = RemoteBuffer(tmp_path, max_bytes=10_000)
    buffer.append(b"good-1", 1)
    buffer.append(b"good-2", 2)
    first = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit: the checksum no longer matches
    first.write_bytes(bytes(data))
    (tmp_path / "0000000000000009.seg").write_bytes(b"SMRW")  # torn header
    (tmp_path / "0000000000000010.tmp").write_bytes(b"half")  # a crash mid-write
    reopened = RemoteBuffer(tmp_path, max_bytes=10_000)
    assert reopened.corrupt_segments == 1 and not list(tmp_path.glob("*.tmp"))
    segment = reopened.oldest()
    assert segment is not None and segment.payload == b"good-2"
    assert reopened.corrupt_segments == 2 and not first.exists()


# ---------------------------------------------------------------- configuration


def test_remote_write_config_is_validated_with_clear_messages(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"vantage": {"name": "ams"}, "shard": "1/2", "remote_write": [
        {"url": "http://127.0.0.1:8428/api/v1/write", "name": "vm",
         "external_labels": {"region": "eu"}, "buffer_max_bytes": 1 << 20},
    ]}))
    config = load_config(path)
    [remote] = config.remote_write
    assert remote.buffer_dir == tmp_path / "var/remote-write/vm" and remote.timeout_s == 30.0
    [target] = writer_targets(config, "127.0.0.1:9310")
    assert dict(target.labels) == {"job": "shutdown-monitor", "instance": "127.0.0.1:9310",
                                   "vantage": "ams", "shard": "1/2", "region": "eu"}
    path.write_text(yaml.safe_dump({"remote_write": [
        {"url": "ftp://x", "name": "a", "timeout_s": 0, "buffer_max_bytes": 10,
         "external_labels": {"9bad": "x"}, "colour": "red"},
        {"name": "a", "url": "http://127.0.0.1:1/w"},
        {"url": "http://127.0.0.1:1/w"},
    ]}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = "\n".join(caught.value.problems)
    for expected in (
        "remote_write[0].colour: unknown key",
        "remote_write[0].url: expected an http:// or https:// URL, got 'ftp://x'",
        "remote_write[0].timeout_s: expected a positive number, got 0",
        "remote_write[0].buffer_max_bytes: expected a number of bytes >= 4096, got 10",
        "remote_write[0].external_labels: expected label names",
        "remote_write[1].name: remote_write name 'a' is used twice",
        "remote_write[2].name: missing required key",
    ):
        assert expected in problems, problems


# ---------------------------------------------------------------- failures, counted


class Scripted:
    """A real HTTP server on 127.0.0.1:0 answering remote writes from a script of statuses,
    then 204; the bodies it accepted are decoded and kept."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.accepted: list[list[Series]] = []
        self.headers: list[dict[str, str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.headers.append(dict(request.headers))
        status = self.script.pop(0) if self.script else 204
        if status == 204:
            self.accepted.append(decode_write_request(decompress(body)))
        return web.Response(status=status, text="scripted")

    async def __aenter__(self) -> Scripted:
        app = web.Application()
        app.router.add_post("/api/v1/write", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/api/v1/write"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_5xx_429_and_4xx_are_counted_retried_or_dropped(tmp_path: Path) -> None:
    async with Scripted([500, 503, 429, 204, 400]) as server:
        sender = writer(server.url, tmp_path)
        await sender.start()
        try:
            sender.enqueue([one_series("m", [(1.0, 1000)])])
            sender.enqueue([one_series("m", [(2.0, 2000)])])
            sender.enqueue([one_series("m", [(3.0, 3000)])])
            await asyncio.wait_for(sender.drained(), timeout=20)
        finally:
            await sender.close()
    failures = sender.counters.failures
    assert (failures["http_5xx"], failures["http_429"], failures["http_4xx"]) == (2, 1, 1)
    # The first batch got through after three retries, the second was refused for good (400:
    # dropped, counted), the third went through: order kept, nothing resent twice.
    assert [[s.samples for s in request] for request in server.accepted] == [
        [((1.0, 1000),)], [((3.0, 3000),)]]
    assert sender.counters.rejected_samples == 1 and sender.counters.samples_sent == 2
    headers = server.headers[0]
    assert headers["Content-Encoding"] == "snappy"
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["X-Prometheus-Remote-Write-Version"] == "0.1.0"


async def test_garbled_answers_and_refused_connections_are_counted_and_retried(
    tmp_path: Path,
) -> None:
    answers = [b"NOT HTTP AT ALL\r\n\r\n", b""]  # garbage, then a silent hang-up

    async def garbage(reader: asyncio.StreamReader, writer_: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer_.write(answers.pop(0) if answers else b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer_.drain()
        writer_.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = writer(f"http://127.0.0.1:{port}/api/v1/write", tmp_path)
    await sender.start()
    try:
        sender.enqueue([one_series("m", [(1.0, 1000)])])
        await asyncio.wait_for(sender.drained(), timeout=20)
        assert sender.counters.failures["bad_response"] == 2
        assert sender.counters.samples_sent == 1
        server.close()
        await server.wait_closed()
        sender.enqueue([one_series("m", [(2.0, 2000)])])
        deadline = time.monotonic() + 10
        while sender.counters.failures["connection"] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert sender.buffer.samples_buffered == 1  # kept for when the storage is back
    finally:
        await sender.close(drain_s=0)


# ---------------------------------------------------------------- real storage


@needs_prometheus
async def test_prometheus_receives_the_samples_with_labels_and_timestamps(tmp_path: Path) -> None:
    server = PrometheusServer([], extra_args=["--web.enable-remote-write-receiver"])
    await asyncio.to_thread(server.__enter__)
    try:
        sender = writer(f"{server.url}/api/v1/write", tmp_path)
        await sender.start()
        now = time.time()
        moments = [now - 120, now - 60]
        for up, moment in zip((38, 12), moments, strict=True):
            registry = make_registry(round_state(up, datetime.fromtimestamp(moment, UTC)),
                                     process_metrics=False)
            sender.enqueue_registry(registry, moment)
        await asyncio.wait_for(sender.drained(), timeout=20)
        await sender.close()
        selector = 'shutdown_monitor_targets_up{country="KZ",asn="9198"}'
        first = await asyncio.to_thread(server.query, selector, moments[0] + 1)
        second = await asyncio.to_thread(server.query, selector, moments[1] + 1)
        raw = await asyncio.to_thread(server.query, f"{selector}[5m]", now)
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)
    assert [float(first[0]["value"][1]), float(second[0]["value"][1])] == [38.0, 12.0]
    labels = first[0]["metric"]
    assert {k: labels[k] for k in LABELS} == LABELS and labels["method"] == "icmp"
    stamps = [round(float(t) * 1000) for t, _ in raw[0]["values"]]
    assert stamps == [round(m * 1000) for m in moments]


async def outage_run(
    write_url: str, tmp_path: Path, stop: Callable[[], object], start: Callable[[], object],
    batches: int = 24, down_from: int = 6, down_until: int = 18,
) -> tuple[RemoteWriter, list[int]]:
    """One batch per "round" (timestamps one second apart, in the recent past); the storage
    is down between two rounds. Returns the writer and the round timestamps (ms)."""
    sender = writer(write_url, tmp_path)
    await sender.start()
    base = (int(time.time()) - 600) * 1000
    stamps = []
    try:
        for index in range(batches):
            if index == down_from:
                await asyncio.wait_for(sender.drained(), timeout=20)
                await asyncio.to_thread(stop)
            if index == down_until:
                assert sender.buffer.samples_buffered > 0
                assert sum(sender.counters.failures.values()) > 0
                await asyncio.to_thread(start)
            stamp = base + index * 1000
            stamps.append(stamp)
            sender.enqueue([one_series("outage_probe", [(float(index), stamp)], **LABELS)])
            await asyncio.sleep(0.05)
        await asyncio.wait_for(sender.drained(), timeout=60)
    finally:
        await sender.close()
    return sender, stamps


@needs_victoria_metrics
async def test_victoria_metrics_outage_loses_nothing(tmp_path: Path) -> None:
    storage = VictoriaMetrics()
    await asyncio.to_thread(storage.__enter__)
    try:
        sender, stamps = await outage_run(storage.write_url, tmp_path, storage.stop,
                                          storage.start)
        await asyncio.to_thread(storage.flush)
        exported = await asyncio.to_thread(storage.export, '{__name__="outage_probe"}')
    finally:
        await asyncio.to_thread(storage.__exit__, None, None, None)
    [series] = exported
    assert series["timestamps"] == stamps  # every round, in order, original timestamps
    assert series["values"] == [float(i) for i in range(len(stamps))]
    assert sender.counters.failures["connection"] > 0 and sender.buffer.dropped_samples == 0


@needs_prometheus
async def test_prometheus_outage_loses_nothing(tmp_path: Path) -> None:
    server = PrometheusServer([], extra_args=["--web.enable-remote-write-receiver"])
    await asyncio.to_thread(server.__enter__)
    try:
        sender, stamps = await outage_run(f"{server.url}/api/v1/write", tmp_path,
                                          lambda: stop_prometheus(server),
                                          lambda: restart_prometheus(server))
        raw: list[dict[str, Any]] = await asyncio.to_thread(
            server.query, "outage_probe[15m]", time.time())
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)
    [series] = raw
    assert [round(float(t) * 1000) for t, _ in series["values"]] == stamps
    assert sender.counters.failures["connection"] > 0


# ---------------------------------------------------------------- in the daemon


async def test_daemon_writes_each_round_and_follows_a_reload(tmp_path: Path) -> None:
    """A real daemon on loopback (one HTTP endpoint as its "country"): every round reaches the
    remote-write receiver stamped with the round's time; SIGHUP's reload moves it to another."""
    async with World() as world, Scripted([]) as first, Scripted([]) as second:
        def config(url: str) -> Path:
            return write_config(tmp_path, "ams", world.port, remote_write=[
                {"url": url, "name": "main", "timeout_s": 2,
                 "external_labels": {"region": "eu"}}])

        path = config(first.url)
        daemon = Daemon(load_config(path), RealClock(), config_path=path, listen="127.0.0.1:0")
        task = asyncio.create_task(daemon.run())
        try:
            deadline = time.monotonic() + 30
            while len(first.accepted) < 2:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            config(second.url)
            daemon.request_reload()
            while len(second.accepted) < 2:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
        finally:
            daemon.request_stop()
            assert await asyncio.wait_for(task, timeout=15) == 0
    counters = [s for request in first.accepted + second.accepted for s in request
                if dict(s.labels)["__name__"] == "shutdown_monitor_rounds_total"]
    assert len(counters) >= 4
    for series in counters:
        assert {k: v for k, v in series.labels if k in ("vantage", "region", "job")} == {
            "vantage": "ams", "region": "eu", "job": "shutdown-monitor"}
        [(_, ms)] = series.samples
        assert ms % 1000 == 0  # the round's aligned time (1 s rounds), not the send time
    up = [s for request in first.accepted for s in request
          if dict(s.labels)["__name__"] == "shutdown_monitor_targets_up"
          and dict(s.labels)["country"] == "KZ"]
    assert up and all(value == 8.0 for s in up for value, _ in s.samples)
