"""Rounds against real probers inside a network namespace the test makes.

The namespace answers for 10.80.0.0/22 and 10.80.4.0/24 by AnyIP (`ip route add local ... dev
lo`); nft drops what a scenario says is down. No packet leaves the namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web

from monitor.asn import load_asn_table
from monitor.config import load_config
from monitor.hitlist import Hitlist
from monitor.round_driver import ConfiguredRoundDriver
from monitor.rounds import RoundOutcome, RoundSettings, TargetCount, percentile, run_round
from monitor.targets import Endpoint, Universe, build_country, parse_block
from probes.base import Prober, Target
from probes.icmp import IcmpProber
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.tcp import TcpProber
from tests.netns import Netns, needs_root, run_in_netns
from tests.probes.servers import DnsBehaviour, DnsResponder, http_app

FIXTURES = Path(__file__).parent.parent / "fixtures"
NOW = datetime(2022, 1, 5, 10, 30, tzinfo=UTC)
# Only the lab range may be probed here: anything else is refused before a packet is sent.
LAB = ipaddress.IPv4Network("10.80.0.0/21")
CONTROL_OK = ipaddress.IPv4Network("127.0.0.1/32")


def lab_pacer() -> Pacer:
    """A test blocklist: everything but the lab range and 127.0.0.1 (plus 10.80.5.0/24)."""
    everything = ipaddress.IPv4Network("0.0.0.0/0")
    blocked = [
        piece
        for outside in everything.address_exclude(LAB)
        for piece in _minus(outside, CONTROL_OK)
    ]
    policy = PacingPolicy(rate_pps=20000, max_in_flight=256, per_block_pps=None)
    v6: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [ipaddress.IPv6Network("::/0")]
    return Pacer(policy, Blocklist([*blocked, ipaddress.IPv4Network("10.80.5.0/24"), *v6]))


def _minus(
    net: ipaddress.IPv4Network, hole: ipaddress.IPv4Network
) -> Iterator[ipaddress.IPv4Network]:
    if net.overlaps(hole):
        yield from net.address_exclude(hole)
    else:
        yield net


@pytest.fixture
def lab() -> Iterator[Netns]:
    with Netns("smr") as ns:
        ns.exec("ip", "route", "add", "local", "10.80.0.0/22", "dev", "lo")
        ns.exec("ip", "route", "add", "local", "10.80.4.0/24", "dev", "lo")
        ns.exec("nft", "add table inet lab")
        # Dropped on input: the probes leave, no answer ever comes (a timeout, as in the wild).
        ns.exec("nft", "add chain inet lab in { type filter hook input priority 0 ; }")
        # Block 10.80.3.0/24 is down; of 10.80.1.0/24 only the preferred address is lost.
        ns.exec("nft", "add rule inet lab in ip daddr 10.80.3.0/24 drop")
        ns.exec("nft", "add rule inet lab in ip daddr 10.80.1.1 drop")
        yield ns


def lab_universe() -> Universe:
    table = load_asn_table(FIXTURES / "asn_lab.ip2asn.tsv")
    endpoints = [
        Endpoint("KZ", "tcp", Target("10.80.0.9", port=9)),  # refused: the host is up
        Endpoint("KZ", "tcp", Target("10.80.3.9", port=80)),  # dropped: down
    ]
    endpoints = [Endpoint(e.country, e.method, e.target, table.lookup_str(e.target.address))
                 for e in endpoints]
    country = build_country(
        "KZ",
        [LAB],
        blocklist=Blocklist.from_cidrs(["10.80.5.0/24"]),
        asn_table=table,
        endpoints=endpoints,
        methods=("icmp", "tcp"),
    )
    control = (
        Endpoint("ZZ", "icmp", Target("127.0.0.1")),
        Endpoint("ZZ", "icmp", Target("10.80.3.1")),
    )
    return Universe((country,), control, min_control_up_fraction=0.5)


def seeded_hitlist() -> Hitlist:
    hitlist = Hitlist()
    for block in ("10.80.0.0/24", "10.80.1.0/24", "10.80.2.0/24", "10.80.3.0/24"):
        for octet in (1, 254):
            hitlist.record(parse_block(block), octet, answered=True)
    return hitlist


def value(outcome: RoundOutcome, scope: str, entity: str, signal: str) -> float:
    found = [p.value for p in outcome.points
             if p.scope == scope and p.entity == entity and p.signal == signal]
    assert len(found) == 1, (scope, entity, signal, found)
    return found[0]


async def two_rounds(hitlist: Hitlist) -> tuple[RoundOutcome, RoundOutcome]:
    probers: dict[str, Prober] = {"icmp": IcmpProber(timeout_s=0.5),
                                  "tcp": TcpProber(ports=(80,), timeout_s=0.5)}
    pacer = lab_pacer()
    settings = RoundSettings(reprobes=2, discovery_per_round=2, discovery_budget=4)
    universe = lab_universe()
    try:
        first = await run_round(universe, probers, pacer, NOW, hitlists={"KZ": hitlist},
                                vantage="lab", settings=settings)
        second = await run_round(universe, probers, pacer, NOW, hitlists={"KZ": hitlist},
                                 vantage="lab", settings=settings)
    finally:
        for prober in probers.values():
            await prober.close()
    return first, second


@needs_root
def test_round_says_exactly_which_blocks_are_up(lab: Netns) -> None:
    hitlist = seeded_hitlist()
    first, second = run_in_netns(lab, lambda: two_rounds(hitlist))

    # Known blocks 0..3: block 3 is dropped; block 1 lost its .1 but answered on .254.
    assert value(first, "country", "KZ", "icmp_blocks_total") == 4
    assert value(first, "country", "KZ", "icmp_blocks_up") == 3
    assert value(first, "asn", "9198", "icmp_blocks_up") == 2
    assert value(first, "asn", "9198", "icmp_blocks_total") == 2
    assert value(first, "asn", "29355", "icmp_blocks_up") == 1
    assert value(first, "asn", "29355", "icmp_blocks_total") == 2
    assert hitlist.responsive(parse_block("10.80.1.0")) == [254, 1]  # .254 is preferred now
    # Loss over the blocks that were up: block 1 needed 2 probes, blocks 0 and 2 one each.
    assert value(first, "country", "KZ", "icmp_loss") == 0.25
    assert value(first, "asn", "9198", "icmp_loss") == pytest.approx(1 / 3)
    assert value(first, "asn", "29355", "icmp_loss") == 0.0
    assert value(second, "country", "KZ", "icmp_loss") == 0.0  # .254 goes first now

    # Block 4 answered discovery in round 1: counted (and up) from round 2 on, unattributed.
    assert hitlist.responsive(parse_block("10.80.4.0")) == [1, 254]
    assert value(second, "country", "KZ", "icmp_blocks_total") == 5
    assert value(second, "country", "KZ", "icmp_blocks_up") == 4
    assert TargetCount("KZ", None, "icmp", 1, 1) in second.counts
    # Blocks 6 and 7 never answered: not counted, 2 candidates tried per round each, then the
    # budget of 4 is spent. Block 5 is blocklisted: not even in the universe.
    for silent in ("10.80.6.0", "10.80.7.0"):
        assert hitlist.tried(parse_block(silent)) == 4
        assert not hitlist.is_known(parse_block(silent))
    assert hitlist.tried(parse_block("10.80.5.0")) == 0

    # Named endpoints: a refused port proves the host is up; the dropped one is down.
    assert value(first, "country", "KZ", "tcp_total") == 2
    assert value(first, "country", "KZ", "tcp_up") == 1
    # Control: 127.0.0.1 answers, 10.80.3.1 does not: half, which is enough.
    assert (first.control_total, first.control_up, first.vantage_up) == (2, 1, True)
    assert value(first, "vantage", "lab", "vantage_up") == 0.5
    assert all(p.time == NOW for p in first.points)
    assert value(first, "country", "KZ", "rtt_p50_seconds") > 0
    # Round 1 ICMP: 3 known blocks + 2 discovery answers + 127.0.0.1 answered; 10.80.1.1,
    # block 3 (3 tries) and the control 10.80.3.1 (3 tries) were dropped: timeouts; blocks 6
    # and 7 have no route. TCP: the refused host once, the dropped one 3 times.
    assert first.probes == {
        ("icmp", "success"): 6, ("icmp", "timeout"): 7, ("icmp", "network_unreachable"): 4,
        ("tcp", "connection_refused"): 1, ("tcp", "timeout"): 3,
    }
    assert first.rtts[("KZ", "icmp")]


@needs_root
def test_without_reprobes_a_single_lost_packet_counts_as_down(lab: Netns) -> None:
    async def one_round() -> RoundOutcome:
        prober = IcmpProber(timeout_s=0.5)
        try:
            return await run_round(lab_universe(), {"icmp": prober}, lab_pacer(), NOW,
                                   hitlists={"KZ": seeded_hitlist()},
                                   settings=RoundSettings(reprobes=0, discovery_per_round=0))
        finally:
            await prober.close()

    outcome = run_in_netns(lab, one_round)
    assert value(outcome, "country", "KZ", "icmp_blocks_up") == 2  # block 1 and block 3 down
    assert value(outcome, "asn", "9198", "icmp_blocks_up") == 1


@needs_root
def test_cancelling_a_round_stops_it_promptly(lab: Netns) -> None:
    async def cancelled_round() -> tuple[bool, float]:
        prober = IcmpProber(timeout_s=30.0)  # would take 30 s per stage if not cancelled
        loop = asyncio.get_running_loop()
        hitlist = Hitlist()
        hitlist.record(parse_block("10.80.3.0"), 1, answered=True)
        task = asyncio.ensure_future(run_round(
            lab_universe(), {"icmp": prober}, lab_pacer(), NOW, hitlists={"KZ": hitlist}))
        await asyncio.sleep(0.3)
        started = loop.time()
        task.cancel()
        try:
            await asyncio.wait_for(task, 10)
            cancelled = False
        except asyncio.CancelledError:
            cancelled = True
        finally:
            await prober.close()
        return cancelled, loop.time() - started

    cancelled, took = run_in_netns(lab, cancelled_round)
    assert cancelled
    assert took < 5.0  # not the 30 s the probe timeout would have taken


async def test_missing_probers_and_empty_hitlists_give_an_honest_empty_round() -> None:
    # No prober at all: nothing is sent (no network), nothing is claimed.
    outcome = await run_round(lab_universe(), {}, lab_pacer(), NOW, hitlists={})
    assert outcome.points == []
    assert outcome.counts == []
    assert (outcome.control_total, outcome.vantage_up) == (0, True)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 11)], 90) == 9.0
    assert percentile([5.0], 90) == 5.0


@needs_root
def test_configured_driver_probes_blocks_and_services_and_saves_the_hitlist(
    lab: Netns, tmp_path: Path
) -> None:
    """The daemon's driver, from a config file: ICMP blocks, HTTP URLs, DNS resolvers, control."""
    (tmp_path / "kz.txt").write_text("10.80.0.0/22\n")
    (tmp_path / "blocklist.txt").write_text("10.80.5.0/24\n")
    (tmp_path / "asn.tsv").write_text((FIXTURES / "asn_lab.ip2asn.tsv").read_text())

    routes = web.RouteTableDef()

    @routes.get("/ok")
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @routes.get("/blocked")
    async def blocked(request: web.Request) -> web.Response:
        return web.Response(status=403, text="blocked by order")

    async def scenario() -> tuple[RoundOutcome, RoundOutcome, int]:
        zone = {"gov.kz": DnsBehaviour(answers=["10.80.0.80"]),
                "tampered.kz": DnsBehaviour(answers=["10.10.34.34"])}
        async with http_app(routes) as http_port, DnsResponder(zone) as dns:
            config_path = tmp_path / "lab.yaml"
            config_path.write_text(
                "countries:\n"
                "  KZ:\n"
                "    prefixes: kz.txt\n"
                "    endpoints:\n"
                f"      urls: ['http://127.0.0.1:{http_port}/ok',\n"
                f"             'http://127.0.0.1:{http_port}/blocked']\n"
                "      resolvers:\n"
                f"        - {{server: 127.0.0.1, port: {dns.port}, name: gov.kz,\n"
                "           expected: [10.80.0.80]}\n"
                f"        - {{server: 127.0.0.1, port: {dns.port}, name: tampered.kz,\n"
                "           expected: [10.80.0.80]}\n"
                f"control: {{hosts: ['127.0.0.1:{http_port}'], method: tcp}}\n"
                "asn_file: asn.tsv\n"
                "hitlist_dir: hitlists\n"
                "vantage: {name: lab}\n"
                "pacing: {blocklist_file: blocklist.txt, rate_pps: 5000, per_block_pps: null}\n"
                "probing: {timeout_s: 0.5, reprobes: 1}\n"
            )
            driver = ConfiguredRoundDriver(load_config(config_path))
            try:
                first = await driver.run(NOW)
                second = await driver.run(NOW)
                # A reload builds a new driver from the same files: it must start from what
                # this one learnt, not from the last periodic save.
                driver.checkpoint()
                successor = ConfiguredRoundDriver(load_config(config_path))
                successor_known = successor.hitlists["KZ"].known_blocks()
                await successor.close()
            finally:
                await driver.close()
        return first, second, successor_known

    first, second, successor_known = run_in_netns(lab, scenario)
    assert successor_known == 3
    # Round 1 discovers (nothing known yet: an honest 0 of 0); round 2 counts blocks 0..2 up
    # and block 3 (dropped) was never learnt, so it is not counted at all.
    assert value(first, "country", "KZ", "icmp_blocks_total") == 0
    assert value(second, "country", "KZ", "icmp_blocks_total") == 3
    assert value(second, "country", "KZ", "icmp_blocks_up") == 3
    assert value(second, "asn", "9198", "icmp_blocks_up") == 2
    # A 403 is not service; a wrong DNS answer (tampering) is not service either.
    assert value(first, "country", "KZ", "http_total") == 2
    assert value(first, "country", "KZ", "http_up") == 1
    assert value(first, "country", "KZ", "dns_total") == 2
    assert value(first, "country", "KZ", "dns_up") == 1
    assert value(first, "country", "KZ", "rtt_http_p50_seconds") > 0
    assert value(first, "vantage", "lab", "vantage_up") == 1.0
    saved = Hitlist.load(tmp_path / "hitlists" / "KZ.csv")
    assert saved.known_blocks() == 3
    assert saved.tried(parse_block("10.80.3.0")) == 4  # 2 per round, no answer


@needs_root
def test_a_failing_prober_costs_only_its_own_targets(lab: Netns) -> None:
    async def scenario() -> RoundOutcome:
        icmp = IcmpProber(timeout_s=0.5)
        await icmp.close()  # a closed prober refuses to probe: a real setup error
        tcp = TcpProber(ports=(80,), timeout_s=0.5)
        return await run_round(lab_universe(), {"icmp": icmp, "tcp": tcp}, lab_pacer(), NOW,
                               hitlists={"KZ": seeded_hitlist()},
                               settings=RoundSettings(reprobes=0))

    outcome = run_in_netns(lab, scenario)
    signals = {p.signal for p in outcome.points}
    assert "icmp_blocks_total" not in signals and "icmp_blocks_up" not in signals
    assert value(outcome, "country", "KZ", "tcp_up") == 1  # the TCP part still counted
    assert outcome.control_total == 0 and outcome.vantage_up  # control is ICMP: no verdict
