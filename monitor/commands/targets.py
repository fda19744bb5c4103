"""`shutdown-monitor targets list|discover`: show a country's universe, build its hitlist."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from monitor.config import Config, load_config, parse_shard
from monitor.errors import ConfigError, InputError
from monitor.hitlist import Hitlist, HitlistAppender, discover, discovery_done
from monitor.targets import CountryUniverse, address_of, block_network, load_universe
from probes import eventloop

CONFIG_OPTION = click.option(
    "--config", "config_path", default="config.yaml", show_default=True,
    type=click.Path(dir_okay=False, path_type=Path), help="Configuration file.",
)
COUNTRY_OPTION = click.option(
    "--country", required=True, help="ISO 3166-1 alpha-2 code of a configured country, e.g. KZ."
)
SHARD_OPTION = click.option(
    "--shard", default=None, metavar="i/N", help="Only this shard's blocks (overrides the config)."
)


@click.group("targets")
def targets_group() -> None:
    """Target universes and hitlists."""


def _load(config_path: Path, country: str, shard: str | None) -> tuple[Config, CountryUniverse]:
    try:
        config = load_config(config_path)
        if shard is not None:
            try:
                config = dataclasses.replace(config, shard=parse_shard(shard))
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--shard") from None
        config.country(country)
        universe = load_universe(config, [country])
    except ConfigError as exc:
        raise click.ClickException("\n".join(exc.problems)) from None
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    return config, universe.country(country)


@targets_group.command("list")
@COUNTRY_OPTION
@CONFIG_OPTION
@SHARD_OPTION
@click.option("--hitlist", "hitlist_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Hitlist file (default: hitlist_dir/CC.csv from the config).")
@click.option("--blocks", "show_blocks", is_flag=True, help="One line per /24 block.")
def list_command(
    country: str, config_path: Path, shard: str | None, hitlist_path: Path | None,
    show_blocks: bool,
) -> None:
    """Show a country's universe: its blocks, their networks (ASNs), what the hitlist knows."""
    config, universe = _load(config_path, country, shard)
    path = hitlist_path or config.hitlist_path(universe.code)
    try:
        hitlist = Hitlist.load(path)
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    known_by_asn: dict[int, int] = {}
    for block, asn in zip(universe.blocks, universe.block_asns, strict=True):
        if hitlist.is_known(block):
            known_by_asn[asn] = known_by_asn.get(asn, 0) + 1
    known = sum(known_by_asn.values())
    click.echo(
        f"{universe.code}: {universe.prefix_blocks} /24 blocks in its address space, "
        f"{len(universe.blocks)} in the universe; {known} known responsive (hitlist {path})"
    )
    click.echo(f"methods: {', '.join(sorted(universe.methods))}")
    for endpoint in universe.endpoints:
        network = f" AS{endpoint.asn}" if endpoint.asn else ""
        click.echo(f"endpoint {endpoint.method} {endpoint.target}{network}")
    click.echo(f"{'network':<14}{'blocks':>8}{'known':>8}")
    for asn, count in sorted(universe.asn_counts().items(), key=lambda item: -item[1]):
        label = f"AS{asn}" if asn else "unattributed"
        click.echo(f"{label:<14}{count:>8}{known_by_asn.get(asn, 0):>8}")
    if show_blocks:
        for block, asn in zip(universe.blocks, universe.block_asns, strict=True):
            octets = hitlist.responsive(block)
            if octets:
                state = "responsive " + ",".join(address_of(block, o) for o in octets)
            elif hitlist.tried(block):
                state = f"silent (tried {hitlist.tried(block)})"
            else:
                state = "untried"
            click.echo(f"{block_network(block)}\t{f'AS{asn}' if asn else '-'}\t{state}")


@targets_group.command("discover")
@COUNTRY_OPTION
@CONFIG_OPTION
@SHARD_OPTION
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Hitlist file to write (default: hitlist_dir/CC.csv, which the daemon reads).")
@click.option("--budget", type=click.IntRange(1, 254), default=None,
              help="Candidate addresses tried per block (default: probing.discovery_budget).")
@click.option("--want", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Responsive addresses to find per block before moving on.")
def discover_command(
    country: str, config_path: Path, shard: str | None, out: Path | None, budget: int | None,
    want: int,
) -> None:
    """Find responsive addresses in each /24 block of a country (ICMP), politely, resumably.

    Tries .1, .254, .2, ... then a per-block random sample, within the config's pacing. Each
    finished block is appended to the hitlist file at once: re-running skips blocks already done.
    """
    config, universe = _load(config_path, country, shard)
    path = out or config.hitlist_path(universe.code)
    budget = budget or config.probing.discovery_budget
    try:
        hitlist = Hitlist.load(path)
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    pending = [b for b in universe.blocks if not discovery_done(hitlist, b, budget, want)]
    click.echo(
        f"{universe.code}: {len(universe.blocks)} blocks, {len(pending)} to discover "
        f"(budget {budget} addresses per block), writing {path}", err=True,
    )
    try:
        found = eventloop.run(
            _discover(config, universe, hitlist, path, budget, want, len(pending))
        )
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted: finished blocks are in {path}; run again to resume"
        ) from None
    hitlist.save(path)  # compact: one row per address
    click.echo(f"{universe.code}: {found} of {len(universe.blocks)} blocks responsive; {path}")


async def _discover(
    config: Config, universe: CountryUniverse, hitlist: Hitlist, path: Path, budget: int,
    want: int, pending: int,
) -> int:
    from probes.icmp_batch import IcmpBatchProber

    prober = IcmpBatchProber(timeout_s=config.probing.timeout_s)
    appender = HitlistAppender(hitlist, path)
    try:
        with click.progressbar(length=pending, label=f"discovering {universe.code}",
                               file=sys.stderr) as bar:
            def done(block: int) -> None:
                appender(block)
                bar.update(1)

            return await discover(
                universe.blocks, hitlist, prober, config.pacing.pacer(), budget=budget,
                want=want, on_block_done=done,
            )
    finally:
        appender.close()
        await prober.close()
