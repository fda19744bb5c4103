"""Every prober on the loop the CLI and daemon ship with (probes.eventloop: uvloop when installed).

uvloop's transports and servers are not asyncio's classes, and the ICMP and TCP engines hand raw
file descriptors to the loop (add_reader), so each prober runs here under `eventloop.run`, in a
thread inside a namespace this test creates, against real servers started on that same loop:

    namespace lo: 10.77.0.0/16 answers (AnyIP local route), 10.76.0.0/24 is an `unreachable` route
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from aiohttp import web

from probes import eventloop
from probes.base import DnsQuery, Failure, ProbeResult, Target
from probes.dns import DnsProber
from probes.http import HttpProber
from probes.icmp import IcmpProber
from probes.pacing import Pacer, PacingPolicy
from probes.tcp import TcpProber
from tests.netns import Netns, needs_root, run_in_netns
from tests.probes.servers import (
    DnsBehaviour,
    DnsResponder,
    free_port,
    raw_tcp_server,
    self_signed_context,
)

T = TypeVar("T")
CONTACT = "https://monitor.example/contact"
RIGHT = "192.0.2.10"


def test_run_uses_uvloop_and_closes_its_loop() -> None:
    async def running() -> asyncio.AbstractEventLoop:
        await asyncio.sleep(0)
        return asyncio.get_running_loop()

    loop = eventloop.run(running())
    assert isinstance(loop, uvloop.Loop) and loop.is_closed()
    assert eventloop.loop_name() == "uvloop"


def test_run_propagates_the_coroutines_exception() -> None:
    async def fail() -> None:
        raise ValueError("from the coroutine")

    with pytest.raises(ValueError, match="from the coroutine"):
        eventloop.run(fail())


def test_run_tunes_the_collector_while_it_runs_and_restores_it() -> None:
    before = gc.get_threshold()

    async def inside() -> tuple[tuple[int, ...], int]:
        return gc.get_threshold(), gc.get_freeze_count()

    thresholds, frozen = eventloop.run(inside())
    assert thresholds == eventloop.GC_THRESHOLDS
    assert frozen > 0  # the modules and objects made before the loop started
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_concurrent_runs_restore_the_collector_when_the_last_one_ends() -> None:
    before = gc.get_threshold()
    inner_started, inner_may_end = threading.Event(), threading.Event()
    seen: list[tuple[int, ...]] = []

    async def inner() -> None:
        inner_started.set()
        await asyncio.to_thread(inner_may_end.wait, 10)

    async def outer() -> None:
        thread = threading.Thread(target=eventloop.run, args=(inner(),))
        thread.start()
        await asyncio.to_thread(inner_started.wait, 10)
        inner_may_end.set()
        await asyncio.to_thread(thread.join, 10)
        seen.append(gc.get_threshold())  # the inner run ended, this one still runs

    eventloop.run(outer())
    assert seen == [eventloop.GC_THRESHOLDS]
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


async def _probe(prober: Any, targets: Iterable[Target]) -> list[ProbeResult]:
    results: list[ProbeResult] = []
    pacer = Pacer(PacingPolicy(rate_pps=None, per_block_pps=None, max_in_flight=64))
    try:
        await prober.probe_many(list(targets), pacer, results.append)
    finally:
        await prober.close()
    return results


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


def _routes() -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/ok")
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    @routes.get("/redirect")
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    @routes.get("/big")
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100_000)

    return routes


async def _http_site(runner: web.AppRunner, tls: Any = None) -> int:
    """A site of `runner` on 0.0.0.0, port 0 (every AnyIP address); returns the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 0))
    site = web.SockSite(runner, sock, ssl_context=tls)
    await site.start()
    port: int = sock.getsockname()[1]
    return port


