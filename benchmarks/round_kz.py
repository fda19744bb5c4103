"""Benchmark one round over a Kazakhstan-sized universe: wall time and CPU per round.

The real KZ prefix list (packaged snapshot, ~13,000 /24 blocks) is mapped block by block onto
10.0.0.0/10 inside a network namespace the script creates, where 10.0.0.0/10 is an AnyIP local
route (every address answers ICMP). Each block has one known responsive address (.1) in the
hitlist, as after discovery. `--lost N` drops the preferred address of every N-th block with nft
(so those blocks need a re-probe on their second address, .254, in the first round; then .254 is
preferred); `--loss-pct P` drops P% of all echo requests at random, every round (throttling).
The ICMP timeout is 1 s. Root needed; nothing leaves the namespace.

    python3 benchmarks/round_kz.py                  # 5 rounds, no loss
    python3 benchmarks/round_kz.py --lost 10        # every 10th block needs a re-probe
    python3 benchmarks/round_kz.py --loss-pct 10    # 10% random loss on every round

Peak RSS is the process's VmHWM (/proc/self/status), reset (clear_refs 5) once the universe and
hitlist are built, so it is the peak while probing; the summary also gives the RSS after setup.

Prints one JSON line per round and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from array import array
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procstat import reset_peak_rss, vm_mib

from monitor.hitlist import Hitlist
from monitor.rounds import RoundSettings, run_round
from monitor.targets import (
    CountryUniverse,
    Universe,
    address_of,
    blocks_of,
    load_packaged_prefixes,
)
from probes.base import Prober
from probes.icmp_batch import IcmpBatchProber
from probes.pacing import Blocklist, Pacer, PacingPolicy
from tests.netns import Netns, run_in_netns

LAB_BASE = 0x0A0000  # block number of 10.0.0.0/24


def lab_universe(lost_every: int) -> tuple[Universe, Hitlist, list[str]]:
    """KZ's blocks, renumbered onto 10.0.0.0/10 in their order; a hitlist with .1 and .254."""
    real = blocks_of(load_packaged_prefixes("KZ"))
    blocks = [LAB_BASE + i for i in range(len(real))]
    country = CountryUniverse(
        code="KZ", blocks=array("I", blocks), block_asns=array("I", [0] * len(blocks)),
        prefix_blocks=len(real),
    )
    universe = Universe((country,))
    hitlist = Hitlist()
    dropped = []
    for i, block in enumerate(blocks):
        hitlist.record(block, 1, answered=True)
        hitlist.record(block, 254, answered=True)
        if lost_every and i % lost_every == 0:
            dropped.append(address_of(block, 1))
    return universe, hitlist, dropped


async def rounds(universe: Universe, hitlist: Hitlist, count: int) -> list[dict[str, Any]]:
    probers: dict[str, Prober] = {"icmp": IcmpBatchProber(timeout_s=1.0)}
    # The lab's own blocklist: only 10.0.0.0/10 may be probed.
    blocklist = Blocklist.from_cidrs(["0.0.0.0/5", "8.0.0.0/7", "10.64.0.0/10", "10.128.0.0/9",
                                      "11.0.0.0/8", "12.0.0.0/6", "16.0.0.0/4", "32.0.0.0/3",
                                      "64.0.0.0/2", "128.0.0.0/1", "::/0"])
    pacer = Pacer(PacingPolicy(rate_pps=None, max_in_flight=4096, per_block_pps=None), blocklist)
    results = []
    try:
        for number in range(count):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            outcome = await run_round(
                universe, probers, pacer, datetime.now(UTC), hitlists={"KZ": hitlist},
                settings=RoundSettings(reprobes=3, discovery_per_round=0),
            )
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            points = {p.signal: p.value for p in outcome.points if p.scope == "country"}
            results.append({
                "round": number, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                "blocks_total": points.get("icmp_blocks_total"),
                "blocks_up": points.get("icmp_blocks_up"),
                "probes": sum(outcome.probes.values()),
                "icmp_loss": round(points.get("icmp_loss", 0.0), 4),
                "peak_rss_mib": vm_mib("VmHWM"),
            })
            print(json.dumps(results[-1]), flush=True)
    finally:
        for prober in probers.values():
            await prober.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lost", type=int, default=0, help="drop .1 of every N-th block")
    parser.add_argument("--loss-pct", type=int, default=0,
                        help="drop this percentage of all echo requests at random (throttling)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("round_kz.py: needs root (it creates a network namespace)")
    rss_start = vm_mib("VmRSS")
    universe, hitlist, dropped = lab_universe(args.lost)
    rss_setup, peak_setup = vm_mib("VmRSS"), vm_mib("VmHWM")
    reset_peak_rss()  # the peak from here on is the rounds'
    with Netns("smbench") as ns:
        ns.exec("ip", "route", "add", "local", "10.0.0.0/10", "dev", "lo")
        if dropped or args.loss_pct:
            ns.exec("nft", "add table inet lab")
            ns.exec("nft", "add chain inet lab in { type filter hook input priority 0 ; }")
        if args.loss_pct:
            ns.exec("nft", "add rule inet lab in icmp type echo-request "
                    f"numgen random mod 100 < {args.loss_pct} drop")
        if dropped:
            ns.exec("nft", "add set inet lab lost { type ipv4_addr ; }")
            for start in range(0, len(dropped), 500):
                chunk = ", ".join(dropped[start:start + 500])
                ns.exec("nft", f"add element inet lab lost {{ {chunk} }}")
            ns.exec("nft", "add rule inet lab in ip daddr @lost drop")
        results = run_in_netns(ns, lambda: rounds(universe, hitlist, args.rounds), timeout=600)
    steady = results[1:] or results
    print(json.dumps({
        "blocks": len(universe.countries[0].blocks),
        "lost_every": args.lost,
        "loss_pct": args.loss_pct,
        "median_wall_s": sorted(r["wall_s"] for r in steady)[len(steady) // 2],
        "median_cpu_s": sorted(r["cpu_s"] for r in steady)[len(steady) // 2],
        "max_wall_s": max(r["wall_s"] for r in results),
        "rss_start_mib": rss_start, "rss_after_setup_mib": rss_setup,
        "peak_rss_setup_mib": peak_setup, "peak_rss_rounds_mib": vm_mib("VmHWM"),
    }))


if __name__ == "__main__":
    main()
