"""Writes the Grafana dashboards in dashboards/grafana/ from one description (run it after edits).

    python3 dashboards/build.py          # rewrite the JSON files
    python3 dashboards/build.py --check  # exit 1 if a JSON file is not what this script makes

Generating the JSON keeps what a hand-edited dashboard drifts on consistent: every panel uses
the `datasource` variable, ids are unique, the grid is 24 columns, every panel has a unit.
Grafana 10+ dashboard model, schemaVersion 39; no `__inputs` (file-provisioned or imported as is).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "grafana"
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE = 'instance=~"$instance"'
COUNTRY = f'country="$country", {INSTANCE}'
TAGS = ["shutdown-monitor"]
Steps = list[dict[str, Any]]
LEVEL_STEPS: Steps = [  # level (fraction of baseline): IODA's 50% / 80% for active probing
    {"color": "red", "value": None}, {"color": "orange", "value": 0.5},
    {"color": "green", "value": 0.8}]
UP_STEPS: Steps = [{"color": "red", "value": None}, {"color": "green", "value": 1}]


def steps(*pairs: tuple[str, float | None]) -> Steps:
    """Threshold steps: ("green", None) first, then (colour, from value)."""
    return [{"color": colour, "value": value} for colour, value in pairs]


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


@dataclass
class Panel:
    title: str
    kind: str  # timeseries stat table geomap
    targets: list[Target]
    w: int
    h: int
    unit: str
    description: str = ""
    steps: list[dict[str, Any]] | None = None
    mappings: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    minimum: float | None = None
    maximum: float | None = None
    no_value: str | None = None


@dataclass
class Row:
    title: str
    panels: list[Panel]


def _variable_query(name: str, label: str, query: str, *, multi: bool = False,
                    include_all: bool = False) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-query"}, "definition": query,
        "refresh": 2, "sort": 1, "multi": multi, "includeAll": include_all,
        "current": {}, "options": [], "hide": 0,
    }
    if include_all:
        variable["allValue"] = ".*"
    return variable


def _datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Prometheus", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "options": [],
            "regex": ""}


INSTANCE_VAR = _variable_query("instance", "Vantage (daemon)",
                               "label_values(shutdown_monitor_build_info, instance)",
                               multi=True, include_all=True)
COUNTRY_VAR = _variable_query("country", "Country",
                              f"label_values(shutdown_monitor_targets{{{INSTANCE}}}, country)")
ASN_VAR = _variable_query(
    "asn", "Network (ASN)",
    f'label_values(shutdown_monitor_targets{{{COUNTRY}, asn!=""}}, asn)')


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "mappings": panel.mappings}
    if panel.steps is not None:
        defaults["thresholds"] = {"mode": "absolute", "steps": panel.steps}
    else:
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green",
                                                                  "value": None}]}
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    if panel.no_value is not None:
        defaults["noValue"] = panel.no_value
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 8,
                              "showPoints": "never", "spanNulls": False, **panel.custom}
        defaults["color"] = {"mode": "palette-classic"}
    elif panel.kind in ("stat", "geomap"):
        defaults["color"] = {"mode": "thresholds"}
    if panel.kind not in ("timeseries",) and panel.custom:
        defaults["custom"] = panel.custom
    options: dict[str, Any] = {}
    if panel.kind == "timeseries":
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
    elif panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "background", "graphMode": "area", "textMode": "auto",
                   "justifyMode": "auto", "orientation": "auto"}
    options.update(panel.options)
    targets = []
    for k, target in enumerate(panel.targets):
        t: dict[str, Any] = {"refId": chr(ord("A") + k), "datasource": DS, "expr": target.expr,
                             "legendFormat": target.legend or "__auto", "range": not target.instant,
                             "instant": target.instant}
        if target.table:
            t["format"] = "table"
        targets.append(t)
    out = {"id": pid, "type": panel.kind, "title": panel.title, "datasource": DS,
           "description": panel.description,
           "gridPos": {"x": x, "y": y, "w": panel.w, "h": panel.h},
           "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
           "targets": targets}
    out.update(panel.extra)
    return out


def _layout(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows of panels, left to right, wrapping at 24 columns."""
    out: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in rows:
        out.append({"id": pid, "type": "row", "title": row.title, "collapsed": False,
                    "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y = pid + 1, y + 1
        x, line_h = 0, 0
        for panel in row.panels:
            if x + panel.w > 24:
                x, y, line_h = 0, y + line_h, 0
            out.append(_panel_json(panel, pid, x, y))
            pid += 1
            x += panel.w
            line_h = max(line_h, panel.h)
        y += line_h
    return out


def _incident_annotation(selector: str) -> dict[str, Any]:
    return {"name": "Incidents", "enable": True, "iconColor": "red", "datasource": DS,
            "expr": f"shutdown_monitor_incident_active{{{selector}}} > 0",
            "step": "60s", "titleFormat": "{{kind}} ({{severity}})",
            "textFormat": "{{country}} {{scope}} {{entity}}", "tagKeys": "kind,severity",
            "useValueForTime": False}


def _dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]],
               rows: list[Row], annotations: list[dict[str, Any]],
               time_from: str = "now-2d") -> dict[str, Any]:
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
               "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
               "name": "Annotations & Alerts", "type": "dashboard"}
    return {
        "uid": uid, "title": title, "description": description, "tags": TAGS,
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "timezone": "utc", "refresh": "1m", "time": {"from": time_from, "to": "now"},
        "links": [{"title": "shutdown-monitor", "type": "dashboards", "tags": TAGS,
                   "asDropdown": True, "includeVars": True, "keepTime": True}],
        "templating": {"list": [_datasource_variable(), *variables]},
        "annotations": {"list": [builtin, *annotations]},
        "panels": _layout(rows),
    }


