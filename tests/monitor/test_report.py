"""`shutdown-monitor report` end to end: the Iran November 2019 data, a Kazakhstan-like shutdown
with a restoration read from a file, the history store and a real Prometheus, and clear errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from monitor.cli import cli
from monitor.history import HistoryStore
from monitor.report import country_info, format_hours, format_percent, utc_offset
from monitor.series import frame_to_points, write_long_csv
from tests.prom import backfilled_prometheus as prometheus_with
from tests.prom import free_port, needs_prometheus

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
IRAN = FIXTURES / "iran_2019-11_by_county.csv.gz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A Kazakhstan-like week: two networks, a shutdown at 10:30 UTC on 5 January 2022 with a 3-hour
# restoration inside it, back at 12:00 UTC on 6 January.
T0 = datetime(2021, 12, 27, tzinfo=UTC)
STEP = 300
DAYS = 12
SHUTDOWN = datetime(2022, 1, 5, 10, 30, tzinfo=UTC)
RESTORED = (datetime(2022, 1, 5, 22, 0, tzinfo=UTC), datetime(2022, 1, 6, 1, 0, tzinfo=UTC))
BACK = datetime(2022, 1, 6, 12, 0, tzinfo=UTC)
NETWORKS = {"9198": 300, "29355": 100}


def kz_rows() -> list[tuple[datetime, str, str, str, str, float]]:
    rng = np.random.default_rng(2022)
    rows: list[tuple[datetime, str, str, str, str, float]] = []
    for k in range(DAYS * 86400 // STEP):
        when = T0 + timedelta(seconds=k * STEP)
        down = SHUTDOWN <= when < BACK and not RESTORED[0] <= when < RESTORED[1]
        diurnal = 0.05 * np.sin(2 * np.pi * (when.hour + when.minute / 60) / 24)
        p = 0.03 if down else 0.7 + diurnal
        up_all = 0
        for asn, total in NETWORKS.items():
            up = int(rng.binomial(total, p))
            up_all += up
            rows += [(when, "KZ", "asn", asn, "icmp_blocks_up", up),
                     (when, "KZ", "asn", asn, "icmp_blocks_total", total)]
        rows += [(when, "KZ", "country", "KZ", "icmp_blocks_up", up_all),
                 (when, "KZ", "country", "KZ", "icmp_blocks_total", sum(NETWORKS.values())),
                 (when, "ZZ", "vantage", "ams-1", "vantage_up", 1.0)]
    return rows


def kz_frame() -> pd.DataFrame:
    frame = pd.DataFrame(kz_rows(), columns=["time", "country", "scope", "entity", "signal",
                                             "value"])
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    frame["value"] = frame["value"].astype(float)
    return frame


def report(*args: str) -> Result:
    return CliRunner().invoke(cli, ["report", *args], catch_exceptions=False)


def check_documents(out: Path) -> tuple[str, str]:
    """Both documents exist, every chart is a real PNG, the HTML needs no other file."""
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert linked and all((out / name).is_file() for name in linked)
    for name in linked:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    assert page.count('src="data:image/png;base64,') == len(linked)
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page
    return markdown, page


def test_iran_november_2019_makes_a_publishable_report(tmp_path: Path) -> None:
    out = tmp_path / "iran"
    done = report("--country", "IR", "--input", str(IRAN), "--out", str(out))
    assert done.exit_code == 0, done.output
    headline = done.output.splitlines()[0]
    # the level sank county by county for an hour before it collapsed: both moments are named
    assert headline.startswith("Connectivity in Iran began falling at 17:30 UTC on 16 November "
                               "2019, fell to ")
    assert "of ordinary levels at 18:30 UTC on 16 November 2019 and stayed there for at least" \
        in headline
    assert headline.endswith("a nationwide shutdown (critical).")
    low = int(re.search(r"fell to (\d+)%", headline).group(1))  # type: ignore[union-attr]
    assert 1 <= low <= 10  # the data: a few percent of ordinary connectivity
    markdown, page = check_documents(out)
    assert {p.name for p in out.glob("*.png")} == {"level.png", "signal-connectivity.png",
                                                  "by-region.png"}
    assert f"> **{headline}**" in markdown and headline in page
    assert "(21:00 local time on 16 November, UTC+03:30)" in markdown
    assert "Times are UTC; local time in Iran is Asia/Tehran, UTC+03:30." in markdown
    assert "Asia/Tehran" in markdown
    # every one of the 73 counties is in the table, most affected first
    table = [line for line in markdown.splitlines() if line.startswith("| ")][2:]
    assert len(table) == 73
    assert "72 of 73 regions were down with it." in markdown
    assert "## Methodology" in markdown and "no vantage self-check" in markdown
    assert "connectivity" in markdown


def test_a_shutdown_with_a_restoration_read_from_a_long_csv(tmp_path: Path) -> None:
    source = tmp_path / "kz.csv"
    write_long_csv(kz_frame(), source)
    out = tmp_path / "kz"
    done = report("--country", "kz", "--input", str(source), "--out", str(out),
                  "--since", "2022-01-03T00:00:00Z", "--until", "2022-01-07T00:00:00Z")
    assert done.exit_code == 0, done.output
    headline = done.output.splitlines()[0]
    assert re.fullmatch(r"Connectivity in Kazakhstan fell to [0-6]% of ordinary levels at 10:30 "
                        r"UTC on 5 January 2022 and stayed there for 2[56] hours: a nationwide "
                        r"shutdown \(critical\)\.", headline), headline
    markdown, _ = check_documents(out)
    assert "# Internet connectivity in Kazakhstan, 3 January 2022 to 6 January 2022" in markdown
    restorations = markdown.split("## Restorations inside the incident")[1].split("##")[0]
    rows = [line for line in restorations.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 1, restorations
    assert rows[0].startswith("| 22:00 UTC on 5 January 2022 | 01:00 UTC on 6 January 2022 | "
                              "3 hours |")
    networks = markdown.split("## Networks, most affected first")[1].split("##")[0]
    assert "| AS9198 |" in networks and "| AS29355 |" in networks
    assert "2 of 2 networks were down with it." in markdown
    assert "Measured from the vantage point(s) ams-1" in markdown
    assert "ICMP echo requests" in markdown
    assert "local time in Kazakhstan is Asia/Almaty, UTC+06:00" in markdown
    assert (out / "by-network.png").is_file() and (out / "signal-icmp-blocks-up.png").is_file()


def test_a_quiet_window_says_nothing_was_detected(tmp_path: Path) -> None:
    source = tmp_path / "kz.csv"
    write_long_csv(kz_frame(), source)
    done = report("--country", "KZ", "--input", str(source), "--out", str(tmp_path / "quiet"),
                  "--since", "2022-01-01T00:00:00Z", "--until", "2022-01-05T00:00:00Z")
    assert done.exit_code == 0, done.output
    assert done.output.startswith(
        "No shutdown or outage was detected in Kazakhstan between 00:00 UTC on 1 January 2022 "
        "and 00:00 UTC on 5 January 2022: its level stayed at or above ")
    check_documents(tmp_path / "quiet")


def test_an_ioda_export_where_bgp_stayed_up(tmp_path: Path) -> None:
    """IODA's dashboard CSV: active probing collapses while BGP stays (Kazakhstan 2022)."""
    times = pd.date_range("2022-01-01", "2022-01-12", freq="10min", tz="UTC")
    rng = np.random.default_rng(4)
    probing = rng.normal(1500, 20, len(times)).round()
    down = (times >= pd.Timestamp(SHUTDOWN)) & (times < pd.Timestamp("2022-01-11T02:10Z"))
    probing[down] = 80
    source = tmp_path / "ioda.csv"
    pd.DataFrame({"Time (UTC)": times.strftime("%Y-%m-%d %H:%M:%S"),
                  "Active Probing (# /24s Up)": probing,
                  "BGP (# Visible /24s)": 2000.0}).to_csv(source, index=False)
    done = report("--country", "KZ", "--input", str(source), "--out", str(tmp_path / "i"))
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0] == (
        "Connectivity in Kazakhstan fell to 5% of ordinary levels at 10:30 UTC on 5 January "
        "2022 and stayed there for 136 hours (5.7 days): a nationwide shutdown (critical).")
    markdown, _ = check_documents(tmp_path / "i")
    assert "Series read as given: active_probing, bgp." in markdown
    assert (tmp_path / "i" / "signal-bgp.png").is_file()


