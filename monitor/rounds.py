"""One round: probe every target once (with re-probes), aggregate into series points.

Address space (ICMP, per /24 block): each block known to answer (in the hitlist) gets one probe
to its preferred address; a block that does not answer is re-probed on up to `reprobes` other
hitlist addresses (cycling when it has fewer) before it counts as down (Trinocular's lesson: one
lost packet must not look like an outage). Blocks with no known responsive address are not
counted; instead a few new candidate addresses of theirs are tried each round (discovery), and
an answer makes them count from the next round on. Named endpoints (TCP hosts, HTTP URLs, DNS
resolvers) and the control targets abroad are probed by their method, re-probed the same way.

Per-block state lives in flat bytearrays; each prober gets one lazy iterable per stage, so a
round over ~13,000 blocks creates no per-block task or object beyond the probe's Target.

`RoundOutcome.counts` holds one `TargetCount` per (country, ASN, method) with the unattributed
targets under `asn=None`: the country's total is the sum of its rows.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from monitor.hitlist import Hitlist
from monitor.series import SIGNAL_VANTAGE_UP, VANTAGE_COUNTRY, SeriesPoint
from monitor.targets import CountryUniverse, Endpoint, Universe, address_of
from probes.base import Failure, Prober, ProbeResult, Target
from probes.pacing import Pacer

log = logging.getLogger(__name__)

BLOCK_METHOD = "icmp"
# Signals: icmp_blocks_total/up for the address space; <method>_total/up for named endpoints;
# rtt_p50_seconds/rtt_p90_seconds for the blocks' ICMP, rtt_<method>_p50_seconds for the others;
# icmp_loss: the share of probes to blocks that were up which went unanswered (throttling shows
# as loss while the blocks, thanks to re-probes, stay up).
SIGNAL_BLOCKS_TOTAL = "icmp_blocks_total"
SIGNAL_BLOCKS_UP = "icmp_blocks_up"
SIGNAL_LOSS = "icmp_loss"

# Block states within a round.
_SILENT = 0  # not in the hitlist at round start: not counted
_PENDING = 1  # in the hitlist, no answer yet this round
_UP = 2
_EXCLUDED = 3  # its hitlist address is blocklisted now: not counted


@dataclass(frozen=True, slots=True)
class TargetCount:
    """How many targets (or /24 blocks) of one country/ASN/method were probed and answered."""

    country: str
    asn: int | None  # None: not attributed, or a country-level named endpoint
    method: str
    total: int
    up: int


@dataclass(slots=True)
class RoundOutcome:
    """Everything one round measured. Produced by `run_round`, consumed by export/history/detector.

    `time` is the round's timestamp from the injected clock (lab time in the lab), UTC, aligned to
    the round interval. `duration_s` is wall-clock seconds the round took.
    """

    time: datetime
    duration_s: float
    points: list[SeriesPoint] = field(default_factory=list)
    counts: list[TargetCount] = field(default_factory=list)
    # (method, result) -> probes sent this round; result is "success" or a Failure name.
    probes: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (country, method) -> RTTs in seconds of the answers this round (for the histogram).
    rtts: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    # Vantage self-check against the control targets abroad.
    control_total: int = 0
    control_up: int = 0
    vantage_up: bool = True
    abandoned: bool = False  # SIGTERM arrived mid-round: the points are partial and not stored


@dataclass(frozen=True, slots=True)
class RoundSettings:
    """How hard a round tries. Mirrors the `probing` section of the config."""

    reprobes: int = 3
    discovery_per_round: int = 2
    discovery_budget: int = 24


def answered(result: ProbeResult) -> bool:
    """Did the target answer? Reachability for ICMP/TCP (an RST proves the host is there),
    success for HTTP and DNS (a wrong DNS answer or a blocked page is not service)."""
    if result.method in ("http", "dns"):
        return result.success
    return result.reachable


def result_name(result: ProbeResult) -> str:
    if result.success:
        return "success"
    return str(result.failure) if result.failure is not None else str(Failure.OTHER)


class _Tally:
    """What the stages of one round accumulate for the outcome."""

    def __init__(self) -> None:
        self.probes: Counter[tuple[str, str]] = Counter()
        self.rtts: dict[tuple[str, str], list[float]] = {}

    def add(self, country: str, result: ProbeResult, ok: bool) -> None:
        self.probes[(result.method, result_name(result))] += 1
        if ok and result.rtt_s is not None:
            self.rtts.setdefault((country, result.method), []).append(result.rtt_s)


def _address_int(address: str) -> int:
    return int.from_bytes(socket.inet_aton(address), "big")


class _BlockRound:
    """The address-space part of one country's round: stages of ICMP probes over its blocks."""

    def __init__(
        self, country: CountryUniverse, hitlist: Hitlist, settings: RoundSettings, tally: _Tally
    ) -> None:
        self.country = country
        self.hitlist = hitlist
        self.settings = settings
        self.tally = tally
        self.state = bytearray(len(country.blocks))
        self.sent = bytearray(len(country.blocks))  # probes to the block's hitlist addresses
        self.attempt = 0  # the stage being probed: 0 = first probe, then re-probes

    def first_stage(self) -> Iterator[Target]:
        """Every known block's preferred address; a few discovery candidates of silent ones."""
        blocks, hitlist, state = self.country.blocks, self.hitlist, self.state
        per_round, budget = self.settings.discovery_per_round, self.settings.discovery_budget
        for index, block in enumerate(blocks):
            octets = hitlist.responsive(block)
            if octets:
                state[index] = _PENDING
                yield Target(address_of(block, octets[0]))
            elif per_round:
                for octet in hitlist.next_candidates(block, per_round, budget):
                    yield Target(address_of(block, octet))

    def reprobe_stage(self, attempt: int) -> Iterator[Target]:
        """The next hitlist address of every block still pending."""
        blocks, hitlist, state = self.country.blocks, self.hitlist, self.state
        for index in range(len(state)):
            if state[index] == _PENDING:
                block = blocks[index]
                octets = hitlist.responsive(block)
                if octets:
                    yield Target(address_of(block, octets[attempt % len(octets)]))

    def pending(self) -> int:
        return self.state.count(_PENDING)

    def on_result(self, result: ProbeResult) -> None:
        try:
            address = _address_int(result.target.address)
        except OSError:
            log.warning("round: result for a non-IPv4 target %s ignored", result.target)
            return
        block, octet = address >> 8, address & 255
        blocks = self.country.blocks
        index = bisect.bisect_left(blocks, block)
        if index >= len(blocks) or blocks[index] != block:
            return
        ok = answered(result)
        self.tally.add(self.country.code, result, ok)
        if result.failure is Failure.BLOCKED_BY_POLICY:
            if self.state[index] == _PENDING:
                self.state[index] = _EXCLUDED
            return
        self.hitlist.record(block, octet, ok)
        if self.state[index] != _SILENT:
            self.sent[index] = min(255, self.sent[index] + 1)
        if ok and self.state[index] == _PENDING:
            self.state[index] = _UP
            if self.attempt:
                self.hitlist.promote(block, octet)

    async def run(self, prober: Prober, pacer: Pacer) -> None:
        await prober.probe_many(self.first_stage(), pacer, self.on_result)
        for attempt in range(1, self.settings.reprobes + 1):
            if not self.pending():
                break
            self.attempt = attempt
            await prober.probe_many(
                self.reprobe_stage(attempt), pacer, self.on_result
            )

    def loss_points(self, now: datetime) -> list[SeriesPoint]:
        """icmp_loss per country and ASN: unanswered share of the probes to blocks that were up."""
        by_asn: dict[int, list[int]] = {}
        for state, sent, asn in zip(self.state, self.sent, self.country.block_asns, strict=True):
            if state == _UP and sent:
                entry = by_asn.get(asn)
                if entry is None:
                    entry = by_asn[asn] = [0, 0]
                entry[0] += sent - 1  # every probe before the answer was lost
                entry[1] += sent
        code = self.country.code
        lost = sum(e[0] for e in by_asn.values())
        sent_total = sum(e[1] for e in by_asn.values())
        if not sent_total:
            return []
        points = [SeriesPoint(now, code, "country", code, SIGNAL_LOSS, lost / sent_total)]
        for asn, (asn_lost, asn_sent) in sorted(by_asn.items()):
            if asn:
                points.append(
                    SeriesPoint(now, code, "asn", str(asn), SIGNAL_LOSS, asn_lost / asn_sent)
                )
        return points

    def counts(self) -> list[TargetCount]:
        """(asn -> total, up) over the blocks known at round start; asn 0 -> None."""
        totals: dict[int, list[int]] = {}
        for state, asn in zip(self.state, self.country.block_asns, strict=True):
            if state in (_PENDING, _UP):
                entry = totals.get(asn)
                if entry is None:
                    entry = totals[asn] = [0, 0]
                entry[0] += 1
                if state == _UP:
                    entry[1] += 1
        rows = [
            TargetCount(self.country.code, asn or None, BLOCK_METHOD, total, up)
            for asn, (total, up) in sorted(totals.items())
        ]
        if not rows:  # nothing known yet: still say so, as an empty country row
            rows.append(TargetCount(self.country.code, None, BLOCK_METHOD, 0, 0))
        return rows


