"""A reference implementation of IODA's published alerting rule, for side-by-side comparison.

Per series: the prediction is the moving median of the past 7 days of values (not time-of-day
aware); a value under 80% of it is a warning, under 50% critical; an anomalous value is replaced
by the prediction in the history, but only for up to 7 days of consecutive anomalies (after which
the new level is accepted as normal). Every run of anomalous bins is one alert, kept with its
minimum level. Counts with a total are judged on up/total. Kept here, not in the product.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from monitor.detect import infer_bin_phase

WARNING, CRITICAL = 0.8, 0.5
WINDOW_DAYS = 7


@dataclass(frozen=True)
class Alert:
    country: str
    scope: str
    entity: str
    start: datetime
    end: datetime | None
    severity: str
    min_level: float


def series_alerts(secs: npt.NDArray[np.int64], values: npt.NDArray[np.float64],
                  bin_seconds: int) -> list[tuple[int, int | None, str, float]]:
    """Alerts of one series: (start, end or None, severity, min level), times in seconds."""
    window = WINDOW_DAYS * 86400 // bin_seconds
    replace_limit = window
    history: deque[float] = deque()
    ordered: list[float] = []
    alerts: list[tuple[int, int | None, str, float]] = []
    run_start: int | None = None
    run_min, run_sev, anomalous_streak = 1.0, "warning", 0
    for t, v in zip(secs.tolist(), values.tolist(), strict=True):
        if v != v:  # NaN: a gap
            continue
        prediction = ordered[len(ordered) // 2] if len(ordered) >= window // 7 else None
        level = v / prediction if prediction else 1.0
        anomalous = level < WARNING
        if anomalous:
            anomalous_streak += 1
            if run_start is None:
                run_start, run_min, run_sev = t, level, "warning"
            run_min = min(run_min, level)
            if level < CRITICAL:
                run_sev = "critical"
        else:
            anomalous_streak = 0
            if run_start is not None:
                alerts.append((run_start, t, run_sev, run_min))
                run_start = None
        learned = prediction if (anomalous and prediction and
                                 anomalous_streak <= replace_limit) else v
        history.append(learned)
        bisect.insort(ordered, learned)
        if len(history) > window:
            old = history.popleft()
            del ordered[bisect.bisect_left(ordered, old)]
    if run_start is not None:
        alerts.append((run_start, None, run_sev, run_min))
    return alerts


def ioda_alerts(frame: pd.DataFrame, bin_seconds: int) -> list[Alert]:
    """Every alert of every (country, scope, entity) reachability series in a long frame."""
    frame = frame.copy()
    for column in ("country", "scope", "entity", "signal"):
        frame[column] = frame[column].astype(str)
    secs = pd.to_datetime(frame["time"], utc=True).dt.as_unit("s").astype("int64")
    # bins keep the data's own phase (hourly data at :30 stays at :30), as the detector's do
    phase = infer_bin_phase(np.asarray(secs, dtype=np.int64), bin_seconds)
    frame["bin"] = (secs - phase) // bin_seconds * bin_seconds + phase
    wide = frame.pivot_table(index=["country", "scope", "entity", "bin"], columns="signal",
                             values="value", aggfunc="mean", observed=True)
    out: list[Alert] = []
    for (country, scope, entity), part in wide.groupby(level=[0, 1, 2], observed=True):
        if scope == "vantage":
            continue
        if "icmp_blocks_up" in part and "icmp_blocks_total" in part:
            values = (part["icmp_blocks_up"] / part["icmp_blocks_total"]).to_numpy()
        else:
            values = part.iloc[:, 0].to_numpy()
        bins = part.index.get_level_values(3).to_numpy(dtype=np.int64)
        for start, end, severity, min_level in series_alerts(bins, values.astype(float),
                                                             bin_seconds):
            out.append(Alert(str(country), str(scope), str(entity),
                             datetime.fromtimestamp(start, UTC),
                             None if end is None else datetime.fromtimestamp(end, UTC),
                             severity, float(min_level)))
    return out
