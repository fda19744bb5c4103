"""The embedded history store: series points and incidents in one SQLite file, no server needed.

Layout, chosen so "30 days of one country" reads in well under a second:
- `series`: one integer id per (country, scope, entity, signal).
- `hot`: recent points, one row each (series_id, t, value), WITHOUT ROWID keyed by (series_id, t).
  Each round's flush inserts here in one transaction.
- `chunks`: older points, one row per series and UTC day holding two zlib-compressed arrays
  (second offsets within the day, float64 values). Once per hour the flush moves every hot point
  older than the current hour into its day chunk (read, merge, rewrite). Reading a day of a
  series is then one row and two `zlib.decompress` calls instead of 288 Python tuples.
- `incidents` (the incident JSON, upserted by id), `state` (small key/value for the daemon),
  `meta` (a marker and schema version, so a foreign SQLite file is refused, not misread).

Times are whole seconds since the epoch (UTC); sub-second parts are dropped. WAL mode lets
`detect --history` and `report --history` read while the daemon writes; every read runs in one
read transaction so it never sees a compaction half done.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import numpy.typing as npt
import pandas as pd

from monitor.errors import StoreError
from monitor.series import COLUMNS, SeriesPoint

SCHEMA_MARKER: Final = "shutdown-monitor-history"
SCHEMA_VERSION: Final = 1
DEFAULT_RETENTION_DAYS: Final = 35.0
DAY_S: Final = 86_400
COMPACT_EVERY_S: Final = 3_600
# If flushes keep failing (disk full), keep at most this many points waiting in memory.
MAX_BUFFERED_POINTS: Final = 2_000_000

SeriesKey = tuple[str, str, str, str]  # country, scope, entity, signal

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    country TEXT NOT NULL, scope TEXT NOT NULL, entity TEXT NOT NULL, signal TEXT NOT NULL,
    UNIQUE (country, scope, entity, signal)
);
CREATE TABLE IF NOT EXISTS hot (
    series_id INTEGER NOT NULL, t INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (series_id, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    series_id INTEGER NOT NULL, day INTEGER NOT NULL, n INTEGER NOT NULL,
    offsets BLOB NOT NULL, vals BLOB NOT NULL,
    PRIMARY KEY (series_id, day)
);
CREATE INDEX IF NOT EXISTS chunks_by_day ON chunks (day);
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY, country TEXT NOT NULL,
    start_t INTEGER NOT NULL, end_t INTEGER, doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS incidents_by_end ON incidents (end_t);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_OUR_TABLES: Final = frozenset({"meta", "series", "hot", "chunks", "incidents", "state"})


def _epoch(moment: datetime, what: str) -> int:
    if moment.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime (UTC), got naive {moment}")
    return math.floor(moment.timestamp())


def _parse_iso(text: object, what: str) -> int | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"incident {what} must be an ISO 8601 string or null, got {text!r}")
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.floor(moment.timestamp())


_REGULAR = struct.Struct("<cIII")  # b"R", first offset, step, count


def _encode(offsets: npt.NDArray[np.int64], values: npt.NDArray[np.float64]) -> tuple[bytes, bytes]:
    """Offsets one round apart (the usual case) become 13 bytes: first, step, count. Others are
    stored as zlib-compressed differences (a zlib stream never starts with b"R")."""
    vals_blob = zlib.compress(values.astype("<f8").tobytes(), 6)
    steps = np.diff(offsets)
    if offsets.size >= 2 and steps[0] > 0 and (steps == steps[0]).all():
        return _REGULAR.pack(b"R", int(offsets[0]), int(steps[0]), offsets.size), vals_blob
    deltas = np.diff(offsets, prepend=0).astype("<u4")
    return zlib.compress(deltas.tobytes(), 6), vals_blob


def _decode(
    offsets_blob: bytes, vals_blob: bytes
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    values = np.frombuffer(zlib.decompress(vals_blob), dtype="<f8")
    if offsets_blob[:1] == b"R":
        _, first, step, count = _REGULAR.unpack(offsets_blob)
        offsets = np.arange(first, first + step * count, step, dtype=np.int64)
    else:
        offsets = np.cumsum(np.frombuffer(zlib.decompress(offsets_blob), dtype="<u4"),
                            dtype=np.int64)
    if offsets.size != values.size:
        raise ValueError(f"chunk has {offsets.size} times but {values.size} values")
    return offsets, values.astype(np.float64)


class HistoryStore:
    """Series points and incidents kept for `retention_days`, surviving restarts.

    One writer (the daemon) per file; any number of readers in other processes. Points given to
    `append_points` are buffered in memory and written by `flush()` in one transaction, so a crash
    loses at most the points not yet flushed (the round in flight). `read_frame` sees flushed
    points only. Every failure is a `StoreError` naming the file and what went wrong.
    """

    def __init__(
        self, path: str | Path, retention_days: float = DEFAULT_RETENTION_DAYS,
        *, readonly: bool = False,
    ) -> None:
        if not retention_days > 0:
            raise StoreError(f"{path}: retention_days must be > 0, got {retention_days}")
        self.path = Path(path)
        self.retention = timedelta(days=retention_days)
        self.readonly = readonly
        self.dropped_points = 0  # points lost because flushes kept failing
        self._buffer: list[tuple[SeriesKey, int, float]] = []
        self._series_ids: dict[SeriesKey, int] = {}
        self._last_compaction_cutoff = 0
        self._lock = threading.RLock()
        self._writer_lock: TextIO | None = None
        if not readonly:
            if not self.path.parent.is_dir():
                raise StoreError(f"{self.path}: directory {self.path.parent} does not exist")
            self._writer_lock = self._claim_writer()
        try:
            self._conn = self._open()
        except BaseException:
            self._release_writer()
            raise

    # ----- opening -------------------------------------------------------------------------
    def _claim_writer(self) -> TextIO:
        """One writer per store: two daemons interleaving rounds would corrupt the history's
        meaning (not the file), so the second one is refused."""
        lock_path = Path(f"{self.path}.lock")
        try:
            handle = lock_path.open("a")
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the writer lock {lock_path}: "
                             f"{exc.strerror}") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise StoreError(
                f"{self.path}: another process is writing to this history store "
                f"(lock {lock_path} held); open it read-only to read") from exc
        return handle

    def _release_writer(self) -> None:
        if self._writer_lock is not None:
            self._writer_lock.close()  # closing drops the flock
            self._writer_lock = None

    def _open(self) -> sqlite3.Connection:
        if self.readonly and not self.path.exists():
            raise StoreError(f"{self.path}: no history store at this path")
        try:
            if self.readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                       check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the history store: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            self._check_foreign(conn)
            if not self.readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL mode: a committed round survives a process crash; only an OS
                # crash or power loss may lose the last commits.
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA)
                self._write_marker(conn)
            self._check_marker(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(
                f"{self.path}: not a usable history store (corrupt, or not an SQLite file): {exc}"
            ) from exc
        except StoreError:
            conn.close()
            raise
        return conn

    def _check_foreign(self, conn: sqlite3.Connection) -> None:
        # Reading sqlite_master is what fails on a file that is not SQLite at all.
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            foreign = ", ".join(sorted(tables - _OUR_TABLES)) or "none of ours"
            raise StoreError(
                f"{self.path}: an SQLite file that is not a shutdown-monitor history store "
                f"(tables: {foreign}); refusing to touch it"
            )

    def _write_marker(self, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (SCHEMA_MARKER,))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(SCHEMA_VERSION),))

    def _check_marker(self, conn: sqlite3.Connection) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != SCHEMA_MARKER:
            raise StoreError(
                f"{self.path}: meta.format is {meta.get('format')!r}, expected {SCHEMA_MARKER!r}")
        if meta.get("version") != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.path}: schema version {meta.get('version')!r}, this program reads "
                f"version {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, what: str, write: bool) -> Iterator[sqlite3.Connection]:
        if write and self.readonly:
            raise StoreError(f"{self.path}: opened read-only, cannot {what}")
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:  # SQLite may already have rolled back (disk full)
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(f"{self.path}: cannot {what}: {exc}") from exc

    # ----- points --------------------------------------------------------------------------
    def append_points(self, points: Iterable[SeriesPoint]) -> None:
        """Buffer points; nothing is written until `flush()`. A naive `time` is a ValueError."""
        rows = [
            ((p.country, p.scope, p.entity, p.signal), _epoch(p.time, "SeriesPoint.time"),
             float(p.value))
            for p in points
        ]
        with self._lock:
            self._buffer.extend(rows)
            overflow = len(self._buffer) - MAX_BUFFERED_POINTS
            if overflow > 0:
                del self._buffer[:overflow]
                self.dropped_points += overflow

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def flush(self) -> None:
        """Write every buffered point in one transaction (and compact hourly).

        On failure the points stay buffered for the next flush and a StoreError is raised.
        """
        with self._lock:
            if not self._buffer:
                return
            newest = max(t for _, t, _ in self._buffer)
            cutoff = newest - newest % COMPACT_EVERY_S
            compact = cutoff > self._last_compaction_cutoff
            try:
                with self._transaction("write points", write=True) as conn:
                    rows = [(self._series_id(conn, key), t, value)
                            for key, t, value in self._buffer]
                    conn.executemany("INSERT OR REPLACE INTO hot VALUES (?, ?, ?)", rows)
                    if compact:
                        self._compact(conn, cutoff)
            except StoreError:
                self._series_ids.clear()  # ids created in the rolled-back transaction are gone
                raise
            self._buffer = []
            if compact:
                self._last_compaction_cutoff = cutoff

    def _series_id(self, conn: sqlite3.Connection, key: SeriesKey) -> int:
        found = self._series_ids.get(key)
        if found is not None:
            return found
        row = conn.execute(
            "SELECT id FROM series WHERE country = ? AND scope = ? AND entity = ? AND signal = ?",
            key).fetchone()
        if row is None:
            cursor = conn.execute(
                "INSERT INTO series (country, scope, entity, signal) VALUES (?, ?, ?, ?)", key)
            assert cursor.lastrowid is not None
            series_id = int(cursor.lastrowid)
        else:
            series_id = int(row[0])
        self._series_ids[key] = series_id
        return series_id

    def _compact(self, conn: sqlite3.Connection, cutoff: int) -> None:
        """Move hot points older than `cutoff` into their day chunks (newer value wins)."""
        moved = conn.execute(
            "SELECT series_id, t, value FROM hot WHERE t < ? ORDER BY series_id, t",
            (cutoff,)).fetchall()
        if not moved:
            return
        table = np.array(moved, dtype=np.float64)
        ids = table[:, 0].astype(np.int64)
        times = table[:, 1].astype(np.int64)
        values = table[:, 2]
        days = times - times % DAY_S
        # Group boundaries where (series, day) changes; rows are sorted by series then time.
        change = np.flatnonzero((np.diff(ids) != 0) | (np.diff(days) != 0)) + 1
        starts = np.concatenate(([0], change))
        ends = np.concatenate((change, [len(ids)]))
        for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
            series_id, day = int(ids[lo]), int(days[lo])
            new_offsets, new_values = times[lo:hi] - day, values[lo:hi]
            row = conn.execute(
                "SELECT offsets, vals FROM chunks WHERE series_id = ? AND day = ?",
                (series_id, day)).fetchone()
            if row is not None:
                old_offsets, old_values = _decode(row[0], row[1])
                keep = ~np.isin(old_offsets, new_offsets)
                all_offsets = np.concatenate((old_offsets[keep], new_offsets))
                all_values = np.concatenate((old_values[keep], new_values))
                order = np.argsort(all_offsets, kind="stable")
                new_offsets, new_values = all_offsets[order], all_values[order]
            offsets_blob, vals_blob = _encode(new_offsets, new_values)
            conn.execute(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)",
                (series_id, day, len(new_offsets), offsets_blob, vals_blob))
        conn.execute("DELETE FROM hot WHERE t < ?", (cutoff,))

    def read_frame(
        self,
        country: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        signals: Sequence[str] | None = None,
        scope: str | None = None,
    ) -> pd.DataFrame:
        """Flushed points matching every filter given, `since <= time <= until`.

        Columns exactly `monitor.series.COLUMNS`; `time` is datetime64[ns, UTC], `value` float64,
        country/scope/entity/signal are pandas Categoricals of str (compare with == as usual;
        `.astype(str)` for plain strings). Rows are grouped by series (sorted by country,
        scope, entity, signal), time ascending.
        """
        lo = _epoch(since, "since") if since is not None else -(2**62)
        hi = _epoch(until, "until") if until is not None else 2**62
        where, args = ["1"], []
        if country is not None:
            where.append("country = ?")
            args.append(country)
        if scope is not None:
            where.append("scope = ?")
            args.append(scope)
        if signals is not None:
            where.append(f"signal IN ({', '.join('?' * len(signals))})")
            args.extend(signals)
        with self._transaction("read points", write=False) as conn:
            series = conn.execute(
                "SELECT id, country, scope, entity, signal FROM series WHERE "
                + " AND ".join(where) + " ORDER BY country, scope, entity, signal", args).fetchall()
            if series:
                # A temporary table joins faster than a long IN list, and has no size limit.
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (id INTEGER PRIMARY KEY)")
                conn.execute("DELETE FROM temp.wanted")
                conn.executemany("INSERT INTO temp.wanted VALUES (?)", [(s[0],) for s in series])
                chunk_rows = conn.execute(
                    "SELECT c.series_id, c.day, c.offsets, c.vals FROM chunks c "
                    "JOIN temp.wanted w ON c.series_id = w.id "
                    "WHERE c.day >= ? AND c.day <= ?", (lo - lo % DAY_S, hi)).fetchall()
                hot_rows = conn.execute(
                    "SELECT h.series_id, h.t, h.value FROM hot h "
                    "JOIN temp.wanted w ON h.series_id = w.id "
                    "WHERE h.t >= ? AND h.t <= ?", (lo, hi)).fetchall()
            else:
                chunk_rows, hot_rows = [], []
        try:
            return _build_frame(series, chunk_rows, hot_rows, lo, hi)
        except (ValueError, zlib.error) as exc:
            raise StoreError(f"{self.path}: corrupt point chunk: {exc}") from exc

    # ----- incidents and state ---------------------------------------------------------------
    def save_incidents(self, incidents: Iterable[dict[str, Any]]) -> None:
        """Insert or replace each incident (incident JSON dict) by its "id"."""
        rows = []
        for incident in incidents:
            try:
                rows.append((
                    str(incident["id"]), str(incident["country"]),
                    _parse_iso(incident["start"], "start"), _parse_iso(incident.get("end"), "end"),
                    json.dumps(incident, sort_keys=True),
                ))
            except (KeyError, ValueError, TypeError) as exc:
                raise StoreError(
                    f"{self.path}: cannot store incident {incident.get('id')!r}: needs id, "
                    f"country, start (ISO 8601) and end (ISO 8601 or null): {exc!r}") from exc
        with self._transaction("save incidents", write=True) as conn:
            conn.executemany("INSERT OR REPLACE INTO incidents VALUES (?, ?, ?, ?, ?)", rows)

    def load_incidents(self, since: datetime | None = None) -> list[dict[str, Any]]:
        """Incidents still open or ended at or after `since` (all if None), oldest start first."""
        lo = _epoch(since, "since") if since is not None else -(2**62)
        with self._transaction("load incidents", write=False) as conn:
            rows = conn.execute(
                "SELECT id, doc FROM incidents WHERE end_t IS NULL OR end_t >= ? "
                "ORDER BY start_t, id", (lo,)).fetchall()
        loaded = []
        for incident_id, doc in rows:
            try:
                loaded.append(json.loads(doc))
            except json.JSONDecodeError as exc:
                raise StoreError(f"{self.path}: incident {incident_id!r}: corrupt JSON: {exc}") \
                    from exc
        return loaded

    def get_state(self, key: str) -> str | None:
        with self._transaction("read state", write=False) as conn:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        self.set_states({key: value})

    def set_states(self, values: Mapping[str, str]) -> None:
        """Write several keys in one transaction (one commit, not one per key)."""
        with self._transaction("write state", write=True) as conn:
            conn.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", values.items())

    # ----- housekeeping --------------------------------------------------------------------
    def prune(self, now: datetime) -> int:
        """Forget points and ended incidents older than the retention; returns points removed."""
        cutoff = _epoch(now - self.retention, "now")
        boundary_day = cutoff - cutoff % DAY_S
        removed = 0
        with self._transaction("prune old points", write=True) as conn:
            (old,) = conn.execute(
                "SELECT COALESCE(SUM(n), 0) FROM chunks WHERE day < ?", (boundary_day,)).fetchone()
            removed += int(old)
            conn.execute("DELETE FROM chunks WHERE day < ?", (boundary_day,))
            for series_id, offsets_blob, vals_blob in conn.execute(
                    "SELECT series_id, offsets, vals FROM chunks WHERE day = ?",
                    (boundary_day,)).fetchall():
                offsets, values = _decode(offsets_blob, vals_blob)
                keep = offsets + boundary_day >= cutoff
                if keep.all():
                    continue
                removed += int((~keep).sum())
                if not keep.any():
                    conn.execute("DELETE FROM chunks WHERE series_id = ? AND day = ?",
                                 (series_id, boundary_day))
                    continue
                blobs = _encode(offsets[keep], values[keep])
                conn.execute(
                    "UPDATE chunks SET n = ?, offsets = ?, vals = ? "
                    "WHERE series_id = ? AND day = ?",
                    (int(keep.sum()), *blobs, series_id, boundary_day))
            removed += conn.execute("DELETE FROM hot WHERE t < ?", (cutoff,)).rowcount
            conn.execute("DELETE FROM incidents WHERE end_t IS NOT NULL AND end_t < ?", (cutoff,))
            conn.execute(
                "DELETE FROM series WHERE id NOT IN (SELECT series_id FROM chunks) "
                "AND id NOT IN (SELECT series_id FROM hot)")
            self._series_ids.clear()
        return removed

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):  # no WAL file right after a checkpoint
                total += os.path.getsize(f"{self.path}{suffix}")
        return total

    def close(self) -> None:
        """Flush what is buffered, checkpoint the WAL and close."""
        with self._lock:
            try:
                if not self.readonly:
                    self.flush()
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot close cleanly: {exc}") from exc
            finally:
                self._conn.close()
                self._release_writer()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _build_frame(
    series: list[tuple[int, str, str, str, str]],
    chunk_rows: list[tuple[int, int, bytes, bytes]],
    hot_rows: list[tuple[int, int, float]],
    lo: int,
    hi: int,
) -> pd.DataFrame:
    """Decode chunks, add hot points, filter to [lo, hi] and assemble the six columns.

    Works series by series in the order of `series`, so no global sort of millions of rows.
    """
    chunks_of: dict[int, list[tuple[int, bytes, bytes]]] = {}
    for series_id, day, offsets_blob, vals_blob in chunk_rows:
        chunks_of.setdefault(series_id, []).append((day, offsets_blob, vals_blob))
    hot_of: dict[int, list[tuple[int, float]]] = {}
    for series_id, t, value in hot_rows:
        hot_of.setdefault(series_id, []).append((t, value))
    time_parts: list[npt.NDArray[np.int64]] = []
    value_parts: list[npt.NDArray[np.float64]] = []
    counts = np.zeros(len(series), dtype=np.int64)
    for rank, row in enumerate(series):
        times_list: list[npt.NDArray[np.int64]] = []
        values_list: list[npt.NDArray[np.float64]] = []
        for day, offsets_blob, vals_blob in sorted(chunks_of.get(row[0], ()), key=_first):
            offsets, values = _decode(offsets_blob, vals_blob)
            times_list.append(offsets + day)
            values_list.append(values)
        hot = hot_of.get(row[0])
        if hot:
            hot.sort()
            times_list.append(np.array([t for t, _ in hot], dtype=np.int64))
            values_list.append(np.array([v for _, v in hot], dtype=np.float64))
        if not times_list:
            continue
        times = np.concatenate(times_list)
        values = np.concatenate(values_list)
        if hot and len(times_list) > 1 and np.any(np.diff(times) <= 0):
            # A late point (older than the last compaction) still waits in `hot`; it may
            # rewrite a chunk point. Stable sort keeps hot after chunk, and the last one wins.
            order = np.argsort(times, kind="stable")
            times, values = times[order], values[order]
            last = np.append(times[1:] != times[:-1], True)
            times, values = times[last], values[last]
        inside = (times >= lo) & (times <= hi)
        if not inside.all():
            times, values = times[inside], values[inside]
        time_parts.append(times)
        value_parts.append(values)
        counts[rank] = times.size
    if not time_parts:
        return _empty_frame()
    all_times = np.concatenate(time_parts)
    ranks = np.repeat(np.arange(len(series)), counts)
    columns: dict[str, Any] = {
        "time": pd.Series((all_times * 1_000_000_000).view("datetime64[ns]"), copy=False)
        .dt.tz_localize("UTC"),
    }
    for position, name in enumerate(COLUMNS[1:5], start=1):
        columns[name] = _label_column([str(row[position]) for row in series], ranks)
    columns["value"] = np.concatenate(value_parts)
    return pd.DataFrame(columns, columns=list(COLUMNS), copy=False)


def _label_column(
    label_of_rank: list[str], ranks: npt.NDArray[np.int64]
) -> pd.Categorical[str]:
    """A categorical column: millions of rows share a few hundred labels, so integer codes
    build in milliseconds where str objects take a second (and the detector reads codes)."""
    categories = sorted(set(label_of_rank))
    code_of = {label: code for code, label in enumerate(categories)}
    code_of_rank = np.array([code_of[label] for label in label_of_rank], dtype=np.int32)
    return pd.Categorical.from_codes(code_of_rank[ranks], categories=pd.Index(categories))


def _first(item: tuple[int, bytes, bytes]) -> int:
    return item[0]


def _empty_frame() -> pd.DataFrame:
    empty = np.zeros(0, dtype=np.int64)
    columns: dict[str, Any] = {"time": pd.DatetimeIndex([], dtype="datetime64[ns, UTC]")}
    for name in COLUMNS[1:5]:
        columns[name] = _label_column([], empty)
    columns["value"] = np.zeros(0, dtype=np.float64)
    return pd.DataFrame(columns, columns=list(COLUMNS))
