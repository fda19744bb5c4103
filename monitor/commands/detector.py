"""`shutdown-monitor detector`: the central detector service over Prometheus-compatible storage
(see docs/deployment.md)."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from pathlib import Path

import click

from monitor.config import Config, load_config
from monitor.errors import ConfigError
from probes import eventloop


def _url(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
        raise click.BadParameter(f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


@click.command("detector")
@click.option("--prometheus", "prometheus_url", required=True, callback=_url, metavar="URL",
              help="Prometheus-compatible query API (Prometheus, Thanos, Mimir, VictoriaMetrics).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A config file for the detector settings and sinks (other keys unused).")
@click.option("--listen", default="127.0.0.1:9320", show_default=True, metavar="HOST:PORT",
              help="Address of /metrics, /healthz and /api/incidents.")
@click.option("--bin-seconds", type=click.IntRange(min=1), metavar="S",
              help="Bin size: the daemons' interval_s (default: the config's, else 300).")
@click.option("--lag", "lag_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds after a bin ends before it is judged (rounds and scrapes land).")
@click.option("--history-hours", type=click.FloatRange(min=0), default=192.0, show_default=True,
              help="History read at start to learn baselines.")
@click.option("--vantage-label", default="vantage", show_default=True,
              help="The label that names the vantage point.")
def detector_command(prometheus_url: str, config_path: Path | None, listen: str,
                     bin_seconds: int | None, lag_s: float, history_hours: float,
                     vantage_label: str) -> None:
    """Central detector: judge every shard and vantage from the storage, raise incidents.

    Sums each vantage's counts across shards, forms the consensus of the healthy vantages (a
    country is down only when most of them see it down), runs the daemon's detector on it, and
    gives vantages that are offline or disagree alone their own incidents.
    """
    from monitor.api import parse_listen
    from monitor.central import CentralDetector, CentralSettings
    from monitor.clock import RealClock

    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.WARNING)
    config: Config | None = None
    if config_path is not None:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise click.ClickException("invalid configuration:\n" +
                                       "\n".join(exc.problems)) from None
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", vantage_label):
        raise click.BadParameter(f"expected a Prometheus label name, got {vantage_label!r}",
                                 param_hint="--vantage-label")
    if bin_seconds is None:
        bin_seconds = int(config.interval_s) if config is not None else 300
    if 86400 % bin_seconds:
        raise click.BadParameter(f"expected a divisor of 86400, got {bin_seconds}",
                                 param_hint="--bin-seconds")
    settings = CentralSettings(prometheus_url, bin_seconds=bin_seconds, lag_s=lag_s,
                               history_s=history_hours * 3600, vantage_label=vantage_label)
    try:
        central = CentralDetector(settings, RealClock(), config=config, listen=listen)
    except (TypeError, ValueError) as exc:
        raise click.ClickException(f"detector settings: {exc}") from None

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, central.request_stop)
        return await central.run()

    try:
        raise SystemExit(eventloop.run(serve()))
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
