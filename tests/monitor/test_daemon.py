"""The daemon end to end, in a network namespace the test makes, in virtual time.

The namespace answers for two lab "countries" and the control targets by AnyIP local routes;
nft drops what a scenario shuts down. The daemon runs in-process (on a loop inside the
namespace) so the test can read its API while it runs; the webhook and Alertmanager receivers
are real aiohttp servers on 127.0.0.1:0 inside the same namespace. No packet leaves it.
test_daemon_process.py runs the `shutdown-monitor run` process itself (signals, timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from monitor.clock import RealClock, VirtualClock
from monitor.config import load_config
from monitor.daemon import STATE_WEBHOOK_PENDING, Daemon
from monitor.history import HistoryStore
from tests.netns import Netns, needs_root, run_in_netns
from tests.prom import PrometheusServer, needs_prometheus
from tests.prom import value as prom_value

KZ = ipaddress.IPv4Network("10.81.0.0/20")  # 16 blocks
UZ = ipaddress.IPv4Network("10.81.16.0/21")  # 8 blocks
CONTROL = ipaddress.IPv4Network("198.18.0.0/24")
ALLOWED = (ipaddress.IPv4Network("10.81.0.0/16"), CONTROL)
ANYIP = (KZ, UZ, CONTROL)
T0 = datetime(2022, 1, 3, 0, 0, tzinfo=UTC)
INTERVAL_S = 300
NORMAL_ROUNDS = 8


def write_blocklist(path: Path) -> None:
    """Everything except the lab ranges: nothing else can be probed, whatever a bug does."""
    blocked: list[ipaddress.IPv4Network] = [ipaddress.IPv4Network("0.0.0.0/0")]
    for allowed in ALLOWED:
        blocked = [piece for net in blocked
                   for piece in (net.address_exclude(allowed) if net.overlaps(allowed) else [net])]
    lines = [str(net) for net in sorted(blocked)] + ["::/0"]
    path.write_text("# test blocklist: all but the lab\n" + "\n".join(lines) + "\n")


def write_hitlist(path: Path, network: ipaddress.IPv4Network) -> None:
    rows = ["block,address,answered,probed"]
    for block in network.subnets(new_prefix=24):
        base = block.network_address
        rows += [f"{block},{base + 1},5,5", f"{block},{base + 254},5,5"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


@dataclass
class Lab:
    ns: Netns
    root: Path
    sinks: dict[str, Any] = field(default_factory=dict)
    probing: dict[str, Any] = field(default_factory=lambda: {"timeout_s": 0.3, "reprobes": 1})

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def history_path(self) -> Path:
        return self.root / "var" / "history.sqlite"  # var/ is made by the daemon

    def config_data(self) -> dict[str, Any]:
        return {
            "vantage": {"name": "lab"},
            "listen": "127.0.0.1:9310",
            "interval_s": INTERVAL_S,
            "pacing": {"rate_pps": 5000, "max_in_flight": 256, "per_block_pps": None,
                       "blocklist_file": "blocklist.txt"},
            "probing": self.probing,
            "hitlist_dir": "hitlists",
            "countries": {"KZ": {"prefixes": "kz.txt"}, "UZ": {"prefixes": "uz.txt"}},
            "control": {"hosts": ["198.18.0.1", "198.18.0.2"], "min_up_fraction": 0.5},
            "history": {"path": "var/history.sqlite"},
            "sinks": self.sinks,
        }

    def write_config(self) -> Path:
        self.config_path.write_text(yaml.safe_dump(self.config_data()))
        return self.config_path

    def drop(self, network: ipaddress.IPv4Network) -> None:
        self.ns.exec("nft", f"add rule inet lab in ip daddr {network} drop")

    def undrop(self) -> None:
        self.ns.exec("nft", "flush chain inet lab in")

    def unplug(self) -> None:
        """No network at all: only loopback is left, every lab address is unreachable."""
        for network in ANYIP:
            self.ns.exec("ip", "route", "del", "local", str(network), "dev", "lo")

    def plug(self) -> None:
        for network in ANYIP:
            self.ns.exec("ip", "route", "replace", "local", str(network), "dev", "lo")


@contextlib.contextmanager
def make_lab(root: Path) -> Iterator[Lab]:
    with Netns("smd") as ns:
        lab = Lab(ns, root)
        lab.plug()
        ns.exec("nft", "add table inet lab")
        ns.exec("nft", "add chain inet lab in { type filter hook input priority 0 ; }")
        write_blocklist(root / "blocklist.txt")
        (root / "kz.txt").write_text(f"{KZ}\n")
        (root / "uz.txt").write_text(f"{UZ}\n")
        write_hitlist(root / "hitlists" / "KZ.csv", KZ)
        write_hitlist(root / "hitlists" / "UZ.csv", UZ)
        lab.write_config()
        yield lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with make_lab(tmp_path) as made:
        yield made


class Receiver:
    """A real HTTP server recording JSON POSTs; the first `fail_first` answer 500."""

    def __init__(self, path: str, fail_first: int = 0) -> None:
        self.path = path
        self.fail_first = fail_first
        self.bodies: list[Any] = []
        self.failed = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.failed < self.fail_first:
            self.failed += 1
            return web.Response(status=500)
        self.bodies.append(body)
        return web.json_response({})

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class GatedClock(VirtualClock):
    """Virtual time that runs only the rounds the test allows, so it can look in between."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
        self.permits = 0
        self._changed = asyncio.Event()

    def allow(self, rounds: int) -> None:
        self.permits += rounds
        self._changed.set()

    async def sleep_until(self, when: datetime) -> None:
        while self.permits <= 0:
            self._changed.clear()
            await self._changed.wait()
        self.permits -= 1
        await super().sleep_until(when)


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.create_task(daemon.run())
    try:
        yield task
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, timeout=15)