class _EndpointRound:
    """Named endpoints of one method (of one country, or the control targets)."""

    def __init__(self, endpoints: Sequence[Endpoint], reprobes: int, tally: _Tally) -> None:
        self.endpoints = list(dict.fromkeys(endpoints))
        self.reprobes = reprobes
        self.tally = tally
        self.index: dict[Target, int] = {e.target: i for i, e in enumerate(self.endpoints)}
        self.state = bytearray([_PENDING]) * len(self.endpoints)  # then _UP or _EXCLUDED

    def on_result(self, result: ProbeResult) -> None:
        index = self.index.get(result.target)
        if index is None:
            return
        ok = answered(result)
        self.tally.add(self.endpoints[index].country, result, ok)
        if result.failure is Failure.BLOCKED_BY_POLICY:
            self.state[index] = _EXCLUDED
        elif ok:
            self.state[index] = _UP

    def _pending_targets(self) -> Iterator[Target]:
        for index, endpoint in enumerate(self.endpoints):
            if self.state[index] == _PENDING:
                yield endpoint.target

    async def run(self, prober: Prober, pacer: Pacer) -> None:
        for attempt in range(self.reprobes + 1):
            if attempt and _PENDING not in self.state:
                break
            await prober.probe_many(
                self._pending_targets(), pacer, self.on_result
            )

    def counted(self) -> Iterator[tuple[Endpoint, bool]]:
        for endpoint, state in zip(self.endpoints, self.state, strict=True):
            if state != _EXCLUDED:
                yield endpoint, state == _UP


