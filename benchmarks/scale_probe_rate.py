"""Sustained probe rate: rounds back to back over a whole /8 that answers, for a long time.

A network namespace made by the script routes 10.0.0.0/8 locally (AnyIP: every address answers
ICMP echo), so 65,536 /24 blocks answer. The daemon's round (`run_round`, IcmpBatchProber, the
shared Pacer capped at --rate probes/s) probes one hitlist address per block, round after round,
for --minutes. Every block answers, so any block counted down is a false loss. Prints one JSON
line per round and a summary (probes/s over the whole run, CPU share, false losses). Root
needed; nothing leaves the namespace (the script's blocklist allows only 10.0.0.0/8).

    python3 benchmarks/scale_probe_rate.py --minutes 10 --rate 12000
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

from monitor.hitlist import Hitlist
from monitor.rounds import RoundSettings, run_round
from monitor.targets import CountryUniverse, Universe
from probes.base import Prober
from probes.icmp_batch import IcmpBatchProber
from probes.pacing import Blocklist, Pacer, PacingPolicy
from tests.netns import Netns, run_in_netns

FIRST_BLOCK = 0x0A0000  # 10.0.0.0/24
BLOCKS = 65_536  # the whole of 10.0.0.0/8
OUTSIDE_10_8 = ["0.0.0.0/5", "8.0.0.0/7", "11.0.0.0/8", "12.0.0.0/6", "16.0.0.0/4",
                "32.0.0.0/3", "64.0.0.0/2", "128.0.0.0/1", "::/0"]


def universe_and_hitlist(blocks: int) -> tuple[Universe, Hitlist]:
    numbers = array("I", range(FIRST_BLOCK, FIRST_BLOCK + blocks))
    country = CountryUniverse(code="ZZ", blocks=numbers, block_asns=array("I", bytes(4 * blocks)),
                              prefix_blocks=blocks)
    hitlist = Hitlist()
    for block in numbers:
        hitlist.record(block, 1, answered=True)
    return Universe((country,)), hitlist


async def sustained(universe: Universe, hitlist: Hitlist, rate: float | None,
                    seconds: float) -> dict[str, Any]:
    probers: dict[str, Prober] = {"icmp": IcmpBatchProber(timeout_s=1.0)}
    pacer = Pacer(PacingPolicy(rate_pps=rate, max_in_flight=4096, per_block_pps=None),
                  Blocklist.from_cidrs(OUTSIDE_10_8))
    began, cpu0 = time.perf_counter(), time.process_time()
    probes = false_down = rounds = 0
    walls = []
    try:
        while time.perf_counter() - began < seconds:
            start = time.perf_counter()
            outcome = await run_round(universe, probers, pacer, datetime.now(UTC),
                                      hitlists={"ZZ": hitlist},
                                      settings=RoundSettings(reprobes=3, discovery_per_round=0))
            wall = time.perf_counter() - start
            points = {p.signal: p.value for p in outcome.points if p.scope == "country"}
            sent = sum(outcome.probes.values())
            down = int(points["icmp_blocks_total"] - points["icmp_blocks_up"])
            probes += sent
            false_down += down
            rounds += 1
            walls.append(wall)
            print(json.dumps({"round": rounds, "wall_s": round(wall, 2), "probes": sent,
                              "probes_per_s": round(sent / wall), "false_down": down,
                              "icmp_loss": round(points.get("icmp_loss", 0.0), 5)}), flush=True)
    finally:
        for prober in probers.values():
            await prober.close()
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu0
    return {"blocks": len(universe.countries[0].blocks), "rate_cap": rate, "rounds": rounds,
            "elapsed_s": round(elapsed, 1), "probes": probes,
            "probes_per_s": round(probes / elapsed), "cpu_share": round(cpu / elapsed, 3),
            "false_down_blocks": false_down, "min_round_s": round(min(walls), 2),
            "max_round_s": round(max(walls), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=12_000.0,
                        help="Pacer cap in probes/s (0: no cap)")
    parser.add_argument("--blocks", type=int, default=BLOCKS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("scale_probe_rate.py: needs root (it creates a network namespace)")
    if not 0 < args.blocks <= BLOCKS:
        sys.exit(f"--blocks: expected 1..{BLOCKS}")
    universe, hitlist = universe_and_hitlist(args.blocks)
    with Netns("smrate") as ns:
        ns.exec("ip", "route", "add", "local", "10.0.0.0/8", "dev", "lo")
        summary = run_in_netns(
            ns, lambda: sustained(universe, hitlist, args.rate or None, args.minutes * 60),
            timeout=args.minutes * 60 + 300)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
