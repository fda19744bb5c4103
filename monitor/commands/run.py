"""`shutdown-monitor run`: the long-running daemon (see docs/daemon.md)."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import click

from monitor.clock import Clock, RealClock, VirtualClock, parse_utc
from monitor.config import load_config, parse_shard
from monitor.errors import ConfigError, MonitorError
from probes import eventloop
from probes.base import ProbeSetupError


def _shard(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _instant(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_utc(value)
    except ValueError:
        raise click.BadParameter(
            f"expected an ISO 8601 instant such as 2022-01-05T10:30:00Z, got {value!r}"
        ) from None


@click.command("run")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The configuration file.")
@click.option("--shard", callback=_shard, metavar="i/N",
              help="Probe only shard i of N (0-based); overrides the config's `shard`.")
@click.option("--listen", metavar="HOST:PORT", help="API address; overrides the config's `listen`.")
@click.option("--virtual-time", callback=_instant, hidden=True,
              help="Lab: run in virtual time from this UTC instant, rounds back to back.")
@click.option("--rounds", type=click.IntRange(min=1), hidden=True,
              help="Stop after this many rounds (lab and tests).")
def run_command(
    config_path: Path,
    shard: tuple[int, int] | None,
    listen: str | None,
    virtual_time: datetime | None,
    rounds: int | None,
) -> None:
    """Run the monitor: probe every interval, serve /metrics and the API, raise incidents.

    SIGTERM or SIGINT stops it cleanly (exit 0); SIGHUP reloads the configuration file.
    """
    from monitor.daemon import Daemon

    if logging.getLogger().level > logging.INFO:
        # A daemon says what it does: at least incidents and state changes (WARNING) are logged;
        # -v gives INFO.
        logging.getLogger().setLevel(logging.WARNING)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException("invalid configuration:\n" + "\n".join(exc.problems)) from None
    if listen is not None:
        from monitor.api import parse_listen

        try:
            parse_listen(listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
    clock: Clock = VirtualClock(virtual_time) if virtual_time is not None else RealClock()
    daemon = Daemon(config, clock, config_path=config_path, listen=listen, shard=shard,
                    max_rounds=rounds)
    try:
        status = eventloop.run(daemon.run())
    except (MonitorError, ProbeSetupError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        # Typically the listen address is taken.
        raise click.ClickException(f"cannot start: {exc}") from None
    raise SystemExit(status)
