"""Probe-engine benchmark: our ICMP, TCP and HTTP probers against prometheus-blackbox-exporter.

Everything runs inside a network namespace this script creates (root needed): 10.0.0.0/8 is an
AnyIP local route there, so every address answers ICMP, and a small C responder
(benchmarks/probe_engine/responder.c, compiled with gcc on the fly) listening on 0.0.0.0:80
accepts TCP and answers HTTP for every address. blackbox_exporter runs in the same namespace on
127.0.0.1 and is driven through its /probe endpoint by a lean keep-alive HTTP client at several
concurrencies (the best is kept). Both engines are measured in ONE run, side by side:
probes/s, CPU seconds per 1,000 probes, peak RSS, and false loss (targets that answer but were
reported down). Nothing leaves the namespace.

    python3 benchmarks/probe_engine.py            # full run (a few minutes)
    python3 benchmarks/probe_engine.py --quick    # smaller counts, for a smoke test

Prints a Markdown report (also written to --output when given).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procstat import cpu_seconds, reset_peak_rss, vm_kib  # noqa: E402

from probes import eventloop  # noqa: E402
from probes.base import ProbeResult, Target  # noqa: E402
from probes.http import HttpProber  # noqa: E402
from probes.icmp_batch import IcmpBatchProber  # noqa: E402
from probes.pacing import Pacer, PacingPolicy  # noqa: E402
from probes.tcp import TcpProber  # noqa: E402
from probes.workers import WorkerPoolProber, worker_pool  # noqa: E402
from tests.netns import Netns, run_in_netns  # noqa: E402

T = TypeVar("T")
BLACKBOX = "/usr/bin/prometheus-blackbox-exporter"
BLACKBOX_PORT = 9115
RESPONDER_SOURCE = Path(__file__).resolve().parent / "probe_engine" / "responder.c"
# The /16 every engine probes (inside 10.0.0.0/8, the namespace's AnyIP route).
SWEEP = ipaddress.ip_network("10.77.0.0/16")
BLACKBOX_MODULES = {"icmp": "icmp", "tcp": "tcp_connect", "http": "http_2xx"}
BLACKBOX_CONFIG = """
modules:
  icmp:
    prober: icmp
    timeout: 2s
    icmp: {preferred_ip_protocol: ip4, ip_protocol_fallback: false}
  tcp_connect:
    prober: tcp
    timeout: 2s
    tcp: {preferred_ip_protocol: ip4, ip_protocol_fallback: false}
  http_2xx:
    prober: http
    timeout: 2s
    http: {preferred_ip_protocol: ip4, ip_protocol_fallback: false}
"""
GOALS = {"icmp": 30.0, "tcp": 5.0, "http": 2.0}  # ours / blackbox probes/s


@dataclass
class Measurement:
    method: str
    engine: str
    concurrency: int
    probes: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float
    false_loss: int
    note: str = ""

    @property
    def rate(self) -> float:
        return self.probes / self.seconds

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu_s / self.probes * 1000


def sweep_addresses(count: int) -> Iterator[str]:
    """Addresses of the /16 one /24 after another in turn (like a polite scan), cycling."""
    base = int(SWEEP.network_address)
    for i in range(count):
        block, host = i % 256, 1 + (i // 256) % 254
        yield str(ipaddress.IPv4Address(base + block * 256 + host))


# -- process accounting ---------------------------------------------------------------------


def peak_rss_mb(pid: int | str = "self") -> float:
    return vm_kib("VmHWM", pid) / 1024


# -- our engine -----------------------------------------------------------------------------


PROBER_OPTIONS: dict[str, dict[str, Any]] = {
    "icmp": {"timeout_s": 2.0},
    "tcp": {"ports": (80,), "timeout_s": 2.0},
    "http": {"timeout_s": 2.0, "contact_url": "http://127.0.0.1/benchmark-contact"},
}


def make_prober(method: str, workers: int = 0) -> Any:
    """The prober in this process (workers=0) or spread over `workers` processes."""
    if workers:
        return worker_pool(method, workers, **PROBER_OPTIONS[method])
    cls = {"icmp": IcmpBatchProber, "tcp": TcpProber, "http": HttpProber}[method]
    return cls(**PROBER_OPTIONS[method])


class DownCount:
    """A result sink counting the targets reported down: false loss, where every one answers."""

    def __init__(self) -> None:
        self.down = 0

    def __call__(self, result: ProbeResult) -> None:
        self.down += not result.success


def engine_name(workers: int) -> str:
    return f"ours, {workers} workers" if workers else "ours"


# Which loop runs our engine: "shipped" (probes.eventloop, what the CLI and daemon use) or
# "asyncio" (asyncio's own loop, for an A/B of the loop alone): --ours-loop.
OURS_LOOP = {"loop": "shipped"}


def ours_loop_name() -> str:
    return eventloop.loop_name() if OURS_LOOP["loop"] == "shipped" else "asyncio"


def run_ours_in_netns(ns: Netns, factory: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Our engine on the loop the CLI and daemon ship with (probes.eventloop: uvloop when
    installed, unless --ours-loop asyncio), in a thread inside `ns`. blackbox's driver keeps
    asyncio's loop."""
    shipped = OURS_LOOP["loop"] == "shipped"
    return run_in_netns(ns, factory, timeout, runner=eventloop.run if shipped else asyncio.run)


