"""`shutdown-monitor run` as a process inside a namespace: signals, timing, exit status.

The process is started with `ip netns exec`, so its probes, its API and everything it opens live
in the test's namespace (see test_daemon.py for the lab). The test talks to the API from a thread
that joined the same namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from monitor.history import HistoryStore
from tests.monitor.test_daemon import KZ, Lab, make_lab, metric
from tests.netns import needs_root, run_in_netns

API = "http://127.0.0.1:9310"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with make_lab(tmp_path) as made:
        yield made


def start(lab: Lab, *args: str) -> subprocess.Popen[str]:
    command = ["ip", "netns", "exec", lab.ns.name, sys.executable, "-m", "monitor", "-v", "run",
               "--config", str(lab.config_path), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])


def fetch(lab: Lab, path: str) -> tuple[int, str]:
    """GET from inside the namespace; (0, error) while nothing listens yet."""

    async def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(API + path, timeout=5) as response:  # noqa: ASYNC210
                return int(response.status), response.read().decode()
        except OSError as exc:
            return 0, str(exc)

    return run_in_netns(lab.ns, get, timeout=10)


def wait_until(what: str, check: Callable[[], bool], within_s: float = 60.0) -> None:
    # generous: a daemon starting on a loaded 2-core machine can take half a minute
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def metrics_value(lab: Lab, name: str) -> float:
    code, text = fetch(lab, "/metrics")
    assert code == 200, text
    return metric(text, name)


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=15)
    return process.returncode, err


@needs_root
def test_sigterm_mid_round_exits_0_within_10_s_and_stores_nothing_partial(lab: Lab) -> None:
    # Long probe timeouts and a dropped country: the first round takes far longer than 10 s.
    lab.probing = {"timeout_s": 8, "reprobes": 2}
    lab.write_config()
    lab.drop(KZ)
    process = start(lab, "--virtual-time", "2022-01-03T00:00:00Z")
    try:
        wait_until("the API", lambda: fetch(lab, "/healthz")[0] == 200)
        time.sleep(1.0)  # the first round is under way
        assert process.poll() is None
        began = time.monotonic()
        code, err = finish(process)
        elapsed = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert code == 0, err
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert "abandoned on stop" in err and "shutdown-monitor stopped" in err
    with HistoryStore(lab.history_path) as store:
        assert store.read_frame().empty  # the partial round was not stored


@needs_root
def test_sighup_with_a_broken_config_keeps_the_old_one_running(lab: Lab) -> None:
    config = lab.config_data()
    config["interval_s"] = 1  # real time, short rounds
    lab.config_path.write_text(yaml.safe_dump(config))
    process = start(lab)
    try:
        wait_until("a first round", lambda: fetch(lab, "/metrics")[0] == 200
                   and metrics_value(lab, "shutdown_monitor_rounds_total") >= 1)
        assert metrics_value(lab, "shutdown_monitor_config_reload_errors_total") == 0
        assert metrics_value(lab, "shutdown_monitor_config_last_reload_success") == 1  # startup

        lab.config_path.write_text(yaml.safe_dump({**config, "interval_s": "ten", "bogus": 1}))
        process.send_signal(signal.SIGHUP)
        wait_until("the reload error metric", lambda: metrics_value(
            lab, "shutdown_monitor_config_reload_errors_total") == 1)
        assert metrics_value(lab, "shutdown_monitor_config_last_reload_success") == 0
        status = json.loads(fetch(lab, "/api/status")[1])
        assert "interval_s" in status["config"]["last_reload_error"]
        assert "bogus" in status["config"]["last_reload_error"]
        assert status["round"]["interval_s"] == 1  # the old configuration runs on
        rounds = metrics_value(lab, "shutdown_monitor_rounds_total")
        wait_until("more rounds", lambda: metrics_value(
            lab, "shutdown_monitor_rounds_total") > rounds)
        assert process.poll() is None

        lab.config_path.write_text(yaml.safe_dump({**config, "interval_s": 2}))
        process.send_signal(signal.SIGHUP)
        wait_until("the new interval", lambda: json.loads(
            fetch(lab, "/api/status")[1])["round"]["interval_s"] == 2)
        assert metrics_value(lab, "shutdown_monitor_config_last_reload_success") == 1
        assert metrics_value(lab, "shutdown_monitor_config_reload_errors_total") == 1
        code, err = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert code == 0, err
    assert "reload of" in err and "failed; the running configuration stays" in err
    assert "configuration reloaded" in err


@needs_root
def test_virtual_time_rounds_then_exit(lab: Lab) -> None:
    process = start(lab, "--virtual-time", "2022-01-03T00:00:00Z", "--rounds", "3")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    with HistoryStore(lab.history_path) as store:
        frame = store.read_frame(country="UZ", signals=["icmp_blocks_up"], scope="country")
    assert [t.isoformat() for t in frame["time"]] == [
        "2022-01-03T00:00:00+00:00", "2022-01-03T00:05:00+00:00", "2022-01-03T00:10:00+00:00"]
    assert list(frame["value"]) == [8.0, 8.0, 8.0]


def test_bad_config_is_a_clear_error_and_nonzero_exit(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("interval_s: ten\n")
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode != 0
    assert f"{path}: interval_s: expected" in result.stderr
