"""The Prometheus rules in dashboards/rules/: promtool's checks and unit tests, the Alertmanager
example's shape, and the rules loaded by a real Prometheus."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.prom import PrometheusServer, needs_prometheus

RULES_DIR = Path(__file__).resolve().parents[2] / "dashboards" / "rules"
RULES = RULES_DIR / "shutdown-monitor.rules.yml"
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.test.yml"))
ALERTS = ("NationwideShutdown", "NetworkOutage", "VantageOffline", "MonitorDown")
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="LOUD SKIP: promtool missing (apt-get install prometheus; CI has it)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=300,
                          cwd=RULES_DIR)


@needs_promtool
def test_promtool_check_rules_passes() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, f"no *.test.yml under {RULES_DIR / 'tests'}"
    done = promtool("test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_defined_with_severity_and_summary_and_unit_tested() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == set(ALERTS)
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    tested = {case["alertname"]
              for path in RULE_TESTS
              for test in yaml.safe_load(path.read_text())["tests"]
              for case in test.get("alert_rule_test", [])
              if case.get("exp_alerts")}
    assert tested == set(ALERTS), "every alert needs a unit test where it fires"


def test_alertmanager_example_routes_every_alert_to_a_defined_receiver() -> None:
    config = yaml.safe_load((RULES_DIR / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    route = config["route"]
    assert route["receiver"] in receivers
    routed = set()
    for sub in route["routes"]:
        assert sub["receiver"] in receivers
        for matcher in sub["matchers"]:
            names = matcher.split("=", 1)[1].strip().strip('~').strip().strip('"')
            routed.update(names.split("|"))
    assert routed == set(ALERTS)


@needs_prometheus
def test_a_real_prometheus_loads_the_rules_and_evaluates_them_healthy() -> None:
    with PrometheusServer([], rule_files=[RULES], evaluation_interval="1s") as prom:
        # no shutdown-monitor target at all is itself a reason to alert (pending for 5m first)
        pending = prom.wait_for('ALERTS{alertname="MonitorDown"}')
        assert pending[0]["metric"]["job"] == "shutdown-monitor"
        assert pending[0]["metric"]["alertstate"] == "pending"
        deadline = time.monotonic() + 30
        while True:
            rules = [r for g in prom.rules() for r in g["rules"]]
            if all(r["health"] != "unknown" for r in rules) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(rules) == 13
        assert {r["health"] for r in rules} == {"ok"}, [r for r in rules if r["health"] != "ok"]
