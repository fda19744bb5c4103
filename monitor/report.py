"""Incident reports people can publish: report.md, a self-contained report.html and PNG charts.

`build_report(frame, country)` runs the detector (with its per-bin baselines) over a frame of
series points and works out what a reader needs: a quotable headline, the country's level over
time, one chart per signal, a small multiple per network or region, the most affected networks,
the restorations inside incidents and a methodology note. `write_report(report, out_dir)` draws
the charts and writes both documents. Nothing here reads the clock or the network.
"""

from __future__ import annotations

import base64
import csv
import html
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import numpy.typing as npt
import pandas as pd

from monitor import charts
from monitor.charts import KIND_WORDS, Span
from monitor.detect import (
    KIND_NATIONWIDE,
    KIND_NETWORK,
    KIND_SERVICE,
    KIND_THROTTLING,
    KIND_VANTAGE,
    ROLE_REACH,
    ROLE_SERVICE,
    DetectorConfig,
    Incident,
    detect_with_baselines,
    signal_role,
)
from monitor.errors import InputError
from monitor.series import VANTAGE_COUNTRY

MAX_SMALL_MULTIPLES: Final = 48
MAX_TABLE_ROWS: Final = 100
KIND_ORDER: Final = (KIND_NATIONWIDE, KIND_NETWORK, KIND_SERVICE, KIND_THROTTLING)
SIGNAL_TITLES: Final = {
    "icmp_blocks_up": ("Share of /24 blocks answering ICMP echo (ping)", True),
    "tcp_up": ("Share of TCP targets accepting connections", True),
    "http_up": ("Share of HTTP(S) targets answering", True),
    "dns_up": ("Share of DNS resolvers answering correctly", True),
    "connectivity": ("Connectivity index (0-100)", False),
    "active_probing": ("IODA active probing (/24 blocks up)", False),
    "bgp": ("IODA BGP (/24 blocks routed)", False),
    "telescope": ("IODA network telescope (unique sources)", False),
}
PROBE_WORDS: Final = {
    "icmp": "ICMP echo requests (ping) to known-responsive addresses in a stable sample of the "
            "/24 blocks delegated to the country; a block is up when any of its addresses "
            "answers, after re-probes",
    "tcp": "TCP connection attempts to named hosts",
    "http": "HTTP(S) requests to named websites",
    "dns": "DNS queries to named resolvers, answers checked",
}


# ---------------------------------------------------------------------------------------------
# Countries: names and time zones, from the tz database's tables (monitor/data/countries.tsv).


@dataclass(frozen=True, slots=True)
class Country:
    code: str
    name: str  # English short name; the code itself when unknown
    timezone: str  # IANA zone, "" when unknown (then local time is not named)


@cache
def _country_table() -> dict[str, tuple[str, str]]:
    text = importlib.resources.files("monitor").joinpath("data/countries.tsv").read_text("utf-8")
    rows = csv.reader((line for line in text.splitlines() if not line.startswith("#")),
                      delimiter="\t")
    next(rows)  # header
    return {row[0]: (row[1], row[2]) for row in rows if len(row) == 3}


def country_info(code: str) -> Country:
    cc = code.strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", cc):
        raise InputError(f"--country {code!r}: expected ISO 3166-1 alpha-2 such as KZ")
    name, zone = _country_table().get(cc, (cc, ""))
    return Country(cc, name, zone)


def _zone(country: Country) -> ZoneInfo | None:
    try:
        return ZoneInfo(country.timezone) if country.timezone else None
    except (ZoneInfoNotFoundError, ValueError):
        return None


def utc_offset(country: Country, when: datetime) -> str:
    """'UTC+03:30' at `when` (daylight saving included), '' when the zone is unknown."""
    zone = _zone(country)
    if zone is None:
        return ""
    offset = when.astimezone(zone).utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def time_axis_label(country: Country, when: datetime) -> str:
    offset = utc_offset(country, when)
    if not offset:
        return "Time (UTC)"
    return f"Time (UTC). Local time in {country.name}: {country.timezone}, {offset}"


# ---------------------------------------------------------------------------------------------
# Words and numbers a journalist can quote.


def format_when(when: datetime) -> str:
    """'16:30 UTC on 16 November 2019'."""
    t = when.astimezone(UTC)
    return f"{t:%H:%M} UTC on {t.day} {t:%B %Y}"


