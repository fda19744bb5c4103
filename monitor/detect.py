"""The shutdown detector: series -> levels against a baseline -> incidents. Pure: no I/O, no clock.

How it decides (DESIGN, "The detector, in words"):

1. Every (country, scope, entity, signal) is a *measure*. A `<x>_up` signal with a matching
   `<x>_total` is one measure whose value is the fraction up, so small samples can be weighed.
2. Baseline: per measure and per time-of-day slot (an hour by default), the median over the last
   `baseline_days` days of that slot's mean; with `weekly_min_weeks` weeks of history the median
   of the same weekday slot instead. Interpolated between slots. Anomalous bins are learned as the
   baseline's own prediction (as IODA does, but without IODA's 7-day limit), so a month-long
   shutdown never becomes the new normal. Before a day of history exists, a flat mean of what
   was seen so far stands in (and is learned raw, since it cannot tell a trough from a drop).
3. Level = value / baseline. A bin is anomalous on its *upper* plausible level: the Wilson upper
   bound of up/total for counts, and level + `noise_z` x the measure's own recent noise, so a
   network with 8 blocks is not "50% down" because 4 missed one round.
4. Entities (country, ASN, region) take the worst of their reachability signals. A country's level
   is its own series or, without one, the size-weighted mean of its networks (or regions).
   `nationwide_shutdown` needs the country down and a weighted majority of its networks with it;
   otherwise the networks that are down are `network_outage`s.
5. Incidents need `min_bins` consecutive anomalous bins; runs separated by recoveries shorter
   than `flap_merge_seconds` are one incident whose `recoveries` lists the gaps. Bins where the
   vantage is offline are unknown for every country (and raise `vantage_offline` instead).

`detect(frame)` runs over history; `LiveDetector` runs the same engine one round at a time.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from monitor.series import COLUMNS, SIGNAL_VANTAGE_UP, VANTAGE_COUNTRY, SeriesPoint

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
I8 = npt.NDArray[np.int8]

DAY_SECONDS: Final = 86400
KIND_NATIONWIDE: Final = "nationwide_shutdown"
KIND_NETWORK: Final = "network_outage"
KIND_SERVICE: Final = "service_block"
KIND_THROTTLING: Final = "throttling"
KIND_VANTAGE: Final = "vantage_offline"
KINDS: Final = (KIND_NATIONWIDE, KIND_NETWORK, KIND_SERVICE, KIND_THROTTLING, KIND_VANTAGE)
INFERRED_VANTAGE: Final = "inferred"

# Measure roles: what a drop (or rise) of the measure means.
ROLE_REACH: Final = 0  # reachability: a drop is an outage
ROLE_SERVICE: Final = 1  # http/dns: a drop while reachability holds is a service block
ROLE_RTT: Final = 2  # latency: a rise is throttling
ROLE_LOSS: Final = 3  # loss fraction: a rise is throttling
ROLE_VANTAGE: Final = 4  # the vantage's own control targets

UNKNOWN: Final = -1


@dataclass
class DetectorConfig:
    """Every threshold of the detector. The config file's `detector:` section maps onto these."""

    warning: float = 0.8
    """Level (fraction of baseline) under which a bin is a warning."""
    critical: float = 0.5
    """Level under which a bin is critical."""
    bin_seconds: int = 0
    """Bin size; 0 infers it from the data (median step). Must divide a day."""
    baseline_days: int = 7
    """Days of same-time-of-day history in the daily baseline median."""
    weekly_min_weeks: int = 3
    """Weeks of same-weekday history needed before the weekly baseline is used; 0 disables it."""
    baseline_weeks: int = 4
    """Weeks kept for the weekly baseline."""
    slot_seconds: int = 3600
    """Time-of-day resolution of the baseline (bins are averaged into slots, then interpolated)."""
    warmup_min_bins: int = 3
    """Before a day of history: bins seen before the flat warm-up baseline is trusted."""
    min_bins: int = 2
    """Consecutive anomalous bins needed for an incident (one missed round is not a shutdown)."""
    flap_merge_seconds: int = 4 * 3600
    """Recoveries shorter than this inside an incident do not split it."""
    confidence_z: float = 2.58
    """z of the per-bin Wilson bound on up/total counts (99%: many bins are tested)."""
    noise_z: float = 3.0
    """How many times a measure's own recent noise (relative, robust) a drop must exceed."""
    initial_noise: float = 0.1
    """Relative noise assumed until a measure has a day of residuals to estimate its own."""
    pool_bins: int = 3
    """Counts of this many consecutive bins are also judged pooled (tiny networks)."""
    pool_z: float = 3.09
    """z of the Wilson bound on the pooled counts (stricter: many overlapping windows)."""
    majority: float = 0.5
    """Size-weighted share of a country's networks that must be down for a nationwide incident."""
    vantage_down_below: float = 0.5
    """vantage_up under this: the vantage is offline and country bins are unknown."""
    vantage_fallback_share: float = 0.75
    """Without vantage series: this share of countries down in one bin means the vantage is."""
    vantage_fallback_min_countries: int = 4
    """Countries needed before the fallback above is applied."""
    rtt_warning_factor: float = 3.0
    """RTT this many times its baseline (reachability intact): throttling warning."""
    rtt_critical_factor: float = 10.0
    """RTT this many times its baseline: throttling critical."""
    rtt_min_increase_s: float = 0.05
    """...and at least this many seconds above it: a 40 us RTT tripling on a busy host is noise."""
    loss_warning_increase: float = 0.3
    """Loss fraction this much above its baseline: throttling warning."""
    loss_critical_increase: float = 0.6
    """Loss fraction this much above its baseline: throttling critical."""

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if not 0 < self.critical < self.warning <= 1.5:
            raise ValueError("detector: need 0 < critical < warning <= 1.5")
        if self.bin_seconds < 0 or (self.bin_seconds and DAY_SECONDS % self.bin_seconds):
            raise ValueError("detector.bin_seconds: expected 0 (infer) or a divisor of 86400")
        if self.slot_seconds <= 0 or DAY_SECONDS % self.slot_seconds:
            raise ValueError("detector.slot_seconds: expected a divisor of 86400")
        for name in ("baseline_days", "min_bins", "warmup_min_bins", "baseline_weeks"):
            if getattr(self, name) < 1:
                raise ValueError(f"detector.{name}: expected an integer >= 1")
        if self.flap_merge_seconds < 0:
            raise ValueError("detector.flap_merge_seconds: expected >= 0")
        if not 0 < self.majority <= 1 or not 0 < self.vantage_fallback_share <= 1:
            raise ValueError("detector.majority / vantage_fallback_share: expected in (0, 1]")


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def incident_id(country: str, scope: str, entity: str, kind: str, start: datetime) -> str:
    """Stable id: the same incident found again (after a restart, offline) has the same id."""
    key = f"{country}|{scope}|{entity}|{kind}|{format_time(start)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Incident:
    """One incident, in DESIGN's JSON shape. `end` is None while it is ongoing."""

    id: str
    country: str
    scope: str
    entity: str
    kind: str
    severity: str
    start: datetime
    end: datetime | None
    min_level: float
    score: float
    signals: list[str] = field(default_factory=list)
    networks: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[tuple[datetime, datetime]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "country": self.country,
            "scope": self.scope,
            "entity": self.entity,
            "kind": self.kind,
            "severity": self.severity,
            "start": format_time(self.start),
            "end": None if self.end is None else format_time(self.end),
            # JSON has no infinity: a level never measured is reported as 0
            "min_level": round(self.min_level, 4) if math.isfinite(self.min_level) else 0.0,
            "score": round(self.score, 3) if math.isfinite(self.score) else 0.0,
            "signals": list(self.signals),
            "networks": [dict(n) for n in self.networks],
            "recoveries": [[format_time(a), format_time(b)] for a, b in self.recoveries],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Incident:
        """Inverse of to_json. Raises ValueError naming the key that is missing or wrong."""
        try:
            end = data.get("end")
            return cls(
                id=str(data["id"]),
                country=str(data["country"]),
                scope=str(data["scope"]),
                entity=str(data["entity"]),
                kind=str(data["kind"]),
                severity=str(data["severity"]),
                start=parse_time(str(data["start"])),
                end=None if end is None else parse_time(str(end)),
                min_level=float(data["min_level"]),
                score=float(data["score"]),
                signals=[str(s) for s in data.get("signals", [])],
                networks=[dict(n) for n in data.get("networks", [])],
                recoveries=[
                    (parse_time(str(a)), parse_time(str(b))) for a, b in data.get("recoveries", [])
                ],
            )
        except KeyError as err:
            raise ValueError(f"incident JSON: missing key {err}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"incident JSON: {err}") from None


# ---------------------------------------------------------------------------------------------
# Measures: which series exist and what they mean.


def signal_role(signal: str) -> int:
    if signal == SIGNAL_VANTAGE_UP:
        return ROLE_VANTAGE
    if signal.startswith(("http", "dns")):
        return ROLE_SERVICE
    if signal.startswith("rtt"):
        return ROLE_RTT
    if signal == "loss" or signal.endswith("_loss"):
        return ROLE_LOSS
    return ROLE_REACH


def total_signal_of(signal: str) -> str | None:
    """`icmp_blocks_up` is weighed by `icmp_blocks_total`: the number of targets probed."""
    return signal[: -len("_up")] + "_total" if signal.endswith("_up") else None


@dataclass(frozen=True, slots=True)
class _Measure:
    country: str
    scope: str
    entity: str
    signal: str
    role: int
    entity_index: int


class _Registry:
    """Measure and entity numbering. Grows as new series appear (live), never shrinks."""

    def __init__(self) -> None:
        self.measures: list[_Measure] = []
        self.entities: list[tuple[str, str, str]] = []
        self._entity_index: dict[tuple[str, str, str], int] = {}
        # (country, scope, entity, signal) -> (measure index, 0 value | 1 total)
        self.slots: dict[tuple[str, str, str, str], tuple[int, int]] = {}
        self._pending_totals: dict[tuple[str, str, str, str], int] = {}
        self.version = 0

    def resolve(self, key: tuple[str, str, str, str], all_signals: set[str]) -> tuple[int, int]:
        """Measure index and role (0 value, 1 total) of one series key, registering it."""
        found = self.slots.get(key)
        if found is not None:
            return found
        country, scope, entity, signal = key
        if signal.endswith("_total") and signal[: -len("_total")] + "_up" in all_signals:
            up_key = (country, scope, entity, signal[: -len("_total")] + "_up")
            index = self.resolve(up_key, all_signals)[0]
            self.slots[key] = (index, 1)
            return index, 1
        ekey = (country, scope, entity)
        if ekey not in self._entity_index:
            self._entity_index[ekey] = len(self.entities)
            self.entities.append(ekey)
        index = len(self.measures)
        role = ROLE_VANTAGE if scope == "vantage" else signal_role(signal)
        self.measures.append(_Measure(country, scope, entity, signal, role,
                                      self._entity_index[ekey]))
        self.slots[key] = (index, 0)
        self.version += 1
        return index, 0


# ---------------------------------------------------------------------------------------------
# Baselines: per measure, per time-of-day slot, from history that excludes anomalies.


def _quiet_nanmedian(values: F64, axis: int) -> F64:
    """Median ignoring NaN along `axis` (NaN where all are NaN); much faster than np.nanmedian
    on the small axes used here, and silent."""
    ordered = np.sort(values, axis=axis)  # NaN sorts last
    valid = np.isfinite(values).sum(axis=axis, keepdims=True)
    lo = np.maximum((valid - 1) // 2, 0)
    hi = np.maximum(valid // 2, 0)
    a = np.take_along_axis(ordered, lo, axis=axis)
    b = np.take_along_axis(ordered, np.minimum(hi, values.shape[axis] - 1), axis=axis)
    out = np.where(valid > 0, (a + b) / 2, np.nan)
    return np.asarray(np.squeeze(out, axis=axis), dtype=np.float64)


class _Baselines:
    """Ring of daily per-slot means (clean values only), plus today's accumulators."""

    def __init__(self, config: DetectorConfig, slots_per_day: int) -> None:
        self.cfg = config
        self.slots = slots_per_day
        self.rows = max(config.baseline_days, 7 * config.baseline_weeks if
                        config.weekly_min_weeks > 0 else 0)
        self.n = 0
        self.hist = np.full((0, self.rows, slots_per_day), np.nan, dtype=np.float32)
        self.row_day = np.full(self.rows, -(10**9), dtype=np.int64)
        self.noise_hist = np.full((0, self.rows), np.nan, dtype=np.float32)
        self.sum = np.zeros((0, slots_per_day))
        self.cnt = np.zeros((0, slots_per_day))
        self.res_sum = np.zeros(0)
        self.res_cnt = np.zeros(0)
        self.warm_sum = np.zeros(0)
        self.warm_cnt = np.zeros(0)
        self.day = -(10**9)

    def grow(self, n: int) -> None:
        extra = n - self.n
        if extra <= 0:
            return
        s, r = self.slots, self.rows
        self.hist = np.concatenate([self.hist, np.full((extra, r, s), np.nan, np.float32)])
        self.noise_hist = np.concatenate([self.noise_hist, np.full((extra, r), np.nan, np.float32)])
        self.sum = np.concatenate([self.sum, np.zeros((extra, s))])
        self.cnt = np.concatenate([self.cnt, np.zeros((extra, s))])
        for name in ("res_sum", "res_cnt", "warm_sum", "warm_cnt"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra)]))
        self.n = n

    def roll_to(self, day: int) -> None:
        """Close today's accumulators into the ring when a new day starts."""
        if day == self.day:
            return
        if self.day > -(10**9):
            row = self.day % self.rows
            with np.errstate(invalid="ignore", divide="ignore"):
                self.hist[:, row, :] = np.where(self.cnt > 0, self.sum / self.cnt, np.nan)
                self.noise_hist[:, row] = np.where(
                    self.res_cnt > 0, self.res_sum / self.res_cnt, np.nan)
            self.row_day[row] = self.day
        self.sum[:] = 0
        self.cnt[:] = 0
        self.res_sum[:] = 0
        self.res_cnt[:] = 0
        self.day = day

    def _rows(self, day: int, back: Iterable[int]) -> list[int]:
        rows = ((day - k) % self.rows for k in back)
        return [r for r, k in zip(rows, back, strict=True) if self.row_day[r] == day - k]

    def has_history(self, day: int) -> npt.NDArray[np.bool_]:
        rows = self._rows(day, range(1, self.cfg.baseline_days + 1))
        if not rows:
            return np.zeros(self.n, dtype=bool)
        return np.asarray(np.isfinite(self.hist[:, rows, :]).any(axis=(1, 2)))

    def slot_baseline(self, day: int, slots: I64) -> F64:
        """(n, len(slots)) baseline per slot; NaN where no history."""
        cfg = self.cfg
        daily = self._rows(day, range(1, cfg.baseline_days + 1))
        if not daily:
            return np.full((self.n, len(slots)), np.nan)
        base = _quiet_nanmedian(self._take(daily, slots), axis=1)
        if cfg.weekly_min_weeks > 0:
            weekly = self._rows(day, range(7, 7 * cfg.baseline_weeks + 1, 7))
            if len(weekly) >= cfg.weekly_min_weeks:
                same_day = self._take(weekly, slots)
                enough = np.isfinite(same_day).sum(axis=1) >= cfg.weekly_min_weeks
                weekly_base = _quiet_nanmedian(same_day, axis=1)
                base = np.where(enough, weekly_base, base)
        return base

    def _take(self, rows: list[int], slots: I64) -> F64:
        picked = self.hist[:, np.asarray(rows)[:, None], slots[None, :]]
        return np.asarray(picked, dtype=np.float64)

    def noise(self, day: int) -> F64:
        """Median over recent days of each day's mean residual statistic; NaN without history.

        For counts it is the dispersion (observed variance / binomial variance), otherwise the
        mean absolute relative residual."""
        rows = self._rows(day, range(1, self.cfg.baseline_days + 1))
        if not rows:
            return np.full(self.n, np.nan)
        return _quiet_nanmedian(self.noise_hist[:, rows].astype(np.float64), axis=1)

    def warm(self) -> F64:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.warm_cnt >= self.cfg.warmup_min_bins,
                            self.warm_sum / np.maximum(self.warm_cnt, 1), np.nan)

    def learn(self, slot_of_bin: I64, learned: F64, residual: F64) -> None:
        """Accumulate one block of bins of today (NaN = nothing to learn)."""
        ok = np.isfinite(learned)
        # bins of one day come in time order, so each slot is one contiguous run of columns
        starts = np.flatnonzero(np.diff(slot_of_bin, prepend=-1) != 0)
        slots = slot_of_bin[starts]
        self.sum[:, slots] += np.add.reduceat(np.where(ok, learned, 0.0), starts, axis=1)
        self.cnt[:, slots] += np.add.reduceat(ok.astype(np.float64), starts, axis=1)
        self.warm_sum += np.where(ok, learned, 0).sum(axis=1)
        self.warm_cnt += ok.sum(axis=1)
        res_ok = np.isfinite(residual)
        self.res_sum += np.where(res_ok, residual, 0).sum(axis=1)
        self.res_cnt += res_ok.sum(axis=1)


