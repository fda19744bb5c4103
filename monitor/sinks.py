"""Where incident transitions go besides the API: a JSON webhook and Alertmanager's v2 API.

Both sinks are fed without waiting (`submit*` never blocks a round) and deliver from their own
task, retrying with exponential backoff. The webhook keeps a bounded queue (the oldest transition
is dropped, and counted, when it is full); Alertmanager gets the full set of open incidents again
on every resend interval, as it expects from a client, and resolved alerts with `endsAt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import aiohttp

from monitor.background import drain_then_stop
from monitor.incidents import Event, Transition, format_time

log = logging.getLogger(__name__)

ALERTNAME: Final = "ShutdownMonitorIncident"
LABEL_KEYS: Final = ("country", "scope", "entity", "kind", "severity")
_RETRY_STATUSES: Final = frozenset({408, 425, 429})


@dataclass(slots=True)
class SinkStats:
    """Counters the exporter and /api/status show for each sink."""

    sent: int = 0
    failed_attempts: int = 0
    given_up: int = 0
    dropped: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "failed_attempts": self.failed_attempts,
            "given_up": self.given_up,
            "dropped": self.dropped,
        }


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry n (0-based): base * 2**n, capped."""

    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.base_s * (2 ** min(attempt, 30))))


def _retryable(status: int) -> bool:
    return status >= 500 or status in _RETRY_STATUSES


