"""ICMP echo prober: one socket per address family, tens of thousands of probes in flight.

Design (issue 2): no socket and no task per probe. One sender loop writes echo requests on a
shared socket per family; one reader callback drains replies and matches them on
(source address, seq) after checking the echo id; one sweep timer ends overdue probes in bulk
from a deque ordered by deadline. The targets iterable is consumed lazily, so a million queued
targets cost only what the caller holds.

RTTs come from the kernel (probes/stamps.py): SO_TIMESTAMPING stamps every received packet and
every error-queue entry, and the time a reply then waited for a busy event loop is taken off.

Sockets: unprivileged ICMP datagram sockets where `net.ipv4.ping_group_range` admits our group
(the kernel picks the echo id, which is the socket's local "port", and delivers only replies with
that id); raw sockets when privileged (we pick the id, filter ICMP types in the kernel and parse
IP headers ourselves). Parsing is pure functions over bytes: they never raise on bad input.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from probes.base import (
    Failure,
    ProbeResult,
    ProbeSetupError,
    ResultSink,
    Target,
    unanswered,
)
from probes.calls import ProbeCall
from probes.records import Records
from probes.stamps import (
    STAMP_ANCILLARY_BYTES,
    enable_receive_stamps,
    honest_rtt,
    kernel_receive_time,
)

if TYPE_CHECKING:
    from probes.pacing import Blocklist, Pacer

METHOD = "icmp"

ICMP4_ECHO_REPLY = 0
ICMP4_DEST_UNREACHABLE = 3
ICMP4_ECHO_REQUEST = 8
ICMP4_TIME_EXCEEDED = 11
ICMP6_DEST_UNREACHABLE = 1
ICMP6_TIME_EXCEEDED = 3
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129

# Kinds of parsed message.
ECHO_REPLY = "echo_reply"
ERROR = "error"  # destination unreachable / time exceeded quoting one of our echo requests
UNRELATED = "unrelated"  # any other well-formed ICMP message

# Linux socket options Python does not name.
_SOL_RAW = 255
_ICMP_FILTER = 1
_ICMP6_FILTER = 1
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_SO_RCVBUFFORCE = 33
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3
# Room for the receive stamps, and for IP_RECVERR's sock_extended_err plus the offender's
# address.
_ERROR_ANCILLARY_BYTES = 512

_ECHO_HEADER = struct.Struct("!BBHHH")
_EXTENDED_ERR = struct.Struct("=IBBBBII")

# Send this many probes, then yield to the event loop so replies are drained before the socket
# receive buffer overflows (an overflow would be false loss).
_SENDS_PER_YIELD = 256
# Replies handled per reader callback, so a flood cannot starve the sender and the sweep.
_READS_PER_CALLBACK = 4096
_RECEIVE_BUFFER_BYTES = 8 << 20
_MAX_PACKET = 2048

_ENABLE_HINT = (
    "enable one of: unprivileged ICMP sockets for your group with "
    '`sysctl -w net.ipv4.ping_group_range="0 2147483647"`, or raw sockets by running as root '
    "or granting the capability with `setcap cap_net_raw+ep $(readlink -f $(which python3))`"
)


class ParsedIcmp(NamedTuple):
    """One ICMP message as the prober needs it. `ident`/`seq` are -1 when the message has none.

    For ECHO_REPLY: ident/seq/payload of the reply, `ttl` from the IPv4 header when there was one.
    For ERROR: ident/seq of OUR quoted echo request and `quoted_dst`, the address it was sent to.
    """

    kind: str
    icmp_type: int
    code: int
    ident: int
    seq: int
    ttl: int | None
    quoted_dst: str | None
    payload: bytes


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_echo(icmp_type: int, ident: int, seq: int, payload: bytes, code: int = 0) -> bytes:
    """An echo request or reply with a correct checksum (ICMPv6 leaves it to the kernel)."""
    header = _ECHO_HEADER.pack(icmp_type, code, 0, ident & 0xFFFF, seq & 0xFFFF)
    if icmp_type in (ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY):
        return header + payload
    checksum = internet_checksum(header + payload)
    return _ECHO_HEADER.pack(icmp_type, code, checksum, ident & 0xFFFF, seq & 0xFFFF) + payload


def build_ipv4(src: str, dst: str, payload: bytes, ttl: int = 64, protocol: int = 1) -> bytes:
    """A minimal IPv4 header (no options) in front of `payload`: what a raw socket receives."""
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(payload), 0, 0, ttl, protocol, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    checksum = internet_checksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


def build_ipv6_header(src: str, dst: str, payload_len: int, next_header: int = 58) -> bytes:
    """A fixed IPv6 header (no extension headers), as quoted inside ICMPv6 errors."""
    return struct.pack(
        "!IHBB16s16s",
        6 << 28, payload_len, next_header, 64,
        socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst),
    )  # fmt: skip


def build_error4(icmp_type: int, code: int, quoted_ip_packet: bytes) -> bytes:
    """An ICMPv4 error quoting the start of an IP packet (RFC 792: header + 8 bytes)."""
    body = struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted_ip_packet
    checksum = internet_checksum(body)
    return body[:2] + struct.pack("!H", checksum) + body[4:]


def build_error6(icmp_type: int, code: int, quoted_ip_packet: bytes) -> bytes:
    """An ICMPv6 error (the kernel or the parser does not need the checksum)."""
    return struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted_ip_packet


def _unrelated(icmp_type: int, code: int, ttl: int | None) -> ParsedIcmp:
    return ParsedIcmp(UNRELATED, icmp_type, code, -1, -1, ttl, None, b"")


def parse_icmp4(data: bytes, with_ip_header: bool) -> ParsedIcmp | None:
    """Parse what an ICMPv4 socket returned: raw sockets include the IPv4 header, datagram
    sockets do not. None for truncated or garbage input; never raises."""
    ttl: int | None = None
    if with_ip_header:
        if len(data) < 20 or data[0] >> 4 != 4:
            return None
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20 or data[9] != 1 or len(data) < ihl + 8:
            return None
        ttl = data[8]
        data = data[ihl:]
    elif len(data) < 8:
        return None
    icmp_type, code, _checksum, ident, seq = _ECHO_HEADER.unpack_from(data)
    if icmp_type == ICMP4_ECHO_REPLY:
        return ParsedIcmp(ECHO_REPLY, icmp_type, code, ident, seq, ttl, None, data[8:])
    if icmp_type not in (ICMP4_DEST_UNREACHABLE, ICMP4_TIME_EXCEEDED):
        return _unrelated(icmp_type, code, ttl)
    quoted = data[8:]
    if len(quoted) < 20 or quoted[0] >> 4 != 4:
        return None
    inner_ihl = (quoted[0] & 0x0F) * 4
    if inner_ihl < 20 or len(quoted) < inner_ihl + 8:
        return None
    if quoted[9] != 1 or quoted[inner_ihl] != ICMP4_ECHO_REQUEST:
        return _unrelated(icmp_type, code, ttl)
    _t, _c, _s, q_ident, q_seq = _ECHO_HEADER.unpack_from(quoted, inner_ihl)
    dst = socket.inet_ntoa(quoted[16:20])
    return ParsedIcmp(ERROR, icmp_type, code, q_ident, q_seq, ttl, dst, b"")


def parse_icmp6(data: bytes) -> ParsedIcmp | None:
    """Parse an ICMPv6 message (raw and datagram sockets both omit the IPv6 header)."""
    if len(data) < 8:
        return None
    icmp_type, code, _checksum, ident, seq = _ECHO_HEADER.unpack_from(data)
    if icmp_type == ICMP6_ECHO_REPLY:
        return ParsedIcmp(ECHO_REPLY, icmp_type, code, ident, seq, None, None, data[8:])
    if icmp_type not in (ICMP6_DEST_UNREACHABLE, ICMP6_TIME_EXCEEDED):
        return _unrelated(icmp_type, code, None)
    quoted = data[8:]
    if len(quoted) < 48 or quoted[0] >> 4 != 6:
        return None
    if quoted[6] != 58 or quoted[40] != ICMP6_ECHO_REQUEST:
        return _unrelated(icmp_type, code, None)
    _t, _c, _s, q_ident, q_seq = _ECHO_HEADER.unpack_from(quoted, 40)
    dst = socket.inet_ntop(socket.AF_INET6, quoted[24:40])
    return ParsedIcmp(ERROR, icmp_type, code, q_ident, q_seq, None, dst, b"")


class ExtendedError(NamedTuple):
    """A `struct sock_extended_err` from a datagram socket's error queue (IP_RECVERR)."""

    errno: int
    origin: int
    icmp_type: int
    code: int
    offender: str | None


