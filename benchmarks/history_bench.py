"""Benchmark the embedded history store on a Kazakhstan-sized universe.

Simulates the daemon: every round appends one point per series and flushes (one transaction),
for `--days` days of rounds every `--interval` seconds. Then reports bytes on disk per day,
the flush time per round (median and the hourly compaction rounds), and the time to read
30 days of the country into a DataFrame (what `detect --history` and reports do).

KZ-sized: 12,987 /24 blocks from the RIR delegations in /work/shared/data (shown below when the
file is there), the country plus `--asns` networks, `--signals` signals each.

    python3 benchmarks/history_bench.py --days 35 --asns 120
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from monitor.history import HistoryStore
from monitor.series import SeriesPoint

KZ_PREFIXES = Path("/work/shared/data/country-prefixes/kz.ipv4.txt")
SIGNALS = (
    "icmp_blocks_up", "icmp_blocks_total", "tcp_up", "tcp_total", "http_up", "rtt_p50_seconds",
    "dns_up", "http_total",
)


def kz_blocks() -> int:
    if not KZ_PREFIXES.exists():
        return 12_987
    total = 0
    for line in KZ_PREFIXES.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            total += max(1, ipaddress.ip_network(line).num_addresses // 256)
    return total


def round_points(
    when: datetime, entities: list[tuple[str, int]], signals: tuple[str, ...],
    rng: np.random.Generator,
) -> list[SeriesPoint]:
    """Plausible values: integer counts with noise (as rounds produce), RTTs as floats."""
    points = []
    noise = rng.normal(0.0, 0.02, size=len(entities))
    for (entity, blocks), jitter in zip(entities, noise, strict=True):
        scope = "country" if entity == "KZ" else "asn"
        for signal in signals:
            if signal.endswith("_total"):
                value = float(blocks)
            elif signal.startswith("rtt"):
                value = float(round(0.08 + abs(jitter), 6))
            else:
                value = float(round(blocks * (0.62 + jitter)))
            points.append(SeriesPoint(when, "KZ", scope, entity, signal, value))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=35.0)
    parser.add_argument("--interval", type=int, default=300, help="round interval, seconds")
    parser.add_argument("--asns", type=int, default=120)
    parser.add_argument("--signals", type=int, default=6, choices=range(1, len(SIGNALS) + 1))
    parser.add_argument("--dir", type=Path, default=None, help="where to put the store")
    args = parser.parse_args()

    blocks = kz_blocks()
    rng = np.random.default_rng(7)
    sizes = rng.pareto(1.2, size=args.asns) + 1
    asn_blocks = np.maximum(1, (sizes / sizes.sum() * blocks).astype(int))
    entities = [("KZ", blocks)] + [(str(9000 + i), int(b)) for i, b in enumerate(asn_blocks)]
    signals = SIGNALS[: args.signals]
    rounds = int(args.days * 86_400 / args.interval)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    print(f"universe: {blocks} /24 blocks, {len(entities)} entities x {len(signals)} signals "
          f"= {len(entities) * len(signals)} series; {rounds} rounds every {args.interval}s")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "history.sqlite"
        store = HistoryStore(path, retention_days=args.days + 1)
        flush_times: list[float] = []
        began = time.perf_counter()
        for index in range(rounds):
            store.append_points(
                round_points(start + timedelta(seconds=index * args.interval), entities,
                             signals, rng))
            t0 = time.perf_counter()
            store.flush()
            flush_times.append(time.perf_counter() - t0)
        load_s = time.perf_counter() - began
        store.close()
        size = path.stat().st_size
        print(f"written in {load_s:.1f}s; flush per round: median "
              f"{statistics.median(flush_times) * 1e3:.1f} ms, p99 "
              f"{np.percentile(flush_times, 99) * 1e3:.1f} ms, max {max(flush_times) * 1e3:.1f} ms")
        print(f"size: {size / 1e6:.1f} MB = {size / args.days / 1e6:.2f} MB/day = "
              f"{size / (rounds * len(entities) * len(signals)):.2f} bytes/point")

        reader = HistoryStore(path, readonly=True)
        until = start + timedelta(seconds=(rounds - 1) * args.interval)
        since = until - timedelta(days=30)
        timings, cpu = [], []
        for _ in range(7):
            t0, c0 = time.perf_counter(), time.process_time()
            frame = reader.read_frame(country="KZ", since=since, until=until)
            timings.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        t0 = time.perf_counter()
        one = reader.read_frame(country="KZ", since=since, until=until, scope="country",
                                signals=["icmp_blocks_up"])
        one_s = time.perf_counter() - t0
        reader.close()
        print(f"read 30 days of KZ: {len(frame):,} points in median "
              f"{statistics.median(timings):.3f}s (min {min(timings):.3f}s, "
              f"max {max(timings):.3f}s); CPU time median {statistics.median(cpu):.3f}s; "
              f"load average during the run {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"read 30 days of one series (KZ icmp_blocks_up): {len(one):,} points "
              f"in {one_s:.4f}s")


if __name__ == "__main__":
    main()
