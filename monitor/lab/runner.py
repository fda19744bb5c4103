"""`lab run`: the real daemon in the vantage namespace, probing the world in lab time.

The daemon runs in this process, on its own event loop in a thread that has joined the vantage
namespace (every socket it opens, probes and API alike, lives there). Its clock is a
`LabClock`: a virtual clock that, before each round, puts the scenario's conditions for that
instant into the world namespace, so the round measures exactly the world of its lab time.
Rounds run back to back. Optionally the daemon's API is relayed to a port on the host's
loopback (a socket opened in the host namespace, served from the vantage thread), so a
Prometheus on the host can scrape it without any route between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import pandas as pd
import yaml

from monitor.clock import VirtualClock
from monitor.config import Config, load_config
from monitor.daemon import Daemon
from monitor.detect import DetectorConfig
from monitor.history import HistoryStore
from monitor.lab.conditions import Applier
from monitor.lab.scenarios import Check, Scenario, evaluate
from monitor.lab.topology import Lab, LabError
from monitor.lab.world import (
    CONTROL_HOSTS,
    DNS_ANSWER,
    DNS_NAME,
    DNS_OCTET,
    HTTP_OCTET,
    World,
    write_inputs,
)
from monitor.series import VANTAGE_COUNTRY
from probes import eventloop

log = logging.getLogger(__name__)

API_PORT: Final = 9310  # inside the vantage namespace: nothing else listens there
_CLONE_NEWNET: Final = 0x40000000


def join_netns(name: str) -> None:
    """Move the calling thread (only) into a named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"cannot join namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class LabClock(VirtualClock):
    """Virtual time that sets the world up for each instant the daemon waits for."""

    def __init__(self, scenario: Scenario, world: World, applier: Applier,
                 min_round_wall_s: float = 0.0) -> None:
        super().__init__(scenario.start)
        self.scenario = scenario
        self.world = world
        self.applier = applier
        self.min_round_wall_s = min_round_wall_s
        self._last_wall = time.monotonic()
        self.apply_s = 0.0

    async def sleep_until(self, when: datetime) -> None:
        if self.min_round_wall_s > 0:
            # Slowed down on request (so a Prometheus scraping every second sees each round).
            wait = self._last_wall + self.min_round_wall_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_wall = time.monotonic()
        await super().sleep_until(when)
        began = time.monotonic()
        self.applier.apply(self.scenario.conditions_at(self.world, self.now()))
        self.apply_s += time.monotonic() - began


def lab_config(world: World, lab: Lab, interval_s: int, workdir: Path,
               reprobes: int = 1) -> dict[str, Any]:
    """The daemon's configuration for a lab (written to workdir/lab.yaml), with its inputs."""
    inputs = write_inputs(world, workdir / "inputs")
    countries: dict[str, Any] = {}
    for country in world.countries:
        countries[country.code] = {
            "prefixes": str(inputs[country.code]),
            "methods": ["icmp", "http", "dns"],
            "endpoints": {
                "urls": [f"http://{n.address(HTTP_OCTET)}/" for n in country.networks],
                "resolvers": [{"server": n.address(DNS_OCTET), "name": DNS_NAME.rstrip("."),
                               "expected": [DNS_ANSWER]} for n in country.networks],
            },
        }
    return {
        "vantage": {"name": f"lab-{lab.names.prefix}"},
        "listen": f"127.0.0.1:{API_PORT}",
        "interval_s": interval_s,
        # The lab is our own namespaces: politeness limits would only slow lab time down.
        "pacing": {"rate_pps": None, "max_in_flight": 2048, "per_block_pps": None,
                   "per_block_burst": 8, "blocklist_file": None},
        # Lab RTTs are tens of microseconds: 0.2 s is a hundred times that, even on a busy
        # machine. One re-probe keeps a round's silent stages (what bounds lab speed) at two.
        "probing": {"timeout_s": 0.2, "reprobes": reprobes, "tcp_ports": [80],
                    "discovery_per_round": 2, "discovery_budget": 8},
        "hitlist_dir": str(workdir / "hitlists"),
        "asn_file": str(inputs["asn"]),
        "asn_format": "prefix2as",
        "countries": countries,
        "control": {"hosts": list(CONTROL_HOSTS), "method": "icmp", "min_up_fraction": 0.5},
        "history": {"path": str(workdir / "history.sqlite"), "retention_days": 60},
    }


@dataclass
class RunResult:
    scenario: str
    rounds: int
    lab_start: datetime
    lab_end: datetime
    wall_s: float
    round_s_mean: float
    apply_s: float
    incidents: list[dict[str, Any]]
    checks: list[Check]
    workdir: Path
    notes: list[str] = field(default_factory=list)
    report: Path | None = None  # the report's Markdown file, when one was asked for

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"incidents": self.incidents}

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "rounds": self.rounds,
            "lab_start": self.lab_start.isoformat(), "lab_end": self.lab_end.isoformat(),
            "wall_s": round(self.wall_s, 1), "round_s_mean": round(self.round_s_mean, 3),
            "checks": [{"ok": c.ok, "message": c.message} for c in self.checks],
            "notes": self.notes,
        }


