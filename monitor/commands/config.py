"""PLACEHOLDER during development: replaced by the module that implements `config`."""

import click


@click.group("config")
def config_group() -> None:
    """(in development)"""
    raise click.ClickException("config: not built yet")
