"""Remote-write throughput (samples/s) next to Prometheus scraping the same data.

A `MetricsState` shaped like a world-scale daemon (--countries x --asns networks, ICMP, RTT
histograms per country) is exported three ways, all on 127.0.0.1:
- encode: registry -> WriteRequest protobuf -> snappy, CPU only (what every round costs);
- remote write of --rounds rounds (one timestamp each) through the on-disk buffer into a real
  VictoriaMetrics and a real Prometheus (--web.enable-remote-write-receiver), timed until the
  buffer is empty;
- a real Prometheus scraping the same registry every second: its own scrape_duration_seconds
  and scrape_samples_scraped.

    python3 benchmarks/scale_remote_write.py --countries 200 --asns 50 --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from monitor.export import MetricsState, make_registry
from monitor.remote_write import (
    LabelCache,
    RemoteWriter,
    RemoteWriteTarget,
    batches,
    compress,
    encode_write_request,
    registry_series,
)
from monitor.rounds import RoundOutcome, TargetCount
from tests.prom import MetricsEndpoint, PrometheusServer
from tests.scale.storage import VictoriaMetrics

LABELS = {"job": "shutdown-monitor", "instance": "127.0.0.1:9310", "vantage": "bench"}


def world_registry(countries: int, asns: int) -> CollectorRegistry:
    state = MetricsState()
    codes = [f"{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(countries)]
    counts = [TargetCount(cc, 1000 * i + a, "icmp", 200, 190 - a % 7)
              for i, cc in enumerate(codes) for a in range(asns)]
    rtts = {(cc, "icmp"): [0.01 * (1 + k % 50) for k in range(100)] for cc in codes}
    state.record_round(RoundOutcome(time=datetime.now(UTC), duration_s=300.0, counts=counts,
                                    probes=Counter({("icmp", "success"): 1000}), rtts=rtts))
    state.set_levels((cc, "asn", str(1000 * i + a), "icmp_blocks_up", 0.99)
                     for i, cc in enumerate(codes) for a in range(asns))
    return make_registry(state, process_metrics=False)


def encode_rate(registry: CollectorRegistry, repeat: int = 5) -> dict[str, Any]:
    samples, seconds = 0, 0.0
    cache = LabelCache()  # as a writer keeps it: label sets are encoded once, then reused
    for k in range(repeat):
        cpu = time.process_time()
        series = registry_series(registry, 1_700_000_000_000 + k, LABELS)
        payload_bytes = 0
        for batch, count in batches(series):
            payload_bytes += len(compress(encode_write_request(batch, cache)))
            samples += count
        seconds += time.process_time() - cpu
    return {"samples_per_round": samples // repeat,
            "encode_samples_per_s": round(samples / seconds),
            "compressed_bytes_per_round": payload_bytes}


async def remote_rate(registry: CollectorRegistry, url: str, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as buffer:
        writer = RemoteWriter(RemoteWriteTarget(url=url, name="bench", buffer_dir=Path(buffer),
                                                labels=LABELS))
        start_s = time.time() - rounds * 15
        began = time.perf_counter()
        samples = 0
        for k in range(rounds):  # buffered first (like an outage), then sent: pure throughput
            samples += writer.enqueue_registry(registry, start_s + 15 * k)
        buffered = time.perf_counter() - began
        await writer.start()
        sending = time.perf_counter()
        await asyncio.wait_for(writer.drained(), timeout=600)
        sent_s = time.perf_counter() - sending
        failures = dict(writer.counters.failures)
        await writer.close()
    return {"samples": samples, "buffer_samples_per_s": round(samples / buffered),
            "send_samples_per_s": round(samples / sent_s), "send_s": round(sent_s, 2),
            "failures": failures}


def scrape_rate(registry: CollectorRegistry, seconds: float) -> dict[str, Any]:
    with MetricsEndpoint(registry) as endpoint, PrometheusServer(
            [endpoint.target], scrape_interval="2s") as prometheus:
        time.sleep(seconds)
        durations = [float(v) for _, v in prometheus.query(
            f"scrape_duration_seconds[{int(seconds)}s]")[0]["values"]]
        scraped = int(float(prometheus.query("scrape_samples_scraped")[0]["value"][1]))
    median = statistics.median(durations)
    return {"scrapes": len(durations), "samples_per_scrape": scraped,
            "median_scrape_s": round(median, 3), "scrape_samples_per_s": round(scraped / median)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--countries", type=int, default=200)
    parser.add_argument("--asns", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scrape-seconds", type=float, default=30.0)
    args = parser.parse_args()
    registry = world_registry(args.countries, args.asns)
    result: dict[str, Any] = {"countries": args.countries, "asns_per_country": args.asns}
    result["encode"] = encode_rate(registry)
    with VictoriaMetrics() as vm:
        result["victoria_metrics"] = asyncio.run(remote_rate(registry, vm.write_url, args.rounds))
    with PrometheusServer([], extra_args=["--web.enable-remote-write-receiver"]) as prometheus:
        result["prometheus_remote_write"] = asyncio.run(
            remote_rate(registry, f"{prometheus.url}/api/v1/write", args.rounds))
    result["prometheus_scrape"] = scrape_rate(registry, args.scrape_seconds)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
