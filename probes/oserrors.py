"""How socket errors become failure names, and host-name resolution with a deadline.

Shared by the TCP, HTTP and DNS probers so one errno means the same failure everywhere.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from probes.base import Failure
from probes.pacing import address_key

_ERRNO_FAILURES: dict[int, Failure] = {
    errno.ECONNREFUSED: Failure.CONNECTION_REFUSED,
    errno.ECONNRESET: Failure.CONNECTION_RESET,
    errno.EPIPE: Failure.CONNECTION_RESET,
    errno.ECONNABORTED: Failure.CONNECTION_RESET,
    errno.EHOSTUNREACH: Failure.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Failure.HOST_UNREACHABLE,
    errno.ENETUNREACH: Failure.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Failure.NETWORK_UNREACHABLE,
    errno.ETIMEDOUT: Failure.TIMEOUT,
}

# Failures that prove the target itself answered (a RST comes from the host, not a router).
TARGET_ANSWERED = frozenset({Failure.CONNECTION_REFUSED, Failure.CONNECTION_RESET})


def failure_from_oserror(exc: OSError) -> Failure:
    """The failure name for a socket error; `Failure.OTHER` for errnos no probe expects."""
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return Failure.TIMEOUT
    if exc.errno is None:
        return Failure.OTHER
    return _ERRNO_FAILURES.get(exc.errno, Failure.OTHER)


def errno_name(exc: OSError) -> str | None:
    """'ECONNREFUSED' and the like, for details; None when the error carries no errno."""
    return errno.errorcode.get(exc.errno) if exc.errno is not None else None


async def resolve_host(host: str, port: int, timeout_s: float) -> list[str]:
    """IP addresses of `host` (itself when it is an IP literal). Raises OSError or TimeoutError."""
    if address_key(host) is not None:
        return [host]
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s)
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OSError(f"{host}: no addresses")
    return addresses
