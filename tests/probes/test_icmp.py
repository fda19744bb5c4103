"""The ICMP prober against the real kernel, inside network namespaces these tests create.

Topology (all addresses exist only inside the namespaces):

    vantage ns                                  router ns (nft rules on its AnyIP ranges)
    lo: 10.77.0.0/16, fd77::/64 answer (AnyIP)  10.78.1.0/24, fd78:1::/64  dropped (silence)
    10.76.0.0/24: a local `unreachable` route   10.78.2.0/24, fd78:2::/64  host/address unreachable
    10.78.0.0/16, fd78::/16 via the router      10.78.3.0/24, fd78:3::/64  net unreachable/no route
    v0 10.99.0.1/30 fd99::1 ------- veth ------- r0 10.99.0.2/30 fd99::2
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest

from probes.base import Failure, ProbeResult, ProbeSetupError, Target
from probes.icmp import (
    ICMP4_DEST_UNREACHABLE,
    ICMP4_ECHO_REPLY,
    ICMP4_ECHO_REQUEST,
    IcmpProber,
    build_echo,
    build_error4,
    build_ipv4,
    parse_icmp4,
)
from probes.icmp_batch import BATCH_FROM_PPS, BatchEcho, IcmpBatchProber
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.records import Decoded, Records, decode
from tests.netns import Netns, needs_root, run_in_netns
from tests.probes.blocked_loop import HONEST_BOUND_S
from tests.probes.icmp_tap import Tap
from tests.probes.test_icmp_rtt import probe_with_blocked_loop, warm_up

pytestmark = [needs_root, pytest.mark.root]

MODES = {"datagram": False, "raw": True}
FAST = PacingPolicy(rate_pps=None, max_in_flight=4096, per_block_pps=None)


# ICMP errors come from nft reject rules: the kernel's own errors for `unreachable` routes are
# rate limited by host-wide sysctls (net.ipv4.route.error_cost) that a test must not change.
ROUTER_RULES = """
table inet lab {
    chain input {
        type filter hook input priority 0; policy accept;
        ip daddr 10.78.1.0/24 drop
        ip daddr 10.78.2.0/24 reject with icmp type host-unreachable
        ip daddr 10.78.3.0/24 reject with icmp type net-unreachable
        ip6 daddr fd78:1::/64 drop
        ip6 daddr fd78:2::/64 reject with icmpv6 type addr-unreachable
        ip6 daddr fd78:3::/64 reject with icmpv6 type no-route
    }
}
"""


@pytest.fixture(scope="module")
def vantage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Netns]:
    with Netns("icmpv") as ns, Netns("icmpr") as router:
        ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
        ns.exec("ip", "route", "add", "local", "10.77.0.0/16", "dev", "lo")
        ns.exec("ip", "-6", "route", "add", "local", "fd77::/64", "dev", "lo")
        ns.exec("ip", "route", "add", "unreachable", "10.76.0.0/24")
        for namespace in (ns, router):  # no duplicate address detection: addresses work at once
            namespace.sysctl("net.ipv6.conf.all.accept_dad", "0")
            namespace.sysctl("net.ipv6.conf.default.accept_dad", "0")
        ns.exec("ip", "link", "add", "v0", "type", "veth", "peer", "name", "r0",
                "netns", router.name)  # fmt: skip
        # The router must answer every probe with its ICMP error: no rate limits.
        router.sysctl("net.ipv4.icmp_ratemask", "0")
        router.sysctl("net.ipv4.icmp_msgs_per_sec", "100000")
        router.sysctl("net.ipv4.icmp_msgs_burst", "100000")
        router.sysctl("net.ipv6.icmp.ratelimit", "0")
        for namespace, device, v4, v6 in (
            (ns, "v0", "10.99.0.1/30", "fd99::1/64"),
            (router, "r0", "10.99.0.2/30", "fd99::2/64"),
        ):
            namespace.exec("ip", "addr", "add", v4, "dev", device)
            namespace.exec("ip", "-6", "addr", "add", v6, "dev", device, "nodad")
            namespace.exec("ip", "link", "set", device, "up")
        wait_for_carrier(ns, "v0")
        wait_for_carrier(router, "r0")
        ns.exec("ip", "route", "add", "10.78.0.0/16", "via", "10.99.0.2")
        ns.exec("ip", "-6", "route", "add", "fd78::/16", "via", "fd99::2")
        router.exec("ip", "route", "add", "local", "10.78.0.0/16", "dev", "lo")
        router.exec("ip", "-6", "route", "add", "local", "fd78::/16", "dev", "lo")
        rules = tmp_path_factory.mktemp("icmp") / "router.nft"
        rules.write_text(ROUTER_RULES)
        router.exec("nft", "-f", str(rules))
        ns.exec("ip", "-6", "route", "get", "fd78:1::1")  # fails loudly if the route is gone
        yield ns


def wait_for_carrier(ns: Netns, device: str) -> None:
    """A veth pair reports carrier a moment after both ends are up; routes are dead until then."""
    deadline = time.monotonic() + 5.0
    while "NO-CARRIER" in ns.exec("ip", "link", "show", device).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{device} in {ns.name} has no carrier after 5 s")
        time.sleep(0.02)


def addresses(network: str, count: int, first: int = 1) -> list[str]:
    net = ipaddress.ip_network(network)
    return [str(net.network_address + first + i) for i in range(count)]


# The ways in: probe_many (Targets in, ProbeResults out), probe_keyed (the worker pool's: (key,
# address) pairs in, packed records out, no pacing of its own), the batch engine (BatchEcho:
# IPv4 over datagram sockets in batches, the rest through the prober's probe_keyed), and the
# batch prober (IcmpBatchProber, PROBERS' and the daemon's: probe_many in front of the batch
# engine, or of probe_keyed where the engine cannot run, as on raw sockets).
APIS = ("probe_many", "probe_keyed", "batch", "batch_prober")
MODES_AND_APIS = [(m, a) for m in MODES for a in APIS if not (a == "batch" and m == "raw")]
# The probe_many tests run on both probers with that method.
ENGINES: dict[str, Callable[..., IcmpProber | IcmpBatchProber]] = {
    "IcmpProber": IcmpProber, "IcmpBatchProber": IcmpBatchProber,
}  # fmt: skip


async def probe_all(
    prober: IcmpProber | IcmpBatchProber,
    targets: list[str],
    pacer: Pacer | None = None,
    api: str = "probe_many",
    batch: BatchEcho | IcmpBatchProber | None = None,
) -> dict[str, ProbeResult]:
    """Probe `targets` once each through `api` (`batch`: that engine or batch prober, else a
    new one in front of `prober`)."""
    results: dict[str, ProbeResult] = {}

    def keep(result: ProbeResult) -> None:
        assert result.target.address not in results, "one result per target"
        results[result.target.address] = result

    if api == "probe_many":
        await prober.probe_many((Target(a) for a in targets), pacer or Pacer(FAST), keep)
    elif api == "batch_prober":
        assert isinstance(prober, IcmpProber) and not isinstance(batch, BatchEcho)
        front = batch or IcmpBatchProber(prober)
        try:
            await front.probe_many((Target(a) for a in targets), pacer or Pacer(FAST), keep)
            # The premise: IPv4 over datagram sockets went through the batch engine.
            if prober.mode.get("ipv4") == "datagram":
                assert front.batch_echo_ids
        finally:
            if batch is None:
                await front.close()
    else:
        assert isinstance(prober, IcmpProber) and not isinstance(batch, IcmpBatchProber)
        records = Records() if batch is None else batch.records
        blocklist = Blocklist() if pacer is None else pacer.blocklist
        if api == "batch":
            engine = batch or BatchEcho(records, prober)
            try:
                await engine.probe_keyed(enumerate(targets), blocklist)
            finally:
                if batch is None:
                    await engine.close()
        else:
            await prober.probe_keyed(enumerate(targets), records, blocklist)
        for key, reachable, success, failure, rtt, started_at, details in decode(*records.take()):
            keep(ProbeResult(Target(targets[key]), "icmp", reachable, success, failure, rtt,
                             started_at, details))  # fmt: skip
    assert set(results) == set(targets)
    return results


@pytest.mark.parametrize(("mode", "api"), MODES_AND_APIS)
def test_answers_silence_and_unreachables_v4(vantage: Netns, mode: str, api: str) -> None:
    answering = addresses("10.77.0.0/16", 300)
    silent = addresses("10.78.1.0/24", 3)
    host_unreachable = addresses("10.78.2.0/24", 2)
    net_unreachable = addresses("10.78.3.0/24", 2)
    local_unreachable = ["10.76.0.9"]

    async def scenario() -> tuple[dict[str, ProbeResult], IcmpProber, float]:
        prober = IcmpProber(timeout_s=0.5, privileged=MODES[mode])
        begun = time.time()
        try:
            targets = answering + silent + host_unreachable + net_unreachable + local_unreachable
            return await probe_all(prober, targets, api=api), prober, begun
        finally:
            await prober.close()

    results, prober, begun = run_in_netns(vantage, scenario)
    for address in answering:
        result = results[address]
        assert (result.reachable, result.success, result.failure) == (True, True, None)
        assert result.rtt_s is not None and 0 < result.rtt_s < 0.5
        assert begun <= result.started_at <= time.time()
        if mode == "raw":
            assert result.details["ttl"] == 64
    expected = (
        [(a, Failure.TIMEOUT) for a in silent]
        + [(a, Failure.HOST_UNREACHABLE) for a in host_unreachable + local_unreachable]
        + [(a, Failure.NETWORK_UNREACHABLE) for a in net_unreachable]
    )
    for address, failure in expected:
        result = results[address]
        assert (result.reachable, result.success, result.failure, result.rtt_s) == (
            False, False, failure, None,
        ), address  # fmt: skip
    # The rejecting host itself reports, as a firewall in front of it would.
    assert results[host_unreachable[0]].details["reported_by"] == host_unreachable[0]
    assert results[host_unreachable[0]].details["icmp_code"] == 1
    assert results[local_unreachable[0]].details["errno"] == "EHOSTUNREACH"
    stats = prober.stats
    assert (stats.echo_replies, stats.timeouts, stats.unreachable, stats.send_errors) == (
        300, 3, 4, 1,
    )  # fmt: skip
    assert stats.sent == 307  # the local unreachable one never left


@pytest.mark.parametrize(("mode", "api"), MODES_AND_APIS)
def test_ipv6_answers_silence_and_unreachable(vantage: Netns, mode: str, api: str) -> None:
    answering = [*addresses("fd77::/64", 50), "::1"]
    silent = ["fd78:1::1"]
    unreachable = ["fd78:2::1", "fd78:3::1"]

    async def scenario() -> tuple[dict[str, ProbeResult], dict[str, str]]:
        prober = IcmpProber(timeout_s=0.5, privileged=MODES[mode])
        try:
            targets = [*answering, "FD77:0:0::FFFF", *silent, *unreachable]
            results = await probe_all(prober, targets, api=api)
            return results, prober.mode
        finally:
            await prober.close()

    results, used = run_in_netns(vantage, scenario)
    assert used == {"ipv6": mode}
    for address in [*answering, "FD77:0:0::FFFF"]:  # a non-canonical spelling still matches
        assert results[address].success, address
    assert results["fd78:1::1"].failure is Failure.TIMEOUT
    assert results["fd78:2::1"].failure is Failure.HOST_UNREACHABLE  # "address unreachable"
    assert results["fd78:3::1"].failure is Failure.NETWORK_UNREACHABLE  # "no route"
    assert results["fd78:2::1"].details["reported_by"] == "fd99::2"


@pytest.mark.parametrize("mode", MODES)
def test_icmp_error_times_come_from_the_kernel(vantage: Netns, mode: str) -> None:
    """Errors (the error queue on datagram sockets, the socket itself on raw ones) carry the time
    they took in details, free of a blocked event loop (see test_icmp_rtt.py)."""
    targets = [*addresses("10.78.2.0/24", 10), *addresses("fd78:2::/64", 10)]

    async def scenario() -> list[tuple[ProbeResult, float]]:
        prober = IcmpProber(timeout_s=2.0, privileged=MODES[mode])
        try:
            await warm_up(prober, "fd77::1")  # the IPv4 socket's warm-up is in the next call
            return await probe_with_blocked_loop(prober, targets, warm_up_target="10.77.0.1")
        finally:
            await prober.close()

    results = run_in_netns(vantage, scenario)
    for result, handed_over in results:
        assert result.failure is Failure.HOST_UNREACHABLE, result
        assert handed_over - result.started_at >= 0.3  # the loop was blocked for that long
        assert 0 <= result.details["error_rtt_s"] < HONEST_BOUND_S, result
        assert result.details["rtt_source"] == "kernel"


@pytest.mark.parametrize(("mode", "api"), MODES_AND_APIS)
def test_forged_and_malformed_packets_are_counted_and_ignored(
    vantage: Netns, mode: str, api: str
) -> None:
    """While probes run, every genuine reply the tap sees is followed by nine forgeries."""
    answering = addresses("10.77.1.0/24", 40)
    silent = addresses("10.78.1.0/24", 2)  # keeps probe_many running while forgeries arrive
    replies_to_forge = 10

    async def scenario() -> tuple[dict[str, ProbeResult], dict[str, int]]:
        prober = IcmpProber(timeout_s=1.0, privileged=MODES[mode])
        batch: BatchEcho | IcmpBatchProber | None = None
        if api == "batch":
            batch = BatchEcho(Records(), prober)
        elif api == "batch_prober":
            batch = IcmpBatchProber(prober)
        injector = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        forged: set[str] = set()

        def ours(ident: int) -> bool:
            if isinstance(batch, BatchEcho):
                return ident in batch.echo_ids
            if batch is not None and batch.batch_echo_ids:
                return ident in batch.batch_echo_ids
            return ident == prober.echo_id()

        def inject(src: str, dst: str, icmp: bytes) -> None:
            injector.sendto(build_ipv4(src, dst, icmp), (dst, 0))

        def forge(packet: bytes, source: str) -> None:
            parsed = parse_icmp4(packet, with_ip_header=True)
            if parsed is None or parsed.icmp_type != ICMP4_ECHO_REPLY:
                return
            if not ours(parsed.ident) or source not in answering or source in forged:
                return
            if len(forged) >= replies_to_forge:
                return
            forged.add(source)
            dst = socket.inet_ntoa(packet[16:20])
            ident, seq, payload = parsed.ident, parsed.seq, parsed.payload
            inject(source, dst, packet[20:])  # duplicate
            inject("10.77.250.1", dst, packet[20:])  # from an address never probed
            inject(source, dst, build_echo(ICMP4_ECHO_REPLY, ident, seq + 1, payload))  # seq
            inject(source, dst, build_echo(ICMP4_ECHO_REPLY, ident, seq, b"X" * len(payload)))
            inject(source, dst, build_echo(ICMP4_ECHO_REPLY, ident ^ 0x5A5A, seq, payload))
            inject(source, dst, packet[20:26])  # truncated ICMP header: the kernel drops it
            cut = build_ipv4(dst, source, packet[20:])[:12]
            inject(source, dst, build_error4(ICMP4_DEST_UNREACHABLE, 1, cut))  # quote cut short
            udp = build_ipv4(dst, "10.77.9.9", struct.pack("!HHHH", 5353, 53, 8, 0), protocol=17)
            inject(source, dst, build_error4(ICMP4_DEST_UNREACHABLE, 3, udp))  # not about us
            inject(source, dst, build_error4(ICMP4_DEST_UNREACHABLE, 1, b"\x45garbage"))

        tap = Tap(forge)
        try:
            results = await probe_all(prober, answering + silent, api=api, batch=batch)
            await asyncio.sleep(0.2)  # forgeries still in the socket are read too
            assert len(forged) == replies_to_forge
            return results, prober.stats.as_dict()
        finally:
            tap.close()
            injector.close()
            if batch is not None:
                await batch.close()
            await prober.close()

    results, stats = run_in_netns(vantage, scenario)
    assert all(results[a].success for a in answering)
    assert all(results[a].failure is Failure.TIMEOUT for a in silent)
    assert stats["echo_replies"] == len(answering)
    n = replies_to_forge
    assert (stats["duplicates"], stats["unmatched"], stats["wrong_payload"]) == (n, 2 * n, n)
    if mode == "raw":
        # A raw socket sees everything; the kernel filters these for a datagram socket.
        assert (stats["wrong_id"], stats["malformed"], stats["unrelated"]) == (n, 2 * n, n)
    else:
        assert (stats["wrong_id"], stats["malformed"], stats["unrelated"]) == (0, 0, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("engine", ENGINES)
def test_blocklisted_targets_get_no_packet(vantage: Netns, mode: str, engine: str) -> None:
    blocked = addresses("10.77.5.0/24", 10)
    allowed = addresses("10.77.6.0/24", 10)
    pacer_policy = PacingPolicy(rate_pps=None, per_block_pps=None)

    async def scenario() -> tuple[dict[str, ProbeResult], Counter[str], int]:
        prober = ENGINES[engine](timeout_s=0.5, privileged=MODES[mode])
        tap = Tap()
        pacer = Pacer(pacer_policy, Blocklist.from_cidrs(["10.77.5.0/24"]))
        try:
            results = await probe_all(prober, blocked + allowed, pacer)
            await asyncio.sleep(0.05)
            return results, tap.requests, prober.stats.sent
        finally:
            tap.close()
            await prober.close()

    results, requests, sent = run_in_netns(vantage, scenario)
    for address in blocked:
        assert results[address].failure is Failure.BLOCKED_BY_POLICY
        assert requests[address] == 0
    for address in allowed:
        assert results[address].success
        assert requests[address] == 1
    assert sent == len(allowed)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rate", [1000, BATCH_FROM_PPS * 1.2])
def test_rate_cap_is_respected(vantage: Netns, engine: str, rate: float) -> None:
    """Half a second's worth of probes at a rate cap cannot finish in much under half a second
    (a correctness check, less the bucket's 1% burst): below BATCH_FROM_PPS the batch prober
    goes IcmpProber's way, from it on through its chunks and the batch engine."""
    targets = addresses("10.77.0.0/16", int(rate / 2))

    async def scenario() -> tuple[float, dict[str, ProbeResult], bool]:
        prober = ENGINES[engine](timeout_s=0.5)
        pacer = Pacer(PacingPolicy(rate_pps=rate, per_block_pps=None))
        try:
            begun = time.monotonic()
            results = await probe_all(prober, targets, pacer)
            batched = isinstance(prober, IcmpBatchProber) and bool(prober.batch_echo_ids)
            return time.monotonic() - begun, results, batched
        finally:
            await prober.close()

    elapsed, results, batched = run_in_netns(vantage, scenario)
    assert elapsed >= 0.48
    assert all(r.success for r in results.values())
    assert batched == (engine == "IcmpBatchProber" and rate >= BATCH_FROM_PPS)


@pytest.mark.parametrize("engine", ENGINES)
def test_in_flight_cap_is_respected(vantage: Netns, engine: str) -> None:
    """16 silent targets, 4 in flight, 0.3 s timeout: four waves, at least 1.2 s."""
    targets = addresses("10.78.1.0/24", 16)

    async def scenario() -> tuple[float, int, int]:
        prober = ENGINES[engine](timeout_s=0.3)
        pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=4))
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, pacer.in_flight)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            begun = time.monotonic()
            results = await probe_all(prober, targets, pacer)
            assert all(r.failure is Failure.TIMEOUT for r in results.values())
            return time.monotonic() - begun, peak, pacer.in_flight
        finally:
            watcher.cancel()
            await prober.close()

    elapsed, peak, left = run_in_netns(vantage, scenario)
    assert elapsed >= 1.2
    assert peak == 4
    assert left == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_cancelled_call_releases_its_slots(vantage: Netns, engine: str) -> None:
    """A round abandoned mid-way (SIGTERM) keeps the in-flight slots of its echoes on the wire
    until they end (the cap still holds for the next call: no echo more than it allows goes out
    within the timeout), and leaves none taken once they have."""
    timeout = 0.5

    async def scenario() -> tuple[int, int, bool]:
        prober = ENGINES[engine](timeout_s=timeout)
        pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=4))
        seen: list[ProbeResult] = []
        try:
            task = asyncio.create_task(
                prober.probe_many((Target(a) for a in addresses("10.78.1.0/24", 10)), pacer,
                                  seen.append)
            )  # fmt: skip
            await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # The next call, to silent targets too, while the first one's echoes are out.
            follower = asyncio.create_task(
                prober.probe_many((Target(a) for a in addresses("10.78.1.100/32", 1)), pacer,
                                  seen.append)
            )  # fmt: skip
            await asyncio.sleep(timeout / 2)
            on_the_wire = prober.stats.sent
            await asyncio.wait_for(follower, 5)
            await asyncio.sleep(timeout)  # the sweep ends the probes that were in flight
            after = await probe_all(prober, addresses("10.77.11.0/24", 5), pacer)
            return on_the_wire, pacer.in_flight, all(r.success for r in after.values())
        finally:
            await prober.close()

    on_the_wire, in_flight, after_ok = run_in_netns(vantage, scenario)
    assert on_the_wire == 4  # the first call's, the follower still waiting for a slot
    assert (in_flight, after_ok) == (0, True)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shared_pacer", [False, True])