async def rounds_done(daemon: Daemon, task: asyncio.Task[int], count: int) -> None:
    """Let the daemon run until it has finished `count` rounds since it started."""
    clock = daemon.clock
    if isinstance(clock, GatedClock):
        clock.allow(count - daemon.last.number - clock.permits)
    deadline = time.monotonic() + 60
    while daemon.last.number < count:
        if task.done():
            task.result()
            raise AssertionError("daemon stopped early")
        assert time.monotonic() < deadline, f"only {daemon.last.number} rounds"
        await asyncio.sleep(0.02)


async def get(daemon: Daemon, path: str) -> tuple[int, str]:
    assert daemon.api is not None
    url = f"http://127.0.0.1:{daemon.api.port}{path}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def daemon_for(lab: Lab, clock: VirtualClock, max_rounds: int | None = None) -> Daemon:
    if isinstance(clock, GatedClock) and max_rounds is not None:
        clock.allow(max_rounds)
    config = load_config(lab.config_path)
    # Port 0 inside the namespace: the OS picks, the API server reports it.
    return Daemon(config, clock, config_path=lab.config_path, listen="127.0.0.1:0",
                  max_rounds=max_rounds)


def country_incidents(daemon: Daemon, country: str) -> list[dict[str, Any]]:
    return [i for i in daemon.incidents() if i["country"] == country]


