"""TcpProber against real listeners on loopback and in namespaces the tests create."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import resource
import socket
import struct
import subprocess
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.base import Failure, ProbeResult, ProbeSetupError, Target
from probes.oserrors import failure_from_oserror
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.tcp import TcpProber, handshake_rtt, parse_tcp_info_rtt
from tests.netns import Netns, needs_root, run_in_netns
from tests.probes.blocked_loop import BLOCK_S, HONEST_BOUND_S, then_block
from tests.probes.servers import (
    free_port,
    listener_that_never_accepts,
    raw_tcp_server,
    reset_after_request,
)


def _pacer(blocklist: Blocklist | None = None) -> Pacer:
    return Pacer(PacingPolicy(rate_pps=None, per_block_pps=None), blocklist)


async def _probe(
    prober: TcpProber, targets: list[Target], pacer: Pacer | None = None
) -> list[ProbeResult]:
    results: list[ProbeResult] = []
    await prober.probe_many(targets, pacer or _pacer(), results.append)
    await prober.close()
    return results


async def _accept_and_wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


# (scenario, how the port behaves, reachable, success, failure)
SCENARIOS = [
    ("open", "listen", True, True, None),
    ("refused", "closed", True, False, Failure.CONNECTION_REFUSED),
    ("rst_after_accept", "reset", True, True, None),  # the handshake completed: host is up
]


@pytest.mark.parametrize(("name", "behaviour", "reachable", "success", "failure"), SCENARIOS)
async def test_tcp_scenarios(
    name: str, behaviour: str, reachable: bool, success: bool, failure: Failure | None
) -> None:
    handler = reset_after_request if behaviour == "reset" else _accept_and_wait
    async with raw_tcp_server(handler) as port:
        if behaviour == "closed":
            port = free_port()
        [result] = await _probe(TcpProber(ports=(port,), timeout_s=2), [Target("127.0.0.1")])
    assert (result.reachable, result.success, result.failure) == (reachable, success, failure)
    assert result.details["ports"][str(port)] == ("open" if success else str(failure))
    assert result.details["port"] == port
    assert result.rtt_s is not None and 0 <= result.rtt_s < 2


async def test_ports_are_tried_in_order_until_one_connects() -> None:
    closed = free_port()
    async with raw_tcp_server(_accept_and_wait) as open_port:
        [result] = await _probe(TcpProber(ports=(closed, open_port)), [Target("127.0.0.1")])
    assert result.success and result.failure is None
    assert result.details["port"] == open_port
    assert result.details["ports"][str(closed)] == "connection_refused"
    assert result.details["ports"][str(open_port)] == "open"


async def test_target_port_overrides_the_port_list_and_names_resolve() -> None:
    async with raw_tcp_server(_accept_and_wait) as port:
        [result] = await _probe(TcpProber(ports=(free_port(),)), [Target("localhost", port)])
    assert result.success
    assert result.details["ports"] == {str(port): "open"}
    assert result.details["address"] in ("127.0.0.1", "::1")


async def test_ipv6_loopback() -> None:
    async with raw_tcp_server(_accept_and_wait, host="::1") as port:
        [result] = await _probe(TcpProber(ports=(port,)), [Target("::1")])
    assert result.success


async def test_blocklisted_target_gets_no_packet() -> None:
    accepted = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    async with raw_tcp_server(count) as port:
        pacer = _pacer(Blocklist.from_cidrs(["127.0.0.0/8"]))
        [result] = await _probe(TcpProber(ports=(port,)), [Target("127.0.0.1")], pacer)
        await asyncio.sleep(0.05)
    assert result.failure is Failure.BLOCKED_BY_POLICY and not result.reachable
    assert accepted == 0
    assert pacer.refused == 1


async def test_unresolvable_name_is_resolve_error() -> None:
    [result] = await _probe(TcpProber(ports=(80,), timeout_s=1), [Target("no-such-host.invalid")])
    assert result.failure is Failure.RESOLVE_ERROR and not result.reachable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ports": ()}, "at least one port"),
        ({"ports": (0,)}, "1..65535"),
        ({"timeout_s": 0}, "positive"),
    ],
)
def test_bad_options_are_setup_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ProbeSetupError, match=message):
        TcpProber(**kwargs)  # type: ignore[arg-type]


@given(st.sampled_from(sorted(errno.errorcode)))
def test_every_errno_maps_to_a_known_failure(code: int) -> None:
    failure = failure_from_oserror(OSError(code, "x"))
    assert failure in set(Failure)
    if code == errno.ECONNREFUSED:
        assert failure is Failure.CONNECTION_REFUSED


# --- in a namespace: silent drops, unreachable routes ---------------------------------------


@needs_root
def test_dropped_syn_is_timeout_and_routes_map_to_unreachable() -> None:
    with Netns() as ns:
        ns.exec("ip", "route", "add", "unreachable", "10.77.0.0/24")
        ns.exec(
            "nft", "add table inet t ; add chain inet t in { type filter hook input priority 0 ; }"
        )

        async def scenario() -> dict[str, ProbeResult]:
            async with raw_tcp_server(_accept_and_wait) as port:
                ns.exec("nft", "add", "rule", "inet", "t", "in", "tcp", "dport", str(port), "drop")
                prober = TcpProber(ports=(port,), timeout_s=0.5)
                targets = {
                    "dropped": Target("127.0.0.1"),
                    "unreachable_route": Target("10.77.0.9"),
                    "no_route": Target("10.88.0.9"),
                }
                results = await _probe(prober, list(targets.values()))
            by_target = {r.target: r for r in results}
            return {name: by_target[target] for name, target in targets.items()}

        results = run_in_netns(ns, scenario)
    assert results["dropped"].failure is Failure.TIMEOUT
    assert not results["dropped"].reachable and results["dropped"].rtt_s is None
    assert results["unreachable_route"].failure is Failure.HOST_UNREACHABLE
    assert results["no_route"].failure is Failure.NETWORK_UNREACHABLE
    assert not results["no_route"].reachable


# --- the batched connect engine: many attempts in flight, sweeps, slots, a failing sink ----------


@needs_root
def test_many_targets_in_flight_each_get_their_own_answer() -> None:
    """600 targets at once in a namespace: AnyIP makes 10.9.0.0/16 local, a listener takes
    port P on every address; the odd addresses are firewalled (dropped), a /24 has no route."""
    with Netns() as ns:
        ns.exec("ip", "route", "add", "local", "10.9.0.0/16", "dev", "lo")
        ns.exec("ip", "route", "add", "unreachable", "10.8.0.0/24")

        async def scenario() -> tuple[list[ProbeResult], int]:
            async with raw_tcp_server(_accept_and_wait, host="0.0.0.0") as port:
                ns.exec(
                    "nft",
                    "add table inet t ; add chain inet t in { type filter hook input "
                    "priority 0 ; } ; add rule inet t in ip daddr 10.9.1.0/24 tcp dport "
                    f"{port} drop",
                )
                targets = [Target(f"10.9.0.{i}") for i in range(1, 201)]
                targets += [Target(f"10.9.1.{i}") for i in range(1, 201)]
                targets += [Target(f"10.8.0.{i}") for i in range(1, 201)]
                pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=300))
                results = await _probe(TcpProber(ports=(port,), timeout_s=0.5), targets, pacer)
                return results, pacer.in_flight

        results, in_flight = run_in_netns(ns, scenario)
    assert len(results) == 600 and in_flight == 0
    by_net: dict[str, set[tuple[bool, Failure | None]]] = {}
    for result in results:
        net = result.target.address.rsplit(".", 1)[0]
        by_net.setdefault(net, set()).add((result.success, result.failure))
    assert by_net == {
        "10.9.0": {(True, None)},
        "10.9.1": {(False, Failure.TIMEOUT)},
        "10.8.0": {(False, Failure.HOST_UNREACHABLE)},
    }
    assert len({r.target for r in results}) == 600


async def test_refused_port_then_open_port_with_many_targets_in_flight() -> None:
    closed = free_port()
    async with raw_tcp_server(_accept_and_wait) as open_port:
        targets = [Target("127.0.0.1")] * 100
        results = await _probe(TcpProber(ports=(closed, open_port)), targets)
    assert len(results) == 100
    for result in results:
        assert result.success and result.details["port"] == open_port
        assert result.details["ports"] == {
            str(closed): "connection_refused",
            f"{closed}_errno": "ECONNREFUSED",
            str(open_port): "open",
        }


async def test_every_port_refused_is_reachable_not_success() -> None:
    ports = (free_port(), free_port())
    [result] = await _probe(TcpProber(ports=ports), [Target("127.0.0.1")])
    assert result.reachable and not result.success
    assert result.failure is Failure.CONNECTION_REFUSED
    assert result.details["port"] == ports[0]


async def test_in_flight_cap_is_held_and_slots_come_back() -> None:
    seen: list[int] = []
    pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=7))

    async with raw_tcp_server(_accept_and_wait) as port:
        prober = TcpProber(ports=(port,))
        await prober.probe_many(
            [Target("127.0.0.1")] * 50, pacer, lambda r: seen.append(pacer.in_flight)
        )
    assert len(seen) == 50 and max(seen) < 7
    assert pacer.in_flight == 0


async def test_a_failing_sink_stops_the_call_and_is_raised() -> None:
    pacer = _pacer()
    calls = 0

    def sink(result: ProbeResult) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("sink broke")

    async with raw_tcp_server(_accept_and_wait) as port:
        with pytest.raises(RuntimeError, match="sink broke"):
            await TcpProber(ports=(port,)).probe_many([Target("127.0.0.1")] * 20, pacer, sink)
    assert calls == 1
    assert pacer.in_flight == 0


async def test_cancelled_call_closes_its_sockets_and_gives_slots_back() -> None:
    """Connects to a listener whose backlog is full hang; cancelling the call must free all."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    pacer = _pacer()
    try:
        task = asyncio.create_task(
            TcpProber(ports=(port,), timeout_s=30).probe_many(
                [Target("127.0.0.1")] * 20, pacer, lambda r: None
            )
        )
        await asyncio.sleep(0.3)
        assert pacer.in_flight > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        listener.close()
    assert pacer.in_flight == 0


