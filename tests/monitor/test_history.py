"""The embedded history store against real SQLite files in a temporary directory."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from monitor.errors import StoreError
from monitor.history import HistoryStore
from monitor.series import COLUMNS, SeriesPoint

T0 = datetime(2022, 1, 5, 0, 0, tzinfo=UTC)
STEP = timedelta(minutes=5)
HOUR = timedelta(hours=1)


def kz_round(
    index: int, asns: tuple[str, ...] = ("9198", "29355", "48503"), step: timedelta = STEP,
) -> list[SeriesPoint]:
    """One round of points: the country and a few networks, two signals each."""
    when = T0 + index * step
    points = [
        SeriesPoint(when, "KZ", "country", "KZ", "icmp_blocks_up", float(1000 + index)),
        SeriesPoint(when, "KZ", "country", "KZ", "icmp_blocks_total", 2000.0),
    ]
    for n, asn in enumerate(asns):
        points.append(SeriesPoint(when, "KZ", "asn", asn, "icmp_blocks_up", float(index * 10 + n)))
        points.append(SeriesPoint(when, "KZ", "asn", asn, "icmp_blocks_total", 100.0 + n))
    return points


def fill(store: HistoryStore, rounds: range) -> list[SeriesPoint]:
    written: list[SeriesPoint] = []
    for index in rounds:
        points = kz_round(index)
        store.append_points(points)
        store.flush()
        written.extend(points)
    return written


def as_frame(points: list[SeriesPoint]) -> pd.DataFrame:
    frame = pd.DataFrame(
        [(p.time, p.country, p.scope, p.entity, p.signal, p.value) for p in points],
        columns=list(COLUMNS))
    frame["time"] = pd.to_datetime(frame["time"], utc=True).astype("datetime64[ns, UTC]")
    return frame


def same_points(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    keys = ["country", "scope", "entity", "signal", "time"]
    actual = actual.astype({"country": str, "scope": str, "entity": str, "signal": str})
    left = actual.sort_values(keys).reset_index(drop=True)
    right = expected.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(left, right, check_dtype=False)


def test_round_trip_spans_compaction_and_keeps_the_model(tmp_path: Path) -> None:
    # 30 hours of rounds: most points end in day chunks, the last hour stays in `hot`.
    with HistoryStore(tmp_path / "h.sqlite") as store:
        written = fill(store, range(360))
        frame = store.read_frame()
    assert list(frame.columns) == list(COLUMNS)
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]"
    assert frame["value"].dtype == "float64"
    for name in ("country", "scope", "entity", "signal"):  # codes: what the detector reads
        assert isinstance(frame[name].dtype, pd.CategoricalDtype)
        assert all(isinstance(c, str) for c in frame[name].cat.categories)
    assert (frame["entity"] == "9198").sum() == 2 * 360
    same_points(frame, as_frame(written))
    # Grouped by series, time ascending inside each series.
    for _, group in frame.groupby(["country", "scope", "entity", "signal"]):
        assert group["time"].is_monotonic_increasing


def test_filters_select_country_scope_signals_and_time(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.sqlite") as store:
        written = fill(store, range(300))
        store.append_points([SeriesPoint(T0, "BY", "country", "BY", "icmp_blocks_up", 7.0)])
        store.flush()
        since, until = T0 + 50 * STEP, T0 + 250 * STEP
        frame = store.read_frame(country="KZ", since=since, until=until, scope="asn",
                                 signals=["icmp_blocks_up"])
    expected = [p for p in written if p.scope == "asn" and p.signal == "icmp_blocks_up"
                and since <= p.time <= until]
    assert len(expected) == 3 * 201
    same_points(frame, as_frame(expected))


def test_unknown_country_gives_an_empty_frame_with_the_columns(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.sqlite") as store:
        fill(store, range(3))
        frame = store.read_frame(country="IR")
    assert frame.empty
    assert list(frame.columns) == list(COLUMNS)


def test_rewriting_a_point_keeps_the_newest_value_even_after_compaction(tmp_path: Path) -> None:
    point = SeriesPoint(T0, "KZ", "country", "KZ", "icmp_blocks_up", 1.0)
    with HistoryStore(tmp_path / "h.sqlite") as store:
        store.append_points([point])
        store.flush()
        fill(store, range(30))  # moves T0 into its day chunk; kz_round(0) rewrites it to 1000
        store.append_points([SeriesPoint(T0, "KZ", "country", "KZ", "icmp_blocks_up", 5.0)])
        store.flush()  # a late point: lands in `hot`, older than the last compaction
        frame = store.read_frame(signals=["icmp_blocks_up"], scope="country", until=T0)
        assert frame["value"].tolist() == [5.0]
        fill(store, range(30, 50))  # next compaction merges the late point into the chunk
        frame = store.read_frame(signals=["icmp_blocks_up"], scope="country")
    assert frame["value"].iloc[0] == 5.0
    assert frame["time"].is_unique
    assert len(frame) == 50


def test_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with HistoryStore(path) as store:
        written = fill(store, range(40))
        store.save_incidents([incident("a", end=None)])
        store.set_state("alerted", '["a"]')
    with HistoryStore(path) as store:
        same_points(store.read_frame(), as_frame(written))
        assert [i["id"] for i in store.load_incidents()] == ["a"]
        assert store.get_state("alerted") == '["a"]'
        assert store.get_state("missing") is None
        more = fill(store, range(40, 60))
        same_points(store.read_frame(), as_frame(written + more))


def test_unflushed_points_are_invisible_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with HistoryStore(path) as writer:
        fill(writer, range(2))
        writer.append_points(kz_round(2))
        assert writer.buffered == len(kz_round(2))
        reader = HistoryStore(path, readonly=True)
        assert reader.read_frame()["time"].max() == T0 + STEP
        writer.flush()
        assert reader.read_frame()["time"].max() == T0 + 2 * STEP
        reader.close()


CRASHING_WRITER = textwrap.dedent("""
    import os, signal, sys
    from datetime import UTC, datetime, timedelta
    from monitor.history import HistoryStore
    from monitor.series import SeriesPoint
    store = HistoryStore(sys.argv[1])
    t0 = datetime(2022, 1, 5, tzinfo=UTC)
    for i in range(3):
        store.append_points([SeriesPoint(t0 + timedelta(minutes=5 * i), "KZ", "country", "KZ",
                                         "icmp_blocks_up", float(i))])
        store.flush()
    store.append_points([SeriesPoint(t0 + timedelta(minutes=15), "KZ", "country", "KZ",
                                     "icmp_blocks_up", 3.0)])
    print("buffered", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the round in flight dies with the process
""")


def test_a_killed_writer_loses_only_the_round_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(path)], capture_output=True, text=True,
        timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.strip() == "buffered"
    with HistoryStore(path) as store:
        frame = store.read_frame()
    assert frame["value"].tolist() == [0.0, 1.0, 2.0]


def test_prune_forgets_points_and_ended_incidents_past_retention(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.sqlite", retention_days=1) as store:
        written = fill(store, range(600))  # a bit over two days
        store.save_incidents([
            incident("old", start=T0, end=T0 + STEP),
            incident("open", start=T0, end=None),
            incident("recent", start=T0 + 590 * STEP, end=T0 + 595 * STEP),
        ])
        now = T0 + 599 * STEP
        removed = store.prune(now)
        cutoff = now - timedelta(days=1)
        kept = [p for p in written if p.time >= cutoff]
        assert removed == len(written) - len(kept)
        same_points(store.read_frame(), as_frame(kept))
        assert {i["id"] for i in store.load_incidents()} == {"open", "recent"}
        assert store.prune(now) == 0


def incident(
    incident_id: str, start: datetime = T0, end: datetime | None = None, level: float = 0.05,
) -> dict[str, object]:
    def iso(moment: datetime) -> str:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    return {
        "id": incident_id, "country": "KZ", "scope": "country", "entity": "KZ",
        "kind": "nationwide_shutdown", "severity": "critical", "start": iso(start),
        "end": None if end is None else iso(end), "min_level": level, "score": 1.0,
        "signals": ["icmp_blocks_up"], "networks": [{"asn": 9198, "min_level": 0.03}],
    }


def test_incidents_upsert_by_id_and_filter_by_since(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.sqlite") as store:
        store.save_incidents([incident("a", end=None, level=0.5), incident("b", end=T0 + STEP)])
        store.save_incidents([incident("a", end=T0 + 10 * STEP, level=0.05)])
        loaded = {i["id"]: i for i in store.load_incidents()}
        assert loaded["a"] == incident("a", end=T0 + 10 * STEP, level=0.05)
        assert [i["id"] for i in store.load_incidents(since=T0 + 5 * STEP)] == ["a"]
        with pytest.raises(StoreError, match="start"):
            store.save_incidents([{"id": "c", "country": "KZ"}])


def test_a_file_that_is_not_sqlite_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(StoreError, match=r"h\.sqlite.*not a usable history store"):
        HistoryStore(path)


def test_a_truncated_store_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with HistoryStore(path) as store:
        fill(store, range(400))
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 4000 + data[4100:])  # smash pages after the header
    with pytest.raises(StoreError, match=r"h\.sqlite"), HistoryStore(path) as store:
        store.read_frame()


def test_a_foreign_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"other\.db.*not a shutdown-monitor history store"):
        HistoryStore(path)
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {"customers"}


def test_unwritable_place_and_missing_readonly_file_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        HistoryStore(tmp_path / "no" / "such" / "h.sqlite")
    with pytest.raises(StoreError, match="no history store"):
        HistoryStore(tmp_path / "absent.sqlite", readonly=True)
    if os.geteuid() != 0:  # root writes anywhere; the permission case only means something else
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(StoreError, match="locked"):
            HistoryStore(locked / "h.sqlite").flush()


def test_failed_flush_keeps_points_for_the_next_flush(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with HistoryStore(path) as store:
        fill(store, range(2))
        blocker = sqlite3.connect(path, timeout=0)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        store._conn.execute("PRAGMA busy_timeout = 50")
        store.append_points(kz_round(2))
        with pytest.raises(StoreError, match=r"h\.sqlite: cannot write points"):
            store.flush()
        assert store.buffered == len(kz_round(2))
        blocker.rollback()
        blocker.close()
        store.flush()
        assert store.buffered == 0
        assert store.read_frame()["time"].max() == T0 + 2 * STEP


def test_readonly_store_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with HistoryStore(path) as store:
        fill(store, range(2))
    reader = HistoryStore(path, readonly=True)
    with pytest.raises(StoreError, match="read-only"):
        reader.set_state("k", "v")
    reader.close()


def test_naive_times_are_refused_at_append(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.sqlite") as store:
        with pytest.raises(ValueError, match="timezone-aware"):
            store.append_points([SeriesPoint(datetime(2022, 1, 5), "KZ", "country", "KZ",
                                             "icmp_blocks_up", 1.0)])
        assert store.buffered == 0


def test_thirty_days_of_one_country_from_a_kz_sized_store(tmp_path: Path) -> None:
    # Correctness only; benchmarks/history_bench.py measures the time on the full universe.
    asns = tuple(str(9000 + i) for i in range(40))
    with HistoryStore(tmp_path / "h.sqlite") as store:
        rounds = 32 * 24  # 32 days of hourly rounds
        for index in range(rounds):
            store.append_points(kz_round(index, asns, HOUR))
            store.append_points([SeriesPoint(T0 + index * HOUR, "UZ", "country", "UZ",
                                             "icmp_blocks_up", 1.0)])
            store.flush()
        until = T0 + (rounds - 1) * HOUR
        since = until - timedelta(days=30)
        frame = store.read_frame(country="KZ", since=since, until=until)
        assert store.size_bytes() > 0
    per_series = sum(1 for i in range(rounds) if T0 + i * HOUR >= since)
    assert per_series == 30 * 24 + 1
    assert len(frame) == per_series * (2 + 2 * len(asns))
    assert set(frame["country"]) == {"KZ"}
    assert frame.groupby(["scope", "entity", "signal"]).size().eq(per_series).all()
    last = frame[(frame.entity == "9039") & (frame.signal == "icmp_blocks_up")]
    assert last["value"].iloc[-1] == float((rounds - 1) * 10 + 39)


def test_a_second_writer_is_refused_but_readers_are_welcome(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with HistoryStore(path) as writer:
        fill(writer, range(2))
        with pytest.raises(StoreError, match="another process is writing"):
            HistoryStore(path)
        reader = HistoryStore(path, readonly=True)
        assert len(reader.read_frame()) == 2 * len(kz_round(0))
        reader.close()
    with HistoryStore(path) as writer:  # the lock went with the first writer
        assert writer.get_state("x") is None


def test_irregular_times_missed_rounds_and_single_points_round_trip(tmp_path: Path) -> None:
    # Chunks of evenly spaced rounds are stored as (first, step, count); anything else as
    # compressed differences. Both must read back exactly.
    minutes = [0, 5, 10, 20, 21, 33, 34, 35, 36, 180, 24 * 60 + 1, 26 * 60]
    written = [SeriesPoint(T0 + timedelta(minutes=m, seconds=7 * (i % 2)), "IR", "country", "IR",
                           "icmp_blocks_up", float(i)) for i, m in enumerate(minutes)]
    with HistoryStore(tmp_path / "h.sqlite") as store:
        for point in written:
            store.append_points([point])
            store.flush()
        frame = store.read_frame(country="IR")
    same_points(frame, as_frame(written))


STEADY_WRITER = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime, timedelta
    from monitor.history import HistoryStore
    from monitor.series import SeriesPoint
    t0 = datetime(2022, 1, 5, tzinfo=UTC)
    with HistoryStore(sys.argv[1]) as store:
        print("open", flush=True)
        for i in range(int(sys.argv[2])):
            when = t0 + timedelta(minutes=5 * i)
            store.append_points([SeriesPoint(when, "KZ", "asn", asn, "icmp_blocks_up", float(i))
                                 for asn in ("9198", "29355", "48503")])
            store.flush()
""")


def test_readers_see_whole_rounds_while_the_writer_compacts(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    writer = subprocess.Popen(
        [sys.executable, "-c", STEADY_WRITER, str(path), "1500"], stdout=subprocess.PIPE,
        text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        reader = HistoryStore(path, readonly=True)
        reads = 0
        while writer.poll() is None or reads == 0:
            frame = reader.read_frame(country="KZ")
            reads += 1
            sizes = frame.groupby("entity", observed=True).size()
            assert sizes.nunique() <= 1, sizes  # every flush wrote all three: no half round
            for _, group in frame.groupby("entity", observed=True):
                steps = group["time"].diff().dropna()
                assert (steps == pd.Timedelta(minutes=5)).all()  # no gap, no duplicate
                assert group["value"].tolist() == [float(i) for i in range(len(group))]
        reader.close()
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait(timeout=30)
    assert writer.returncode == 0
    assert reads >= 3
