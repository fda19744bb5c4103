"""The central detector: judges the merged series of every shard and vantage through PromQL.

Daemons (`run --shard i/N`, one set per vantage) are scraped by Prometheus or remote-write into
Prometheus-compatible storage. This service asks that storage, every bin, for the counts summed
across shards but kept apart per vantage (the `vantage` label from external_labels,
relabelling, or the daemons' remote write), forms the consensus series (monitor/vantages.py),
runs the same `LiveDetector` the daemon runs on them, and raises incidents through the same
lifecycle and sinks. Each vantage also gets its own detector, so a vantage that is offline or
sees a country down alone gets a vantage incident, never a country one.

It serves /metrics, /healthz, /api/status and /api/incidents like the daemon (monitor/api.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pandas as pd
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor.api import ApiServer
from monitor.clock import Clock
from monitor.config import Config
from monitor.detect import DetectorConfig, LiveDetector
from monitor.errors import InputError
from monitor.export import MetricsState, make_registry, render_metrics
from monitor.incidents import IncidentLifecycle, Transition, format_time
from monitor.series import prometheus_query_range
from monitor.sinks import AlertmanagerSink, WebhookSink
from monitor.vantages import (
    COUNT_COLUMNS,
    HEALTH_COLUMNS,
    Place,
    VantageJudge,
    consensus_points,
    empty_counts,
    empty_health,
    healthy_mask,
    one_vantage_points,
)

log = logging.getLogger(__name__)

CENTRAL_NAME: Final = "central"
PROMETHEUS_MAX_POINTS: Final = 10_000
# Series without a vantage label (one vantage, scraped without relabelling) form one vantage.
UNLABELLED: Final = "unlabelled"


@dataclass(frozen=True, slots=True)
class CentralSettings:
    prometheus_url: str
    bin_seconds: int = 300  # the daemons' interval_s: one bin per round
    lag_s: float = 60.0  # how long after a bin ends it is judged (rounds finish, scrapes land)
    history_s: float = 8 * 86400.0  # primed from this much history at start
    vantage_label: str = "vantage"
    query_timeout_s: float = 30.0


@dataclass(slots=True)
class Readings:
    """What the storage said for a span of bins: per-vantage counts and health."""

    counts: pd.DataFrame  # vantages.COUNT_COLUMNS
    health: pd.DataFrame  # vantages.HEALTH_COLUMNS
    problems: list[str]


def read_vantages(settings: CentralSettings, since: datetime, until: datetime) -> Readings:
    """Counts summed across shards, per vantage, country (and network) and method."""
    label = settings.vantage_label
    step = settings.bin_seconds
    start = since.timestamp() // step * step
    end = until.timestamp()
    windows = []
    t = start
    while t <= end:
        windows.append((t, min(end, t + step * (PROMETHEUS_MAX_POINTS - 1))))
        t += step * PROMETHEUS_MAX_POINTS
    problems: list[str] = []

    def collect(query: str) -> list[tuple[dict[str, str], list[Any]]]:
        out = []
        for a, b in windows:
            for series in prometheus_query_range(settings.prometheus_url, query, a, b, step,
                                    settings.query_timeout_s):
                labels = series.get("metric") or {}
                out.append(({str(k): str(v) for k, v in labels.items()},
                            series.get("values") or []))
        return out

    rows: dict[tuple[datetime, str, str, str, str, str], list[float]] = {}
    for metric, role in (("shutdown_monitor_targets_up", 0), ("shutdown_monitor_targets", 1)):
        for by_asn in (False, True):
            selector = '{asn!=""}' if by_asn else ""
            by = f"{label}, country, asn, method" if by_asn else f"{label}, country, method"
            query = f"sum by ({by}) ({metric}{selector})"
            for labels, values in collect(query):
                vantage = labels.get(label) or UNLABELLED
                country, method = labels.get("country", "").upper(), labels.get("method", "")
                if not country or not method:
                    problems.append(f"{query}: a series without country/method labels "
                                    f"({labels}): skipped")
                    continue
                scope, entity = ("asn", labels.get("asn", "")) if by_asn else ("country", country)
                for pair in values:
                    try:
                        when = datetime.fromtimestamp(float(pair[0]), UTC)
                        number = float(pair[1])
                    except (TypeError, ValueError, IndexError):
                        problems.append(f"{query}: bad sample {pair!r}: skipped")
                        continue
                    rows.setdefault((when, vantage, country, scope, entity, method),
                                    [0.0, 0.0])[role] = number
    counts = pd.DataFrame([(*k, v[0], v[1]) for k, v in rows.items()],
                          columns=list(COUNT_COLUMNS)) if rows else empty_counts()
    health_rows = []
    query = f"avg by ({label}) (shutdown_monitor_vantage_up)"
    for labels, values in collect(query):
        vantage = labels.get(label) or UNLABELLED
        for pair in values:
            try:
                health_rows.append((datetime.fromtimestamp(float(pair[0]), UTC), vantage,
                                    float(pair[1])))
            except (TypeError, ValueError, IndexError):
                problems.append(f"{query}: bad sample {pair!r}: skipped")
    health = pd.DataFrame(health_rows, columns=list(HEALTH_COLUMNS)) if health_rows \
        else empty_health()
    return Readings(counts, health, problems)


class CentralDetector:
    """The service. `run()` follows the storage until stopped; `judge_until()` is one step."""

    def __init__(self, settings: CentralSettings, clock: Clock, *,
                 config: Config | None = None, listen: str = "127.0.0.1:9320") -> None:
        self.settings = settings
        self.clock = clock
        self.config = config
        self.listen = listen
        detector_settings = dict(config.detector) if config is not None else {}
        self.detector_config = DetectorConfig(**detector_settings)
        self.detector_config.validate()
        self.consensus = self._new_detector()
        self.per_vantage: dict[str, LiveDetector] = {}
        self.judge = VantageJudge(min_bins=self.detector_config.min_bins)
        self.lifecycle = IncidentLifecycle()
        self.metrics = MetricsState()
        self._registry = make_registry(self.metrics)
        self.stats = _CentralStats()
        self._registry.register(_CentralCollector(self))
        self.next_bin: datetime | None = None  # the first bin not judged yet
        self.started_at = clock.now()
        self.last_success: datetime | None = None
        self.last_error: str | None = None
        self.healthy_vantages: dict[str, bool] = {}
        self.api: ApiServer | None = None
        self._webhook: WebhookSink | None = None
        self._alertmanager: AlertmanagerSink | None = None
        self._stop = asyncio.Event()

    def _new_detector(self) -> LiveDetector:
        return LiveDetector(self.detector_config, bin_seconds=self.settings.bin_seconds)

    # -- judging ---------------------------------------------------------------------------
    def judge_until(self, until: datetime) -> list[Transition]:
        """Read and judge every bin up to `until` (blocking I/O: run it in a thread).

        The first call primes the detectors with `history_s` of history (incidents found there
        that ended long ago are not announced); later calls judge bin by bin.
        """
        step = timedelta(seconds=self.settings.bin_seconds)
        cut = _floor(until, self.settings.bin_seconds)
        if self.next_bin is None:
            since = _floor(until - timedelta(seconds=self.settings.history_s),
                           self.settings.bin_seconds)
            readings = self._read(since, cut)
            self._prime(readings, cut)
            self.next_bin = cut + step
            return self._observe(list(self._open_after_prime()), cut)
        if cut < self.next_bin:
            return []
        readings = self._read(self.next_bin, cut)
        transitions: list[Transition] = []
        when = self.next_bin
        while when <= cut:
            transitions += self._judge_bin(readings, when)
            when += step
        self.next_bin = when
        return transitions

    def _read(self, since: datetime, until: datetime) -> Readings:
        try:
            readings = read_vantages(self.settings, since, until)
        except InputError as exc:
            self.stats.query_errors += 1
            self.last_error = str(exc)
            raise
        self.stats.malformed += len(readings.problems)
        for problem in readings.problems[:5]:
            log.warning("central: %s", problem)
        self.last_success = self.clock.now()
        self.last_error = None
        return readings

    def _prime(self, readings: Readings, cut: datetime) -> None:
        counts, health = readings.counts, readings.health
        self.consensus.prime(consensus_points(counts, health,
                                              self.detector_config.vantage_down_below))
        for vantage in sorted(set(counts["vantage"]) | set(health["vantage"])):
            detector = self.per_vantage.setdefault(vantage, self._new_detector())
            detector.prime(one_vantage_points(counts, health, vantage))
        self.metrics.set_levels(self.consensus.levels())
        log.warning("central: primed from %d count rows of %d vantage(s) up to %s",
                    len(counts), len(self.per_vantage), format_time(cut))

    def _open_after_prime(self) -> Iterable[dict[str, Any]]:
        for incident in self.consensus.open_incidents():
            yield incident.to_json()

    def _judge_bin(self, readings: Readings, when: datetime) -> list[Transition]:
        counts = readings.counts[readings.counts["time"] == when]
        health = readings.health[readings.health["time"] == when]
        down_below = self.detector_config.vantage_down_below
        consensus = [i.to_json() for i in self.consensus.update(
            consensus_points(counts, health, down_below), when)]
        healthy: dict[str, bool] = {}
        if not counts.empty:
            mask = healthy_mask(counts, health, down_below)
            for vantage, ok in zip(counts["vantage"], mask, strict=True):
                healthy[vantage] = healthy.get(vantage, True) and bool(ok)
        for vantage in set(health["vantage"]) - set(healthy):
            healthy[vantage] = False  # control targets reported, but no counts at all
        own: dict[str, list[dict[str, Any]]] = {}
        measured: dict[str, set[Place]] = {}
        for vantage in sorted(set(healthy) | set(self.per_vantage)):
            detector = self.per_vantage.setdefault(vantage, self._new_detector())
            own[vantage] = [i.to_json() for i in detector.update(
                one_vantage_points(counts, health, vantage), when)]
            mine = counts[counts["vantage"] == vantage]
            measured[vantage] = set(zip(mine["country"], mine["scope"], mine["entity"],
                                        strict=True))
        vantage_incidents = self.judge.judge(when, healthy, own, consensus, measured)
        self.healthy_vantages = {v: healthy.get(v, False) for v in sorted(self.judge.known)}
        self.stats.bins += 1
        self.metrics.set_levels(self.consensus.levels())
        return self._observe([*consensus, *vantage_incidents], when)

    def _observe(self, incidents: list[dict[str, Any]], when: datetime) -> list[Transition]:
        try:
            transitions = self.lifecycle.observe(incidents, when, complete=True)
        except ValueError as exc:
            self.metrics.record_malformed("detector")
            log.error("central: the detector returned a malformed incident: %s", exc)
            return []
        for transition in transitions:
            incident = transition.incident
            log.warning("central incident %s: %s %s %s/%s severity %s since %s",
                        transition.event, incident["kind"], incident["country"],
                        incident["scope"], incident["entity"], incident["severity"],
                        incident["start"])
            if self._webhook is not None:
                self._webhook.submit(transition)
        if self._alertmanager is not None:
            self._alertmanager.submit_round(self.lifecycle.open_incidents(), transitions)
        self.metrics.set_active_incidents(self.lifecycle.open_incidents())
        return transitions

    # -- the service -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.config is not None:
            await self._start_sinks(self.config)
        self.api = ApiServer(self, self.listen)
        await self.api.start()
        log.warning("central detector on %s:%d reading %s, %d s bins", self.api.host,
                    self.api.port, self.settings.prometheus_url, self.settings.bin_seconds)

    async def _start_sinks(self, config: Config) -> None:
        agent = f"shutdown-monitor (+{config.contact_url})"
        if config.sinks.webhook is not None:
            hook = config.sinks.webhook
            self._webhook = WebhookSink(hook.url, vantage=CENTRAL_NAME, timeout_s=hook.timeout_s,
                                        retries=hook.retries, user_agent=agent)
            await self._webhook.start()
        if config.sinks.alertmanager is not None:
            self._alertmanager = AlertmanagerSink(
                config.sinks.alertmanager.url, vantage=CENTRAL_NAME, now=self.clock.now,
                resend_interval_s=min(float(self.settings.bin_seconds), 300.0),
                user_agent=agent)
            await self._alertmanager.start()

    def request_stop(self) -> None:
        self._stop.set()

    async def step(self) -> list[Transition]:
        """Judge what is due now (bins that ended at least `lag_s` ago)."""
        until = self.clock.now() - timedelta(seconds=self.settings.lag_s)
        try:
            return await asyncio.to_thread(self.judge_until, until)
        except InputError as exc:
            log.error("central: %s (retrying next bin)", exc)
            return []

    async def run(self, max_steps: int | None = None) -> int:
        await self.start()
        steps = 0
        try:
            while not self._stop.is_set() and (max_steps is None or steps < max_steps):
                await self.step()
                steps += 1
                now = self.clock.now()
                due = _floor(now, self.settings.bin_seconds) + timedelta(
                    seconds=self.settings.bin_seconds + self.settings.lag_s)
                sleeper = asyncio.ensure_future(self.clock.sleep_until(
                    due if due > now else now + timedelta(seconds=self.settings.bin_seconds)))
                stopper = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for task in (sleeper, stopper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            await self.close()
        return 0

    async def close(self) -> None:
        if self.api is not None:
            await self.api.stop()
            self.api = None
        if self._webhook is not None:
            await self._webhook.close(1.0)
        if self._alertmanager is not None:
            await self._alertmanager.close(1.0)

    # -- what the API shows ----------------------------------------------------------------
    def incidents(self) -> list[dict[str, Any]]:
        return self.lifecycle.recent_incidents()

    def exposition(self) -> tuple[bytes, str]:
        return render_metrics(self._registry)

    def health(self) -> tuple[bool, str]:
        allowed = timedelta(seconds=3 * self.settings.bin_seconds + self.settings.lag_s + 60)
        now = self.clock.now()
        if self.last_success is None:
            if now - self.started_at <= allowed:
                return True, "starting: storage not read yet"
            return False, f"storage never answered: {self.last_error}"
        if now - self.last_success > allowed:
            return False, f"storage last answered at {format_time(self.last_success)}: " \
                          f"{self.last_error}"
        return True, f"storage read at {format_time(self.last_success)}"

    def status(self) -> dict[str, Any]:
        return {
            "prometheus": self.settings.prometheus_url,
            "bin_seconds": self.settings.bin_seconds,
            "next_bin": None if self.next_bin is None else format_time(self.next_bin),
            "vantages": {v: {"healthy": ok} for v, ok in self.healthy_vantages.items()},
            "open_incidents": len(self.lifecycle.open_incidents()),
            "last_error": self.last_error,
        }


def _floor(when: datetime, seconds: int) -> datetime:
    return datetime.fromtimestamp(when.timestamp() // seconds * seconds, UTC)


@dataclass(slots=True)
class _CentralStats:
    bins: int = 0
    query_errors: int = 0
    malformed: int = 0


class _CentralCollector(Collector):
    """shutdown_monitor_central_*: bins judged, storage errors, vantages by health."""

    def __init__(self, central: CentralDetector) -> None:
        self.central = central

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        stats = self.central.stats
        yield CounterMetricFamily("shutdown_monitor_central_bins", "Bins judged.",
                                  value=stats.bins)
        yield CounterMetricFamily("shutdown_monitor_central_query_errors",
                                  "Storage queries that failed (retried next bin).",
                                  value=stats.query_errors)
        yield CounterMetricFamily("shutdown_monitor_central_malformed_series",
                                  "Series or samples from the storage skipped as malformed.",
                                  value=stats.malformed)
        vantages = GaugeMetricFamily("shutdown_monitor_central_vantage_healthy",
                                     "1 if the vantage reported and its control targets "
                                     "answered in the last bin.", labels=["vantage"])
        for vantage, ok in sorted(self.central.healthy_vantages.items()):
            vantages.add_metric([vantage], 1 if ok else 0)
        yield vantages
        if self.central.next_bin is not None:
            yield GaugeMetricFamily("shutdown_monitor_central_judged_until_timestamp_seconds",
                                    "End of the last bin judged.",
                                    value=self.central.next_bin.timestamp())
