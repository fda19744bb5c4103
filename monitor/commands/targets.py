"""PLACEHOLDER during development: replaced by the module that implements `targets`."""

import click


@click.group("targets")
def targets_group() -> None:
    """(in development)"""
    raise click.ClickException("targets: not built yet")
