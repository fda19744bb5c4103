"""HttpProber against real aiohttp servers (plain and TLS) and raw sockets on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.base import Failure, ProbeResult, ProbeSetupError, Target
from probes.http import HttpProber, default_user_agent, phase_timings
from probes.pacing import Blocklist, Pacer, PacingPolicy
from tests.netns import Netns, needs_root, run_in_netns
from tests.probes.blocked_loop import BLOCK_S, HONEST_BOUND_S, then_block
from tests.probes.servers import (
    free_port,
    http_app,
    raw_tcp_server,
    reset_after_request,
    self_signed_context,
)

CONTACT = "https://monitor.example/contact"


def _routes(seen_agents: list[str] | None = None) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/ok")
    async def ok(request: web.Request) -> web.Response:
        if seen_agents is not None:
            seen_agents.append(request.headers.get("User-Agent", ""))
        return web.Response(text="hello")

    @routes.get("/status/{code}")
    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="s")

    @routes.get("/redirect")
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query.get("to", "/ok"))

    @routes.get("/loop")
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    @routes.get("/big")
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 300_000)

    @routes.get("/big-chunked")
    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"y" * 10_000)
        await response.write_eof()
        return response

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    return routes


async def _probe(
    prober: HttpProber, urls: list[str], pacer: Pacer | None = None
) -> list[ProbeResult]:
    pacer = pacer or Pacer(PacingPolicy(rate_pps=None, per_block_pps=None))
    results: list[ProbeResult] = []
    targets = [Target("127.0.0.1", url=url) for url in urls]
    try:
        await prober.probe_many(targets, pacer, results.append)
    finally:
        await prober.close()
    order = {t.url: i for i, t in enumerate(targets)}
    return sorted(results, key=lambda r: order[r.target.url])


# (scenario, path, prober options, reachable, success, failure, detail key that must be present)
SCENARIOS = [
    ("ok", "/ok", {}, True, True, None, "ttfb_s"),
    ("server_error", "/status/500", {}, True, False, Failure.HTTP_STATUS, "status"),
    ("not_found", "/status/404", {}, True, False, Failure.HTTP_STATUS, "status"),
    ("404_expected", "/status/404", {"expected_status": {404}}, True, True, None, "status"),
    ("redirect_not_followed", "/redirect", {}, True, True, None, "location"),
    ("redirect_followed", "/redirect", {"follow_redirects": True}, True, True, None, "redirects"),
    ("redirect_loop", "/loop", {"follow_redirects": True}, True, True, None, "redirects"),
    ("huge_body", "/big", {}, True, False, Failure.TOO_LARGE, "body_bytes"),
    ("huge_chunked", "/big-chunked", {}, True, False, Failure.TOO_LARGE, "body_bytes"),
    ("slow", "/slow", {"timeout_s": 0.3}, True, False, Failure.TIMEOUT, "total_s"),
]


@pytest.mark.parametrize(
    ("name", "path", "options", "reachable", "success", "failure", "key"), SCENARIOS
)
async def test_http_scenarios(
    name: str,
    path: str,
    options: dict[str, object],
    reachable: bool,
    success: bool,
    failure: Failure | None,
    key: str,
) -> None:
    async with http_app(_routes()) as port:
        prober = HttpProber(contact_url=CONTACT, **{"timeout_s": 3.0, **options})  # type: ignore[arg-type]
        [result] = await _probe(prober, [f"http://127.0.0.1:{port}{path}"])
    assert (result.reachable, result.success, result.failure) == (reachable, success, failure)
    assert key in result.details
    assert result.rtt_s is not None and result.rtt_s >= 0


async def test_redirect_details() -> None:
    async with http_app(_routes()) as port:
        base = f"http://127.0.0.1:{port}"
        not_followed, followed = [
            (
                await _probe(
                    HttpProber(contact_url=CONTACT, follow_redirects=f), [base + "/redirect"]
                )
            )[0]
            for f in (False, True)
        ]
        [looped] = await _probe(
            HttpProber(contact_url=CONTACT, follow_redirects=True, max_redirects=3),
            [base + "/loop"],
        )
    assert not_followed.details["status"] == 302 and not_followed.details["location"] == "/ok"
    assert followed.details["status"] == 200
    assert followed.details["redirects"] == [{"status": 302, "location": base + "/ok"}]
    assert followed.details["final_url"] == base + "/ok"
    # After max_redirects hops the last 302 is the answer (3xx is expected by default).
    assert looped.details["status"] == 302 and len(looped.details["redirects"]) == 3


async def test_redirect_to_blocklisted_address_is_not_followed() -> None:
    async with http_app(_routes(), host="127.0.0.1") as port:
        pacer = Pacer(
            PacingPolicy(rate_pps=None, per_block_pps=None), Blocklist.from_cidrs(["127.0.0.2/32"])
        )
        url = f"http://127.0.0.1:{port}/redirect?to=http://127.0.0.2:{port}/ok"
        [result] = await _probe(
            HttpProber(contact_url=CONTACT, follow_redirects=True), [url], pacer
        )
    assert result.failure is Failure.BLOCKED_BY_POLICY


async def test_url_host_in_the_blocklist_is_not_fetched_whatever_the_target_address() -> None:
    agents: list[str] = []
    async with http_app(_routes(agents)) as port:
        pacer = Pacer(PacingPolicy(rate_pps=None), Blocklist.from_cidrs(["127.0.0.1/32"]))
        prober = HttpProber(contact_url=CONTACT)
        results: list[ProbeResult] = []
        target = Target("192.0.2.1", url=f"http://127.0.0.1:{port}/ok")
        await prober.probe_many([target], pacer, results.append)
        await prober.close()
    assert [r.failure for r in results] == [Failure.BLOCKED_BY_POLICY]
    assert agents == []


async def test_user_agent_carries_the_contact_url() -> None:
    agents: list[str] = []
    async with http_app(_routes(agents)) as port:
        await _probe(HttpProber(contact_url=CONTACT), [f"http://127.0.0.1:{port}/ok"])
    assert agents == [default_user_agent(CONTACT)]
    assert agents[0].startswith("shutdown-monitor/") and f"(+{CONTACT})" in agents[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "contact_url"),
        ({"contact_url": "mailto:me@example.org"}, "http"),  # noqa: network (refused, unsent)
        ({"user_agent": "bot/1.0"}, "contact URL"),
        ({"contact_url": CONTACT, "timeout_s": -1}, "positive"),
        ({"user_agent": "bot (+https://a.example/)\r\nX-Forged: 1"}, "control characters"),
        ({"contact_url": CONTACT, "max_connections": 0}, "max_connections"),
    ],
)
def test_bad_options_are_setup_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ProbeSetupError, match=message):
        HttpProber(**kwargs)  # type: ignore[arg-type]


async def test_tls_self_signed_is_tls_error_unless_verification_is_off(tmp_path: Path) -> None:
    context = self_signed_context(tmp_path)
    async with http_app(_routes(), ssl_context=context) as port:
        url = f"https://127.0.0.1:{port}/ok"
        [strict] = await _probe(HttpProber(contact_url=CONTACT), [url])
        [lax] = await _probe(HttpProber(contact_url=CONTACT, verify_tls=False), [url])
    assert strict.failure is Failure.TLS_ERROR and strict.reachable and not strict.success
    assert "certificate" in strict.details["error"].lower()
    assert lax.success and lax.details["status"] == 200
    for phase in ("connect_s", "tls_s", "ttfb_s", "total_s"):
        assert lax.details[phase] >= 0, phase


async def test_plain_http_to_a_tls_port_is_a_bad_response(tmp_path: Path) -> None:
    async with http_app(_routes(), ssl_context=self_signed_context(tmp_path)) as port:
        [result] = await _probe(HttpProber(contact_url=CONTACT), [f"http://127.0.0.1:{port}/ok"])
    assert result.reachable and not result.success
    assert result.failure in (Failure.HTTP_BAD_RESPONSE, Failure.CONNECTION_RESET)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(100)
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\nthis is not HTTP\r\n\r\n")
    await writer.drain()
    writer.close()


async def _close_silently(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(100)
    writer.close()


RAW_SCENARIOS = [
    ("rst", reset_after_request, Failure.CONNECTION_RESET),
    ("garbage", _garbage, Failure.HTTP_BAD_RESPONSE),
    ("fin_without_response", _close_silently, Failure.CONNECTION_RESET),
]


@pytest.mark.parametrize(("name", "handler", "failure"), RAW_SCENARIOS)
async def test_raw_socket_scenarios(name: str, handler: object, failure: Failure) -> None:
    async with raw_tcp_server(handler) as port:  # type: ignore[arg-type]
        [result] = await _probe(HttpProber(contact_url=CONTACT), [f"http://127.0.0.1:{port}/"])
    assert result.failure is failure and result.reachable and not result.success


async def test_tls_handshake_that_never_finishes_is_a_timeout_of_a_reachable_host() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the ClientHello, never answers
        writer.close()

    async with raw_tcp_server(hold) as port:
        prober = HttpProber(contact_url=CONTACT, timeout_s=0.3)
        [result] = await _probe(prober, [f"https://127.0.0.1:{port}/"])
    assert result.failure is Failure.TIMEOUT and result.reachable
    assert result.rtt_s is not None and result.rtt_s < 0.3


async def test_refused_and_unresolvable() -> None:
    urls = [f"http://127.0.0.1:{free_port()}/", "http://no-such-host.invalid/"]
    refused, unresolved = await _probe(HttpProber(contact_url=CONTACT, timeout_s=2), urls)
    assert refused.failure is Failure.CONNECTION_REFUSED and refused.reachable
    assert unresolved.failure is Failure.RESOLVE_ERROR and not unresolved.reachable


async def test_max_connections_caps_the_connections_of_one_prober() -> None:
    active, peak = 0, 0
    routes = web.RouteTableDef()

    @routes.get("/hold")
    async def hold(request: web.Request) -> web.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return web.Response(text="held")

    async with http_app(routes) as port:
        prober = HttpProber(contact_url=CONTACT, max_connections=4)
        urls = [f"http://127.0.0.1:{port}/hold?i={i}" for i in range(40)]
        results = await _probe(prober, urls)  # the pacer lets 512 in flight
    assert len(results) == 40 and all(r.success for r in results)
    assert peak == 4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=st.integers(200, 599), expected=st.sets(st.integers(200, 599), max_size=5))
def test_status_judgement_matches_the_expected_set(status: int, expected: set[int]) -> None:
    async def run() -> ProbeResult:
        async with http_app(_routes()) as port:
            options = {"expected_status": expected} if expected else {}
            prober = HttpProber(contact_url=CONTACT, **options)  # type: ignore[arg-type]
            [result] = await _probe(prober, [f"http://127.0.0.1:{port}/status/{status}"])
        return result

    result = asyncio.run(run())
    wanted = expected or set(range(200, 400))
    assert result.details["status"] == status
    assert result.success == (status in wanted)
    assert result.failure is (None if status in wanted else Failure.HTTP_STATUS)
    assert result.reachable


@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=6, max_size=6))
def test_phase_timings_are_never_negative(times: list[float]) -> None:
    names = [
        "dns_start",
        "dns_end",
        "connect_start",
        "connect_end",
        "headers_sent",
        "headers_received",
    ]
    stamps = dict(zip(names, sorted(times), strict=True))
    phases = phase_timings(stamps)
    assert set(phases) == {"dns_s", "connect_s", "ttfb_s"}
    assert all(value >= 0 for value in phases.values())


@needs_root
def test_silent_server_in_a_namespace_is_timeout_and_unreachable() -> None:
    with Netns() as ns:
        ns.exec(
            "nft", "add table inet t ; add chain inet t in { type filter hook input priority 0 ; }"
        )

        async def scenario() -> ProbeResult:
            async with http_app(_routes()) as port:
                ns.exec("nft", "add", "rule", "inet", "t", "in", "tcp", "dport", str(port), "drop")
                prober = HttpProber(contact_url=CONTACT, timeout_s=0.5)
                [result] = await _probe(prober, [f"http://127.0.0.1:{port}/ok"])
            return result

        result = run_in_netns(ns, scenario)
    assert result.failure is Failure.TIMEOUT and not result.reachable and result.rtt_s is None



async def test_request_head_and_a_fresh_connection_per_probe() -> None:
    seen: list[tuple[str, str, dict[str, str], int]] = []
    routes = web.RouteTableDef()

    @routes.get("/head")
    async def head(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        peer_port = peer[1] if peer else -1
        seen.append((request.method, request.path_qs, dict(request.headers), peer_port))
        return web.Response(text="seen")

    async with http_app(routes) as port:
        prober = HttpProber(contact_url=CONTACT)
        results = await _probe(prober, [f"http://127.0.0.1:{port}/head?i={i}" for i in range(3)])
    assert all(r.success and r.details["body_bytes"] == 4 for r in results)
    assert sorted(path for _m, path, _h, _p in seen) == [f"/head?i={i}" for i in range(3)]
    assert len({peer_port for *_rest, peer_port in seen}) == 3  # never a reused connection
    method, _path, headers, _port = seen[0]
    assert method == "GET"
    assert headers["Host"] == f"127.0.0.1:{port}"
    assert headers["User-Agent"] == default_user_agent(CONTACT)
    assert headers["Connection"] == "close" and headers["Accept"] == "*/*"


async def test_ipv6_literal_target_without_url() -> None:
    async with http_app(_routes(), host="::1") as port:
        prober = HttpProber(contact_url=CONTACT)
        results: list[ProbeResult] = []
        pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None))
        await prober.probe_many([Target("::1", port)], pacer, results.append)
        await prober.close()
    [result] = results
    assert result.details["url"] == f"http://[::1]:{port}/"
    assert result.failure is Failure.HTTP_STATUS and result.details["status"] == 404


async def test_host_name_is_resolved_each_probe_and_checked_against_the_blocklist() -> None:
    async with http_app(_routes()) as port:
        url = f"http://localhost:{port}/ok"
        [allowed] = await _probe(HttpProber(contact_url=CONTACT), [url])
        blocklist = Blocklist.from_cidrs(["127.0.0.0/8", "::1/128"])
        pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None), blocklist)
        [blocked] = await _probe(HttpProber(contact_url=CONTACT), [url], pacer)
    assert allowed.success and allowed.details["dns_s"] >= 0
    assert blocked.failure is Failure.BLOCKED_BY_POLICY and not blocked.reachable


# --- RTT: the kernel's handshake measure (TCP_INFO), as for TCP ---------------------------------

async def test_rtt_is_the_handshake_the_kernel_measured_not_a_blocked_loop() -> None:
    """Once the last target is taken (its connect is under way), the event loop is blocked
    for BLOCK_S, as a busy daemon's would be: the RTT must not contain that wait."""
    count = 20

    async with http_app(_routes()) as port:
        url = f"http://127.0.0.1:{port}/ok"
        prober = HttpProber(contact_url=CONTACT, timeout_s=3.0)
        results: list[ProbeResult] = []
        pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None))
        try:
            await prober.probe_many(
                then_block([Target("127.0.0.1", url=url)] * count), pacer, results.append
            )
        finally:
            await prober.close()
    assert len(results) == count
    loop_saw = max(r.details["connect_s"] for r in results)
    assert loop_saw >= BLOCK_S  # the block did fall between a connect and the loop seeing it
    for result in results:
        assert result.success, result
        assert result.details["rtt_source"] == "kernel"
        assert result.rtt_s is not None and 0 < result.rtt_s < HONEST_BOUND_S, result


async def test_a_connection_that_fails_later_still_has_the_handshake_rtt() -> None:
    """A TLS handshake that never finishes: the host answered at the TCP level, so the probe is
    reachable, with the kernel's handshake RTT."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async with raw_tcp_server(hold) as port:
        prober = HttpProber(contact_url=CONTACT, timeout_s=0.3)
        [result] = await _probe(prober, [f"https://127.0.0.1:{port}/"])
    assert result.failure is Failure.TIMEOUT and result.reachable
    assert result.details["rtt_source"] == "kernel"
    assert result.rtt_s is not None and result.rtt_s < HONEST_BOUND_S
