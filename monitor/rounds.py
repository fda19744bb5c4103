"""One round: probe every target once (with re-probes), aggregate into series points.

INTERFACE FIXED EARLY so the daemon, the exporter and the rounds can be built side by side:
`RoundOutcome` is what a round hands to everything downstream. The logic is filled in by the
targets/rounds work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from monitor.series import SeriesPoint


@dataclass(frozen=True, slots=True)
class TargetCount:
    """How many targets (or /24 blocks) of one country/ASN/method were probed and answered."""

    country: str
    asn: int | None  # None: not attributed, or a country-level named endpoint
    method: str
    total: int
    up: int


@dataclass(slots=True)
class RoundOutcome:
    """Everything one round measured. Produced by `run_round`, consumed by export/history/detector.

    `time` is the round's timestamp from the injected clock (lab time in the lab), UTC, aligned to
    the round interval. `duration_s` is wall-clock seconds the round took.
    """

    time: datetime
    duration_s: float
    points: list[SeriesPoint] = field(default_factory=list)
    counts: list[TargetCount] = field(default_factory=list)
    # (method, result) -> probes sent this round; result is "success" or a Failure name.
    probes: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (country, method) -> RTTs in seconds of the answers this round (for the histogram).
    rtts: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    # Vantage self-check against the control targets abroad.
    control_total: int = 0
    control_up: int = 0
    vantage_up: bool = True
    abandoned: bool = False  # SIGTERM arrived mid-round: the points are partial and not stored
