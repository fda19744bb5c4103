"""ICMP at paced rates: CPU per probe of IcmpProber's path against IcmpBatchProber's batch path.

The batch path (chunks handed to the batch engine) pays per chunk; under a rate cap the feeder
waits for the pacer between probes, so chunks shrink towards one probe. This measures where the
batch path starts to pay, which sets probes/icmp_batch.BATCH_FROM_PPS. Runs in a network
namespace this script creates (root needed; 10.0.0.0/8 is an AnyIP local route there, the same
setup as benchmarks/probe_engine.py); nothing leaves it.

    python3 benchmarks/icmp_paced.py --rates 500,2000,10000,20000,50000,0 --seconds 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from probes.base import Target  # noqa: E402, I001
from probes.chunked import ChunkedProber  # noqa: E402
from probes.icmp import IcmpProber  # noqa: E402
from probes.icmp_batch import IcmpBatchProber  # noqa: E402
from probes.pacing import Pacer, PacingPolicy  # noqa: E402
from tests.netns import Netns  # noqa: E402

from probe_engine import DownCount, prepare, run_ours_in_netns, sweep_addresses  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="500,2000,10000,20000,50000,0",
                        help="probes/s caps to try (0: no cap)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=4.0, help="probing time per run")
    parser.add_argument("--runs", type=int, default=2, help="runs of each pair, alternated")
    return parser.parse_args()


def measure(ns: Netns, targets: list[Target], rate: float | None, batch_path: bool) -> str:
    count = int((rate or 60_000) * ARGS.seconds)

    async def run() -> str:
        prober = IcmpBatchProber(timeout_s=2.0)
        policy = PacingPolicy(rate_pps=rate, max_in_flight=4096, per_block_pps=None)
        sink = DownCount()
        stream = (targets[i % len(targets)] for i in range(count))
        times0, started = os.times(), time.perf_counter()
        if batch_path:  # the chunked path whatever the rate
            await ChunkedProber.probe_many(prober, stream, Pacer(policy), sink)
        else:
            await IcmpProber.probe_many(prober.prober, stream, Pacer(policy), sink)
        seconds, times1 = time.perf_counter() - started, os.times()
        await prober.close()
        cpu = times1.user + times1.system - times0.user - times0.system
        cap = f"{rate:,.0f}/s" if rate else "no cap"
        path = "batch path" if batch_path else "IcmpProber"
        share = cpu / seconds * 100
        return (f"| {cap} | {path} | {count:,} | {count / seconds:,.0f} | "
                f"{cpu / count * 1e6:.1f} | {share:.0f}% | {sink.down} |")  # fmt: skip

    return run_ours_in_netns(ns, run, timeout=600)


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("icmp_paced.py: needs root (network namespaces)")
    targets = [Target(address) for address in sweep_addresses(65536)]
    print("| rate cap | path | probes | probes/s | CPU us/probe | CPU share of a core | down |")
    print("|---|---|---|---|---|---|---|")
    with Netns("icmppaced") as ns:
        prepare(ns)
        for _ in range(ARGS.runs):
            for rate in (float(r) or None for r in ARGS.rates.split(",")):
                for batch_path in (False, True):
                    print(measure(ns, targets, rate, batch_path), flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nload average {' '.join(load)} at the end")


ARGS = parse()

if __name__ == "__main__":
    main()
