"""PLACEHOLDER during development: replaced by the module that implements `run`."""

import click


@click.command("run")
def run_command() -> None:
    """(in development)"""
    raise click.ClickException("run: not built yet")
