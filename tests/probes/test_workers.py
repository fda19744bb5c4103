"""WorkerPoolProber: real worker processes, real listeners and namespaces, the parent's Pacer."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from probes.base import DnsQuery, Failure, ProbeResult, ProbeSetupError, Target
from probes.icmp import ICMP4_ECHO_REPLY, build_echo
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.workers import IcmpWorkerPool, TcpWorkerPool, WorkerPoolProber, worker_pool
from tests.netns import Netns, needs_root, run_in_netns
from tests.probes.servers import DnsBehaviour, DnsResponder, free_port, raw_tcp_server


def _pacer(blocklist: Blocklist | None = None, **policy: object) -> Pacer:
    options: dict[str, object] = {"rate_pps": None, "per_block_pps": None} | policy
    return Pacer(PacingPolicy(**options), blocklist)  # type: ignore[arg-type]


async def _probe(
    prober: WorkerPoolProber, targets: list[Target], pacer: Pacer
) -> list[ProbeResult]:
    results: list[ProbeResult] = []
    try:
        await prober.probe_many(targets, pacer, results.append)
    finally:
        await prober.close()
    return results


async def _accept_and_wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


async def test_tcp_pool_gives_every_target_one_result_and_all_slots_back() -> None:
    closed = free_port()
    async with raw_tcp_server(_accept_and_wait) as open_port:
        targets = [Target("127.0.0.1", open_port)] * 300 + [Target("127.0.0.1", closed)] * 100
        pacer = _pacer(max_in_flight=64)
        prober = TcpWorkerPool(workers=2, ports=(80,), timeout_s=2.0)
        results = await _probe(prober, targets, pacer)
    assert len(results) == 400 and pacer.in_flight == 0
    by_port = {port: [r for r in results if r.target.port == port] for port in (open_port, closed)}
    assert all(r.success and r.method == "tcp" for r in by_port[open_port])
    assert len(by_port[open_port]) == 300
    assert {(r.reachable, r.failure) for r in by_port[closed]} == {
        (True, Failure.CONNECTION_REFUSED)
    }
    assert all(r.details["ports"][str(closed)] == "connection_refused" for r in by_port[closed])


async def test_blocklist_and_rate_are_the_parents() -> None:
    accepted = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    async with raw_tcp_server(count) as port:
        pacer = _pacer(Blocklist.from_cidrs(["127.0.0.2/32"]), rate_pps=200.0, burst_s=0.01)
        targets = [Target("127.0.0.1", port)] * 60 + [Target("127.0.0.2", port)] * 5
        started = time.monotonic()
        results = await _probe(worker_pool("tcp", 2, ports=(port,)), targets, pacer)
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.05)
    blocked = [r for r in results if r.failure is Failure.BLOCKED_BY_POLICY]
    assert len(blocked) == 5 and {r.target.address for r in blocked} == {"127.0.0.2"}
    assert accepted == 60
    assert pacer.admitted == 60 and pacer.refused == 5
    assert elapsed >= 59 / 200 * 0.9  # 60 SYNs at 200/s: the parent's rate held


async def test_a_name_resolving_to_a_blocklisted_address_is_blocked_in_the_worker() -> None:
    pacer = _pacer(Blocklist.from_cidrs(["127.0.0.0/8", "::1/128"]))
    [result] = await _probe(TcpWorkerPool(workers=1, ports=(80,)), [Target("localhost")], pacer)
    assert result.failure is Failure.BLOCKED_BY_POLICY


async def test_a_worker_that_dies_ends_its_probes_as_other_and_the_rest_go_on() -> None:
    """A listener with a full backlog makes connects hang; one worker is killed meanwhile."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    prober = TcpWorkerPool(workers=2, ports=(port,), timeout_s=1.0)
    pacer = _pacer()
    results: list[ProbeResult] = []
    try:
        await prober.start()
        victim = prober.pids[0]
        task = asyncio.create_task(
            prober.probe_many([Target("127.0.0.1")] * 600, pacer, results.append)
        )
        await asyncio.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        await task
        assert victim not in prober.pids and len(prober.pids) == 1
    finally:
        await prober.close()
        listener.close()
    assert len(results) == 600 and pacer.in_flight == 0
    lost = [r for r in results if r.details.get("error", "").startswith("worker process exited")]
    assert lost and all(r.failure is Failure.OTHER and not r.reachable for r in lost)
    assert all(r.failure in (Failure.TIMEOUT, Failure.OTHER, None) for r in results)