def format_day(when: datetime) -> str:
    t = when.astimezone(UTC)
    return f"{t.day} {t:%B %Y}"


def format_local(country: Country, when: datetime) -> str:
    zone = _zone(country)
    if zone is None:
        return ""
    local = when.astimezone(zone)
    return f"{local:%H:%M} local time on {local.day} {local:%B}, {utc_offset(country, when)}"


def format_percent(level: float) -> str:
    if not np.isfinite(level):
        return "an unknown share"
    if level < 0.005:
        return "less than 1%"
    return f"{level * 100:.0f}%"


def format_hours(hours: float) -> str:
    if hours < 1:
        return f"{max(hours * 60, 1):.0f} minutes"
    if hours < 48:
        whole = round(hours)
        return f"{whole} hour{'s' if whole != 1 else ''}"
    return f"{round(hours)} hours ({hours / 24:.1f} days)"


# ---------------------------------------------------------------------------------------------
# The report's content.


@dataclass
class SignalSeries:
    signal: str
    title: str
    as_percent: bool
    value: pd.Series
    baseline: pd.Series


@dataclass
class EntityRow:
    scope: str
    entity: str
    label: str
    lowest: float
    lowest_at: datetime | None
    hours_below_warning: float
    hours_below_critical: float


@dataclass
class Report:
    country: Country
    since: datetime
    until: datetime
    bin_seconds: int
    source: str
    config: DetectorConfig
    incidents: list[Incident]  # the country's, overlapping the window (vantage ones apart)
    vantage_incidents: list[Incident]
    main: Incident | None
    headline: str
    country_level: pd.Series
    signals: list[SignalSeries]
    entity_scope: str  # "asn" or "region" ("" when the country has neither)
    entity_levels: dict[str, pd.Series]
    entity_rows: list[EntityRow]
    vantages: list[str]
    signal_names: list[str]
    problems: list[str] = field(default_factory=list)


def _entity_label(scope: str, entity: str) -> str:
    return f"AS{entity}" if scope == "asn" and entity.isdigit() else entity


def _incident_end(inc: Incident, data_end: datetime) -> datetime:
    return inc.end if inc.end is not None else data_end


def _overlaps(inc: Incident, since: datetime, until: datetime) -> bool:
    return inc.start <= until and (inc.end is None or inc.end >= since)


def _pick_main(incidents: Sequence[Incident]) -> Incident | None:
    for kind in KIND_ORDER:
        found = [i for i in incidents if i.kind == kind]
        if found:
            return max(found, key=lambda i: i.score)
    return None