async def test_extra_ports_are_paced_too() -> None:
    closed = free_port()
    pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None))
    async with raw_tcp_server(_accept_and_wait) as open_port:
        await _probe(TcpProber(ports=(closed, open_port)), [Target("127.0.0.1")] * 3, pacer)
    assert pacer.admitted == 6  # two SYNs per target, each one booked


async def test_blocklist_applies_to_the_address_a_name_resolves_to() -> None:
    pacer = _pacer(Blocklist.from_cidrs(["127.0.0.0/8", "::1/128"]))
    [result] = await _probe(TcpProber(ports=(80,)), [Target("localhost")], pacer)
    assert result.failure is Failure.BLOCKED_BY_POLICY
    assert pacer.in_flight == 0


async def test_running_out_of_descriptors_delays_probes_instead_of_failing_them() -> None:
    """With the fd limit just above what is open, most SYNs find no descriptor: they wait for
    our own sockets to close and go out then; none becomes a (false) failure."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A server that accepted would take descriptors too (and under load hold them past the
    # probes' timeout): the kernel completes these handshakes without one.
    with listener_that_never_accepts() as port:
        prober = TcpProber(ports=(port,))
        results: list[ProbeResult] = []
        open_now = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 12, hard))
        try:
            await prober.probe_many(
                [Target("127.0.0.1")] * 200,
                Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=100)),
                results.append,
            )
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(results) == 200
    assert all(r.success for r in results), [r.details for r in results if not r.success][:3]
    assert prober.resource_waits > 0


async def test_descriptors_held_elsewhere_delay_a_probe_up_to_its_timeout() -> None:
    """Out of descriptors with none of the prober's own sockets open (another part of the
    process holds them): the probe waits for one, up to its timeout, and goes out once one is
    free; when none comes free in time it ends as a local error, `other` with the errno."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with listener_that_never_accepts() as port:
        loop = asyncio.get_running_loop()
        spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(4)]
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(spare) + 1, hard))
        try:
            prober = TcpProber(ports=(port,), timeout_s=2.0)
            # Two free descriptors: one for the prober's epoll set, one the filler takes...
            os.close(spare.pop())
            os.close(spare.pop())
            filler = os.open("/dev/null", os.O_RDONLY)
            loop.call_later(0.3, os.close, filler)  # ...and lets go of in 0.3 s
            [freed] = await _probe(prober, [Target("127.0.0.1")])
            waits_then = prober.resource_waits
            filler = os.open("/dev/null", os.O_RDONLY)  # held for good this time
            [starved] = await _probe(TcpProber(ports=(port,), timeout_s=0.3),
                                     [Target("127.0.0.1")])  # fmt: skip
            os.close(filler)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for fd in spare:
                os.close(fd)
    assert freed.success and waits_then > 0, freed
    assert starved.failure is Failure.OTHER and not starved.reachable
    assert starved.details["ports"][f"{port}_errno"] == "EMFILE", starved.details


