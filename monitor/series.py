"""The series model: one point = time, country, scope, entity, signal, value (see DESIGN).

This is the interchange format between rounds, the history store, Prometheus, files, the
detector and reports. In memory a batch of points is a pandas DataFrame with exactly the six
columns of `COLUMNS`; `time` is a tz-aware UTC timestamp, `value` a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

COLUMNS: Final = ("time", "country", "scope", "entity", "signal", "value")
SCOPES: Final = ("country", "asn", "region", "vantage")

# Signals the daemon produces. External files may carry others (IODA's active_probing, bgp, ...).
SIGNAL_ICMP_UP: Final = "icmp_blocks_up"
SIGNAL_ICMP_TOTAL: Final = "icmp_blocks_total"


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    time: datetime  # tz-aware, UTC
    country: str  # ISO 3166-1 alpha-2, upper case
    scope: str  # one of SCOPES
    entity: str  # "KZ" for scope country, "9198" for an ASN, a region name
    signal: str
    value: float

# The vantage self-check travels as a series too: scope "vantage", country VANTAGE_COUNTRY,
# entity the vantage name, signal SIGNAL_VANTAGE_UP = fraction of control targets that answered.
VANTAGE_COUNTRY: Final = "ZZ"
SIGNAL_VANTAGE_UP: Final = "vantage_up"
