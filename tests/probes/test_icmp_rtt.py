"""ICMP RTTs are the network's, not the event loop's: they come from the kernel's receive stamps.

Each test blocks the event loop for BLOCK_S right after the last echo request went out (as a
busy daemon does: a history flush, the detector), so every reply waits that long in the socket
buffer before the prober reads it. The reported RTTs must stay what the network took.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from probes.base import ProbeResult, Target
from probes.icmp import ICMP4_ECHO_REPLY, ICMP4_ECHO_REQUEST, IcmpProber, build_echo
from probes.icmp_batch import BatchEcho
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.records import Decoded, Records, decode
from probes.stamps import RTT_KERNEL, RTT_LOOP, honest_rtt, kernel_receive_time
from tests.netns import Netns, needs_root, run_in_netns
from tests.probes.blocked_loop import BLOCK_S, HONEST_BOUND_S, then_block
from tests.probes.icmp_tap import Tap

MODES = {"datagram": False, "raw": True}
FAST = PacingPolicy(rate_pps=None, max_in_flight=4096, per_block_pps=None)
RESPONDER_DELAY_S = 0.05


@pytest.fixture(scope="module")
def lab() -> Iterator[Netns]:
    """A namespace whose loopback answers 10.77.0.0/16 and fd77::/64 (ICMP errors are tested
    in test_icmp.py, whose namespaces have a router that sends them)."""
    with Netns("rttv") as ns:
        ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
        ns.exec("ip", "route", "add", "local", "10.77.0.0/16", "dev", "lo")
        ns.exec("ip", "-6", "route", "add", "local", "fd77::/64", "dev", "lo")
        yield ns


async def warm_up(prober: IcmpProber, target: str) -> None:
    """Probe until replies carry kernel stamps: the kernel turns receive stamping on a moment
    after the first socket on the host asks (deferred work), and a daemon's socket stays open.
    Replies that come before are labelled "loop", never passed off as the kernel's."""
    for _ in range(100):
        got: list[ProbeResult] = []
        await prober.probe_many([Target(target)], Pacer(FAST), got.append)
        assert got[0].success, got[0]
        if got[0].details["rtt_source"] == RTT_KERNEL:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no kernel receive stamps after 100 probes of {target}")


async def probe_with_blocked_loop(
    prober: IcmpProber, targets: list[str], warm_up_target: str | None = None
) -> list[tuple[ProbeResult, float]]:
    """Results with the wall-clock time each one was handed over."""
    await warm_up(prober, warm_up_target or targets[0])
    got: list[tuple[ProbeResult, float]] = []
    await prober.probe_many(
        then_block(map(Target, targets)), Pacer(FAST), lambda r: got.append((r, time.time()))
    )
    assert sorted(r.target.address for r, _ in got) == sorted(targets)
    return got


@needs_root
@pytest.mark.root
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_rtt_excludes_time_the_reply_waited_for_a_blocked_loop(
    lab: Netns, mode: str, family: str
) -> None:
    targets = (
        [f"10.77.0.{i}" for i in range(1, 101)] if family == "ipv4"
        else [f"fd77::{i:x}" for i in range(1, 101)]
    )  # fmt: skip

    async def scenario() -> list[tuple[ProbeResult, float]]:
        prober = IcmpProber(timeout_s=2.0, privileged=MODES[mode])
        try:
            return await probe_with_blocked_loop(prober, targets)
        finally:
            await prober.close()

    for result, handed_over in run_in_netns(lab, scenario):
        assert result.success, result
        # The premise: the prober saw the reply only after the block...
        assert handed_over - result.started_at >= BLOCK_S
        # ...yet reports the network's RTT.
        assert result.rtt_s is not None and 0 <= result.rtt_s < HONEST_BOUND_S, result
        assert result.details["rtt_source"] == RTT_KERNEL


@needs_root
@pytest.mark.root
def test_batch_engine_rtt_excludes_time_the_reply_waited_for_a_blocked_loop(lab: Netns) -> None:
    """The pool workers' batch engine: the RTTs are worked out for a whole batch of replies
    at once, from the same kernel stamps."""
    targets = [f"10.77.0.{i}" for i in range(1, 101)]

    async def scenario() -> tuple[list[Decoded], float]:
        prober = IcmpProber(timeout_s=2.0, privileged=False)
        batch = BatchEcho(Records(), prober)

        try:
            await warm_up(prober, targets[0])
            begun = time.monotonic()
            await batch.probe_keyed(then_block(enumerate(targets)), Blocklist())
            return list(decode(*batch.records.take())), time.monotonic() - begun
        finally:
            await batch.close()
            await prober.close()

    results, took = run_in_netns(lab, scenario)
    assert took >= BLOCK_S  # the premise: the replies were read after the block
    assert sorted(key for key, *_ in results) == list(range(len(targets)))
    for _key, reachable, success, failure, rtt, _started_at, details in results:
        assert (reachable, success, failure) == (True, True, None)
        assert rtt is not None and 0 <= rtt < HONEST_BOUND_S
        assert details == {"rtt_source": RTT_KERNEL}