# --- RTTs: the kernel's handshake measure, not the event loop's --------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_handshake_rtt_excludes_time_the_loop_was_blocked(host: str) -> None:
    got: list[tuple[ProbeResult, float]] = []
    async with raw_tcp_server(_accept_and_wait, host=host) as port:
        targets = [Target(host)] * 60
        await TcpProber(ports=(port,), timeout_s=2).probe_many(
            then_block(targets), _pacer(), lambda r: got.append((r, time.time()))
        )
    assert len(got) == 60
    for result, handed_over in got:
        assert result.success, result
        assert handed_over - result.started_at >= BLOCK_S  # the loop saw it after the block...
        assert result.rtt_s is not None and 0 < result.rtt_s < HONEST_BOUND_S, result  # ...but
        assert result.details["rtt_source"] == "kernel"


async def test_refused_port_rtt_is_the_loops_and_says_so() -> None:
    """A RST leaves no TCP_INFO sample: the loop's time is used, and labelled as such."""
    [result] = await _probe(TcpProber(ports=(free_port(),)), [Target("127.0.0.1")])
    assert result.failure is Failure.CONNECTION_REFUSED
    assert result.rtt_s is not None and result.details["rtt_source"] == "loop"


def _tcp_info(state: int, rtt_us: int, size: int = 104) -> bytes:
    info = bytearray(max(size, 72))
    info[0] = state
    struct.pack_into("=I", info, 68, rtt_us)
    return bytes(info[:size])