def _level_series(title: str, targets: list[Target], w: int = 24, h: int = 9,
                  description: str = "") -> Panel:
    return Panel(title, "timeseries", targets, w, h, "percentunit", description=description,
                 steps=LEVEL_STEPS, minimum=0,
                 custom={"thresholdsStyle": {"mode": "line+area"}})


def _vantage_health_row(note: str) -> Row:
    return Row("Is the monitor itself fine?", [
        Panel("Vantage online", "stat",
              [Target(f"min(shutdown_monitor_vantage_up{{{INSTANCE}}})", instant=True)],
              4, 4, "none", steps=UP_STEPS, description=note,
              mappings=[{"type": "value", "options": {
                  "0": {"text": "OFFLINE", "color": "red"},
                  "1": {"text": "online", "color": "green"}}}]),
        Panel("Control targets answering", "stat",
              [Target(f'sum(shutdown_monitor_control_targets{{state="up", {INSTANCE}}}) / '
                      f'sum(shutdown_monitor_control_targets{{{INSTANCE}}})', instant=True)],
              4, 4, "percentunit", steps=steps(("red", None), ("green", 0.5))),
        Panel("Scraped", "stat", [Target(f"min(up{{{INSTANCE}}})", instant=True)], 4, 4, "none",
              steps=UP_STEPS, mappings=[{"type": "value", "options": {
                  "0": {"text": "DOWN", "color": "red"}, "1": {"text": "up", "color": "green"}}}]),
        Panel("Vantage up over time", "timeseries",
              [Target(f"shutdown_monitor_vantage_up{{{INSTANCE}}}", "{{instance}}")], 12, 4,
              "none", minimum=0, maximum=1, custom={"drawStyle": "line", "lineInterpolation":
                                                    "stepAfter"}),
    ])


