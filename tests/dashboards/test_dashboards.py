"""The Grafana dashboards: JSON checks, and every query answered by a real Prometheus that
scraped a real daemon.

The live test drives `monitor.daemon.Daemon` in a network namespace this test makes (the lab
pattern of tests/monitor/test_daemon.py: AnyIP routes answer for two lab countries, nft drops
what is "shut down"), with a real `prometheus` started inside the same namespace, loading the
rules of dashboards/rules/. Nothing leaves the namespace.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import math
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitor.clock import VirtualClock
from monitor.config import load_config
from monitor.daemon import Daemon
from monitor.export import MetricsState, make_registry, render_metrics
from monitor.rounds import RoundOutcome, TargetCount
from tests.monitor.test_daemon import rounds_done, running, write_blocklist, write_hitlist
from tests.netns import Netns, needs_root, run_in_netns
from tests.prom import PrometheusServer, free_port, needs_prometheus

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
GRAFANA = DASHBOARDS / "grafana"
RULES = DASHBOARDS / "rules" / "shutdown-monitor.rules.yml"
FILES = ("world-overview.json", "country.json", "network.json", "monitor-health.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}
# Queries that only have data when something goes wrong (a healthy lab run has none of it).
EMPTY_WHEN_HEALTHY = ("shutdown_monitor_malformed_total",)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GRAFANA / name).read_text())
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every Prometheus annotation."""
    found = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
             for p in panels(dashboard) for t in p.get("targets", [])]
    found += [(f"annotation {a['name']!r}", a["expr"])
              for a in dashboard["annotations"]["list"] if "expr" in a]
    return found


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, metric selector, label) of every label_values() variable."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert match, f"{var['name']}: expected label_values(selector, label)"
        out.append((var["name"], match.group(1), match.group(2)))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (label matchers, ranges, groupings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end():].lstrip().startswith("(") or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def exported_names() -> set[str]:
    """Sample names of the daemon's real exposition (monitor/export.py), every family filled."""
    state = MetricsState()
    state.record_round(RoundOutcome(
        time=datetime(2022, 1, 5, tzinfo=UTC), duration_s=1.0,
        counts=[TargetCount("KZ", 9198, "icmp", 4, 3)],
        probes=Counter({("icmp", "success"): 3, ("icmp", "timeout"): 1}),
        rtts={("KZ", "icmp"): [0.05]}, control_total=2, control_up=2))
    state.set_levels([("KZ", "country", "KZ", "icmp_blocks_up", 0.9)])
    state.set_active_incidents([{"country": "KZ", "scope": "country", "entity": "KZ",
                                 "kind": "nationwide_shutdown", "severity": "critical",
                                 "end": None}])
    state.record_reload(True, now=1.0)
    state.record_malformed("icmp")
    state.set_history_bytes(1)
    body, _ = render_metrics(make_registry(state))
    return {sample.name for family in text_string_to_metric_families(body.decode())
            for sample in family.samples}


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


# ---------------------------------------------------------------------------------------------
# JSON checks


def test_generated_json_is_what_build_py_makes() -> None:
    spec = importlib.util.spec_from_file_location("dashboards_build", DASHBOARDS / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # dataclasses look their module up while it loads
    spec.loader.exec_module(build)
    assert sorted(build.DASHBOARDS) == sorted(FILES)
    assert build.main(["--check"]) == 0, "run python3 dashboards/build.py"


@pytest.mark.parametrize("name", FILES)
def test_dashboard_json_is_importable_and_consistent(name: str) -> None:
    dashboard = load(name)
    assert "__inputs" not in dashboard and "__requires" not in dashboard
    assert dashboard["uid"].startswith("shutdown-monitor-") and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DS, var["name"]
    if name in ("country.json", "network.json"):
        assert variables["country"]["multi"] is False
    all_panels = panels(dashboard)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], int] = {}
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']}: outside the 24-column grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == DS for t in panel["targets"]), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"] == DS
    text = json.dumps(dashboard)
    assert "${DS_" not in text and '"uid": "prometheus"' not in text