def surviving(incidents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Incidents not swallowed by another of the same place and kind (a merged flap lies inside
    its survivor's span), oldest first."""
    def span(i: dict[str, Any]) -> tuple[str, str]:
        return str(i["start"]), str(i.get("end") or "9999")

    def key(i: dict[str, Any]) -> tuple[str, str, str, str]:
        return str(i["country"]), str(i["scope"]), str(i["entity"]), str(i["kind"])

    kept = []
    for inc in incidents:
        a, b = span(inc)
        inside = any(o is not inc and key(o) == key(inc) and span(o)[0] <= a and b <= span(o)[1]
                     and span(o) != (a, b) for o in incidents)
        if not inside:
            kept.append(inc)
    return sorted(kept, key=lambda i: (str(i["start"]), str(i["country"])))


class ApiRelay:
    """Host-loopback port -> the daemon's API in the vantage namespace (TCP, byte for byte)."""

    def __init__(self, port: int = 0) -> None:
        # Opened here, in the host namespace (the caller's thread).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])

    async def serve(self) -> asyncio.AbstractServer:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                # Opened in the vantage thread: this connection lives in the vantage namespace.
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", API_PORT)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        return await asyncio.start_server(client, sock=self.sock)


class DaemonThread:
    """The daemon on its own loop in a thread inside the vantage namespace."""

    def __init__(self, daemon: Daemon, namespace: str, relay: ApiRelay | None) -> None:
        self.daemon = daemon
        self.namespace = namespace
        self.relay = relay
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="lab-daemon", daemon=True)

    def _main(self) -> None:
        try:
            join_netns(self.namespace)
            eventloop.run(self._run())
        except BaseException as exc:  # handed to the caller's thread
            self.error = exc

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        server = await self.relay.serve() if self.relay is not None else None
        try:
            await self.daemon.run()
        finally:
            if server is not None:
                server.close()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.daemon.request_stop)

    def wait(self) -> None:
        try:
            while self.thread.is_alive():
                self.thread.join(0.2)
        except BaseException:
            # Ctrl-C: stop the daemon cleanly (it flushes its history), then go on unwinding.
            self.stop()
            self.thread.join(15)
            raise
        if self.error is not None:
            raise self.error


def run_scenario(
    scenario: Scenario,
    world: World,
    workdir: Path,
    *,
    prefix: str,
    relay_port: int | None = None,
    min_round_wall_s: float = 0.0,
    keep_up: bool = False,
    report_dir: Path | None = None,
    report_country: str = "KZ",
    on_started: Any = None,
) -> RunResult:
    """Lab up, the daemon through the whole scenario, the incidents judged, lab down.

    `relay_port` (0: any free port) relays the daemon's API to the host's loopback;
    `report_dir` gets the incident report of `report_country` (monitor.report) over the run;
    `on_started(lab, relay_port)` is called once the daemon runs (tests); `keep_up` leaves the
    lab standing afterwards (the caller then owns `lab.down()`).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(world, prefix=prefix)
    began = time.monotonic()
    lab.up()
    try:
        config_path = write_lab_config(world, lab, scenario.interval_s, workdir,
                                       scenario.reprobes)
        config = load_config(config_path)
        applier = Applier(lab)
        clock = LabClock(scenario, world, applier, min_round_wall_s)
        daemon = Daemon(config, clock, config_path=config_path, max_rounds=scenario.rounds,
                        stop_grace_s=2.0)
        relay = ApiRelay(relay_port) if relay_port is not None else None
        runner = DaemonThread(daemon, lab.vantage, relay)
        runner.start()
        if on_started is not None:
            while runner.loop is None and runner.thread.is_alive():
                time.sleep(0.01)
            on_started(lab, relay.port if relay is not None else None)
        runner.wait()
        wall = time.monotonic() - began
        escaped = lab.escaped()
        if any(escaped.values()):
            raise LabError(f"packets tried to leave the lab (dropped): {escaped}")
        with HistoryStore(config.history.path, config.history.retention_days) as store:
            stored = store.load_incidents()
            frame = store.read_frame() if report_dir is not None else None
        incidents = surviving([i for i in stored])
        rounds_done = daemon.last.number
        result = RunResult(
            scenario=scenario.name, rounds=rounds_done, lab_start=scenario.start,
            lab_end=scenario.end, wall_s=wall,
            round_s_mean=wall / max(rounds_done, 1), apply_s=clock.apply_s,
            incidents=incidents, checks=evaluate(scenario, incidents), workdir=workdir,
            notes=list(scenario.notes),
        )
        if report_dir is not None and frame is not None:
            result.report = write_lab_report(frame, report_country, config, report_dir)
        if rounds_done < scenario.rounds:
            result.notes.append(f"stopped after {rounds_done} of {scenario.rounds} rounds")
        return result
    finally:
        if not keep_up:
            lab.down()


def write_lab_config(world: World, lab: Lab, interval_s: int, workdir: Path,
                     reprobes: int = 1) -> Path:
    path = workdir / "lab.yaml"
    config = lab_config(world, lab, interval_s, workdir, reprobes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_lab_report(frame: pd.DataFrame, country: str, config: Config, out_dir: Path) -> Path:
    """The incident report (report.md, report.html, charts) of a lab run, as `report` makes it."""
    from monitor.report import build_report, write_report

    detector = DetectorConfig(**dict(config.detector))
    report = build_report(frame, country, config=detector, source="the lab's history store")
    return write_report(report, out_dir).markdown


def vantage_incidents(incidents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in incidents if i.get("country") == VANTAGE_COUNTRY]