def test_concurrent_calls_share_one_prober(vantage: Netns, engine: str, shared_pacer: bool) -> None:
    """Two calls at once on one prober (the daemon's jobs of a round), each with its own pacer
    or both with one, at a cap lower than both together: every target gets its result, the
    slots all come back, one IPv4 socket is the prober's (the batch engine has its own)."""
    first = addresses("10.77.8.0/24", 200)
    second = addresses("10.77.9.0/24", 200)
    policy = PacingPolicy(rate_pps=None, max_in_flight=64, per_block_pps=None)

    async def scenario() -> tuple[dict[str, ProbeResult], dict[str, ProbeResult], int, int]:
        prober = ENGINES[engine](timeout_s=0.5)
        one = Pacer(policy)
        pacers = (one, one) if shared_pacer else (one, Pacer(policy))
        try:
            a, b = await asyncio.gather(
                probe_all(prober, first, pacers[0]), probe_all(prober, second, pacers[1])
            )
            return a, b, len(prober.mode), pacers[0].in_flight + pacers[1].in_flight
        finally:
            await prober.close()

    a, b, sockets, in_flight = run_in_netns(vantage, scenario)
    assert len(a) == len(b) == 200
    assert all(r.success for r in a.values()) and all(r.success for r in b.values())
    assert sockets == 1
    assert in_flight == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_prober_moves_to_a_new_event_loop_between_runs(vantage: Netns, engine: str) -> None:
    """A CLI may call asyncio.run() more than once with the same prober (and pacer): IPv6 only
    first (no IPv4 socket yet), then IPv4; then runs stopped early on a loop closed without
    running its last callbacks (results not yet handed on must not stall the next run), and
    runs whose loop was closed under a call with echoes still on the wire (IPv4 and IPv6: the
    next run must not find the prober "in use", and the slots come back)."""
    prober = ENGINES[engine](timeout_s=0.5)
    pacer = Pacer(FAST)

    def run_and_close(coroutine: Coroutine[Any, Any, Any]) -> Any:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(coroutine)
        finally:
            loop.close()

    def run_of(targets: list[str]) -> Callable[[], Awaitable[bool]]:
        async def one_run() -> bool:
            results = await asyncio.wait_for(probe_all(prober, targets, pacer), 10)
            return all(r.success for r in results.values())

        return one_run

    async def stopped_early() -> None:
        task = asyncio.ensure_future(probe_all(prober, addresses("10.77.13.0/24", 200), pacer))
        for _ in range(2):
            await asyncio.sleep(0)
        task.cancel()

    def left_on_the_wire(targets: list[str]) -> Callable[[], Awaitable[None]]:
        async def leave() -> None:
            left = asyncio.ensure_future(probe_all(prober, targets, pacer))
            await asyncio.sleep(0.05)
            assert not left.done()  # its loop closes under it

        return leave

    async def close() -> None:
        await prober.close()

    assert run_in_netns(vantage, run_of(addresses("fd77::/64", 20, first=0x100)))
    assert run_in_netns(vantage, run_of(addresses("10.77.12.0/24", 20)))
    for _ in range(3):
        run_in_netns(vantage, stopped_early, runner=run_and_close)
        assert run_in_netns(vantage, run_of(addresses("10.77.14.0/24", 20)))
    for silent in (addresses("10.78.1.0/24", 50), addresses("fd78:1::/64", 50)):
        run_in_netns(vantage, left_on_the_wire(silent), runner=run_and_close)
        assert run_in_netns(vantage, run_of(addresses("10.77.15.0/24", 20)))
    assert pacer.in_flight == 0
    run_in_netns(vantage, close)


