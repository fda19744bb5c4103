"""End to end, as a user meets it: lab up, the daemon in the vantage, a real Prometheus scraping
it, the detector opening and closing a nationwide shutdown, the incident in /api/incidents and
as a metric in Prometheus, the report written, lab down.

Prometheus runs in the host namespace and scrapes the daemon through the lab's API relay: a
socket on the host's loopback whose connections are made from inside the vantage namespace. No
route joins the host and the lab.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from monitor.lab.runner import run_scenario
from monitor.lab.scenarios import get_scenario
from monitor.lab.topology import Lab, netns_exists
from monitor.lab.world import build_world
from tests.netns import needs_root
from tests.prom import PrometheusServer, free_port, needs_prometheus, value

pytestmark = [needs_root, needs_prometheus, pytest.mark.slow]

ACTIVE = 'shutdown_monitor_incident_active{country="KZ",kind="nationwide_shutdown"}'


class Watcher:
    """Polls the relayed API and Prometheus while the run goes on, remembering what it saw."""

    def __init__(self, prom: PrometheusServer) -> None:
        self.prom = prom
        self.port: int | None = None
        self.lab: Lab | None = None
        self.api_states: dict[str, set[str]] = {}  # incident id -> states seen (open, closed)
        self.prom_active = False
        self.escaped: list[dict[str, int]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def started(self, lab: Lab, port: int | None) -> None:
        self.lab, self.port = lab, port
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set():
            try:
                url = f"http://127.0.0.1:{self.port}/api/incidents?state=all&country=KZ"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    for inc in json.load(answer)["incidents"]:
                        if inc["kind"] == "nationwide_shutdown":
                            state = "open" if inc["end"] is None else "closed"
                            self.api_states.setdefault(inc["id"], set()).add(state)
                if self.prom.query(ACTIVE) and value(self.prom.query(ACTIVE)) == 1:
                    self.prom_active = True
                assert self.lab is not None
                self.escaped.append(self.lab.escaped())
            except (OSError, urllib.error.URLError, ValueError) as exc:
                self.errors.append(repr(exc))  # the daemon stopping at the end, typically
            time.sleep(0.25)


def test_nationwide_shutdown_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    scenario = get_scenario("nationwide-shutdown", compressed=True)
    prefix = f"e2e{os.getpid() % 100000}"
    with PrometheusServer([f"127.0.0.1:{port}"], scrape_interval="1s") as prom:
        watcher = Watcher(prom)
        try:
            result = run_scenario(
                scenario, build_world(), tmp_path / "work", prefix=prefix, relay_port=port,
                min_round_wall_s=0.4, report_dir=tmp_path / "report", on_started=watcher.started)
        finally:
            watcher.stop.set()
            if watcher.thread.is_alive():
                watcher.thread.join(10)
        # The detector opened and closed it, on time, and nothing else happened anywhere.
        assert result.ok, [c.message for c in result.checks]
        nationwide = [i for i in result.incidents if i["kind"] == "nationwide_shutdown"]
        assert len(nationwide) == 1 and nationwide[0]["end"] is not None
        # /api/incidents showed it open while it lasted, then closed.
        assert watcher.api_states.get(nationwide[0]["id"]) == {"open", "closed"}, (
            watcher.api_states, watcher.errors[-3:])
        # Prometheus scraped the incident as a metric, and the collapse of the level.
        assert watcher.prom_active
        assert value(prom.query(f"max_over_time({ACTIVE}[1h])")) == 1
        level = prom.query('min_over_time(shutdown_monitor_level{country="KZ",scope="country",'
                           'signal="icmp_blocks_up"}[1h])')
        assert level and value(level) < 0.2
        health = prom.query('up{job="shutdown-monitor"}')
        assert health  # the scrape target existed (it is down now that the lab is gone)
    # Nothing ever tried to leave the lab, which is gone, and the report is written.
    assert watcher.escaped and all(not any(e.values()) for e in watcher.escaped)
    assert not netns_exists(f"{prefix}-vantage") and not netns_exists(f"{prefix}-world")
    assert result.report is not None and result.report.is_file()
    text = result.report.read_text()
    assert "Kazakhstan" in text or "KZ" in text
    assert (tmp_path / "report" / "report.html").is_file()
    assert list((tmp_path / "report").glob("*.png"))


def test_lab_run_command_prints_the_incident_json(tmp_path: Path) -> None:
    """`lab run SCENARIO --json` prints DESIGN's incident JSON on stdout, the verdict on stderr."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "monitor", "lab", "run", "network-outage", "--compressed",
         "--json", "--prefix", f"cli{os.getpid() % 100000}", "--scale", "0.5",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    incidents: list[dict[str, Any]] = json.loads(done.stdout)["incidents"]
    outage = [i for i in incidents if i["kind"] == "network_outage"]
    assert outage and outage[0]["entity"] == "29355" and outage[0]["scope"] == "asn"
    assert set(outage[0]) >= {"id", "country", "scope", "entity", "kind", "severity", "start",
                              "end", "min_level", "score", "signals", "networks"}
    assert "[ok] no incident in NL" in done.stderr
