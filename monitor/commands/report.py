"""`shutdown-monitor report`: a publishable incident report (Markdown, HTML, PNG) for a country."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import click
import pandas as pd

from monitor.commands.timeopt import time_option
from monitor.detect import DetectorConfig
from monitor.errors import InputError, MonitorError
from monitor.series import (
    VANTAGE_COUNTRY,
    ReadResult,
    empty_frame,
    read_prometheus,
    read_series_file,
)

# Baselines need history before the report's window: servers are read this much earlier.
LOOKBACK = timedelta(days=29)
DEFAULT_SPAN = timedelta(days=7)
# Prometheus is read in pieces so a progress bar can move; each piece is one set of queries.
PROMETHEUS_PIECES = 30
MIN_PIECE = timedelta(days=1)



def read_prometheus_pieces(url: str, country: str, since: datetime, until: datetime,
                           step_seconds: int,
                           progress: Callable[[int], None] = lambda _n: None) -> ReadResult:
    """read_prometheus over [since, until] in pieces, calling `progress(1)` after each."""
    piece = max(MIN_PIECE, (until - since) / PROMETHEUS_PIECES)
    piece = timedelta(seconds=max(step_seconds, int(piece.total_seconds()) // step_seconds
                                  * step_seconds))
    frames, problems = [], []
    start = since
    while start <= until:
        # the pieces must not share an instant: query_range includes both ends
        end = min(until, start + piece - timedelta(seconds=step_seconds))
        got = read_prometheus(url, since=start, until=end, country=country,
                              step_seconds=step_seconds)
        frames.append(got.frame)
        problems += got.problems
        progress(1)
        start = end + timedelta(seconds=step_seconds)
    frames = [f for f in frames if not f.empty]
    frame = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    return ReadResult(frame, problems)


def pieces_of(since: datetime, until: datetime, step_seconds: int) -> int:
    piece = max(MIN_PIECE, (until - since) / PROMETHEUS_PIECES)
    seconds = max(step_seconds, int(piece.total_seconds()) // step_seconds * step_seconds)
    return int((until - since).total_seconds() // seconds) + 1


def _read(input_path: str | None, prometheus: str | None, history: str | None, country: str,
          since: datetime | None, until: datetime | None, step: int) -> tuple[ReadResult, str]:
    chosen = [x for x in (input_path, prometheus, history) if x]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --input FILE, --prometheus URL, --history PATH")
    if input_path:
        return read_series_file(input_path, country), f"the file {input_path}"
    end = until or datetime.now(UTC)  # the command, not the report, may read the clock
    start = (since or end - DEFAULT_SPAN) - LOOKBACK
    if prometheus:
        total = pieces_of(start, end, step)
        with click.progressbar(length=total, label=f"Reading {prometheus}",
                               file=sys.stderr) as bar:
            result = read_prometheus_pieces(prometheus, country, start, end, step, bar.update)
        return result, f"the Prometheus server at {prometheus} ({step} s steps)"
    from monitor.history import HistoryStore

    assert history is not None
    with HistoryStore(history, readonly=True) as store:
        frames = [store.read_frame(country=cc, since=start, until=end)
                  for cc in (country, VANTAGE_COUNTRY)]
    frames = [f.astype({c: str for c in ("country", "scope", "entity", "signal")})
              for f in frames if not f.empty]
    frame = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    return ReadResult(frame, []), f"the monitor's history store {history}"


@click.command("report")
@click.option("--country", required=True, help="ISO 3166-1 alpha-2 code, e.g. KZ.")
@click.option("--since", help="Start of the report (ISO 8601); default: the data's start "
                              "(files) or 7 days before --until (servers).")
@click.option("--until", help="End of the report (ISO 8601); default: the data's end or now.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="Long CSV (time,country,scope,entity,signal,value) or an IODA CSV export.")
@click.option("--history", type=click.Path(), help="Read the daemon's embedded history store.")
@click.option("--prometheus", metavar="URL", help="Read the daemon's series from this Prometheus.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for report.md, report.html and the PNG charts (created).")
@click.option("--step", default=300, show_default=True, help="Prometheus query step, seconds.")
@click.option("--bin-seconds", default=0, help="Detector bin size; 0 infers it from the data.")
def report_command(country: str, since: str | None, until: str | None, input_path: str | None,
                   history: str | None, prometheus: str | None, out_dir: str, step: int,
                   bin_seconds: int) -> None:
    """Write an incident report for one country: Markdown, self-contained HTML, PNG charts."""
    from monitor.report import build_report, country_info, write_report  # matplotlib: lazily

    since_t, until_t = time_option(since, "--since"), time_option(until, "--until")
    if since_t and until_t and since_t >= until_t:
        raise click.BadParameter("must be before --until", param_hint="--since")
    try:
        cc = country_info(country).code
        result, source = _read(input_path, prometheus, history, cc, since_t, until_t, step)
        if result.frame.empty:
            raise InputError(f"{source}: no series for {cc} in the time asked for")
        report = build_report(result.frame, cc, since=since_t, until=until_t,
                              config=DetectorConfig(bin_seconds=bin_seconds), source=source,
                              problems=result.problems)
        files = write_report(report, out_dir)
    except (MonitorError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    for problem in result.problems[:10]:
        click.echo(f"skipped: {problem}", err=True)
    click.echo(report.headline)
    for path in (files.markdown, files.html, *files.charts):
        click.echo(f"wrote {path}")
