"""Benchmark the TCP, HTTP and DNS probers: probes per second, CPU and memory per probe.

Runs entirely inside a network namespace the script creates (root needed): 10.0.0.0/16 is an
AnyIP local route there, so every address answers, and the servers (TCP accept-and-close on one
port, a closed port that answers RST, an aiohttp app, a DNS responder on 127.0.0.1) run in a
separate process so they do not share the prober's event loop. Nothing leaves the namespace.

    python3 benchmarks/netprobes_bench.py                 # all scenarios
    python3 benchmarks/netprobes_bench.py --tcp 50000     # more TCP targets

Prints one JSON line per scenario and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probes.base import DnsQuery, ProbeResult, Target
from probes.dns import DnsProber
from probes.http import HttpProber
from probes.pacing import Pacer, PacingPolicy
from probes.tcp import TcpProber

ANYIP = ipaddress.ip_network("10.0.0.0/16")


def addresses(count: int) -> Iterator[str]:
    """`count` addresses spread over the AnyIP /16, one per /24 in turn (like a scan)."""
    blocks = ANYIP.num_addresses // 256
    for i in range(count):
        block, host = i % blocks, 1 + (i // blocks) % 254
        yield str(ANYIP.network_address + block * 256 + host)


async def serve() -> None:
    """Server mode: start the servers, print their ports as JSON, serve until killed."""
    from aiohttp import web

    from tests.probes.servers import DnsBehaviour, DnsResponder, http_app, raw_tcp_server

    async def accept_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    routes = web.RouteTableDef()

    @routes.get("/")
    async def index(request: web.Request) -> web.Response:
        return web.Response(text="ok " * 100)

    zone = {"bench.test": DnsBehaviour(answers=["192.0.2.1"])}
    async with (
        raw_tcp_server(accept_and_close, host="0.0.0.0") as tcp_port,
        http_app(routes, host="0.0.0.0") as http_port,
        DnsResponder(zone, host="127.0.0.1") as dns_server,
    ):
        print(json.dumps({"tcp": tcp_port, "http": http_port, "dns": dns_server.port}), flush=True)
        await asyncio.Event().wait()


async def measure(
    name: str, prober: Any, targets: list[Target], policy: PacingPolicy
) -> dict[str, Any]:
    counts: dict[str, int] = {}

    def sink(result: ProbeResult) -> None:
        key = "ok" if result.failure is None else str(result.failure)
        counts[key] = counts.get(key, 0) + 1

    cpu_before = time.process_time()
    start = time.perf_counter()
    await prober.probe_many(targets, Pacer(policy), sink)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    await prober.close()
    return {
        "scenario": name,
        "probes": len(targets),
        "rate_cap_pps": policy.rate_pps,
        "max_in_flight": policy.max_in_flight,
        "elapsed_s": round(elapsed, 3),
        "probes_per_s": round(len(targets) / elapsed, 1),
        "cpu_ms_per_probe": round(1000 * cpu / len(targets), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "outcomes": counts,
    }


async def run_all(ports: dict[str, int], sizes: argparse.Namespace) -> list[dict[str, Any]]:
    free = PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=512)
    polite = PacingPolicy(rate_pps=500, per_block_pps=None, max_in_flight=512)
    contact = "https://monitor.example/contact"
    tcp_open = [Target(a, ports["tcp"]) for a in addresses(sizes.tcp)]
    tcp_rst = [
        Target(a, ports["tcp"] + 1 if ports["tcp"] < 65535 else 1) for a in addresses(sizes.tcp)
    ]
    http = [Target(a, url=f"http://{a}:{ports['http']}/") for a in addresses(sizes.http)]
    query = DnsQuery("bench.test", "A", frozenset({"192.0.2.1"}))
    dns_udp = [Target("127.0.0.1", ports["dns"], query=query)] * sizes.dns
    tcp_query = DnsQuery("bench.test", "A", frozenset({"192.0.2.1"}), "tcp")
    dns_tcp = [Target("127.0.0.1", ports["dns"], query=tcp_query)] * (sizes.dns // 2)
    return [
        await measure("tcp open (SYN-ACK)", TcpProber(timeout_s=2), tcp_open, free),
        await measure("tcp closed (RST)", TcpProber(timeout_s=2), tcp_rst, free),
        await measure("tcp open at 500 pps", TcpProber(timeout_s=2), tcp_open[:2000], polite),
        await measure("http GET", HttpProber(timeout_s=5, contact_url=contact), http, free),
        await measure("dns udp", DnsProber(timeout_s=2), dns_udp, free),
        await measure("dns tcp", DnsProber(timeout_s=2), dns_tcp, free),
    ]


def outer(args: argparse.Namespace) -> None:
    name = f"smbench{os.getpid()}"
    script = str(Path(__file__).resolve())
    subprocess.run(["ip", "netns", "add", name], check=True)
    server = None
    try:
        exec_ns = ["ip", "netns", "exec", name]
        subprocess.run([*exec_ns, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(
            [*exec_ns, "ip", "route", "add", "local", str(ANYIP), "dev", "lo"], check=True
        )
        env = {**os.environ, "PYTHONPATH": str(Path(script).parent.parent)}
        server = subprocess.Popen(
            [*exec_ns, sys.executable, script, "--serve"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert server.stdout is not None
        ports = server.stdout.readline().strip()
        inner = subprocess.run(
            [*exec_ns, sys.executable, script, "--measure", ports,
             "--tcp", str(args.tcp), "--http", str(args.http), "--dns", str(args.dns)],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
            server.wait(5)
        subprocess.run(["ip", "netns", "del", name], check=False)
    results = [json.loads(line) for line in inner.stdout.splitlines() if line.startswith("{")]
    for result in results:
        print(json.dumps(result))
    print()
    columns = "scenario probes cap_pps elapsed_s probes/s CPU_ms/probe peak_RSS_MB outcomes"
    print("| " + " | ".join(columns.split()) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scenario']} | {r['probes']} | {r['rate_cap_pps'] or 'none'} | {r['elapsed_s']} "
            f"| {r['probes_per_s']} | {r['cpu_ms_per_probe']} | {r['peak_rss_mb']} "
            f"| {r['outcomes']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp", type=int, default=20_000, help="TCP targets")
    parser.add_argument("--http", type=int, default=5_000, help="HTTP targets")
    parser.add_argument(
        "--dns", type=int, default=10_000, help="DNS queries over UDP (half over TCP)"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
    elif args.measure:
        for result in asyncio.run(run_all(json.loads(args.measure), args)):
            print(json.dumps(result), flush=True)
    else:
        if os.geteuid() != 0:
            sys.exit("netprobes_bench: needs root to create its network namespace")
        outer(args)


if __name__ == "__main__":
    main()
