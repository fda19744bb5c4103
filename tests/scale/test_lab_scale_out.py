"""In the lab: 2 vantages x 2 shards through the compressed nationwide-shutdown scenario.

The four real daemons run on one event loop in a thread inside the lab's vantage namespace,
in lockstep lab time (an instant starts once every running daemon waits for it; the world is
set to the scenario's conditions for it once). They remote-write to a VictoriaMetrics started
in the same namespace. On the way the storage is taken down for eight rounds and one shard is
killed for four rounds and restarted on its own state. Afterwards every round each shard
completed is stored (no gaps beyond the dead shard's downtime), and the central detector,
reading the storage, finds KZ's shutdown and nothing in the control countries. Lab time is
2024, so the storage is VictoriaMetrics (Prometheus refuses remote-written samples that old).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.central import CentralDetector, CentralSettings
from monitor.clock import VirtualClock
from monitor.config import load_config
from monitor.daemon import Daemon
from monitor.history import HistoryStore
from monitor.lab.conditions import Applier
from monitor.lab.runner import lab_config
from monitor.lab.scenarios import CONTROL_COUNTRIES, Scenario, nationwide_shutdown
from monitor.lab.topology import Lab
from monitor.lab.world import World, build_world
from tests.netns import needs_root, run_in_netns
from tests.scale.storage import VictoriaMetrics, needs_victoria_metrics

pytestmark = [needs_root, needs_victoria_metrics, pytest.mark.slow]

Key = tuple[str, int]
VANTAGES = ("ams", "fra")
STORAGE_DOWN = (20, 28)  # rounds
SHARD_DOWN = (30, 34)
KILLED: Key = ("fra", 1)


class Lockstep:
    """One lab time for several daemons on one loop (see the module docstring)."""

    def __init__(self, start: datetime, enter: Callable[[datetime], Awaitable[None]]) -> None:
        self.now = start
        self.enter = enter
        self.active: set[Participant] = set()
        self.waiting: dict[Participant, datetime] = {}
        self.changed = asyncio.Event()
        self.advancing = False

    def join(self) -> Participant:
        participant = Participant(self)
        self.active.add(participant)
        return participant

    def leave(self, participant: Participant) -> None:
        self.active.discard(participant)
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Participant(VirtualClock):
    """A daemon's clock: its `sleep_until` waits for the others."""

    def __init__(self, lockstep: Lockstep) -> None:
        super().__init__(lockstep.now)
        self.lockstep = lockstep

    def now(self) -> datetime:
        return self.lockstep.now

    async def sleep_until(self, when: datetime) -> None:
        step = self.lockstep
        step.waiting[self] = when
        try:
            while step.now < when:
                if not step.advancing and step.active <= set(step.waiting):
                    target = min(step.waiting[p] for p in step.active)
                    step.advancing = True
                    try:
                        await step.enter(target)
                        step.now = max(step.now, target)
                    finally:
                        step.advancing = False
                    step._wake()
                    continue
                await step.changed.wait()
        finally:
            step.waiting.pop(self, None)
        await asyncio.sleep(0)


class LabFleet:
    def __init__(self, world: World, lab: Lab, scenario: Scenario, root: Path,
                 storage: VictoriaMetrics) -> None:
        self.scenario = scenario
        self.root = root
        self.storage = storage
        self.applier = Applier(lab)
        self.world = world
        self.lockstep = Lockstep(scenario.start, self.enter)
        self.running: dict[Key, tuple[Daemon, Participant, asyncio.Task[int]]] = {}
        self.stopped: list[asyncio.Task[int]] = []
        self.done = asyncio.Event()
        self.during_outage = (0, 0)  # (samples buffered, connection failures) just before
        base = lab_config(world, lab, scenario.interval_s, root / "inputs")
        self.configs: dict[Key, Path] = {}
        for vantage in VANTAGES:
            for shard in range(2):
                directory = root / f"{vantage}-{shard}"
                directory.mkdir(parents=True)
                data = {**base, "vantage": {"name": vantage},
                        "hitlist_dir": str(directory / "hitlists"),
                        "history": {"path": str(directory / "history.sqlite"),
                                    "retention_days": 60},
                        "remote_write": [{"url": storage.write_url, "name": "vm",
                                          "timeout_s": 2,
                                          "buffer_dir": str(directory / "buffer")}]}
                path = directory / "config.yaml"
                path.write_text(yaml.safe_dump(data, sort_keys=False))
                self.configs[(vantage, shard)] = path

    def start(self, key: Key) -> None:
        config = dataclasses.replace(load_config(self.configs[key]), shard=(key[1], 2))
        clock = self.lockstep.join()
        daemon = Daemon(config, clock, listen="127.0.0.1:0", stop_grace_s=2.0)
        self.running[key] = (daemon, clock, asyncio.create_task(daemon.run()))

    def stop(self, key: Key) -> None:
        daemon, clock, task = self.running.pop(key)
        daemon.request_stop()
        self.lockstep.leave(clock)
        self.stopped.append(task)

    def round_of(self, when: datetime) -> int:
        return round((when - self.scenario.start).total_seconds() / self.scenario.interval_s)

    async def enter(self, when: datetime) -> None:
        """Before lab instant `when`: the world for it, and the test's interventions."""
        number = self.round_of(when)
        if number == STORAGE_DOWN[0]:
            await asyncio.to_thread(self.storage.stop)
        elif number == STORAGE_DOWN[1]:
            self.during_outage = (self.buffered(), sum(
                w.counters.failures["connection"] for d, _, _ in self.running.values()
                for w in d._remote))
            await asyncio.to_thread(self.storage.start)
        elif number == SHARD_DOWN[0]:
            self.stop(KILLED)
        elif number == SHARD_DOWN[1]:
            self.start(KILLED)
        if number >= self.scenario.rounds:
            self.done.set()
            await asyncio.Event().wait()  # nobody enters the instant after the scenario
        self.applier.apply(self.scenario.conditions_at(self.world, when))

    def buffered(self) -> int:
        return sum(w.buffer.samples_buffered for d, _, _ in self.running.values()
                   for w in d._remote)


