"""HTTP(S) probe with aiohttp: status, phase timings, capped body read, polite User-Agent.

Every probe opens a fresh connection (`force_close`): reusing one would hide the connect and TLS
phases, which are the point of the measurement. Redirects are followed by hand, one hop at a
time, so each hop is checked against the blocklist (IP literals before the request, host names
through a resolver that drops blocklisted addresses) and paced like a new probe.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
import time
import weakref
from collections.abc import Collection, Iterable
from importlib import metadata
from types import SimpleNamespace
from typing import Any, ClassVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from probes.base import Failure, ProbeResult, ProbeSetupError, ResultSink, Target, blocked_result
from probes.oserrors import failure_from_oserror
from probes.pacing import Blocklist, Pacer, address_key
from probes.pool import run_pool

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_EXPECTED_STATUS = range(200, 400)
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


# The current probe's phase stamps. asyncio runs the TLS handshake in callbacks that inherit
# the context of the task that opened the connection, so the SSLObject below finds them here.
_STAMPS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "shutdown_monitor_http_stamps", default=None
)


class _TimedSSLObject(ssl.SSLObject):
    """An SSLObject that stamps when the handshake began (TCP connected) and when it finished."""

    def do_handshake(self) -> None:
        stamps = _STAMPS.get()
        if stamps is not None:
            stamps.setdefault("tls_start", time.perf_counter())
        super().do_handshake()
        if stamps is not None:
            stamps["tls_done"] = time.perf_counter()


class BlockedAddressError(OSError):
    """Every address a host name resolved to is in the blocklist."""


class _BlocklistResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver, then drops blocklisted addresses."""

    def __init__(self, blocklists: weakref.WeakSet[Blocklist]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._blocklists = blocklists

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not any(b.contains(r["host"]) for b in self._blocklists)]
        if not allowed:
            raise BlockedAddressError(f"{host}: every address is in the blocklist")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _trace_config() -> aiohttp.TraceConfig:
    """Stamps perf_counter() times of the phases into the per-request dict."""
    config = aiohttp.TraceConfig()

    def stamp(name: str) -> Any:
        async def handler(_session: Any, context: SimpleNamespace, _params: Any) -> None:
            context.trace_request_ctx[name] = time.perf_counter()

        return handler

    config.on_dns_resolvehost_start.append(stamp("dns_start"))
    config.on_dns_resolvehost_end.append(stamp("dns_end"))
    config.on_connection_create_start.append(stamp("connect_start"))
    config.on_connection_create_end.append(stamp("connect_end"))
    config.on_request_headers_sent.append(stamp("headers_sent"))
    return config


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
        if timeout_s <= 0:
            raise ProbeSetupError(f"HttpProber: timeout_s must be positive, got {timeout_s}")
        if max_body_bytes < 0:
            raise ProbeSetupError("HttpProber: max_body_bytes must be 0 or more")
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self.max_body_bytes = max_body_bytes
        self.follow_redirects = follow_redirects
        self.expected_status = expected_status
        self.verify_tls = verify_tls
        self.max_redirects = max_redirects
        self.max_connections = max_connections
        # Every live blocklist of the pacers this prober served (weak: a reloaded blocklist
        # replaces the old one once nothing else holds it).
        self._blocklists: weakref.WeakSet[Blocklist] = weakref.WeakSet()
        self._session: aiohttp.ClientSession | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.sslobject_class = _TimedSSLObject
        return context

    def _session_for(self, blocklist: Blocklist) -> aiohttp.ClientSession:
        self._blocklists.add(blocklist)
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                force_close=True,
                ssl=self._ssl_context(),
                resolver=_BlocklistResolver(self._blocklists),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trace_configs=[_trace_config()],
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s),
                headers={"User-Agent": self.user_agent, "Accept": "*/*"},
                auto_decompress=False,
            )
        return self._session

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None:
        await run_pool(targets, pacer, on_result, lambda t: self.probe_one(t, pacer), self.method)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def probe_one(self, target: Target, pacer: Pacer | None = None) -> ProbeResult:
        """Probe one target; the caller has been admitted by `pacer` (which paces redirects)."""
        session = self._session_for(pacer.blocklist if pacer else Blocklist())
        started_at = time.time()
        start = time.perf_counter()
        url = URL(target.url) if target.url else _url_for_address(target)
        details: dict[str, Any] = {"url": str(url)}
        stamps: dict[str, float] = {}
        _STAMPS.set(stamps)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(session, target, url, pacer, started_at, details, stamps)
        except TimeoutError:
            failure, error = Failure.TIMEOUT, None
        except aiohttp.ClientSSLError as exc:
            failure, error = Failure.TLS_ERROR, str(exc.os_error)
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedAddressError):
                return blocked_result(target, self.method, started_at)
            failure, error = Failure.RESOLVE_ERROR, str(exc.os_error)
        except aiohttp.ClientConnectorError as exc:
            failure, error = failure_from_oserror(exc.os_error), str(exc.os_error)
        except (aiohttp.ClientConnectionResetError, ConnectionResetError) as exc:
            failure, error = Failure.CONNECTION_RESET, str(exc)
        except aiohttp.ServerDisconnectedError as exc:
            # The server closed the connection without a response: a reset or an early FIN.
            failure, error = Failure.CONNECTION_RESET, str(exc)
        except aiohttp.ClientOSError as exc:
            failure, error = failure_from_oserror(exc), str(exc)
        except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as exc:
            failure, error = Failure.HTTP_BAD_RESPONSE, str(exc)
        except aiohttp.InvalidURL as exc:
            failure, error = Failure.OTHER, f"invalid URL: {exc}"
        except ssl.SSLError as exc:
            failure, error = Failure.TLS_ERROR, str(exc)
        elapsed = time.perf_counter() - start
        # The target answered if a TCP connection came up (even if TLS or HTTP then failed) or
        # if it refused or reset us; a timeout before connecting or an ICMP error proves nothing.
        connected = "connect_end" in stamps or "tls_start" in stamps
        reachable = connected or failure in _TARGET_ANSWERED
        if error:
            details["error"] = error
        details["total_s"] = round(elapsed, 6)
        rtt = (
            _first_answer_s(stamps, start)
            if connected
            else (round(elapsed, 6) if reachable else None)
        )
        return ProbeResult(target, self.method, reachable, False, failure, rtt, started_at, details)

    async def _fetch(
        self,
        session: aiohttp.ClientSession,
        target: Target,
        url: URL,
        pacer: Pacer | None,
        started_at: float,
        details: dict[str, Any],
        stamps: dict[str, float],
    ) -> ProbeResult:
        start = time.perf_counter()
        redirects: list[dict[str, Any]] = []
        for hop in range(self.max_redirects + 1):
            host = url.host or ""
            # The URL may name another address than the target's: the blocklist rules both.
            if not hop and host != target.address and _blocked(pacer, host):
                return blocked_result(target, self.method, started_at)
            if hop:
                if _blocked(pacer, host):
                    return blocked_result(target, self.method, started_at)
                if pacer is not None:  # each hop is one more request: it counts against the rate
                    delay = pacer.reserve(host)
                    if delay > 0:
                        await asyncio.sleep(delay)
                stamps.clear()
            async with session.get(
                url, allow_redirects=False, trace_request_ctx=stamps
            ) as response:
                stamps["headers_received"] = time.perf_counter()
                status = response.status
                location = response.headers.get("Location")
                follow = (
                    self.follow_redirects
                    and status in REDIRECT_STATUSES
                    and location is not None
                    and hop < self.max_redirects
                )
                if follow and location is not None:
                    next_url = url.join(URL(location))
                    redirects.append({"status": status, "location": str(next_url)})
                    if next_url.scheme in ("http", "https"):
                        url = next_url
                        continue
                details.update(phase_timings(stamps))
                details["status"] = status
                if location is not None:
                    details["location"] = location
                if redirects:
                    details["redirects"] = redirects
                    details["final_url"] = str(url)
                rtt = details.get("connect_s")
                if status not in self.expected_status:
                    details["total_s"] = round(time.perf_counter() - start, 6)
                    return ProbeResult(
                        target,
                        self.method,
                        True,
                        False,
                        Failure.HTTP_STATUS,
                        rtt,
                        started_at,
                        details,
                    )
                too_large = await self._read_capped(response, details)
                details["total_s"] = round(time.perf_counter() - start, 6)
                failure = Failure.TOO_LARGE if too_large else None
                return ProbeResult(
                    target, self.method, True, not too_large, failure, rtt, started_at, details
                )
        raise AssertionError("unreachable: the last hop never follows a redirect")

    async def _read_capped(self, response: aiohttp.ClientResponse, details: dict[str, Any]) -> bool:
        """Read at most max_body_bytes; True when the body is larger than that."""
        declared = response.content_length
        if declared is not None and declared > self.max_body_bytes:
            details["body_bytes"] = declared
            return True
        size = 0
        async for chunk in response.content.iter_chunked(16384):
            size += len(chunk)
            if size > self.max_body_bytes:
                details["body_bytes"] = f">{self.max_body_bytes}"
                return True
        details["body_bytes"] = size
        return False


def _blocked(pacer: Pacer | None, host: str) -> bool:
    """True when `host` is an IP literal in the pacer's blocklist (names are checked on resolve)."""
    return pacer is not None and address_key(host) is not None and pacer.is_blocked(host)


def _url_for_address(target: Target) -> URL:
    host = f"[{target.address}]" if ":" in target.address else target.address
    port = f":{target.port}" if target.port is not None else ""
    return URL(f"http://{host}{port}/")


def _first_answer_s(stamps: dict[str, float], start: float) -> float | None:
    """Seconds from the start to the first sign of life (TCP connection up), when known."""
    if "tls_start" in stamps:
        return round(stamps["tls_start"] - start, 6)
    if "connect_end" in stamps:
        return round(stamps["connect_end"] - start, 6)
    return None