def measure_ours(
    ns: Netns,
    method: str,
    count: int,
    concurrency: int,
    rate_pps: float | None = None,
    workers: int = 0,
) -> Measurement:
    targets = [Target(a) for a in sweep_addresses(min(count, 65536))]

    async def run() -> Measurement:
        prober = make_prober(method, workers)
        policy = PacingPolicy(
            rate_pps=rate_pps, max_in_flight=concurrency, per_block_pps=None, burst_s=0.005
        )
        sink = DownCount()
        stream = (targets[i % len(targets)] for i in range(count))
        pids: list[int] = []
        if isinstance(prober, WorkerPoolProber):
            await prober.start()  # process start-up is not part of the probing rate
            pids = prober.pids
        reset_peak_rss()
        for pid in pids:
            reset_peak_rss(pid)
        cpu0, t0 = time.process_time(), time.perf_counter()
        workers_cpu0 = sum(cpu_seconds(pid) for pid in pids)
        await prober.probe_many(stream, Pacer(policy), sink)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        cpu += sum(cpu_seconds(pid) for pid in pids) - workers_cpu0
        rss = peak_rss_mb() + sum(peak_rss_mb(pid) for pid in pids)
        await prober.close()
        note = f"rate cap {rate_pps:.0f}/s" if rate_pps else ""
        if pids:
            note = "CPU and RSS: parent + workers"
        return Measurement(
            method, engine_name(workers), concurrency, count, seconds, cpu, rss, sink.down, note
        )

    return run_ours_in_netns(ns, run, timeout=600)