@needs_root
def test_shutdown_detected_alerted_once_across_a_restart_then_closed(lab: Lab) -> None:
    async def scenario() -> None:
        async with (Receiver("/hook", fail_first=1) as hook,
                    Receiver("/api/v2/alerts") as manager):
            lab.sinks = {"webhook": {"url": hook.url + "/hook", "timeout_s": 2, "retries": 3},
                         "alertmanager": {"url": manager.url}}
            lab.write_config()
            clock = GatedClock(T0)

            # Ordinary days: rounds measure every block, nothing is raised.
            quiet = daemon_for(lab, clock, max_rounds=NORMAL_ROUNDS)
            assert await quiet.run() == 0
            assert quiet.last.number == NORMAL_ROUNDS and quiet.incidents() == []
            status = quiet.status()
            assert status["countries"]["KZ"]["methods"]["icmp"] == {"total": 16, "up": 16}
            assert status["countries"]["UZ"]["methods"]["icmp"] == {"total": 8, "up": 8}
            assert status["vantage"]["up"] is True

            # KZ is switched off; UZ is not.
            lab.drop(KZ)
            first = daemon_for(lab, clock)
            async with running(first) as task:
                await rounds_done(first, task, 4)
                code, body = await get(first, "/api/incidents")
                assert code == 200
                found = yaml.safe_load(body)["incidents"]
                kz = [i for i in found if i["country"] == "KZ"]
                assert [i["kind"] for i in kz] == ["nationwide_shutdown"]
                assert kz[0]["end"] is None and kz[0]["severity"] == "critical"
                assert not [i for i in found if i["country"] == "UZ"]
                _, metrics = await get(first, "/metrics")
                assert metric(metrics, "shutdown_monitor_incident_active", country="KZ",
                              kind="nationwide_shutdown") == 1
                assert metric(metrics, "shutdown_monitor_targets_up", country="KZ") == 0
                assert metric(metrics, "shutdown_monitor_targets_up", country="UZ") == 8
                _, status_text = await get(first, "/api/status")
                status = yaml.safe_load(status_text)
                assert status["countries"]["KZ"]["methods"]["icmp"] == {"total": 16, "up": 0}
                assert status["countries"]["KZ"]["levels"]["icmp_blocks_up"] < 0.5
                incident_id = kz[0]["id"]
                await asyncio.sleep(0.5)  # the webhook's retry after the 500
            opened = [b for b in hook.bodies if b["event"] == "opened"]
            assert [b["incident"]["id"] for b in opened] == [incident_id]
            assert hook.failed == 1
            fired = [a for batch in manager.bodies for a in batch
                     if a["labels"]["country"] == "KZ"]
            assert fired and {a["startsAt"] for a in fired} == {kz[0]["start"]}

            # Restart, still shut down: the incident is restored, not announced again.
            webhook_before, manager_before = len(hook.bodies), len(manager.bodies)
            second = daemon_for(lab, clock)
            async with running(second) as task:
                await rounds_done(second, task, 2)
                assert [i["id"] for i in country_incidents(second, "KZ")] == [incident_id]
                await asyncio.sleep(0.3)
            new_hooks = hook.bodies[webhook_before:]
            assert not [b for b in new_hooks if b["event"] == "opened"], new_hooks
            # Alertmanager is told again (as it expects) with the same labels and start:
            # the same alert, not a new one.
            resent = [a for batch in manager.bodies[manager_before:] for a in batch]
            assert resent and {(a["labels"]["severity"], a["startsAt"]) for a in resent} == {
                ("critical", kz[0]["start"])}

            # Power comes back: the incident closes, both sinks hear it once.
            lab.undrop()
            third = daemon_for(lab, clock)
            async with running(third) as task:
                await rounds_done(third, task, 3)
                for _ in range(100):
                    if not third.lifecycle.open_incidents():
                        break
                    await rounds_done(third, task, third.last.number + 1)
                await asyncio.sleep(0.3)
            [closed] = country_incidents(third, "KZ")
            assert closed["end"] is not None
            events = [b["event"] for b in hook.bodies if b["incident"]["id"] == incident_id]
            assert events.count("opened") == 1 and events.count("closed") == 1
            resolved = [a for a in manager.bodies[-1] if a["labels"]["country"] == "KZ"]
            assert resolved and resolved[0]["endsAt"] == closed["end"]

        with HistoryStore(lab.history_path) as store:
            stored = [i for i in store.load_incidents() if i["country"] == "KZ"]
            assert [i["id"] for i in stored] == [incident_id] and stored[0]["end"] is not None
            frame = store.read_frame(country="KZ", signals=["icmp_blocks_up"], scope="country")
        # Every round of every run is in the history, once: no instant measured twice.
        assert frame["time"].is_unique and len(frame) == third_round_count(frame)

    run_in_netns(lab.ns, scenario, timeout=240)


