"""The Prometheus export: exposition parsed by prometheus_client, linted by promtool, and scraped
by a real Prometheus whose PromQL answers must equal the numbers fed in."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitor.export import RTT_BUCKETS, MetricsState, make_registry, render_metrics
from monitor.rounds import RoundOutcome, TargetCount
from monitor.series import SeriesPoint
from tests.prom import MetricsEndpoint, PrometheusServer, needs_prometheus, value, values_by

T0 = datetime(2022, 1, 5, 10, 30, tzinfo=UTC)
BOUNDED_LABELS = {"country", "asn", "method", "result", "le", "scope", "entity", "signal",
                  "kind", "severity", "source", "state", "version"}


def kz_round(index: int, kz_up: int, vantage_up: bool = True) -> RoundOutcome:
    """A round as run_round would hand it over: points, counts, probes, RTTs, control."""
    when = T0 + timedelta(minutes=5 * index)
    counts = [
        TargetCount("KZ", 9198, "icmp", total=100, up=kz_up),
        TargetCount("KZ", 29355, "icmp", total=50, up=45 - index),
        TargetCount("KZ", None, "http", total=3, up=3),
        TargetCount("BY", None, "icmp", total=20, up=19),
    ]
    success = sum(c.up for c in counts if c.method == "icmp")
    probes: Counter[tuple[str, str]] = Counter({
        ("icmp", "success"): success,
        ("icmp", "timeout"): 170 - success,
        ("http", "success"): 3,
        ("dns", "dns_servfail"): index + 1,
    })
    rtts = {
        ("KZ", "icmp"): [0.004, 0.03 + index / 100, 0.1, 0.2, 2.5, 7.0][: 4 + index],
        ("KZ", "http"): [0.3],
    }
    points = [
        SeriesPoint(when, "KZ", "country", "KZ", "icmp_blocks_up", float(kz_up + 45 - index)),
        SeriesPoint(when, "KZ", "asn", "9198", "icmp_blocks_up", float(kz_up)),
    ]
    return RoundOutcome(
        time=when, duration_s=12.5 + index, points=points, counts=counts, probes=probes,
        rtts=rtts, control_total=4, control_up=4 if vantage_up else 0, vantage_up=vantage_up)


OPEN_INCIDENT: dict[str, Any] = {
    "id": "kz-1", "country": "KZ", "scope": "asn", "entity": "9198",
    "kind": "network_outage", "severity": "critical", "start": "2022-01-05T10:35:00Z",
    "end": None, "min_level": 0.1, "score": 3.0, "signals": ["icmp_blocks_up"], "networks": [],
}
CLOSED_INCIDENT = {**OPEN_INCIDENT, "id": "kz-0", "end": "2022-01-05T10:20:00Z"}


def samples(state: MetricsState) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = render_metrics(make_registry(state, process_metrics=False))
    assert content_type.startswith("text/plain; version=0.0.4")
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def test_exposition_carries_the_round_numbers() -> None:
    state = MetricsState()
    state.record_round(kz_round(0, kz_up=80))
    state.record_round(kz_round(1, kz_up=10))
    state.set_levels([("KZ", "asn", "9198", "icmp_blocks_up", 0.125),
                      ("KZ", "country", "KZ", "icmp_blocks_up", math.nan)])
    state.set_active_incidents([OPEN_INCIDENT, CLOSED_INCIDENT])
    state.record_malformed("icmp", 3)
    found = samples(state)
    assert found[("shutdown_monitor_targets", labels(country="KZ", asn="9198", method="icmp"))] \
        == 100
    assert found[("shutdown_monitor_targets_up",
                  labels(country="KZ", asn="9198", method="icmp"))] == 10
    assert found[("shutdown_monitor_targets_up", labels(country="KZ", asn="", method="http"))] \
        == 3
    assert found[("shutdown_monitor_probes_total", labels(method="dns", result="dns_servfail"))] \
        == 1 + 2
    icmp = labels(country="KZ", method="icmp")
    assert found[("shutdown_monitor_rtt_seconds_count", icmp)] == 4 + 5
    bucket = "shutdown_monitor_rtt_seconds_bucket"
    assert found[(bucket, labels(country="KZ", method="icmp", le="0.1"))] == 3 + 3
    assert found[(bucket, labels(country="KZ", method="icmp", le="+Inf"))] == 9
    assert found[("shutdown_monitor_rtt_seconds_sum", icmp)] == pytest.approx(
        sum([0.004, 0.03, 0.1, 0.2]) + sum([0.004, 0.04, 0.1, 0.2, 2.5]))
    assert found[("shutdown_monitor_rounds_total", ())] == 2
    assert found[("shutdown_monitor_round_timestamp_seconds", ())] == \
        (T0 + timedelta(minutes=5)).timestamp()
    assert found[("shutdown_monitor_round_duration_seconds", ())] == 13.5
    assert found[("shutdown_monitor_level", labels(
        country="KZ", scope="asn", entity="9198", signal="icmp_blocks_up"))] == 0.125
    # No baseline yet (NaN) is left out, not exported as NaN.
    assert not [k for k in found if k[0] == "shutdown_monitor_level" and ("scope", "country")
                in k[1]]
    assert found[("shutdown_monitor_incident_active", labels(
        country="KZ", scope="asn", entity="9198", kind="network_outage",
        severity="critical"))] == 1
    assert sum(v for k, v in found.items() if k[0] == "shutdown_monitor_incident_active") == 1
    assert found[("shutdown_monitor_malformed_total", labels(source="icmp"))] == 3
    assert found[("shutdown_monitor_history_write_errors_total", ())] == 0
    for _name, label_set in found:
        assert {name for name, _ in label_set} <= BOUNDED_LABELS


def test_unknown_results_become_other_and_abandoned_rounds_keep_gauges() -> None:
    state = MetricsState()
    state.record_round(kz_round(0, kz_up=80))
    partial = kz_round(1, kz_up=0)
    partial.abandoned = True
    partial.probes[("tcp", "connect failed: [Errno 113] 10.1.2.3")] = 2
    state.record_round(partial)
    found = samples(state)
    # The partial round's probes were sent: counted. Its counts are partial: not shown.
    assert found[("shutdown_monitor_probes_total", labels(method="tcp", result="other"))] == 2
    assert found[("shutdown_monitor_probes_total", labels(method="dns", result="dns_servfail"))] \
        == 1 + 2
    assert found[("shutdown_monitor_targets_up",
                  labels(country="KZ", asn="9198", method="icmp"))] == 80
    assert found[("shutdown_monitor_rounds_total", ())] == 1
    assert found[("shutdown_monitor_rounds_abandoned_total", ())] == 1


def test_a_country_missing_from_the_next_round_disappears() -> None:
    state = MetricsState()
    state.record_round(kz_round(0, kz_up=80))
    smaller = kz_round(1, kz_up=80)
    smaller.counts = [c for c in smaller.counts if c.country == "KZ"]
    state.record_round(smaller)
    assert not [k for k in samples(state)
                if k[0].startswith("shutdown_monitor_targets") and ("country", "BY") in k[1]]


def test_reload_and_history_gauges() -> None:
    state = MetricsState()
    found = samples(state)
    assert ("shutdown_monitor_config_last_reload_success", ()) not in found
    state.record_reload(True, now=1_700_000_000.0)
    state.record_reload(False)
    state.set_history_bytes(4096)
    state.record_history_write_error()
    found = samples(state)
    assert found[("shutdown_monitor_config_last_reload_success", ())] == 0
    assert found[("shutdown_monitor_config_last_reload_success_timestamp_seconds", ())] == \
        1_700_000_000.0
    assert found[("shutdown_monitor_config_reload_errors_total", ())] == 1
    assert found[("shutdown_monitor_history_bytes", ())] == 4096
    assert found[("shutdown_monitor_history_write_errors_total", ())] == 1


def test_scrapes_from_another_thread_see_whole_rounds() -> None:
    state = MetricsState()
    registry = make_registry(state, process_metrics=False)
    seen: list[tuple[float, float]] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            body, _ = render_metrics(registry)
            found = {}
            for family in text_string_to_metric_families(body.decode()):
                for sample in family.samples:
                    if sample.name in ("shutdown_monitor_rounds_total",
                                       "shutdown_monitor_targets"):
                        found[sample.name] = sample.value
            if "shutdown_monitor_targets" in found:
                seen.append((found["shutdown_monitor_rounds_total"],
                             found["shutdown_monitor_targets"]))

    scraper = threading.Thread(target=scrape)
    scraper.start()
    index, deadline = 0, time.monotonic() + 20

    def interleaved() -> bool:
        return len(seen) >= 50 and len({rounds for rounds, _ in seen}) >= 3

    while not interleaved() and time.monotonic() < deadline:  # record until scrapes ran between
        index += 1
        outcome = RoundOutcome(time=T0 + timedelta(minutes=index), duration_s=1.0,
                               counts=[TargetCount("KZ", 9198, "icmp", total=index, up=0)])
        state.record_round(outcome)
    stop.set()
    scraper.join()
    assert interleaved(), f"scrapes saw rounds {sorted({r for r, _ in seen})}"
    assert all(rounds == targets for rounds, targets in seen)  # never half a round


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="LOUD SKIP: promtool missing (apt-get install prometheus)")
def test_promtool_finds_nothing_to_lint() -> None:
    state = MetricsState()
    state.record_round(kz_round(0, kz_up=80))
    state.set_levels([("KZ", "asn", "9198", "icmp_blocks_up", 0.8)])
    state.set_active_incidents([OPEN_INCIDENT])
    state.record_reload(True)
    state.set_history_bytes(1)
    state.record_malformed("dns")
    body, _ = render_metrics(make_registry(state))
    lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                          timeout=60)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def cumulative_buckets(rtts: list[float]) -> dict[str, float]:
    bounds = [*RTT_BUCKETS, math.inf]
    return {("+Inf" if b == math.inf else repr(b)): float(sum(r <= b for r in rtts))
            for b in bounds}


RATIO_RULES = {"groups": [{"name": "shutdown-monitor-test", "rules": [{
    "record": "country_method:shutdown_monitor_targets_up:ratio",
    "expr": "sum by (country, method) (shutdown_monitor_targets_up)"
            " / sum by (country, method) (shutdown_monitor_targets)",
}]}]}


@needs_prometheus
def test_real_prometheus_sees_exactly_what_was_measured(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(RATIO_RULES))
    state = MetricsState()
    rounds = [kz_round(0, kz_up=80), kz_round(1, kz_up=30), kz_round(2, kz_up=5, vantage_up=False)]
    state.record_round(rounds[0])
    state.set_active_incidents([OPEN_INCIDENT, CLOSED_INCIDENT])
    state.record_reload(True)
    state.set_history_bytes(12_345)
    state.record_malformed("icmp", 2)
    with MetricsEndpoint(make_registry(state)) as endpoint, PrometheusServer(
        [endpoint.target], scrape_interval="1s", external_labels={"vantage": "test-vantage"},
        rule_files=[rules],
    ) as prom:
        prom.wait_for_value("shutdown_monitor_rounds_total", 1)
        after_first = prom.wait_for_fresh_scrape()
        for outcome in rounds[1:]:
            state.record_round(outcome)
        state.set_levels([("KZ", "asn", "9198", "icmp_blocks_up", 0.0625),
                          ("KZ", "country", "KZ", "icmp_blocks_up", 0.25)])
        prom.wait_for_value("shutdown_monitor_rounds_total", 3)
        after_last = prom.wait_for_fresh_scrape()

        last = rounds[-1]
        icmp_kz = prom.query('shutdown_monitor_targets_up{country="KZ",method="icmp"}')
        assert values_by(icmp_kz, "asn") == {
            str(c.asn): float(c.up) for c in last.counts
            if c.country == "KZ" and c.method == "icmp"}
        assert value(prom.query(
            'shutdown_monitor_targets{country="BY",asn="",method="icmp"}')) == 20
        assert value(prom.query(
            'sum(shutdown_monitor_targets_up{country="KZ"})')) == 5 + 43 + 3

        # Counters: the totals, and the increase between two scrapes, exactly.
        total = sum((r.probes for r in rounds), Counter[tuple[str, str]]())
        by_result = values_by(prom.query('shutdown_monitor_probes_total{method="icmp"}'),
                              "result")
        assert by_result == {"success": total[("icmp", "success")],
                             "timeout": total[("icmp", "timeout")]}
        timeout_q = 'shutdown_monitor_probes_total{method="icmp",result="timeout"}'
        increase = value(prom.query(timeout_q, at=after_last)) - value(
            prom.query(timeout_q, at=after_first))
        assert increase == sum(r.probes[("icmp", "timeout")] for r in rounds[1:])

        # The RTT histogram: every bucket, the count and the sum.
        all_rtts = [rtt for r in rounds for rtt in r.rtts[("KZ", "icmp")]]
        buckets = prom.query('shutdown_monitor_rtt_seconds_bucket{country="KZ",method="icmp"}')
        assert values_by(buckets, "le") == cumulative_buckets(all_rtts)
        assert value(prom.query(
            'shutdown_monitor_rtt_seconds_count{country="KZ",method="icmp"}')) == len(all_rtts)
        assert value(prom.query(
            'shutdown_monitor_rtt_seconds_sum{country="KZ",method="icmp"}')) == pytest.approx(
            sum(all_rtts))

        # Round bookkeeping, the vantage, levels, incidents, housekeeping.
        assert value(prom.query("shutdown_monitor_round_timestamp_seconds")) == \
            last.time.timestamp()
        assert value(prom.query("shutdown_monitor_round_duration_seconds")) == last.duration_s
        assert value(prom.query("shutdown_monitor_vantage_up")) == 0
        assert values_by(prom.query("shutdown_monitor_control_targets"), "state") == {
            "up": 0.0, "down": 4.0}
        assert value(prom.query(
            'shutdown_monitor_level{scope="asn",entity="9198",signal="icmp_blocks_up"}')) == 0.0625
        active = prom.query("shutdown_monitor_incident_active")
        assert [r["metric"] for r in active] == [{
            "__name__": "shutdown_monitor_incident_active", "instance": endpoint.target,
            "job": "shutdown-monitor", "country": "KZ", "scope": "asn", "entity": "9198",
            "kind": "network_outage", "severity": "critical"}]
        assert value(active) == 1
        assert value(prom.query("shutdown_monitor_config_last_reload_success")) == 1
        assert value(prom.query("shutdown_monitor_history_bytes")) == 12_345
        assert value(prom.query('shutdown_monitor_malformed_total{source="icmp"}')) == 2

        # Recording rules over the export (what dashboards/ rules build on) and a range query.
        ratio = 'country_method:shutdown_monitor_targets_up:ratio{country="KZ",method="icmp"}'
        prom.wait_for(ratio, lambda r: len(r) == 1 and value(r) == (5 + 43) / 150)
        history = prom.query_range("shutdown_monitor_rounds_total", after_first - 1,
                                   after_last, 0.5)
        steps = [float(v) for _, v in history[0]["values"]]
        assert steps[0] == 1 and steps[-1] == 3 and steps == sorted(steps)

        # The vantage name is Prometheus's, added where series leave it (federation here).
        federated = federate(prom, "shutdown_monitor_vantage_up")
        assert 'vantage="test-vantage"' in federated, federated

        # An incident that closes vanishes from the next scrape (staleness), not stuck at 1.
        state.set_active_incidents([{**OPEN_INCIDENT, "end": "2022-01-05T10:45:00Z"}])
        prom.wait_for("shutdown_monitor_incident_active", lambda r: r == [])
        assert endpoint.scrapes >= 3


def federate(prom: PrometheusServer, match: str) -> str:
    query = urllib.parse.urlencode({"match[]": match})
    with urllib.request.urlopen(f"{prom.url}/federate?{query}", timeout=10) as response:
        return str(response.read().decode())