def wilson_upper(up: npt.NDArray[np.float64], total: npt.NDArray[np.float64],
                 z: float) -> npt.NDArray[np.float64]:
    """Upper Wilson bound of up/total: the optimistic share a small sample still allows."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = up / total
        denom = 1 + z * z / total
        center = (p + z * z / (2 * total)) / denom
        half = z * np.sqrt(np.maximum(p * (1 - p) / total + z * z / (4 * total * total), 0))
        return np.asarray((center + half) / denom, dtype=np.float64)


def _levels(trace: pd.DataFrame, totals: pd.DataFrame, z: float) -> pd.DataFrame:
    """Entity level per bin from its reachability signals (http/dns where there is no other):
    counted signals pooled (answering / expected to answer), else the worst signal. Columns
    time, scope, entity, level, upper (the worst optimistic level a small sample allows, what
    thresholds are judged on, as the detector does), baseline."""
    roles = trace["signal"].map(signal_role)
    reach = trace[roles == ROLE_REACH]
    service = trace[(roles == ROLE_SERVICE)
                    & ~trace.set_index(["scope", "entity"]).index.isin(
                        reach.set_index(["scope", "entity"]).index)]
    used = pd.concat([reach, service], ignore_index=True)
    if not totals.empty:
        used = used.merge(totals, on=["time", "scope", "entity", "signal"], how="left")
    else:
        used = used.assign(total=np.nan)
    value, base = used["value"].to_numpy(), used["baseline"].to_numpy()
    total = used["total"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(base > 0, value / base, np.nan)
        bound = wilson_upper(value * total, total, z) / base
    upper = np.where(np.isfinite(bound), np.fmax(bound, level), level)
    counted = np.isfinite(total) & np.isfinite(level)
    used = used.assign(level=level, upper=upper,
                       vt=np.where(counted, value * total, 0.0),
                       bt=np.where(counted, base * total, 0.0))
    out = (used.groupby(["time", "scope", "entity"], observed=True, sort=True)
           .agg(level=("level", "min"), upper=("upper", "min"), baseline=("baseline", "max"),
                vt=("vt", "sum"), bt=("bt", "sum")).reset_index())
    # counts (icmp, tcp, ...) pool into one share of the targets expected to answer: the
    # noise of a tiny TCP sample must not pass for the network's level
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(out["bt"] > 0, out["vt"] / out["bt"], np.nan)
    out["level"] = np.where(np.isfinite(pooled), pooled, out["level"])
    return out.drop(columns=["vt", "bt"])


def _signal_totals(frame: pd.DataFrame, country: str, bin_seconds: int) -> pd.DataFrame:
    """Targets probed per (bin, scope, entity, signal): `x_total` rows keyed as `x_up`."""
    # work on the distinct signal names, not on a million strings
    names = {str(n): str(n)[: -len("_total")] + "_up" for n in pd.unique(frame["signal"])
             if str(n).endswith("_total")}
    rows = frame[(frame["country"] == country) & frame["signal"].isin(list(names))]
    if rows.empty:
        return pd.DataFrame(columns=["time", "scope", "entity", "signal", "total"])
    times = pd.to_datetime(rows["time"], utc=True).dt.floor(f"{bin_seconds}s")
    out = pd.DataFrame({"time": times, "scope": rows["scope"].astype(str),
                        "entity": rows["entity"].astype(str),
                        "signal": rows["signal"].astype(str).map(names),
                        "total": rows["value"].astype(float)})
    return out.groupby(["time", "scope", "entity", "signal"], sort=False).max().reset_index()


def _entity_totals(signal_totals: pd.DataFrame) -> pd.DataFrame:
    """Targets probed per (bin, scope, entity): the detector's weights for size."""
    if signal_totals.empty:
        return pd.DataFrame(columns=["time", "scope", "entity", "total"])
    return (signal_totals.groupby(["time", "scope", "entity"], sort=False)["total"].max()
            .reset_index())


def _country_level(levels: pd.DataFrame, totals: pd.DataFrame, country: str,
                   sub_scope: str) -> pd.Series:
    own = levels[(levels["scope"] == "country") & (levels["entity"] == country)]
    if not own.empty:
        return pd.Series(own["level"].to_numpy(), index=pd.DatetimeIndex(own["time"]))
    subs = levels[levels["scope"] == sub_scope]
    if subs.empty:
        return pd.Series(dtype=float)
    if not totals.empty:
        subs = subs.merge(totals, on=["time", "scope", "entity"], how="left")
        weight = np.nan_to_num(subs["baseline"].to_numpy() * subs["total"].to_numpy())
    else:
        weight = np.zeros(len(subs))
    weight = np.where(weight > 0, weight, 1.0)
    known = np.isfinite(subs["level"].to_numpy())
    weighted = pd.DataFrame({
        "time": subs["time"].to_numpy(),
        "wl": np.where(known, weight * np.nan_to_num(subs["level"].to_numpy()), 0.0),
        "w": np.where(known, weight, 0.0)})
    sums = weighted.groupby("time", sort=True).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(sums["w"] > 0, sums["wl"] / sums["w"], np.nan)
    return pd.Series(result, index=pd.DatetimeIndex(sums.index))