async def test_a_failing_sink_is_raised_and_slots_come_back() -> None:
    def sink(result: ProbeResult) -> None:
        raise RuntimeError("sink broke")

    pacer = _pacer()
    async with raw_tcp_server(_accept_and_wait) as port:
        prober = TcpWorkerPool(workers=1, ports=(port,))
        try:
            with pytest.raises(RuntimeError, match="sink broke"):
                await prober.probe_many([Target("127.0.0.1")] * 50, pacer, sink)
        finally:
            await prober.close()
    assert pacer.in_flight == 0
    assert not prober._chunks  # nothing of the failed call is kept


async def test_a_chunk_the_worker_cannot_probe_fails_only_its_call() -> None:
    """DNS targets with no question: the worker's prober refuses that chunk. Its call fails with
    the reason at once (it does not wait at the in-flight cap for results that never come) and
    gives its slots back; a call beside it on the same pacer goes on."""
    zone = {"good.test": DnsBehaviour(answers=["192.0.2.1"])}
    async with DnsResponder(zone) as server:
        pacer = _pacer(max_in_flight=4)
        query = DnsQuery("good.test", "A")
        good = [Target("127.0.0.1", server.port, query=query)] * 20
        prober = worker_pool("dns", 1, timeout_s=2.0)
        answered: list[ProbeResult] = []
        try:
            bad = prober.probe_many([Target("127.0.0.1", server.port)] * 20, pacer,
                                    lambda r: None)  # fmt: skip
            outcomes = await asyncio.wait_for(asyncio.gather(
                bad, prober.probe_many(good, pacer, answered.append), return_exceptions=True
            ), 30)  # fmt: skip
        finally:
            await prober.close()
    assert isinstance(outcomes[0], ProbeSetupError) and "has no query" in str(outcomes[0])
    assert outcomes[1] is None
    assert len(answered) == 20 and all(r.success for r in answered)
    assert pacer.in_flight == 0


def test_bad_options_fail_in_the_parent() -> None:
    with pytest.raises(ProbeSetupError, match="at least one port"):
        TcpWorkerPool(workers=2, ports=())
    with pytest.raises(ProbeSetupError, match="workers must be at least 1"):
        TcpWorkerPool(workers=0)
    with pytest.raises(ProbeSetupError, match="no prober for method 'smtp'"):
        worker_pool("smtp")


async def test_closed_pool_refuses_work() -> None:
    prober = TcpWorkerPool(workers=1, ports=(80,))
    await prober.close()
    with pytest.raises(ProbeSetupError, match="closed"):
        await prober.probe_many([Target("127.0.0.1")], _pacer(), lambda r: None)