@needs_root
@pytest.mark.root
def test_batch_engine_rtts_do_not_carry_the_rest_of_their_batch(lab: Netns) -> None:
    """The kernel sends a sendmmsg call's echoes one after another (on loopback ~2 ms for a
    batch of 254, the replies' work included): each echo's RTT is its own, not the time since
    its batch began. A tap's kernel stamps of each request and of its reply give the true RTT.
    Best of three batches, so a preemption inside one call does not decide it."""
    tolerance_s = 0.0005  # the whole batch takes ~4x this, one sendmmsg call ~1/5

    async def scenario() -> tuple[list[list[float]], set[str]]:
        prober = IcmpProber(timeout_s=2.0, privileged=False)
        batch = BatchEcho(Records(), prober)
        tap = Tap()
        errors: list[list[float]] = []
        sources: set[str] = set()
        try:
            await warm_up(prober, "10.77.0.1")
            for repeat in range(3):
                targets = [f"10.77.{10 + repeat}.{i}" for i in range(1, 255)]  # one batch
                await batch.probe_keyed(enumerate(targets), Blocklist())
                await asyncio.sleep(0.05)  # the tap reads the last of them
                off = []
                for key, _reachable, success, _failure, rtt, _sent, details in decode(
                    *batch.records.take()
                ):
                    assert success and rtt is not None
                    sources.add(details["rtt_source"])
                    address = targets[key]
                    true_rtt = (tap.arrived[(ICMP4_ECHO_REPLY, address)]
                                - tap.arrived[(ICMP4_ECHO_REQUEST, address)])  # fmt: skip
                    off.append(abs(rtt - true_rtt))
                errors.append(sorted(off))
            return errors, sources
        finally:
            tap.close()
            await batch.close()
            await prober.close()

    errors, sources = run_in_netns(lab, scenario)
    assert sources == {RTT_KERNEL}
    # The 90th percentile of |reported - true| in each batch; the bug it guards against put
    # the last echoes' error at the whole batch's duration.
    p90 = [off[int(len(off) * 0.9)] for off in errors]
    assert min(p90) < tolerance_s, f"90th percentile RTT errors per batch: {p90}"


def delayed_echo_responder(sock: socket.socket, stop: threading.Event) -> None:
    """Answer every echo request the raw socket sees RESPONDER_DELAY_S after it arrived."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            packet, (source, _port) = sock.recvfrom(4096)
        except TimeoutError:
            continue
        arrived = time.monotonic()
        ihl = (packet[0] & 0x0F) * 4
        icmp = packet[ihl:]
        if len(icmp) < 8 or icmp[0] != ICMP4_ECHO_REQUEST:
            continue
        _type, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", icmp)
        time.sleep(max(0.0, arrived + RESPONDER_DELAY_S - time.monotonic()))
        sock.sendto(build_echo(ICMP4_ECHO_REPLY, ident, seq, icmp[8:]), (source, 0))


@needs_root
@pytest.mark.root
@pytest.mark.parametrize("mode", MODES)
def test_a_real_delay_is_measured_and_the_blocked_loop_is_not(mode: str) -> None:
    """No netem on this kernel: a user-space responder answers after 50 ms instead (the
    namespace's own echo replies are off). The RTT is the 50 ms, not the 300 ms block."""
    with Netns("rttd") as ns:
        ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
        ns.sysctl("net.ipv4.icmp_echo_ignore_all", "1")
        ns.exec("ip", "route", "add", "local", "10.77.0.0/16", "dev", "lo")
        target = "10.77.0.5"

        async def scenario() -> list[tuple[ProbeResult, float]]:
            responder = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            responder.bind((target, 0))  # replies come from the target's address
            stop = threading.Event()
            thread = threading.Thread(target=delayed_echo_responder, args=(responder, stop))
            thread.start()
            prober = IcmpProber(timeout_s=2.0, privileged=MODES[mode])
            try:
                # The block starts after the send and outlasts the responder's delay.
                return await probe_with_blocked_loop(prober, [target])
            finally:
                await prober.close()
                stop.set()
                thread.join()
                responder.close()

        [(result, handed_over)] = run_in_netns(ns, scenario)
    assert result.success, result
    assert handed_over - result.started_at >= BLOCK_S
    assert result.rtt_s is not None
    assert RESPONDER_DELAY_S <= result.rtt_s < BLOCK_S - 0.1, result
    assert result.details["rtt_source"] == RTT_KERNEL


# -- the pure parts ---------------------------------------------------------------------------


def test_kernel_receive_time_reads_the_software_stamp_of_scm_timestamping() -> None:
    stamp = struct.pack("=qq", 1_700_000_000, 250_000_000) + bytes(32)  # software, (legacy), raw
    scm_timestamping = 37
    assert kernel_receive_time([(socket.SOL_SOCKET, scm_timestamping, stamp)]) == pytest.approx(
        1.70000000025e9
    )
    assert kernel_receive_time([]) is None
    assert kernel_receive_time([(socket.SOL_SOCKET, scm_timestamping, stamp[:8])]) is None
    assert kernel_receive_time([(socket.IPPROTO_IP, scm_timestamping, stamp)]) is None
    assert kernel_receive_time([(socket.SOL_SOCKET, scm_timestamping, bytes(48))]) is None


def test_honest_rtt_takes_off_the_wait_or_falls_back_to_the_loop() -> None:
    # Sent 0.3 s ago (monotonic); the kernel stamped the reply 0.29998 s ago (wall clock).
    rtt, source = honest_rtt(99.70002, 100.0, 0.3)
    assert source == RTT_KERNEL
    assert rtt == pytest.approx(0.00002)
    assert honest_rtt(None, 100.0, 0.3) == (0.3, RTT_LOOP)  # no stamp
    assert honest_rtt(99.0, 100.0, 0.3) == (0.3, RTT_LOOP)  # stamped "before the send": a step
    assert honest_rtt(101.0, 100.0, 0.3) == (0.3, RTT_LOOP)  # stamped in the future: a step