def parse_extended_error(cdata: bytes, v6: bool) -> ExtendedError | None:
    """Parse IP_RECVERR / IPV6_RECVERR ancillary data; None when too short. Never raises."""
    if len(cdata) < _EXTENDED_ERR.size:
        return None
    err, origin, icmp_type, code, _pad, _info, _data = _EXTENDED_ERR.unpack_from(cdata)
    offender: str | None = None
    tail = cdata[_EXTENDED_ERR.size :]
    if v6 and len(tail) >= 24 and struct.unpack_from("=H", tail)[0] == socket.AF_INET6:
        offender = socket.inet_ntop(socket.AF_INET6, tail[8:24])
    elif not v6 and len(tail) >= 8 and struct.unpack_from("=H", tail)[0] == socket.AF_INET:
        offender = socket.inet_ntoa(tail[4:8])
    return ExtendedError(err, origin, icmp_type, code, offender)


def failure_for_icmp_error(v6: bool, icmp_type: int, code: int) -> Failure:
    """Map an ICMP error about one of our echoes to a failure name."""
    if v6:
        if icmp_type == ICMP6_DEST_UNREACHABLE:
            # 0 no route, 6 reject route: the network; 1 prohibited, 3 address, 5 policy: the host.
            return Failure.NETWORK_UNREACHABLE if code in (0, 6) else Failure.HOST_UNREACHABLE
        return Failure.NETWORK_UNREACHABLE  # time exceeded: a routing loop or a too-long path
    if icmp_type == ICMP4_DEST_UNREACHABLE:
        # Codes 0 net, 6 net unknown, 9 net prohibited, 11 net for TOS; the rest name the host.
        return Failure.NETWORK_UNREACHABLE if code in (0, 6, 9, 11) else Failure.HOST_UNREACHABLE
    return Failure.NETWORK_UNREACHABLE


