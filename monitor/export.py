"""Prometheus export: a custom Collector that builds every metric family at scrape time.

The daemon updates one `MetricsState` after each round (and on reloads, detector runs, store
writes); the `MonitorCollector` turns a consistent snapshot of it into metric families when
Prometheus scrapes (prometheus/client_python's custom-collector pattern: no long-lived metric
objects holding stale label sets, a country that vanishes from the config vanishes from /metrics).

Labels are bounded sets only: country, asn, method, result (a Failure name), scope, entity,
signal, kind, severity, source. Never an address, URL or error text. The vantage name is not a
label: Prometheus adds it (external_labels or relabelling). docs/metrics.md lists every metric.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from monitor.rounds import RoundOutcome
from probes.base import Failure

PREFIX: Final = "shutdown_monitor"
# RTT buckets in seconds: from a LAN (~1 ms) to a congested satellite or throttled path (>2 s).
RTT_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
)
KNOWN_RESULTS: Final = frozenset({"success", *(str(f) for f in Failure)})
INCIDENT_LABELS: Final = ("country", "scope", "entity", "kind", "severity")


def _package_version() -> str:
    try:
        return version("shutdown-monitor")
    except PackageNotFoundError:
        return "unknown"


@dataclass(slots=True)
class _Histogram:
    """Cumulative counts per bucket (non-cumulative storage; made cumulative at scrape)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(RTT_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(RTT_BUCKETS, value)] += 1
        self.total += value


@dataclass(frozen=True, slots=True)
class _Snapshot:
    targets: dict[tuple[str, str, str], tuple[int, int]]
    probes: dict[tuple[str, str], int]
    rtt: dict[tuple[str, str], tuple[tuple[int, ...], float]]
    rounds: int
    rounds_abandoned: int
    round_timestamp: float | None
    round_duration: float | None
    vantage_up: bool | None
    control: tuple[int, int] | None
    levels: dict[tuple[str, str, str, str], float]
    incidents: dict[tuple[str, str, str, str, str], int]
    reload_errors: int
    reload_ok: bool | None
    reload_ok_timestamp: float | None
    history_bytes: int | None
    history_write_errors: int
    malformed: dict[str, int]