def third_round_count(frame: Any) -> int:
    start, end = frame["time"].min(), frame["time"].max()
    return int((end - start) / timedelta(seconds=INTERVAL_S)) + 1


@needs_root
def test_no_network_at_all_is_a_vantage_outage_not_a_country_one(lab: Lab) -> None:
    async def scenario() -> None:
        async with Receiver("/hook") as hook:
            lab.sinks = {"webhook": {"url": hook.url + "/hook", "timeout_s": 2, "retries": 3}}
            lab.write_config()
            clock = GatedClock(T0)
            assert await daemon_for(lab, clock, max_rounds=NORMAL_ROUNDS).run() == 0
            lab.unplug()
            daemon = daemon_for(lab, clock)
            async with running(daemon) as task:
                await rounds_done(daemon, task, 4)
                code, health = await get(daemon, "/healthz")
                assert code == 200, health  # the daemon is fine; its vantage is not
                _, status_text = await get(daemon, "/api/status")
                status = yaml.safe_load(status_text)
                assert status["vantage"]["up"] is False
                assert status["vantage"]["control_up"] == 0
                assert status["vantage"]["control_total"] == 2
                _, metrics = await get(daemon, "/metrics")
                assert metric(metrics, "shutdown_monitor_vantage_up") == 0
                _, body = await get(daemon, "/api/incidents")
                incidents = yaml.safe_load(body)["incidents"]
                assert [i["kind"] for i in incidents] == ["vantage_offline"]
                assert incidents[0]["country"] == "ZZ" and incidents[0]["entity"] == "lab"
                assert incidents[0]["end"] is None

                # The uplink comes back: the vantage incident closes, no country is blamed.
                lab.plug()
                seen = daemon.last.number
                await rounds_done(daemon, task, seen + 4)
                await asyncio.sleep(0.3)
                assert daemon.status()["vantage"]["up"] is True
            [vantage] = daemon.incidents()
            assert vantage["kind"] == "vantage_offline" and vantage["end"] is not None
            assert [(b["event"], b["incident"]["kind"]) for b in hook.bodies] == [
                ("opened", "vantage_offline"), ("closed", "vantage_offline")]

    run_in_netns(lab.ns, scenario, timeout=180)


@needs_root
def test_shards_split_the_universe_without_overlap(lab: Lab) -> None:
    async def scenario() -> list[int]:
        totals = []
        for index in range(2):
            config = load_config(lab.config_path)
            daemon = Daemon(config, VirtualClock(T0), listen="127.0.0.1:0", shard=(index, 2),
                            max_rounds=1)
            assert await daemon.run() == 0
            counts = daemon.status()["countries"]["KZ"]["methods"]["icmp"]
            assert counts["up"] == counts["total"]
            totals.append(counts["total"])
        return totals

    totals = run_in_netns(lab.ns, scenario, timeout=60)
    assert sum(totals) == 16 and all(0 < t < 16 for t in totals), totals