@pytest.mark.parametrize("engine", ENGINES)
def test_close_during_a_call_ends_it_and_gives_every_slot_back(vantage: Netns, engine: str) -> None:
    """A daemon stopping closes its probers while a round waits at the in-flight cap."""

    async def scenario() -> tuple[BaseException | None, int]:
        prober = ENGINES[engine](timeout_s=5.0)
        pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=4))
        task = asyncio.ensure_future(probe_all(prober, addresses("10.78.1.0/24", 99), pacer))
        await asyncio.sleep(0.2)
        await prober.close()
        try:
            await asyncio.wait_for(task, 10)
        except ProbeSetupError as exc:
            return exc, pacer.in_flight
        return None, pacer.in_flight

    error, in_flight = run_in_netns(vantage, scenario)
    assert isinstance(error, ProbeSetupError) and "closed" in str(error)
    assert in_flight == 0


def test_batch_engine_reuses_its_ring_of_slots(vantage: Netns) -> None:
    """One socket: 65,536 slots. 125,544 echoes (most slots taken twice, a slot freed only at
    its deadline) with a silent block among them: every probe gets exactly one result, and the
    ones to the silent block time out."""
    # The vantage's own AnyIP /16, and the router's 10.78.4.1 onwards (it answers all of
    # 10.78.0.0/16 but the three test /24s below .4).
    answering = addresses("10.77.0.0/16", 65_534) + addresses("10.78.4.0/24", 60_000)
    silent = addresses("10.78.1.0/24", 10)
    targets = answering[:70_000] + silent + answering[70_000:]

    async def scenario() -> tuple[dict[str, ProbeResult], dict[str, int], int]:
        prober = IcmpProber(timeout_s=0.3)
        batch = BatchEcho(Records(), prober, sockets=1)
        try:
            results = await probe_all(prober, targets, api="batch", batch=batch)
            return results, prober.stats.as_dict(), len(batch.records.packed)
        finally:
            await batch.close()
            await prober.close()

    results, stats, left = run_in_netns(vantage, scenario, timeout=300)
    assert all(results[a].success for a in answering)
    assert all(results[a].failure is Failure.TIMEOUT for a in silent)
    assert (stats["sent"], stats["echo_replies"], stats["timeouts"]) == (125_544, 125_534, 10)
    assert stats["unmatched"] == stats["duplicates"] == 0
    assert left == 0