class MetricsState:
    """The mutable numbers /metrics shows. Every method takes a lock, so a scrape served from
    another thread (or a thread pool) always sees whole rounds, never half of one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (country, asn or "", method) -> (total, up), replaced by every complete round.
        self._targets: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._probes: Counter[tuple[str, str]] = Counter()
        self._rtt: dict[tuple[str, str], _Histogram] = {}
        self._rounds = 0
        self._rounds_abandoned = 0
        self._round_timestamp: float | None = None
        self._round_duration: float | None = None
        self._vantage_up: bool | None = None
        self._control: tuple[int, int] | None = None
        self._levels: dict[tuple[str, str, str, str], float] = {}
        self._incidents: Counter[tuple[str, str, str, str, str]] = Counter()
        self._reload_errors = 0
        self._reload_ok: bool | None = None
        self._reload_ok_timestamp: float | None = None
        self._history_bytes: int | None = None
        self._history_write_errors = 0
        self._malformed: Counter[str] = Counter()

    def record_round(self, outcome: RoundOutcome) -> None:
        """Fold one round in: gauges from its counts, counters from its probes and RTTs.

        An abandoned round (SIGTERM mid-round) still adds the probes it sent, but its partial
        counts do not replace the last complete round's gauges.
        """
        with self._lock:
            for (method, result), n in outcome.probes.items():
                label = result if result in KNOWN_RESULTS else str(Failure.OTHER)
                self._probes[(method, label)] += n
            for rtt_key, rtts in outcome.rtts.items():
                histogram = self._rtt.setdefault(rtt_key, _Histogram())
                for rtt in rtts:
                    if math.isfinite(rtt) and rtt >= 0:
                        histogram.observe(rtt)
            if outcome.abandoned:
                self._rounds_abandoned += 1
                return
            targets: dict[tuple[str, str, str], tuple[int, int]] = {}
            for count in outcome.counts:
                key = (count.country, "" if count.asn is None else str(count.asn), count.method)
                total, up = targets.get(key, (0, 0))
                targets[key] = (total + count.total, up + count.up)
            self._targets = targets
            self._rounds += 1
            self._round_timestamp = outcome.time.timestamp()
            self._round_duration = outcome.duration_s
            self._vantage_up = outcome.vantage_up
            self._control = (outcome.control_total, outcome.control_up)

    def set_levels(self, levels: Iterable[tuple[str, str, str, str, float]]) -> None:
        """Replace the detector's levels: (country, scope, entity, signal, level). NaN (no
        baseline yet) is left out rather than exported."""
        fresh = {
            (country, scope, str(entity), signal): float(level)
            for country, scope, entity, signal, level in levels
            if math.isfinite(level)
        }
        with self._lock:
            self._levels = fresh

    def set_active_incidents(self, incidents: Iterable[dict[str, Any]]) -> None:
        """Replace the open incidents (incident JSON dicts); ended ones are ignored."""
        fresh: Counter[tuple[str, str, str, str, str]] = Counter()
        for incident in incidents:
            if incident.get("end") is None:
                c, s, e, k, v = (str(incident.get(name, "")) for name in INCIDENT_LABELS)
                fresh[(c, s, e, k, v)] += 1
        with self._lock:
            self._incidents = fresh

    def record_reload(self, ok: bool, now: float | None = None) -> None:
        """A configuration (re)load finished; `now` defaults to the wall clock."""
        with self._lock:
            self._reload_ok = ok
            if ok:
                self._reload_ok_timestamp = time.time() if now is None else now
            else:
                self._reload_errors += 1

    def record_malformed(self, source: str, n: int = 1) -> None:
        """Count malformed inputs skipped; `source` is a fixed word (e.g. "icmp", "state")."""
        with self._lock:
            self._malformed[source] += n

    def set_history_bytes(self, n: int) -> None:
        with self._lock:
            self._history_bytes = n

    def record_history_write_error(self) -> None:
        with self._lock:
            self._history_write_errors += 1

    def snapshot(self) -> _Snapshot:
        with self._lock:
            return _Snapshot(
                targets=dict(self._targets),
                probes=dict(self._probes),
                rtt={k: (tuple(h.counts), h.total) for k, h in self._rtt.items()},
                rounds=self._rounds,
                rounds_abandoned=self._rounds_abandoned,
                round_timestamp=self._round_timestamp,
                round_duration=self._round_duration,
                vantage_up=self._vantage_up,
                control=self._control,
                levels=dict(self._levels),
                incidents=dict(self._incidents),
                reload_errors=self._reload_errors,
                reload_ok=self._reload_ok,
                reload_ok_timestamp=self._reload_ok_timestamp,
                history_bytes=self._history_bytes,
                history_write_errors=self._history_write_errors,
                malformed=dict(self._malformed),
            )


def _name(short: str) -> str:
    return f"{PREFIX}_{short}"


class MonitorCollector(Collector):
    """Builds every shutdown_monitor_* family from a snapshot of `state` at scrape time."""

    def __init__(self, state: MetricsState) -> None:
        self.state = state
        self.version = _package_version()

    def describe(self) -> Iterable[Metric]:
        return []  # names are dynamic in content, fixed in set: no need to probe at register

    def collect(self) -> Iterator[Metric]:
        snap = self.state.snapshot()
        yield from self._targets(snap)
        yield from self._rounds(snap)
        yield from self._detector(snap)
        yield from self._housekeeping(snap)

    def _targets(self, snap: _Snapshot) -> Iterator[Metric]:
        labels = ["country", "asn", "method"]
        total = GaugeMetricFamily(
            _name("targets"), "Targets (or /24 blocks) probed in the last complete round.",
            labels=labels)
        up = GaugeMetricFamily(
            _name("targets_up"), "Targets (or /24 blocks) that answered in the last complete "
            "round. asn is empty for country-level endpoints and unattributed targets.",
            labels=labels)
        for key in sorted(snap.targets):
            n_total, n_up = snap.targets[key]
            total.add_metric(list(key), n_total)
            up.add_metric(list(key), n_up)
        yield total
        yield up
        probes = CounterMetricFamily(
            _name("probes"), "Probes sent, by method and result (success or a failure name).",
            labels=["method", "result"])
        for (method, result), n in sorted(snap.probes.items()):
            probes.add_metric([method, result], n)
        yield probes
        rtt = HistogramMetricFamily(
            _name("rtt_seconds"), "Round-trip time of answered probes, by country and method.",
            labels=["country", "method"])
        for (country, method), (counts, total_s) in sorted(snap.rtt.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*RTT_BUCKETS, math.inf), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
            rtt.add_metric([country, method], buckets, total_s)
        yield rtt

    def _rounds(self, snap: _Snapshot) -> Iterator[Metric]:
        yield CounterMetricFamily(
            _name("rounds"), "Complete rounds since start.", value=snap.rounds)
        yield CounterMetricFamily(
            _name("rounds_abandoned"), "Rounds cut short (shutdown mid-round); not stored.",
            value=snap.rounds_abandoned)
        if snap.round_timestamp is not None:
            yield GaugeMetricFamily(
                _name("round_timestamp_seconds"),
                "The last complete round's time (round clock, aligned to the interval).",
                value=snap.round_timestamp)
        if snap.round_duration is not None:
            yield GaugeMetricFamily(
                _name("round_duration_seconds"), "Wall-clock seconds the last complete round took.",
                value=snap.round_duration)
        if snap.vantage_up is not None:
            yield GaugeMetricFamily(
                _name("vantage_up"), "1 if the control targets abroad answered in the last round "
                "(this vantage point is online), else 0.", value=1 if snap.vantage_up else 0)
        if snap.control is not None:
            control = GaugeMetricFamily(
                _name("control_targets"), "Control targets in the last round, by state.",
                labels=["state"])
            total, up = snap.control
            control.add_metric(["up"], up)
            control.add_metric(["down"], total - up)
            yield control

    def _detector(self, snap: _Snapshot) -> Iterator[Metric]:
        level = GaugeMetricFamily(
            _name("level"), "Current value over its baseline (1 = ordinary) per country, "
            "network (scope asn) or region, per signal.",
            labels=["country", "scope", "entity", "signal"])
        for level_key, value in sorted(snap.levels.items()):
            level.add_metric(list(level_key), value)
        yield level
        active = GaugeMetricFamily(
            _name("incident_active"), "Open incidents (normally 1 per label set).",
            labels=list(INCIDENT_LABELS))
        for key, n in sorted(snap.incidents.items()):
            active.add_metric(list(key), n)
        yield active

    def _housekeeping(self, snap: _Snapshot) -> Iterator[Metric]:
        yield CounterMetricFamily(
            _name("config_reload_errors"), "Configuration reloads (SIGHUP) that failed.",
            value=snap.reload_errors)
        if snap.reload_ok is not None:
            yield GaugeMetricFamily(
                _name("config_last_reload_success"),
                "1 if the last configuration reload succeeded, else 0.",
                value=1 if snap.reload_ok else 0)
        if snap.reload_ok_timestamp is not None:
            yield GaugeMetricFamily(
                _name("config_last_reload_success_timestamp_seconds"),
                "When the configuration was last loaded successfully.",
                value=snap.reload_ok_timestamp)
        if snap.history_bytes is not None:
            yield GaugeMetricFamily(
                _name("history_bytes"), "Bytes on disk of the embedded history store.",
                value=snap.history_bytes)
        yield CounterMetricFamily(
            _name("history_write_errors"), "Failed writes to the embedded history store.",
            value=snap.history_write_errors)
        malformed = CounterMetricFamily(
            _name("malformed"), "Malformed packets, responses or files counted and skipped, "
            "by source.", labels=["source"])
        for source, n in sorted(snap.malformed.items()):
            malformed.add_metric([source], n)
        yield malformed
        info = GaugeMetricFamily(
            _name("build_info"), "Always 1; the version of shutdown-monitor.", labels=["version"])
        info.add_metric([self.version], 1)
        yield info


def make_registry(state: MetricsState, process_metrics: bool = True) -> CollectorRegistry:
    """A registry with the monitor's collector and, by default, the standard process_* metrics
    (memory, CPU, open files) for the monitor's own health dashboard."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(state))
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition body and its content type, for the aiohttp /metrics handler.

    The classic 0.0.4 text format: every Prometheus 2.x parses it.
    """
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
