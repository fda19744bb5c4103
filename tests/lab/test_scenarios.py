"""Scenarios as timelines: the conditions of an instant, the churn, judging a run's incidents."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from monitor.lab.conditions import churn_at, night_share, ranges
from monitor.lab.scenarios import SCENARIOS, evaluate, get_scenario, kz_2022
from monitor.lab.world import DNS_OCTET, build_world


@pytest.fixture(scope="module")
def world() -> Any:
    return build_world()


def test_kz_2022_timeline(world: Any) -> None:
    s = kz_2022()
    kz = world.country("KZ")
    assert s.interval_s <= 300
    assert (s.expect[1].onset - s.start) >= timedelta(days=7)  # type: ignore[operator]
    mobile = {b for n in kz.networks if n.kind == "mobile" for b in n.blocks}

    def at(text: str) -> Any:
        from monitor.detect import parse_time
        return s.conditions_at(world, parse_time(text))

    quiet = at("2022-01-02T12:00:00Z")
    assert not quiet.cut and quiet.throttle is None and quiet.uplink_up
    jan4 = at("2022-01-04T15:00:00Z")
    assert jan4.throttle is not None and set(jan4.throttled) == {
        n.lab_net for n in kz.networks if n.kind == "mobile"}
    assert jan4.cut and jan4.cut <= mobile
    shutdown = at("2022-01-05T12:00:00Z")
    assert len(shutdown.cut) / len(kz.blocks()) == pytest.approx(0.95, abs=0.04)
    assert not at("2022-01-05T20:00:00Z").cut  # the first restoration
    assert not at("2022-01-06T13:00:00Z").cut  # the second
    jan8 = at("2022-01-08T12:00:00Z")
    assert not jan8.cut & set(kz.network(None).blocks)  # data centres back
    assert jan8.cut & set(kz.network(9198).blocks)
    assert not at("2022-01-11T03:00:00Z").cut
    # No control country is ever touched.
    controls = {b for c in world.countries if c.control for b in c.blocks()}
    for hours in range(0, s.rounds * s.interval_s // 3600, 7):
        assert not at_offset(s, world, hours).cut & controls


def at_offset(s: Any, world: Any, hours: int) -> Any:
    return s.conditions_at(world, s.start + timedelta(hours=hours))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_changes_the_world_only_during_its_events(name: str, world: Any) -> None:
    for compressed in (False, True):
        s = get_scenario(name, compressed)
        before = s.conditions_at(world, s.start + timedelta(hours=1))
        assert not (before.cut or before.http_blocked or before.dns_tampered or before.throttled)
        assert before.uplink_up
        during = [s.conditions_at(world, e.start) for e in s.events]
        assert all(c.cut or c.http_blocked or c.dns_tampered or c.throttled or not c.uplink_up
                   for c in during)
        last = s.end - timedelta(seconds=s.interval_s)
        after = s.conditions_at(world, last)
        assert not (after.cut or after.http_blocked or after.dns_tampered or after.throttled)


def test_dns_tamper_names_resolvers(world: Any) -> None:
    s = get_scenario("dns-tamper")
    c = s.conditions_at(world, s.events[0].start)
    assert c.dns_tampered == {n.address(DNS_OCTET) for n in world.country("KZ").networks}


def test_unknown_scenario_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="kz-2022"):
        get_scenario("nope")


def test_churn_is_diurnal_and_spares_servers(world: Any) -> None:
    assert night_share(4, 0.02, 0.1) == pytest.approx(0.12)
    assert night_share(16, 0.02, 0.1) == pytest.approx(0.02)
    s = get_scenario("nationwide-shutdown")
    kz = world.country("KZ")
    night = churn_at(world, s.start + timedelta(hours=22))  # 04:00 in KZ (UTC+6)
    day = churn_at(world, s.start + timedelta(hours=10))  # 16:00
    kz_blocks = set(kz.blocks())
    assert len(night & kz_blocks) > 2 * len(day & kz_blocks)
    assert not night & {n.first_block for n in world.networks()}


def test_ranges_collapse_blocks() -> None:
    assert ranges([0x0A0000, 0x0A0001, 0x0A0003]) == ["10.0.0.0/23", "10.0.3.0/24"]


def incident(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "x", "country": "KZ", "scope": "country", "entity": "KZ",
            "kind": "nationwide_shutdown", "severity": "critical", "start": "", "end": None,
            "min_level": 0.03, "score": 1.0, "signals": [], "networks": [], "recoveries": []}
    return {**base, **kw}


def test_evaluate_checks_kind_times_level_and_silence() -> None:
    s = get_scenario("nationwide-shutdown", compressed=True)
    on, off = s.events[0].start, s.events[0].end
    assert off is not None
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    step = timedelta(seconds=s.interval_s)
    good = incident(start=(on + step).strftime(fmt), end=off.strftime(fmt))
    assert all(c.ok for c in evaluate(s, [good]))
    late = incident(start=(on + 3 * step).strftime(fmt), end=off.strftime(fmt))
    bad = evaluate(s, [late])
    assert not bad[0].ok and "onset +3 rounds" in bad[0].message
    shallow = incident(start=on.strftime(fmt), end=off.strftime(fmt), min_level=0.4)
    assert "min level above" in evaluate(s, [shallow])[0].message
    still_open = incident(start=on.strftime(fmt), end=None)
    assert "still open" in evaluate(s, [still_open])[0].message
    noisy = evaluate(s, [good, incident(country="NL", entity="NL", start=on.strftime(fmt))])
    assert [c.ok for c in noisy] == [True, True, True, False]
    assert "no such incident" in evaluate(s, [])[0].message
