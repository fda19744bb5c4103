"""A raw ICMP socket that watches a namespace's ICMP traffic: the tests' independent witness.

It sees every ICMP packet delivered in the namespace (the echo requests to an AnyIP range and
their replies included), stamped by the kernel when it arrived, so a test can check a prober's
send times and RTTs against what really crossed the wire, and may react to each packet.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable

from probes.icmp import ICMP4_ECHO_REPLY, ICMP4_ECHO_REQUEST
from probes.stamps import STAMP_ANCILLARY_BYTES, enable_receive_stamps, kernel_receive_time

_SO_RCVBUFFORCE = 33  # root may pass net.core.rmem_max: a burst of replies must not be lost
_RECEIVE_BUFFER = 16 << 20


class Tap:
    """`requests`: echo requests seen per destination. `arrived[(type, far end)]`: the kernel's
    stamp of the first echo request to (type 8) or echo reply from (type 0) an address."""

    def __init__(self, react: Callable[[bytes, str], None] | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RECEIVE_BUFFER)
        enable_receive_stamps(self.sock)
        self.requests: Counter[str] = Counter()
        self.arrived: dict[tuple[int, str], float] = {}
        self.react = react
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                packet, ancdata, _flags, (source, _port) = self.sock.recvmsg(
                    4096, STAMP_ANCILLARY_BYTES
                )
            except BlockingIOError:
                return
            kind = packet[20]
            if kind in (ICMP4_ECHO_REQUEST, ICMP4_ECHO_REPLY):
                # The far end: a request's destination, a reply's source.
                far = socket.inet_ntoa(
                    packet[16:20] if kind == ICMP4_ECHO_REQUEST else packet[12:16]
                )
                if kind == ICMP4_ECHO_REQUEST:
                    self.requests[far] += 1
                stamp = kernel_receive_time(ancdata)
                if stamp is not None:
                    self.arrived.setdefault((kind, far), stamp)
            if self.react is not None:
                self.react(packet, source)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
