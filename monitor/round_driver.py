"""The daemon's round driver: a config turned into a universe, probers, a pacer and hitlists.

`ConfiguredRoundDriver(config, shard)` is the `RoundDriverFactory` monitor/daemon.py uses by
default. It builds everything once (a reload makes a new driver), runs `run_round` each time it
is asked, and saves the hitlists it teaches: after a round when they changed and the last save is
`save_every_s` old, and on close.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime

from monitor.config import Config
from monitor.hitlist import Hitlist
from monitor.rounds import BLOCK_METHOD, RoundOutcome, RoundSettings, run_round
from monitor.targets import Universe, load_universe
from probes.base import Prober

log = logging.getLogger(__name__)


def make_probers(config: Config, methods: set[str]) -> dict[str, Prober]:
    """One prober per method the universe needs, set up from the config."""
    timeout = config.probing.timeout_s
    probers: dict[str, Prober] = {}
    if "icmp" in methods:
        from probes.icmp_batch import IcmpBatchProber

        probers["icmp"] = IcmpBatchProber(timeout_s=timeout)
    if "tcp" in methods:
        from probes.tcp import TcpProber

        probers["tcp"] = TcpProber(ports=config.probing.tcp_ports, timeout_s=timeout)
    if "http" in methods:
        from probes.http import HttpProber

        probers["http"] = HttpProber(timeout_s=timeout, contact_url=config.contact_url)
    if "dns" in methods:
        from probes.dns import DnsProber

        probers["dns"] = DnsProber(timeout_s=timeout)
    return probers


def methods_of(universe: Universe) -> set[str]:
    needed: set[str] = set()
    for country in universe.countries:
        if BLOCK_METHOD in country.methods and len(country.blocks):
            needed.add(BLOCK_METHOD)
        needed.update(e.method for e in country.endpoints if e.method in country.methods)
    needed.update(e.method for e in universe.control)
    return needed


def round_settings(config: Config) -> RoundSettings:
    probing = config.probing
    return RoundSettings(
        reprobes=probing.reprobes,
        discovery_per_round=probing.discovery_per_round,
        discovery_budget=probing.discovery_budget,
    )


def open_hitlists(config: Config, universe: Universe) -> dict[str, Hitlist]:
    """Each country's hitlist file (`hitlist_dir/CC.csv`); an absent one starts empty."""
    return {c.code: Hitlist.load(config.hitlist_path(c.code)) for c in universe.countries}


class ConfiguredRoundDriver:
    """Runs the rounds a config describes. Raises InputError if a data file is unusable."""

    def __init__(
        self, config: Config, shard: tuple[int, int] | None = None, save_every_s: float = 600.0
    ) -> None:
        if shard != config.shard:
            config = dataclasses.replace(config, shard=shard)
        self.config = config
        self.universe = load_universe(config)
        self.pacer = config.pacing.pacer()
        self.probers = make_probers(config, methods_of(self.universe))
        self.hitlists = open_hitlists(config, self.universe)
        self.settings = round_settings(config)
        self.save_every_s = save_every_s
        self._last_save = time.monotonic()
        log.info(
            "universe: %s; %d blocks known responsive",
            ", ".join(f"{c.code} {len(c.blocks)} blocks" for c in self.universe.countries),
            sum(h.known_blocks() for h in self.hitlists.values()),
        )

    async def run(self, now: datetime) -> RoundOutcome:
        outcome = await run_round(
            self.universe,
            self.probers,
            self.pacer,
            now,
            hitlists=self.hitlists,
            vantage=self.config.vantage_name,
            settings=self.settings,
        )
        if time.monotonic() - self._last_save >= self.save_every_s:
            self.save_hitlists()
        return outcome

    def checkpoint(self) -> None:
        self.save_hitlists()

    def save_hitlists(self) -> None:
        """Write every changed hitlist (atomically); a failure is logged, not fatal."""
        self._last_save = time.monotonic()
        for code, hitlist in self.hitlists.items():
            if not hitlist.dirty:
                continue
            try:
                hitlist.save(self.config.hitlist_path(code))
            except OSError as exc:
                log.error("cannot save the %s hitlist: %s", code, exc)

    async def close(self) -> None:
        self.save_hitlists()
        for prober in self.probers.values():
            await prober.close()
