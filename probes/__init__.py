"""Measurement only: probers for ICMP, TCP, HTTP and DNS, and the pacing that keeps them polite.

Nothing here imports `monitor`: the probe engine is usable on its own.
"""

from probes.base import DnsQuery, Failure, Prober, ProbeResult, ProbeSetupError, Target
from probes.pacing import Blocklist, Pacer, PacingPolicy

__all__ = [
    "Blocklist",
    "DnsQuery",
    "Failure",
    "Pacer",
    "PacingPolicy",
    "ProbeResult",
    "ProbeSetupError",
    "Prober",
    "Target",
]
