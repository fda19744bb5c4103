"""The project's exception hierarchy for real errors (a network failure is data, not an error).

Every error a user can cause says where (file, key or line) and what was expected.
"""

from __future__ import annotations


class MonitorError(Exception):
    """Base of every error shutdown-monitor raises on purpose."""


class ConfigError(MonitorError):
    """A configuration file is wrong. `problems` lists every 'file: key: expected ...' found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class InputError(MonitorError):
    """An input file or response (series CSV, IODA export, hitlist, prefix file) is unusable."""


class StoreError(MonitorError):
    """The embedded history store cannot be opened, read or written."""
