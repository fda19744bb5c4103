"""`shutdown-monitor detector` as a process, over a real VictoriaMetrics on loopback.

Two vantages' counts for the last half hour are remote-written (real protocol, real storage):
both see KZ fall in the last bins, only "fra" sees UZ fall. The detector process primes from
that history and must report KZ, not UZ; SIGTERM stops it with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from monitor.central import CentralDetector, CentralSettings, read_vantages
from monitor.cli import cli
from monitor.clock import RealClock
from monitor.remote_write import RemoteWriter, RemoteWriteTarget, Series
from tests.prom import free_port
from tests.scale.storage import VictoriaMetrics, needs_victoria_metrics

BIN_S = 60
BINS = 30


def history(now_s: int) -> list[Series]:
    """Per vantage and country: 50 blocks; KZ drops to 2 in the last 6 bins for both vantages,
    UZ only for fra."""
    series = []
    first = (now_s // BIN_S - BINS) * BIN_S
    for vantage in ("ams", "fra"):
        for country in ("KZ", "UZ"):
            ups, totals = [], []
            for k in range(BINS):
                ms = (first + k * BIN_S) * 1000
                down = k >= BINS - 6 and (country == "KZ" or vantage == "fra")
                ups.append((2.0 if down else 49.0 - k % 2, ms))
                totals.append((50.0, ms))
            labels = {"country": country, "asn": "", "method": "icmp", "vantage": vantage,
                      "job": "shutdown-monitor", "instance": f"{vantage}:9310"}
            for name, samples in (("shutdown_monitor_targets_up", ups),
                                  ("shutdown_monitor_targets", totals)):
                series.append(Series(tuple(sorted({**labels, "__name__": name}.items())),
                                     tuple(samples)))
        vantage_labels = {"__name__": "shutdown_monitor_vantage_up", "vantage": vantage}
        series.append(Series(tuple(sorted(vantage_labels.items())), tuple(
            (1.0, (first + k * BIN_S) * 1000) for k in range(BINS))))
    return series


async def write(url: str, buffer_dir: Path, series: list[Series]) -> None:
    writer = RemoteWriter(RemoteWriteTarget(url=url, name="t", buffer_dir=buffer_dir))
    await writer.start()
    writer.enqueue(series)
    await asyncio.wait_for(writer.drained(), timeout=20)
    await writer.close()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@needs_victoria_metrics
def test_detector_process_reports_the_consensus_and_stops_cleanly(tmp_path: Path) -> None:
    with VictoriaMetrics() as storage:
        asyncio.run(write(storage.write_url, tmp_path / "buffer", history(int(time.time()))))
        storage.flush()
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "monitor", "detector", "--prometheus", storage.url,
             "--listen", f"127.0.0.1:{port}", "--bin-seconds", str(BIN_S), "--lag", "0",
             "--history-hours", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            incidents: list[dict[str, Any]] = []
            deadline = time.monotonic() + 60
            while not any(i["country"] == "KZ" for i in incidents):
                assert process.poll() is None, process.communicate()[0].decode()
                assert time.monotonic() < deadline, incidents
                with contextlib.suppress(urllib.error.URLError, OSError):
                    incidents = get_json(
                        f"http://127.0.0.1:{port}/api/incidents")["incidents"]
                time.sleep(0.3)
            status = get_json(f"http://127.0.0.1:{port}/api/status")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                metrics = r.read().decode()
        finally:
            process.send_signal(signal.SIGTERM)
            output = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0, output
    kz = [i for i in incidents if i["country"] == "KZ"]
    assert kz[0]["end"] is None and kz[0]["scope"] == "country"
    assert not any(i["country"] == "UZ" for i in incidents)  # fra alone: not the country
    assert status["prometheus"] == storage.url and status["bin_seconds"] == BIN_S
    assert 'shutdown_monitor_incident_active{country="KZ"' in metrics
    assert "central detector on 127.0.0.1" in output


def test_detector_command_rejects_bad_options_clearly() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["detector", "--prometheus", "localhost:9090"])
    assert result.exit_code == 2
    assert "expected an http:// or https:// URL, got 'localhost:9090'" in result.output
    result = runner.invoke(cli, ["detector", "--prometheus", "http://127.0.0.1:1",
                                 "--bin-seconds", "7"])
    assert result.exit_code == 2 and "expected a divisor of 86400, got 7" in result.output
    result = runner.invoke(cli, ["detector", "--prometheus", "http://127.0.0.1:1",
                                 "--vantage-label", "1bad"])
    assert result.exit_code == 2 and "expected a Prometheus label name" in result.output


@needs_victoria_metrics
def test_reader_skips_malformed_series_and_survives_a_dead_storage(tmp_path: Path) -> None:
    now = int(time.time()) // BIN_S * BIN_S
    ms = (now - BIN_S) * 1000
    good = {"__name__": "shutdown_monitor_targets", "country": "KZ", "method": "icmp",
            "asn": ""}
    no_country = {"__name__": "shutdown_monitor_targets_up", "method": "icmp", "asn": ""}
    series = [Series(tuple(sorted(labels.items())), ((7.0, ms),))
              for labels in (good, no_country)]
    settings = CentralSettings("", bin_seconds=BIN_S, lag_s=0, history_s=600)
    with VictoriaMetrics() as storage:
        asyncio.run(write(storage.write_url, tmp_path / "buffer", series))
        storage.flush()
        readings = read_vantages(dataclasses.replace(settings, prometheus_url=storage.url),
                                 datetime.fromtimestamp(now - 300, UTC),
                                 datetime.fromtimestamp(now, UTC))
        dead_url = storage.url
    # No vantage label: one vantage, "unlabelled"; no country label: skipped and said so.
    assert set(readings.counts["vantage"]) == {"unlabelled"}
    assert set(readings.counts["total"]) == {7.0}
    assert any("without country/method labels" in p for p in readings.problems)

    central = CentralDetector(dataclasses.replace(settings, prometheus_url=dead_url,
                                                  query_timeout_s=2), RealClock())
    assert asyncio.run(central.step()) == []  # logged and retried, never raised
    assert central.stats.query_errors == 1 and "cannot reach" in str(central.last_error)
    assert central.next_bin is None  # nothing judged: the same bins are asked for again