def test_tcp_info_rtt_is_read_from_its_offset_and_only_when_meaningful() -> None:
    assert parse_tcp_info_rtt(_tcp_info(1, 1234)) == pytest.approx(0.001234)
    assert parse_tcp_info_rtt(_tcp_info(1, 1234, size=72)) == pytest.approx(0.001234)
    assert parse_tcp_info_rtt(_tcp_info(1, 1234, size=71)) is None  # truncated
    assert parse_tcp_info_rtt(_tcp_info(7, 1234)) is None  # closed: no handshake sample
    assert parse_tcp_info_rtt(_tcp_info(1, 0)) is None  # established, but no sample yet


def test_handshake_rtt_matches_the_kernels_own_tcp_info() -> None:
    """The offset is right: what handshake_rtt reports is tcpi_rtt as `ss -ti` shows it."""
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        rtt, source = handshake_rtt(client, loop_rtt=1.0)
        ss = subprocess.run(
            ["ss", "-tniH", "state", "established", "src", "127.0.0.1",
             "sport", f"= {client.getsockname()[1]}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    assert source == "kernel"
    ss_rtt_ms = float(re.search(r"\brtt:([0-9.]+)/", ss).group(1))  # type: ignore[union-attr]
    assert rtt == pytest.approx(ss_rtt_ms / 1000, abs=1e-6)
