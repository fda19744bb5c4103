"""The central detector over real daemons: 2 vantages x 2 shards, scraped by a real Prometheus.

Real time on loopback. Each vantage's "countries" are HTTP endpoints on its own local server
(what that vantage can reach); the test switches them to 403 (blocked) per vantage and country.
A vantage's control URL answering 403 takes that vantage offline. Prometheus scrapes the four
daemons with a `vantage` label from relabelling; the central detector reads the sums across
shards per vantage through PromQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from monitor.central import CentralDetector, CentralSettings
from monitor.clock import RealClock
from monitor.config import load_config
from monitor.daemon import Daemon
from monitor.vantages import KIND_DISAGREEMENT, VantageJudge, consensus_points
from tests.prom import PrometheusServer, needs_prometheus
from tests.scale.worlds import VANTAGES, LabelledPrometheus, World, write_config


@contextlib.asynccontextmanager
async def daemons(tmp_path: Path, worlds: dict[str, World]) -> AsyncIterator[list[Daemon]]:
    started: list[tuple[Daemon, asyncio.Task[int]]] = []
    try:
        for vantage in VANTAGES:
            path = write_config(tmp_path / vantage, vantage, worlds[vantage].port)
            for shard in range(2):
                config = load_config(path)
                history = dataclasses.replace(config.history,
                                              path=tmp_path / vantage / f"h{shard}.sqlite")
                config = dataclasses.replace(config, history=history)
                daemon = Daemon(config, RealClock(), listen="127.0.0.1:0", shard=(shard, 2))
                started.append((daemon, asyncio.create_task(daemon.run())))
        deadline = time.monotonic() + 30
        while any(d.api is None or d.api.port == 0 for d, _ in started):
            assert time.monotonic() < deadline, "daemons did not start"
            await asyncio.sleep(0.05)
        yield [d for d, _ in started]
    finally:
        for daemon, _ in started:
            daemon.request_stop()
        for _, task in started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=15)


async def judge_for(central: CentralDetector, seconds: float,
                    until: Callable[[], bool] | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await central.step()
        if until is not None and until():
            return
        await asyncio.sleep(0.25)


def open_kinds(central: CentralDetector) -> set[tuple[str, str, str]]:
    return {(i["country"], i["entity"], i["kind"]) for i in central.lifecycle.open_incidents()}


def country_incidents(central: CentralDetector) -> list[dict[str, Any]]:
    return [i for i in central.incidents() if i["scope"] != "vantage"]


@needs_prometheus
async def test_central_detector_over_two_vantages_and_two_shards(tmp_path: Path) -> None:
    async with World() as ams, World() as fra:
        worlds = {"ams": ams, "fra": fra}
        async with daemons(tmp_path, worlds) as running:
            groups = []
            for daemon in running:
                assert daemon.api is not None
                shard = daemon.config.shard
                assert shard is not None
                groups.append((f"127.0.0.1:{daemon.api.port}",
                               {"vantage": daemon.config.vantage_name, "shard": str(shard[0])}))
            prometheus = LabelledPrometheus(groups)
            await asyncio.to_thread(prometheus.__enter__)
            try:
                await scenario(prometheus, worlds)
            finally:
                await asyncio.to_thread(prometheus.__exit__, None, None, None)


async def scenario(prometheus: PrometheusServer, worlds: dict[str, World]) -> None:
    await prometheus.await_for("count(shutdown_monitor_targets_up) >= 8", bool, limit_s=60)
    await asyncio.sleep(6)  # a few ordinary bins to learn from
    settings = CentralSettings(prometheus.url, bin_seconds=1, lag_s=1.5, history_s=30)
    central = CentralDetector(settings, RealClock())
    await central.step()  # primed
    await judge_for(central, 3)
    assert country_incidents(central) == [] and central.healthy_vantages == {
        "ams": True, "fra": True}
    # The sums across shards reach the central detector whole: 8 KZ URLs per vantage.
    status = await prometheus.aquery(
        'sum by (vantage) (shutdown_monitor_targets{country="KZ"})')
    assert {r["metric"]["vantage"]: float(r["value"][1]) for r in status} == {
        "ams": 8.0, "fra": 8.0}

    # fra alone sees KZ blocked: fra disagrees, KZ is not reported down.
    worlds["fra"].blocked = {"KZ"}
    await judge_for(central, 20, lambda: ("ZZ", "fra", KIND_DISAGREEMENT) in open_kinds(central))
    assert ("ZZ", "fra", KIND_DISAGREEMENT) in open_kinds(central)
    [disagreement] = [i for i in central.lifecycle.open_incidents()
                      if i["kind"] == KIND_DISAGREEMENT]
    assert disagreement["disagrees_on"][0]["country"] == "KZ"
    assert disagreement["disagrees_on"][0]["consensus"] == "none"
    await judge_for(central, 3)
    assert country_incidents(central) == []

    # Both see it: KZ is down; fra no longer disagrees.
    worlds["ams"].blocked = {"KZ"}
    await judge_for(central, 20, lambda: any(
        c == "KZ" for c, _, _ in open_kinds(central)) and KIND_DISAGREEMENT not in {
        k for _, _, k in open_kinds(central)})
    kz = [i for i in central.lifecycle.open_incidents() if i["country"] == "KZ"]
    assert kz and all(i["scope"] in ("country", "asn") for i in kz), kz
    assert not any(i["kind"] == KIND_DISAGREEMENT for i in central.lifecycle.open_incidents())
    assert not any(i["country"] == "UZ" for i in central.incidents())

    # KZ back; ams loses its uplink (control fails, and it sees KZ and UZ blocked): ams is
    # offline, no country is reported down.
    worlds["ams"].blocked = set()
    worlds["fra"].blocked = set()
    await judge_for(central, 20, lambda: not any(
        c == "KZ" for c, _, _ in open_kinds(central)))
    assert not any(c == "KZ" for c, _, _ in open_kinds(central))
    before = {i["id"] for i in country_incidents(central)}
    worlds["ams"].blocked = {"control", "KZ", "UZ"}
    await judge_for(central, 20, lambda: ("ZZ", "ams", "vantage_offline") in open_kinds(central))
    assert ("ZZ", "ams", "vantage_offline") in open_kinds(central)
    await judge_for(central, 3)
    assert {i["id"] for i in country_incidents(central)} == before
    assert central.healthy_vantages["ams"] is False
    body, _ = central.exposition()
    assert b'shutdown_monitor_central_vantage_healthy{vantage="ams"} 0.0' in body
    assert b"shutdown_monitor_incident_active" in body


# ---------------------------------------------------------------- the rules, directly


T = datetime(2026, 1, 1, tzinfo=UTC)


def counts(rows: list[tuple[str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame([(T, v, "KZ", "country", "KZ", "icmp", float(up), float(total))
                         for v, up, total in rows],
                        columns=["time", "vantage", "country", "scope", "entity", "method", "up",
                                 "total"])


def health(rows: list[tuple[str, float]]) -> pd.DataFrame:
    return pd.DataFrame([(T, v, up) for v, up in rows], columns=["time", "vantage", "vantage_up"])


def consensus_up(rows: list[tuple[str, int, int]], up: list[tuple[str, float]]) -> float | None:
    points = consensus_points(counts(rows), health(up))
    picked = points[points["signal"] == "icmp_blocks_up"]["value"].tolist()
    return picked[0] if picked else None


def test_consensus_falls_only_when_most_healthy_vantages_see_it_fall() -> None:
    healthy3 = [("a", 1.0), ("b", 1.0), ("c", 1.0)]
    assert consensus_up([("a", 90, 100), ("b", 5, 100)], healthy3[:2]) == 90  # 1 of 2: no
    assert consensus_up([("a", 3, 100), ("b", 5, 100)], healthy3[:2]) == 5  # 2 of 2: yes
    assert consensus_up([("a", 90, 100), ("b", 5, 100), ("c", 4, 100)], healthy3) == 5
    assert consensus_up([("a", 90, 100), ("b", 95, 100), ("c", 4, 100)], healthy3) == 90
    # An offline vantage does not vote: its collapse is not the country's.
    assert consensus_up([("a", 90, 100), ("b", 0, 100)], [("a", 1.0), ("b", 0.0)]) == 90
    # No healthy vantage: no country point at all, and the consensus vantage is down.
    points = consensus_points(counts([("a", 0, 100)]), health([("a", 0.0)]))
    assert points["signal"].tolist() == ["vantage_up"] and points["value"].tolist() == [0.0]


def test_judge_needs_min_bins_and_closes_what_it_opened() -> None:
    judge = VantageJudge(min_bins=2)
    alone = {"a": [{"country": "KZ", "scope": "country", "entity": "KZ",
                    "kind": "nationwide_shutdown", "end": None}]}
    places = {"a": {("KZ", "country", "KZ")}, "b": {("KZ", "country", "KZ")}}
    times = pd.date_range(T, periods=5, freq="300s").to_pydatetime()
    assert judge.judge(times[0], {"a": True, "b": True}, alone, [], places) == []
    [opened] = judge.judge(times[1], {"a": True, "b": True}, alone, [], places)
    assert opened["kind"] == KIND_DISAGREEMENT and opened["entity"] == "a"
    assert opened["start"] == "2026-01-01T00:00:00Z" and opened["end"] is None
    [closed] = judge.judge(times[2], {"a": True, "b": True}, {}, [], places)
    assert closed["id"] == opened["id"] and closed["end"] == "2026-01-01T00:10:00Z"
    # b goes silent: offline after two bins, back when it reports again.
    assert judge.judge(times[3], {"a": True}, {}, [], places) == []
    [offline] = judge.judge(times[4], {"a": True}, {}, [], places)
    assert offline["kind"] == "vantage_offline" and offline["entity"] == "b"
