"""Synthetic countries with known truth, for the detection benchmark.

Each country has networks (ASNs) of /24 blocks that answer ICMP with a diurnal and weekly
pattern and binomial noise; the country series is the sum of its networks, as the daemon exports
it. Events are injected with their truth: step drops to various depths, slow declines, one-network
outages, flapping, long (30+ day) shutdowns; and data gaps (missing bins, not events).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
import pandas as pd

START = datetime(2022, 1, 3, tzinfo=UTC)  # a Monday
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Truth:
    country: str
    kind: str  # nationwide_shutdown | network_outage
    entity: str  # country code, or the ASN
    start: datetime  # for a slow decline: when the level reaches 50% (a "required" drop)
    end: datetime
    depth: float  # level during the event (fraction of normal)
    shape: str  # step | decline | flap | long | network
    disturbed_from: datetime | None = None  # a slow decline's first bin under normal

    @property
    def first_disturbed(self) -> datetime:
        return self.disturbed_from or self.start


@dataclass
class Scenario:
    frame: pd.DataFrame
    truths: list[Truth]
    bin_seconds: int
    days: int
    countries: list[str]


def _country_codes(n: int) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXY"
    return [f"{letters[i // 25]}{letters[i % 25]}" for i in range(n)]


def generate(countries: int = 24, days: int = 120, bin_seconds: int = 300,
             seed: int = 7) -> Scenario:
    rng = np.random.default_rng(seed)
    bins = days * 86400 // bin_seconds
    index = pd.date_range(START, periods=bins, freq=f"{bin_seconds}s")
    hours = np.asarray(index.hour + index.minute / 60, dtype=np.float64)
    weekend = np.asarray(index.dayofweek >= 5)
    truths: list[Truth] = []
    parts: list[pd.DataFrame] = []
    per_day = 86400 // bin_seconds

    def at(b: int) -> datetime:
        return START + timedelta(seconds=b * bin_seconds)

    for ci, cc in enumerate(_country_codes(countries)):
        small = ci % 3 == 0
        n_net = int(rng.integers(3, 7))
        sizes = (rng.integers(8, 40, n_net) if small else rng.integers(100, 2500, n_net))
        sizes = np.sort(sizes)[::-1]
        asns = [str(1000 + ci * 10 + k) for k in range(n_net)]
        base_p = rng.uniform(0.3, 0.8, n_net)
        amp = rng.uniform(0.03, 0.3)
        peak = rng.uniform(0, 24)
        week = rng.uniform(-0.06, 0.06)
        pattern = 1 - amp * (1 + np.cos(2 * np.pi * (hours - peak) / 24)) / 2
        pattern = pattern * np.where(weekend, 1 + week, 1.0)
        country_factor = np.ones(bins)
        net_factor = np.ones((n_net, bins))

        def place(length: int) -> int:
            return int(rng.integers(8 * per_day, bins - length - per_day))

        # one or two nationwide events per country, shapes in rotation
        shape = ("step", "decline", "flap", "long", "step")[ci % 5]
        if shape == "long" and days < 50:
            shape = "step"
        if shape == "step":
            depth = float(rng.choice([0.02, 0.1, 0.3, 0.5, 0.7]))
            length = int(rng.choice([2, 3, 6, 24, 144]) * 3600 // bin_seconds // 6) or 2
            length = max(2, length)
            s = place(length)
            country_factor[s:s + length] = depth
            truths.append(Truth(cc, "nationwide_shutdown", cc, at(s), at(s + length), depth,
                                "step"))
        elif shape == "decline":
            ramp, hold = 6 * 3600 // bin_seconds, 12 * 3600 // bin_seconds
            s = place(ramp + hold)
            depth = 0.2
            country_factor[s:s + ramp] = np.linspace(1, depth, ramp)
            country_factor[s + ramp:s + ramp + hold] = depth
            cross = s + int(np.argmax(country_factor[s:] <= 0.5))
            truths.append(Truth(cc, "nationwide_shutdown", cc, at(cross), at(s + ramp + hold),
                                depth, "decline", disturbed_from=at(s)))
        elif shape == "flap":
            on, off = 3600 // bin_seconds, 1800 // bin_seconds
            s = place(4 * (on + off))
            for k in range(4):
                country_factor[s + k * (on + off): s + k * (on + off) + on] = 0.05
            truths.append(Truth(cc, "nationwide_shutdown", cc, at(s),
                                at(s + 3 * (on + off) + on), 0.05, "flap"))
        else:
            length = 35 * per_day
            s = int(rng.integers(8 * per_day, bins - length - 2 * per_day))
            country_factor[s:s + length] = 0.05
            truths.append(Truth(cc, "nationwide_shutdown", cc, at(s), at(s + length), 0.05,
                                "long"))
        # a one-network outage in the smallest networks (a minority by size)
        k = n_net - 1
        length = int(rng.choice([2, 6, 12, 48]))
        s = place(length)
        while (country_factor[s - per_day:s + length + per_day] < 1).any():
            s = place(length)
        net_factor[k, s:s + length] = 0.0
        truths.append(Truth(cc, "network_outage", asns[k], at(s), at(s + length), 0.0, "network"))

        up_parts = []
        for k in range(n_net):
            prob = np.clip(base_p[k] * pattern * country_factor * net_factor[k], 0, 1)
            up_parts.append(rng.binomial(int(sizes[k]), prob).astype(np.float64))
        ups = np.stack(up_parts)
        totals = np.repeat(sizes[:, None].astype(np.float64), bins, axis=1)
        # data gaps: a few stretches of missing rounds (never inside an event's first bins)
        present = np.ones(bins, dtype=bool)
        for _ in range(3):
            g = int(rng.integers(0, bins - 24))
            present[g:g + int(rng.integers(1, 24))] = False
        keep = np.flatnonzero(present)
        t = index[keep]
        for entity, scope, up, total in (
            *((asns[k], "asn", ups[k], totals[k]) for k in range(n_net)),
            (cc, "country", ups.sum(axis=0), totals.sum(axis=0)),
        ):
            for signal, values in (("icmp_blocks_up", up), ("icmp_blocks_total", total)):
                parts.append(pd.DataFrame({"time": t, "country": cc, "scope": scope,
                                           "entity": entity, "signal": signal,
                                           "value": values[keep]}))
    frame = pd.concat(parts, ignore_index=True)
    for column in ("country", "scope", "entity", "signal"):
        frame[column] = frame[column].astype("category")
    return Scenario(frame, truths, bin_seconds, days, _country_codes(countries))


def speed_frame(countries: int, networks: int, days: int, bin_seconds: int = 300,
                seed: int = 3) -> pd.DataFrame:
    """One value signal per entity (countries x (1 + networks) series), categorical columns."""
    rng = np.random.default_rng(seed)
    bins = days * 86400 // bin_seconds
    secs = np.arange(bins, dtype=np.int64) * bin_seconds + int(START.timestamp())
    hours = (secs % 86400) / 3600
    codes = _country_codes(countries)
    entities = [(cc, "country", cc) for cc in codes]
    entities += [(cc, "asn", str(1000 + i * 100 + k)) for i, cc in enumerate(codes)
                 for k in range(networks)]
    n = len(entities)
    pattern = 1 - 0.2 * (1 + np.cos(2 * np.pi * (hours - 14) / 24)) / 2
    scale = rng.uniform(50, 2000, n)
    values = np.empty((n, bins), dtype=np.float64)
    for i in range(n):
        values[i] = rng.poisson(scale[i] * pattern)
    # time-major order, as rounds arrive
    time_col = np.repeat(secs, n)
    entity_idx = np.tile(np.arange(n), bins)

    def cat(codes: npt.NDArray[np.int64], names: list[str]) -> pd.Categorical[str]:
        return pd.Categorical.from_codes(codes, categories=pd.Index(names))

    frame = pd.DataFrame({
        "time": pd.to_datetime(time_col, unit="s", utc=True),
        "country": cat(np.asarray([codes.index(e[0]) for e in entities])[entity_idx], codes),
        "scope": cat(np.asarray([0 if e[1] == "country" else 1 for e in entities])[entity_idx],
                     ["country", "asn"]),
        "entity": cat(entity_idx, [e[2] for e in entities]),
        "signal": cat(np.zeros(len(time_col), dtype=np.int64), ["active_probing"]),
        "value": values.T.reshape(-1),
    })
    return frame
