"""Webhook and Alertmanager sinks against real local aiohttp servers on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from monitor.incidents import IncidentLifecycle
from monitor.sinks import AlertmanagerSink, Backoff, WebhookSink

T0 = datetime(2022, 1, 5, 10, 30, tzinfo=UTC)


class Receiver:
    """A real HTTP server that records JSON POSTs and answers with scripted statuses."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bodies: list[Any] = []
        self.statuses: deque[int] = deque()  # answered in order; 200 when empty
        self.delay_s = 0.0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.popleft() if self.statuses else 200
        if status == 200:
            self.bodies.append(body)
        return web.json_response({}, status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, within_s: float = 5.0) -> None:
        deadline = time.monotonic() + within_s
        while len(self.bodies) < count:
            assert time.monotonic() < deadline, f"only {len(self.bodies)} of {count} bodies"
            await asyncio.sleep(0.01)


@pytest.fixture
async def hook() -> AsyncIterator[Receiver]:
    receiver = Receiver("/hook")
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
async def alertmanager() -> AsyncIterator[Receiver]:
    receiver = Receiver("/api/v2/alerts")
    await receiver.start()
    yield receiver
    await receiver.stop()


def incident(severity: str = "critical", end: str | None = None) -> dict[str, Any]:
    return {
        "id": "kz-1", "country": "KZ", "scope": "country", "entity": "KZ",
        "kind": "nationwide_shutdown", "severity": severity, "start": "2022-01-05T10:30:00Z",
        "end": end, "min_level": 0.05, "score": 3.0, "signals": ["icmp_blocks_up"],
        "networks": [],
    }


FAST = Backoff(base_s=0.02, max_s=0.1)


async def test_webhook_retries_after_500_and_delivers_once(hook: Receiver) -> None:
    hook.statuses.extend([500, 503])
    sink = WebhookSink(hook.url + "/hook", vantage="v1", retries=3, backoff=FAST)
    await sink.start()
    [transition] = IncidentLifecycle().observe([incident()], T0)
    sink.submit(transition)
    await hook.wait_for(1)
    await sink.close()
    assert hook.bodies == [{"vantage": "v1", **transition.to_json()}]
    assert hook.bodies[0]["event"] == "opened" and hook.bodies[0]["incident"]["id"] == "kz-1"
    assert sink.stats.sent == 1 and sink.stats.failed_attempts == 2 and sink.pending() == []


async def test_webhook_gives_up_on_4xx_and_after_retries(hook: Receiver) -> None:
    hook.statuses.extend([400, 500, 500])
    sink = WebhookSink(hook.url + "/hook", vantage="v1", retries=1, backoff=FAST)
    await sink.start()
    [transition] = IncidentLifecycle().observe([incident()], T0)
    sink.submit(transition)  # 400: not retried
    sink.submit(transition)  # 500, 500: retried once, then given up
    sink.submit(transition)  # 200
    await hook.wait_for(1)
    await sink.close()
    assert sink.stats.given_up == 2 and sink.stats.sent == 1 and sink.stats.failed_attempts == 3


async def test_webhook_queue_is_bounded_and_submit_never_waits(hook: Receiver) -> None:
    hook.delay_s = 0.3  # a slow receiver
    sink = WebhookSink(hook.url + "/hook", vantage="v1", queue_size=3, backoff=FAST)
    await sink.start()
    began = time.monotonic()
    for n in range(10):
        sink.submit_payload({"n": n})
    assert time.monotonic() - began < 0.1  # submitting never waited for the receiver
    await asyncio.sleep(0)  # the worker takes the first one
    await sink.close(drain_s=0.05)
    # The receiver was still busy: what is left is kept for the next start, oldest dropped.
    pending = [p["n"] for p in sink.pending()]
    assert sink.stats.dropped >= 6
    assert pending[-3:] == [7, 8, 9]


async def test_webhook_unreachable_counts_attempts_and_keeps_running() -> None:
    # A port nobody listens on (bound, then closed): connection refused, retried, given up.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", vantage="v1", retries=2, backoff=FAST)
    await sink.start()
    sink.submit_payload({"n": 1})
    for _ in range(200):
        if sink.stats.given_up:
            break
        await asyncio.sleep(0.01)
    await sink.close()
    assert sink.stats.given_up == 1 and sink.stats.failed_attempts == 3


async def test_alertmanager_fires_resends_relabels_and_resolves(alertmanager: Receiver) -> None:
    now = [T0]
    sink = AlertmanagerSink(
        alertmanager.url, vantage="v1", now=lambda: now[0], resend_interval_s=0.2, backoff=FAST
    )
    await sink.start()
    life = IncidentLifecycle()
    transitions = life.observe([incident("warning")], now[0])
    sink.submit_round(life.open_incidents(), transitions)
    await alertmanager.wait_for(1)
    [alert] = alertmanager.bodies[0]
    assert alert["labels"] == {
        "alertname": "ShutdownMonitorIncident", "country": "KZ", "scope": "country",
        "entity": "KZ", "kind": "nationwide_shutdown", "severity": "warning",
    }
    assert alert["startsAt"] == "2022-01-05T10:30:00Z"
    assert alert["endsAt"] > alert["startsAt"]
    # Nothing changes: it is sent again after the resend interval, same labels and start.
    await alertmanager.wait_for(2, within_s=2.0)
    assert alertmanager.bodies[1][0]["labels"] == alert["labels"]
    assert alertmanager.bodies[1][0]["startsAt"] == alert["startsAt"]
    # Severity rises: the warning label set is resolved, the critical one fires.
    now[0] = T0 + timedelta(minutes=10)
    transitions = life.observe([incident("critical")], now[0])
    sink.submit_round(life.open_incidents(), transitions)
    seen = len(alertmanager.bodies)
    await alertmanager.wait_for(seen + 1)
    batch = alertmanager.bodies[seen]
    by_severity = {a["labels"]["severity"]: a for a in batch}
    assert by_severity["warning"]["endsAt"] == "2022-01-05T10:40:00Z"
    assert by_severity["critical"]["endsAt"] > "2022-01-05T10:40:00Z"
    # Closed: resolved with the incident's end.
    now[0] = T0 + timedelta(hours=2)
    transitions = life.observe([incident("critical", end="2022-01-05T12:15:00Z")], now[0])
    sink.submit_round(life.open_incidents(), transitions)
    seen = len(alertmanager.bodies)
    await alertmanager.wait_for(seen + 1)
    [resolved] = alertmanager.bodies[seen]
    assert resolved["labels"]["severity"] == "critical"
    assert resolved["endsAt"] == "2022-01-05T12:15:00Z"
    await sink.close()


async def test_alertmanager_retries_after_500(alertmanager: Receiver) -> None:
    alertmanager.statuses.extend([500])
    sink = AlertmanagerSink(
        alertmanager.url, vantage="v1", now=lambda: T0, resend_interval_s=30, backoff=FAST
    )
    await sink.start()
    sink.submit_round([incident()], [])
    await alertmanager.wait_for(1)
    await sink.close()
    assert sink.stats.failed_attempts == 1 and sink.stats.sent == 1
    assert alertmanager.bodies[0][0]["labels"]["severity"] == "critical"
