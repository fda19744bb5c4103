"""shutdown-monitor: turns probe results into series, incidents, metrics and reports."""

__version__ = "0.1.0"