def _signal_series(trace: pd.DataFrame, totals: pd.DataFrame, country: str,
                   sub_scope: str) -> list[SignalSeries]:
    out = []
    for signal in sorted(trace["signal"].unique()):
        rows = trace[trace["signal"] == signal]
        own = rows[(rows["scope"] == "country") & (rows["entity"] == country)]
        title, as_percent = SIGNAL_TITLES.get(signal, (signal.replace("_", " "), False))
        if signal.endswith("_up") and signal not in SIGNAL_TITLES:
            title, as_percent = f"Share of {signal[:-3]} targets answering", True
        if not own.empty:
            index = pd.DatetimeIndex(own["time"])
            value = pd.Series(own["value"].to_numpy(), index=index)
            base = pd.Series(own["baseline"].to_numpy(), index=index)
        else:
            subs = rows[rows["scope"] == sub_scope]
            if subs.empty:
                continue
            n = subs["entity"].nunique()
            noun = "networks" if sub_scope == "asn" else "regions"
            total_signal = signal[: -len("_up")] + "_total" if signal.endswith("_up") else ""
            if total_signal and not totals.empty:
                subs = subs.merge(totals, on=["time", "scope", "entity"], how="left")
                w = subs["total"].fillna(0.0)
                title += f" (all {n} {noun})"
            else:
                w = pd.Series(1.0, index=subs.index)
                title += f" (mean of {n} {noun})"
            parts = pd.DataFrame({"time": subs["time"], "v": subs["value"] * w,
                                  "b": subs["baseline"] * w,
                                  "w": w.where(subs["value"].notna(), 0)})
            sums = parts.groupby("time", sort=True).sum(min_count=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                value = (sums["v"] / sums["w"]).where(sums["w"] > 0)
                base = (sums["b"] / sums["w"]).where(sums["w"] > 0)
            value.index = base.index = pd.DatetimeIndex(sums.index)
        out.append(SignalSeries(signal, title, as_percent, value, base))
    return out


def _entity_rows(levels: pd.DataFrame, scope: str, bin_hours: float,
                 config: DetectorConfig) -> list[EntityRow]:
    rows = []
    for entity, part in levels[levels["scope"] == scope].groupby("entity", sort=False):
        lv = part["level"].to_numpy()
        upper = part["upper"].to_numpy()
        finite = np.isfinite(lv)
        if not finite.any():
            continue
        k = int(np.nanargmin(lv))
        sure = upper[np.isfinite(upper)]  # judged like the detector: on the optimistic side
        rows.append(EntityRow(
            scope, str(entity), _entity_label(scope, str(entity)), float(lv[k]),
            pd.Timestamp(part["time"].iloc[k]).to_pydatetime(),
            float((sure < config.warning).sum() * bin_hours),
            float((sure < config.critical).sum() * bin_hours)))
    rows.sort(key=lambda r: (r.lowest, -r.hours_below_warning, r.label))
    return rows


def _headline(country: Country, main: Incident | None, level: pd.Series, data_end: datetime,
              since: datetime, until: datetime, critical: float) -> str:
    if main is None:
        floor = float(level.min()) if len(level.dropna()) else float("nan")
        tail = (f": its level stayed at or above {format_percent(floor)} of ordinary levels"
                if np.isfinite(floor) else "")
        return (f"No shutdown or outage was detected in {country.name} between "
                f"{format_when(since)} and {format_when(until)}{tail}.")
    end = _incident_end(main, data_end)
    # an incident starts where the level first left its band; when it sank for a while before
    # it went under `critical` (Iran, 16 Nov 2019), the sentence names both moments
    deep = _first_below(level, critical, main.start, end) if main.severity == "critical" else None
    began = ""
    fell_at = main.start
    if deep is not None and deep > main.start:
        began, fell_at = f" began falling at {format_when(main.start)},", deep
    hours = (end - fell_at).total_seconds() / 3600
    lasted = (f"and stayed there for {format_hours(hours)}" if main.end is not None else
              f"and stayed there for at least {format_hours(hours)}, until the data ends at "
              f"{format_when(data_end)}")
    low = format_percent(main.min_level)
    subject = {
        "country": f"Connectivity in {country.name}",
        "asn": f"Connectivity of network {_entity_label('asn', main.entity)} in {country.name}",
        "region": f"Connectivity in {main.entity} ({country.name})",
    }.get(main.scope, f"Connectivity in {country.name}")
    if main.kind == KIND_SERVICE:
        services = " and ".join(sorted({s.split("_")[0].upper() for s in main.signals})) or "A"
        subject = f"{services} service in {country.name}"
    elif main.kind == KIND_THROTTLING:
        subject = f"Network performance in {country.name}"
    kind = KIND_WORDS.get(main.kind, main.kind)
    article = "an" if kind[0] in "aeiou" else "a"
    return (f"{subject}{began} fell to {low} of ordinary levels at {format_when(fell_at)} "
            f"{lasted}: {article} {kind} ({main.severity}).")


def _first_below(level: pd.Series, threshold: float, start: datetime,
                 end: datetime) -> datetime | None:
    """The first time in [start, end) the level is under the threshold."""
    times = pd.DatetimeIndex(level.index)
    inside = level[(times >= pd.Timestamp(start)) & (times < pd.Timestamp(end))]
    under = inside[inside < threshold]
    return pd.Timestamp(under.index[0]).to_pydatetime() if len(under) else None


def build_report(frame: pd.DataFrame, country: str, *, since: datetime | None = None,
                 until: datetime | None = None, config: DetectorConfig | None = None,
                 source: str = "", problems: Sequence[str] = ()) -> Report:
    """Everything a report says, from series points (series.COLUMNS) of any span.

    The detector runs over all of `frame` up to `until` (history before `since` trains its
    baselines); the report covers [since, until], by default the span of the country's data.
    """
    cfg = config or DetectorConfig()
    info = country_info(country)
    cc = info.code
    if frame.empty or not (frame["country"].astype(str) == cc).any():
        raise InputError(f"no series for country {cc} in {source or 'the input'}")
    incidents, trace = detect_with_baselines(frame, cc, now=until, config=cfg)
    if trace.empty:
        raise InputError(f"no series for country {cc} in {source or 'the input'} "
                         f"up to {until}")
    bin_seconds = int((trace["time"].drop_duplicates().sort_values().diff().dropna()
                       .min() or pd.Timedelta(seconds=cfg.bin_seconds or 300)).total_seconds())
    data_start = pd.Timestamp(trace["time"].min()).to_pydatetime()
    data_end = (pd.Timestamp(trace["time"].max()) + pd.Timedelta(seconds=bin_seconds)
                ).to_pydatetime()
    start = max(since, data_start) if since is not None else data_start
    end = min(until, data_end) if until is not None else data_end
    if start >= end:
        iso = "%Y-%m-%dT%H:%MZ"
        raise InputError(f"{cc}: no data between {start:{iso}} and {end:{iso}} (the data "
                         f"covers {data_start:{iso}} .. {data_end:{iso}})")
    window = trace[(trace["time"] >= start) & (trace["time"] < end)]
    scopes = set(window["scope"].unique())
    sub_scope = "asn" if "asn" in scopes else "region" if "region" in scopes else ""
    signal_totals = _signal_totals(frame, cc, bin_seconds)
    totals = _entity_totals(signal_totals)
    levels = _levels(window, signal_totals, cfg.confidence_z)
    country_level = _country_level(levels, totals, cc, sub_scope)
    mine = [i for i in incidents if i.country == cc and _overlaps(i, start, end)]
    vantage = [i for i in incidents
               if i.country == VANTAGE_COUNTRY and i.kind == KIND_VANTAGE
               and _overlaps(i, start, end)]
    main = _pick_main(mine)
    rows = _entity_rows(levels, sub_scope, bin_seconds / 3600, cfg) if sub_scope else []
    shown = [r.entity for r in rows[:MAX_SMALL_MULTIPLES]]
    entity_levels = {}
    for entity in shown:
        part = levels[(levels["scope"] == sub_scope) & (levels["entity"] == entity)]
        entity_levels[entity] = pd.Series(part["level"].to_numpy(),
                                          index=pd.DatetimeIndex(part["time"]))
    vantages = sorted({str(e) for e in frame.loc[frame["scope"].astype(str) == "vantage",
                                                   "entity"].unique()})
    return Report(
        country=info, since=start, until=end, bin_seconds=bin_seconds, source=source,
        config=cfg, incidents=mine, vantage_incidents=vantage, main=main,
        headline=_headline(info, main, country_level, data_end, start, end, cfg.critical),
        country_level=country_level, signals=_signal_series(window, totals, cc, sub_scope),
        entity_scope=sub_scope, entity_levels=entity_levels, entity_rows=rows,
        vantages=vantages, signal_names=sorted(window["signal"].unique()),
        problems=list(problems))


# ---------------------------------------------------------------------------------------------
# Documents: one list of blocks rendered twice, as Markdown and as self-contained HTML.


@dataclass(frozen=True, slots=True)
class Block:
    kind: str  # h1 h2 p quote list img table
    text: str = ""
    items: tuple[str, ...] = ()
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    image: Path | None = None


@dataclass(frozen=True, slots=True)
class ReportFiles:
    markdown: Path
    html: Path
    charts: tuple[Path, ...]


def _spans(incidents: Sequence[Incident], data_end: datetime) -> list[Span]:
    return [Span(i.kind, i.start, _incident_end(i, data_end), tuple(i.recoveries))
            for i in incidents]


def _incident_words(report: Report, inc: Incident) -> str:
    c = report.country
    where = {"country": c.name, "asn": f"network {_entity_label('asn', inc.entity)}",
             "region": f"region {inc.entity}"}.get(inc.scope, inc.entity)
    end = ("ongoing at the end of the data" if inc.end is None
           else f"ended {format_when(inc.end)}")
    hours = (_incident_end(inc, report.until) - inc.start).total_seconds() / 3600
    return (f"{KIND_WORDS.get(inc.kind, inc.kind).capitalize()} ({inc.severity}), {where}: "
            f"from {format_when(inc.start)}, {end}; {format_hours(hours)}; lowest level "
            f"{format_percent(inc.min_level)}")


def _summary(report: Report) -> list[Block]:
    c, main = report.country, report.main
    blocks = []
    if main is not None:
        local = format_local(c, main.start)
        lines = [f"Began at {format_when(main.start)}" + (f" ({local})" if local else "") + "."]
        if main.end is not None:
            lines.append(f"Ended at {format_when(main.end)}"
                         + (f" ({format_local(c, main.end)})" if local else "") + ".")
        else:
            lines.append(f"Still ongoing at the end of the data, {format_when(report.until)}.")
        level = report.country_level
        if main.scope == "country" and len(level.dropna()):
            inside = level[(level.index >= main.start)
                           & (level.index < _incident_end(main, report.until))].dropna()
            if len(inside):
                lowest_at = inside.index[int(np.argmin(inside.to_numpy()))].to_pydatetime()
                lines.append(f"Lowest level: {format_percent(float(inside.min()))} of ordinary "
                             f"levels, at {format_when(lowest_at)}.")
        if main.networks:
            noun = "networks" if report.entity_scope == "asn" else "regions"
            lines.append(f"{len(main.networks)} of {len(report.entity_rows)} {noun} were down "
                         "with it." if main.kind == KIND_NATIONWIDE else
                         f"{noun.capitalize()} involved: {len(main.networks)}.")
        if main.recoveries:
            lines.append(f"Connectivity came back briefly {len(main.recoveries)} time"
                         f"{'s' if len(main.recoveries) != 1 else ''} inside it (see "
                         "Restorations).")
        blocks.append(Block("list", items=tuple(lines)))
    others = [i for i in report.incidents if i is not main]
    if report.incidents:
        blocks.append(Block("h2", "Incidents"))
        blocks.append(Block("list", items=tuple(_incident_words(report, i) for i in
                                                 ([main] if main else []) + others[:30])))
        if len(others) > 30:
            blocks.append(Block("p", f"... and {len(others) - 30} more smaller incidents."))
    if report.vantage_incidents:
        blocks.append(Block("p", "The monitor itself was offline (its control targets abroad "
                            "did not answer) during: " + "; ".join(
                                f"{format_when(i.start)} to "
                                f"{format_when(_incident_end(i, report.until))}"
                                for i in report.vantage_incidents)
                            + ". Those periods say nothing about the country."))
    return blocks


def _restorations(report: Report) -> list[Block]:
    rows = []
    for inc in report.incidents:
        if inc.kind != KIND_NATIONWIDE and inc is not report.main:
            continue
        for a, b in inc.recoveries:
            part = report.country_level[(report.country_level.index >= a)
                                        & (report.country_level.index < b)].dropna()
            peak = format_percent(float(part.max())) if len(part) else "-"
            rows.append((format_when(a), format_when(b),
                         format_hours((b - a).total_seconds() / 3600), peak))
    if not rows:
        return []
    return [Block("h2", "Restorations inside the incident"),
            Block("p", "Short periods when connectivity came back before falling again; the "
                  "detector keeps them inside one incident when they last less than "
                  f"{format_hours(report.config.flap_merge_seconds / 3600)}."),
            Block("table", header=("From", "To", "Duration", "Highest level"),
                  rows=tuple(rows))]


def _entity_table(report: Report) -> list[Block]:
    if not report.entity_rows:
        return []
    noun = "Networks" if report.entity_scope == "asn" else "Regions"
    rows = tuple((r.label, format_percent(r.lowest),
                  format_when(r.lowest_at) if r.lowest_at else "-",
                  f"{r.hours_below_warning:.0f} h", f"{r.hours_below_critical:.0f} h")
                 for r in report.entity_rows[:MAX_TABLE_ROWS])
    blocks = [Block("h2", f"{noun}, most affected first"),
              Block("p", "Lowest level: the lowest measured share of ordinary. Time below a "
                    "threshold counts only bins where even the optimistic end of the "
                    "measurement (small samples are uncertain) stayed below it, as the detector "
                    "judges."),
              Block("table", header=(noun[:-1], "Lowest level", "When",
                                     f"Time below {report.config.warning:.0%}",
                                     f"Time below {report.config.critical:.0%}"),
                    rows=rows)]
    if len(report.entity_rows) > MAX_TABLE_ROWS:
        blocks.append(Block("p", f"... {len(report.entity_rows) - MAX_TABLE_ROWS} more, "
                            "less affected."))
    return blocks


def _methodology(report: Report) -> list[Block]:
    cfg = report.config
    methods = sorted({s.split("_")[0] for s in report.signal_names} & set(PROBE_WORDS))
    measured = [f"{PROBE_WORDS[m]}." for m in methods]
    external = [s for s in report.signal_names if s.split("_")[0] not in PROBE_WORDS]
    if external:
        measured.append("Series read as given: " + ", ".join(external) + ".")
    where = (f"Measured from the vantage point(s) {', '.join(report.vantages)}; their own "
             "connectivity is checked every round against control targets abroad, and periods "
             "when they were offline are never counted against the country."
             if report.vantages else
             "The input carries no vantage self-check series, so this report cannot tell an "
             "outage of the measuring side from one of the country; read it with that in mind.")
    weekly = (f" (the same weekday over {cfg.baseline_weeks} weeks once {cfg.weekly_min_weeks} "
              "weeks of history exist)" if cfg.weekly_min_weeks else "")
    items = (
        f"Source: {report.source or 'series points'}; {report.bin_seconds // 60}-minute bins.",
        *measured,
        where,
        f"Baseline: for every series and time of day, the median of the previous "
        f"{cfg.baseline_days} days{weekly}. Periods the detector flags are not learned, so a "
        "long shutdown does not become the new normal.",
        f"Level = measured value / baseline. A bin is a warning under "
        f"{cfg.warning:.0%} and critical under {cfg.critical:.0%}, judged on the optimistic "
        "side of the measurement's own noise and sample size; an incident needs "
        f"{cfg.min_bins} such bins in a row, and recoveries shorter than "
        f"{format_hours(cfg.flap_merge_seconds / 3600)} do not split it.",
        f"Nationwide shutdown: the country's level falls and a size-weighted majority "
        f"({cfg.majority:.0%}) of its networks or regions fall with it; otherwise the ones "
        "down are network outages. A country without its own series takes the size-weighted "
        "mean of its networks' (or regions') levels.",
        ("Levels measure reachability from this monitor relative to its own history, not "
         "traffic volume; 100% means ordinary for that time of day." if report.vantages else
         "Levels are each series relative to its own history; 100% means ordinary for that "
         "time of day."),
    )
    blocks = [Block("h2", "Methodology"), Block("list", items=items)]
    if report.problems:
        blocks.append(Block("p", f"{len(report.problems)} malformed input rows were skipped "
                            f"(first: {report.problems[0]})."))
    return blocks


def _blocks(report: Report, chart_paths: dict[str, Path]) -> list[Block]:
    c = report.country
    title = f"Internet connectivity in {c.name}, {format_day(report.since)} to " \
            f"{format_day(report.until - timedelta(seconds=1))}"
    blocks = [Block("h1", title), Block("quote", report.headline)]
    blocks += _summary(report)
    blocks.append(Block("h2", "Level over time"))
    blocks.append(Block("img", f"{c.name}: level against its baseline",
                        image=chart_paths["level"]))
    blocks += _restorations(report)
    for s in report.signals:
        key = f"signal:{s.signal}"
        if key in chart_paths:
            blocks.append(Block("img", s.title, image=chart_paths[key]))
    blocks += _entity_table(report)
    if "multiples" in chart_paths:
        noun = "network" if report.entity_scope == "asn" else "region"
        more = len(report.entity_rows) - len(report.entity_levels)
        blocks.append(Block("p", f"Level of each {noun}, most affected first"
                            + (f" (the {len(report.entity_levels)} most affected; {more} more "
                               "in the table)" if more > 0 else "") + "."))
        blocks.append(Block("img", f"Level per {noun}", image=chart_paths["multiples"]))
    blocks += _methodology(report)
    offset = utc_offset(c, report.since)
    blocks.append(Block("p", f"Times are UTC; local time in {c.name} is {c.timezone}, {offset}."
                        if offset else "Times are UTC."))
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "quote":
            out.append(f"> **{b.text}**")
        elif b.kind == "list":
            out.append("\n".join(f"- {item}" for item in b.items))
        elif b.kind == "img" and b.image is not None:
            out.append(f"![{b.text}]({b.image.name})")
        elif b.kind == "table":
            lines = ["| " + " | ".join(map(_md_cell, b.header)) + " |",
                     "|" + "|".join(" --- " for _ in b.header) + "|"]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


HTML_STYLE: Final = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1000px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.5}
h1{font-size:1.6em;margin-bottom:.3em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
blockquote{font-size:1.2em;font-weight:600;border-left:5px solid #d62728;margin:1em 0;
padding:.5em 1em;background:#fbf3f3}
img{max-width:100%;height:auto;display:block;margin:1em 0}
table{border-collapse:collapse;font-size:.9em;margin:1em 0}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left}th{background:#f4f4f4}
td:nth-child(n+2){font-variant-numeric:tabular-nums}
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One file: the images are inlined as base64 data URIs, the style sheet is inline."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{HTML_STYLE}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "quote":
            out.append(f"<blockquote>{e(b.text)}</blockquote>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "img" and b.image is not None:
            data = base64.b64encode(b.image.read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(b.text)}" src="data:image/png;base64,{data}">')
        elif b.kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                           for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "signal"


def write_report(report: Report, out_dir: str | Path) -> ReportFiles:
    """Draw the charts and write report.md and report.html into `out_dir` (created)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out}: cannot create the directory ({err})") from None
    c, start, end = report.country, report.since, report.until
    label = time_axis_label(c, start)
    spans = _spans(report.incidents, end)
    country_spans = [s for s, i in zip(spans, report.incidents, strict=True)
                     if i.scope == "country"] + _spans(report.vantage_incidents, end)
    paths: dict[str, Path] = {}
    paths["level"] = charts.level_chart(
        out / "level.png", report.country_level, country_spans,
        title=f"{c.name}: connectivity, % of ordinary level", time_label=label, start=start,
        end=end, warning=report.config.warning, critical=report.config.critical)
    for s in report.signals:
        paths[f"signal:{s.signal}"] = charts.signal_chart(
            out / f"signal-{_slug(s.signal)}.png", s.value, s.baseline, country_spans,
            title=f"{c.name}: {s.title}",
            ylabel="share answering" if s.as_percent else s.signal.replace("_", " "),
            time_label=label, start=start, end=end, band=report.config.warning,
            as_percent=s.as_percent)
    if report.entity_levels:
        own = {e: [sp for sp, i in zip(spans, report.incidents, strict=True)
                   if i.scope == "country" or i.entity == e] for e in report.entity_levels}
        labels = {e: _entity_label(report.entity_scope, e) for e in report.entity_levels}
        noun = "network (ASN)" if report.entity_scope == "asn" else "region"
        paths["multiples"] = charts.small_multiples(
            out / "by-network.png" if report.entity_scope == "asn" else out / "by-region.png",
            {labels[e]: s for e, s in report.entity_levels.items()},
            {labels[e]: v for e, v in own.items()},
            title=f"{c.name}: level per {noun}, % of ordinary", time_label=label,
            start=start, end=end, critical=report.config.critical)
    blocks = _blocks(report, paths)
    markdown = out / "report.md"
    markdown.write_text(render_markdown(blocks), encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(blocks, blocks[0].text), encoding="utf-8")
    return ReportFiles(markdown, page, tuple(paths.values()))
