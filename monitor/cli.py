"""The `shutdown-monitor` command: a click group whose subcommands live in monitor/commands/."""

from __future__ import annotations

import logging

import click

from monitor import __version__
from monitor.commands.config import config_group
from monitor.commands.detect import detect_command
from monitor.commands.detector import detector_command
from monitor.commands.lab import lab_group
from monitor.commands.probe import probe_command
from monitor.commands.report import report_command
from monitor.commands.run import run_command
from monitor.commands.targets import targets_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shutdown-monitor")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Self-hosted Internet shutdown and connectivity monitor."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


cli.add_command(probe_command)
cli.add_command(config_group)
cli.add_command(run_command)
cli.add_command(targets_group)
cli.add_command(detect_command)
cli.add_command(detector_command)
cli.add_command(report_command)
cli.add_command(lab_group)


def main() -> None:
    cli(prog_name="shutdown-monitor")
