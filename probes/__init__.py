"""Measurement only: probers for ICMP, TCP, HTTP and DNS, and the pacing that keeps them polite.

Nothing here imports `monitor`: the probe engine is usable on its own. `PROBERS` maps each
method name to its prober class (blackbox_exporter's explicit map): every class takes keyword
options and implements the `Prober` protocol. ICMP's is IcmpBatchProber: IcmpProber's sockets
with the batch engine in front (probes/icmp_batch.py).
"""

from collections.abc import Callable

from probes.base import DnsQuery, Failure, Prober, ProbeResult, ProbeSetupError, Target
from probes.dns import DnsProber
from probes.http import HttpProber
from probes.icmp import IcmpProber
from probes.icmp_batch import IcmpBatchProber
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.tcp import TcpProber

# Callable[..., Prober]: mypy checks that every class really implements the protocol.
PROBERS: dict[str, Callable[..., Prober]] = {
    "icmp": IcmpBatchProber,
    "tcp": TcpProber,
    "http": HttpProber,
    "dns": DnsProber,
}

__all__ = [
    "PROBERS",
    "Blocklist",
    "DnsProber",
    "DnsQuery",
    "Failure",
    "HttpProber",
    "IcmpBatchProber",
    "IcmpProber",
    "Pacer",
    "PacingPolicy",
    "ProbeResult",
    "ProbeSetupError",
    "Prober",
    "Target",
    "TcpProber",
]
