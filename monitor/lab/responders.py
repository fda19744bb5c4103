"""The world namespace's servers: one HTTP server for every address, DNS resolvers.

Run by the lab inside the world namespace (`python -m monitor.lab.responders`):
- HTTP on 0.0.0.0:80 answers `200 ok` on every AnyIP address of every country;
- each `--dns ADDRESS` gets a UDP resolver that answers `A` queries for any name with
  DNS_ANSWER, or with DNS_TAMPERED_ANSWER while its address is listed in `--tamper-file` (the
  dns-tamper scenario rewrites that file). Malformed queries are counted and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path
from typing import cast

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from monitor.lab.world import DNS_ANSWER, DNS_TAMPERED_ANSWER

log = logging.getLogger("monitor.lab.responders")
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
HTTP_BODY = b"ok\n"


class TamperList:
    """The resolver addresses that lie right now; re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._addresses: frozenset[str] = frozenset()

    def addresses(self) -> frozenset[str]:
        try:
            info = self.path.stat()
        except OSError:
            return frozenset()
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            text = self.path.read_text(encoding="ascii", errors="replace")
            self._addresses = frozenset(line.strip() for line in text.splitlines() if line.strip())
        return self._addresses


def dns_answer(query_wire: bytes, lying: bool) -> bytes | None:
    """The resolver's reply to one query (None: not a DNS query at all, ignore it)."""
    try:
        query = dns.message.from_wire(query_wire)
    except (dns.exception.DNSException, ValueError):
        return None
    reply = dns.message.make_response(query)
    for question in query.question:
        if question.rdtype == dns.rdatatype.A and question.rdclass == dns.rdataclass.IN:
            answer = DNS_TAMPERED_ANSWER if lying else DNS_ANSWER
            reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", answer))
    if not query.question:
        reply.set_rcode(dns.rcode.FORMERR)
    return reply.to_wire()


class DnsResponder(asyncio.DatagramProtocol):
    def __init__(self, address: str, tamper: TamperList) -> None:
        self.address = address
        self.tamper = tamper
        self.malformed = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        reply = dns_answer(data, self.address in self.tamper.addresses())
        if reply is None:
            self.malformed += 1
            return
        if self.transport is not None:
            self.transport.sendto(reply, addr)


async def http_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        with contextlib.suppress(asyncio.LimitOverrunError, ValueError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                     + str(len(HTTP_BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + HTTP_BODY)
        await writer.drain()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _udp_socket(address: str) -> socket.socket:
    # AnyIP addresses are local by route, not by interface: FREEBIND lets bind() take them.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    sock.bind((address, 53))
    sock.setblocking(False)
    return sock


def _mark_ready(path: Path) -> None:
    path.write_text("ready\n")


async def serve(resolvers: list[str], tamper_file: Path, ready_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(http_client, "0.0.0.0", 80, backlog=1024,
                                        reuse_address=True)
    tamper = TamperList(tamper_file)
    transports = []
    for address in resolvers:
        protocol = DnsResponder(address, tamper)
        transport, _ = await loop.create_datagram_endpoint(
            lambda p=protocol: p, sock=_udp_socket(address))  # type: ignore[misc]
        transports.append(transport)
    if ready_file is not None:
        _mark_ready(ready_file)
    await stop.wait()
    server.close()
    for transport in transports:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dns", action="append", default=[], metavar="ADDRESS")
    parser.add_argument("--tamper-file", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    asyncio.run(serve(args.dns, args.tamper_file, args.ready_file))


if __name__ == "__main__":
    main()