def world() -> dict[str, Any]:
    rows = [
        Row("Now", [
            Panel("Countries monitored", "stat", [Target(
                f"count(count by (country) (shutdown_monitor_targets{{{INSTANCE}}}))",
                instant=True)], 4, 4, "none", options={"colorMode": "none"}),
            Panel("Open incidents", "stat", [Target(
                f'sum(shutdown_monitor_incident_active{{{INSTANCE}, kind!="vantage_offline"}})',
                instant=True)], 4, 4, "none", no_value="0",
                steps=steps(("green", None), ("red", 1))),
            Panel("Vantage online", "stat",
                  [Target(f"min(shutdown_monitor_vantage_up{{{INSTANCE}}})", instant=True)],
                  4, 4, "none", steps=UP_STEPS,
                  description="When the vantage is offline, country levels say nothing.",
                  mappings=[{"type": "value", "options": {
                      "0": {"text": "OFFLINE", "color": "red"},
                      "1": {"text": "online", "color": "green"}}}]),
            Panel("Last complete round", "stat", [Target(
                f"time() - max(shutdown_monitor_round_timestamp_seconds{{{INSTANCE}}})",
                instant=True)], 4, 4, "s", description="Seconds since the last complete round.",
                steps=steps(("green", None), ("orange", 600), ("red", 900))),
            Panel("Blocks answering ICMP, all countries", "stat", [Target(
                f'sum(shutdown_monitor_targets_up{{method="icmp", {INSTANCE}}}) / '
                f'sum(shutdown_monitor_targets{{method="icmp", {INSTANCE}}})', instant=True)],
                8, 4, "percentunit", options={"colorMode": "none"}),
        ]),
        Row("Map: level now, colour by severity", [
            Panel("Level by country", "geomap", [Target(
                f'min by (country) (shutdown_monitor_level{{scope="country", {INSTANCE}}})',
                instant=True, table=True)], 24, 11, "percentunit", steps=LEVEL_STEPS,
                description="Red under 50% of the ordinary level, orange under 80%.",
                options={
                    "view": {"id": "zero", "lat": 25, "lon": 40, "zoom": 1.6},
                    "controls": {"showZoom": True, "mouseWheelZoom": False,
                                 "showAttribution": True},
                    "basemap": {"type": "default", "name": "Basemap"},
                    "layers": [{
                        "type": "markers", "name": "Level", "tooltip": True,
                        "location": {"mode": "lookup", "lookup": "country",
                                     "gazetteer": "public/gazetteer/countries.json"},
                        "config": {"showLegend": True, "style": {
                            "size": {"fixed": 9, "min": 6, "max": 14},
                            "color": {"field": "Value", "fixed": "dark-green"},
                            "opacity": 0.85, "text": {"mode": "field", "field": "country",
                                                      "fixed": ""},
                            "textConfig": {"fontSize": 10, "offsetY": -12,
                                           "textAlign": "center", "textBaseline": "bottom"}}},
                    }],
                    "tooltip": {"mode": "details"}}),
        ]),
        Row("Countries: level now (colour by severity) and the last 7 days", [
            Panel("$country", "stat", [Target(
                f'min(shutdown_monitor_level{{scope="country", {COUNTRY}}})')], 4, 5,
                "percentunit", steps=LEVEL_STEPS,
                description="Worst signal of the country over its baseline (100% = ordinary).",
                extra={"repeat": "country", "repeatDirection": "h", "maxPerRow": 6,
                       "timeFrom": "7d"}),
        ]),
        Row("Open incidents and levels", [
            Panel("Open incidents", "table", [Target(
                f"shutdown_monitor_incident_active{{{INSTANCE}}} > 0", instant=True,
                table=True)], 12, 8, "none",
                options={"showHeader": True},
                extra={"transformations": [{"id": "organize", "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True,
                                      "job": True}}}]}),
            Panel("Countries by level", "table", [
                Target(f'min by (country) (shutdown_monitor_level{{scope="country", '
                       f'{INSTANCE}}})', instant=True, table=True),
                Target(f'sum by (country) (shutdown_monitor_targets_up{{method="icmp", '
                       f'{INSTANCE}}}) / sum by (country) (shutdown_monitor_targets'
                       f'{{method="icmp", {INSTANCE}}})', instant=True, table=True)],
                12, 8, "percentunit", steps=LEVEL_STEPS,
                custom={"cellOptions": {"type": "color-background"}},
                options={"sortBy": [{"displayName": "Value #A", "desc": False}]},
                extra={"transformations": [
                    {"id": "merge", "options": {}},
                    {"id": "organize", "options": {
                        "excludeByName": {"Time": True},
                        "renameByName": {"Value #A": "Level", "Value #B": "ICMP answering"}}}]}),
        ]),
        Row("Over time", [
            _level_series("Level per country", [Target(
                f'min by (country) (shutdown_monitor_level{{scope="country", {INSTANCE}}})',
                "{{country}}")], description="100% = ordinary for that time of day."),
        ]),
    ]
    country_all = _variable_query(
        "country", "Countries", f"label_values(shutdown_monitor_targets{{{INSTANCE}}}, country)",
        multi=True, include_all=True)
    return _dashboard("shutdown-monitor-world", "Shutdown monitor: world overview",
                      "Every monitored country: its level now, open incidents, the last days.",
                      [INSTANCE_VAR, country_all], rows,
                      [_incident_annotation(f'{INSTANCE}, kind!="vantage_offline"')],
                      time_from="now-7d")