@needs_root
def test_icmp_pool_in_a_namespace_with_forged_replies_counted() -> None:
    """Two ICMP workers in a namespace: AnyIP answers 10.9.0.0/16, 10.9.1.0/24 is dropped,
    10.8.0.0/24 has no route. Forged echo replies carrying each worker's echo id but a seq it
    never sent are counted as unmatched by that worker and change no result."""
    with Netns() as ns:
        ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
        ns.exec("ip", "route", "add", "local", "10.9.0.0/16", "dev", "lo")
        ns.exec("ip", "route", "add", "unreachable", "10.8.0.0/24")
        ns.exec(
            "nft",
            "add table ip t ; add chain ip t in { type filter hook input priority 0 ; } "
            "; add rule ip t in ip daddr 10.9.1.0/24 icmp type echo-request drop",
        )

        async def scenario() -> tuple[list[ProbeResult], dict[str, int], int, list[str], list[int]]:
            prober = IcmpWorkerPool(workers=2, timeout_s=0.6)
            await prober.start()
            modes = [info["mode"] for info in prober.worker_info]
            # Each worker's prober socket (names, IPv6) and its batch engine's sockets.
            ids = [int(i) for info in prober.worker_info
                   for i in [info["echo_id"], *info.get("batch_echo_ids", [])]]  # fmt: skip
            targets = [Target(f"10.9.0.{i}") for i in range(1, 201)]
            targets += [Target(f"10.9.1.{i}") for i in range(1, 51)]
            targets += [Target(f"10.8.0.{i}") for i in range(1, 11)]
            pacer = _pacer(max_in_flight=128)
            results: list[ProbeResult] = []
            task = asyncio.create_task(prober.probe_many(targets, pacer, results.append))
            await asyncio.sleep(0.1)  # the dropped ones are in flight now
            forger = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            for echo_id in ids:
                for seq in range(3):
                    forged = build_echo(ICMP4_ECHO_REPLY, echo_id, 0xFFFF - seq, b"forged!!")
                    forger.sendto(forged, ("10.9.1.7", 0))
            forger.close()
            try:
                await task
            finally:
                await prober.close()  # the workers' final counters come with their goodbye
            return results, prober.stats, pacer.in_flight, modes, ids

        results, stats, in_flight, modes, ids = run_in_netns(ns, scenario)
    assert modes == ["datagram", "datagram"]
    assert len(results) == 260 and in_flight == 0
    by_net: dict[str, set[tuple[bool, Failure | None]]] = {}
    for result in results:
        by_net.setdefault(result.target.address.rsplit(".", 1)[0], set()).add(
            (result.success, result.failure)
        )
    assert by_net == {
        "10.9.0": {(True, None)},
        "10.9.1": {(False, Failure.TIMEOUT)},
        "10.8.0": {(False, Failure.HOST_UNREACHABLE)},
    }
    # Answers and timeouts come back as packed records, send errors (more details) as rows.
    answered = [r for r in results if r.success]
    assert all(r.reachable and r.rtt_s is not None and 0 < r.rtt_s < 0.6 for r in answered)
    assert {r.details["rtt_source"] for r in answered} <= {"kernel", "loop"}
    assert all(len(r.details) == 1 for r in answered)
    timed_out = [r for r in results if r.failure is Failure.TIMEOUT]
    assert all(r.rtt_s is None and r.details == {} and not r.reachable for r in timed_out)
    unreachable = [r for r in results if r.failure is Failure.HOST_UNREACHABLE]
    assert [r.details for r in unreachable] == [{"errno": "EHOSTUNREACH"}] * 10
    assert all(abs(r.started_at - time.time()) < 60 for r in results)
    assert stats["sent"] == 250 and stats["echo_replies"] == 200
    assert stats["unmatched"] == 3 * len(ids)  # three forged replies per echo id, counted once


async def test_a_sink_failing_before_a_chunk_went_out_gives_its_slots_back() -> None:
    """The sink fails on a blocked target (handled in the parent) while the chunk being built
    holds targets no worker has seen yet."""

    def sink(result: ProbeResult) -> None:
        if result.failure is Failure.BLOCKED_BY_POLICY:
            raise RuntimeError("sink broke")

    pacer = _pacer(Blocklist.from_cidrs(["127.0.0.2/32"]))
    async with raw_tcp_server(_accept_and_wait) as port:
        targets = [Target("127.0.0.1")] * 10 + [Target("127.0.0.2")] + [Target("127.0.0.1")] * 10
        prober = TcpWorkerPool(workers=1, ports=(port,))
        try:
            with pytest.raises(RuntimeError, match="sink broke"):
                await prober.probe_many(targets, pacer, sink)
        finally:
            await prober.close()
    assert pacer.in_flight == 0


async def test_a_call_stopped_before_its_first_chunk_leaves_nothing_behind() -> None:
    """The first target is blocked and the sink fails on it: the chunk being built is empty."""

    def sink(result: ProbeResult) -> None:
        raise RuntimeError("sink broke")

    pacer = _pacer(Blocklist.from_cidrs(["127.0.0.2/32"]))
    prober = TcpWorkerPool(workers=1, ports=(80,))
    try:
        with pytest.raises(RuntimeError, match="sink broke"):
            await prober.probe_many([Target("127.0.0.2")] + [Target("127.0.0.1")] * 5, pacer, sink)
        assert not prober._chunks and pacer.in_flight == 0 and pacer.admitted == 0
    finally:
        await prober.close()


async def test_a_pacer_shared_with_a_busy_prober_does_not_stall_the_pool() -> None:
    """Another prober holds most slots of the shared pacer, so our results alone can never
    free a batch of them: the feeder must go on one slot at a time, not wait forever."""
    pacer = _pacer(max_in_flight=64)
    for _ in range(60):
        await pacer.acquire_slot()
    results: list[ProbeResult] = []
    async with raw_tcp_server(_accept_and_wait) as port:
        prober = TcpWorkerPool(workers=2, ports=(port,))
        try:
            await asyncio.wait_for(
                prober.probe_many([Target("127.0.0.1")] * 40, pacer, results.append), 20
            )
        finally:
            await prober.close()
    assert len(results) == 40 and all(r.success for r in results)
    assert pacer.in_flight == 60  # only the other prober's slots are still taken
