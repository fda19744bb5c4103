"""Several vantage points, one verdict: per-vantage counts -> consensus series, and the vantages'
own incidents (offline, disagreeing alone).

Pure functions and a small state machine; no I/O, no clock. monitor/central.py feeds them from
PromQL. The rules:

- A vantage is healthy in a bin when it reported counts and its control targets answered
  (`vantage_up` at or above the detector's `vantage_down_below`).
- The consensus of a measure (country or network, method) in a bin is the (up, total) of the
  healthy vantage at the *upper median* of the answered fractions. So the consensus falls only
  when more than half of the healthy vantages see it fall: with two vantages both must agree, with
  three any two. The consensus series are what the ordinary detector judges.
- A vantage that is unhealthy (or silent) for `min_bins` bins gets a `vantage_offline` incident.
- A healthy vantage whose own detector has an incident where the consensus has none, or none
  where the consensus has one, for `min_bins` bins, disagrees alone: one `vantage_disagreement`
  incident for that vantage, listing the places. Neither is ever a country incident.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import numpy as np
import pandas as pd

from monitor.incidents import KIND_VANTAGE_OFFLINE, format_time, vantage_incident
from monitor.series import COLUMNS, SIGNAL_VANTAGE_UP, VANTAGE_COUNTRY, method_signals

KIND_DISAGREEMENT: Final = "vantage_disagreement"
CONSENSUS_VANTAGE: Final = "consensus"
COUNT_COLUMNS: Final = ("time", "vantage", "country", "scope", "entity", "method", "up", "total")
HEALTH_COLUMNS: Final = ("time", "vantage", "vantage_up")
_KEY: Final = ["time", "country", "scope", "entity", "method"]

Place = tuple[str, str, str]  # (country, scope, entity)


def empty_counts() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("up", "total") else "object")
                         for c in COUNT_COLUMNS})


def empty_health() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c == "vantage_up" else "object")
                         for c in HEALTH_COLUMNS})


def healthy_mask(counts: pd.DataFrame, health: pd.DataFrame, down_below: float) -> pd.Series:
    """True for the count rows whose vantage was healthy at that time. A vantage without a
    vantage_up series (no control targets) counts as healthy while it reports."""
    if counts.empty:
        return pd.Series(dtype=bool)
    keyed = counts[["time", "vantage"]].merge(health, on=["time", "vantage"], how="left")
    up = keyed["vantage_up"].to_numpy(dtype=np.float64)
    return pd.Series(np.isnan(up) | (up >= down_below), index=counts.index)


def to_points(counts: pd.DataFrame) -> pd.DataFrame:
    """(time, country, scope, entity, method, up, total) rows -> series.COLUMNS points."""
    if counts.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})
    signals = {m: method_signals(m) for m in counts["method"].unique()}
    base = counts[["time", "country", "scope", "entity"]]
    up = base.assign(signal=[signals[m][0] for m in counts["method"]],
                     value=counts["up"].to_numpy(dtype=np.float64))
    total = base.assign(signal=[signals[m][1] for m in counts["method"]],
                        value=counts["total"].to_numpy(dtype=np.float64))
    return pd.concat([up, total], ignore_index=True)[list(COLUMNS)]


def vantage_points(health: pd.DataFrame, entity: str | None = None) -> pd.DataFrame:
    """vantage_up rows as series points (entity: the vantage, or `entity` if given)."""
    return pd.DataFrame({
        "time": health["time"], "country": VANTAGE_COUNTRY, "scope": "vantage",
        "entity": health["vantage"] if entity is None else entity,
        "signal": SIGNAL_VANTAGE_UP, "value": health["vantage_up"].astype("float64"),
    })[list(COLUMNS)]


def consensus_points(counts: pd.DataFrame, health: pd.DataFrame,
                     down_below: float = 0.5) -> pd.DataFrame:
    """The consensus series (see the module docstring) as series points, plus a vantage_up
    series for the consensus itself: 1 in a bin with a healthy vantage, 0 in one without (so
    the detector never reads "every vantage offline" as a shutdown)."""
    times = sorted(set(counts["time"]) | set(health["time"]))
    ok = counts[healthy_mask(counts, health, down_below).to_numpy(dtype=bool)]
    ok = ok[ok["total"] > 0]
    picked = ok.iloc[0:0]
    if not ok.empty:
        ranked = ok.assign(fraction=ok["up"] / ok["total"]).sort_values(
            [*_KEY, "fraction", "vantage"], kind="stable")
        group = ranked.groupby(_KEY, sort=False, observed=True)
        rank = group.cumcount().to_numpy()
        size = group["fraction"].transform("size").to_numpy()
        picked = ranked[rank == size // 2]  # the upper median
    healthy_times = set(picked["time"])
    consensus_health = pd.DataFrame({
        "time": times, "vantage": CONSENSUS_VANTAGE,
        "vantage_up": [1.0 if t in healthy_times else 0.0 for t in times]})
    points = pd.concat([to_points(picked[["time", *_KEY[1:], "up", "total"]]),
                        vantage_points(consensus_health)], ignore_index=True)
    return points.sort_values("time", kind="stable").reset_index(drop=True)


def one_vantage_points(counts: pd.DataFrame, health: pd.DataFrame, vantage: str) -> pd.DataFrame:
    """One vantage's own series, as its daemon's detector would see them."""
    mine = counts[counts["vantage"] == vantage]
    points = pd.concat([to_points(mine), vantage_points(health[health["vantage"] == vantage])],
                       ignore_index=True)
    return points.sort_values("time", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- the vantages' own incidents


def _places(incidents: Iterable[Mapping[str, Any]]) -> dict[Place, str]:
    """Open non-vantage incidents by place -> kind."""
    return {(str(i["country"]), str(i["scope"]), str(i["entity"])): str(i["kind"])
            for i in incidents
            if i.get("end") is None and i["scope"] != "vantage"}


@dataclass(slots=True)
class _Streak:
    since: datetime | None = None  # first bin of the current streak
    bins: int = 0
    incident: dict[str, Any] | None = None  # open once the streak is long enough


@dataclass(slots=True)
class VantageJudge:
    """Per bin: which vantages are offline, which disagree alone. `judge` returns the vantage
    incidents to hand to the lifecycle (open ones, and those that ended in this bin)."""

    min_bins: int = 2
    offline: dict[str, _Streak] = field(default_factory=dict)
    disagreeing: dict[str, _Streak] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)

    def judge(
        self,
        when: datetime,
        healthy: Mapping[str, bool],
        own_incidents: Mapping[str, Iterable[Mapping[str, Any]]],
        consensus_incidents: Iterable[Mapping[str, Any]],
        measured: Mapping[str, set[Place]],
    ) -> list[dict[str, Any]]:
        """`healthy`: vantages that reported in this bin -> healthy or not (a vantage seen
        before and missing now is offline); `own_incidents`: each vantage's detector's
        incidents; `measured`: the places each vantage has counts for in this bin."""
        self.known |= set(healthy)
        consensus = _places(consensus_incidents)
        out: list[dict[str, Any]] = []
        for vantage in sorted(self.known):
            is_healthy = healthy.get(vantage, False)
            out += self._streak(self.offline, vantage, when, not is_healthy, None)
            differences: list[dict[str, str]] = []
            if is_healthy:
                mine = _places(own_incidents.get(vantage, ()))
                for place in sorted((set(mine) | set(consensus)) & measured.get(vantage, set())):
                    if (place in mine) != (place in consensus):
                        differences.append({
                            "country": place[0], "scope": place[1], "entity": place[2],
                            "vantage_sees": mine.get(place, "none"),
                            "consensus": consensus.get(place, "none")})
            out += self._streak(self.disagreeing, vantage, when, bool(differences), differences)
        return out

    def _streak(self, streaks: dict[str, _Streak], vantage: str, when: datetime, active: bool,
                details: list[dict[str, str]] | None) -> list[dict[str, Any]]:
        streak = streaks.setdefault(vantage, _Streak())
        if not active:
            ended = streak.incident
            streaks[vantage] = _Streak()
            return [] if ended is None else [{**ended, "end": format_time(when)}]
        if streak.since is None:
            streak.since = when
        streak.bins += 1
        if streak.bins < self.min_bins:
            return []
        if details is None:
            if streak.incident is None:
                streak.incident = vantage_incident(vantage, streak.since, None)
        else:
            streak.incident = disagreement_incident(vantage, streak.since, details,
                                                    streak.incident)
        return [streak.incident]

    def open_incidents(self) -> list[dict[str, Any]]:
        return [s.incident for streaks in (self.offline, self.disagreeing)
                for s in streaks.values() if s.incident is not None]


def disagreement_incident(vantage: str, since: datetime, details: list[dict[str, str]],
                          previous: dict[str, Any] | None) -> dict[str, Any]:
    """A vantage alone against the others: a warning about the vantage, never a country."""
    places = list(previous.get("disagrees_on", [])) if previous else []
    for detail in details:  # every place it disagreed on during this incident, first seen first
        if not any(all(p[k] == detail[k] for k in ("country", "scope", "entity"))
                   for p in places):
            places.append(detail)
    return {
        "id": f"vantage-disagreement-{vantage}-{format_time(since)}",
        "country": VANTAGE_COUNTRY,
        "scope": "vantage",
        "entity": vantage,
        "kind": KIND_DISAGREEMENT,
        "severity": "warning",
        "start": format_time(since),
        "end": None,
        "min_level": 1.0,
        "score": 0.0,
        "signals": [],
        "networks": [],
        "disagrees_on": places,
    }


def is_vantage_incident(incident: Mapping[str, Any]) -> bool:
    return incident["kind"] in (KIND_VANTAGE_OFFLINE, KIND_DISAGREEMENT)