def failure_for_send_error(err: int) -> Failure:
    """Map a local sendto() error (the route table refused) to a failure name."""
    if err == errno.EHOSTUNREACH:
        return Failure.HOST_UNREACHABLE
    # ENETUNREACH: no route; EINVAL: a blackhole route; EACCES: a prohibit route.
    if err in (errno.ENETUNREACH, errno.EINVAL, errno.EACCES):
        return Failure.NETWORK_UNREACHABLE
    return Failure.OTHER


async def send_echo(
    endpoint: EchoSocket, packet: bytes, address: str, drain_errors: Callable[[], None]
) -> tuple[int | None, float]:
    """Send one echo the slow way, after a quick send failed: waits for room in a full buffer.
    Returns None, or an errno when the kernel refused it for good, and time.monotonic() just
    before the last attempt: when it went (its answer may be queued before sendto returns).
    `drain_errors` reads the socket's error queue (datagram sockets)."""
    retried_stale = False
    tried = time.monotonic()
    for _attempt in range(1000):
        tried = time.monotonic()
        try:
            endpoint.sock.sendto(packet, (address, 0))
            return None, tried
        except BlockingIOError:
            await _writable(endpoint.sock)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                await asyncio.sleep(0.001)
                continue
            if not endpoint.raw and not retried_stale:
                # With IP_RECVERR an ICMP error about an EARLIER probe is reported by the
                # next send on the socket; sending again tells a real route error apart.
                retried_stale = True
                drain_errors()
                continue
            return exc.errno or errno.EIO, tried
    return errno.ENOBUFS, tried


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def error_outcome(
    v6: bool,
    icmp_type: int,
    code: int,
    reporter: str | None,
    received: float | None,
    sent_mono: float,
) -> tuple[Failure, dict[str, Any]]:
    """The failure and details of a probe an ICMP error ended. `received`: the error's kernel
    stamp; `sent_mono`: when the probe went (time.monotonic())."""
    # Not the target's RTT (it did not answer) but how far away the reporter is.
    error_rtt, rtt_source = honest_rtt(received, time.time(), time.monotonic() - sent_mono)
    details: dict[str, Any] = {
        "icmp_type": icmp_type, "icmp_code": code, "error_rtt_s": error_rtt,
        "rtt_source": rtt_source,
    }  # fmt: skip
    if reporter is not None:
        details["reported_by"] = reporter
    return failure_for_icmp_error(v6, icmp_type, code), details


def read_error_queue(
    endpoint: EchoSocket, stats: IcmpStats
) -> Iterator[tuple[int, int, str, ExtendedError, float | None]]:
    """The ICMP errors a datagram socket queued (IP_RECVERR), as (echo id, seq, where the probe
    went, the error, its kernel stamp): the data is our own echo request as sent, the address
    is where it went. Malformed entries and locally raised ones are counted and skipped."""
    v6 = endpoint.v6
    level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
    kind = _IPV6_RECVERR if v6 else _IP_RECVERR
    for _ in range(_READS_PER_CALLBACK):
        try:
            data, ancdata, _flags, address = endpoint.sock.recvmsg(
                _MAX_PACKET, _ERROR_ANCILLARY_BYTES, socket.MSG_ERRQUEUE
            )
        except OSError:
            return
        extended = next(
            (
                parse_extended_error(cdata, v6)
                for cmsg_level, cmsg_type, cdata in ancdata
                if cmsg_level == level and cmsg_type == kind
            ),
            None,
        )
        if extended is None:
            stats.malformed += 1
            continue
        if extended.origin not in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6):
            stats.local_errors += 1
            continue
        if len(data) < 8 or not address:
            stats.malformed += 1
            continue
        _t, _c, _s, ident, seq = _ECHO_HEADER.unpack_from(data)
        yield ident, seq, address[0], extended, kernel_receive_time(ancdata)