def country() -> dict[str, Any]:
    method_var = _variable_query(
        "method", "Method", f"label_values(shutdown_monitor_targets{{{COUNTRY}}}, method)",
        multi=True, include_all=True)
    rows = [
        _vantage_health_row("If this is red, the country charts below are not trustworthy."),
        Row("$country: level against the baseline", [
            _level_series("Level per signal (100% = ordinary)", [Target(
                f'shutdown_monitor_level{{scope="country", {COUNTRY}}}', "{{signal}}")],
                w=12, description="The daemon's detector: value over its time-of-day baseline."),
            Panel("Share of targets answering, with the baseline", "timeseries", [
                Target(f'sum without (asn) (shutdown_monitor_targets_up{{method=~"$method", '
                       f'{COUNTRY}}}) / sum without (asn) (shutdown_monitor_targets'
                       f'{{method=~"$method", {COUNTRY}}})', "{{method}}"),
                Target(f'country_method:shutdown_monitor_targets_up:baseline{{method=~"$method", '
                       f'{COUNTRY}}}', "{{method}} baseline")],
                12, 9, "percentunit", minimum=0, maximum=1,
                description="Baseline from dashboards/rules (best 1-day median of 7 days)."),
        ]),
        Row("$country: networks (ASN)", [
            _level_series("Level per network", [Target(
                f'shutdown_monitor_level{{scope="asn", {COUNTRY}}}', "AS{{entity}} {{signal}}")],
                w=12),
            Panel("Targets answering per network", "timeseries", [Target(
                f'sum by (asn) (shutdown_monitor_targets_up{{asn!="", method=~"$method", '
                f'{COUNTRY}}})', "AS{{asn}}")], 12, 9, "none", minimum=0),
        ]),
        Row("$country: latency and open incidents", [
            Panel("Round-trip time (median and 90th percentile)", "timeseries", [
                Target(f"histogram_quantile(0.5, sum by (le, method) (rate("
                       f"shutdown_monitor_rtt_seconds_bucket{{{COUNTRY}}}[$__rate_interval])))",
                       "p50 {{method}}"),
                Target(f"histogram_quantile(0.9, sum by (le, method) (rate("
                       f"shutdown_monitor_rtt_seconds_bucket{{{COUNTRY}}}[$__rate_interval])))",
                       "p90 {{method}}")], 12, 8, "s", minimum=0),
            Panel("Open incidents in $country", "table", [Target(
                f"shutdown_monitor_incident_active{{{COUNTRY}}} > 0", instant=True, table=True)],
                12, 8, "none",
                extra={"transformations": [{"id": "organize", "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True,
                                      "job": True}}}]}),
        ]),
    ]
    return _dashboard("shutdown-monitor-country", "Shutdown monitor: country",
                      "One country: level per signal and per network against the baseline, "
                      "latency, incidents, and the vantage's own health beside them.",
                      [INSTANCE_VAR, COUNTRY_VAR, method_var], rows,
                      [_incident_annotation(COUNTRY)])


def network() -> dict[str, Any]:
    asn_sel = f'asn="$asn", {COUNTRY}'
    rows = [
        _vantage_health_row("If this is red, the network charts below are not trustworthy."),
        Row("AS$asn in $country", [
            _level_series("Level of AS$asn (100% = ordinary)", [Target(
                f'shutdown_monitor_level{{scope="asn", entity="$asn", {COUNTRY}}}',
                "{{signal}}")], w=12),
            _level_series("Level of $country as a whole", [Target(
                f'shutdown_monitor_level{{scope="country", {COUNTRY}}}', "{{signal}}")], w=12),
            Panel("Share of its targets answering, with the baseline", "timeseries", [
                Target(f"sum by (method) (shutdown_monitor_targets_up{{{asn_sel}}}) / "
                       f"sum by (method) (shutdown_monitor_targets{{{asn_sel}}})", "{{method}}"),
                Target(f"asn_method:shutdown_monitor_targets_up:baseline{{{asn_sel}}}",
                       "{{method}} baseline")], 12, 8, "percentunit", minimum=0, maximum=1),
            Panel("Targets probed and answering", "timeseries", [
                Target(f"sum by (method) (shutdown_monitor_targets{{{asn_sel}}})",
                       "{{method}} probed"),
                Target(f"sum by (method) (shutdown_monitor_targets_up{{{asn_sel}}})",
                       "{{method}} answering")], 12, 8, "none", minimum=0),
        ]),
    ]
    return _dashboard("shutdown-monitor-network", "Shutdown monitor: network (ASN)",
                      "One network of one country against its own baseline and its country.",
                      [INSTANCE_VAR, COUNTRY_VAR, ASN_VAR], rows,
                      [_incident_annotation(f'scope="asn", entity="$asn", {COUNTRY}')])


