"""The series model: one point = time, country, scope, entity, signal, value (see DESIGN).

This is the interchange format between rounds, the history store, Prometheus, files, the
detector and reports. In memory a batch of points is a pandas DataFrame with exactly the six
columns of `COLUMNS`; `time` is a tz-aware UTC timestamp, `value` a float.
"""

from __future__ import annotations

import gzip
import json
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pandas as pd

from monitor.errors import InputError

COLUMNS: Final = ("time", "country", "scope", "entity", "signal", "value")
SCOPES: Final = ("country", "asn", "region", "vantage")

# Signals the daemon produces. External files may carry others (IODA's active_probing, bgp, ...).
SIGNAL_ICMP_UP: Final = "icmp_blocks_up"
SIGNAL_ICMP_TOTAL: Final = "icmp_blocks_total"


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    time: datetime  # tz-aware, UTC
    country: str  # ISO 3166-1 alpha-2, upper case
    scope: str  # one of SCOPES
    entity: str  # "KZ" for scope country, "9198" for an ASN, a region name
    signal: str
    value: float

# The vantage self-check travels as a series too: scope "vantage", country VANTAGE_COUNTRY,
# entity the vantage name, signal SIGNAL_VANTAGE_UP = fraction of control targets that answered.
VANTAGE_COUNTRY: Final = "ZZ"
SIGNAL_VANTAGE_UP: Final = "vantage_up"


# ---------------------------------------------------------------------------------------------
# Frames <-> points, and the files and servers series are read from.

SIGNAL_SUFFIX_TOTAL: Final = "_total"
IODA_TIME_COLUMN: Final = "Time (UTC)"
# IODA's dashboard column titles (units in parentheses are dropped) -> our signal names.
IODA_SIGNALS: Final = {
    "active probing": "active_probing",
    "bgp": "bgp",
    "network telescope": "telescope",
    "telescope": "telescope",
    "ucsd-nt": "telescope",
    "merit-nt": "telescope",
    "google": "google",
}


def empty_frame() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    frame["time"] = pd.Series(dtype="datetime64[s, UTC]")
    frame["value"] = pd.Series(dtype=float)
    return frame


def points_to_frame(points: Iterable[SeriesPoint]) -> pd.DataFrame:
    rows = [(p.time, p.country, p.scope, p.entity, p.signal, p.value) for p in points]
    if not rows:
        return empty_frame()
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    frame["value"] = frame["value"].astype(float)
    return frame


def frame_to_points(frame: pd.DataFrame) -> list[SeriesPoint]:
    times = pd.to_datetime(frame["time"], utc=True)
    return [
        SeriesPoint(t.to_pydatetime(), str(c), str(s), str(e), str(g), float(v))
        for t, c, s, e, g, v in zip(times, frame["country"], frame["scope"], frame["entity"],
                                    frame["signal"], frame["value"], strict=True)
    ]


@dataclass
class ReadResult:
    """A frame read from a file or server, and every problem skipped on the way."""

    frame: pd.DataFrame
    problems: list[str]  # "file:line: what was wrong"; these rows were skipped

    @property
    def skipped(self) -> int:
        return len(self.problems)


