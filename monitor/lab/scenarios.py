"""Scenarios: small declarative timelines of what happens to the lab's world, and what the
monitor is expected to say about it.

A scenario is a start instant, a round interval, a number of rounds and a list of `Event`s
(cut a share of some networks' blocks, throttle them, RST their HTTP, make their resolvers lie,
cut the vantage's uplink), each over a span of lab time. `conditions_at` turns that into the
`Conditions` of one instant (with the diurnal churn on top); `evaluate` compares the incidents
of a run with the scenario's `Expect`ations. Every scenario has a full form (`lab run`) and a
compressed one (`compressed=True`: hour-long rounds or a short history, for the tests).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from monitor.detect import (
    KIND_NATIONWIDE,
    KIND_NETWORK,
    KIND_SERVICE,
    KIND_THROTTLING,
    KIND_VANTAGE,
    parse_time,
)
from monitor.lab.conditions import Conditions, Throttle, churn_at, pick
from monitor.lab.world import DNS_OCTET, World

CUT: Final = "cut"
THROTTLE: Final = "throttle"
HTTP_BLOCK: Final = "http_block"
DNS_TAMPER: Final = "dns_tamper"
UPLINK_DOWN: Final = "uplink_down"
ACTIONS: Final = (CUT, THROTTLE, HTTP_BLOCK, DNS_TAMPER, UPLINK_DOWN)


@dataclass(frozen=True, slots=True)
class Select:
    """Networks of one country: all of them, or those with the given ASNs or kinds."""

    country: str
    asns: tuple[int | None, ...] = ()
    kinds: tuple[str, ...] = ()

    def networks(self, world: World) -> list[Any]:
        country = world.country(self.country)
        chosen = [n for n in country.networks
                  if (not self.asns or n.asn in self.asns)
                  and (not self.kinds or n.kind in self.kinds)]
        if not chosen:
            raise KeyError(f"{self}: selects no lab network")
        return chosen


@dataclass(frozen=True, slots=True)
class Event:
    action: str
    start: datetime
    end: datetime | None  # None: until the end of the run
    where: Select | None = None
    share: float = 1.0  # for `cut`: the share of the selected blocks that goes dark
    throttle: Throttle | None = None

    def active(self, when: datetime) -> bool:
        return self.start <= when and (self.end is None or when < self.end)


@dataclass(frozen=True, slots=True)
class Expect:
    """An incident the run must produce. Times within `tolerance_rounds` rounds."""

    kinds: tuple[str, ...]
    country: str
    scope: str | None = None
    entities: tuple[str, ...] = ()
    onset: datetime | None = None
    end: datetime | None = None
    max_min_level: float | None = None
    min_recoveries: int = 0
    tolerance_rounds: int = 2
    what: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    start: datetime
    interval_s: int
    rounds: int
    events: tuple[Event, ...]
    expect: tuple[Expect, ...]
    quiet: tuple[str, ...]  # countries that must have no incident at all
    churn: bool = True
    notes: tuple[str, ...] = field(default=())
    # Re-probes per silent block and round. One keeps lab rounds fast; loss only shows (as
    # icmp_loss) where blocks have re-probes to stay up with, so throttling uses three.
    reprobes: int = 1

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.interval_s * self.rounds)

    def conditions_at(self, world: World, when: datetime) -> Conditions:
        cut: set[int] = set()
        http: set[int] = set()
        dns: set[str] = set()
        throttled: list[ipaddress.IPv4Network] = []
        throttle: Throttle | None = None
        uplink_up = True
        for event in self.events:
            if not event.active(when):
                continue
            nets = event.where.networks(world) if event.where is not None else []
            if event.action == CUT:
                for net in nets:
                    cut |= pick(net.blocks, event.share, f"cut:{net.lab_net}")
            elif event.action == HTTP_BLOCK:
                http |= {b for n in nets for b in n.blocks}
            elif event.action == DNS_TAMPER:
                dns |= {n.address(DNS_OCTET) for n in nets}
            elif event.action == THROTTLE:
                throttled += [n.lab_net for n in nets]
                throttle = event.throttle
            elif event.action == UPLINK_DOWN:
                uplink_up = False
        churn = churn_at(world, when) if self.churn else frozenset()
        return Conditions(cut=frozenset(cut), churn=churn, http_blocked=frozenset(http),
                          dns_tampered=frozenset(dns), throttled=tuple(throttled),
                          throttle=throttle, uplink_up=uplink_up)


# -- the scenarios ------------------------------------------------------------------------------

GENERIC_START: Final = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday; any instant would do
KZ_ALL: Final = Select("KZ")
CONTROL_COUNTRIES: Final = ("KG", "UZ", "NL")


@dataclass(frozen=True, slots=True)
class Timing:
    interval_s: int
    history_h: float  # normal lab time before the event
    event_h: float
    after_h: float

    def at(self, hours: float) -> datetime:
        return GENERIC_START + timedelta(hours=self.history_h + hours)

    def rounds(self, total_h: float) -> int:
        return round(total_h * 3600 / self.interval_s)


FULL: Final = Timing(interval_s=300, history_h=48, event_h=4, after_h=3)
COMPRESSED: Final = Timing(interval_s=1800, history_h=26, event_h=4, after_h=3)


def _single(name: str, description: str, timing: Timing, events: list[Event],
            expect: list[Expect], quiet: Iterable[str] = CONTROL_COUNTRIES,
            reprobes: int = 1) -> Scenario:
    total = timing.history_h + timing.event_h + timing.after_h
    return Scenario(name, description, GENERIC_START, timing.interval_s, timing.rounds(total),
                    tuple(events), tuple(expect), tuple(quiet), reprobes=reprobes)


def nationwide_shutdown(compressed: bool = False) -> Scenario:
    t = COMPRESSED if compressed else FULL
    on, off = t.at(0), t.at(t.event_h)
    return _single("nationwide-shutdown", "KZ cut to about 3% of its blocks (nft drop)", t,
                   [Event(CUT, on, off, KZ_ALL, share=0.97)],
                   [Expect((KIND_NATIONWIDE,), "KZ", "country", onset=on, end=off,
                           max_min_level=0.10)])


def network_outage(compressed: bool = False) -> Scenario:
    t = COMPRESSED if compressed else FULL
    on, off = t.at(0), t.at(t.event_h)
    return _single("network-outage", "Kcell (AS29355) alone goes dark; the rest of KZ holds", t,
                   [Event(CUT, on, off, Select("KZ", asns=(29355,)))],
                   [Expect((KIND_NETWORK,), "KZ", "asn", ("29355",), onset=on, end=off)])


def throttling(compressed: bool = False) -> Scenario:
    t = COMPRESSED if compressed else FULL
    on, off = t.at(0), t.at(t.event_h)
    return _single("throttling", "all KZ networks: half the probes lost, replies shaped to "
                   "1 Mbit/s (queueing delay); probed with 3 re-probes", t,
                   [Event(THROTTLE, on, off, KZ_ALL, throttle=Throttle(50, 1000))],
                   [Expect((KIND_THROTTLING,), "KZ", onset=on, end=off)], reprobes=3)


def http_block(compressed: bool = False) -> Scenario:
    t = COMPRESSED if compressed else FULL
    on, off = t.at(0), t.at(t.event_h)
    return _single("http-block", "TCP RSTs on ports 80 and 443 for every KZ address", t,
                   [Event(HTTP_BLOCK, on, off, KZ_ALL)],
                   [Expect((KIND_SERVICE,), "KZ", onset=on, end=off)])


def dns_tamper(compressed: bool = False) -> Scenario:
    t = COMPRESSED if compressed else FULL
    on, off = t.at(0), t.at(t.event_h)
    return _single("dns-tamper", "every KZ resolver answers with a wrong address", t,
                   [Event(DNS_TAMPER, on, off, KZ_ALL)],
                   [Expect((KIND_SERVICE,), "KZ", onset=on, end=off)])


def vantage_offline(compressed: bool = False) -> Scenario:
    t = COMPRESSED if compressed else FULL
    on, off = t.at(0), t.at(t.event_h)
    return _single("vantage-offline", "the vantage's uplink carries nothing: every country and "
                   "the control targets abroad go silent at once", t,
                   [Event(UPLINK_DOWN, on, off)],
                   [Expect((KIND_VANTAGE,), "ZZ", "vantage", onset=on, end=off,
                           tolerance_rounds=1)],
                   quiet=("KZ", *CONTROL_COUNTRIES))


def flapping(compressed: bool = False) -> Scenario:
    # Compressed: 15-minute rounds, so an hour-long flap is still four rounds.
    t = Timing(900, COMPRESSED.history_h, 0, 2) if compressed else FULL
    step = 1.0  # hours on, 0.75 h off: recoveries shorter than the detector's merge window
    events = [Event(CUT, t.at(i * (step + 0.75)), t.at(i * (step + 0.75) + step), KZ_ALL,
                    share=0.97) for i in range(3)]
    span = 3 * step + 2 * 0.75
    timing = Timing(t.interval_s, t.history_h, span, t.after_h)
    return _single("flapping", "KZ cut three times for an hour, back for 45 minutes between",
                   timing, events,
                   [Expect((KIND_NATIONWIDE,), "KZ", "country", onset=t.at(0), end=t.at(span),
                           max_min_level=0.10, min_recoveries=2,
                           what="one incident with the flaps merged")])


def long_shutdown(compressed: bool = False) -> Scenario:
    # Full: 30 days at 15-minute rounds. Compressed: 3 days at hourly rounds (the property under
    # test, that a long shutdown never becomes the detector's new normal, shows within days).
    t = (Timing(interval_s=3600, history_h=26, event_h=3 * 24, after_h=4) if compressed
         else Timing(interval_s=900, history_h=48, event_h=30 * 24, after_h=6))
    on, off = t.at(0), t.at(t.event_h)
    return _single("long-shutdown", f"KZ cut for {t.event_h / 24:g} days", t,
                   [Event(CUT, on, off, KZ_ALL, share=0.97)],
                   [Expect((KIND_NATIONWIDE,), "KZ", "country", onset=on, end=off,
                           max_min_level=0.10)])


def kz_2022(compressed: bool = False) -> Scenario:
    """Kazakhstan, January 2022 (times UTC, ../shared/data/README.md)."""
    def at(text: str) -> datetime:
        return parse_time(text)

    mobile = Select("KZ", kinds=("mobile",))
    kcell_tele2 = Select("KZ", asns=(29355, 48503))
    shutdown_on, restored = at("2022-01-05T10:30:00Z"), at("2022-01-11T02:15:00Z")
    dc_back = at("2022-01-07T00:00:00Z")
    restorations = [(at("2022-01-05T19:00:00Z"), at("2022-01-05T22:00:00Z")),
                    (at("2022-01-06T12:00:00Z"), at("2022-01-06T15:00:00Z"))]
    events = [
        # 4 Jan 14:30: mobile networks throttled, and Kcell/Tele2 partly cut.
        Event(THROTTLE, at("2022-01-04T14:30:00Z"), shutdown_on, mobile,
              throttle=Throttle(45, 1000)),
        Event(CUT, at("2022-01-04T14:30:00Z"), shutdown_on, kcell_tele2, share=0.6),
    ]
    # 5 Jan 10:30: everything down to about 5%, except during the two restorations; from 7 Jan
    # the data-centre networks are back while end-user and mobile networks stay cut.
    spans = [(shutdown_on, restorations[0][0]), (restorations[0][1], restorations[1][0]),
             (restorations[1][1], dc_back)]
    events += [Event(CUT, a, b, KZ_ALL, share=0.95) for a, b in spans]
    events.append(Event(CUT, dc_back, restored, Select("KZ", kinds=("end-user", "mobile")),
                        share=0.95))
    start = at("2021-12-28T12:00:00Z")  # 7 days 2.5 h of normal history before 4 Jan 14:30
    end = at("2022-01-11T12:00:00Z")
    interval = 300
    notes: tuple[str, ...] = ()
    if compressed:
        # Tests: 30-minute rounds and 36 h of history; the same timeline.
        interval, start = 1800, at("2022-01-03T02:30:00Z")
        notes = ("compressed: 30-minute rounds, 36 h of history before 4 Jan 14:30",)
    rounds = int((end - start).total_seconds() // interval)
    tolerance = 2
    return Scenario(
        "kz-2022",
        "Kazakhstan, 4-11 January 2022: mobile throttling, nationwide shutdown to ~5% with two "
        "3 h restorations, data centres back on 7 Jan, all back 11 Jan 02:15",
        start, interval, rounds, tuple(events),
        (
            Expect((KIND_THROTTLING, KIND_NETWORK), "KZ", None, ("29355", "48503", "21299",
                   "35104", "KZ"), onset=at("2022-01-04T14:30:00Z"), tolerance_rounds=6,
                   what="the mobile networks on 4 Jan"),
            Expect((KIND_NATIONWIDE,), "KZ", "country", onset=shutdown_on, end=restored,
                   max_min_level=0.10, min_recoveries=2, tolerance_rounds=tolerance,
                   what="the nationwide shutdown, restorations merged"),
        ),
        CONTROL_COUNTRIES,
        notes=notes,
    )


SCENARIOS: Final[dict[str, Callable[[bool], Scenario]]] = {
    "nationwide-shutdown": nationwide_shutdown,
    "network-outage": network_outage,
    "throttling": throttling,
    "http-block": http_block,
    "dns-tamper": dns_tamper,
    "vantage-offline": vantage_offline,
    "flapping": flapping,
    "long-shutdown": long_shutdown,
    "kz-2022": kz_2022,
}


def get_scenario(name: str, compressed: bool = False) -> Scenario:
    try:
        return SCENARIOS[name](compressed)
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; the lab has: "
                       + ", ".join(SCENARIOS)) from None


# -- judging a run ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    message: str


def _matches(expect: Expect, incident: dict[str, Any]) -> bool:
    return (incident.get("kind") in expect.kinds and incident.get("country") == expect.country
            and (expect.scope is None or incident.get("scope") == expect.scope)
            and (not expect.entities or str(incident.get("entity")) in expect.entities))


def _rounds_off(actual: str | None, wanted: datetime, interval_s: int) -> float | None:
    if actual is None:
        return None
    return (parse_time(actual) - wanted).total_seconds() / interval_s


def evaluate(scenario: Scenario, incidents: list[dict[str, Any]]) -> list[Check]:
    """Each expectation met or not (with the numbers), and silence where silence is due."""
    checks: list[Check] = []
    for expect in scenario.expect:
        label = expect.what or f"{'/'.join(expect.kinds)} in {expect.country}"
        found = [i for i in incidents if _matches(expect, i)]
        if expect.onset is not None:
            found.sort(key=lambda i: abs(parse_time(i["start"]) - expect.onset)  # type: ignore
                       .total_seconds())
        if not found:
            seen = ", ".join(f"{i['kind']} {i['country']}/{i['entity']}" for i in incidents)
            checks.append(Check(False, f"{label}: no such incident (got: {seen or 'none'})"))
            continue
        best = found[0]
        problems: list[str] = []
        facts = [f"{best['kind']} {best['scope']}/{best['entity']} {best['start']} .. "
                 f"{best['end']}, min level {best['min_level']}"]
        if expect.onset is not None:
            off = _rounds_off(best["start"], expect.onset, scenario.interval_s)
            facts.append(f"onset {off:+.0f} rounds")
            if off is None or abs(off) > expect.tolerance_rounds:
                problems.append(f"onset not within {expect.tolerance_rounds} rounds")
        if expect.end is not None:
            off = _rounds_off(best["end"], expect.end, scenario.interval_s)
            facts.append("end: still open" if off is None else f"end {off:+.0f} rounds")
            if off is None or abs(off) > expect.tolerance_rounds:
                problems.append(f"end not within {expect.tolerance_rounds} rounds")
        if expect.max_min_level is not None and float(best["min_level"]) > expect.max_min_level:
            problems.append(f"min level above {expect.max_min_level}")
        recoveries = len(best.get("recoveries") or [])
        if expect.min_recoveries:
            facts.append(f"{recoveries} recoveries")
            if recoveries < expect.min_recoveries:
                problems.append(f"fewer than {expect.min_recoveries} recoveries")
        text = f"{label}: {'; '.join(facts)}"
        checks.append(Check(not problems, text + (f" -- {', '.join(problems)}" if problems
                                                  else "")))
    for code in scenario.quiet:
        noisy = [i for i in incidents if i.get("country") == code]
        checks.append(Check(not noisy, f"no incident in {code}" if not noisy else
                            f"{code}: unexpected {', '.join(i['kind'] for i in noisy)}"))
    return checks
