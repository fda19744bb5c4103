"""Pacing observed on real runs against local servers, and the blocklist.

The rates are checked from the server's side (when connections arrive), so what is measured is
what a probed network would see.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from probes.base import Failure, ProbeResult, Target
from probes.http import HttpProber
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.tcp import TcpProber
from tests.probes.servers import free_port, http_app, raw_tcp_server


class ArrivalLog:
    """A TCP handler that notes when each connection arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.times.append(time.monotonic())
        writer.close()

    @property
    def span(self) -> float:
        return max(self.times) - min(self.times)


async def _run_tcp(targets: list[Target], policy: PacingPolicy) -> tuple[list[ProbeResult], float]:
    results: list[ProbeResult] = []
    start = time.monotonic()
    await TcpProber(ports=(80,), timeout_s=2).probe_many(targets, Pacer(policy), results.append)
    return results, time.monotonic() - start


async def test_global_rate_300_probes_at_1000_pps() -> None:
    arrivals = ArrivalLog()
    async with raw_tcp_server(arrivals) as port:
        policy = PacingPolicy(rate_pps=1000, per_block_pps=None, max_in_flight=64)
        results, elapsed = await _run_tcp([Target("127.0.0.1", port)] * 300, policy)
        await asyncio.sleep(0.05)
    assert len(results) == 300 and all(r.success for r in results)
    # 300 probes with a burst allowance of 10 (burst_s 0.01 * 1000) need at least 0.29 s.
    assert elapsed >= 0.29
    assert len(arrivals.times) == 300 and arrivals.span >= 0.28


async def test_per_block_rate_5_probes_to_one_24_at_10_pps() -> None:
    arrivals = ArrivalLog()
    async with raw_tcp_server(arrivals) as port:
        policy = PacingPolicy(rate_pps=None, per_block_pps=10, per_block_burst=1)
        results, elapsed = await _run_tcp([Target("127.0.0.1", port)] * 5, policy)
        await asyncio.sleep(0.05)
    assert all(r.success for r in results)
    assert elapsed >= 0.4
    assert arrivals.span >= 0.39


async def test_per_block_rates_are_independent_per_24() -> None:
    first, second = ArrivalLog(), ArrivalLog()
    async with (
        raw_tcp_server(first, host="127.0.0.1") as port_a,
        raw_tcp_server(second, host="127.0.1.1") as port_b,
    ):
        policy = PacingPolicy(rate_pps=None, per_block_pps=10, per_block_burst=1)
        targets = [Target("127.0.0.1", port_a), Target("127.0.1.1", port_b)] * 5
        results, _ = await _run_tcp(targets, policy)
        await asyncio.sleep(0.05)
    assert all(r.success for r in results)
    assert first.span >= 0.39 and second.span >= 0.39
    # Both /24s were paced side by side, not one after the other (that would take 0.9 s).
    assert abs(min(first.times) - min(second.times)) < 0.2


async def test_in_flight_cap_is_never_exceeded_server_side() -> None:
    now = peak = 0

    routes = web.RouteTableDef()

    @routes.get("/hold")
    async def hold(request: web.Request) -> web.Response:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.03)
        now -= 1
        return web.Response(text="ok")

    async with http_app(routes) as port:
        pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=5))
        prober = HttpProber(contact_url="https://monitor.example/contact")
        results: list[ProbeResult] = []
        targets = [Target("127.0.0.1", url=f"http://127.0.0.1:{port}/hold")] * 40
        await prober.probe_many(targets, pacer, results.append)
        await prober.close()
    assert len(results) == 40 and all(r.success for r in results)
    assert peak == 5  # reached, never exceeded
    assert pacer.in_flight == 0


async def test_targets_are_pulled_lazily_by_a_bounded_pool() -> None:
    results: list[ProbeResult] = []
    pulled = 0
    ahead = 0
    port = free_port()

    def targets() -> Iterator[Target]:
        nonlocal pulled, ahead
        for _ in range(2000):
            pulled += 1
            ahead = max(ahead, pulled - len(results))
            yield Target("127.0.0.1", port)

    pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=16))
    await TcpProber(ports=(port,), timeout_s=1).probe_many(targets(), pacer, results.append)
    assert len(results) == 2000
    assert all(r.failure is Failure.CONNECTION_REFUSED for r in results)
    # Never more targets taken than the in-flight cap, plus the one waiting for a free slot.
    assert ahead <= 16 + 1


# --- blocklist ---------------------------------------------------------------------------


def test_blocklist_file_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# opt-outs\n10.0.0.0/8\n\n2001:db8::/32  # doc range\n10.1.2.300/32\n")
    with pytest.raises(ValueError, match=rf"{path}:5: not a CIDR range: '10.1.2.300/32'"):
        Blocklist.from_file(path)


def test_blocklist_file_ipv4_and_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# opt-outs\n10.0.0.0/8\n192.0.2.7\n2001:db8::/32  # documentation\n")
    blocklist = Blocklist.from_file(path)
    assert len(blocklist) == 3
    assert blocklist.contains("10.255.0.1") and blocklist.contains("192.0.2.7")
    assert not blocklist.contains("192.0.2.8") and not blocklist.contains("11.0.0.1")
    assert blocklist.contains("2001:db8:ffff::1") and not blocklist.contains("2001:db9::1")
    assert not blocklist.contains("example.org")  # noqa: network (a name, never resolved)


networks_v4 = st.builds(
    lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(8, 32),
)
networks_v6 = st.builds(
    lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(16, 128),
)


@given(
    networks=st.lists(networks_v4 | networks_v6, max_size=12),
    probes=st.lists(st.ip_addresses(), min_size=1, max_size=20),
)
def test_blocklist_contains_agrees_with_ipaddress(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    probes: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    blocklist = Blocklist(networks)
    # Addresses inside the networks too, not only random ones that almost never hit.
    inside = [net.network_address + (net.num_addresses - 1) // 2 for net in networks]
    for address in [*probes, *inside]:
        expected = any(address.version == n.version and address in n for n in networks)
        assert blocklist.contains(str(address)) == expected, address