@dataclass(slots=True)
class IcmpStats:
    """Counters for everything the prober sent, matched, ignored or gave up on."""

    sent: int = 0
    echo_replies: int = 0  # replies matched to a probe in flight
    timeouts: int = 0
    unreachable: int = 0  # probes ended by an ICMP error quoting them
    send_errors: int = 0  # probes ended by a local sendto() error (route table, firewall)
    blocked: int = 0  # blocklisted targets: nothing sent
    malformed: int = 0  # truncated or garbage packets
    wrong_id: int = 0  # echo replies/errors carrying another pinger's echo id
    wrong_payload: int = 0  # our id and seq, but not the payload we sent
    unmatched: int = 0  # our id, but (source, seq) fits no probe in flight: wrong address/seq, late
    duplicates: int = 0  # a second answer for a probe already answered
    unrelated: int = 0  # other ICMP: errors about traffic that is not ours, other types
    local_errors: int = 0  # error-queue entries raised locally, not by an ICMP message

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class EchoTemplate:
    """Echo requests that differ only in seq, built without summing the payload every time."""

    __slots__ = ("_partial_sum", "ident", "payload", "request_type", "v6")

    def __init__(self, v6: bool, ident: int, payload: bytes) -> None:
        self.v6 = v6
        self.ident = ident & 0xFFFF
        self.payload = payload
        self.request_type = ICMP6_ECHO_REQUEST if v6 else ICMP4_ECHO_REQUEST
        # The checksum is a one's-complement sum in which only seq changes; the sum of the
        # packet with seq 0 is the complement of that packet's checksum.
        seq0 = build_echo(self.request_type, self.ident, 0, payload)
        self._partial_sum = ~_ECHO_HEADER.unpack_from(seq0)[2] & 0xFFFF

    def packet(self, seq: int) -> bytes:
        if self.v6:
            checksum = 0  # the kernel fills the ICMPv6 checksum in
        else:
            total = self._partial_sum + seq
            total = (total & 0xFFFF) + (total >> 16)
            checksum = ~total & 0xFFFF
        header = _ECHO_HEADER.pack(self.request_type, 0, checksum, self.ident, seq)
        return header + self.payload


class _Call(ProbeCall):
    """One probe_many call: its pacer, the clock offset its send times are derived with, and
    how a result is handed over. Here a probe's `ref` is its Target and a result a ProbeResult
    for the caller's sink; _KeyedCall hands over records instead."""

    __slots__ = ("active", "pacer", "screens_literals", "wall_offset")

    def __init__(
        self, on_result: ResultSink, pacer: Pacer | None, done: asyncio.Future[None]
    ) -> None:
        super().__init__(on_result, done)
        # time.time() - time.monotonic(): wall-clock send times from the monotonic stamps.
        self.wall_offset = time.time() - time.monotonic()
        self.pacer = pacer  # in-flight slots go back to the pacer they came from
        # Blocklists are immutable: with an empty one, skip the per-target lookup.
        self.screens_literals = pacer is not None and len(pacer.blocklist) > 0
        self.active = True  # False once probe_many returned: late answers go nowhere

    def is_blocked(self, address: str) -> bool:
        return self.pacer is not None and self.pacer.is_blocked(address)

    def answered(
        self, ref: Any, rtt: float, rtt_source: str, started_at: float, ttl: int | None = None
    ) -> None:
        details: dict[str, Any] = {"rtt_source": rtt_source}
        if ttl is not None:
            details["ttl"] = ttl
        self.give(ProbeResult(ref, METHOD, True, True, None, rtt, started_at, details))

    def ended(
        self, ref: Any, failure: Failure, started_at: float, details: dict[str, Any] | None = None
    ) -> None:
        self.give(unanswered(ref, METHOD, failure, started_at, details))


class _KeyedCall(_Call):
    """A probe_keyed call: a probe's `ref` is the caller's integer key, results go into
    `records` with no Target or ProbeResult made. No pacer: the caller paced every probe."""

    __slots__ = ("blocklist", "records")

    def __init__(self, records: Records, blocklist: Blocklist, done: asyncio.Future[None]) -> None:
        super().__init__(_no_sink, None, done)
        self.records = records
        self.blocklist = blocklist

    def is_blocked(self, address: str) -> bool:
        return self.blocklist.contains(address)

    def answered(
        self, ref: Any, rtt: float, rtt_source: str, started_at: float, ttl: int | None = None
    ) -> None:
        if ttl is None:
            self.records.answered(ref, rtt, rtt_source, started_at)
        else:
            self.records.answered(ref, rtt, rtt_source, started_at, {"ttl": ttl})

    def ended(
        self, ref: Any, failure: Failure, started_at: float, details: dict[str, Any] | None = None
    ) -> None:
        self.records.ended(ref, failure, started_at, details or {})


def _no_sink(result: ProbeResult) -> None:
    raise AssertionError("a keyed call hands over records, not ProbeResults")


