"""Series readers and writers: long CSV, IODA export, and a real Prometheus server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monitor.detect import KIND_NATIONWIDE, detect
from monitor.errors import InputError
from monitor.series import (
    COLUMNS,
    SeriesPoint,
    frame_to_points,
    ioda_signal_name,
    method_signals,
    points_to_frame,
    read_ioda_csv,
    read_long_csv,
    read_prometheus,
    read_series_file,
    write_long_csv,
)
from tests.prom import backfilled_prometheus, free_port

T0 = datetime(2022, 1, 3, tzinfo=UTC)


def test_long_csv_round_trip(tmp_path: Path) -> None:
    points = [SeriesPoint(T0 + timedelta(minutes=5 * k), "KZ", "asn", "9198", "icmp_blocks_up",
                          float(k)) for k in range(3)]
    frame = points_to_frame(points)
    write_long_csv(frame, tmp_path / "s.csv")
    text = (tmp_path / "s.csv").read_text()
    assert text.splitlines()[:2] == ["time,country,scope,entity,signal,value",
                                     "2022-01-03T00:00:00Z,KZ,asn,9198,icmp_blocks_up,0.0"]
    back = read_long_csv(tmp_path / "s.csv")
    assert back.problems == []
    assert frame_to_points(back.frame) == points


def test_bad_rows_are_skipped_and_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "time,country,scope,entity,signal,value\n"
        "2022-01-03T00:00:00Z,KZ,country,KZ,icmp_blocks_up,10\n"
        "yesterday,KZ,country,KZ,icmp_blocks_up,10\n"  # line 3
        "2022-01-03T00:05:00Z,KZ,country,KZ,icmp_blocks_up,10,extra\n"  # line 4
        "2022-01-03T00:10:00Z,Kazakhstan,country,KZ,icmp_blocks_up,10\n"  # line 5
        "2022-01-03T00:15:00Z,KZ,planet,KZ,icmp_blocks_up,10\n"  # line 6
        "2022-01-03T00:20:00Z,KZ,country,KZ,icmp_blocks_up,lots\n"  # line 7
        "2022-01-03T00:25:00Z,KZ,country,KZ,icmp_blocks_up,12\n"
    )
    result = read_long_csv(path)
    assert len(result.frame) == 2 and list(result.frame.columns) == list(COLUMNS)
    assert result.skipped == 5
    joined = "\n".join(result.problems)
    for line, what in ((3, "time"), (4, "fields"), (5, "country"), (6, "scope"), (7, "value")):
        assert f"{path}:{line}: " in joined and what in joined, (line, joined)
    assert f"{path}:7: value: expected a number" in joined


def test_unusable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_series_file(tmp_path / "missing.csv")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("when,what\n1,2\n")
    with pytest.raises(InputError, match=r"wrong.csv:1: header .* expected 'time,country"):
        read_series_file(wrong)
    empty = tmp_path / "empty.csv"
    empty.write_text("time,country,scope,entity,signal,value\nnope,KZ,country,KZ,x,1\n")
    with pytest.raises(InputError, match="no usable series rows"):
        read_series_file(empty)


def test_ioda_export(tmp_path: Path) -> None:
    path = tmp_path / "ioda.csv"
    path.write_text(
        "Time (UTC),Active Probing (# /24s Up),BGP (# Visible /24s),Network Telescope\n"
        "2022-01-05 10:00:00,1500,3000,20000\n"
        "2022-01-05 10:10:00,90,2990,\n"
        "2022-01-05 10:20:00,n/a,2995,1000\n"
    )
    with pytest.raises(InputError, match="--country"):
        read_series_file(path)
    result = read_series_file(path, "kz")
    frame = result.frame
    assert set(frame["signal"]) == {"active_probing", "bgp", "telescope"}
    assert set(frame["country"]) == {"KZ"} and set(frame["scope"]) == {"country"}
    assert len(frame) == 7  # the empty telescope cell is a gap, "n/a" a problem
    assert result.problems == [f"{path}:4: Active Probing (# /24s Up): expected a number; got "
                               "'n/a'"]
    assert read_ioda_csv(path, "KZ").frame.equals(frame)
    assert ioda_signal_name("Some New Signal (units)") == "some_new_signal"


# ---------------------------------------------------------------------------------------------
# A real Prometheus holding backfilled data (promtool tsdb create-blocks-from openmetrics).


NETWORKS = {"9198": 300, "29355": 100, "": 20}  # "" = country-level named endpoints
DAYS = 3
STEP = 300
SHUTDOWN = T0 + timedelta(days=2, hours=10, minutes=30)


def _openmetrics() -> str:
    lines = ["# TYPE shutdown_monitor_targets gauge", "# TYPE shutdown_monitor_targets_up gauge",
             "# TYPE shutdown_monitor_vantage_up gauge"]
    rng = np.random.default_rng(5)
    targets, ups, vantage = [], [], []
    for k in range(DAYS * 86400 // STEP):
        when = T0 + timedelta(seconds=k * STEP)
        ts = int(when.timestamp())
        p = 0.02 if when >= SHUTDOWN else 0.7
        for asn, total in NETWORKS.items():
            for method, scale in (("icmp", 1), ("tcp", 2)):
                labels = f'country="KZ",asn="{asn}",method="{method}"'
                targets.append(f"shutdown_monitor_targets{{{labels}}} {total * scale} {ts}")
                up = rng.binomial(total * scale, p)
                ups.append(f"shutdown_monitor_targets_up{{{labels}}} {up} {ts}")
        vantage.append(f"shutdown_monitor_vantage_up 1 {ts}")
    # OpenMetrics wants each metric family's samples together
    return "\n".join([lines[0], *targets, lines[1], *ups, lines[2], *vantage, "# EOF", ""])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with backfilled_prometheus(tmp_path_factory.mktemp("prom"), _openmetrics()) as url:
        yield url


def test_prometheus_series_read_back(prometheus: str) -> None:
    until = T0 + timedelta(days=DAYS) - timedelta(seconds=STEP)
    result = read_prometheus(prometheus, since=T0, until=until, country="KZ", step_seconds=STEP)
    frame = result.frame
    assert result.problems == []
    got = {(s, e, g) for s, e, g in frame[["scope", "entity", "signal"]].itertuples(index=False)}
    expected = {("country", "KZ", g) for m in ("icmp", "tcp") for g in method_signals(m)}
    expected |= {("asn", a, g) for a in ("9198", "29355") for m in ("icmp", "tcp")
                 for g in method_signals(m)}
    expected.add(("vantage", "local", "vantage_up"))
    assert got == expected
    totals = frame[(frame["scope"] == "country") & (frame["signal"] == "icmp_blocks_total")]
    assert set(totals["value"]) == {sum(NETWORKS.values())}
    assert len(totals) == DAYS * 86400 // STEP
    # and the detector finds the shutdown in what came back
    found = [i for i in detect(frame) if i.kind == KIND_NATIONWIDE]
    assert len(found) == 1 and abs(found[0].start - SHUTDOWN) <= timedelta(seconds=2 * STEP)
    assert {n["asn"] for n in found[0].networks} == {9198, 29355}


def test_prometheus_errors_are_input_errors(prometheus: str) -> None:
    with pytest.raises(InputError, match="cannot reach"):
        read_prometheus(f"http://127.0.0.1:{free_port()}", since=T0, until=T0 + timedelta(hours=1))
    empty = read_prometheus(prometheus, since=T0 - timedelta(days=30),
                            until=T0 - timedelta(days=29), country="KZ")
    assert empty.frame.empty and list(empty.frame.columns) == list(COLUMNS)
    with pytest.raises(InputError, match="HTTP 400"):
        read_prometheus(prometheus, since=T0, until=T0 + timedelta(hours=1), country='K"Z')


def test_points_frame_helpers_handle_empty() -> None:
    frame = points_to_frame([])
    assert list(frame.columns) == list(COLUMNS) and frame.empty
    assert isinstance(frame["time"].dtype, pd.DatetimeTZDtype)
