"""Benchmark rounds over 50 Kazakhstan-sized countries in ONE process: wall, CPU, peak RSS, history.

Issue 3: "50 countries of that size in one process within a 300 s round". Two universes:

- `--source kz-copies` (default): 50 copies of the real KZ prefix list (packaged snapshot,
  12,987 /24 blocks each, 649,350 in all), each attributed to ASNs with the packaged KZ ASN table
  (five major Kazakh networks; the rest unattributed). The copies carry the codes of the 50
  countries closest to KZ's size as labels (a label only: the blocks are KZ's).
- `--source nearest`: the real prefix lists of the 50 countries whose packaged lists are closest
  to KZ's size (402,519 blocks); only KZ has ASN attribution (the only packaged ASN table).

The blocks are renumbered in order onto 10.0.0.0/8 (65,536 /24s) and then 240.0.0.0/4 (reserved
class E, never routed on the Internet) inside a network namespace the script creates, where both
ranges are AnyIP local routes: every address answers ICMP from the namespace's own kernel. The
lab blocklist allows only those two ranges. One hitlist address (.1, then .254) per block, as
after discovery. The real round code (monitor.rounds.run_round) and the daemon's ICMP prober
(IcmpBatchProber; raw sockets, 1 s timeout) run on one event loop; pacing is the Pacer with
`--rate` probes/s (default 10,000), `--in-flight` (default 4,096) and the polite per-/24 limit
(1 probe/s, burst 3).

Peak RSS is VmHWM of the process (/proc/self/status), reset (clear_refs 5) after building the
universe and hitlists, so the rounds' figure is the peak while probing. History: the points of
the measured rounds are replayed into a monitor.history.HistoryStore at one round every
`--interval` s (default 60) for `--history-hours` of simulated time (timestamps shifted, values
as measured), flushed per round as the daemon does; bytes per day = file size / simulated days.
Root needed; nothing leaves the namespace.

    python3 benchmarks/round_world.py                      # 3 rounds, 50 x KZ
    python3 benchmarks/round_world.py --source nearest     # the 50 real lists nearest KZ's size

Prints one JSON line per round and a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from array import array
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from procstat import reset_peak_rss, vm_kib

from monitor.asn import AsnRange, AsnTable
from monitor.history import HistoryStore
from monitor.hitlist import Hitlist
from monitor.rounds import RoundSettings, run_round
from monitor.series import SeriesPoint
from monitor.targets import (
    CountryUniverse,
    Universe,
    attribute_blocks,
    blocks_of,
    load_packaged_prefixes,
    packaged_countries,
    packaged_data,
)
from probes.base import Prober
from probes.icmp_batch import IcmpBatchProber
from probes.pacing import Blocklist, Pacer, PacingPolicy
from tests.netns import Netns, run_in_netns

COUNTRIES = 50
TEN_SLASH_8 = (0x0A0000, 1 << 16)  # (first /24 block number, blocks) of 10.0.0.0/8
CLASS_E = (0xF00000, 1 << 20)  # 240.0.0.0/4
# Everything but 10.0.0.0/8 and 240.0.0.0/4 is off limits to the lab's probes.
LAB_BLOCKLIST = ["0.0.0.0/5", "8.0.0.0/7", "11.0.0.0/8", "12.0.0.0/6", "16.0.0.0/4", "32.0.0.0/3",
                 "64.0.0.0/2", "128.0.0.0/2", "192.0.0.0/3", "224.0.0.0/4", "::/0"]


def lab_block(index: int) -> int:
    """The index-th lab block: 10.0.0.0/8 first, then 240.0.0.0/4."""
    if index < TEN_SLASH_8[1]:
        return TEN_SLASH_8[0] + index
    index -= TEN_SLASH_8[1]
    if index >= CLASS_E[1]:
        raise ValueError("the lab space holds 1,114,112 /24 blocks")
    return CLASS_E[0] + index


def nearest_countries(count: int) -> list[tuple[str, int]]:
    """The `count` packaged countries whose block counts are closest to KZ's (KZ included)."""
    sizes = {code: len(blocks_of(load_packaged_prefixes(code))) for code in packaged_countries()}
    kz = sizes["KZ"]
    codes = sorted(sizes, key=lambda code: (abs(sizes[code] - kz), code))[:count]
    return [(code, sizes[code]) for code in sorted(codes)]


