"""Parsing --since/--until style options: one message for every command that takes a time."""

from __future__ import annotations

from datetime import datetime

import click

from monitor.detect import parse_time


def time_option(value: str | None, name: str) -> datetime | None:
    """The UTC time an option names, None when it was not given; a usage error otherwise."""
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise click.BadParameter(f"expected ISO 8601 such as 2022-01-05T10:30:00Z; got {value!r}",
                                 param_hint=name) from None