def test_report_from_the_history_store(tmp_path: Path) -> None:
    store_path = tmp_path / "history.sqlite"
    frame = kz_frame()
    with HistoryStore(store_path, retention_days=100_000) as store:
        store.append_points(frame_to_points(frame))
        store.flush()
    done = report("--country", "KZ", "--history", str(store_path), "--out", str(tmp_path / "h"),
                  "--since", "2022-01-04T00:00:00Z", "--until", "2022-01-07T00:00:00Z")
    assert done.exit_code == 0, done.output
    assert "10:30 UTC on 5 January 2022" in done.output.splitlines()[0]
    markdown, _ = check_documents(tmp_path / "h")
    assert "the monitor's history store" in markdown


def _openmetrics(frame: pd.DataFrame) -> str:
    """The daemon's gauges for the same week, as Prometheus would have scraped them."""
    targets, ups, vantage = [], [], []
    asn = frame[frame["scope"] == "asn"]
    for when, entity, signal, value in asn[["time", "entity", "signal", "value"]].itertuples(
            index=False):
        ts = int(when.timestamp())
        line = f'{{country="KZ",asn="{entity}",method="icmp"}} {value:g} {ts}'
        if signal == "icmp_blocks_up":
            ups.append("shutdown_monitor_targets_up" + line)
        else:
            targets.append("shutdown_monitor_targets" + line)
    for when in frame.loc[frame["scope"] == "vantage", "time"]:
        vantage.append(f'shutdown_monitor_vantage_up{{vantage="ams-1"}} 1 {int(when.timestamp())}')
    return "\n".join(["# TYPE shutdown_monitor_targets gauge", *targets,
                      "# TYPE shutdown_monitor_targets_up gauge", *ups,
                      "# TYPE shutdown_monitor_vantage_up gauge", *vantage, "# EOF", ""])