def test_batch_engine_serves_concurrent_calls(vantage: Netns) -> None:
    """Two calls at once (a worker starts the next chunk before the last one is answered),
    one with a host name in it: each key gets its own result. (Calls that wait inside a send:
    test_batch_sends_that_wait_for_room_keep_their_probes.)"""
    first = addresses("10.77.20.0/24", 3000)
    second = [*addresses("10.77.40.0/24", 2999), "localhost"]

    async def scenario() -> tuple[list[Decoded], dict[str, int]]:
        prober = IcmpProber(timeout_s=0.5)
        batch = BatchEcho(Records(), prober)
        try:
            await asyncio.gather(
                batch.probe_keyed(enumerate(first), Blocklist()),
                batch.probe_keyed(enumerate(second, start=10_000), Blocklist()),
            )
            return list(decode(*batch.records.take())), prober.stats.as_dict()
        finally:
            await batch.close()
            await prober.close()

    results, stats = run_in_netns(vantage, scenario)
    assert sorted(key for key, *_ in results) == [*range(3000), *range(10_000, 13_000)]
    assert all(success for _key, _reachable, success, *_ in results)
    assert stats["echo_replies"] == 6000 and stats["unmatched"] == 0


def test_batch_sends_that_wait_for_room_keep_their_probes() -> None:
    """A full queue on the way out: a token bucket on loopback lets ~100 probes/s through and
    refuses the rest (ENOBUFS), and the replies it queues take the room that frees up, so each
    batch's sendmmsg stops early and some later echoes wait for room longer than the timeout.
    Two calls at once. Every probe gets exactly one result; every result's send time is when
    its echo really went (a tap sees each request arrive: never earlier than that, never more
    than the bucket's queue later), so none timed out before it went; neither call's batch
    overwrote the other's while it waited (a probe sent twice is answered twice)."""
    timeout = 0.5
    with Netns("batchq") as ns:
        ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
        ns.exec("ip", "route", "add", "local", "10.77.0.0/16", "dev", "lo")
        # At most 3,000 bytes queued at 12,500 bytes/s: a request that got in arrives within
        # 0.24 s.
        ns.exec("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "100kbit",
                "burst", "1600", "limit", "3000")  # fmt: skip
        first, second = addresses("10.77.1.0/24", 300), addresses("10.77.3.0/24", 300)
        targets = {**dict(enumerate(first)), **dict(enumerate(second, start=10_000))}

        async def scenario() -> tuple[list[Decoded], dict[str, int], dict[tuple[int, str], float]]:
            prober = IcmpProber(timeout_s=timeout)
            batch = BatchEcho(Records(), prober)
            tap = Tap()
            try:
                await asyncio.wait_for(asyncio.gather(
                    batch.probe_keyed(enumerate(first), Blocklist()),
                    batch.probe_keyed(enumerate(second, start=10_000), Blocklist()),
                ), 60)  # fmt: skip
                await asyncio.sleep(0.3)  # the last requests reach the tap
                return list(decode(*batch.records.take())), prober.stats.as_dict(), tap.arrived
            finally:
                tap.close()
                await batch.close()
                await prober.close()

        results, stats, arrived = run_in_netns(ns, scenario)
    assert sorted(key for key, *_ in results) == sorted(targets)
    assert stats["sent"] + stats["send_errors"] == 600 and stats["duplicates"] == 0, stats
    late = {}
    for key, _reachable, _success, _failure, _rtt, started_at, _details in results:
        went = arrived.get((ICMP4_ECHO_REQUEST, targets[key]))
        if went is not None and not started_at - 0.01 <= went <= started_at + 0.35:
            late[targets[key]] = went - started_at
    assert not late, f"requests that went long after (or before) their stamped send: {late}"
    assert sum(success for _key, _reachable, success, *_ in results) == stats["echo_replies"] > 0