class _Pending:
    """One echo in flight. Answered entries stay until their deadline to recognise duplicates.

    Kept small (up to rate x timeout of them are alive): the deadline is `sent_mono` plus the
    prober's timeout and the wall-clock send time is `sent_mono` plus the call's offset.
    """

    __slots__ = ("answered", "call", "key", "ref", "sent_mono")

    def __init__(self, key: tuple[str, int], ref: Any, call: _Call, sent_mono: float) -> None:
        self.key = key
        self.ref = ref  # what the call knows the target by (_Call: the Target; _KeyedCall: a key)
        self.call = call
        self.sent_mono = sent_mono
        self.answered = False

    @property
    def started_at(self) -> float:
        return self.call.wall_offset + self.sent_mono


class EchoSocket:
    """An ICMP echo socket (datagram or raw) set up for probing: non-blocking, a deep receive
    buffer, kernel receive stamps, errors queued (datagram) or filtered (raw); with its echo id,
    seq counter and packet template. IcmpProber has one per address family."""

    def __init__(self, v6: bool, raw: bool, payload: bytes) -> None:
        family = socket.AF_INET6 if v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        kind = socket.SOCK_RAW if raw else socket.SOCK_DGRAM
        self.v6 = v6
        self.raw = raw
        self.sock = socket.socket(family, kind, proto)
        try:
            self._configure(payload)
        except BaseException:
            self.sock.close()
            raise

    def _configure(self, payload: bytes) -> None:
        sock = self.sock
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RECEIVE_BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER_BYTES)
        if self.raw:
            # Only echo replies and the errors that may quote our echoes reach user space:
            # without this a raw socket also reads every echo request the host sends or gets.
            if self.v6:
                blocked = [0xFFFFFFFF] * 8
                for wanted in (ICMP6_ECHO_REPLY, ICMP6_DEST_UNREACHABLE, ICMP6_TIME_EXCEEDED):
                    blocked[wanted >> 5] &= ~(1 << (wanted & 31))
                sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("=8I", *blocked))
            else:
                wanted4 = 0
                for wanted in (ICMP4_ECHO_REPLY, ICMP4_DEST_UNREACHABLE, ICMP4_TIME_EXCEEDED):
                    wanted4 |= 1 << wanted
                sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("=I", ~wanted4 & 0xFFFFFFFF))
            self.ident = (os.getpid() ^ int.from_bytes(os.urandom(2), "big")) & 0xFFFF
        else:
            # The kernel assigns the echo id on bind; errors come through the error queue.
            sock.bind(("::", 0) if self.v6 else ("0.0.0.0", 0))
            self.ident = sock.getsockname()[1]
            level = socket.IPPROTO_IPV6 if self.v6 else socket.IPPROTO_IP
            sock.setsockopt(level, _IPV6_RECVERR if self.v6 else _IP_RECVERR, 1)
        # Receive times from the kernel: what a busy event loop adds is not network RTT.
        enable_receive_stamps(sock)
        self.payload = payload
        self.template = EchoTemplate(self.v6, self.ident, payload)
        self.seq = int.from_bytes(os.urandom(2), "big")

    def close(self) -> None:
        self.sock.close()


