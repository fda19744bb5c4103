"""TcpProber against real listeners on loopback and in namespaces the tests create."""

from __future__ import annotations

import asyncio
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.base import Failure, ProbeResult, ProbeSetupError, Target
from probes.oserrors import failure_from_oserror
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.tcp import TcpProber
from tests.netns import Netns, needs_root, run_in_netns
from tests.probes.servers import free_port, raw_tcp_server, reset_after_request


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