def test_keyed_probes_screen_only_names_resolved_here(vantage: Netns) -> None:
    """probe_keyed's caller screened the literal addresses it handed over; the prober screens
    the address a host name resolves to (here localhost, 127.0.0.1)."""
    blocklist = Blocklist.from_cidrs(["127.0.0.0/8", "::1/128", "10.77.8.0/24"])

    async def scenario() -> tuple[dict[str, ProbeResult], int]:
        prober = IcmpProber(timeout_s=0.5)
        try:
            return await probe_all(prober, ["localhost", "10.77.8.1"], Pacer(FAST, blocklist),
                                   api="probe_keyed"), prober.stats.blocked  # fmt: skip
        finally:
            await prober.close()

    results, blocked = run_in_netns(vantage, scenario)
    assert results["localhost"].failure is Failure.BLOCKED_BY_POLICY
    assert results["10.77.8.1"].success  # a literal: the caller's to screen
    assert blocked == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_host_name_target_is_resolved(vantage: Netns, engine: str) -> None:
    async def scenario() -> dict[str, ProbeResult]:
        prober = ENGINES[engine](timeout_s=0.5)
        try:
            return await probe_all(prober, ["localhost"])
        finally:
            await prober.close()

    assert run_in_netns(vantage, scenario)["localhost"].success


