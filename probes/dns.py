"""DNS probe with dnspython: ask a server one question and judge its answer.

A server that answers with the wrong addresses is reachable but failing (`dns_wrong_answer`):
that is what DNS tampering looks like, so it must not read as an outage. A UDP answer with the
TC bit set is asked again over TCP, as a resolver would.

UDP queries go over a socket of our own, so the answer carries the kernel's receive stamp and
the RTT is the network's, not a busy event loop's (probes/stamps.py); TCP queries (dnspython's)
carry the loop's measure. `details["rtt_source"]` says which.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable
from typing import Any, ClassVar

import dns.asyncquery
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from probes.base import (
    DnsQuery,
    Failure,
    ProbeResult,
    ProbeSetupError,
    ResultSink,
    Target,
    blocked_result,
    resolve_failed,
)
from probes.oserrors import TARGET_ANSWERED, failure_from_oserror, resolve_host
from probes.pacing import Pacer
from probes.pool import run_pool
from probes.stamps import (
    RTT_LOOP,
    STAMP_ANCILLARY_BYTES,
    enable_receive_stamps,
    honest_rtt,
    kernel_receive_time,
)

DEFAULT_PORT = 53
_MAX_DATAGRAM = 65535

_RCODE_FAILURES = {
    dns.rcode.NXDOMAIN: Failure.DNS_NXDOMAIN,
    dns.rcode.SERVFAIL: Failure.DNS_SERVFAIL,
    dns.rcode.REFUSED: Failure.DNS_REFUSED,
}


def normalize_answer(rdtype: str, text: str) -> str:
    """One spelling per answer so comparisons hold: IP addresses canonical, names lowercase
    and fully qualified, anything else with collapsed whitespace. Raises ValueError on a
    malformed address for A/AAAA."""
    kind = rdtype.upper()
    value = text.strip()
    if kind in ("A", "AAAA"):
        address = ipaddress.ip_address(value)
        if (kind == "A") != (address.version == 4):
            raise ValueError(f"{value!r} is not an {kind} record value")
        return str(address)
    if kind in ("CNAME", "NS", "PTR", "DNAME"):
        lowered = value.lower()
        return lowered if lowered.endswith(".") else lowered + "."
    return " ".join(value.split())


def check_query(query: DnsQuery) -> None:
    """Raise ProbeSetupError when the query cannot be asked (bad name, type, transport)."""
    try:
        dns.name.from_text(query.name)
    except dns.exception.DNSException as exc:
        raise ProbeSetupError(f"DNS name {query.name!r} is not valid: {exc}") from None
    try:
        dns.rdatatype.from_text(query.rdtype)
    except dns.exception.DNSException:
        raise ProbeSetupError(f"DNS record type {query.rdtype!r} is not known") from None
    if query.transport not in ("udp", "tcp"):
        raise ProbeSetupError(f"DNS transport must be udp or tcp, got {query.transport!r}")
    for answer in query.expected:
        try:
            normalize_answer(query.rdtype, answer)
        except ValueError as exc:
            raise ProbeSetupError(f"expected answer {answer!r}: {exc}") from None


def judge_response(
    query: DnsQuery, response: dns.message.Message
) -> tuple[Failure | None, dict[str, Any]]:
    """The failure (None when right) and the details (rcode, answers, ttl) of one response."""
    rcode = response.rcode()
    details: dict[str, Any] = {"rcode": dns.rcode.to_text(rcode)}
    if rcode != dns.rcode.NOERROR:
        return _RCODE_FAILURES.get(rcode, Failure.DNS_BAD_RESPONSE), details
    wanted = dns.rdatatype.from_text(query.rdtype)
    answers: list[str] = []
    ttls: list[int] = []
    for rrset in response.answer:
        # Follow CNAME chains implicitly: every rrset of the asked type counts.
        if rrset.rdtype == wanted and rrset.rdclass == dns.rdataclass.IN:
            answers.extend(rdata.to_text() for rdata in rrset)
            ttls.append(rrset.ttl)
    details["answers"] = answers
    if ttls:
        details["ttl"] = min(ttls)
    if not answers:
        return Failure.DNS_NO_ANSWER, details
    if query.expected:
        expected = {normalize_answer(query.rdtype, a) for a in query.expected}
        try:
            got = {normalize_answer(query.rdtype, a) for a in answers}
        except ValueError:
            return Failure.DNS_BAD_RESPONSE, details
        unexpected = sorted(got - expected)
        if unexpected:
            details["unexpected"] = unexpected
            return Failure.DNS_WRONG_ANSWER, details
    return None, details


class DnsProber:
    """Asks each target's server (address, port default 53) the target's DnsQuery."""

    method: ClassVar[str] = "dns"

    def __init__(self, timeout_s: float = 3.0) -> None:
        if timeout_s <= 0:
            raise ProbeSetupError(f"DnsProber: timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None:
        await run_pool(targets, pacer, on_result, lambda t: self.probe_one(t, pacer), self.method)

    async def close(self) -> None:
        return None

    async def probe_one(self, target: Target, pacer: Pacer | None = None) -> ProbeResult:
        """Probe one target; `pacer` (when given) paces a TCP retry after a truncated answer."""
        started_at = time.time()
        query = target.query
        if query is None:
            raise ProbeSetupError(f"DNS target {target} has no query (name and record type)")
        port = target.port if target.port is not None else DEFAULT_PORT
        try:
            server = (await resolve_host(target.address, port, self.timeout_s))[0]
        except (OSError, TimeoutError) as exc:
            return resolve_failed(target, self.method, started_at, exc)
        if server != target.address and pacer is not None and pacer.is_blocked(server):
            return blocked_result(target, self.method, started_at)  # a name for a blocked address
        request = dns.message.make_query(query.name, query.rdtype)
        details: dict[str, Any] = {"transport": query.transport}
        start = time.perf_counter()
        udp_rtt: tuple[float, str] | None = None  # a UDP answer's RTT and its source

        def rtt_now() -> float:
            """The RTT of what answered: a UDP answer's when one came, else the loop's."""
            rtt, details["rtt_source"] = udp_rtt or (time.perf_counter() - start, RTT_LOOP)
            return rtt

        try:
            if query.transport == "tcp":
                response = await dns.asyncquery.tcp(request, server, self.timeout_s, port)
            else:
                wire, answered_in, source = await self._udp(request.to_wire(), server, port)
                udp_rtt = answered_in, source
                response = _response_to(request, wire)
                if response.flags & dns.flags.TC:
                    details["truncated"] = True
                    details["transport"] = "tcp"
                    if pacer is not None:
                        await _pace(pacer, server)
                    response = await dns.asyncquery.tcp(request, server, self.timeout_s, port)
        except (dns.exception.Timeout, TimeoutError):
            return self._failed(target, started_at, Failure.TIMEOUT, None, details)
        except (dns.exception.DNSException, EOFError, ValueError) as exc:
            # Something answered, but not with a DNS message for our question.
            details["error"] = f"{type(exc).__name__}: {exc}"
            return self._failed(target, started_at, Failure.DNS_BAD_RESPONSE, rtt_now(), details)
        except OSError as exc:
            os_failure = failure_from_oserror(exc)
            details["error"] = str(exc)
            answered_s = rtt_now() if os_failure in TARGET_ANSWERED else None
            return self._failed(target, started_at, os_failure, answered_s, details)
        rtt = rtt_now()
        failure, judged = judge_response(query, response)
        details.update(judged)
        return ProbeResult(
            target, self.method, True, failure is None, failure, rtt, started_at, details
        )

    async def _udp(self, wire: bytes, server: str, port: int) -> tuple[bytes, float, str]:
        """Send one query, wait for one datagram back: (its bytes, the RTT, its source).

        A connected socket: the kernel then reports ICMP port unreachable (ECONNREFUSED), which
        proves the host is up, and drops datagrams from any other source address."""
        loop = asyncio.get_running_loop()
        with socket.socket(dns.inet.af_for_address(server), socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            enable_receive_stamps(sock)
            sock.connect((server, port))
            sent = time.monotonic()
            await loop.sock_sendall(sock, wire)  # waits for room in a full send buffer
            async with asyncio.timeout(self.timeout_s):
                while True:
                    try:
                        answer, ancdata, _flags, _source = sock.recvmsg(
                            _MAX_DATAGRAM, STAMP_ANCILLARY_BYTES
                        )
                        break
                    except BlockingIOError:
                        await _readable(loop, sock)
            rtt, source = honest_rtt(
                kernel_receive_time(ancdata), time.time(), time.monotonic() - sent
            )
        return answer, rtt, source

    def _failed(
        self,
        target: Target,
        started_at: float,
        failure: Failure,
        rtt: float | None,
        details: dict[str, Any],
    ) -> ProbeResult:
        reachable = rtt is not None
        return ProbeResult(target, self.method, reachable, False, failure, rtt, started_at, details)


def _response_to(request: dns.message.Message, wire: bytes) -> dns.message.Message:
    """The answer to `request` in `wire`; raises (a DNSException) when it is not a DNS message
    or answers another question."""
    response = dns.message.from_wire(wire)
    if not request.is_response(response):
        raise dns.query.BadResponse("the answer does not match the question")  # type: ignore[no-untyped-call]
    return response


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _pace(pacer: Pacer, address: str) -> None:
    delay = pacer.reserve(address)
    if delay > 0:
        await asyncio.sleep(delay)