def _wilson_upper(up: F64, total: F64, z: F64 | float) -> F64:
    with np.errstate(invalid="ignore", divide="ignore"):
        p = up / total
        z2 = z * z
        denom = 1 + z2 / total
        center = (p + z2 / (2 * total)) / denom
        half = z * np.sqrt(np.maximum(p * (1 - p) / total + z2 / (4 * total * total), 0)) / denom
        return np.asarray(center + half, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Incidents: runs of anomalous bins per (country, scope, entity, kind), flaps merged.


@dataclass
class _Run:
    start: datetime
    bins: int = 0
    critical: int = 0
    min_level: float = math.inf
    score: float = 0.0
    signals: set[str] = field(default_factory=set)
    networks: dict[str, float] = field(default_factory=dict)


class _IncidentBuilder:
    """The per-key state machine; fed known bins only, in time order."""

    def __init__(self, key: tuple[str, str, str, str], config: DetectorConfig) -> None:
        self.key = key
        self.cfg = config
        self.run: _Run | None = None
        self.attached = False
        self.current: Incident | None = None
        self.current_critical = 0
        self.done: list[Incident] = []

    def feed(self, when: datetime, status: int, level: float, bin_hours: float,
             signals: Iterable[str], networks: dict[str, float], *, span: int = 1,
             onset: datetime | None = None) -> Incident | None:
        """Returns the incident this bin changed, if any.

        span > 1: this bin's evidence also proves the span-1 bins before it (they count
        towards `min_bins` and the run starts at the first). onset: where the level first fell
        in this run; a new incident starts there, but those bins do not count as proof."""
        if status <= 0:
            run, self.run = self.run, None
            if run is not None and self.attached and self.current is not None:
                self.current.end = when
                self.attached = False
                return self.current
            self.attached = False
            return None
        run = self.run
        back = when - timedelta(hours=bin_hours * (span - 1))
        if run is None:
            run = self.run = _Run(start=back, bins=span - 1)
            self.attached = False
            # the earlier bins of a jointly proven window: scored at this bin's level
            run.score += max(0.0, 1.0 - level) * bin_hours * (span - 1) \
                if math.isfinite(level) else 0.0
        elif not self.attached and back < run.start:
            run.bins += round((run.start - back).total_seconds() / 3600 / bin_hours)
            run.start = back
        if onset is not None and not self.attached and onset < run.start:
            run.start = onset
        run.bins += 1
        run.critical += status >= 2
        run.min_level = min(run.min_level, level) if math.isfinite(level) else run.min_level
        run.score += max(0.0, 1.0 - level) * bin_hours if math.isfinite(level) else 0.0
        run.signals.update(signals)
        for name, value in networks.items():
            run.networks[name] = min(value, run.networks.get(name, math.inf))
        if self.attached:
            assert self.current is not None
            self._absorb(self.current, run, single=True, status=status, level=level,
                         bin_hours=bin_hours)
            return self.current
        if run.bins < self.cfg.min_bins:
            return None
        self.attached = True
        cur = self.current
        if cur is not None and cur.end is not None and run.start < cur.end:
            run.start = cur.end  # a backdated start never reaches into the previous incident
        if (cur is not None and cur.end is not None
                and (run.start - cur.end).total_seconds() <= self.cfg.flap_merge_seconds):
            if run.start > cur.end:
                cur.recoveries.append((cur.end, run.start))
            cur.end = None
        else:
            if cur is not None:
                self.done.append(cur)
            country, scope, entity, kind = self.key
            cur = self.current = Incident(
                id=incident_id(country, scope, entity, kind, run.start), country=country,
                scope=scope, entity=entity, kind=kind, severity="warning", start=run.start,
                end=None, min_level=math.inf, score=0.0)
            self.current_critical = 0
        self._absorb(cur, run, single=False, status=status, level=level, bin_hours=bin_hours)
        return cur

    def _absorb(self, inc: Incident, run: _Run, *, single: bool, status: int, level: float,
                bin_hours: float) -> None:
        if single:
            self.current_critical += status >= 2
            if math.isfinite(level):
                inc.min_level = min(inc.min_level, level)
                inc.score += max(0.0, 1.0 - level) * bin_hours
        else:
            self.current_critical += run.critical
            inc.min_level = min(inc.min_level, run.min_level)
            inc.score += run.score
        if self.current_critical >= self.cfg.min_bins:
            inc.severity = "critical"
        inc.signals = sorted(set(inc.signals) | run.signals)
        merged = {_network_name(n): float(n["min_level"]) for n in inc.networks}
        for name, value in run.networks.items():
            merged[name] = min(value, merged.get(name, math.inf))
        inc.networks = [_network_entry(name, value) for name, value in sorted(merged.items())]

    def all_incidents(self) -> list[Incident]:
        return [*self.done, *([self.current] if self.current is not None else [])]


def _network_name(entry: dict[str, Any]) -> str:
    return str(entry["asn"]) if "asn" in entry else "region:" + str(entry["region"])


def _network_entry(name: str, level: float) -> dict[str, Any]:
    level = round(level, 4) if math.isfinite(level) else 0.0
    if name.startswith("region:"):
        return {"region": name[len("region:"):], "min_level": level}
    return {"asn": int(name) if name.isdigit() else name, "min_level": level}


# ---------------------------------------------------------------------------------------------
# The engine: blocks of bins in, incident builders updated.


@dataclass
class _Segments:
    """Members of each owner laid out for ufunc.reduceat: values[perm] split at starts."""

    perm: I64
    starts: I64
    owners: I64

    @classmethod
    def of(cls, lists: Sequence[Sequence[int]]) -> _Segments:
        owners = [e for e, members in enumerate(lists) if members]
        perm = [i for e in owners for i in lists[e]]
        sizes = np.asarray([len(lists[e]) for e in owners], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if owners else sizes
        return cls(np.asarray(perm, dtype=np.int64), starts.astype(np.int64),
                   np.asarray(owners, dtype=np.int64))

    def reduce(self, ufunc: np.ufunc, values: npt.NDArray[Any], n_owners: int,
               fill: float) -> F64:
        out = np.full((n_owners, values.shape[1]), fill, dtype=np.float64)
        if len(self.owners):
            out[self.owners] = ufunc.reduceat(values[self.perm], self.starts, axis=0)
        return out


@dataclass
class _Groups:
    """Index arrays derived from the registry, rebuilt when it grows."""

    version: int
    reach: _Segments  # per entity: reach measures (its http/dns ones when it has no other)
    service: _Segments
    perf: _Segments
    reach_lists: list[list[int]]
    service_lists: list[list[int]]
    perf_lists: list[list[int]]
    roles: npt.NDArray[np.int64]
    countries: list[str]
    country_entity: npt.NDArray[np.int64]  # per country: its own entity, or -1
    majority_subs: npt.NDArray[np.int64]  # ASN entities (regions where a country has no ASN)
    majority: _Segments  # per country: its positions in majority_subs
    subs: npt.NDArray[np.int64]  # every ASN and region entity
    sub_country: npt.NDArray[np.int64]
    entity_country: npt.NDArray[np.int64]  # -1 for the vantage
    measure_country: npt.NDArray[np.int64]  # -1 for the vantage
    vantage_measures: npt.NDArray[np.int64]


class _Engine:
    def __init__(self, config: DetectorConfig, bin_seconds: int, phase_seconds: int = 0) -> None:
        config.validate()
        if bin_seconds <= 0 or DAY_SECONDS % bin_seconds:
            raise ValueError(f"detector: bin size {bin_seconds}s must divide a day (86400 s)")
        self.cfg = config
        self.bin_seconds = bin_seconds
        # bins start this many seconds after a multiple of bin_seconds (hourly data stamped
        # at :30 keeps its own times instead of being labelled half an hour early)
        self.phase = phase_seconds % bin_seconds
        self.bins_per_day = DAY_SECONDS // bin_seconds
        self.slot_seconds = max(config.slot_seconds, bin_seconds)
        if DAY_SECONDS % self.slot_seconds:
            self.slot_seconds = bin_seconds
        self.slots = DAY_SECONDS // self.slot_seconds
        self.registry = _Registry()
        self.baselines = _Baselines(config, self.slots)
        self.builders: dict[tuple[str, str, str, str], _IncidentBuilder] = {}
        self.pending: set[tuple[str, str, str, str]] = set()  # builders inside a run
        self.groups: _Groups | None = None
        self.last_bin = -(10**12)
        self.last_level = np.zeros(0)
        self.late_points = 0
        self.changed: dict[str, Incident] = {}
        self.low_since: dict[str, int] = {}  # country -> first bin of its current low run
        pool = max(config.pool_bins - 1, 0)
        self.prev_up = np.zeros((0, pool))
        self.prev_total = np.zeros((0, pool))
        self.prev_expected = np.zeros((0, pool))
        # detect_with_baselines(): (bins, measure rows, value, baseline) of one country's measures
        self.trace_country: str | None = None
        self.trace: list[tuple[I64, I64, F64, F64]] = []

    def bin_of(self, secs: I64) -> I64:
        """Absolute bin numbers of Unix times."""
        return (secs - self.phase) // self.bin_seconds

    def bin_times(self, bins: I64) -> list[datetime]:
        """The start of each bin, as UTC datetimes."""
        return [datetime.fromtimestamp(int(b) * self.bin_seconds + self.phase, UTC)
                for b in bins]

    # -- structure -----------------------------------------------------------------------
    def _groups(self) -> _Groups:
        reg = self.registry
        if self.groups is not None and self.groups.version == reg.version:
            return self.groups
        self.baselines.grow(len(reg.measures))
        n_ent = len(reg.entities)
        reach: list[list[int]] = [[] for _ in range(n_ent)]
        service: list[list[int]] = [[] for _ in range(n_ent)]
        perf: list[list[int]] = [[] for _ in range(n_ent)]
        vantage: list[int] = []
        for i, m in enumerate(reg.measures):
            if m.role == ROLE_VANTAGE:
                vantage.append(i)
            elif m.role == ROLE_REACH:
                reach[m.entity_index].append(i)
            elif m.role == ROLE_SERVICE:
                service[m.entity_index].append(i)
            else:
                perf[m.entity_index].append(i)
        for e in range(n_ent):
            if not reach[e]:  # nothing else says whether it is reachable
                reach[e], service[e] = service[e], []
        countries = sorted({c for c, scope, _ in reg.entities if scope != "vantage"})
        c_index = {c: i for i, c in enumerate(countries)}
        country_entity = np.full(len(countries), -1, dtype=np.int64)
        entity_country = np.full(n_ent, -1, dtype=np.int64)
        asns: dict[int, list[int]] = {}
        regions: dict[int, list[int]] = {}
        for e, (country, scope, _entity) in enumerate(reg.entities):
            if scope == "vantage":
                continue
            ci = entity_country[e] = c_index[country]
            if scope == "country":
                country_entity[ci] = e
            elif scope == "asn":
                asns.setdefault(ci, []).append(e)
            else:
                regions.setdefault(ci, []).append(e)
        majority: list[int] = []
        for ci in range(len(countries)):
            majority.extend(asns.get(ci) or regions.get(ci, []))
        positions: list[list[int]] = [[] for _ in countries]
        for j, e in enumerate(majority):
            positions[entity_country[e]].append(j)
        subs = sorted(e for ci in range(len(countries))
                      for e in asns.get(ci, []) + regions.get(ci, []))
        sub_arr = np.asarray(subs, dtype=np.int64)
        self.groups = _Groups(
            version=reg.version, reach=_Segments.of(reach), service=_Segments.of(service),
            perf=_Segments.of(perf), reach_lists=reach, service_lists=service, perf_lists=perf,
            roles=np.asarray([m.role for m in reg.measures], dtype=np.int64),
            countries=countries, country_entity=country_entity,
            majority_subs=np.asarray(majority, dtype=np.int64),
            majority=_Segments.of(positions),
            subs=sub_arr, sub_country=entity_country[sub_arr] if len(subs) else sub_arr,
            entity_country=entity_country,
            measure_country=np.asarray([entity_country[m.entity_index] for m in reg.measures],
                                       dtype=np.int64),
            vantage_measures=np.asarray(vantage, dtype=np.int64),
        )
        extra = len(reg.measures) - len(self.prev_up)
        if extra > 0:
            pad = np.zeros((extra, self.prev_up.shape[1]))
            self.prev_up = np.concatenate([self.prev_up, pad])
            self.prev_total = np.concatenate([self.prev_total, pad])
            self.prev_expected = np.concatenate([self.prev_expected, pad])
        if len(self.last_level) < len(reg.measures):
            self.last_level = np.concatenate(
                [self.last_level, np.full(len(reg.measures) - len(self.last_level), np.nan)])
        return self.groups

    # -- one block of bins of one day ------------------------------------------------------
    def process(self, bins: I64, up: F64, total: F64) -> None:
        """bins: absolute bin numbers (one day, increasing); up/total: (n_measures, len(bins))."""
        g = self._groups()
        cfg = self.cfg
        store = self.baselines
        day = int(bins[0] // self.bins_per_day)
        store.roll_to(day)
        # time of day -> fractional slot position, interpolated between slot centres
        tod = ((bins % self.bins_per_day) * self.bin_seconds + self.phase
               + self.bin_seconds / 2) % DAY_SECONDS
        pos = tod / self.slot_seconds - 0.5
        lo = np.floor(pos).astype(np.int64)
        frac = pos - lo
        i0, i1 = lo % self.slots, (lo + 1) % self.slots
        needed = np.unique(np.concatenate([i0, i1]))
        slot_base = store.slot_baseline(day, needed)
        b0 = slot_base[:, np.searchsorted(needed, i0)]
        b1 = slot_base[:, np.searchsorted(needed, i1)]
        base = np.where(np.isfinite(b0) & np.isfinite(b1), b0 * (1 - frac) + b1 * frac,
                        np.where(np.isfinite(b0), b0, b1))
        from_history = np.isfinite(base)
        base = np.where(from_history, base, store.warm()[:, None])
        noise = store.noise(day)[:, None]

        has_total = np.isfinite(total)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(has_total, np.where(total > 0, up / total, np.nan), up)
        if self.trace_country is not None:
            rows = np.asarray([i for i, m in enumerate(self.registry.measures)
                               if m.country == self.trace_country], dtype=np.int64)
            self.trace.append((bins.copy(), rows, value[rows], base[rows]))
        with np.errstate(invalid="ignore", divide="ignore"):
            level = np.where(base > 0, value / base, np.nan)
        upper, span = self._upper(level, up, total, base, noise)
        roles = g.roles[:, None]
        known = np.isfinite(level)
        status = np.where(known, np.where(upper < cfg.critical, 2,
                                          np.where(upper < cfg.warning, 1, 0)), UNKNOWN)
        # performance measures: a rise is bad; their level is reported as fraction of normal
        with np.errstate(invalid="ignore", divide="ignore"):
            rise = value - base
            rtt_status = np.where(rise < cfg.rtt_min_increase_s, 0,
                                  np.where(level >= cfg.rtt_critical_factor, 2,
                                           np.where(level >= cfg.rtt_warning_factor, 1, 0)))
            loss_status = np.where(rise >= cfg.loss_critical_increase, 2,
                                   np.where(rise >= cfg.loss_warning_increase, 1, 0))
            status = np.where((roles == ROLE_RTT) & known, rtt_status, status)
            level = np.where(roles == ROLE_RTT, 1.0 / level, level)
            loss_known = (roles == ROLE_LOSS) & np.isfinite(rise)
            status = np.where(roles == ROLE_LOSS, np.where(loss_known, loss_status, UNKNOWN),
                              status)
            level = np.where(loss_known, 1.0 - rise, level)
        vant = (roles == ROLE_VANTAGE)[:, 0]
        vantage_down = np.zeros(len(bins), dtype=bool)
        if vant.any():
            vvals = value[vant]
            vantage_down = (vvals < cfg.vantage_down_below).any(axis=0)
            level[vant] = vvals
            status[vant] = np.where(np.isfinite(vvals), 2 * (vvals < cfg.vantage_down_below),
                                    UNKNOWN)
        status = status.astype(np.int8)
        unknown_bins, country_down = self._classify(g, bins, status, level, total, base,
                                                    vantage_down, span)
        # learning: anomalies are replaced by the prediction, and so is every measure of a
        # country that is down (its tiny networks cannot tell alone); unknown bins teach nothing
        in_down_country = np.zeros_like(status, dtype=bool)
        mc = g.measure_country
        if len(g.countries):
            in_down_country[mc >= 0] = country_down[mc[mc >= 0]]
        learned = np.where(((status >= 1) | in_down_country) & from_history, base, value)
        learned[:, unknown_bins] = np.nan
        learned[vant] = np.nan
        drop = ((roles == ROLE_REACH) | (roles == ROLE_SERVICE)) & from_history
        # noise is learned from normal bins only: anomalies must not widen it (a long shutdown
        # would otherwise teach the detector that collapses are ordinary noise)
        with np.errstate(invalid="ignore", divide="ignore"):
            binomial_var = base * (1 - base) / total
            dispersion = np.where(binomial_var > 0, (value - base) ** 2 / binomial_var, np.nan)
        residual = np.where(drop & (status == 0), np.where(
            has_total, np.minimum(dispersion, 100.0), np.minimum(np.abs(level - 1.0), 1.0)),
            np.nan)
        residual[:, unknown_bins] = np.nan
        self._remember_counts(up, total, base)
        store.learn((tod // self.slot_seconds).astype(np.int64) % self.slots, learned, residual)
        last = level[:, -1]
        self.last_level = np.where(np.isfinite(last), last, self.last_level)
        self.last_bin = int(bins[-1])

    def _upper(self, level: F64, up: F64, total: F64, base: F64, noise: F64,
               ) -> tuple[F64, I64]:
        """The highest level the data plausibly allows: anomalies are judged on it.

        Counts: the Wilson upper bound of up/total, widened by the measure's own dispersion
        beyond binomial (quasi-binomial), also over the last `pool_bins` bins pooled, so a tiny
        network that stays silent becomes evidence. Other values: level + noise_z x noise.
        Before a day of residuals exists, `initial_noise` stands in for the noise.

        Also returns each bin's *span*: 1, or L > 1 when the last L bins, all low on their
        own point levels, are anomalous only pooled together. Such a window is evidence for
        all L of its bins at once (a 9-block network silent for two rounds: neither round
        proves anything alone, the two together do), so the incident may start L-1 bins back.
        """
        cfg = self.cfg
        has_total = np.isfinite(total)
        known_noise = np.isfinite(noise)
        sigma = np.where(known_noise, noise * 1.25, cfg.initial_noise)  # mean abs dev -> sigma
        span = np.ones(level.shape, dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            by_noise = level + cfg.noise_z * sigma
            widen = np.sqrt(np.where(known_noise, np.maximum(noise, 1.0), 1.0))
            wilson = _wilson_upper(up, total, cfg.confidence_z * widen) / base
            k = cfg.pool_bins
            if k > 1:
                # rolling sums over the previous k-1 bins (remembered) and this block
                pu = np.concatenate([self.prev_up, np.nan_to_num(up)], axis=1)
                pt = np.concatenate([self.prev_total, np.nan_to_num(total)], axis=1)
                pe = np.concatenate([self.prev_expected, np.nan_to_num(base * total)], axis=1)
                low = (pe > 0) & (pu < cfg.warning * pe)  # each bin's own point level
                n = level.shape[1]
                sums = [np.concatenate([np.zeros((a.shape[0], 1)), np.cumsum(a, axis=1)], axis=1)
                        for a in (pu, pt, pe, low.astype(np.float64))]

                def last(length: int) -> list[F64]:
                    """Sums over the `length` bins ending at each bin of this block."""
                    return [c[:, k:k + n] - c[:, k - length:k - length + n] for c in sums]

                joint = np.full(level.shape, np.inf)
                for length in range(2, k + 1):
                    su, st, se, n_low = last(length)
                    pooled = _wilson_upper(su, st, cfg.pool_z * widen) / (se / st)
                    if length == k:  # the last k bins, low or not (a silence inside them)
                        joint = np.fmin(joint, pooled)
                    bound = np.where(n_low >= length, pooled, np.inf)
                    span = np.where(bound < cfg.warning, length, span)  # longest proof wins
                    joint = np.fmin(joint, bound)
                # pooling only deepens a bin that is itself low, so recoveries end on time
                wilson = np.where(level < cfg.warning, np.fmin(wilson, joint), wilson)
        counted = has_total & np.isfinite(wilson)
        warmup = np.where(known_noise, -np.inf, by_noise)  # counts with no history yet
        upper = np.where(counted, np.fmax(wilson, warmup), by_noise)
        span = np.where(counted & (level < cfg.warning) & (upper < cfg.warning), span, 1)
        return np.asarray(upper, dtype=np.float64), span

    def _remember_counts(self, up: F64, total: F64, base: F64) -> None:
        k = self.cfg.pool_bins - 1
        if k <= 0:
            return
        with np.errstate(invalid="ignore"):
            expected = np.nan_to_num(base * total)
        self.prev_up = np.concatenate([self.prev_up, np.nan_to_num(up)], axis=1)[:, -k:]
        self.prev_total = np.concatenate([self.prev_total, np.nan_to_num(total)], axis=1)[:, -k:]
        self.prev_expected = np.concatenate([self.prev_expected, expected], axis=1)[:, -k:]

    def _classify(self, g: _Groups, bins: I64, status: I8, level: F64, total: F64, base: F64,
                  vantage_down: npt.NDArray[np.bool_], span: I64,
                  ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Entities -> countries -> incident builders.

        Returns the bins that are unknown, and (countries x bins) where a country is down."""
        cfg = self.cfg
        n_ent = len(self.registry.entities)
        n_bins = len(bins)
        # entity reachability: the worst of its signals; its size: expected targets answering
        ent_status = g.reach.reduce(np.maximum, status, n_ent, UNKNOWN).astype(np.int8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ent_level = g.reach.reduce(np.fmin, level, n_ent, np.nan)
        size = np.nan_to_num(base * total)
        ent_weight = g.reach.reduce(np.fmax, size, n_ent, 0.0)
        ent_span = g.reach.reduce(np.maximum, np.where(status >= 1, span, 1), n_ent,
                                  1).astype(np.int64)
        ent_weight = np.where(ent_weight > 0, ent_weight, 1.0)
        # countries: own level, or the size-weighted mean of their networks
        subs = g.majority_subs
        st, lv, w = ent_status[subs], ent_level[subs], ent_weight[subs]
        known = st >= 0
        n_c = len(g.countries)

        def per_country(values: F64) -> F64:
            return g.majority.reduce(np.add, values, n_c, 0.0)

        wk = per_country(np.where(known, w, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(wk > 0, per_country(np.where(st >= 1, w, 0.0)) / wk, np.nan)
            crit = np.where(wk > 0, per_country(np.where(st >= 2, w, 0.0)) / wk, np.nan)
            d_level = np.where(wk > 0, per_country(np.where(known, w * np.nan_to_num(lv), 0.0))
                               / wk, np.nan)
        d_status = np.where(wk > 0, np.where(share >= cfg.majority,
                                             np.where(crit >= cfg.majority, 2, 1), 0), UNKNOWN)
        ce = g.country_entity
        has_own = (ce >= 0)[:, None]
        own_st = np.where(has_own, ent_status[np.maximum(ce, 0)], UNKNOWN)
        own_lv = np.where(has_own, ent_level[np.maximum(ce, 0)], np.nan)
        c_status = np.where(own_st >= 0, own_st, d_status).astype(np.int8)
        c_level = np.where(np.isfinite(own_lv), own_lv, d_level)
        # is the drop broad? judged on the networks' point levels: a tiny network's silence is
        # weak evidence alone, but it still counts as down when its country is clearly down
        with np.errstate(invalid="ignore", divide="ignore"):
            low = np.where(known & (np.nan_to_num(lv, nan=1.0) < cfg.warning), w, 0.0)
            broad = np.where(wk > 0, per_country(low) / wk, np.nan)
            majority = np.where(np.isfinite(share), np.fmax(share, broad) >= cfg.majority, True)
        nationwide = (c_status >= 1) & majority
        # the vantage: its own series, or (without one) most countries failing at once
        unknown = vantage_down.copy()
        times = self.bin_times(bins)
        bin_hours = self.bin_seconds / 3600
        reg = self.registry
        if len(g.vantage_measures) == 0 and len(g.countries) >= cfg.vantage_fallback_min_countries:
            known_c = (c_status >= 0).sum(axis=0)
            down_c = (c_status >= 1).sum(axis=0)
            inferred = (known_c >= cfg.vantage_fallback_min_countries) & (
                down_c >= cfg.vantage_fallback_share * np.maximum(known_c, 1))
            unknown |= inferred
            self._feed((VANTAGE_COUNTRY, "vantage", INFERRED_VANTAGE, KIND_VANTAGE), times,
                       np.where(inferred, 2, 0).astype(np.int8), np.zeros(n_bins), bin_hours)
        for i in g.vantage_measures:
            key = (VANTAGE_COUNTRY, "vantage", reg.measures[i].entity, KIND_VANTAGE)
            self._feed(key, times, status[i], level[i], bin_hours)
        c_status[:, unknown] = UNKNOWN
        nationwide &= ~unknown
        # where the country's level has left its band: its own series says so with evidence,
        # or (derived) the weighted level is low and some of its networks are proven down
        with np.errstate(invalid="ignore"):
            derived_low = np.isfinite(d_level) & (d_level < cfg.warning) & (share > 0)
        c_low = np.where(has_own, own_st >= 1, derived_low) & ~unknown[None, :]
        onset = self._country_onsets(g.countries, bins, c_low)
        n_status = np.where(nationwide, c_status, np.where(c_status >= 0, 0, UNKNOWN))
        active_c = set(np.flatnonzero((n_status >= 1).any(axis=1)).tolist())
        active_c |= {ci for ci, c in enumerate(g.countries) if (c, "country", c, KIND_NATIONWIDE)
                     in self.pending}
        for ci in sorted(active_c):
            c = g.countries[ci]
            own = [int(ce[ci])] if ce[ci] >= 0 else []
            subs_c = [int(e) for e in g.subs[g.sub_country == ci]]
            members = [i for e in (*own, *subs_c) for i in g.reach_lists[e]]
            sub_states = [(e, ent_status[e], ent_level[e]) for e in subs_c]
            self._feed((c, "country", c, KIND_NATIONWIDE), times, n_status[ci].astype(np.int8),
                       c_level[ci], bin_hours, members, status, sub_states,
                       onsets=onset[ci])  # proof needs the majority in each bin: no spans
        # networks and regions down while their country is not
        if len(g.subs):
            sub_nw = nationwide[g.sub_country]
            es = ent_status[g.subs]
            es = np.where(unknown | (es < 0), UNKNOWN, np.where(sub_nw, 0, es)).astype(np.int8)
            self._feed_entities(g, g.subs, es, ent_level[g.subs], KIND_NETWORK, g.reach_lists,
                                times, bin_hours, status, ent_status, ent_level,
                                ent_span[g.subs])
        # service blocks and throttling: while reachability holds
        for seg, lists, kind in ((g.service, g.service_lists, KIND_SERVICE),
                                 (g.perf, g.perf_lists, KIND_THROTTLING)):
            if not len(seg.owners):
                continue
            st_k = seg.reduce(np.maximum, status, n_ent, UNKNOWN)[seg.owners]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                lv_k = seg.reduce(np.fmin, level, n_ent, np.nan)[seg.owners]
            reach_st = ent_status[seg.owners]
            ks = np.where(unknown | (st_k < 0) | (reach_st < 0), UNKNOWN,
                          np.where(reach_st >= 1, 0, st_k)).astype(np.int8)
            self._feed_entities(g, seg.owners, ks, lv_k, kind, lists, times, bin_hours, status)
        return unknown, nationwide

    def _country_onsets(self, countries: list[str], bins: I64,
                        low: npt.NDArray[np.bool_]) -> I64:
        """Per country and bin: the first bin of the run of low bins holding it, else -1.

        A nationwide incident is confirmed when most networks are down, but it began when the
        country's level first left its band: Iran, 16 Nov 2019, sank for an hour, county by
        county, before most counties were dark. Runs are carried across calls (live rounds)."""
        n_bins = len(bins)
        carried = np.asarray([self.low_since.get(c, -1) for c in countries], dtype=np.int64)
        carried = np.where(carried >= 0, carried, bins[0])
        last_break = np.maximum.accumulate(np.where(low, -1, np.arange(n_bins)), axis=1)
        first = np.where(last_break < 0, carried[:, None], bins[np.minimum(last_break + 1,
                                                                           n_bins - 1)])
        onset = np.where(low, first, -1)
        for ci, c in enumerate(countries):
            if onset[ci, -1] >= 0:
                self.low_since[c] = int(onset[ci, -1])
            else:
                self.low_since.pop(c, None)
        return np.asarray(onset, dtype=np.int64)

    def _feed_entities(self, g: _Groups, entities: I64, st: I8, lv: F64, kind: str,
                       lists: list[list[int]], times: list[datetime], bin_hours: float,
                       status: I8, ent_status: I8 | None = None,
                       ent_level: F64 | None = None, spans: I64 | None = None) -> None:
        reg = self.registry
        rows = set(np.flatnonzero((st >= 1).any(axis=1)).tolist())
        if self.pending:
            for r, e in enumerate(entities):
                c, scope, entity = reg.entities[e]
                if (c, scope, entity, kind) in self.pending:
                    rows.add(r)
        for r in sorted(rows):
            e = int(entities[r])
            c, scope, entity = reg.entities[e]
            subs = ([(e, ent_status[e], ent_level[e])]
                    if ent_status is not None and ent_level is not None else [])
            self._feed((c, scope, entity, kind), times, st[r], lv[r], bin_hours, lists[e],
                       status, subs, spans[r] if spans is not None else None)

    def _feed(self, key: tuple[str, str, str, str], times: Sequence[datetime], st: I8, lv: F64,
              bin_hours: float, members: Sequence[int] = (), status: I8 | None = None,
              subs: Sequence[tuple[int, npt.NDArray[Any], F64]] = (), spans: I64 | None = None,
              onsets: I64 | None = None) -> None:
        """Feed the relevant bins (anomalous ones, and the first known bin after them).

        spans: per bin, how many bins its evidence covers (see `_upper`); onsets: per bin, the
        bin where the entity's level first fell under `warning` in the run that holds it."""
        if key not in self.pending and not (st >= 1).any():
            return
        b = self.builders.get(key)
        if b is None:
            b = self.builders[key] = _IncidentBuilder(key, self.cfg)
        reg = self.registry
        for j in np.flatnonzero(st >= 0):
            s = int(st[j])
            if s <= 0 and b.run is None:
                continue
            signals: list[str] = []
            networks: dict[str, float] = {}
            if s >= 1:
                if status is not None:
                    signals = [reg.measures[i].signal for i in members if status[i, j] >= 1]
                for e, est, elv in subs:
                    if est[j] >= 1:
                        _, scope, entity = reg.entities[e]
                        networks[entity if scope == "asn" else "region:" + entity] = float(elv[j])
            onset = (self.bin_times(onsets[j:j + 1])[0]
                     if onsets is not None and s >= 1 and onsets[j] >= 0 else None)
            changed = b.feed(times[int(j)], s, float(lv[j]), bin_hours, signals, networks,
                             span=int(spans[j]) if spans is not None else 1, onset=onset)
            if changed is not None:
                self.changed[changed.id] = changed
        if b.run is None:
            self.pending.discard(key)
        else:
            self.pending.add(key)

    def incidents(self) -> list[Incident]:
        out = [i for b in self.builders.values() for i in b.all_incidents()]
        return sorted(out, key=lambda i: (i.start, i.country, i.scope, i.entity, i.kind))


# ---------------------------------------------------------------------------------------------
# Frames in.


def infer_bin_phase(times: npt.NDArray[np.int64], bin_seconds: int) -> int:
    """Where in its bin the data is stamped: 1800 for hourly data stamped at half past, 0 for a
    daemon's aligned rounds, and 0 unless most points share one offset (several rounds per bin
    keep the aligned bins the live detector uses)."""
    if len(times) == 0:
        return 0
    sample = np.asarray(times)[:: max(1, len(times) // 100_000)]  # a year of points: sample
    offsets, counts = np.unique(sample % bin_seconds, return_counts=True)
    best = int(np.argmax(counts))
    return int(offsets[best]) if counts[best] >= 0.8 * len(sample) else 0


def infer_bin_seconds(times: npt.NDArray[np.int64]) -> int:
    """Median step between distinct times, snapped to a divisor of a day (seconds)."""
    unique = np.unique(times)
    if len(unique) < 2:
        return 300
    step = float(np.median(np.diff(unique)))
    divisors = [d for d in range(60, DAY_SECONDS + 1, 60) if DAY_SECONDS % d == 0]
    return min(divisors, key=lambda d: abs(math.log(d / max(step, 1.0))))


def _time_seconds(column: pd.Series) -> I64:
    values = pd.to_datetime(column, utc=True)  # pandas 3 keeps the parsed resolution: normalise
    return np.asarray(values.dt.as_unit("s").astype("int64"), dtype=np.int64)


def _codes(column: pd.Series) -> tuple[I64, list[str]]:
    if isinstance(column.dtype, pd.CategoricalDtype):
        return (np.asarray(column.cat.codes, dtype=np.int64),
                [str(c) for c in column.cat.categories])
    codes, uniques = pd.factorize(column.astype(str), sort=False)
    return np.asarray(codes, dtype=np.int64), [str(u) for u in uniques]


def _feed_frame(engine: _Engine, frame: pd.DataFrame, secs: I64 | None = None) -> None:
    """secs: the frame's times in Unix seconds, when the caller has them already."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"detect: frame lacks columns {missing}; expected {list(COLUMNS)}")
    if frame.empty:
        return
    if secs is None:
        secs = _time_seconds(frame["time"])
    values = np.asarray(frame["value"], dtype=np.float64)
    parts = [_codes(frame[c]) for c in ("country", "scope", "entity", "signal")]
    key = np.zeros(len(frame), dtype=np.int64)
    for codes, uniques in parts:
        key = key * (len(uniques) + 1) + codes
    key_codes, key_uniques = pd.factorize(key, sort=False)
    # decode each distinct key back into its four strings
    decoded: list[tuple[str, str, str, str]] = []
    radices = [len(u) + 1 for _, u in parts]
    for k in np.asarray(key_uniques, dtype=np.int64):
        rest = int(k)
        fields: list[str] = []
        for (_, uniques), radix in zip(reversed(parts), reversed(radices), strict=True):
            fields.append(uniques[rest % radix])
            rest //= radix
        fields.reverse()
        decoded.append((fields[0], fields[1], fields[2], fields[3]))
    all_signals = {d[3] for d in decoded}
    reg = engine.registry
    mapping = np.asarray([reg.resolve(d, all_signals) for d in decoded], dtype=np.int64)
    engine._groups()
    row_measure = mapping[np.asarray(key_codes), 0]
    row_role = mapping[np.asarray(key_codes), 1]
    bins = engine.bin_of(secs)
    keep = bins > engine.last_bin
    engine.late_points += int((~keep).sum())
    if not keep.all():
        bins, values, row_measure, row_role = bins[keep], values[keep], row_measure[keep], \
            row_role[keep]
    order = np.argsort(bins, kind="stable") if (np.diff(bins) < 0).any() else None
    if order is not None:
        bins, values, row_measure, row_role = (bins[order], values[order], row_measure[order],
                                               row_role[order])
    _feed_sorted(engine, bins, values, row_measure, row_role)


def _feed_sorted(engine: _Engine, bins: I64, values: F64, row_measure: I64,
                 row_role: I64) -> None:
    if len(bins) == 0:
        return
    n = len(engine.registry.measures)
    per_day = engine.bins_per_day
    days = bins // per_day
    first, last = int(days[0]), int(days[-1])
    edges = np.searchsorted(days, np.arange(first, last + 2))
    finite = np.isfinite(values)
    for d in range(first, last + 1):
        lo, hi = edges[d - first], edges[d - first + 1]
        if lo == hi:
            continue
        sel = slice(lo, hi)
        local = bins[sel] - d * per_day
        first_bin = int(local.min())
        width = int(local.max()) - first_bin + 1
        ok = finite[sel]
        flat = row_measure[sel] * width + (local - first_bin)
        size = n * width
        up_mask = ok & (row_role[sel] == 0)
        tot_mask = ok & (row_role[sel] == 1)
        up_sum = np.bincount(flat[up_mask], weights=values[sel][up_mask], minlength=size)
        up_cnt = np.bincount(flat[up_mask], minlength=size)
        tot_sum = np.bincount(flat[tot_mask], weights=values[sel][tot_mask], minlength=size)
        tot_cnt = np.bincount(flat[tot_mask], minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            up = np.where(up_cnt > 0, up_sum / up_cnt, np.nan).reshape(n, width)
            tot = np.where(tot_cnt > 0, tot_sum / tot_cnt, np.nan).reshape(n, width)
        present = np.isfinite(up).any(axis=0)
        if not present.any():
            continue
        absolute = d * per_day + first_bin + np.arange(width)
        engine.baselines.roll_to(d)
        # the vantage's own series never learn a baseline: they must not force the slow path
        learning = np.isfinite(up).any(axis=1) & (engine._groups().roles != ROLE_VANTAGE)
        if engine.baselines.has_history(d)[learning].all():
            engine.process(absolute[present], up[:, present], tot[:, present])
        else:  # warm-up: bin by bin so the flat baseline follows what was seen so far
            for j in np.flatnonzero(present):
                engine.process(absolute[j:j + 1], up[:, j:j + 1], tot[:, j:j + 1])


def _window(frame: pd.DataFrame, now: datetime | None) -> pd.DataFrame:
    if now is None or frame.empty:
        return frame
    times = pd.to_datetime(frame["time"], utc=True)
    return frame[times <= pd.Timestamp(now)]


def _offline_engine(cfg: DetectorConfig, secs: I64) -> _Engine:
    """An engine whose bins fit the data's times: their step (unless configured), their phase."""
    bin_seconds = cfg.bin_seconds or infer_bin_seconds(secs)
    return _Engine(cfg, bin_seconds, infer_bin_phase(secs, bin_seconds))


def detect(frame: pd.DataFrame, *, now: datetime | None = None,
           config: DetectorConfig | None = None) -> list[Incident]:
    """Every incident in a frame of series points (series.COLUMNS), oldest first.

    Pure: `now` only cuts the frame (points after it are ignored); an incident still anomalous
    at the last bin has end None.
    """
    cfg = config or DetectorConfig()
    frame = _window(frame, now)
    if frame.empty:
        return []
    secs = _time_seconds(frame["time"])
    engine = _offline_engine(cfg, secs)
    _feed_frame(engine, frame, secs)
    return engine.incidents()


def detect_with_baselines(frame: pd.DataFrame, country: str, *, now: datetime | None = None,
                          config: DetectorConfig | None = None,
                          ) -> tuple[list[Incident], pd.DataFrame]:
    """detect(), plus what the detector compared against for every measure of `country`.

    The frame has columns time, scope, entity, signal, value, baseline: `value` is up/total for
    counts (a fraction), else the raw value; `baseline` is the detector's expectation for that
    bin (time-of-day median of clean history, or the warm-up mean). For reports and charts.
    """
    cfg = config or DetectorConfig()
    frame = _window(frame, now)
    columns = ["time", "scope", "entity", "signal", "value", "baseline"]
    if frame.empty:
        return [], pd.DataFrame(columns=columns)
    secs = _time_seconds(frame["time"])
    engine = _offline_engine(cfg, secs)
    bin_seconds = engine.bin_seconds
    engine.trace_country = country
    _feed_frame(engine, frame, secs)
    trace = [t for t in engine.trace if len(t[1])]
    if not trace:
        return engine.incidents(), pd.DataFrame(columns=columns)
    bins = np.concatenate([np.tile(b, len(r)) for b, r, _, _ in trace])
    rows = np.concatenate([np.repeat(r, len(b)) for b, r, _, _ in trace])
    names = np.asarray([(m.scope, m.entity, m.signal) for m in engine.registry.measures],
                       dtype=object)[rows]
    traced = pd.DataFrame({
        "time": pd.to_datetime(bins * bin_seconds + engine.phase, unit="s", utc=True),
        "scope": names[:, 0], "entity": names[:, 1], "signal": names[:, 2],
        "value": np.concatenate([v.ravel() for _, _, v, _ in trace]),
        "baseline": np.concatenate([b.ravel() for _, _, _, b in trace])})
    return engine.incidents(), traced


class LiveDetector:
    """The detector for the daemon: prime it from history, then `update` after every round.

    Still pure: points and `now` in, incidents out. `update` returns the incidents that are open
    or changed (including those that closed) by this update.
    """

    def __init__(self, config: DetectorConfig | None = None, *, bin_seconds: int = 300) -> None:
        self.config = config or DetectorConfig()
        self._engine = _Engine(self.config, self.config.bin_seconds or bin_seconds)

    @property
    def bin_seconds(self) -> int:
        return self._engine.bin_seconds

    @property
    def late_points(self) -> int:
        """Points dropped because their bin was already processed."""
        return self._engine.late_points

    def prime(self, history: pd.DataFrame) -> list[Incident]:
        """Learn from history (series.COLUMNS); returns the incidents found in it."""
        _feed_frame(self._engine, history)
        self._engine.changed.clear()
        return self._engine.incidents()

    def update(self, new_points: pd.DataFrame | Sequence[SeriesPoint],
               now: datetime) -> list[Incident]:
        engine = self._engine
        engine.changed.clear()
        if isinstance(new_points, pd.DataFrame):
            frame = _window(new_points, now)
            if not frame.empty:
                _feed_columns(engine, _time_seconds(frame["time"]),
                              frame["country"].astype(str).tolist(),
                              frame["scope"].astype(str).tolist(),
                              frame["entity"].astype(str).tolist(),
                              frame["signal"].astype(str).tolist(),
                              np.asarray(frame["value"], dtype=np.float64))
        else:
            cut = now.timestamp()
            _feed_points(engine, ((p.time, p.country, p.scope, p.entity, p.signal, p.value)
                                  for p in new_points if p.time.timestamp() <= cut))
        out = dict(engine.changed)
        for inc in self.open_incidents():
            out.setdefault(inc.id, inc)
        return sorted(out.values(), key=lambda i: (i.start, i.country, i.entity, i.kind))

    def open_incidents(self) -> list[Incident]:
        return [b.current for b in self._engine.builders.values()
                if b.current is not None and b.current.end is None]

    def incidents(self) -> list[Incident]:
        """Every incident seen since priming (closed and open)."""
        return self._engine.incidents()

    def levels(self) -> list[tuple[str, str, str, str, float]]:
        """(country, scope, entity, signal, level) of the latest bin, for shutdown_monitor_level."""
        engine = self._engine
        out = []
        for m, lv in zip(engine.registry.measures, engine.last_level, strict=False):
            if math.isfinite(lv):
                out.append((m.country, m.scope, m.entity, m.signal, float(lv)))
        return out


def _feed_points(engine: _Engine, rows: Iterable[tuple[Any, str, str, str, str, Any]]) -> None:
    items = list(rows)
    if not items:
        return
    secs = np.asarray([int(r[0].timestamp()) for r in items], dtype=np.int64)
    _feed_columns(engine, secs, [r[1] for r in items], [r[2] for r in items],
                  [r[3] for r in items], [r[4] for r in items],
                  np.asarray([float(r[5]) for r in items]))


def _feed_columns(engine: _Engine, secs: I64, countries: list[str], scopes: list[str],
                  entities: list[str], signals: list[str], values: F64) -> None:
    reg = engine.registry
    slots = reg.slots
    found = [slots.get(key) for key in zip(countries, scopes, entities, signals, strict=True)]
    if any(f is None for f in found):
        all_signals = set(signals) | {k[3] for k in slots}
        found = [f if f is not None else reg.resolve(key, all_signals)
                 for f, key in zip(found, zip(countries, scopes, entities, signals, strict=True),
                                   strict=True)]
    mapping = np.asarray(found, dtype=np.int64).reshape(-1, 2)
    engine._groups()
    bins = engine.bin_of(secs)
    keep = bins > engine.last_bin
    engine.late_points += int((~keep).sum())
    order = np.argsort(bins[keep], kind="stable")
    _feed_sorted(engine, bins[keep][order], values[keep][order], mapping[keep, 0][order],
                 mapping[keep, 1][order])
