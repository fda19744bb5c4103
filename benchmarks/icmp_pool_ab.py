"""ICMP engine A/B: one process (IcmpBatchProber, the shipped one, and the plain IcmpProber)
against the worker pool, CPU per probe split by process.

Runs in a network namespace this script creates (root needed; 10.0.0.0/8 is an AnyIP local
route there, the same setup and target sweep as benchmarks/probe_engine.py, no blackbox) and
prints, per run: probes/s, the caller's CPU per probe (with its kernel share) and each worker's
CPU per probe (over all probes). `--root DIR` runs the `probes` package of another checkout
(e.g. `git archive OLD probes | tar -x -C DIR`), from DIR, so workers import the same code:

    flock /tmp/bench.lock python3 benchmarks/icmp_pool_ab.py --runs 3
    (cd /tmp/old && flock /tmp/bench.lock python3 /work/main/benchmarks/icmp_pool_ab.py \\
        --root /tmp/old --single '' --runs 3)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse() -> argparse.Namespace:
    def levels(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=300_000, help="probes per run")
    parser.add_argument("--runs", type=int, default=2, help="runs of each variant, alternated")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the pool")
    parser.add_argument("--single", type=levels, default=[4096],
                        help="in-flight caps for one process ('' to skip)")  # fmt: skip
    parser.add_argument("--pool", type=levels, default=[65536],
                        help="in-flight caps for the pool ('' to skip)")  # fmt: skip
    parser.add_argument("--root", type=Path, help="the checkout whose probes/ to run")
    return parser.parse_args()


ARGS = parse()
sys.path[:0] = [str(HERE), str(HERE.parent)]
if ARGS.root is not None:
    sys.path.insert(0, str(ARGS.root.resolve()))

# probes first: probe_engine puts this checkout's root in front of sys.path when imported.
from probes.base import Target  # noqa: E402, I001
from probes.icmp import IcmpProber  # noqa: E402
from probes.icmp_batch import IcmpBatchProber  # noqa: E402
from probes.pacing import Pacer, PacingPolicy  # noqa: E402
from probes.workers import WorkerPoolProber, worker_pool  # noqa: E402
from tests.netns import Netns  # noqa: E402

from probe_engine import DownCount, prepare, run_ours_in_netns, sweep_addresses  # noqa: E402
from procstat import cpu_seconds  # noqa: E402


def run(ns: Netns, targets: list[Target], workers: int, in_flight: int, plain: bool = False) -> str:
    count = ARGS.probes

    async def measure() -> str:
        prober: IcmpProber | IcmpBatchProber | WorkerPoolProber
        if workers:
            prober = worker_pool("icmp", workers, timeout_s=2.0)
        else:
            prober = IcmpProber(timeout_s=2.0) if plain else IcmpBatchProber(timeout_s=2.0)
        pids: list[int] = []
        if isinstance(prober, WorkerPoolProber):
            await prober.start()
            pids = prober.pids
        policy = PacingPolicy(
            rate_pps=None, max_in_flight=in_flight, per_block_pps=None, burst_s=0.005
        )
        sink = DownCount()
        stream = (targets[i % len(targets)] for i in range(count))
        workers_cpu0 = [cpu_seconds(pid) for pid in pids]
        times0, started = os.times(), time.perf_counter()
        await prober.probe_many(stream, Pacer(policy), sink)
        seconds, times1 = time.perf_counter() - started, os.times()
        workers_cpu = [cpu_seconds(p) - cpu0 for p, cpu0 in zip(pids, workers_cpu0, strict=True)]
        await prober.close()
        caller = (times1.user + times1.system - times0.user - times0.system) / count * 1e6
        kernel = (times1.system - times0.system) / count * 1e6
        per_worker = ", ".join(f"{cpu / count * 1e6:.2f}" for cpu in workers_cpu)
        total = caller + sum(workers_cpu) / count * 1e6
        source = Path(sys.modules[WorkerPoolProber.__module__].__file__ or "?").parent.parent
        return (
            f"[{source}] "
            f"{'pool of ' + str(workers) if workers else 'one process'}"
            f"{', IcmpProber' if plain else ''}, in flight {in_flight}: "
            f"{count / seconds:,.0f} probes/s; CPU us/probe: caller {caller:.2f} "
            f"(kernel {kernel:.2f}), workers [{per_worker}], total {total:.2f}; down {sink.down}"
        )

    return run_ours_in_netns(ns, measure, timeout=600)


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("icmp_pool_ab.py: needs root (network namespaces)")
    targets = [Target(address) for address in sweep_addresses(65536)]
    with Netns("icmpab") as ns:
        prepare(ns)
        for _ in range(ARGS.runs):
            for in_flight in ARGS.single:
                print(run(ns, targets, 0, in_flight), flush=True)
                print(run(ns, targets, 0, in_flight, plain=True), flush=True)
            for in_flight in ARGS.pool:
                print(run(ns, targets, ARGS.workers, in_flight), flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average {' '.join(load)} at the end")


if __name__ == "__main__":
    main()