async def _every_prober(cert_dir: Path) -> dict[str, list[ProbeResult]]:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    runner = web.AppRunner(web.Application(), access_log=None, shutdown_timeout=0.1)
    runner.app.add_routes(_routes())
    await runner.setup()
    found: dict[str, list[ProbeResult]] = {}
    try:
        plain = await _http_site(runner)
        tls = await _http_site(runner, self_signed_context(cert_dir, host="10.77.2.1"))
        async with raw_tcp_server(_hold, host="0.0.0.0") as open_port:
            icmp = [Target(f"10.77.0.{i}") for i in range(1, 21)] + [Target("10.76.0.1")]
            found["icmp"] = await _probe(IcmpProber(timeout_s=1.0, privileged=False), icmp)
            tcp = [Target(f"10.77.1.{i}") for i in range(1, 21)]
            tcp.append(Target("10.77.1.99", port=free_port("10.77.1.99")))
            found["tcp"] = await _probe(TcpProber(ports=(open_port,), timeout_s=1.0), tcp)
        urls = [f"http://10.77.2.{i}:{plain}/ok" for i in range(1, 21)]
        urls += [
            f"http://10.77.2.1:{plain}/redirect",
            f"http://10.77.2.1:{plain}/big",
            f"https://10.77.2.1:{tls}/ok",
            f"http://10.77.2.1:{free_port('10.77.2.1')}/ok",
        ]
        lax = HttpProber(contact_url=CONTACT, timeout_s=2.0, verify_tls=False,
                         follow_redirects=True, max_body_bytes=50_000)  # fmt: skip
        found["http"] = await _probe(lax, [Target("10.77.2.1", url=url) for url in urls])
        strict = HttpProber(contact_url=CONTACT, timeout_s=2.0)
        found["https_strict"] = await _probe(
            strict, [Target("10.77.2.1", url=f"https://10.77.2.1:{tls}/ok")]
        )
    finally:
        await runner.cleanup()
    zone = {
        "ok.test": DnsBehaviour(answers=[RIGHT]),
        "spoofed.test": DnsBehaviour(answers=["10.1.2.3"]),
    }
    async with DnsResponder(zone) as server:
        dns = [
            Target("127.0.0.1", server.port, query=DnsQuery(name, "A", frozenset({RIGHT}), way))
            for name in ("ok.test", "spoofed.test")
            for way in ("udp", "tcp")
        ]
        found["dns"] = await _probe(DnsProber(timeout_s=2.0), dns)
    return found


@needs_root
@pytest.mark.root
def test_every_prober_runs_under_uvloop(tmp_path: Path) -> None:
    with Netns("uvl") as ns:
        ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
        ns.exec("ip", "route", "add", "local", "10.77.0.0/16", "dev", "lo")
        ns.exec("ip", "route", "add", "unreachable", "10.76.0.0/24")
        found = run_in_netns(ns, lambda: _every_prober(tmp_path), runner=eventloop.run)

    icmp = {r.target.address: r for r in found["icmp"]}
    assert all(icmp[f"10.77.0.{i}"].success for i in range(1, 21))
    assert all(icmp[f"10.77.0.{i}"].details["rtt_source"] in ("kernel", "loop") for i in (1, 2))
    assert icmp["10.76.0.1"].failure is Failure.HOST_UNREACHABLE

    tcp = {r.target.address: r for r in found["tcp"]}
    assert all(tcp[f"10.77.1.{i}"].success for i in range(1, 21))
    refused = tcp["10.77.1.99"]
    assert refused.failure is Failure.CONNECTION_REFUSED and refused.reachable

    http = {r.target.url or "": r for r in found["http"]}
    assert len(http) == 24
    by_path = {url.split("/", 3)[3] + (":tls" if url.startswith("https") else ""): r
               for url, r in http.items()}  # fmt: skip
    oks = [r for url, r in http.items() if url.startswith("http://") and url.endswith("/ok")]
    answered = [r for r in oks if r.success]
    assert len(answered) == 20 and all(r.details["status"] == 200 for r in answered)
    assert by_path["redirect"].success and by_path["redirect"].details["redirects"]
    assert by_path["big"].failure is Failure.TOO_LARGE
    tls_ok = by_path["ok:tls"]
    assert tls_ok.success and tls_ok.details["tls_s"] >= 0 and tls_ok.details["connect_s"] >= 0
    refused_http = [r for r in oks if not r.success]
    assert [r.failure for r in refused_http] == [Failure.CONNECTION_REFUSED]
    [strict] = found["https_strict"]
    assert strict.failure is Failure.TLS_ERROR and strict.reachable
    assert "certificate" in strict.details["error"].lower()

    dns = {(r.target.query.name, r.target.query.transport): r
           for r in found["dns"] if isinstance(r.target.query, DnsQuery)}  # fmt: skip
    assert len(dns) == 4
    for way in ("udp", "tcp"):
        assert dns[("ok.test", way)].success
        assert dns[("spoofed.test", way)].failure is Failure.DNS_WRONG_ANSWER
