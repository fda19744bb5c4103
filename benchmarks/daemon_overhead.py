"""Benchmark the daemon's own work per round, around the probing: metrics, history write,
detector update, incident lifecycle, persistence; and the cost of a start (priming the detector
from history) and of serving /metrics and /api/status.

The rounds are synthetic (no packets: the probing itself is measured by round_kz.py and
probe_engine.py): a world of `--countries` countries with `--asns` networks each, every round
producing the points and counts a real round would (icmp_blocks_up/total per country and per
ASN, rtt_p50 per country, the vantage series). Midway, one country is switched off, so the
detector and lifecycle raise a real incident. Virtual time: rounds run back to back.

    python3 benchmarks/daemon_overhead.py                       # 250 countries x 20 ASNs
    python3 benchmarks/daemon_overhead.py --countries 50 --rounds 288

Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from monitor.clock import VirtualClock
from monitor.config import Config, parse_config
from monitor.daemon import Daemon
from monitor.rounds import RoundOutcome, TargetCount
from monitor.series import SIGNAL_VANTAGE_UP, VANTAGE_COUNTRY, SeriesPoint

START = datetime(2022, 1, 1, tzinfo=UTC)


def country_codes(n: int) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXY"
    return [a + b for a in letters for b in letters][:n]


class SyntheticDriver:
    """Rounds as a real driver would hand them over, from a seeded generator."""

    def __init__(self, countries: list[str], asns: int, dark_from: int) -> None:
        self.countries = countries
        self.asns = asns
        self.dark_from = dark_from
        self.rounds = 0
        self.generate_s = 0.0
        self.random = random.Random(7)

    async def run(self, now: datetime) -> RoundOutcome:
        began = time.perf_counter()
        rnd = self.random
        points: list[SeriesPoint] = []
        counts: list[TargetCount] = []
        for index, code in enumerate(self.countries):
            dark = index == 0 and self.rounds >= self.dark_from
            country_total = country_up = 0
            for a in range(self.asns):
                asn = 64512 + index * self.asns + a
                total = 20 + (a * 7) % 50
                up = 0 if dark else total - rnd.randint(0, 2)
                counts.append(TargetCount(code, asn, "icmp", total, up))
                points.append(SeriesPoint(now, code, "asn", str(asn), "icmp_blocks_total", total))
                points.append(SeriesPoint(now, code, "asn", str(asn), "icmp_blocks_up", up))
                country_total += total
                country_up += up
            points.append(SeriesPoint(now, code, "country", code, "icmp_blocks_total",
                                      country_total))
            points.append(SeriesPoint(now, code, "country", code, "icmp_blocks_up", country_up))
            points.append(SeriesPoint(now, code, "country", code, "rtt_p50_seconds",
                                      0.05 + rnd.random() * 0.005))
        points.append(SeriesPoint(now, VANTAGE_COUNTRY, "vantage", "bench", SIGNAL_VANTAGE_UP, 1))
        outcome = RoundOutcome(
            time=now, duration_s=1.0, points=points, counts=counts,
            probes=Counter({("icmp", "success"): sum(c.up for c in counts)}),
            control_total=3, control_up=3, vantage_up=True,
        )
        self.rounds += 1
        self.generate_s += time.perf_counter() - began
        return outcome

    def checkpoint(self) -> None:
        return None  # nothing learned to persist

    async def close(self) -> None:
        return None


class HoldingClock(VirtualClock):
    """Virtual time that runs `rounds` rounds, then holds (so the API is measured idle)."""

    def __init__(self, start: datetime, rounds: int) -> None:
        super().__init__(start)
        self.left = rounds

    async def sleep_until(self, when: datetime) -> None:
        if self.left <= 0:
            await asyncio.Event().wait()  # until the daemon is stopped
        self.left -= 1
        await super().sleep_until(when)


def bench_config(root: Path, interval_s: int) -> Config:
    return parse_config(
        {"vantage": {"name": "bench"}, "interval_s": interval_s,
         "history": {"path": str(root / "history.sqlite")}, "hitlist_dir": str(root)},
        str(root / "bench.yaml"),
    )


async def scrape(daemon: Daemon, times: int) -> dict[str, float]:
    assert daemon.api is not None
    base = f"http://127.0.0.1:{daemon.api.port}"
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for path in ("/metrics", "/api/status", "/api/incidents"):
            began = time.perf_counter()
            size = 0
            for _ in range(times):
                async with http.get(base + path) as response:
                    size = len(await response.read())
            out[f"{path}_ms"] = round(1000 * (time.perf_counter() - began) / times, 2)
            out[f"{path}_bytes"] = size
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    codes = country_codes(args.countries)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = bench_config(root, args.interval)
        driver = SyntheticDriver(codes, args.asns, dark_from=args.rounds // 2)
        clock = VirtualClock(START)
        daemon = Daemon(config, clock, listen="127.0.0.1:0", max_rounds=args.rounds,
                        round_driver_factory=lambda _config, _shard: driver)
        wall, cpu = time.perf_counter(), time.process_time()
        await daemon.run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per_round_wall = (wall - driver.generate_s) / args.rounds
        incidents = [(i["country"], i["kind"], i["severity"]) for i in daemon.incidents()]

        # A restart: open the history, prime the detector, then serve the API for a while.
        restart_driver = SyntheticDriver(codes, args.asns, dark_from=0)
        holding = HoldingClock(clock.now(), rounds=1)
        again = Daemon(config, holding, listen="127.0.0.1:0",
                       round_driver_factory=lambda _config, _shard: restart_driver)
        began = time.perf_counter()
        task = asyncio.create_task(again.run())
        while again.last.number < 1:
            if task.done():
                raise RuntimeError(f"daemon stopped before its first round: {task.result()}")
            await asyncio.sleep(0.01)
        start_to_first_round = time.perf_counter() - began
        served = await scrape(again, 20)
        again.request_stop()
        await task
        history_bytes = (root / "history.sqlite").stat().st_size

    points_per_round = args.countries * (2 * args.asns + 3) + 1
    return {
        "countries": args.countries, "asns_per_country": args.asns, "rounds": args.rounds,
        "points_per_round": points_per_round,
        "daemon_overhead_per_round_ms": round(1000 * per_round_wall, 1),
        "cpu_per_round_ms_incl_generation": round(1000 * cpu / args.rounds, 1),
        "synthetic_generation_per_round_ms": round(1000 * driver.generate_s / args.rounds, 1),
        "restart_to_first_round_s": round(start_to_first_round, 2),
        "history_bytes": history_bytes,
        "incidents": incidents,
        **served,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--countries", type=int, default=250)
    parser.add_argument("--asns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=96)
    parser.add_argument("--interval", type=int, default=300)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=1))