def kz_asn_table() -> AsnTable:
    """The packaged KZ ASN list (asn,handle,description,prefix CSV) as a lookup table."""
    ranges = []
    with packaged_data("asn/kz_major_asns_ipv4.csv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            network = ipaddress.IPv4Network(row["prefix"])
            ranges.append(AsnRange(int(network.network_address),
                                   int(network.broadcast_address), int(row["asn"])))
    return AsnTable.from_ranges(ranges)


def lab_world(source: str, count: int) -> tuple[Universe, dict[str, Hitlist]]:
    """The universe renumbered into the lab space, and a hitlist (.1 and .254) per country."""
    asn_table = kz_asn_table()
    kz_real = blocks_of(load_packaged_prefixes("KZ"))
    kz_asns = attribute_blocks(kz_real, asn_table)
    countries: list[CountryUniverse] = []
    hitlists: dict[str, Hitlist] = {}
    used = 0
    for code, _size in nearest_countries(count):
        if source == "kz-copies":
            real, asns = kz_real, kz_asns
        else:
            real = blocks_of(load_packaged_prefixes(code))
            asns = kz_asns if code == "KZ" else array("I", bytes(4 * len(real)))
        blocks = array("I", (lab_block(used + i) for i in range(len(real))))
        used += len(real)
        countries.append(CountryUniverse(code=code, blocks=blocks, block_asns=array("I", asns),
                                         prefix_blocks=len(real)))
        hitlist = hitlists[code] = Hitlist()
        for block in blocks:
            hitlist.record(block, 1, answered=True)
            hitlist.record(block, 254, answered=True)
    return Universe(tuple(countries)), hitlists


async def rounds(universe: Universe, hitlists: dict[str, Hitlist], count: int, rate: float,
                 in_flight: int) -> tuple[list[dict[str, Any]], list[list[SeriesPoint]]]:
    probers: dict[str, Prober] = {"icmp": IcmpBatchProber(timeout_s=1.0)}
    pacer = Pacer(PacingPolicy(rate_pps=rate or None, max_in_flight=in_flight),
                  Blocklist.from_cidrs(LAB_BLOCKLIST))
    results: list[dict[str, Any]] = []
    all_points: list[list[SeriesPoint]] = []
    try:
        for number in range(count):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            outcome = await run_round(
                universe, probers, pacer, datetime.now(UTC), hitlists=hitlists,
                settings=RoundSettings(reprobes=3, discovery_per_round=0),
            )
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            totals = [p.value for p in outcome.points if p.signal == "icmp_blocks_total"
                      and p.scope == "country"]
            ups = [p.value for p in outcome.points if p.signal == "icmp_blocks_up"
                   and p.scope == "country"]
            all_points.append(outcome.points)
            results.append({
                "round": number, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                "blocks_total": int(sum(totals)), "blocks_up": int(sum(ups)),
                "probes": sum(outcome.probes.values()), "points": len(outcome.points),
                "rss_mib": round(vm_kib("VmRSS") / 1024, 1),
                "peak_rss_mib": round(vm_kib("VmHWM") / 1024, 1),
                "load1": round(os.getloadavg()[0], 2),
            })
            print(json.dumps(results[-1]), flush=True)
            await asyncio.sleep(0)
    finally:
        for prober in probers.values():
            await prober.close()
    return results, all_points


def history_bytes_per_day(rounds_points: list[list[SeriesPoint]], interval_s: int,
                          hours: float) -> dict[str, Any]:
    """Replay the measured rounds' points (cycled) at `interval_s` for `hours` of simulated time."""
    steps = int(hours * 3600 // interval_s)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with tempfile.TemporaryDirectory() as tmp:
        store = HistoryStore(Path(tmp) / "history.sqlite", retention_days=35)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        written = 0
        day_sizes: list[int] = []  # file size at the end of each simulated day
        try:
            for step in range(steps):
                when = start + timedelta(seconds=step * interval_s)
                points = rounds_points[step % len(rounds_points)]
                store.append_points(SeriesPoint(when, p.country, p.scope, p.entity, p.signal,
                                                p.value) for p in points)
                store.flush()
                written += len(points)
                if (step + 1) * interval_s % 86400 == 0:
                    day_sizes.append(store.size_bytes())
            size = store.size_bytes()
        finally:
            store.close()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    days = steps * interval_s / 86400
    return {
        "history_rounds": steps, "history_points": written, "history_bytes": size,
        "history_mb_per_day": round(size / days / 1e6, 2),
        "history_bytes_per_point": round(size / written, 2),
        # Growth per day after the first (the first includes the file's fixed cost).
        "history_mb_each_day": [round((b - a) / 1e6, 2) for a, b in pairwise([0, *day_sizes])],
        "history_write_wall_s": round(wall, 1), "history_write_cpu_s": round(cpu, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--source", choices=("kz-copies", "nearest"), default="kz-copies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--countries", type=int, default=COUNTRIES)
    parser.add_argument("--rate", type=float, default=10_000.0, help="probes/s cap (0: none)")
    parser.add_argument("--in-flight", type=int, default=4096)
    parser.add_argument("--interval", type=int, default=60, help="round interval for history, s")
    parser.add_argument("--history-hours", type=float, default=24.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("round_world.py: needs root (it creates a network namespace)")
    rss_start = vm_kib("VmRSS")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    universe, hitlists = lab_world(args.source, args.countries)
    setup = {"setup_wall_s": round(time.perf_counter() - wall0, 1),
             "setup_cpu_s": round(time.process_time() - cpu0, 1),
             "rss_start_mib": round(rss_start / 1024, 1),
             "rss_after_setup_mib": round(vm_kib("VmRSS") / 1024, 1),
             "peak_rss_setup_mib": round(vm_kib("VmHWM") / 1024, 1)}
    # Reset the peak so that the rounds' peak is not the setup's (reading every country's
    # packaged list to find the nearest ones is a benchmark cost, not a daemon's).
    reset_peak_rss()
    print(json.dumps(setup), flush=True)
    with Netns("smworld") as ns:
        ns.exec("ip", "route", "add", "local", "10.0.0.0/8", "dev", "lo")
        ns.exec("ip", "route", "add", "local", "240.0.0.0/4", "dev", "lo")
        results, rounds_points = run_in_netns(
            ns, lambda: rounds(universe, hitlists, args.rounds, args.rate, args.in_flight),
            timeout=400 * args.rounds)
    peak_after_rounds = vm_kib("VmHWM")
    history = history_bytes_per_day(rounds_points, args.interval, args.history_hours)
    steady = results[1:] or results
    summary: dict[str, Any] = {
        "source": args.source, "countries": len(universe.countries),
        "blocks": universe.block_count(),
        "rate_pps": args.rate, "in_flight": args.in_flight,
        "median_wall_s": sorted(r["wall_s"] for r in steady)[len(steady) // 2],
        "median_cpu_s": sorted(r["cpu_s"] for r in steady)[len(steady) // 2],
        "max_wall_s": max(r["wall_s"] for r in results),
        "points_per_round": results[-1]["points"],
        "peak_rss_rounds_mib": round(peak_after_rounds / 1024, 1),
        **setup, **history,
        "kernel": subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
