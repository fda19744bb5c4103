"""`shutdown-monitor detect`: run the detector over history from a file, Prometheus or the store."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta

import click

from monitor.commands.timeopt import time_option
from monitor.detect import DetectorConfig, Incident, detect, format_time
from monitor.errors import MonitorError
from monitor.series import ReadResult, read_prometheus, read_series_file

# Baselines need history before the window asked about: servers are read this much earlier.
LOOKBACK = timedelta(days=29)
MAX_PROBLEMS_SHOWN = 10



def _overlaps(inc: Incident, since: datetime | None, until: datetime | None) -> bool:
    if until is not None and inc.start > until:
        return False
    return not (since is not None and inc.end is not None and inc.end < since)


def _table(incidents: list[Incident]) -> str:
    if not incidents:
        return "no incidents"
    head = ("KIND", "SEVERITY", "COUNTRY", "SCOPE", "ENTITY", "START", "END", "MIN_LEVEL",
            "SCORE", "NETWORKS")
    rows = [head]
    for inc in incidents:
        networks = ",".join(str(n.get("asn", n.get("region", ""))) for n in inc.networks[:5])
        if len(inc.networks) > 5:
            networks += f",+{len(inc.networks) - 5}"
        rows.append((inc.kind, inc.severity, inc.country, inc.scope, inc.entity,
                     format_time(inc.start), "ongoing" if inc.end is None else format_time(inc.end),
                     f"{inc.min_level:.0%}", f"{inc.score:.1f}", networks or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _read(input_path: str | None, prometheus: str | None, history: str | None,
          country: str | None, since: datetime | None, until: datetime | None,
          step: int) -> ReadResult:
    chosen = [x for x in (input_path, prometheus, history) if x]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --input FILE, --prometheus URL, --history PATH")
    if input_path:
        return read_series_file(input_path, country)
    end = until or datetime.now(UTC)  # the command, not the detector, may read the clock
    start = (since or end - timedelta(days=7)) - LOOKBACK
    if prometheus:
        # every country: the vantage fallback needs to see them all
        return read_prometheus(prometheus, since=start, until=end, step_seconds=step)
    from monitor.history import HistoryStore

    assert history is not None
    with HistoryStore(history, readonly=True) as store:
        return ReadResult(store.read_frame(since=start, until=end), [])


@click.command("detect")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="Long CSV (time,country,scope,entity,signal,value) or an IODA CSV export.")
@click.option("--prometheus", metavar="URL", help="Read the daemon's series from this Prometheus.")
@click.option("--history", type=click.Path(), help="Read the daemon's embedded history store.")
@click.option("--country", help="Only this country's incidents (needed for an IODA export).")
@click.option("--since", help="Only incidents still going on at or after this time (ISO 8601).")
@click.option("--until", help="Ignore data after this time (ISO 8601).")
@click.option("--step", default=300, show_default=True, help="Prometheus query step, seconds.")
@click.option("--bin-seconds", default=0, help="Bin size; 0 infers it from the data.")
@click.option("--json", "as_json", is_flag=True, help="Print DESIGN's incident JSON only.")
def detect_command(input_path: str | None, prometheus: str | None, history: str | None,
                   country: str | None, since: str | None, until: str | None, step: int,
                   bin_seconds: int, as_json: bool) -> None:
    """Find shutdowns, outages, blocks and throttling in history."""
    since_t, until_t = time_option(since, "--since"), time_option(until, "--until")
    try:
        result = _read(input_path, prometheus, history, country, since_t, until_t, step)
        config = DetectorConfig(bin_seconds=bin_seconds)
        incidents = detect(result.frame, now=until_t, config=config) if len(result.frame) else []
    except (MonitorError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    for problem in result.problems[:MAX_PROBLEMS_SHOWN]:
        click.echo(f"skipped: {problem}", err=True)
    if len(result.problems) > MAX_PROBLEMS_SHOWN:
        click.echo(f"skipped: ... {len(result.problems) - MAX_PROBLEMS_SHOWN} more", err=True)
    cc = country.upper() if country else None
    chosen = [i for i in incidents
              if (cc is None or i.country in (cc, "ZZ")) and _overlaps(i, since_t, until_t)]
    if as_json:
        json.dump({"incidents": [i.to_json() for i in chosen]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        click.echo(_table(chosen))

