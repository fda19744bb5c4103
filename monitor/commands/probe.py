"""PLACEHOLDER during development: replaced by the module that implements `probe`."""

import click


@click.command("probe")
def probe_command() -> None:
    """(in development)"""
    raise click.ClickException("probe: not built yet")