class IcmpProber:
    """ICMP echo ("ping") for many targets at once over one socket per address family.

    `privileged`: True = raw sockets only, False = unprivileged datagram sockets only,
    None = datagram sockets when `net.ipv4.ping_group_range` allows, else raw sockets.
    `timeout_s`: how long to wait for an answer. `payload_size`: bytes of echo payload, random
    per prober and checked on every reply.
    """

    method: ClassVar[str] = METHOD

    def __init__(
        self, *, timeout_s: float = 2.0, payload_size: int = 8, privileged: bool | None = None
    ) -> None:
        if timeout_s <= 0:
            raise ProbeSetupError(f"icmp: timeout_s must be positive, got {timeout_s!r}")
        if not 0 <= payload_size <= 1024:
            raise ProbeSetupError(f"icmp: payload_size must be 0..1024 bytes, got {payload_size!r}")
        self.timeout_s = timeout_s
        self.privileged = privileged
        self.stats = IcmpStats()
        self._payload = os.urandom(payload_size)
        self._endpoints: dict[bool, EchoSocket] = {}
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._deadlines: deque[_Pending] = deque()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: set[_Call] = set()
        self._closed = False

    # -- public ---------------------------------------------------------------------------

    @property
    def mode(self) -> dict[str, str]:
        """Socket kind in use per family: {"ipv4": "datagram" | "raw", ...} (opened lazily)."""
        return {
            ("ipv6" if v6 else "ipv4"): ("raw" if ep.raw else "datagram")
            for v6, ep in self._endpoints.items()
        }

    @property
    def payload(self) -> bytes:
        """The echo payload this prober sends (random per prober, checked on every reply)."""
        return self._payload

    def echo_id(self, v6: bool = False) -> int | None:
        """The echo id our socket of that family uses (the kernel's choice on datagram sockets)."""
        endpoint = self._endpoints.get(v6)
        return None if endpoint is None else endpoint.ident

    def open(self, v6: bool = False) -> None:
        """Open the socket of a family now (probe_many opens them on demand). Raises
        ProbeSetupError, saying how to enable ICMP, when neither socket kind is permitted."""
        self._claim_loop()  # sockets of an event loop that is over are reopened on this one
        self._endpoint(v6)

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None:
        await self._run(_Call(on_result, pacer, self._claim_loop().create_future()),
                        ((target, target.address) for target in targets))  # fmt: skip

    async def probe_keyed(
        self, pairs: Iterable[tuple[int, str]], records: Records, blocklist: Blocklist
    ) -> None:
        """Probe (key, address) pairs, handing results over as `records` under their keys:
        the worker pool's path, with no Target and no ProbeResult made per probe.

        Nothing is paced here: the caller's Pacer admitted every target before handing it over
        (rates, in-flight cap, the blocklist). `blocklist` screens only the addresses host
        names resolve to here."""
        call = _KeyedCall(records, blocklist, self._claim_loop().create_future())
        await self._run(call, pairs)

    async def close(self) -> None:
        """Close the sockets; probes still in flight are released without a result."""
        self._closed = True
        self._reset()

    def _claim_loop(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise ProbeSetupError("icmp: probe_many on a closed prober")
        loop = asyncio.get_running_loop()
        old = self._loop
        if old is not None and old is not loop:
            # A loop that is closed took its calls with it (their tasks will not run again).
            if not old.is_closed() and (self._calls or old.is_running()):
                raise ProbeSetupError("icmp: the prober is in use on another event loop")
            self._reset()  # an earlier asyncio.run() is over: reopen the sockets on this loop
        self._loop = loop
        return loop

    async def _run(self, call: _Call, pairs: Iterable[tuple[Any, str]]) -> None:
        self._calls.add(call)
        try:
            await self._feed(pairs, call, asyncio.get_running_loop())
            call.fed = True
            if call.outstanding:
                await call.done
            if call.error is not None:
                raise call.error
        finally:
            call.active = False
            self._calls.discard(call)

    def _reset(self) -> None:
        """Forget sockets, timers and probes in flight (on close, or before moving loops)."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for endpoint in self._endpoints.values():
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(endpoint.sock.fileno())
            endpoint.close()
        self._endpoints.clear()
        for entry in self._deadlines:  # every probe not yet swept, answered or not
            if not entry.answered and entry.call.pacer is not None:
                entry.call.pacer.release_slot()
        self._pending.clear()
        self._deadlines.clear()
        for call in list(self._calls):
            if not call.done.done() and not call.done.get_loop().is_closed():
                call.done.set_exception(ProbeSetupError("icmp: prober closed during probe_many"))
        self._calls.clear()
        self._loop = None

    # -- sending --------------------------------------------------------------------------

    async def _feed(
        self, pairs: Iterable[tuple[Any, str]], call: _Call, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Send an echo to each (ref, address), paced by the call's pacer when it has one."""
        pending = self._pending
        deadlines = self._deadlines
        stats = self.stats
        timeout = self.timeout_s
        pacer = call.pacer
        screens_literals = call.screens_literals
        monotonic = time.monotonic
        wall = time.time
        # Wall-clock send times from the monotonic stamp: one clock read per probe, not two.
        wall_offset = call.wall_offset
        inet_pton = socket.inet_pton
        af_inet = socket.AF_INET
        since_yield = 0
        for ref, address in pairs:
            if call.error is not None:
                return
            if screens_literals and call.is_blocked(address):
                stats.blocked += 1
                self._deliver_now(call, ref, Failure.BLOCKED_BY_POLICY, wall())
                continue
            # The reply's source comes back in canonical form; IPv4 literals that inet_pton
            # accepts already are canonical, IPv6 ones are normalised here.
            try:
                inet_pton(af_inet, address)
                v6 = False
                key_address = address
            except OSError:
                resolved = await self._resolve(address, ref, call, loop)
                if resolved is None:
                    continue
                key_address, v6 = resolved
            endpoint = self._endpoints.get(v6) or self._endpoint(v6)
            if pacer is not None:
                await pacer.acquire_slot()
            try:
                if pacer is not None:
                    delay = pacer.reserve(key_address)
                    if delay > 0:
                        await asyncio.sleep(delay)
                        since_yield = 0
                if self._closed:  # closed while it waited for the pacer (the daemon stopping)
                    raise ProbeSetupError("icmp: prober closed during probe_many")
                seq = endpoint.seq = (endpoint.seq + 1) & 0xFFFF
                packet = endpoint.template.packet(seq)
                sent_mono = monotonic()
                started_at = wall_offset + sent_mono
                try:
                    endpoint.sock.sendto(packet, (key_address, 0))
                    error = None
                except OSError:  # a full buffer, or a route error: the slow path sorts it out
                    drain = functools.partial(self._drain_error_queue, endpoint)
                    # It went (or was refused) after the wait: its clock starts then.
                    error, sent_mono = await send_echo(endpoint, packet, key_address, drain)
                    started_at = wall_offset + sent_mono
                if error is not None:
                    if pacer is not None:
                        pacer.release_slot()
                    stats.send_errors += 1
                    details = {"errno": errno.errorcode.get(error, str(error))}
                    self._deliver_now(call, ref, failure_for_send_error(error), started_at, details)
                    continue
            except BaseException:  # cancelled or failed before the probe was in flight
                if pacer is not None:
                    pacer.release_slot()
                raise
            stats.sent += 1
            key = (key_address, seq)
            entry = _Pending(key, ref, call, sent_mono)
            pending[key] = entry
            deadlines.append(entry)
            call.outstanding += 1
            if self._sweep_handle is None:
                self._arm_sweep(loop, sent_mono + timeout)
            since_yield += 1
            if since_yield >= _SENDS_PER_YIELD:
                since_yield = 0
                await asyncio.sleep(0)

    async def _resolve(
        self, address: str, ref: Any, call: _Call, loop: asyncio.AbstractEventLoop
    ) -> tuple[str, bool] | None:
        """IPv6 literal -> canonical form; host name -> its first address. None: result given."""
        try:
            packed = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
            canonical = socket.inet_ntop(socket.AF_INET6, packed)
            return (canonical if "%" not in address else address), True
        except OSError:
            pass
        started_at = time.time()
        try:
            infos = await loop.getaddrinfo(address, None, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            self._deliver_now(call, ref, Failure.RESOLVE_ERROR, started_at,
                              {"error": str(exc) or type(exc).__name__})  # fmt: skip
            return None
        family, _kind, _proto, _name, sockaddr = infos[0]
        resolved = str(sockaddr[0])
        if call.is_blocked(resolved):
            self.stats.blocked += 1
            self._deliver_now(call, ref, Failure.BLOCKED_BY_POLICY, started_at)
            return None
        return resolved, family == socket.AF_INET6

    def _endpoint(self, v6: bool) -> EchoSocket:
        endpoint = self._endpoints.get(v6)
        if endpoint is not None:
            return endpoint
        endpoint = self._open_endpoint(v6)
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        loop.add_reader(endpoint.sock.fileno(), self._on_readable, endpoint)
        self._endpoints[v6] = endpoint
        return endpoint

    def _open_endpoint(self, v6: bool) -> EchoSocket:
        kinds = {None: (False, True), False: (False,), True: (True,)}[self.privileged]
        errors: list[str] = []
        for raw in kinds:
            try:
                return EchoSocket(v6, raw, self._payload)
            except PermissionError as exc:
                errors.append(f"{'raw' if raw else 'datagram'} socket: {exc.strerror}")
            except OSError as exc:
                if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                    raise ProbeSetupError(
                        f"icmp: IPv{6 if v6 else 4} is not available on this host ({exc})"
                    ) from exc
                errors.append(f"{'raw' if raw else 'datagram'} socket: {exc}")
        family = "ICMPv6" if v6 else "ICMP"
        raise ProbeSetupError(
            f"icmp: cannot open an {family} socket ({'; '.join(errors)}); {_ENABLE_HINT}"
        )

    # -- receiving ------------------------------------------------------------------------

    def _on_readable(self, endpoint: EchoSocket) -> None:
        recvmsg = endpoint.sock.recvmsg
        v6 = endpoint.v6
        raw = endpoint.raw
        # Echo replies without an IP header in front (all but raw IPv4) take a short path:
        # the same checks as _on_reply, in the same order, without building a ParsedIcmp.
        short_type = ICMP6_ECHO_REPLY if v6 else (None if raw else ICMP4_ECHO_REPLY)
        ident, payload, pending, stats = endpoint.ident, endpoint.payload, self._pending, self.stats
        unpack_from = _ECHO_HEADER.unpack_from
        monotonic = time.monotonic
        wall = time.time
        for _ in range(_READS_PER_CALLBACK):
            try:
                data, ancdata, _flags, source = recvmsg(_MAX_PACKET, STAMP_ANCILLARY_BYTES)
            except BlockingIOError:
                break
            except OSError:
                continue  # a pending socket error (IP_RECVERR); the error queue explains it
            if len(data) >= 8 and data[0] == short_type:
                _type, _code, _sum, reply_ident, seq = unpack_from(data)
                entry = pending.get((source[0], seq))
                if reply_ident != ident:
                    stats.wrong_id += 1
                elif entry is None:
                    stats.unmatched += 1
                elif data[8:] != payload:
                    stats.wrong_payload += 1
                elif entry.answered:
                    stats.duplicates += 1
                else:
                    stats.echo_replies += 1
                    rtt, rtt_source = honest_rtt(
                        kernel_receive_time(ancdata), wall(), monotonic() - entry.sent_mono
                    )
                    call = self._settle(entry)
                    if call.active:
                        call.answered(entry.ref, rtt, rtt_source, entry.started_at)
                    call.finish_if_complete()
                continue
            parsed = parse_icmp6(data) if v6 else parse_icmp4(data, raw)
            if parsed is None:
                self.stats.malformed += 1
            elif parsed.kind == ECHO_REPLY:
                self._on_reply(endpoint, parsed, source[0], kernel_receive_time(ancdata))
            elif parsed.kind == ERROR:
                self._on_error(endpoint, parsed, source[0], kernel_receive_time(ancdata))
            else:
                self.stats.unrelated += 1
        if not raw:
            self._drain_error_queue(endpoint)

    def _on_reply(
        self, endpoint: EchoSocket, parsed: ParsedIcmp, source: str, received: float | None
    ) -> None:
        stats = self.stats
        if parsed.ident != endpoint.ident:
            stats.wrong_id += 1
            return
        entry = self._pending.get((source, parsed.seq))
        if entry is None:
            stats.unmatched += 1
            return
        if parsed.payload != endpoint.payload:
            stats.wrong_payload += 1
            return
        if entry.answered:
            stats.duplicates += 1
            return
        rtt, rtt_source = honest_rtt(received, time.time(), time.monotonic() - entry.sent_mono)
        stats.echo_replies += 1
        call = self._settle(entry)
        if call.active:
            call.answered(entry.ref, rtt, rtt_source, entry.started_at, parsed.ttl)
        call.finish_if_complete()

    def _on_error(
        self,
        endpoint: EchoSocket,
        parsed: ParsedIcmp,
        reporter: str | None,
        received: float | None,
    ) -> None:
        stats = self.stats
        if parsed.ident != endpoint.ident:
            stats.wrong_id += 1
            return
        entry = self._pending.get((parsed.quoted_dst or "", parsed.seq))
        if entry is None:
            stats.unrelated += 1
            return
        if entry.answered:
            stats.duplicates += 1
            return
        stats.unreachable += 1
        failure, details = error_outcome(
            endpoint.v6, parsed.icmp_type, parsed.code, reporter, received, entry.sent_mono
        )
        self._finish(entry, failure, details)

    def _drain_error_queue(self, endpoint: EchoSocket) -> None:
        for ident, seq, destination, extended, received in read_error_queue(endpoint, self.stats):
            parsed = ParsedIcmp(
                ERROR, extended.icmp_type, extended.code, ident, seq, None, destination, b""
            )
            self._on_error(endpoint, parsed, extended.offender, received)

    # -- completion -----------------------------------------------------------------------

    def _settle(self, entry: _Pending) -> _Call:
        """A probe in flight has its outcome: give its slot back. The caller then hands the
        result to the call (if still active) and lets it finish. The entry stays until its
        deadline, to recognise duplicates."""
        entry.answered = True
        call = entry.call
        if call.pacer is not None:
            call.pacer.release_slot()
        call.outstanding -= 1
        return call

    def _finish(
        self, entry: _Pending, failure: Failure, details: dict[str, Any] | None = None
    ) -> None:
        """A probe in flight ended without an answer."""
        call = self._settle(entry)
        if call.active:
            call.ended(entry.ref, failure, entry.started_at, details)
        call.finish_if_complete()

    def _deliver_now(
        self,
        call: _Call,
        ref: Any,
        failure: Failure,
        started_at: float,
        details: dict[str, Any] | None = None,
    ) -> None:
        """A result known without waiting for the network (blocked, send error)."""
        if call.active:
            call.ended(ref, failure, started_at, details)

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # Sweep at the head's deadline, but not more often than 20 times per timeout.
        when = max(when, time.monotonic() + self.timeout_s / 20)
        self._sweep_handle = loop.call_at(when, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """End every probe whose deadline passed; drop answered entries whose deadline passed."""
        self._sweep_handle = None
        now = time.monotonic()
        deadlines = self._deadlines
        pending = self._pending
        stats = self.stats
        sent_before = now - self.timeout_s  # sent then or earlier: the deadline has passed
        while deadlines and deadlines[0].sent_mono <= sent_before:
            entry = deadlines.popleft()
            if pending.get(entry.key) is entry:
                del pending[entry.key]
            if not entry.answered:
                stats.timeouts += 1
                self._finish(entry, Failure.TIMEOUT)
        if deadlines:
            self._arm_sweep(loop, deadlines[0].sent_mono + self.timeout_s)
