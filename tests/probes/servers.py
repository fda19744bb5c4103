"""Real local servers for the prober tests: a DNS responder (UDP and TCP), HTTP(S) apps, raw TCP.

Everything listens on loopback (or inside a namespace the test made) on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class DnsBehaviour:
    """How the responder answers one name. `kind`: answer | rcode | garbage | silent | truncate
    | wrong_id | mangled."""

    kind: str = "answer"
    answers: list[str] = field(default_factory=list)
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR
    ttl: int = 300
    payload: bytes = b"\x12\x34 this is not a DNS message"
    cut: int | None = None  # "mangled": keep this many bytes of the real answer...
    mask: bytes = b""  # ...after XOR-ing these bytes into it from offset 2 (the ID stays right)


class DnsResponder:
    """A small authoritative-looking DNS server on UDP and TCP of one loopback port."""

    def __init__(self, zone: dict[str, DnsBehaviour], host: str = "127.0.0.1") -> None:
        self.zone = {name.lower().rstrip(".") + ".": b for name, b in zone.items()}
        self.host = host
        self.port = 0
        self.queries = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def respond(self, wire: bytes, over_tcp: bool) -> bytes | None:
        self.queries += 1
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        name = query.question[0].name.to_text().lower()
        behaviour = self.zone.get(name, DnsBehaviour(kind="rcode", rcode=dns.rcode.NXDOMAIN))
        response = dns.message.make_response(query)
        if behaviour.kind == "silent":
            return None
        if behaviour.kind == "garbage":
            return behaviour.payload
        if behaviour.kind == "rcode":
            response.set_rcode(behaviour.rcode)
            return response.to_wire()
        if behaviour.kind == "truncate" and not over_tcp:
            response.flags |= dns.flags.TC
            return response.to_wire()
        if behaviour.kind == "wrong_id":
            response.id = (query.id + 1) % 65536
        rdtype = query.question[0].rdtype
        if behaviour.answers:
            response.answer.append(
                dns.rrset.from_text_list(
                    name, behaviour.ttl, "IN", dns.rdatatype.to_text(rdtype), behaviour.answers
                )
            )
        wire = response.to_wire()
        if behaviour.kind == "mangled":
            body = bytearray(wire)
            for i, byte in enumerate(behaviour.mask[: max(0, len(body) - 2)]):
                body[2 + i] ^= byte
            wire = bytes(body[: behaviour.cut])
        return wire

    async def __aenter__(self) -> DnsResponder:
        loop = asyncio.get_running_loop()
        responder = self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Udp(asyncio.DatagramProtocol):
            transport: asyncio.DatagramTransport

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = responder.respond(data, over_tcp=False)
                if reply is not None:
                    self.transport.sendto(reply, addr)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = responder.respond(await reader.readexactly(length), over_tcp=True)
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
                else:
                    await reader.read()  # silent: hold the connection until the client leaves
            writer.close()

        # UDP and TCP on the same port number: retry until a free pair is found.
        for _ in range(50):
            udp_sock = socket.socket(family, socket.SOCK_DGRAM)
            _deep_receive_buffer(udp_sock)
            udp_sock.bind((self.host, 0))
            port = udp_sock.getsockname()[1]
            tcp_sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp_sock.bind((self.host, port))
            except OSError:
                udp_sock.close()
                tcp_sock.close()
                continue
            break
        else:
            raise RuntimeError("no free UDP+TCP port pair on loopback")
        self.port = port
        self._udp, _ = await loop.create_datagram_endpoint(Udp, sock=udp_sock)
        tcp_sock.listen(4096)
        self._tcp = await asyncio.start_server(tcp, sock=tcp_sock, backlog=4096)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


def _deep_receive_buffer(sock: socket.socket) -> None:
    """4 MB of receive buffer, so a burst of queries is not dropped before it is read."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force or socket.SO_RCVBUF, 4 << 20)
    except OSError:  # not root: take what the system allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound then released): connecting to it is refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def listener_that_never_accepts(host: str = "127.0.0.1") -> Iterator[int]:
    """A port whose handshakes the kernel completes (a deep backlog) with no accept(): no
    descriptor of this process is taken per connection, for tests that count descriptors."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        sock.listen(4096)
        yield sock.getsockname()[1]


@contextlib.asynccontextmanager
async def raw_tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
    host: str = "127.0.0.1",
) -> AsyncIterator[int]:
    """A raw asyncio TCP server on port 0; yields the port."""

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        result = handler(reader, writer)
        if asyncio.iscoroutine(result):
            await result

    # A deep accept queue: a prober with hundreds of connects in flight must not see SYN drops.
    server = await asyncio.start_server(run, host, 0, backlog=4096)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read a little of the request, then abort the connection with a RST (SO_LINGER 0)."""
    with contextlib.suppress(ConnectionError):
        await reader.read(100)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.asynccontextmanager
async def http_app(
    routes: web.RouteTableDef, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[int]:
    """An aiohttp web app on port 0 (plain or TLS); yields the port."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


def self_signed_context(directory: Path, host: str = "127.0.0.1") -> ssl.SSLContext:
    """A server SSLContext with a fresh self-signed certificate for `host` (no CA trusts it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shutdown-monitor test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context