def health() -> dict[str, Any]:
    rate = "[$__rate_interval]"
    rows = [
        _vantage_health_row("Control targets abroad: whether this vantage can see the world."),
        Row("Rounds and probes", [
            Panel("Round duration", "timeseries", [Target(
                f"shutdown_monitor_round_duration_seconds{{{INSTANCE}}}", "{{instance}}")],
                8, 8, "s", minimum=0, description="Wall-clock time of the last complete round; "
                "it must stay under the round interval."),
            Panel("Probes per second", "timeseries", [Target(
                f"sum by (method) (rate(shutdown_monitor_probes_total{{{INSTANCE}}}{rate}))",
                "{{method}}")], 8, 8, "ops", minimum=0),
            Panel("Failures by class", "timeseries", [Target(
                f'sum by (result) (rate(shutdown_monitor_probes_total{{result!="success", '
                f'{INSTANCE}}}{rate}))', "{{result}}")], 8, 8, "ops", minimum=0,
                custom={"stacking": {"mode": "normal"}, "fillOpacity": 40}),
            Panel("Rounds completed and abandoned", "timeseries", [
                Target(f"increase(shutdown_monitor_rounds_total{{{INSTANCE}}}{rate})",
                       "completed"),
                Target(f"increase(shutdown_monitor_rounds_abandoned_total{{{INSTANCE}}}{rate})",
                       "abandoned")], 8, 8, "none", minimum=0),
            Panel("Targets probed per round", "timeseries", [Target(
                f"sum by (method) (shutdown_monitor_targets{{{INSTANCE}}})", "{{method}}")],
                8, 8, "none", minimum=0),
            Panel("Age of the last complete round", "timeseries", [Target(
                f"time() - shutdown_monitor_round_timestamp_seconds{{{INSTANCE}}}",
                "{{instance}}")], 8, 8, "s", minimum=0,
                steps=steps(("green", None), ("red", 900)),
                custom={"thresholdsStyle": {"mode": "line"}}),
        ]),
        Row("The daemon", [
            Panel("History store size", "timeseries", [Target(
                f"shutdown_monitor_history_bytes{{{INSTANCE}}}", "{{instance}}")], 6, 8,
                "bytes", minimum=0),
            Panel("History write errors", "stat", [Target(
                f"sum(increase(shutdown_monitor_history_write_errors_total{{{INSTANCE}}}[1h]))",
                instant=True)], 3, 4, "none",
                steps=steps(("green", None), ("red", 1))),
            Panel("Config reloads failed (1h)", "stat", [Target(
                f"sum(increase(shutdown_monitor_config_reload_errors_total{{{INSTANCE}}}[1h]))",
                instant=True)], 3, 4, "none", description="SIGHUP reloads that failed: the old "
                "configuration stays in force.",
                steps=steps(("green", None), ("red", 1))),
            Panel("Malformed input skipped", "timeseries", [Target(
                f"sum by (source) (rate(shutdown_monitor_malformed_total{{{INSTANCE}}}{rate}))",
                "{{source}}")], 6, 8, "ops", minimum=0, no_value="none",
                description="Packets, responses or files counted and skipped (empty is good)."),
            Panel("Memory (resident)", "timeseries", [Target(
                f"process_resident_memory_bytes{{{INSTANCE}}}", "{{instance}}")], 6, 8,
                "bytes", minimum=0),
            Panel("CPU", "timeseries", [Target(
                f"rate(process_cpu_seconds_total{{{INSTANCE}}}{rate})", "{{instance}}")],
                6, 8, "percentunit", minimum=0),
            Panel("Version", "table", [Target(
                f"shutdown_monitor_build_info{{{INSTANCE}}}", instant=True, table=True)],
                6, 4, "none",
                extra={"transformations": [{"id": "organize", "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True}}}]}),
        ]),
    ]
    return _dashboard("shutdown-monitor-health", "Shutdown monitor: monitor health",
                      "The daemon itself: rounds, probes, failures, the vantage, the store.",
                      [INSTANCE_VAR], rows, [], time_from="now-6h")


DASHBOARDS = {"world-overview.json": world, "country.json": country, "network.json": network,
              "monitor-health.json": health}


def render(make: Any) -> str:
    return json.dumps(make(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    OUT.mkdir(exist_ok=True)
    stale = []
    for name, make in DASHBOARDS.items():
        text = render(make)
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run python3 dashboards/build.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
