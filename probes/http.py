"""HTTP(S) probe with aiohttp's client protocol: status, phase timings, capped body, polite UA.

Every probe opens a fresh connection and sends `Connection: close`: reusing one would hide the
connect and TLS phases, which are the point of the measurement. The connection is opened with
the event loop directly (TCP, then `start_tls` for https, so each phase has its own stamps) and
the response is read by aiohttp's `ResponseHandler` (its protocol, its C HTTP parser, its body
stream). aiohttp's `ClientSession` is not used: its per-request machinery (cookie jar, request
and response objects, connector bookkeeping, happy eyeballs) more than doubled a probe's CPU,
and a probe needs none of it. Redirects are followed by hand, one hop at a time, so each hop is
checked against the blocklist (IP literals before the request, host names after resolving)
and paced like a new probe.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Collection, Iterable
from importlib import metadata
from typing import Any, ClassVar

from aiohttp import ClientConnectionError, ClientPayloadError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from yarl import URL

from probes.base import Failure, ProbeResult, ProbeSetupError, ResultSink, Target, blocked_result
from probes.oserrors import failure_from_oserror, resolve_host
from probes.pacing import Blocklist, Pacer, address_key
from probes.pool import run_pool
from probes.stamps import RTT_KERNEL, RTT_LOOP
from probes.tcp import handshake_rtt

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_EXPECTED_STATUS = range(200, 400)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TARGET_ANSWERED = frozenset(
    {
        Failure.CONNECTION_REFUSED,
        Failure.CONNECTION_RESET,
        Failure.TLS_ERROR,
        Failure.HTTP_BAD_RESPONSE,
    }
)


def default_user_agent(contact_url: str) -> str:
    """'shutdown-monitor/<version> (+<contact_url>)': site operators can see who probes them."""
    try:
        version = metadata.version("shutdown-monitor")
    except metadata.PackageNotFoundError:
        version = "0"
    return f"shutdown-monitor/{version} (+{contact_url})"


def _has_contact_url(text: str) -> bool:
    return "http://" in text or "https://" in text


class BlockedAddressError(OSError):
    """Every address a host name resolved to is in the blocklist."""


class _ResolveError(Exception):
    """The host name of a URL did not resolve (wraps the resolver's OSError)."""


class _InvalidUrlError(Exception):
    """A URL this prober cannot fetch (no host, or a scheme other than http/https)."""


def phase_timings(stamps: dict[str, float]) -> dict[str, float]:
    """Seconds spent in dns, connect (TCP), tls, ttfb (request sent to response headers)."""
    phases: dict[str, float] = {}
    if "dns_start" in stamps and "dns_end" in stamps:
        phases["dns_s"] = stamps["dns_end"] - stamps["dns_start"]
    connect_from = stamps.get("dns_end", stamps.get("connect_start"))
    tls_start = stamps.get("tls_start")
    tls_done = stamps.get("tls_done")
    connected = tls_start if tls_start is not None else stamps.get("connect_end")
    if connect_from is not None and connected is not None:
        phases["connect_s"] = connected - connect_from
    if tls_start is not None and tls_done is not None:
        phases["tls_s"] = tls_done - tls_start
    if "headers_sent" in stamps and "headers_received" in stamps:
        phases["ttfb_s"] = stamps["headers_received"] - stamps["headers_sent"]
    return {name: round(value, 6) for name, value in phases.items() if value >= 0}


def _connection_rtt(
    stamps: dict[str, float], loop_rtt: float | None, details: dict[str, Any]
) -> float | None:
    """The RTT of a probe whose TCP connection came up: the kernel's measure of the handshake
    (TCP_INFO, free of a busy event loop) when it has one, else what the loop saw. Its source
    goes into details["rtt_source"], as for ICMP and TCP."""
    kernel_rtt = stamps.get("kernel_rtt")
    if kernel_rtt is not None:
        details["rtt_source"] = RTT_KERNEL
        return round(kernel_rtt, 6)
    details["rtt_source"] = RTT_LOOP
    return None if loop_rtt is None else round(loop_rtt, 6)


class HttpProber:
    """GETs each target's URL (or http://address[:port]/ when it has none)."""

    method: ClassVar[str] = "http"

    def __init__(
        self,
        timeout_s: float = 5.0,
        contact_url: str | None = None,
        user_agent: str | None = None,
        max_body_bytes: int = 65536,
        follow_redirects: bool = False,
        expected_status: Collection[int] = DEFAULT_EXPECTED_STATUS,
        verify_tls: bool = True,
        max_redirects: int = 5,
        max_connections: int = 256,
    ) -> None:
        if user_agent is None:
            if not contact_url:
                raise ProbeSetupError(
                    "HttpProber needs contact_url (a page saying who runs this monitor and how "
                    "to opt out) or a user_agent that contains one"
                )
            if not _has_contact_url(contact_url):
                raise ProbeSetupError(f"contact_url must be an http(s) URL, got {contact_url!r}")
            user_agent = default_user_agent(contact_url)
        elif not _has_contact_url(user_agent):
            raise ProbeSetupError(
                f"user_agent must include a contact URL (http:// or https://): {user_agent!r}"
            )
        if any(ord(c) < 32 or ord(c) == 127 for c in user_agent):
            # It goes into the request head as it is: a line break would forge headers.
            raise ProbeSetupError(f"user_agent must not contain control characters: {user_agent!r}")
        if timeout_s <= 0:
            raise ProbeSetupError(f"HttpProber: timeout_s must be positive, got {timeout_s}")
        if max_body_bytes < 0:
            raise ProbeSetupError("HttpProber: max_body_bytes must be 0 or more")
        if max_connections < 1:
            raise ProbeSetupError(
                f"HttpProber: max_connections must be at least 1, got {max_connections}"
            )
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self.max_body_bytes = max_body_bytes
        self.follow_redirects = follow_redirects
        self.expected_status = expected_status
        self.verify_tls = verify_tls
        self.max_redirects = max_redirects
        self.max_connections = max_connections
        # Everything after the Host line is the same for every request of this prober.
        self._head_tail = (
            f"User-Agent: {user_agent}\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self._ssl: ssl.SSLContext | None = None
        # The connection cap of the running loop (a semaphore belongs to one loop).
        self._limit: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            context = ssl.create_default_context()
            if not self.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._ssl = context
        return self._ssl

    def _connection_limit(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        if self._limit is None or self._limit[0] is not loop:
            self._limit = (loop, asyncio.Semaphore(self.max_connections))
        return self._limit[1]

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None:
        await run_pool(targets, pacer, on_result, lambda t: self.probe_one(t, pacer), self.method)

    async def close(self) -> None:
        self._limit = None  # no connection outlives its probe: nothing else to release

    async def probe_one(self, target: Target, pacer: Pacer | None = None) -> ProbeResult:
        """Probe one target; the caller has been admitted by `pacer` (which paces redirects)."""
        started_at = time.time()
        start = time.perf_counter()
        url = URL(target.url) if target.url else _url_for_address(target)
        details: dict[str, Any] = {"url": str(url)}
        stamps: dict[str, float] = {}
        limit = self._connection_limit(asyncio.get_running_loop())
        try:
            async with limit, asyncio.timeout(self.timeout_s):
                return await self._fetch(target, url, pacer, started_at, details, stamps)
        except TimeoutError:
            failure, error = Failure.TIMEOUT, None
        except BlockedAddressError:
            return blocked_result(target, self.method, started_at)
        except _ResolveError as exc:
            failure, error = Failure.RESOLVE_ERROR, str(exc)
        except _InvalidUrlError as exc:
            failure, error = Failure.OTHER, f"invalid URL: {exc}"
        except ssl.SSLError as exc:  # before OSError, which it is
            failure, error = Failure.TLS_ERROR, str(exc)
        except ServerDisconnectedError as exc:
            # The server closed the connection without a response: a reset or an early FIN.
            failure, error = Failure.CONNECTION_RESET, str(exc) or "server disconnected"
        except (HttpProcessingError, ClientPayloadError) as exc:
            failure, error = Failure.HTTP_BAD_RESPONSE, str(exc) or type(exc).__name__
        except OSError as exc:  # refused, reset (aiohttp's ClientOSError too), unreachable
            failure, error = failure_from_oserror(exc), str(exc)
        except ClientConnectionError as exc:
            failure, error = Failure.CONNECTION_RESET, str(exc) or type(exc).__name__
        elapsed = time.perf_counter() - start
        # The target answered if a TCP connection came up (even if TLS or HTTP then failed) or
        # if it refused or reset us; a timeout before connecting or an ICMP error proves nothing.
        connected = "connect_end" in stamps
        reachable = connected or failure in _TARGET_ANSWERED
        if error:
            details["error"] = error
        details["total_s"] = round(elapsed, 6)
        if connected:
            rtt = _connection_rtt(stamps, stamps["connect_end"] - start, details)
        else:
            rtt = round(elapsed, 6) if reachable else None
        return ProbeResult(target, self.method, reachable, False, failure, rtt, started_at, details)

    async def _fetch(
        self,
        target: Target,
        url: URL,
        pacer: Pacer | None,
        started_at: float,
        details: dict[str, Any],
        stamps: dict[str, float],
    ) -> ProbeResult:
        start = time.perf_counter()
        blocklist = pacer.blocklist if pacer is not None else None
        redirects: list[dict[str, Any]] = []
        for hop in range(self.max_redirects + 1):
            host = url.raw_host or ""
            # The URL may name another address than the target's: the blocklist rules both.
            if (hop or host != target.address) and _blocked(pacer, host):
                return blocked_result(target, self.method, started_at)
            if hop:
                if pacer is not None:  # each hop is one more request: it counts against the rate
                    delay = pacer.reserve(host)
                    if delay > 0:
                        await asyncio.sleep(delay)
                stamps.clear()
            transport, protocol = await self._connect(url, blocklist, stamps)
            try:
                message, body = await self._request(transport, protocol, url, stamps)
                status = message.code
                location = message.headers.get("Location")
                if (
                    self.follow_redirects
                    and status in REDIRECT_STATUSES
                    and location is not None
                    and hop < self.max_redirects
                ):
                    next_url = url.join(URL(location))
                    redirects.append({"status": status, "location": str(next_url)})
                    if next_url.scheme in _DEFAULT_PORTS:
                        url = next_url
                        continue
                details.update(phase_timings(stamps))
                details["status"] = status
                if location is not None:
                    details["location"] = location
                if redirects:
                    details["redirects"] = redirects
                    details["final_url"] = str(url)
                rtt = _connection_rtt(stamps, details.get("connect_s"), details)
                if status not in self.expected_status:
                    details["total_s"] = round(time.perf_counter() - start, 6)
                    return ProbeResult(target, self.method, True, False, Failure.HTTP_STATUS,
                                       rtt, started_at, details)  # fmt: skip
                too_large = await self._read_capped(message, body, details)
                if too_large:
                    transport.abort()  # the rest of the body is not wanted: no TLS goodbye
                details["total_s"] = round(time.perf_counter() - start, 6)
                failure = Failure.TOO_LARGE if too_large else None
                return ProbeResult(
                    target, self.method, True, not too_large, failure, rtt, started_at, details
                )
            except BaseException:
                transport.abort()  # failed, timed out or cancelled: do not wait for a goodbye
                raise
            finally:
                transport.close()  # a no-op after abort()
        raise AssertionError("unreachable: the last hop never follows a redirect")

    async def _connect(
        self, url: URL, blocklist: Blocklist | None, stamps: dict[str, float]
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        """A fresh connection to the URL's host (TLS for https), phases stamped."""
        host, port, tls = _endpoint(url)
        loop = asyncio.get_running_loop()
        if address_key(host) is None:  # a name: resolve, drop what the blocklist forbids
            stamps["dns_start"] = time.perf_counter()
            try:
                addresses = await resolve_host(host, port, self.timeout_s)
            except OSError as exc:
                raise _ResolveError(str(exc) or type(exc).__name__) from exc
            stamps["dns_end"] = time.perf_counter()
            if blocklist is not None:
                addresses = [a for a in addresses if not blocklist.contains(a)]
            if not addresses:
                raise BlockedAddressError(f"{host}: every address is in the blocklist")
        else:
            addresses = [host]
        stamps["connect_start"] = time.perf_counter()
        transport, protocol = await _open_tcp(loop, addresses, port, tls)
        stamps["connect_end"] = time.perf_counter()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            loop_rtt = stamps["connect_end"] - stamps["connect_start"]
            rtt, source = handshake_rtt(sock, loop_rtt)
            if source == RTT_KERNEL:
                stamps["kernel_rtt"] = rtt
        if not tls:
            assert isinstance(protocol, ResponseHandler)
            return transport, protocol
        stamps["tls_start"] = stamps["connect_end"]
        handler = ResponseHandler(loop)
        try:
            tls_transport = await loop.start_tls(
                transport, handler, self._ssl_context(), server_hostname=host.rstrip(".")
            )
        except BaseException:
            transport.abort()  # start_tls leaves the TCP connection to us when it fails
            raise
        if tls_transport is None:  # the connection closed during the handshake
            raise ServerDisconnectedError("connection closed during the TLS handshake")
        stamps["tls_done"] = time.perf_counter()
        handler.connection_made(tls_transport)  # the TLS transport is the one to read and write
        return tls_transport, handler

    async def _request(
        self,
        transport: asyncio.Transport,
        protocol: ResponseHandler,
        url: URL,
        stamps: dict[str, float],
    ) -> tuple[RawResponseMessage, StreamReader]:
        """Send the GET, wait for the response head; the body is left in the stream."""
        protocol.set_response_params(read_until_eof=True, auto_decompress=False)
        transport.write(
            f"GET {url.raw_path_qs or '/'} HTTP/1.1\r\nHost: {_host_header(url)}\r\n".encode()
            + self._head_tail
        )
        stamps["headers_sent"] = time.perf_counter()
        message, body = await protocol.read()
        stamps["headers_received"] = time.perf_counter()
        return message, body

    async def _read_capped(
        self, message: RawResponseMessage, body: StreamReader, details: dict[str, Any]
    ) -> bool:
        """Read at most max_body_bytes; True when the body is larger than that."""
        declared = _content_length(message)
        if declared is not None and declared > self.max_body_bytes:
            details["body_bytes"] = declared
            return True
        size = 0
        async for chunk in body.iter_chunked(16384):
            size += len(chunk)
            if size > self.max_body_bytes:
                details["body_bytes"] = f">{self.max_body_bytes}"
                return True
        details["body_bytes"] = size
        return False


async def _open_tcp(
    loop: asyncio.AbstractEventLoop, addresses: list[str], port: int, tls: bool
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Connect to the addresses in turn; the first that answers wins, else the last error.

    For https the protocol is a placeholder: start_tls puts TLS between it and the handler."""
    factory = asyncio.Protocol if tls else lambda: ResponseHandler(loop)
    error: OSError | None = None
    for address in addresses:
        try:
            transport, protocol = await loop.create_connection(factory, address, port)
        except OSError as exc:
            error = exc
            continue
        return transport, protocol
    assert error is not None
    raise error


def _endpoint(url: URL) -> tuple[str, int, bool]:
    """(host, port, tls) of an http(s) URL; _InvalidUrlError for anything else."""
    scheme = url.scheme
    host = url.raw_host
    if scheme not in _DEFAULT_PORTS or not host:
        raise _InvalidUrlError(f"{url} (expected http:// or https:// with a host)")
    return host, url.port or _DEFAULT_PORTS[scheme], scheme == "https"


def _host_header(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


def _content_length(message: RawResponseMessage) -> int | None:
    value = message.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # the parser rejects a malformed length before we get here; belt and braces


def _blocked(pacer: Pacer | None, host: str) -> bool:
    """True when `host` is an IP literal in the pacer's blocklist (names are checked on resolve)."""
    return pacer is not None and address_key(host) is not None and pacer.is_blocked(host)


def _url_for_address(target: Target) -> URL:
    address = target.address
    host = f"[{address}]" if ":" in address else address
    if "%" not in address and address_key(address) is not None:
        # An IP literal needs no encoding: building it as encoded skips yarl's host parsing,
        # a sizeable share of a probe's CPU when sweeping addresses.
        return URL.build(scheme="http", host=host, port=target.port, path="/", encoded=True)
    port = f":{target.port}" if target.port is not None else ""
    return URL(f"http://{host}{port}/")