@needs_prometheus
async def test_a_real_prometheus_scrapes_what_the_daemon_measured(tmp_path: Path) -> None:
    """Loopback only, real time: two HTTP endpoints of a "country" (one answers 403: not
    service), a TCP control target; a real Prometheus scrapes the daemon's /metrics."""
    routes = web.RouteTableDef()

    @routes.get("/ok")
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @routes.get("/blocked")
    async def blocked(_request: web.Request) -> web.Response:
        return web.Response(status=403, text="blocked by order")

    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    blocked_ranges = [str(n) for n in ipaddress.IPv4Network("0.0.0.0/0").address_exclude(
        ipaddress.IPv4Network("127.0.0.0/8"))]
    (tmp_path / "blocklist.txt").write_text("\n".join([*blocked_ranges, "::/0"]) + "\n")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "vantage": {"name": "loop"},
        "interval_s": 1,
        "pacing": {"blocklist_file": "blocklist.txt", "per_block_pps": None},
        "probing": {"timeout_s": 0.5, "reprobes": 0},
        "hitlist_dir": "hitlists",
        "countries": {"KZ": {"prefixes": None, "endpoints": {"urls": [
            f"http://127.0.0.1:{port}/ok", f"http://127.0.0.1:{port}/blocked"]}}},
        "control": {"hosts": [f"127.0.0.1:{port}"], "method": "tcp"},
        "history": {"path": "history.sqlite"},
    }))
    daemon = Daemon(load_config(config_path), RealClock(), config_path=config_path,
                    listen="127.0.0.1:0")
    try:
        async with running(daemon) as task:
            await rounds_done(daemon, task, 1)
            assert daemon.api is not None
            prometheus = PrometheusServer([f"127.0.0.1:{daemon.api.port}"])
            await asyncio.to_thread(prometheus.__enter__)
            try:
                up = await prometheus.await_for(
                    'shutdown_monitor_targets_up{country="KZ",method="http"}', bool)
                total = await prometheus.aquery(
                    'shutdown_monitor_targets{country="KZ",method="http"}')
                vantage = await prometheus.aquery("shutdown_monitor_vantage_up")
                rounds = await prometheus.aquery("shutdown_monitor_rounds_total")
            finally:
                await asyncio.to_thread(prometheus.__exit__, None, None, None)
            status = daemon.status()
    finally:
        await runner.cleanup()
    assert prom_value(up) == 1 and prom_value(total) == 2
    assert prom_value(vantage) == 1 and prom_value(rounds) >= 1
    # The vantage is not baked into the series (Prometheus adds it with external_labels when
    # it federates, writes remotely or alerts).
    assert "vantage" not in up[0]["metric"]
    assert status["countries"]["KZ"]["methods"]["http"] == {"total": 2, "up": 1}


async def test_undelivered_webhook_payloads_survive_a_restart(tmp_path: Path) -> None:
    """Loopback only and no probing at all: a payload the webhook could not deliver before a
    stop is kept in the store and delivered by the next start."""
    (tmp_path / "blocklist.txt").write_text("0.0.0.0/0\n::/0\n")
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()

    def write_config(url: str) -> Path:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({
            "vantage": {"name": "loop"}, "interval_s": 60,
            "pacing": {"blocklist_file": "blocklist.txt"}, "hitlist_dir": "hitlists",
            "history": {"path": "history.sqlite"},
            "sinks": {"webhook": {"url": url, "timeout_s": 1, "retries": 5}},
        }))
        return path

    payload = {"vantage": "loop", "event": "opened", "at": "2022-01-05T10:40:00Z",
               "reason": "", "incident": {"id": "kz-1"}}
    with HistoryStore(tmp_path / "history.sqlite") as store:
        store.set_state(STATE_WEBHOOK_PENDING, json.dumps([payload]))
    # The receiver is down: the payload is refused, waits for its retry, and is still
    # undelivered when the daemon stops.
    path = write_config(f"http://127.0.0.1:{dead_port}/hook")
    down = Daemon(load_config(path), GatedClock(T0), listen="127.0.0.1:0")
    async with running(down):
        await asyncio.sleep(0.3)
    with HistoryStore(tmp_path / "history.sqlite") as store:
        assert json.loads(store.get_state(STATE_WEBHOOK_PENDING) or "[]") == [payload]

    async with Receiver("/hook") as hook:
        path = write_config(hook.url + "/hook")
        up = Daemon(load_config(path), GatedClock(T0), listen="127.0.0.1:0")
        async with running(up):
            for _ in range(100):
                if hook.bodies:
                    break
                await asyncio.sleep(0.02)
    assert hook.bodies == [payload]
    with HistoryStore(tmp_path / "history.sqlite") as store:
        assert json.loads(store.get_state(STATE_WEBHOOK_PENDING) or "[]") == []