@pytest.fixture(scope="module")
def backfilled_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prometheus_with(tmp_path_factory.mktemp("prom"), _openmetrics(kz_frame())) as url:
        yield url


@needs_prometheus
def test_report_from_a_real_prometheus_with_a_progress_bar(backfilled_prometheus: str,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "p"
    done = CliRunner().invoke(cli, [
        "report", "--country", "KZ", "--prometheus", backfilled_prometheus, "--out", str(out),
        "--since", "2022-01-04T00:00:00Z", "--until", "2022-01-06T23:55:00Z"],
        catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert f"Reading {backfilled_prometheus}" in done.output  # the progress bar's label
    headline = [line for line in done.output.splitlines() if line.startswith("Connectivity")]
    assert headline and "10:30 UTC on 5 January 2022" in headline[0], done.output
    markdown, _ = check_documents(out)
    assert "| AS9198 |" in markdown and "Prometheus server at" in markdown


@pytest.mark.parametrize(("args", "message"), [
    (["--country", "Iran"], "--country 'Iran': expected ISO 3166-1 alpha-2 such as KZ"),
    (["--country", "KZ"], "no series for country KZ in the file"),
    (["--country", "IR", "--since", "2020-01-01T00:00:00Z"], "IR: no data between"),
    (["--country", "IR", "--since", "yesterday"], "expected ISO 8601"),
])
def test_bad_requests_are_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    done = CliRunner().invoke(cli, ["report", *args, "--input", str(IRAN), "--out",
                                    str(tmp_path / "x")])
    assert done.exit_code != 0
    assert message in done.output


def test_exactly_one_source_and_unreadable_inputs(tmp_path: Path) -> None:
    both = report("--country", "IR", "--input", str(IRAN), "--history", str(tmp_path / "h"),
                  "--out", str(tmp_path / "x"))
    assert both.exit_code == 2 and "exactly one of --input" in both.output
    bad = tmp_path / "bad.csv"
    bad.write_text("when,where\n1,2\n")
    done = report("--country", "IR", "--input", str(bad), "--out", str(tmp_path / "x"))
    assert done.exit_code == 1 and f"{bad}:1: header is" in done.output
    dead = report("--country", "KZ", "--prometheus", f"http://127.0.0.1:{free_port()}",
                  "--out", str(tmp_path / "x"), "--until", "2022-01-07T00:00:00Z")
    assert dead.exit_code == 1 and "cannot reach the Prometheus API" in dead.output


def test_words_and_numbers() -> None:
    assert country_info("ir").name == "Iran" and country_info("KZ").timezone == "Asia/Almaty"
    assert country_info("XK").name == "XK"  # not in the table: the code stands in
    assert utc_offset(country_info("IR"), datetime(2019, 11, 16, tzinfo=UTC)) == "UTC+03:30"
    assert utc_offset(country_info("XK"), datetime(2019, 11, 16, tzinfo=UTC)) == ""
    assert format_percent(0.031) == "3%" and format_percent(0.001) == "less than 1%"
    assert format_hours(0.5) == "30 minutes" and format_hours(1) == "1 hour"
    assert format_hours(135) == "135 hours (5.6 days)"