async def _post_json(
    session: aiohttp.ClientSession, url: str, payload: Any, timeout_s: float
) -> tuple[bool, bool, str]:
    """(delivered, worth retrying, what happened) for one POST; network trouble is data here."""
    try:
        async with session.post(
            url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            await response.read()
            if 200 <= response.status < 300:
                return True, False, f"HTTP {response.status}"
            return False, _retryable(response.status), f"HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return False, True, f"{type(exc).__name__}: {exc}"


class WebhookSink:
    """POSTs each transition as JSON: {"vantage", "event", "at", "reason", "incident"}.

    `retries` is how many times a failed delivery is tried again before it is given up.
    """

    def __init__(
        self,
        url: str,
        *,
        vantage: str,
        timeout_s: float = 5.0,
        retries: int = 5,
        queue_size: int = 1000,
        backoff: Backoff | None = None,
        user_agent: str = "shutdown-monitor",
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.url = url
        self.vantage = vantage
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.user_agent = user_agent
        self.stats = SinkStats()
        self._queue: deque[dict[str, Any]] = deque(maxlen=queue_size)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set when nothing is queued or being delivered
        self._idle.set()
        self._in_flight: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def submit(self, transition: Transition) -> None:
        self.submit_payload({"vantage": self.vantage, **transition.to_json()})

    def submit_payload(self, payload: dict[str, Any]) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.stats.dropped += 1
            log.warning("webhook queue full (%d): dropping the oldest transition", len(self._queue))
        self._queue.append(payload)
        self._idle.clear()
        self._wakeup.set()

    def pending(self) -> list[dict[str, Any]]:
        """Undelivered payloads (the one being tried first), to persist across a restart."""
        head = [self._in_flight] if self._in_flight is not None else []
        return head + list(self._queue)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": self.user_agent})
        self._task = asyncio.create_task(self._run(), name="webhook-sink")

    async def close(self, drain_s: float = 2.0) -> None:
        """Give queued deliveries `drain_s` seconds, then stop; what is left stays `pending()`."""
        await drain_then_stop(self._task, self._session, self._idle.wait, drain_s)
        self._task = self._session = None

    async def _run(self) -> None:
        assert self._session is not None
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._in_flight = self._queue.popleft()
            await self._deliver(self._session, self._in_flight)
            self._in_flight = None

    async def _deliver(self, session: aiohttp.ClientSession, payload: dict[str, Any]) -> None:
        for attempt in range(self.retries + 1):
            ok, retry, what = await _post_json(session, self.url, payload, self.timeout_s)
            if ok:
                self.stats.sent += 1
                return
            self.stats.failed_attempts += 1
            if not retry or attempt == self.retries:
                break
            delay = self.backoff.delay(attempt)
            log.info("webhook: %s; retrying in %.1f s", what, delay)
            await asyncio.sleep(delay)
        self.stats.given_up += 1
        log.warning("webhook: gave up on a %s transition after %s", payload.get("event"), what)


def alert_labels(incident: Mapping[str, Any]) -> dict[str, str]:
    labels = {"alertname": ALERTNAME}
    labels.update({key: str(incident[key]) for key in LABEL_KEYS})
    return labels


def _label_key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


class AlertmanagerSink:
    """Keeps Alertmanager's view equal to the open incidents (POST {url}/api/v2/alerts).

    Firing alerts carry `endsAt` = now + 4 resend intervals (as Prometheus does; at least a
    minute), so that if this daemon dies they resolve on their own; they are sent again every
    `resend_interval_s`. When an
    incident closes -- or its labels change, e.g. severity rises -- the old label set is sent once
    more with `endsAt` so Alertmanager resolves it.
    """

    def __init__(
        self,
        url: str,
        *,
        vantage: str,
        now: Callable[[], datetime],
        resend_interval_s: float = 60.0,
        timeout_s: float = 5.0,
        backoff: Backoff | None = None,
        generator_url: str | None = None,
        user_agent: str = "shutdown-monitor",
    ) -> None:
        self.url = url.rstrip("/") + "/api/v2/alerts"
        self.vantage = vantage
        self.now = now
        self.resend_interval_s = resend_interval_s
        self.timeout_s = timeout_s
        self.backoff = backoff or Backoff(base_s=1.0, max_s=resend_interval_s)
        self.generator_url = generator_url
        self.user_agent = user_agent
        self.stats = SinkStats()
        self._firing: dict[str, dict[str, Any]] = {}  # incident id -> incident
        self._sent_labels: dict[str, dict[str, str]] = {}  # incident id -> labels last sent
        self._resolved: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        self._dirty = asyncio.Event()  # something Alertmanager has not seen yet
        self._clean = asyncio.Event()  # the opposite, for close() to wait on
        self._clean.set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def submit_round(
        self, open_incidents: Iterable[Mapping[str, Any]], transitions: Iterable[Transition]
    ) -> None:
        """Called after each round with the open incidents and what changed. Never blocks."""
        now = self.now()
        firing = {str(i["id"]): dict(i) for i in open_incidents}
        for incident_id, labels in list(self._sent_labels.items()):
            current = firing.get(incident_id)
            if current is not None and alert_labels(current) == labels:
                continue
            # Closed, merged, or relabelled: resolve the label set Alertmanager knows.
            old = self._firing.get(incident_id)
            end = now
            if current is None and old is not None:
                closing = next(
                    (t.incident for t in transitions
                     if str(t.incident["id"]) == incident_id and t.event is Event.CLOSED),
                    None,
                )
                if closing is not None and closing.get("end"):
                    end = datetime.fromisoformat(str(closing["end"]).replace("Z", "+00:00"))
            source = old or {"start": format_time(now)}
            self._resolved[_label_key(labels)] = self._alert(labels, source, ends_at=end)
            del self._sent_labels[incident_id]
        self._firing = firing
        self._mark_dirty()

    def alerts(self) -> list[dict[str, Any]]:
        """The batch the next POST would send: every firing alert plus pending resolutions."""
        now = self.now()
        ends_at = now + timedelta(seconds=max(60.0, 4 * self.resend_interval_s))
        batch = [
            self._alert(alert_labels(incident), incident, ends_at=ends_at)
            for incident in self._firing.values()
        ]
        return batch + list(self._resolved.values())

    def _alert(
        self, labels: Mapping[str, str], incident: Mapping[str, Any], ends_at: datetime
    ) -> dict[str, Any]:
        annotations = {"vantage": self.vantage}
        for key in ("min_level", "score", "id"):
            if key in incident:
                annotations[key] = str(incident[key])
        annotations["summary"] = (
            f"{incident.get('kind', 'incident')} in {incident.get('country', '?')} "
            f"({incident.get('scope', '?')} {incident.get('entity', '?')}), "
            f"level {incident.get('min_level', '?')}"
        )
        alert: dict[str, Any] = {
            "labels": dict(labels),
            "annotations": annotations,
            "startsAt": str(incident["start"]),
            "endsAt": format_time(ends_at),
        }
        if self.generator_url:
            alert["generatorURL"] = self.generator_url
        return alert

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": self.user_agent})
        self._task = asyncio.create_task(self._run(), name="alertmanager-sink")

    async def close(self, drain_s: float = 2.0) -> None:
        await drain_then_stop(self._task, self._session, self._clean.wait, drain_s)
        self._task = self._session = None

    async def _run(self) -> None:
        assert self._session is not None
        attempt = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=self.resend_interval_s)
            if not self._firing and not self._resolved:
                self._mark_clean()
                continue
            resolved_now = dict(self._resolved)
            sending = dict(self._firing)
            ok, _retry, what = await _post_json(
                self._session, self.url, self.alerts(), self.timeout_s
            )
            if ok:
                attempt = 0
                self.stats.sent += 1
                for key in resolved_now:
                    self._resolved.pop(key, None)
                for incident_id, incident in sending.items():
                    if incident_id in self._firing:
                        self._sent_labels[incident_id] = alert_labels(incident)
                if self._firing == sending and not self._resolved:
                    self._mark_clean()
                continue
            self.stats.failed_attempts += 1
            delay = self.backoff.delay(attempt)
            attempt += 1
            log.warning("alertmanager: %s; retrying in %.1f s", what, delay)
            await asyncio.sleep(delay)
            self._mark_dirty()

    def _mark_dirty(self) -> None:
        self._dirty.set()
        self._clean.clear()

    def _mark_clean(self) -> None:
        self._dirty.clear()
        self._clean.set()