def best_concurrency_ours(
    ns: Netns, method: str, count: int, levels: list[int], workers: int = 0
) -> int:
    trials = [measure_ours(ns, method, max(count // 5, 500), c, workers=workers) for c in levels]
    for trial in trials:
        print(f"  {trial.engine} {method} c={trial.concurrency}: {trial.rate:,.0f}/s",
              file=sys.stderr)  # fmt: skip
    return max(trials, key=lambda m: m.rate).concurrency


# -- blackbox_exporter ----------------------------------------------------------------------


def dechunk(data: bytes) -> bytes:
    """The body of a complete chunked transfer (chunk boundaries may split any line)."""
    body = bytearray()
    at = 0
    while True:
        line_end = data.index(b"\r\n", at)
        size = int(data[at:line_end].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(body)
        body += data[line_end + 2 : line_end + 2 + size]
        at = line_end + 2 + size + 2


class _KeepAlive(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to blackbox_exporter, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        if b"transfer-encoding: chunked" in head:
            if not self.buffer.endswith(b"\r\n0\r\n\r\n"):
                return
            total = len(self.buffer)
            body = dechunk(bytes(self.buffer[end + 4 : total]))
        else:
            length_at = head.find(b"content-length:")
            length = int(head[length_at + 15 :].split(b"\r\n", 1)[0]) if length_at >= 0 else 0
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("blackbox_exporter closed the connection"))

    async def get(self, path: str) -> bytes:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n".encode()
        )
        return await self.waiter


def blackbox_path(method: str, address: str) -> str:
    target = {"http": f"http://{address}/", "tcp": f"{address}:80"}.get(method, address)
    query = urllib.parse.urlencode({"module": BLACKBOX_MODULES[method], "target": target})
    return f"/probe?{query}"


def measure_blackbox(ns: Netns, pid: int, method: str, count: int, concurrency: int) -> Measurement:
    paths = [blackbox_path(method, a) for a in sweep_addresses(min(count, 65536))]

    async def run() -> Measurement:
        loop = asyncio.get_running_loop()
        connections = []
        for _ in range(concurrency):
            _transport, protocol = await loop.create_connection(
                _KeepAlive, "127.0.0.1", BLACKBOX_PORT
            )
            connections.append(protocol)
        work = iter(range(count))
        down = 0

        async def worker(connection: _KeepAlive) -> None:
            nonlocal down
            for i in work:
                body = await connection.get(paths[i % len(paths)])
                if b"\nprobe_success 1" not in body:
                    down += 1
                    if down == 1:  # one sample, so a false loss can be explained
                        failed = [x for x in body.split(b"\n") if b"probe_" in x and b"#" not in x]
                        print(f"  blackbox {method} down: {failed!r}", file=sys.stderr)

        reset_peak_rss(pid)
        bb_cpu0, driver_cpu0 = cpu_seconds(pid), time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in connections))
        seconds = time.perf_counter() - t0
        bb_cpu = cpu_seconds(pid) - bb_cpu0
        driver_cpu = time.process_time() - driver_cpu0
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()
        note = f"driver CPU {driver_cpu / count * 1000:.3f} s/1000 (not counted)"
        return Measurement(
            method, "blackbox", concurrency, count, seconds, bb_cpu, peak_rss_mb(pid), down, note
        )

    return run_in_netns(ns, run, timeout=900)


def best_concurrency_blackbox(
    ns: Netns, pid: int, method: str, count: int, levels: list[int]
) -> int:
    trials = [measure_blackbox(ns, pid, method, max(count // 5, 300), c) for c in levels]
    for trial in trials:
        print(f"  blackbox {method} c={trial.concurrency}: {trial.rate:,.0f}/s", file=sys.stderr)
    return max(trials, key=lambda m: m.rate).concurrency


# -- the namespace and its servers ------------------------------------------------------------


def prepare(ns: Netns) -> None:
    ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
    ns.sysctl("net.core.somaxconn", "65535")
    ns.sysctl("net.ipv4.tcp_max_syn_backlog", "65535")
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")
    ns.exec("ip", "route", "add", "local", "10.0.0.0/8", "dev", "lo")


def start_in_ns(ns: Netns, *argv: str) -> subprocess.Popen[str]:
    # `ip netns exec` execs the program, so the Popen pid is the program's own pid.
    return subprocess.Popen(
        ["ip", "netns", "exec", ns.name, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def wait_for_port(ns: Netns, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = ns.exec("bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}", check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} in {ns.name} after 10 s")


def memory_child(count: int) -> None:
    """Run inside the namespace (own process): hold `count` targets in a list, probe them all."""

    async def run() -> dict[str, Any]:
        base = int(ipaddress.ip_address("10.1.0.1"))
        targets = [Target(str(ipaddress.IPv4Address(base + i))) for i in range(count)]
        held_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        prober = IcmpBatchProber(timeout_s=2.0)
        policy = PacingPolicy(rate_pps=None, max_in_flight=65536, per_block_pps=None)
        sink = DownCount()
        t0 = time.perf_counter()
        await prober.probe_many(targets, Pacer(policy), sink)
        seconds = time.perf_counter() - t0
        await prober.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"count": count, "seconds": seconds, "down": sink.down, "held_mb": held_mb,
                "peak_mb": peak}  # fmt: skip

    print(json.dumps(eventloop.run(run())))


# -- report -----------------------------------------------------------------------------------


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (
        f"nproc = {nproc}, our event loop: {ours_loop_name()}, "
        f"load average {' '.join(load)} at the end\n\n```\n"
        + "\n".join(lscpu)
        + "\n```"
    )


def report(
    rows: list[Measurement],
    capped: Measurement | None,
    memory: dict[str, Any] | None,
    flags: str,
) -> str:
    lines = [
        "| method | engine | concurrency | probes | probes/s | CPU s / 1000 probes "
        "| peak RSS MB | false loss | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in [*rows, *([capped] if capped else [])]:
        lines.append(
            f"| {m.method} | {m.engine} | {m.concurrency} | {m.probes} | {m.rate:,.0f} "
            f"| {m.cpu_per_1000:.4f} | {m.peak_rss_mb:.1f} | {m.false_loss} | {m.note} |"
        )
    lines += ["", "| method | ours | ours / blackbox probes/s | goal "
              "| blackbox / ours CPU per probe |", "|---|---|---|---|---|"]  # fmt: skip
    by = {(m.method, m.engine): m for m in rows}
    for method, goal in GOALS.items():
        if (method, "blackbox") not in by:
            continue  # not measured in this run (--methods)
        theirs = by[(method, "blackbox")]
        for ours in (m for m in rows if m.method == method and m.engine != "blackbox"):
            ratio = ours.rate / theirs.rate
            verdict = "met" if ratio >= goal else "NOT met"
            cpu_ratio = theirs.cpu_per_1000 / ours.cpu_per_1000
            lines.append(f"| {method} | {ours.engine} | {ratio:.1f}x | >= {goal:.0f}x ({verdict}) "
                         f"| {cpu_ratio:.1f}x |")  # fmt: skip
    lines.append("")
    if ("icmp", "ours") in by:
        icmp = by[("icmp", "ours")]
        lines.append(f"- ICMP, ours: {icmp.rate:,.0f} probes/s (goal >= 50,000: "
                     f"{'met' if icmp.rate >= 50000 else 'NOT met'}).")  # fmt: skip
    if capped:
        lines.append(
            f"- ICMP at a {capped.note}: achieved {capped.rate:,.0f} probes/s, false loss "
            f"{capped.false_loss} of {capped.probes} (goal 0: "
            f"{'met' if capped.false_loss == 0 else 'NOT met'})."
        )
    if memory:
        lines.append(
            f"- {memory['count']:,} targets held in a list and all probed (ICMP): peak RSS "
            f"{memory['peak_mb']:.0f} MB (the list alone: {memory['held_mb']:.0f} MB), "
            f"{memory['count'] / memory['seconds']:,.0f} probes/s, {memory['down']} down "
            f"(goal < 300 MB: {'met' if memory['peak_mb'] < 300 else 'NOT met'})."
        )
    head = (
        f"Command: `python3 benchmarks/probe_engine.py{flags}`"
        + f", {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.\n\n"
        + machine()
        + "\n\n"
    )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke test")
    parser.add_argument("--output", type=Path, help="also write the Markdown report here")
    parser.add_argument("--repeats", type=int, default=2, help="measured runs per engine")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 2,
        help="processes of the worker-pool variant of ours (0: skip it)",
    )
    parser.add_argument(
        "--methods",
        default="icmp,tcp,http",
        help="comma-separated methods to compare; the rate-capped ICMP run and the "
        "1,000,000-target memory run are made only when all three are measured",
    )
    parser.add_argument(
        "--ours-loop",
        choices=("shipped", "asyncio"),
        default="shipped",
        help="our engine's event loop: the one the CLI and daemon ship with (uvloop when "
        "installed), or asyncio's own (an A/B of the loop alone; worker processes keep theirs)",
    )
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    OURS_LOOP["loop"] = args.ours_loop
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if os.geteuid() != 0:
        sys.exit("probe_engine.py: needs root (network namespaces, raw sockets)")
    for tool in (BLACKBOX, "gcc"):
        if shutil.which(tool) is None:
            sys.exit(f"probe_engine.py: {tool} not found (apt-get install "
                     "prometheus-blackbox-exporter gcc)")  # fmt: skip
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(GOALS):
        sys.exit(f"probe_engine.py: --methods: expected a comma-separated subset of "
                 f"{','.join(GOALS)}, got {args.methods!r}")  # fmt: skip
    everything = set(methods) == set(GOALS)
    scale = 0.1 if args.quick else 1.0
    counts = {
        "ours": {"icmp": 300_000, "tcp": 40_000, "http": 15_000},
        "blackbox": {"icmp": 20_000, "tcp": 20_000, "http": 10_000},
    }
    ours_levels = {"icmp": [4096, 65536], "tcp": [256, 1024], "http": [64, 256, 1024]}
    blackbox_levels = [8, 32, 128, 512, 2048]
    with tempfile.TemporaryDirectory() as tmp, Netns("bench") as ns:
        prepare(ns)
        responder = Path(tmp) / "responder"
        subprocess.run(["gcc", "-O2", "-o", str(responder), str(RESPONDER_SOURCE)], check=True)
        config = Path(tmp) / "blackbox.yml"
        config.write_text(BLACKBOX_CONFIG)
        servers = [
            start_in_ns(ns, str(responder), "80"),
            start_in_ns(ns, BLACKBOX, f"--config.file={config}",
                        f"--web.listen-address=127.0.0.1:{BLACKBOX_PORT}", "--log.level=error"),
        ]  # fmt: skip
        try:
            wait_for_port(ns, 80)
            wait_for_port(ns, BLACKBOX_PORT)
            blackbox_pid = servers[1].pid
            rows: list[Measurement] = []
            for method in methods:
                n_ours = int(counts["ours"][method] * scale)
                n_theirs = int(counts["blackbox"][method] * scale)
                variants = [0, args.workers] if args.workers else [0]
                c_ours = {w: best_concurrency_ours(ns, method, n_ours, ours_levels[method], w)
                          for w in variants}  # fmt: skip
                c_theirs = best_concurrency_blackbox(
                    ns, blackbox_pid, method, n_theirs, blackbox_levels
                )
                # The machine is shared: alternate the engines and keep each one's best run,
                # so a burst of someone else's load does not decide the ratio.
                ours_runs: dict[int, list[Measurement]] = {w: [] for w in variants}
                their_runs = []
                for _ in range(args.repeats):
                    for workers in variants:
                        ours_runs[workers].append(
                            measure_ours(ns, method, n_ours, c_ours[workers], workers=workers)
                        )
                    their_runs.append(measure_blackbox(ns, blackbox_pid, method, n_theirs,
                                                       c_theirs))  # fmt: skip
                    ours_text = ", ".join(f"{runs[-1].engine} {runs[-1].rate:,.0f}/s"
                                          for runs in ours_runs.values())  # fmt: skip
                    print(
                        f"{method}: {ours_text}, blackbox {their_runs[-1].rate:,.0f}/s",
                        file=sys.stderr,
                    )
                rows.extend(max(runs, key=lambda m: m.rate) for runs in ours_runs.values())
                rows.append(max(their_runs, key=lambda m: m.rate))
            capped: Measurement | None = None
            memory: dict[str, Any] | None = None
            if everything:
                print("icmp at 20,000/s", file=sys.stderr)
                capped = measure_ours(ns, "icmp", int(200_000 * scale), 65536, rate_pps=20_000)
                print(f"{1_000_000 if not args.quick else 100_000} queued targets",
                      file=sys.stderr)  # fmt: skip
                child = ns.exec(sys.executable, str(Path(__file__).resolve()), "--memory-child",
                                str(100_000 if args.quick else 1_000_000))  # fmt: skip
                memory = json.loads(child.stdout)
        finally:
            for server in servers:
                server.kill()
                server.wait()
    flags = (" --quick" if args.quick else "") + (f" --repeats {args.repeats}" if args.repeats != 2
                                                   else "")  # fmt: skip
    if args.workers != (os.cpu_count() or 2):
        flags += f" --workers {args.workers}"
    if not everything:
        flags += f" --methods {','.join(methods)}"
    if args.ours_loop != "shipped":
        flags += f" --ours-loop {args.ours_loop}"
    text = report(rows, capped, memory, flags)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
