"""How long `shutdown-monitor report` takes on months of data.

    python3 benchmarks/report_bench.py [--days 90] [--networks 10] [--out /tmp/report-bench]
    python3 benchmarks/report_bench.py --days 40 --prometheus   # also: read it from Prometheus

Synthetic but shaped like the daemon's output: 5-minute rounds, one country with N networks
(ICMP and TCP up/total per network and for the country) plus the vantage series, a diurnal
swing, and a week-long shutdown with a restoration near the end. Times the three stages
separately: reading the long CSV, build_report (detector with baselines + aggregation) and
write_report (charts + documents), then the whole CLI as a user runs it.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from monitor.report import build_report, write_report
from monitor.series import read_series_file, write_long_csv

STEP = 300


def synthetic(days: int, networks: int, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = datetime(2021, 10, 1, tzinfo=UTC)
    times = pd.date_range(start, periods=days * 86400 // STEP, freq=f"{STEP}s", tz="UTC")
    hours = (times.hour + times.minute / 60).to_numpy()
    p = 0.7 + 0.05 * np.sin(2 * np.pi * hours / 24)
    end = times[-1].to_pydatetime()
    shutdown = (end - timedelta(days=9)) <= times.to_pydatetime()
    shutdown &= times.to_pydatetime() < end - timedelta(days=2)
    restored = ((end - timedelta(days=6)) <= times.to_pydatetime()) & (
        times.to_pydatetime() < end - timedelta(days=6) + timedelta(hours=3))
    p = np.where(shutdown & ~restored, 0.03, p)
    parts = []
    sizes = rng.integers(20, 400, size=networks)
    for method, signal, scale in (("icmp", "icmp_blocks", 1), ("tcp", "tcp", 0.3)):
        country_up = np.zeros(len(times))
        country_total = 0
        for asn, size in zip(range(64500, 64500 + networks), sizes, strict=True):
            total = max(1, int(size * scale))
            up = rng.binomial(total, p)
            country_up += up
            country_total += total
            for sig, values in ((f"{signal}_up", up), (f"{signal}_total", np.full(len(times),
                                                                                   total))):
                parts.append(pd.DataFrame({"time": times, "country": "KZ", "scope": "asn",
                                           "entity": str(asn), "signal": sig,
                                           "value": values.astype(float)}))
        for sig, values in ((f"{signal}_up", country_up),
                            (f"{signal}_total", np.full(len(times), country_total))):
            parts.append(pd.DataFrame({"time": times, "country": "KZ", "scope": "country",
                                       "entity": "KZ", "signal": sig,
                                       "value": values.astype(float)}))
        del method
    parts.append(pd.DataFrame({"time": times, "country": "ZZ", "scope": "vantage",
                               "entity": "bench", "signal": "vantage_up", "value": 1.0}))
    return pd.concat(parts, ignore_index=True)


def openmetrics(frame: pd.DataFrame) -> str:
    """The daemon's per-network gauges, as Prometheus would have scraped them."""
    asn = frame[frame["scope"] == "asn"]
    ts = asn["time"].dt.as_unit("s").astype("int64").astype(str)
    method = np.where(asn["signal"].str.startswith("icmp"), "icmp", "tcp")
    labels: pd.Series = 'country="KZ",asn="' + asn["entity"] + '",method="' + method + '"} '
    line = "{" + labels + asn["value"].map("{:g}".format) + " " + ts
    up = asn["signal"].str.endswith("_up").to_numpy()
    vantage = frame[frame["scope"] == "vantage"]
    vts = vantage["time"].dt.as_unit("s").astype("int64").astype(str)
    return "\n".join([
        "# TYPE shutdown_monitor_targets gauge",
        *("shutdown_monitor_targets" + line[~up]),
        "# TYPE shutdown_monitor_targets_up gauge",
        *("shutdown_monitor_targets_up" + line[up]),
        "# TYPE shutdown_monitor_vantage_up gauge",
        *('shutdown_monitor_vantage_up{vantage="bench"} 1 ' + vts), "# EOF", ""])


def prometheus_run(frame: pd.DataFrame, work: Path) -> None:
    """Backfill a local Prometheus (loopback only) and time the report read from it."""
    (work / "data.om").write_text(openmetrics(frame))
    t0 = time.perf_counter()
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics",
                    str(work / "data.om"), str(work / "tsdb")], check=True,
                   capture_output=True)
    print(f"backfill        {time.perf_counter() - t0:6.2f} s  (promtool, not part of a report)")
    (work / "prometheus.yml").write_text("global:\n  scrape_interval: 1h\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}",
                             "--storage.tsdb.retention.time=100y"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        until = frame["time"].max().to_pydatetime()
        since = until - timedelta(days=7)
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "monitor", "report", "--country", "KZ",
                        "--prometheus", url, "--since", since.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "--until", until.strftime("%Y-%m-%dT%H:%M:%SZ"), "--out",
                        str(work / "prom")], check=True, stdout=subprocess.DEVNULL)
        print(f"CLI, Prometheus {time.perf_counter() - t1:6.2f} s  (7-day report + 29 days of "
              "baseline history read in pieces, progress bar on stderr)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--networks", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--prometheus", action="store_true",
                        help="also backfill a local Prometheus and report from it")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="report-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    frame = synthetic(args.days, args.networks)
    source = work / "series.csv"
    write_long_csv(frame, source)
    print(f"{args.days} days, {args.networks} networks: {len(frame):,} points, "
          f"{source.stat().st_size / 1e6:.0f} MB CSV")
    t0 = time.perf_counter()
    read = read_series_file(source)
    t1 = time.perf_counter()
    report = build_report(read.frame, "KZ", source=str(source))
    t2 = time.perf_counter()
    files = write_report(report, work / "report")
    t3 = time.perf_counter()
    print(f"read long CSV   {t1 - t0:6.2f} s")
    print(f"build_report    {t2 - t1:6.2f} s  (detector with baselines + aggregation)")
    print(f"write_report    {t3 - t2:6.2f} s  ({len(files.charts)} charts, md + html)")
    print(f"headline: {report.headline}")
    t4 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "monitor", "report", "--country", "KZ", "--input",
                    str(source), "--out", str(work / "cli")], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"whole CLI       {time.perf_counter() - t4:6.2f} s  (python start, imports, all)")
    if args.prometheus:
        prometheus_run(frame, work)


if __name__ == "__main__":
    main()