def write_long_csv(frame: pd.DataFrame, path: str | Path) -> None:
    """The long CSV of DESIGN: header then time,country,scope,entity,signal,value."""
    out = frame.loc[:, list(COLUMNS)].copy()
    out["time"] = pd.to_datetime(out["time"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    out.to_csv(path, index=False, lineterminator="\n")


def _bad_lines(caught: Iterable[warnings.WarningMessage],
               path: Path) -> tuple[list[str], list[int]]:
    problems, lines = [], []
    for w in caught:
        for text in str(w.message).splitlines():
            match = re.search(r"line (\d+): (.*)", text)
            if match:
                lines.append(int(match.group(1)))
                problems.append(f"{path}:{match.group(1)}: {match.group(2).strip()}")
    return problems, sorted(lines)


def _line_of(index: int, skipped: list[int]) -> int:
    """File line of data row `index`: header is line 1, and skipped bad lines shift rows down."""
    line = index + 2
    for bad in skipped:
        if bad <= line:
            line += 1
    return line


def _read_csv(path: Path) -> tuple[pd.DataFrame, list[str], list[int]]:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            raw = pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="warn",
                              skipinitialspace=True, encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable CSV file ({err})") from None
    return (raw, *_bad_lines(caught, path))


def read_long_csv(path: str | Path) -> ReadResult:
    """Read DESIGN's long CSV. Bad rows are skipped and listed; no usable row is an InputError."""
    path = Path(path)
    raw, problems, skipped = _read_csv(path)
    header = [str(c).strip() for c in raw.columns]
    if header != list(COLUMNS):
        raise InputError(f"{path}:1: header is {','.join(header)!r}; expected "
                         f"{','.join(COLUMNS)!r} (or an IODA export starting with "
                         f"{IODA_TIME_COLUMN!r})")
    raw.columns = list(COLUMNS)
    times = pd.to_datetime(raw["time"], utc=True, errors="coerce", format="ISO8601")
    values = pd.to_numeric(raw["value"].str.strip(), errors="coerce")
    country = raw["country"].str.strip().str.upper()
    scope = raw["scope"].str.strip()
    entity = raw["entity"].str.strip()
    signal = raw["signal"].str.strip()
    checks = [
        (times.isna(), "time: expected ISO 8601 UTC such as 2022-01-05T10:30:00Z"),
        (~country.str.fullmatch(r"[A-Z]{2}"), "country: expected ISO 3166-1 alpha-2 such as KZ"),
        (~scope.isin(SCOPES), f"scope: expected one of {', '.join(SCOPES)}"),
        (entity == "", "entity: expected a non-empty identifier"),
        (signal == "", "signal: expected a non-empty signal name"),
        (values.isna() & (raw["value"].str.strip().str.lower() != "nan"),
         "value: expected a number"),
    ]
    bad = pd.Series(False, index=raw.index)
    for mask, message in checks:
        for index in raw.index[mask & ~bad][:MAX_REPORTED]:
            line = _line_of(int(index), skipped)
            problems.append(f"{path}:{line}: {message}; got {raw.loc[index].tolist()}")
        hidden = int((mask & ~bad).sum()) - MAX_REPORTED
        if hidden > 0:
            problems.append(f"{path}: {hidden} more rows with a bad {message.split(':')[0]}")
        bad |= mask
    frame = pd.DataFrame({"time": times, "country": country, "scope": scope, "entity": entity,
                          "signal": signal, "value": values.astype(float)})[~bad]
    if frame.empty:
        detail = "; ".join(problems[:3]) or "no data rows"
        raise InputError(f"{path}: no usable series rows ({detail})")
    return ReadResult(frame.reset_index(drop=True), problems)


def ioda_signal_name(title: str) -> str:
    """'Active Probing (# /24s up)' -> 'active_probing'; unknown titles are snake_cased."""
    bare = re.sub(r"\(.*?\)", "", title).strip().lower()
    return IODA_SIGNALS.get(bare) or re.sub(r"[^a-z0-9]+", "_", bare).strip("_")


def read_ioda_csv(path: str | Path, country: str) -> ReadResult:
    """IODA's dashboard export: 'Time (UTC)' then one column per signal, one country."""
    path = Path(path)
    cc = country.strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", cc):
        raise InputError(f"--country {country!r}: expected ISO 3166-1 alpha-2 such as KZ")
    raw, problems, skipped = _read_csv(path)
    header = [str(c).strip() for c in raw.columns]
    if not header or header[0] != IODA_TIME_COLUMN or len(header) < 2:
        raise InputError(f"{path}:1: expected an IODA export header {IODA_TIME_COLUMN!r} "
                         f"followed by one column per signal; got {','.join(header)!r}")
    raw.columns = header
    times = pd.to_datetime(raw[IODA_TIME_COLUMN], utc=True, errors="coerce", format="mixed")
    for index in raw.index[times.isna()][:MAX_REPORTED]:
        problems.append(f"{path}:{_line_of(int(index), skipped)}: {IODA_TIME_COLUMN}: "
                        f"expected a time; got "
                        f"{raw.loc[index, IODA_TIME_COLUMN]!r}")
    parts = []
    for column in header[1:]:
        text = raw[column].str.strip()
        values = pd.to_numeric(text, errors="coerce")
        # IODA leaves a cell empty where it has no data: a gap, not an error
        wrong = values.isna() & (text != "") & (text.str.lower() != "nan")
        for index in raw.index[wrong][:MAX_REPORTED]:
            problems.append(f"{path}:{_line_of(int(index), skipped)}: {column}: "
                            f"expected a number; got "
                            f"{raw.loc[index, column]!r}")
        ok = values.notna() & times.notna()
        parts.append(pd.DataFrame({"time": times[ok], "country": cc, "scope": "country",
                                   "entity": cc, "signal": ioda_signal_name(column),
                                   "value": values[ok].astype(float)}))
    frame = pd.concat(parts, ignore_index=True)
    if frame.empty:
        raise InputError(f"{path}: no usable values in the IODA export")
    return ReadResult(frame, problems)


def read_series_file(path: str | Path, country: str | None = None) -> ReadResult:
    """A long CSV or an IODA export, told apart by the header (IODA needs the country)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            first = handle.readline()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read ({err})") from None
    if first.strip().strip('"').startswith(IODA_TIME_COLUMN):
        if not country:
            raise InputError(f"{path}: an IODA export holds one country; say which with --country")
        return read_ioda_csv(path, country)
    return read_long_csv(path)


# ---------------------------------------------------------------------------------------------
# Prometheus: the daemon's own gauges read back as series.

METHOD_SIGNALS: Final = {"icmp": ("icmp_blocks_up", "icmp_blocks_total")}
MAX_REPORTED: Final = 20
PROMETHEUS_MAX_POINTS: Final = 10_000  # Prometheus refuses more than 11,000 points per series


def method_signals(method: str) -> tuple[str, str]:
    """icmp -> (icmp_blocks_up, icmp_blocks_total); tcp -> (tcp_up, tcp_total)."""
    return METHOD_SIGNALS.get(method, (f"{method}_up", f"{method}_total"))


def prometheus_query_range(base_url: str, query: str, start: float, end: float, step: int,
                           timeout: float) -> list[dict[str, Any]]:
    """The `result` list of a Prometheus-compatible /api/v1/query_range; InputError if it fails."""
    params = urllib.parse.urlencode({"query": query, "start": f"{start:.0f}", "end": f"{end:.0f}",
                                     "step": str(step)})
    url = f"{base_url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")[:300]
        raise InputError(f"{base_url}: query {query!r} failed: HTTP {err.code} {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise InputError(f"{base_url}: cannot reach the Prometheus API ({err})") from None
    except json.JSONDecodeError:
        raise InputError(f"{base_url}: query {query!r}: the answer is not JSON") from None
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else body
        raise InputError(f"{base_url}: query {query!r} failed: {error}")
    data = body.get("data") or {}
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list):
        raise InputError(f"{base_url}: query {query!r}: expected data.result to be a list")
    return result


def read_prometheus(base_url: str, *, since: datetime, until: datetime,
                    country: str | None = None, step_seconds: int = 300,
                    timeout: float = 30.0) -> ReadResult:
    """The daemon's gauges from a Prometheus-compatible query_range API, as series points.

    shutdown_monitor_targets{country,asn,method} and ..._targets_up become `<method>_total` and
    `<method>_up` at scope country (summed over asn) and scope asn (asn != ""), and
    shutdown_monitor_vantage_up becomes the vantage series.
    """
    selector = f'country="{country.upper()}"' if country else ""
    asn_selector = ",".join(s for s in (selector, 'asn!=""') if s)
    queries: list[tuple[str, str, bool]] = []  # (query, role, by asn)
    for metric, role in (("shutdown_monitor_targets_up", "up"),
                         ("shutdown_monitor_targets", "total")):
        queries.append((f"sum by (country, method) ({metric}{{{selector}}})", role, False))
        queries.append((f"sum by (country, asn, method) ({metric}{{{asn_selector}}})", role, True))
    rows: list[tuple[datetime, str, str, str, str, float]] = []
    problems: list[str] = []
    start, end = since.timestamp(), until.timestamp()
    chunk = step_seconds * PROMETHEUS_MAX_POINTS
    windows = []
    t = start
    while t <= end:
        windows.append((t, min(end, t + chunk - step_seconds)))
        t += chunk

    def collect(query: str) -> list[tuple[dict[str, str], list[Any]]]:
        out = []
        for a, b in windows:
            for series in prometheus_query_range(base_url, query, a, b, step_seconds, timeout):
                labels = series.get("metric") or {}
                values = series.get("values") or []
                out.append(({str(k): str(v) for k, v in labels.items()}, values))
        return out

    for query, role, by_asn in queries:
        for labels, values in collect(query):
            cc = labels.get("country", "").upper()
            method = labels.get("method", "")
            if not cc or not method:
                problems.append(f"{base_url}: {query}: a series without country/method labels")
                continue
            signal = method_signals(method)[0 if role == "up" else 1]
            scope, entity = ("asn", labels.get("asn", "")) if by_asn else ("country", cc)
            for pair in values:
                try:
                    when = datetime.fromtimestamp(float(pair[0]), UTC)
                    rows.append((when, cc, scope, entity, signal, float(pair[1])))
                except (TypeError, ValueError, IndexError):
                    problems.append(f"{base_url}: {query}: bad sample {pair!r}")
    for labels, values in collect("shutdown_monitor_vantage_up"):
        name = labels.get("vantage") or labels.get("instance") or "local"
        for pair in values:
            try:
                when = datetime.fromtimestamp(float(pair[0]), UTC)
                rows.append((when, VANTAGE_COUNTRY, "vantage", name, SIGNAL_VANTAGE_UP,
                             float(pair[1])))
            except (TypeError, ValueError, IndexError):
                problems.append(f"{base_url}: shutdown_monitor_vantage_up: bad sample {pair!r}")
    if not rows:
        return ReadResult(empty_frame(), problems)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return ReadResult(frame, problems)
