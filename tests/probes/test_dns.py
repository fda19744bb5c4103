"""DnsProber against a real DNS responder (UDP and TCP) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import queue
import threading
import time
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.base import DnsQuery, Failure, ProbeResult, ProbeSetupError, Target
from probes.dns import DnsProber, check_query, judge_response, normalize_answer
from probes.pacing import Blocklist, Pacer, PacingPolicy
from tests.probes.blocked_loop import BLOCK_S, HONEST_BOUND_S, then_block
from tests.probes.servers import DnsBehaviour, DnsResponder, free_port

RIGHT = "192.0.2.10"
WRONG = "10.10.34.35"  # what a censor's resolver might hand out instead

ZONE = {
    "ok.test": DnsBehaviour(answers=[RIGHT]),
    "two.test": DnsBehaviour(answers=[RIGHT, "192.0.2.11"], ttl=60),
    "spoofed.test": DnsBehaviour(answers=[WRONG]),
    "nxdomain.test": DnsBehaviour("rcode", rcode=dns.rcode.NXDOMAIN),
    "servfail.test": DnsBehaviour("rcode", rcode=dns.rcode.SERVFAIL),
    "refused.test": DnsBehaviour("rcode", rcode=dns.rcode.REFUSED),
    "formerr.test": DnsBehaviour("rcode", rcode=dns.rcode.FORMERR),
    "empty.test": DnsBehaviour(answers=[]),
    "garbage.test": DnsBehaviour("garbage"),
    "wrong-id.test": DnsBehaviour("wrong_id", answers=[RIGHT]),
    "silent.test": DnsBehaviour("silent"),
    "truncated.test": DnsBehaviour("truncate", answers=[RIGHT]),
}


async def _probe(
    targets: list[Target], timeout_s: float = 2.0, pacer: Pacer | None = None
) -> list[ProbeResult]:
    prober = DnsProber(timeout_s=timeout_s)
    results: list[ProbeResult] = []
    await prober.probe_many(
        targets, pacer or Pacer(PacingPolicy(rate_pps=None, per_block_pps=None)), results.append
    )
    await prober.close()
    return results


# (scenario name, expected answers, reachable, success, failure)
SCENARIOS = [
    ("ok.test", {RIGHT}, True, True, None),
    ("ok.test", set(), True, True, None),
    ("two.test", {RIGHT, "192.0.2.11"}, True, True, None),
    ("two.test", {RIGHT}, True, False, Failure.DNS_WRONG_ANSWER),
    ("spoofed.test", {RIGHT}, True, False, Failure.DNS_WRONG_ANSWER),
    ("nxdomain.test", set(), True, False, Failure.DNS_NXDOMAIN),
    ("servfail.test", set(), True, False, Failure.DNS_SERVFAIL),
    ("refused.test", set(), True, False, Failure.DNS_REFUSED),
    ("formerr.test", set(), True, False, Failure.DNS_BAD_RESPONSE),
    ("empty.test", set(), True, False, Failure.DNS_NO_ANSWER),
    ("garbage.test", set(), True, False, Failure.DNS_BAD_RESPONSE),
    ("wrong-id.test", set(), True, False, Failure.DNS_BAD_RESPONSE),
    ("silent.test", set(), False, False, Failure.TIMEOUT),
    ("truncated.test", {RIGHT}, True, True, None),
]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize(("name", "expected", "reachable", "success", "failure"), SCENARIOS)
async def test_dns_scenarios(
    transport: str,
    name: str,
    expected: set[str],
    reachable: bool,
    success: bool,
    failure: Failure | None,
) -> None:
    async with DnsResponder(ZONE) as server:
        query = DnsQuery(name, "A", frozenset(expected), transport)
        [result] = await _probe([Target("127.0.0.1", server.port, query=query)], timeout_s=0.4)
    assert (result.reachable, result.success, result.failure) == (reachable, success, failure)
    assert (result.rtt_s is not None) == reachable
    if success:
        assert RIGHT in result.details["answers"] and result.details["rcode"] == "NOERROR"
        assert result.details["ttl"] in (60, 300)


async def test_details_carry_rcode_answers_ttl_and_the_unexpected_answers() -> None:
    async with DnsResponder(ZONE) as server:
        query = DnsQuery("spoofed.test", "A", frozenset({RIGHT}))
        [result] = await _probe([Target("127.0.0.1", server.port, query=query)])
    assert result.details == {
        "transport": "udp",
        "rtt_source": "kernel",
        "rcode": "NOERROR",
        "answers": [WRONG],
        "ttl": 300,
        "unexpected": [WRONG],
    }


async def test_truncated_udp_answer_is_asked_again_over_tcp() -> None:
    async with DnsResponder(ZONE) as server:
        query = DnsQuery("truncated.test", "A", frozenset({RIGHT}), "udp")
        [result] = await _probe([Target("127.0.0.1", server.port, query=query)])
        assert server.queries == 2
    assert result.success and result.details["truncated"] is True
    assert result.details["transport"] == "tcp"


async def test_ipv6_server_and_aaaa_answers() -> None:
    zone = {"v6.test": DnsBehaviour(answers=["2001:db8::1"])}
    async with DnsResponder(zone, host="::1") as server:
        query = DnsQuery("v6.test", "AAAA", frozenset({"2001:0db8:0:0::1"}))
        [result] = await _probe([Target("::1", server.port, query=query)])
    assert result.success and result.details["answers"] == ["2001:db8::1"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_closed_port_is_refused_and_proves_the_host_is_up(transport: str) -> None:
    query = DnsQuery("ok.test", "A", transport=transport)
    [result] = await _probe([Target("127.0.0.1", free_port(), query=query)], timeout_s=1)
    assert result.failure is Failure.CONNECTION_REFUSED and result.reachable


async def test_blocklisted_server_is_not_asked() -> None:
    async with DnsResponder(ZONE) as server:
        pacer = Pacer(PacingPolicy(rate_pps=None), Blocklist.from_cidrs(["127.0.0.1/32"]))
        query = DnsQuery("ok.test")
        [result] = await _probe([Target("127.0.0.1", server.port, query=query)], pacer=pacer)
        assert server.queries == 0
    assert result.failure is Failure.BLOCKED_BY_POLICY


async def test_a_server_named_by_a_host_name_that_resolves_into_the_blocklist_is_not_asked(
) -> None:
    async with DnsResponder(ZONE) as server:
        loopback = Blocklist.from_cidrs(["127.0.0.1/32", "::1/128"])  # whichever it resolves to
        pacer = Pacer(PacingPolicy(rate_pps=None), loopback)
        query = DnsQuery("ok.test")
        [result] = await _probe([Target("localhost", server.port, query=query)], pacer=pacer)
        assert server.queries == 0
    assert result.failure is Failure.BLOCKED_BY_POLICY


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (DnsQuery("ok.test", "NOPE"), "record type"),
        (DnsQuery("ok.test", transport="quic"), "transport"),
        (DnsQuery("ok.test", "A", frozenset({"not-an-ip"})), "expected answer"),
        (DnsQuery("a" * 70 + ".test"), "not valid"),
    ],
)
def test_check_query_names_the_problem(query: DnsQuery, message: str) -> None:
    with pytest.raises(ProbeSetupError, match=message):
        check_query(query)


async def test_a_target_without_a_query_is_the_callers_error() -> None:
    with pytest.raises(ProbeSetupError, match="has no query"):  # itself, not in a group
        await _probe([Target("127.0.0.1", free_port())])


def test_bad_timeout_is_a_setup_error() -> None:
    with pytest.raises(ProbeSetupError, match="positive"):
        DnsProber(timeout_s=0)


# --- hypothesis: the answer parser and the judge ---------------------------------------------


@given(st.ip_addresses(v=4))
def test_normalize_a_is_the_canonical_address(address: ipaddress.IPv4Address) -> None:
    assert normalize_answer("A", f" {address} ") == str(address)


@given(st.ip_addresses(v=6))
def test_normalize_aaaa_accepts_every_spelling(address: ipaddress.IPv6Address) -> None:
    assert normalize_answer("aaaa", address.exploded) == normalize_answer("AAAA", str(address))


@given(st.from_regex(r"[A-Za-z0-9-]{1,20}(\.[A-Za-z0-9-]{1,20}){0,3}\.?", fullmatch=True))
def test_normalize_names_ignores_case_and_the_final_dot(name: str) -> None:
    base = name.rstrip(".")
    assert normalize_answer("CNAME", base.upper()) == normalize_answer("cname", base.lower() + ".")


@given(st.ip_addresses(v=6))
def test_an_ipv6_answer_is_not_an_a_record(address: ipaddress.IPv6Address) -> None:
    with pytest.raises(ValueError):
        normalize_answer("A", str(address))


@given(
    answers=st.lists(st.ip_addresses(v=4).map(str), max_size=4, unique=True),
    expected=st.sets(st.ip_addresses(v=4).map(str), max_size=3),
)
def test_judge_flags_exactly_the_answers_outside_expected(
    answers: list[str], expected: set[str]
) -> None:
    query = DnsQuery("judge.test", "A", frozenset(expected))
    response = dns.message.make_response(dns.message.make_query("judge.test", "A"))
    if answers:
        response.answer.append(dns.rrset.from_text_list("judge.test.", 30, "IN", "A", answers))
    failure, details = judge_response(query, response)
    outside = sorted(set(answers) - expected) if expected else []
    if not answers:
        assert failure is Failure.DNS_NO_ANSWER
    elif outside:
        assert failure is Failure.DNS_WRONG_ANSWER and details["unexpected"] == outside
    else:
        assert failure is None and details["ttl"] == 30


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mask=st.binary(min_size=1, max_size=40),
    cut=st.none() | st.integers(0, 60),
    transport=st.sampled_from(["udp", "tcp"]),
)
def test_mangled_responses_never_crash_the_prober(
    mask: bytes, cut: int | None, transport: str
) -> None:
    zone = {"fuzz.test": DnsBehaviour("mangled", answers=[RIGHT], mask=mask, cut=cut)}

    async def run() -> ProbeResult:
        async with DnsResponder(zone) as server:
            query = DnsQuery("fuzz.test", "A", frozenset({RIGHT}), transport)
            [result] = await _probe([Target("127.0.0.1", server.port, query=query)], 0.3)
        return result

    result = asyncio.run(run())
    # Whatever came back is classified: a clean answer, a DNS failure, or silence.
    assert (
        result.failure is None
        or result.failure.value.startswith("dns_")
        or (result.failure in (Failure.TIMEOUT, Failure.CONNECTION_RESET))
    )
    assert result.success == (result.failure is None)


# --- RTT: the kernel's receive stamp for UDP, the loop's measure for TCP -------------------------

@contextlib.contextmanager
def responder_in_a_thread(zone: dict[str, DnsBehaviour]) -> Iterator[int]:
    """A DnsResponder on its own event loop in a thread: it answers while the prober's loop is
    blocked. Yields its port."""
    started: queue.Queue[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]] = queue.Queue()

    async def serve() -> None:
        stop = asyncio.Event()
        async with DnsResponder(zone) as server:
            started.put((asyncio.get_running_loop(), stop, server.port))
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    loop, stop, port = started.get(timeout=10)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


async def test_udp_rtt_is_the_kernels_not_a_blocked_loops() -> None:
    """Once the last query is out (the pool asks for the next target), the prober's event loop is
    blocked for BLOCK_S, as a busy daemon's would be; the answers arrive meanwhile."""
    count = 20

    got: list[tuple[ProbeResult, float]] = []
    with responder_in_a_thread(ZONE) as port:
        query = DnsQuery("ok.test", "A", frozenset({RIGHT}))
        targets = [Target("127.0.0.1", port, query=query)] * count
        pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None))
        await DnsProber(timeout_s=2.0).probe_many(
            then_block(targets), pacer, lambda r: got.append((r, time.time()))
        )
    assert len(got) == count
    # The loop saw most answers only after the block (an answer that was already there when
    # the query's task first looked is read at once)...
    late = [result for result, handed_over in got if handed_over - result.started_at >= BLOCK_S]
    assert len(late) >= count // 2
    for result, _handed_over in got:  # ...but no RTT contains it
        assert result.success, result
        assert result.rtt_s is not None and 0 < result.rtt_s < HONEST_BOUND_S, result
        assert result.details["rtt_source"] == "kernel"


async def test_tcp_and_refused_rtts_are_the_loops_and_say_so() -> None:
    async with DnsResponder(ZONE) as server:
        query = DnsQuery("ok.test", "A", frozenset({RIGHT}), "tcp")
        [over_tcp] = await _probe([Target("127.0.0.1", server.port, query=query)])
    [refused] = await _probe([Target("127.0.0.1", free_port(), query=DnsQuery("ok.test", "A"))])
    assert over_tcp.success and over_tcp.details["rtt_source"] == "loop"
    assert refused.failure is Failure.CONNECTION_REFUSED
    assert refused.rtt_s is not None and refused.details["rtt_source"] == "loop"
