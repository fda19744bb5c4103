"""TCP connect probe: a SYN-ACK is success, a RST still proves the host is up.

Ports are tried in order until one connects; a host or network unreachable error stops early
(every other port would get the same answer). Connections are closed with a RST (SO_LINGER 0)
so a scan leaves no TIME_WAIT sockets behind on the vantage and holds nothing open on targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from probes.base import Failure, ProbeResult, ProbeSetupError, ResultSink, Target
from probes.oserrors import TARGET_ANSWERED, errno_name, failure_from_oserror, resolve_host
from probes.pacing import Pacer
from probes.pool import run_pool

_STOP_EARLY = frozenset({Failure.HOST_UNREACHABLE, Failure.NETWORK_UNREACHABLE})
_LINGER_RST = struct.pack("ii", 1, 0)


class TcpProber:
    """Connects to each target's port (or to `ports` in turn when the target names none)."""

    method: ClassVar[str] = "tcp"

    def __init__(self, ports: Sequence[int] = (80, 443), timeout_s: float = 2.0) -> None:
        if not ports:
            raise ProbeSetupError("TcpProber needs at least one port")
        for port in ports:
            if not 0 < port < 65536:
                raise ProbeSetupError(f"TcpProber: port {port} is not in 1..65535")
        if timeout_s <= 0:
            raise ProbeSetupError(f"TcpProber: timeout_s must be positive, got {timeout_s}")
        self.ports = tuple(ports)
        self.timeout_s = timeout_s

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None:
        async def probe(target: Target) -> ProbeResult:
            return await self.probe_one(target, pacer)

        await run_pool(targets, pacer, on_result, probe, self.method)

    async def close(self) -> None:
        return None

    async def probe_one(self, target: Target, pacer: Pacer | None = None) -> ProbeResult:
        """Probe one target; the caller has been admitted by `pacer` (which paces extra ports)."""
        started_at = time.time()
        ports = (target.port,) if target.port is not None else self.ports
        try:
            addresses = await resolve_host(target.address, ports[0], self.timeout_s)
        except (OSError, TimeoutError) as exc:
            return ProbeResult(
                target,
                self.method,
                False,
                False,
                Failure.RESOLVE_ERROR,
                None,
                started_at,
                {"error": str(exc) or type(exc).__name__},
            )
        address = addresses[0]
        outcomes: dict[str, str] = {}
        answered: tuple[int, float, Failure | None] | None = None  # port, rtt, failure
        first_failure: Failure | None = None
        for index, port in enumerate(ports):
            if index and pacer is not None:
                # Every SYN counts against the rate, not only the first port's.
                delay = pacer.reserve(address)
                if delay > 0:
                    await asyncio.sleep(delay)
            failure, rtt, error = await self._connect(address, port)
            outcomes[str(port)] = "open" if failure is None else str(failure)
            if failure is None:
                answered = (port, rtt, None)
                break
            if first_failure is None:
                first_failure = failure
            if failure in TARGET_ANSWERED and answered is None:
                answered = (port, rtt, failure)
            if error is not None:
                outcomes[f"{port}_errno"] = error
            if failure in _STOP_EARLY:
                break
        details: dict[str, Any] = {"ports": outcomes}
        if address != target.address:
            details["address"] = address
        if answered is not None:
            port, rtt, failure = answered
            details["port"] = port
            return ProbeResult(
                target, self.method, True, failure is None, failure, rtt, started_at, details
            )
        return ProbeResult(
            target,
            self.method,
            False,
            False,
            first_failure or Failure.OTHER,
            None,
            started_at,
            details,
        )

    async def _connect(self, address: str, port: int) -> tuple[Failure | None, float, str | None]:
        """(failure or None, seconds until the answer, errno name) for one connect attempt."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        loop = asyncio.get_running_loop()
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                await loop.sock_connect(sock, (address, port))
            return None, time.perf_counter() - start, None
        except TimeoutError:
            return Failure.TIMEOUT, time.perf_counter() - start, None
        except OSError as exc:
            return failure_from_oserror(exc), time.perf_counter() - start, errno_name(exc)
        finally:
            # A socket that never connected may refuse options; closing it is enough then.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            sock.close()
