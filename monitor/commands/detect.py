"""PLACEHOLDER during development: replaced by the module that implements `detect`."""

import click


@click.command("detect")
def detect_command() -> None:
    """(in development)"""
    raise click.ClickException("detect: not built yet")
