"""Every scenario, compressed, through the real daemon in the lab: the expected incident kind,
on time, and silence in the control countries.

The labs run side by side (two at a time, each in its own namespaces): a round mostly waits
for probe timeouts, so this costs little more CPU than one after the other and far less time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from monitor.lab.runner import run_scenario
from monitor.lab.scenarios import get_scenario
from monitor.lab.topology import netns_exists
from monitor.lab.world import build_world
from tests.netns import needs_root

pytestmark = [needs_root, pytest.mark.slow]

EXPECTED_KIND = {
    "nationwide-shutdown": "nationwide_shutdown",
    "network-outage": "network_outage",
    "throttling": "throttling",
    "http-block": "service_block",
    "dns-tamper": "service_block",
    "vantage-offline": "vantage_offline",
    "flapping": "nationwide_shutdown",
    "long-shutdown": "nationwide_shutdown",
}


def prefix_of(name: str) -> str:
    return f"s{name.replace('-', '')[:6]}{os.getpid() % 10000}"


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Future[Any]]]:
    world = build_world()
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(run_scenario, get_scenario(name, compressed=True), world,
                              Path(scratch) / name, prefix=prefix_of(name))
            # The longest first, so the pool finishes together.
            for name in sorted(EXPECTED_KIND, key=lambda n: -get_scenario(n, True).rounds)
        }
        yield futures


def explain(result: Any) -> str:
    lines = [f"{'ok' if c.ok else 'FAIL'}: {c.message}" for c in result.checks]
    lines += [f"  {i['kind']} {i['country']} {i['scope']}/{i['entity']} {i['start']}..{i['end']}"
              f" min {i['min_level']} {i['signals']}" for i in result.incidents]
    return "\n".join(lines)


@pytest.mark.parametrize("name", sorted(EXPECTED_KIND))
def test_scenario(name: str, runs: dict[str, Future[Any]]) -> None:
    scenario = get_scenario(name, compressed=True)
    prefix = prefix_of(name)
    result = runs[name].result(timeout=900)
    assert result.rounds == scenario.rounds
    assert result.ok, explain(result)
    assert EXPECTED_KIND[name] in {i["kind"] for i in result.incidents}, explain(result)
    if name == "vantage-offline":
        # The vantage's own outage is never reported as a country's.
        assert {i["country"] for i in result.incidents} == {"ZZ"}, explain(result)
    assert not netns_exists(f"{prefix}-vantage") and not netns_exists(f"{prefix}-world")