@pytest.mark.parametrize("engine", ENGINES)
def test_failing_sink_stops_the_call(vantage: Netns, engine: str) -> None:
    class SinkBroke(Exception):
        pass

    async def scenario() -> None:
        prober = ENGINES[engine](timeout_s=0.5)

        def sink(_result: ProbeResult) -> None:
            raise SinkBroke

        try:
            targets = (Target(a) for a in addresses("10.77.10.0/24", 10))
            await prober.probe_many(targets, Pacer(FAST), sink)
        finally:
            await prober.close()

    with pytest.raises(SinkBroke):
        run_in_netns(vantage, scenario)


@pytest.mark.parametrize("engine", ENGINES)
def test_no_permission_says_how_to_enable(engine: str) -> None:
    """Every call says so, whatever it probes: IPv4 (the batch prober's engine cannot start),
    IPv6 (its chunks fail inside the engine: the call must fail, not wait at the in-flight cap
    for slots whose results will never come), and again on the next call."""
    with Netns("icmpn") as ns:
        ns.sysctl("net.ipv4.ping_group_range", "1 0")

        async def scenario() -> list[str]:
            prober = ENGINES[engine](privileged=False)
            pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=4))
            messages = []
            try:
                for targets in (["127.0.0.1"], addresses("fd77::/64", 10), ["127.0.0.1"]):
                    with pytest.raises(ProbeSetupError) as caught:
                        await asyncio.wait_for(
                            prober.probe_many(map(Target, targets), pacer, lambda r: None), 10
                        )
                    messages.append(str(caught.value))
                assert pacer.in_flight == 0
                return messages
            finally:
                await prober.close()

        messages = run_in_netns(ns, scenario)
    for message in messages:
        assert 'sysctl -w net.ipv4.ping_group_range="0 2147483647"' in message
        assert "cap_net_raw+ep" in message


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ProbeSetupError, match="timeout_s"):
        IcmpProber(timeout_s=0)
    with pytest.raises(ProbeSetupError, match="payload_size"):
        IcmpProber(payload_size=5000)
