"""2 vantages x 2 shards writing to VictoriaMetrics (remote write) while a Prometheus scrapes them;
the storage goes down for a while and one shard is killed and restarted; a shutdown is then
detected by the central detector reading VictoriaMetrics. Afterwards every round each daemon
completed (its own history store says which) is in the storage, and only the dead shard's
downtime is missing. Real time, loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

from monitor.central import CentralDetector, CentralSettings
from monitor.clock import RealClock
from monitor.config import load_config
from monitor.daemon import Daemon
from monitor.history import HistoryStore
from tests.prom import needs_prometheus
from tests.scale.storage import VictoriaMetrics, needs_victoria_metrics
from tests.scale.worlds import VANTAGES, LabelledPrometheus, World, write_config

Key = tuple[str, int]  # (vantage, shard)


class Fleet:
    """The four daemons; any one can be stopped and started again on its own state."""

    def __init__(self, root: Path, worlds: dict[str, World], write_url: str) -> None:
        self.root = root
        self.paths = {
            vantage: write_config(root / vantage, vantage, worlds[vantage].port, remote_write=[
                {"url": write_url, "name": "vm", "timeout_s": 2}])
            for vantage in VANTAGES}
        self.running: dict[Key, tuple[Daemon, asyncio.Task[int]]] = {}

    def history_path(self, key: Key) -> Path:
        return self.root / key[0] / f"history-{key[1]}.sqlite"

    async def start(self, key: Key) -> Daemon:
        vantage, shard = key
        config = load_config(self.paths[vantage])
        remote = dataclasses.replace(config.remote_write[0],
                                     buffer_dir=self.root / vantage / f"buffer-{shard}")
        config = dataclasses.replace(
            config, remote_write=(remote,),
            history=dataclasses.replace(config.history, path=self.history_path(key)))
        # Port 0: every shard's instance label is the same; vantage and shard labels (added by
        # the remote writer) keep their series apart.
        daemon = Daemon(config, RealClock(), listen="127.0.0.1:0", shard=(shard, 2))
        task = asyncio.create_task(daemon.run())
        self.running[key] = (daemon, task)
        deadline = time.monotonic() + 30
        while daemon.api is None or daemon.api.port == 0:
            assert time.monotonic() < deadline and not task.done(), "daemon did not start"
            await asyncio.sleep(0.05)
        return daemon

    async def stop(self, key: Key) -> None:
        daemon, task = self.running.pop(key)
        daemon.request_stop()
        await asyncio.wait_for(task, timeout=20)

    async def stop_all(self) -> None:
        for key in list(self.running):
            with contextlib.suppress(Exception):
                await self.stop(key)


@contextlib.asynccontextmanager
async def fleet(root: Path, worlds: dict[str, World], url: str) -> AsyncIterator[Fleet]:
    made = Fleet(root, worlds, url)
    try:
        for vantage in VANTAGES:
            for shard in range(2):
                await made.start((vantage, shard))
        yield made
    finally:
        await made.stop_all()


def round_times(path: Path) -> set[int]:
    """Seconds of every round this shard stored in its history."""
    store = HistoryStore(path, readonly=True)
    try:
        frame = store.read_frame()
    finally:
        store.close()
    return {int(t.timestamp()) for t in frame["time"]}


@needs_prometheus
@needs_victoria_metrics
async def test_two_shards_two_vantages_outages_lose_nothing_and_shutdown_is_detected(
    tmp_path: Path,
) -> None:
    storage = VictoriaMetrics()
    await asyncio.to_thread(storage.__enter__)
    try:
        async with World() as ams, World() as fra:
            worlds = {"ams": ams, "fra": fra}
            async with fleet(tmp_path, worlds, storage.write_url) as daemons:
                groups = []
                for (vantage, shard), (daemon, _) in daemons.running.items():
                    assert daemon.api is not None
                    groups.append((f"127.0.0.1:{daemon.api.port}",
                                   {"vantage": vantage, "shard": str(shard)}))
                scraper = LabelledPrometheus(groups)
                await asyncio.to_thread(scraper.__enter__)
                try:
                    await scenario(storage, daemons, worlds, scraper)
                finally:
                    await asyncio.to_thread(scraper.__exit__, None, None, None)
        await asyncio.to_thread(storage.flush)
        exported = await asyncio.to_thread(storage.export, "shutdown_monitor_rounds_total")
    finally:
        await asyncio.to_thread(storage.__exit__, None, None, None)

    stored: dict[Key, list[int]] = {}
    for series in exported:
        labels = series["metric"]
        key = (labels["vantage"], int(labels["shard"].split("/")[0]))
        stored[key] = [ms // 1000 for ms in series["timestamps"]]
    assert set(stored) == {(v, s) for v in VANTAGES for s in range(2)}
    for key, stamps in stored.items():
        measured = round_times(tmp_path / key[0] / f"history-{key[1]}.sqlite")
        # Every round the shard completed is in the storage, once, with its round timestamp,
        # storage outage or not.
        assert sorted(stamps) == sorted(measured), key
        assert len(stamps) == len(set(stamps))
    gaps = {key: max(b - a for a, b in zip(sorted(s), sorted(s)[1:], strict=False))
            for key, s in stored.items()}
    # Only the killed shard has a gap as long as its downtime (the others at most miss a round
    # skipped on a busy machine, and then their history misses it too).
    assert gaps[("fra", 1)] >= 4
    assert all(gap < gaps[("fra", 1)] for key, gap in gaps.items() if key != ("fra", 1)), gaps


async def scenario(storage: VictoriaMetrics, daemons: Fleet, worlds: dict[str, World],
                   scraper: LabelledPrometheus) -> None:
    await asyncio.sleep(5)
    # The storage goes down; rounds go on and are buffered on disk.
    await asyncio.to_thread(storage.stop)
    await asyncio.sleep(5)
    writers = [w for daemon, _ in daemons.running.values() for w in daemon._remote]
    assert any(w.buffer.samples_buffered > 0 for w in writers)
    assert any(w.counters.failures["connection"] > 0 for w in writers)
    exposed = next(iter(daemons.running.values()))[0].exposition()[0].decode()
    buffered = [line for line in exposed.splitlines()
                if line.startswith('shutdown_monitor_remote_write_samples_buffered{remote="vm"}')]
    assert buffered and float(buffered[0].split()[-1]) > 0, buffered
    assert 'shutdown_monitor_remote_write_failures_total{reason="connection",remote="vm"}' \
        in exposed
    await asyncio.to_thread(storage.start)
    # One shard dies for a while and comes back on its own state.
    await daemons.stop(("fra", 1))
    await asyncio.sleep(5)
    await daemons.start(("fra", 1))
    deadline = time.monotonic() + 30
    while any(w.buffer.samples_buffered for d, _ in daemons.running.values() for w in d._remote):
        assert time.monotonic() < deadline, "buffers not drained after the storage came back"
        await asyncio.sleep(0.2)

    # The central detector reads the remote-written series: quiet, then KZ goes dark.
    settings = CentralSettings(storage.url, bin_seconds=1, lag_s=1.5, history_s=40)
    central = CentralDetector(settings, RealClock())
    await central.step()
    for _ in range(8):
        await asyncio.sleep(0.5)
        await central.step()
    assert [i for i in central.incidents() if i["scope"] != "vantage"] == []
    worlds["ams"].blocked = worlds["fra"].blocked = {"KZ"}
    deadline = time.monotonic() + 25
    while not any(i["country"] == "KZ" for i in central.lifecycle.open_incidents()):
        assert time.monotonic() < deadline, central.incidents()
        await asyncio.sleep(0.3)
        await central.step()
    assert not any(i["country"] == "UZ" for i in central.incidents())
    # The scraping Prometheus saw the same fleet (the restarted shard listens on a new port
    # it does not know, so fra has one healthy target left).
    scraped = await scraper.aquery("count by (vantage) (max_over_time(up[6s]) == 1)")
    healthy_targets = {r["metric"]["vantage"]: float(r["value"][1]) for r in scraped}
    assert healthy_targets["ams"] == 2.0 and healthy_targets["fra"] >= 1.0, healthy_targets
