"""`shutdown-monitor detect` end to end: files in, incident JSON or a table out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from monitor.cli import cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
IRAN = FIXTURES / "iran_2019-11_by_county.csv.gz"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["detect", *args])
    return result.exit_code, result.stdout, result.stderr


def test_json_is_design_shape_and_nothing_else() -> None:
    code, out, _ = run("--input", str(IRAN), "--json")
    assert code == 0
    data = json.loads(out)  # stdout is the JSON document only
    nationwide = [i for i in data["incidents"] if i["kind"] == "nationwide_shutdown"]
    assert len(nationwide) == 1
    inc = nationwide[0]
    assert inc["country"] == "IR" and inc["scope"] == "country" and inc["entity"] == "IR"
    assert inc["start"].startswith("2019-11-16T") and inc["start"].endswith("Z")
    assert inc["end"] is None and inc["severity"] == "critical"
    assert isinstance(inc["min_level"], float) and inc["score"] > 0
    assert inc["signals"] == ["connectivity"]
    assert len(inc["networks"]) > 36 and {"region", "min_level"} <= set(inc["networks"][0])


def test_since_until_and_country_filter() -> None:
    code, out, _ = run("--input", str(IRAN), "--json", "--until", "2019-11-16T12:00:00Z")
    assert code == 0
    assert all(i["kind"] != "nationwide_shutdown" for i in json.loads(out)["incidents"])
    code, out, _ = run("--input", str(IRAN), "--json", "--since", "2019-11-16T17:00:00Z",
                       "--country", "IR")
    kinds = {i["kind"] for i in json.loads(out)["incidents"]}
    assert code == 0 and "nationwide_shutdown" in kinds
    code, out, _ = run("--input", str(IRAN), "--json", "--country", "KZ")
    assert code == 0 and json.loads(out) == {"incidents": []}


def test_table_output() -> None:
    code, out, _ = run("--input", str(IRAN))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["KIND", "SEVERITY", "COUNTRY"]
    assert any(line.startswith("nationwide_shutdown") and "ongoing" in line for line in lines)


def test_ioda_export_needs_country_and_bad_rows_go_to_stderr(tmp_path: Path) -> None:
    path = tmp_path / "ioda.csv"
    start = datetime(2022, 1, 1, tzinfo=UTC)
    rows = ["Time (UTC),Active Probing,BGP"]
    for k in range(5 * 144):  # 10-minute bins, 5 days, collapse on the last day
        when = start + timedelta(minutes=10 * k)
        ap = 100 if when < start + timedelta(days=4, hours=10, minutes=30) else 3
        rows.append(f"{when:%Y-%m-%d %H:%M:%S},{ap + k % 3},{5000 + k % 7}")
    rows.insert(20, "garbage,what,")  # file line 21
    path.write_text("\n".join(rows) + "\n")
    code, _, err = run("--input", str(path))
    assert code != 0 and "--country" in err
    code, out, err = run("--input", str(path), "--country", "KZ", "--json")
    assert code == 0
    assert f"{path}:21: Time (UTC): expected a time" in err
    incidents = json.loads(out)["incidents"]
    assert [(i["kind"], i["start"], i["signals"]) for i in incidents] == [
        ("nationwide_shutdown", "2022-01-05T10:30:00Z", ["active_probing"])]


def test_input_errors_are_clear(tmp_path: Path) -> None:
    code, _, err = run("--input", str(tmp_path / "nope.csv"))
    assert code != 0 and "nope.csv: no such file" in err
    code, _, err = run()
    assert code != 0 and "exactly one of" in err
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"a": [1]}).to_csv(bad, index=False)
    code, _, err = run("--input", str(bad))
    assert code != 0 and "bad.csv:1: header" in err


def test_history_store_input(tmp_path: Path) -> None:
    from monitor.history import HistoryStore
    from monitor.series import frame_to_points

    start = datetime(2022, 1, 1, tzinfo=UTC)
    onset = start + timedelta(days=3, hours=10, minutes=30)
    index = pd.date_range(start, periods=4 * 288, freq="300s")
    up = [(30.0 if t >= onset else 300.0 + k % 5) for k, t in enumerate(index)]
    frame = pd.concat([
        pd.DataFrame({"time": index, "country": "KZ", "scope": "country", "entity": "KZ",
                      "signal": "icmp_blocks_up", "value": up}),
        pd.DataFrame({"time": index, "country": "KZ", "scope": "country", "entity": "KZ",
                      "signal": "icmp_blocks_total", "value": 400.0}),
    ], ignore_index=True)
    with HistoryStore(tmp_path / "history.db", retention_days=3650) as store:
        store.append_points(frame_to_points(frame))
        store.flush()
    code, out, err = run("--history", str(tmp_path / "history.db"), "--json",
                         "--until", "2022-01-05T00:00:00Z")
    assert code == 0, err
    assert [(i["kind"], i["start"], i["end"]) for i in json.loads(out)["incidents"]] == [
        ("nationwide_shutdown", "2022-01-04T10:30:00Z", None)]