async def run_round(
    universe: Universe,
    probers: Mapping[str, Prober],
    pacer: Pacer,
    now: datetime,
    *,
    hitlists: MutableMapping[str, Hitlist],
    vantage: str = "local",
    settings: RoundSettings | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> RoundOutcome:
    """Probe the whole universe once and turn the answers into series points at time `now`.

    `probers` maps a method ("icmp", "tcp", "http", "dns") to its prober; a method without one is
    skipped (logged). `hitlists` maps a country code to its Hitlist, which the round reads and
    teaches (a missing one is created empty); saving them is the caller's job. `pacer` is the
    probes.pacing.Pacer all probers share. Cancelling the task stops every prober at once
    (CancelledError propagates; what the round learnt so far stays in the hitlists).
    """
    settings = settings or RoundSettings()
    started = monotonic()
    tally = _Tally()
    block_rounds: list[_BlockRound] = []
    endpoint_rounds: list[tuple[str, _EndpointRound]] = []
    missing: set[str] = set()

    def prober_for(method: str) -> Prober | None:
        prober = probers.get(method)
        if prober is None and method not in missing:
            missing.add(method)
            log.warning("round: no %s prober configured: %s targets skipped", method, method)
        return prober

    jobs: list[tuple[Prober, _BlockRound | _EndpointRound]] = []
    for country in universe.countries:
        if BLOCK_METHOD in country.methods and len(country.blocks):
            prober = prober_for(BLOCK_METHOD)
            if prober is not None:
                hitlist = hitlists.get(country.code)
                if hitlist is None:
                    hitlist = hitlists[country.code] = Hitlist()
                block_round = _BlockRound(country, hitlist, settings, tally)
                block_rounds.append(block_round)
                jobs.append((prober, block_round))
        by_method: dict[str, list[Endpoint]] = {}
        for endpoint in country.endpoints:
            if endpoint.method in country.methods:
                by_method.setdefault(endpoint.method, []).append(endpoint)
        for method, endpoints in by_method.items():
            prober = prober_for(method)
            if prober is not None:
                endpoint_round = _EndpointRound(endpoints, settings.reprobes, tally)
                endpoint_rounds.append((country.code, endpoint_round))
                jobs.append((prober, endpoint_round))
    control_rounds: list[_EndpointRound] = []
    control_by_method: dict[str, list[Endpoint]] = {}
    for endpoint in universe.control:
        control_by_method.setdefault(endpoint.method, []).append(endpoint)
    for method, endpoints in control_by_method.items():
        prober = prober_for(method)
        if prober is not None:
            control_round = _EndpointRound(endpoints, settings.reprobes, tally)
            control_rounds.append(control_round)
            jobs.append((prober, control_round))

    failed: set[int] = set()  # ids of jobs whose prober raised: their counts would lie

    async def run_job(prober: Prober, job: _BlockRound | _EndpointRound) -> None:
        try:
            await job.run(prober, pacer)
        except Exception:
            # One broken prober must not cost the other methods their round; its own targets
            # are left out (not counted as down).
            failed.add(id(job))
            log.exception("round: the %s prober failed; its targets are not counted", prober.method)

    async with asyncio.TaskGroup() as group:
        for prober, job in jobs:
            group.create_task(run_job(prober, job))
    block_rounds = [job for job in block_rounds if id(job) not in failed]
    endpoint_rounds = [(code, job) for code, job in endpoint_rounds if id(job) not in failed]
    control_rounds = [job for job in control_rounds if id(job) not in failed]

    outcome = RoundOutcome(time=now, duration_s=0.0, probes=tally.probes, rtts=tally.rtts)
    for block_round in block_rounds:
        outcome.counts.extend(block_round.counts())
    for code, endpoint_round in endpoint_rounds:
        outcome.counts.extend(_endpoint_counts(code, endpoint_round))
    outcome.counts.sort(key=lambda c: (c.country, c.method, c.asn or 0))
    outcome.points = _points(now, outcome.counts, tally.rtts)
    for block_round in block_rounds:
        outcome.points.extend(block_round.loss_points(now))

    control = [up for job in control_rounds for _, up in job.counted()]
    outcome.control_total, outcome.control_up = len(control), sum(control)
    if control:
        fraction = outcome.control_up / outcome.control_total
        outcome.vantage_up = fraction >= universe.min_control_up_fraction
        outcome.points.append(
            SeriesPoint(now, VANTAGE_COUNTRY, "vantage", vantage, SIGNAL_VANTAGE_UP, fraction)
        )
    outcome.duration_s = monotonic() - started
    return outcome


def _endpoint_counts(code: str, job: _EndpointRound) -> list[TargetCount]:
    totals: dict[tuple[str, int | None], list[int]] = {}
    for endpoint, up in job.counted():
        entry = totals.setdefault((endpoint.method, endpoint.asn), [0, 0])
        entry[0] += 1
        entry[1] += int(up)
    return [
        TargetCount(code, asn, method, total, up)
        for (method, asn), (total, up) in totals.items()
    ]


def _signal_names(method: str) -> tuple[str, str]:
    if method == BLOCK_METHOD:
        return SIGNAL_BLOCKS_TOTAL, SIGNAL_BLOCKS_UP
    return f"{method}_total", f"{method}_up"


def rtt_signal(method: str, quantile: int) -> str:
    """rtt_p50_seconds for the blocks' ICMP, rtt_<method>_p50_seconds for other methods (the
    detector takes every signal starting with "rtt" as a latency)."""
    if method == BLOCK_METHOD:
        return f"rtt_p{quantile}_seconds"
    return f"rtt_{method}_p{quantile}_seconds"


def percentile(values: Sequence[float], quantile: float) -> float:
    """Nearest-rank percentile of unsorted values (quantile in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * quantile // 100))  # ceil
    return ordered[int(rank) - 1]


def _points(
    now: datetime, counts: Sequence[TargetCount], rtts: Mapping[tuple[str, str], list[float]]
) -> list[SeriesPoint]:
    points: list[SeriesPoint] = []
    country_totals: dict[tuple[str, str], list[int]] = {}
    for count in counts:
        entry = country_totals.setdefault((count.country, count.method), [0, 0])
        entry[0] += count.total
        entry[1] += count.up
        if count.asn is not None:
            total_name, up_name = _signal_names(count.method)
            entity = str(count.asn)
            points.append(SeriesPoint(now, count.country, "asn", entity, total_name, count.total))
            points.append(SeriesPoint(now, count.country, "asn", entity, up_name, count.up))
    for (code, method), (total, up) in sorted(country_totals.items()):
        total_name, up_name = _signal_names(method)
        points.append(SeriesPoint(now, code, "country", code, total_name, total))
        points.append(SeriesPoint(now, code, "country", code, up_name, up))
    for (code, method), values in sorted(rtts.items()):
        if code == VANTAGE_COUNTRY or not values:
            continue
        for quantile in (50, 90):
            value = percentile(values, quantile)
            points.append(
                SeriesPoint(now, code, "country", code, rtt_signal(method, quantile), value)
            )
    return points
