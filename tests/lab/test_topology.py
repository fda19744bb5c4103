"""The lab's namespaces: real packets inside, nothing out, everything removed on every exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from monitor.lab.conditions import Applier, Conditions, Throttle
from monitor.lab.topology import (
    Lab,
    LabError,
    LabNames,
    check_prefix,
    host_conflicts,
    netns_exists,
)
from monitor.lab.world import LAB_SPACES, build_world
from tests.netns import Netns, needs_root, run_in_netns

pytestmark = [needs_root]


def prefix(tag: str) -> str:
    return f"t{tag}{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def world() -> Any:
    return build_world(scale=0.2)


def ping(lab: Lab, address: str) -> bool:
    done = lab.ns(lab.vantage, "ping", "-c1", "-W1", "-q", address, check=False)
    return done.returncode == 0


def http(lab: Lab, url: str) -> int:
    done = lab.ns(lab.vantage, sys.executable, "-c",
                  "import sys, urllib.request\n"
                  "try:\n"
                  f"    print(urllib.request.urlopen({url!r}, timeout=2).read().decode())\n"
                  "except OSError as e:\n"
                  "    print(type(e).__name__); sys.exit(3)", check=False)
    return done.returncode


def test_world_answers_over_the_veth_and_nothing_leaves(world: Any) -> None:
    with Lab(world, prefix=prefix("a")) as lab:
        kz = world.country("KZ")
        kcell = kz.network(29355)
        assert ping(lab, kcell.address(77)) and ping(lab, "198.19.0.1")  # AnyIP: any address
        assert http(lab, f"http://{kcell.address(80)}/") == 0
        applier = Applier(lab)
        applier.apply(Conditions(cut=frozenset(kcell.blocks),
                                 http_blocked=frozenset(kz.network(9198).blocks)))
        assert not ping(lab, kcell.address(77))
        assert ping(lab, kz.network(9198).address(9))
        assert http(lab, f"http://{kz.network(9198).address(80)}/") == 3  # RST
        applier.apply(Conditions(uplink_up=False))
        assert not ping(lab, "198.19.0.1") and not ping(lab, kcell.address(77))
        applier.apply(Conditions(throttled=(kcell.lab_net,), throttle=Throttle(50, 64)))
        assert ping(lab, "198.19.0.1")
        # Safety: the only links are loopback and the veth between the two lab namespaces,
        # the vantage has no default route, nothing was even attempted outside the lab ranges,
        # and the host has no route into them.
        for ns in (lab.vantage, lab.world_ns):
            assert sorted(lab.interfaces(ns)) == ["lo", "uplink"]
        assert "default" not in lab.routes(lab.vantage)
        assert lab.escaped() == {lab.vantage: 0, lab.world_ns: 0}
        assert host_conflicts(LAB_SPACES) == []
        assert all(v > 0 for v in lab.uplink_bytes().values())  # real packets crossed the veth
    assert not netns_exists(lab.vantage) and not netns_exists(lab.world_ns)
    assert not lab.state_dir.exists()


def test_two_labs_side_by_side_and_a_taken_prefix_is_refused(world: Any) -> None:
    with Lab(world, prefix=prefix("b")) as first, Lab(world, prefix=prefix("c")) as second:
        assert ping(first, "198.19.0.2") and ping(second, "198.19.0.2")
        with pytest.raises(LabError, match="exists already"):
            Lab(world, prefix=first.names.prefix).up()
        assert netns_exists(first.vantage)  # the refused one removed nothing of the first


def test_refuses_to_start_when_the_host_routes_lab_addresses(world: Any) -> None:
    # A stand-in "host": a namespace whose table has a real route into 10.0.0.0/8.
    with Netns("smlabhost") as host:
        host.exec("ip", "route", "add", "10.0.0.0/16", "dev", "lo")
        lab = Lab(world, prefix=prefix("d"))

        async def start() -> str:
            try:
                lab.up()
            except LabError as exc:
                return str(exc)
            return "started"

        message = run_in_netns(host, start)
    assert "refusing to start" in message and "10.0.0.0/16" in message
    assert not netns_exists(lab.vantage)


def test_prefix_is_checked() -> None:
    with pytest.raises(LabError, match="lowercase"):
        check_prefix("Bad-Name")
    with pytest.raises(LabError, match="lowercase"):
        Lab(build_world(scale=0.1), prefix="x" * 20)


def cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True,
                          text=True, timeout=120, **kw)


def test_lab_up_status_down_commands() -> None:
    name = prefix("e")
    try:
        up = cli("lab", "up", "--prefix", name, "--scale", "0.1")
        assert up.returncode == 0, up.stderr
        assert f"ip netns exec {name}-vantage shutdown-monitor run" in up.stdout
        status = json.loads(cli("lab", "status", "--prefix", name, "--json").stdout)
        assert status["up"] is True
        assert all(e["escaped_packets"] == 0 for e in status["namespaces"].values())
        again = cli("lab", "up", "--prefix", name, "--scale", "0.1")
        assert again.returncode != 0 and "exists already" in again.stderr
    finally:
        down = cli("lab", "down", "--prefix", name)
    assert down.returncode == 0 and "namespace" in down.stdout
    assert not netns_exists(f"{name}-vantage") and not netns_exists(f"{name}-world")
    assert json.loads(cli("lab", "status", "--prefix", name, "--json").stdout)["up"] is False
    assert "no lab" in cli("lab", "down", "--prefix", name).stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_lab_run_interrupted_leaves_nothing_behind(signum: int, tmp_path: Path) -> None:
    name = prefix("f" if signum == signal.SIGINT else "g")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "lab", "run", "long-shutdown", "--compressed",
         "--prefix", name, "--scale", "0.1", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "history.sqlite").exists():  # the daemon is running in the lab
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the lab run did not start"
            time.sleep(0.1)
        time.sleep(1.0)
        assert netns_exists(f"{name}-vantage")
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cli("lab", "down", "--prefix", name)  # only matters if the test is failing
    assert proc.returncode != 0
    assert not netns_exists(f"{name}-vantage") and not netns_exists(f"{name}-world")
    assert not LabNames(name).state_dir.exists()


def test_down_cleans_up_after_a_killed_run(tmp_path: Path) -> None:
    """SIGKILL cannot be caught: `lab down` is the way back, and removes everything."""
    name = prefix("h")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "lab", "run", "long-shutdown", "--compressed",
         "--prefix", name, "--scale", "0.1", "--workdir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (tmp_path / "history.sqlite").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert netns_exists(f"{name}-world")
    down = cli("lab", "down", "--prefix", name)
    assert down.returncode == 0
    assert not netns_exists(f"{name}-vantage") and not netns_exists(f"{name}-world")
    pids = subprocess.run(["pgrep", "-f", f"monitor.lab.responders.*{name}"],
                          capture_output=True, text=True).stdout.split()
    assert pids == []
