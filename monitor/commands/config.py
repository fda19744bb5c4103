"""`shutdown-monitor config check FILE`: validate a configuration, print every problem."""

from __future__ import annotations

from pathlib import Path

import click

from monitor.config import Config, load_config
from monitor.errors import ConfigError, InputError
from monitor.targets import Universe, load_universe


@click.group("config")
def config_group() -> None:
    """Configuration files."""


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check_command(file: Path) -> None:
    """Validate FILE: exit 0 and print a summary if it is usable, else list every problem."""
    try:
        config = load_config(file)
        universe = load_universe(config)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        count = len(exc.problems)
        raise click.ClickException(f"{file}: {count} problem{'s' if count != 1 else ''}") from None
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary(config, universe))


def summary(config: Config, universe: Universe) -> str:
    """A few lines saying what this config will do."""
    lines = [
        f"OK: {config.source}: vantage {config.vantage_name!r}, API on {config.listen}, "
        f"a round every {config.interval_s:g} s"
        + (f", shard {config.shard[0]}/{config.shard[1]}" if config.shard else ""),
    ]
    for country in universe.countries:
        methods = ",".join(sorted(country.methods))
        sampled = (
            f"{len(country.blocks)} of {country.prefix_blocks} /24 blocks"
            if country.prefix_blocks
            else "no address space"
        )
        kinds: dict[str, int] = {}
        for endpoint in country.endpoints:
            kinds[endpoint.method] = kinds.get(endpoint.method, 0) + 1
        named = ", ".join(f"{n} {m}" for m, n in sorted(kinds.items()))
        lines.append(
            f"  {country.code}: {sampled}; methods {methods}"
            + (f"; endpoints: {named}" if named else "")
        )
    pacing = config.pacing
    blocklist = pacing.blocklist()
    lines.append(
        f"  control: {len(universe.control)} targets (vantage up at >= "
        f"{universe.min_control_up_fraction:.0%}); pacing {pacing.rate_pps or 'unlimited'} "
        f"probes/s, {pacing.per_block_pps or 'unlimited'}/s per /24; blocklist "
        f"{len(blocklist)} ranges ({pacing.blocklist_file or 'none'})"
    )
    lines.append(
        f"  ASNs: {config.asn_file or 'none (no per-network series)'}; hitlists in "
        f"{config.hitlist_dir}; history in {config.history.path}"
    )
    return "\n".join(lines)