async def run_fleet(fleet: LabFleet) -> None:
    for vantage in VANTAGES:
        for shard in range(2):
            fleet.start((vantage, shard))
    await asyncio.wait_for(fleet.done.wait(), timeout=400)
    deadline = time.monotonic() + 90
    while fleet.buffered():  # the storage is back: let the buffers drain before stopping
        assert time.monotonic() < deadline, f"{fleet.buffered()} samples still buffered"
        await asyncio.sleep(0.2)
    for key in list(fleet.running):
        fleet.stop(key)
    for task in fleet.stopped:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)


def round_times(path: Path) -> list[int]:
    with HistoryStore(path, 60, readonly=True) as store:
        frame = store.read_frame()
    return sorted({int(t.timestamp()) for t in frame["time"]})


async def lab_scenario(world: World, lab: Lab, root: Path) -> dict[str, Any]:
    scenario = nationwide_shutdown(compressed=True)
    storage = VictoriaMetrics(netns=lab.vantage)
    await asyncio.to_thread(storage.__enter__)
    try:
        fleet = LabFleet(world, lab, scenario, root, storage)
        await run_fleet(fleet)
        await asyncio.to_thread(storage.flush)
        exported = await asyncio.to_thread(storage.export, "shutdown_monitor_rounds_total")
        # The central detector over the storage, bin by bin through the event.
        settings = CentralSettings(storage.url, bin_seconds=scenario.interval_s, lag_s=0,
                                   history_s=scenario.interval_s * 40)
        onset = scenario.start + timedelta(hours=26)
        central = CentralDetector(settings, VirtualClock(onset - timedelta(hours=1)))
        opened: list[dict[str, Any]] = []
        when = onset - timedelta(hours=1)
        while when <= scenario.end:
            transitions = await asyncio.to_thread(central.judge_until, when)
            opened += [t.incident for t in transitions if str(t.event) == "opened"]
            when += timedelta(seconds=scenario.interval_s)
    finally:
        await asyncio.to_thread(storage.__exit__, None, None, None)
    return {"exported": exported, "opened": opened, "scenario": scenario,
            "during_outage": fleet.during_outage}


def test_two_vantages_two_shards_in_the_lab(tmp_path: Path) -> None:
    world = build_world()
    prefix = f"sc{os.getpid() % 100000}"
    with Lab(world, prefix=prefix) as lab:
        result = run_in_netns(lab.vantage, lambda: lab_scenario(world, lab, tmp_path),
                              timeout=600)
    scenario: Scenario = result["scenario"]
    buffered, failures = result["during_outage"]
    assert buffered > 0 and failures > 0  # the outage was real: rounds waited on disk
    stored: dict[Key, list[int]] = {}
    for series in result["exported"]:
        labels = series["metric"]
        stored[(labels["vantage"], int(labels["shard"].split("/")[0]))] = sorted(
            ms // 1000 for ms in series["timestamps"])
    assert set(stored) == {(v, s) for v in VANTAGES for s in range(2)}
    start = int(scenario.start.timestamp())
    every_round = [start + k * scenario.interval_s for k in range(scenario.rounds)]
    for key, stamps in stored.items():
        # What the shard measured (its own history) is exactly what the storage holds.
        assert stamps == round_times(tmp_path / f"{key[0]}-{key[1]}" / "history.sqlite"), key
        if key == KILLED:
            missing = sorted(set(every_round) - set(stamps))
            assert missing == every_round[SHARD_DOWN[0]:SHARD_DOWN[1]], missing
        else:  # storage outage or not, nothing is missing
            assert stamps == every_round, key
    kz = [i for i in result["opened"] if i["country"] == "KZ" and i["scope"] == "country"]
    assert kz and kz[0]["kind"] == "nationwide_shutdown", result["opened"]
    assert not [i for i in result["opened"] if i["country"] in CONTROL_COUNTRIES]
    assert not [i for i in result["opened"] if i["scope"] == "vantage"], result["opened"]