@pytest.mark.parametrize("name", FILES)
def test_every_metric_a_dashboard_reads_is_exported_or_recorded(name: str) -> None:
    known = exported_names() | recorded_names() | {"up"}
    dashboard = load(name)
    for where, expr in queries(dashboard):
        unknown = metric_names(expr) - known
        assert not unknown, f"{name} {where}: {sorted(unknown)} not exported by the daemon"
    for var, selector, _label in variable_queries(dashboard):
        assert metric_names(selector) <= known, f"{name} variable {var}: {selector}"


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.5, sum by (le, method) (rate(shutdown_monitor_rtt_seconds_bucket'
            '{country="$country", instance=~"$instance"}[$__rate_interval]))) / on (job) '
            'group_left (x) up and time() - foo:bar:baz offset 5m')
    assert metric_names(expr) == {"shutdown_monitor_rtt_seconds_bucket", "up", "foo:bar:baz"}


def test_provisioning_and_compose_files_fit_together(tmp_path: Path) -> None:
    compose = yaml.safe_load((DASHBOARDS / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"monitor", "prometheus", "grafana", "alertmanager"}
    datasource = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "dashboards" / "shutdown-monitor.yml").read_text())
    mounted = {v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert provider["providers"][0]["options"]["path"] in mounted
    config = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["job_name"] == "shutdown-monitor"  # MonitorDown needs it
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["monitor:9310"]
    assert "--listen 0.0.0.0:9310" in compose["services"]["monitor"]["command"]
    # promtool checks the scrape config with the rules where the container would find them
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    done = subprocess.run(["promtool", "check", "config", str(local)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# Every query answered by a real Prometheus that scraped a real daemon.

KZ = ipaddress.IPv4Network("10.81.0.0/20")  # 16 blocks: AS9198 12, AS29355 4
KCELL = ipaddress.IPv4Network("10.81.12.0/22")
UZ = ipaddress.IPv4Network("10.81.16.0/21")  # 8 blocks, no ASN data
CONTROL = ipaddress.IPv4Network("198.18.0.0/24")
SUBSTITUTE = {"$country": "KZ", "$asn": "29355", "$instance": ".*", "$method": ".*",
              "$__rate_interval": "20s", "$__interval": "2s", "$__range": "1m"}


def substitute(expr: str) -> str:
    for name in sorted(SUBSTITUTE, key=len, reverse=True):
        expr = expr.replace(name, SUBSTITUTE[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def make_lab(ns: Netns, root: Path, listen: str) -> Path:
    for network in (KZ, UZ, CONTROL):
        ns.exec("ip", "route", "replace", "local", str(network), "dev", "lo")
    ns.exec("nft", "add table inet lab")
    ns.exec("nft", "add chain inet lab in { type filter hook input priority 0 ; }")
    write_blocklist(root / "blocklist.txt")
    (root / "kz.txt").write_text(f"{KZ}\n")
    (root / "uz.txt").write_text(f"{UZ}\n")
    (root / "asn.tsv").write_text("10.81.0.0\t10.81.11.255\t9198\tKZ\tKazakhtelecom (lab)\n"
                                  "10.81.12.0\t10.81.15.255\t29355\tKZ\tKcell (lab)\n")
    write_hitlist(root / "hitlists" / "KZ.csv", KZ)
    write_hitlist(root / "hitlists" / "UZ.csv", UZ)
    config = {
        "vantage": {"name": "lab"}, "listen": listen, "interval_s": 300,
        "pacing": {"rate_pps": 5000, "max_in_flight": 256, "per_block_pps": None,
                   "blocklist_file": "blocklist.txt"},
        # A generous timeout: on a loaded 2-core machine 0.3 s lost control probes, the vantage
        # went "offline" and (rightly) every country incident was withheld mid-test.
        "probing": {"timeout_s": 1.0, "reprobes": 1}, "hitlist_dir": "hitlists",
        "asn_file": "asn.tsv", "countries": {"KZ": {"prefixes": "kz.txt"},
                                             "UZ": {"prefixes": "uz.txt"}},
        "control": {"hosts": ["198.18.0.1", "198.18.0.2"], "min_up_fraction": 0.5},
        "history": {"path": "history.sqlite"}, "sinks": {},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def all_queries() -> list[tuple[str, str]]:
    out = []
    for name in FILES:
        for where, expr in queries(load(name)):
            out.append((f"{name} {where}", expr))
    return out


@needs_root
@needs_prometheus
def test_every_panel_query_returns_data_after_a_lab_run(tmp_path: Path) -> None:
    with Netns("smdash") as ns:
        config_path = make_lab(ns, tmp_path, "127.0.0.1:9310")  # overridden below

        async def scenario() -> tuple[list[str], list[str]]:
            port = free_port()  # inside the namespace: the daemon's and Prometheus' own
            prom = PrometheusServer([f"127.0.0.1:{port}"], rule_files=[RULES])
            prom.__enter__()  # blocking start is fine: the daemon is not running yet
            try:
                daemon = Daemon(load_config(config_path), VirtualClock(datetime(
                    2022, 1, 3, tzinfo=UTC)), config_path=config_path,
                    listen=f"127.0.0.1:{port}")
                async with running(daemon) as task:
                    await rounds_done(daemon, task, 8)  # ordinary rounds: baselines
                    ns.exec("nft", f"add rule inet lab in ip daddr {KCELL} drop")
                    ns.exec("nft", f"add rule inet lab in ip daddr {UZ} drop")
                    deadline = time.monotonic() + 90
                    wanted = ('count(shutdown_monitor_incident_active{country="UZ"}) + '
                              'count(shutdown_monitor_incident_active{entity="29355"}) + '
                              'count(country_method:shutdown_monitor_targets_up:baseline)')
                    while not prom.query(wanted):
                        assert time.monotonic() < deadline, prom.query(
                            "shutdown_monitor_incident_active")
                        await asyncio.sleep(0.5)
                    await asyncio.sleep(25)  # rate() windows of 20 s fill up
                    end = time.time()
                empty, checked = [], []
                start = end - 60
                for where, expr in all_queries():
                    if any(name in expr for name in EMPTY_WHEN_HEALTHY):
                        continue
                    result = prom.query_range(substitute(expr), start, end, "2s")
                    values = [float(v) for series in result for _, v in series["values"]]
                    checked.append(where)
                    if not any(math.isfinite(v) for v in values):
                        empty.append(f"{where}: {substitute(expr)} -> {result[:2]}")
                for name in FILES:
                    for var, selector, label in variable_queries(load(name)):
                        got = prom.query(f"group by ({label}) ({substitute(selector)})", end)
                        seen = {series["metric"].get(label) for series in got}
                        want = SUBSTITUTE.get(f"${var}")
                        if not seen or (want not in (None, ".*") and want not in seen):
                            empty.append(f"{name} variable {var}: {seen}")
                if empty:  # say whether the monitor itself was fine while they were empty
                    empty.append("vantage_up min over the window: " + str(prom.query(
                        "min_over_time(shutdown_monitor_vantage_up[70s])", end)))
                return empty, checked
            finally:
                prom.__exit__(None, None, None)

        empty, checked = run_in_netns(ns, scenario, timeout=240)
    assert len(checked) > 40
    assert not empty, "queries without data:\n" + "\n".join(empty)
