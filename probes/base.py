"""The vocabulary every prober shares: targets, results, failure names, the Prober protocol.

A network failure is data, not an exception (OONI's lesson): every probe ends in exactly one
ProbeResult whose `failure` is a name from the fixed `Failure` set. Exceptions are kept for real
errors of the caller (bad arguments, no permission to open an ICMP socket).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from probes.pacing import Pacer


class Failure(enum.StrEnum):
    """Why a probe did not succeed. A fixed set: dashboards and metrics use these as labels."""

    TIMEOUT = "timeout"
    CONNECTION_REFUSED = "connection_refused"
    CONNECTION_RESET = "connection_reset"
    HOST_UNREACHABLE = "host_unreachable"
    NETWORK_UNREACHABLE = "network_unreachable"
    DNS_NXDOMAIN = "dns_nxdomain"
    DNS_SERVFAIL = "dns_servfail"
    DNS_REFUSED = "dns_refused"
    DNS_NO_ANSWER = "dns_no_answer"
    DNS_WRONG_ANSWER = "dns_wrong_answer"
    DNS_BAD_RESPONSE = "dns_bad_response"
    TLS_ERROR = "tls_error"
    HTTP_STATUS = "http_status"
    HTTP_BAD_RESPONSE = "http_bad_response"
    TOO_LARGE = "too_large"
    BLOCKED_BY_POLICY = "blocked_by_policy"
    RESOLVE_ERROR = "resolve_error"
    OTHER = "other"


class ProbeSetupError(Exception):
    """The prober cannot run at all here (no socket permission, bad options). Says how to fix it."""


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """What a DNS probe asks: a name, a record type, and optionally the answers that are right."""

    name: str
    rdtype: str = "A"
    expected: frozenset[str] = frozenset()
    transport: str = "udp"  # "udp" or "tcp"


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to probe.

    `address` is an IP address (ICMP, TCP, the DNS server) or a host name; `port` is for TCP and
    DNS (None means the method's default); `url` is for HTTP; `query` is for DNS. Targets are
    hashable so a caller can map results back to its own bookkeeping (blocks, countries, ASNs).
    """

    address: str
    port: int | None = None
    url: str | None = None
    query: DnsQuery | None = None

    def __str__(self) -> str:
        if self.url is not None:
            return self.url
        if self.query is not None:
            port = f":{self.port}" if self.port else ""
            return f"{self.address}{port} {self.query.name}/{self.query.rdtype}"
        if self.port is not None:
            return f"{self.address}:{self.port}"
        return self.address


@dataclass(slots=True)
class ProbeResult:
    """The outcome of one probe.

    `reachable`: the target answered at all (a TCP RST or an HTTP 500 proves the host is up).
    `success`: the probe got what it asked for (echo reply, connection, 2xx/3xx, right answer).
    `failure`: None on success, else one `Failure`. `rtt_s`: time to the first answer, if any.
    `started_at`: wall-clock seconds (time.time()) when the probe was sent.
    `details`: method-specific facts (status code, phase timings, rcode, answers, ttl...).
    """

    target: Target
    method: str
    reachable: bool
    success: bool
    failure: Failure | None
    rtt_s: float | None
    started_at: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "method": self.method,
            "reachable": self.reachable,
            "success": self.success,
            "failure": None if self.failure is None else str(self.failure),
            "rtt_s": self.rtt_s,
            "started_at": self.started_at,
            "details": self.details,
        }


ResultSink = Callable[[ProbeResult], None]


class Prober(Protocol):
    """One signature for every method (blackbox_exporter's lesson).

    `probe_many` probes every target once, asking `pacer` before each send, and hands each result
    to `on_result` as soon as it is known (no list of a million results is built). It returns when
    every target has a result. Blocklisted targets get `Failure.BLOCKED_BY_POLICY` without a packet.
    """

    method: ClassVar[str]

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None: ...

    async def close(self) -> None: ...


def unanswered(
    target: Target,
    method: str,
    failure: Failure,
    started_at: float,
    details: dict[str, Any] | None = None,
) -> ProbeResult:
    """The result of a probe that got no answer from the target (nothing proves it is up)."""
    return ProbeResult(target, method, False, False, failure, None, started_at, details or {})


def blocked_result(target: Target, method: str, started_at: float) -> ProbeResult:
    """The result for a target the blocklist forbids: nothing was sent."""
    return unanswered(target, method, Failure.BLOCKED_BY_POLICY, started_at)


def resolve_failed(
    target: Target, method: str, started_at: float, exc: BaseException
) -> ProbeResult:
    """The result for a target whose host name did not resolve: nothing was sent."""
    return unanswered(target, method, Failure.RESOLVE_ERROR, started_at,
                      {"error": str(exc) or type(exc).__name__})


def count_failures(results: Iterable[ProbeResult]) -> Mapping[str, int]:
    """Failure name -> count, for summaries."""
    counts: dict[str, int] = {}
    for result in results:
        if result.failure is not None:
            counts[str(result.failure)] = counts.get(str(result.failure), 0) + 1
    return counts


def content_lines(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of every line that is not blank once `#` comments are cut:
    the format of target, prefix and blocklist files."""
    for lineno, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].strip()
        if text:
            yield lineno, text
