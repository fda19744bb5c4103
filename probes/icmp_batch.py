"""IPv4 echo in batches: sendmmsg/recvmmsg and numpy, no Python per packet.

IcmpProber does per probe what a probe needs on its own (pacing, a dict entry, a result object):
about 4 µs of Python on top of ~6 µs of kernel (on the machine of session 2). Here a batch of
up to 256 echoes goes out in a few sendmmsg calls, replies come in with one recvmmsg, and they
are matched, timed and turned into packed result records (probes/records.py) with numpy array
operations. BatchEcho is the engine (no pacing: its caller paced every target); it runs in the
worker pool's processes (probes/workers.py) and, as IcmpBatchProber, in front of an IcmpProber
in this process, behind the chunked caller side (probes/chunked.py) that paces and hands out
ProbeResults: the ICMP prober of PROBERS, the daemon and the CLI.

Scope: IPv4 literal addresses over unprivileged ICMP datagram sockets (the kernel picks each
socket's echo id, hands it only its own replies and queues ICMP errors for it). Host names, IPv6
and anything else go to an IcmpProber (`fallback`); so does everything where sendmmsg, recvmmsg
or the 64-bit Linux struct layouts are missing (`batch_available()`).

The probes in flight live in a ring of SOCKETS x 65,536 slots: slot i is echo seq i % 65,536 on
socket i // 65,536, so a reply's socket and seq name its slot, and its source must be the slot's
address. Slots are taken in send order and kept until their deadline (so a second answer is
recognised as a duplicate): deadlines are in ring order, and the timeout sweep is a search in a
sorted array. The sweep stops where the probes not yet handed to the kernel begin (a send that
waits for room holds them), so a probe never times out before it went. When the ring is full,
sending waits for the oldest slot's deadline: at most SOCKETS x 65,536 / timeout probes per
second (8 sockets, 2 s: 262,144/s) per engine.

Send times: a batch goes out in sendmmsg calls of _PER_SEND_CALL echoes, each echo stamped with
the time just before its call: a true lower bound of when it went, so an RTT (the reply's
kernel receive stamp minus that, probes/stamps.py) is over by at most one call's duration,
never under. One call for the whole batch would put up to ~2 ms of it into the last echoes'
RTTs on loopback.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import itertools
import socket
import time
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from probes.base import Failure, ProbeSetupError, ResultSink, Target
from probes.chunked import CHUNK_BITS, Chunk, ChunkedProber, Extras, Taker
from probes.icmp import (
    ICMP4_ECHO_REPLY,
    ICMP4_ECHO_REQUEST,
    METHOD,
    EchoSocket,
    IcmpProber,
    IcmpStats,
    error_outcome,
    failure_for_send_error,
    read_error_queue,
    send_echo,
)
from probes.pacing import Blocklist, Pacer
from probes.records import Records

SOCKETS = 8  # the default; each adds 65,536 slots to the ring
# IcmpBatchProber takes its batch path when the caller's pacer allows at least this many
# probes/s (or has no rate cap). Below it the feeder waits for the pacer between most probes, so
# chunks stay tiny and IcmpProber's own path is cheaper (benchmarks/icmp_paced.py: at 500/s
# 573-593 against 207 us of CPU per probe, at 20,000/s 50 against 42-43; at 50,000/s the batch
# path keeps the rate, IcmpProber reaches 40,500-43,100/s).
BATCH_FROM_PPS = 50_000
_BATCH = 256  # messages per batch and per recvmmsg
# Messages per sendmmsg: all of a call's echoes are stamped with the time just before it, so an
# RTT is over by at most one call's duration (on loopback ~7 µs per echo, the target's reply
# included: ~0.1 ms for 16; 256 would be ~2 ms). A call costs ~1.5 µs of its own.
_PER_SEND_CALL = 16
_BATCHES_PER_CALLBACK = 16  # replies read per reader callback: at most 16 x 256
# struct mmsghdr on 64-bit Linux as eight 64-bit words: msg_name, msg_namelen, msg_iov,
# msg_iovlen, msg_control, msg_controllen, msg_flags, msg_len (the 32-bit fields in the low half).
_NAME, _NAMELEN, _IOV, _IOVLEN, _CONTROL, _CONTROLLEN, _FLAGS, _LEN = range(8)
_SOCKADDR_IN = 16
# One control message: struct cmsghdr (len, level, type) then SO_TIMESTAMPING's first timespec.
_CONTROL_BYTES = socket.CMSG_SPACE(48)
_SO_TIMESTAMPING = 37
_CLOCK_SLACK_S = 0.001  # as probes/stamps.py
# Free slots, in flight, answered (kept until the deadline to recognise duplicates).
_FREE, _IN_FLIGHT, _ANSWERED = 0, 1, 2


def _libc_functions() -> tuple[Any, Any] | None:
    if ctypes.sizeof(ctypes.c_void_p) != 8 or not hasattr(socket, "CMSG_SPACE"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sendmmsg, recvmmsg = libc.sendmmsg, libc.recvmmsg
    except (OSError, AttributeError):
        return None
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                         ctypes.c_void_p]  # fmt: skip
    sendmmsg.restype = recvmmsg.restype = ctypes.c_int
    return sendmmsg, recvmmsg


_LIBC = _libc_functions()


def batch_available() -> bool:
    """Whether this host has what the batch engine needs (64-bit Linux with sendmmsg)."""
    return _LIBC is not None


def batch_engine_for(records: Records, prober: IcmpProber) -> BatchEcho | None:
    """The batch engine in front of `prober` where it can run (the prober's IPv4 socket is a
    datagram one, this host has sendmmsg, its sockets open), else None: the prober does the
    work. Opens the prober's IPv4 socket: raises ProbeSetupError, saying how to enable ICMP,
    when no ICMP socket is permitted."""
    prober.open(False)
    if prober.mode["ipv4"] != "datagram" or not batch_available():
        return None
    try:
        return BatchEcho(records, prober)
    except ProbeSetupError:  # e.g. out of descriptors for its sockets
        return None


class _Messages:
    """Buffers for a batch of messages and the mmsghdr array that points into them."""

    def __init__(self, packet_bytes: int, control_bytes: int) -> None:
        count = _BATCH
        self.packets = np.zeros((count, packet_bytes), np.uint8)
        self.names = np.zeros((count, _SOCKADDR_IN), np.uint8)
        self.control = np.zeros((count, max(control_bytes, 8)), np.uint8)
        self._iovecs = np.zeros((count, 2), np.uint64)
        self.headers = np.zeros((count, 8), np.uint64)
        rows = np.arange(count, dtype=np.uint64)
        self._iovecs[:, 0] = self.packets.ctypes.data + rows * np.uint64(packet_bytes)
        self._iovecs[:, 1] = packet_bytes
        self.headers[:, _NAME] = self.names.ctypes.data + rows * np.uint64(_SOCKADDR_IN)
        self.headers[:, _NAMELEN] = _SOCKADDR_IN
        self.headers[:, _IOV] = self._iovecs.ctypes.data + rows * np.uint64(16)
        self.headers[:, _IOVLEN] = 1
        if control_bytes:
            self.headers[:, _CONTROL] = self.control.ctypes.data + rows * np.uint64(
                self.control.shape[1]
            )
            self.headers[:, _CONTROLLEN] = control_bytes
        self._template = self.headers.copy()  # recvmmsg overwrites lengths and flags
        self.address = self.headers.ctypes.data

    def at(self, index: int) -> int:
        """The address of message `index`'s header."""
        return int(self.address) + index * 64

    def reset(self) -> None:
        self.headers[:] = self._template


class _Call:
    """One probe_keyed call: how many of its probes are still owed a result."""

    __slots__ = ("done", "fed", "left")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.left = 0
        self.fed = False

    def settle(self, count: int) -> None:
        self.left -= count
        if self.left == 0 and self.fed and not self.done.done():
            self.done.set_result(None)


class BatchEcho:
    """IPv4 echo for (key, address) pairs, results into `records` (see the module docstring).

    Raises ProbeSetupError when ICMP datagram sockets are not permitted (use IcmpProber)."""

    def __init__(self, records: Records, fallback: IcmpProber, sockets: int = SOCKETS) -> None:
        if _LIBC is None:
            raise ProbeSetupError("icmp batch: needs 64-bit Linux with sendmmsg/recvmmsg")
        self._sendmmsg, self._recvmmsg = _LIBC
        self.records = records
        self.fallback = fallback
        self.timeout_s = fallback.timeout_s
        # One set of counters with the fallback: they are one ICMP engine to whoever reads them.
        self.stats: IcmpStats = fallback.stats
        payload = fallback.payload  # one payload per worker: its fallback's echoes carry it too
        self._payload = np.frombuffer(payload, np.uint8)
        self._sockets: list[EchoSocket] = []
        try:
            for _ in range(sockets):
                self._sockets.append(EchoSocket(False, False, payload))
        except OSError as exc:
            self._close_sockets()
            raise ProbeSetupError(f"icmp batch: no ICMP datagram socket ({exc})") from exc
        self.echo_ids = [s.ident for s in self._sockets]
        self._ids = np.array(self.echo_ids, np.int64)
        packet = 8 + len(payload)
        self._out = _Messages(packet, 0)
        self._out.packets[:, 0] = ICMP4_ECHO_REQUEST  # the kernel sets id and checksum
        self._out.packets[:, 8:] = self._payload
        self._out.names[:, 0:2] = np.array([socket.AF_INET], np.uint16).view(np.uint8)
        # One byte more than a reply of ours: a longer one shows as a length mismatch.
        self._in = _Messages(packet + 1, _CONTROL_BYTES)
        # The ring of probes in flight (see the module docstring); addresses as the 4 bytes of
        # a sockaddr_in read as one native integer.
        self._slots = slots = sockets << 16
        self._address = np.zeros(slots, np.uint32)
        self._key = np.zeros(slots, np.int64)
        self._sent = np.zeros(slots, np.float64)  # time.monotonic() at send
        self._sent_wall = np.zeros(slots, np.float64)
        self._call = np.zeros(slots, np.int64)
        self._state = np.zeros(slots, np.uint8)
        self._head = 0  # the oldest slot taken (a counter: the ring index is it % self._slots)
        self._next = 0  # the next slot to take
        # Slots before it went to the kernel (or failed); the sweep never goes past it, so a
        # probe still waiting to be sent cannot time out (the one run being sent holds the rest).
        self._handed = 0
        self._calls: dict[int, _Call] = {}
        self._call_ids = iter(range(1, 1 << 62))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        # One batch in the send buffers at a time: a send that has to wait (a full socket
        # buffer) must not have its messages overwritten by another call's batch meanwhile.
        self._sending = asyncio.Lock()

    # -- public ---------------------------------------------------------------------------

    async def probe_keyed(self, pairs: Iterable[tuple[int, str]], blocklist: Blocklist) -> None:
        """Probe (key, address) pairs; results go into `records` under their keys. Like
        IcmpProber.probe_keyed: nothing is paced here, `blocklist` screens only the addresses
        host names resolve to (the fallback's part)."""
        loop = self._attach()
        call = _Call(loop.create_future())
        number = next(self._call_ids)
        self._calls[number] = call
        others: list[tuple[int, str]] = []
        keys: list[int] = []
        addresses: list[bytes] = []
        inet_pton, af_inet = socket.inet_pton, socket.AF_INET
        try:
            for key, address in pairs:
                try:
                    addresses.append(inet_pton(af_inet, address))
                except OSError:  # a host name or IPv6: the fallback's
                    others.append((key, address))
                    continue
                keys.append(key)
                if len(keys) == _BATCH:
                    await self._send(number, call, keys, addresses)
                    keys, addresses = [], []
            if keys:
                await self._send(number, call, keys, addresses)
            call.fed = True
            call.settle(0)
            if others:
                await self.fallback.probe_keyed(others, self.records, blocklist)
            await call.done
        finally:
            del self._calls[number]

    async def close(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        for call in self._calls.values():
            # A call of a loop that is closed went with it (its future cannot be woken).
            if not call.done.done() and not call.done.get_loop().is_closed():
                call.done.set_exception(ProbeSetupError("icmp batch: closed during a call"))
        self._close_sockets()

    # -- sending --------------------------------------------------------------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            for index, endpoint in enumerate(self._sockets):
                loop.add_reader(endpoint.sock.fileno(), self._on_readable, index)
        elif self._loop is not loop:
            raise ProbeSetupError("icmp batch: the engine is in use on another event loop")
        return loop

    async def _send(self, number: int, call: _Call, keys: list[int], packed: list[bytes]) -> None:
        """Send one batch (up to _BATCH echoes), split where the ring moves to the next socket."""
        addresses = np.frombuffer(b"".join(packed), np.uint32)
        key_array = np.array(keys, np.int64)
        done = 0
        async with self._sending:
            while done < len(keys):
                await self._room_for(len(keys) - done)
                first = self._next
                socket_index = (first % self._slots) >> 16
                count = min(len(keys) - done, 0x10000 - (first & 0xFFFF))
                run = slice(done, done + count)
                await self._send_run(number, call, socket_index, first, key_array[run],
                                     addresses[run])  # fmt: skip
                done += count
        # Replies are read between batches: left in the socket buffer they would overflow it.
        await asyncio.sleep(0)

    async def _send_run(
        self,
        number: int,
        call: _Call,
        socket_index: int,
        first: int,
        keys: npt.NDArray[np.int64],
        addresses: npt.NDArray[np.uint32],
    ) -> None:
        count = len(keys)
        ring = first % self._slots
        slots = slice(ring, ring + count)
        seqs = (np.arange(count, dtype=np.uint32) + (first & 0xFFFF)).astype(">u2")
        out = self._out
        out.packets[:count, 6:8] = seqs.view(np.uint8).reshape(count, 2)
        out.names[:count, 4:8] = addresses.view(np.uint8).reshape(count, 4)
        # The slots are filled before sending: a reply read while a send below waits for room
        # must find its probe. Their stamps are placeholders until each one went.
        self._next = first + count
        self._address[slots] = addresses
        self._key[slots] = keys
        self._call[slots] = number
        self._state[slots] = _IN_FLIGHT
        self._stamp(slots)
        call.left += count
        endpoint = self._sockets[socket_index]
        fd = endpoint.sock.fileno()
        sent = 0
        try:
            while sent < count:
                before, before_wall = time.monotonic(), time.time()
                went = self._sendmmsg(fd, out.at(sent), min(count - sent, _PER_SEND_CALL), 0)
                if went > 0:
                    self._stamp(slice(ring + sent, ring + sent + went), before, before_wall)
                    sent += went
                    self._handed = first + sent
                    self.stats.sent += went
                    continue
                err = ctypes.get_errno()
                packet = out.packets[sent].tobytes()
                address = socket.inet_ntoa(out.names[sent, 4:8].tobytes())
                # Waits for room, tells a stale IP_RECVERR error from a real one (see send_echo).
                drain = functools.partial(self._drain_errors, socket_index)
                if err:
                    error, tried = await send_echo(endpoint, packet, address, drain)
                else:
                    error, tried = errno.EIO, time.monotonic()
                slot = ring + sent
                # It went (or was refused) after the wait: the stamps stay in ring order,
                # which the sweep's search needs.
                self._stamp(slice(slot, slot + 1), tried, tried + time.time() - time.monotonic())
                if error is None:
                    self.stats.sent += 1
                else:
                    self.stats.send_errors += 1
                    if self._state[slot] == _IN_FLIGHT:  # else a (forged) answer came first
                        self._state[slot] = _FREE
                        details = {"errno": errno.errorcode.get(error, str(error))}
                        self.records.ended(int(self._key[slot]), failure_for_send_error(error),
                                           float(self._sent_wall[slot]), details)  # fmt: skip
                        call.settle(1)
                sent += 1
                self._handed = first + sent
        finally:
            if sent < count:  # cancelled or failed mid-run: what never went owes no result
                unsent = slice(ring + sent, ring + count)
                call.left -= int(np.count_nonzero(self._state[unsent] == _IN_FLIGHT))
                self._state[unsent] = _FREE
                self._stamp(unsent)
                self._handed = first + count
        if self._sweep_handle is None:
            self._arm_sweep()

    def _stamp(self, slots: slice, mono: float | None = None, wall: float | None = None) -> None:
        """Send times of `slots`: `mono`/`wall` (time.monotonic(), time.time()), else now."""
        if mono is None or wall is None:
            mono, wall = time.monotonic(), time.time()
        self._sent[slots] = mono
        self._sent_wall[slots] = wall

    async def _room_for(self, count: int) -> None:
        """Wait until `count` slots are free at the ring's end (the oldest ones expire)."""
        while self._next + min(count, _BATCH) - self._head > self._slots:
            self._sweep()
            if self._next + min(count, _BATCH) - self._head <= self._slots:
                return
            deadline = float(self._sent[self._head % self._slots]) + self.timeout_s
            await asyncio.sleep(max(deadline - time.monotonic(), 0.001))

    # -- receiving ------------------------------------------------------------------------

    def _on_readable(self, socket_index: int) -> None:
        fd = self._sockets[socket_index].sock.fileno()
        incoming = self._in
        for _ in range(_BATCHES_PER_CALLBACK):
            incoming.reset()
            count = self._recvmmsg(fd, incoming.address, _BATCH, socket.MSG_DONTWAIT, None)
            if count > 0:
                self._match(socket_index, count)
                if count < _BATCH:
                    break
                continue
            if count < 0 and ctypes.get_errno() not in (errno.EAGAIN, errno.EWOULDBLOCK):
                continue  # a pending socket error (IP_RECVERR): the error queue explains it
            break
        self._drain_errors(socket_index)

    def _match(self, socket_index: int, count: int) -> None:
        """Match `count` packets just read on one socket to the probes in flight, in bulk."""
        stats = self.stats
        incoming = self._in
        data = incoming.packets[:count]
        lengths = incoming.headers[:count, _LEN] & 0xFFFFFFFF
        stats.malformed += int(np.count_nonzero(lengths < 8))
        echo = (lengths >= 8) & (data[:, 0] == ICMP4_ECHO_REPLY)
        stats.unrelated += int(np.count_nonzero((lengths >= 8) & ~echo))
        ident = (data[:, 4].astype(np.int64) << 8) | data[:, 5]
        ours = echo & (ident == self._ids[socket_index])
        stats.wrong_id += int(np.count_nonzero(echo & ~ours))
        seq = (data[:, 6].astype(np.int64) << 8) | data[:, 7]
        slot = (socket_index << 16) | seq
        source = np.ascontiguousarray(incoming.names[:count, 4:8]).view(np.uint32).ravel()
        state = self._state[slot]
        matched = ours & (state != _FREE) & (self._address[slot] == source)
        stats.unmatched += int(np.count_nonzero(ours & ~matched))
        payload = self._payload
        right = (lengths == 8 + len(payload)) & np.all(data[:, 8 : 8 + len(payload)] == payload, 1)
        stats.wrong_payload += int(np.count_nonzero(matched & ~right))
        answered = matched & right
        first_time = answered & (state == _IN_FLIGHT)
        # A slot answered twice in this very batch: only its first answer counts.
        fresh, where = np.unique(slot[first_time], return_index=True)
        stats.duplicates += int(np.count_nonzero(answered)) - len(fresh)
        if not len(fresh):
            return
        stats.echo_replies += len(fresh)
        self._state[fresh] = _ANSWERED
        rows = np.nonzero(first_time)[0][where]
        rtts, by_kernel = self._rtts(rows, fresh)
        self.records.answered_many(self._key[fresh], rtts, by_kernel, self._sent_wall[fresh])
        self._settle(fresh)

    def _rtts(
        self, rows: npt.NDArray[np.int64], slots: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """RTTs of replies (rows of the batch) to probes (slots), as probes/stamps.honest_rtt:
        the loop's measure minus the time each reply waited since its kernel stamp."""
        now_wall, now = time.time(), time.monotonic()
        control = self._in.control[rows]
        length = self._in.headers[rows, _CONTROLLEN]
        level = np.ascontiguousarray(control[:, 8:12]).view(np.int32).ravel()
        kind = np.ascontiguousarray(control[:, 12:16]).view(np.int32).ravel()
        stamp = np.ascontiguousarray(control[:, 16:32]).view(np.int64).reshape(-1, 2)
        stamped = ((length >= 32) & (level == socket.SOL_SOCKET) & (kind == _SO_TIMESTAMPING)
                   & (stamp.any(axis=1)))  # fmt: skip
        waited = now_wall - (stamp[:, 0] + stamp[:, 1] * 1e-9)
        loop_rtt = now - self._sent[slots]
        by_kernel = stamped & (waited >= -_CLOCK_SLACK_S) & (waited <= loop_rtt)
        rtts = np.where(by_kernel, np.maximum(loop_rtt - waited, 0.0), loop_rtt)
        return rtts, by_kernel

    def _drain_errors(self, socket_index: int) -> None:
        endpoint = self._sockets[socket_index]
        for ident, seq, destination, extended, received in read_error_queue(endpoint, self.stats):
            if ident != endpoint.ident:
                self.stats.wrong_id += 1
                continue
            slot = socket_index << 16 | seq
            address = np.frombuffer(socket.inet_aton(destination), np.uint32)[0]
            state = self._state[slot]
            if state == _FREE or self._address[slot] != address:
                self.stats.unrelated += 1
                continue
            if state == _ANSWERED:
                self.stats.duplicates += 1
                continue
            self.stats.unreachable += 1
            self._state[slot] = _ANSWERED
            sent = float(self._sent[slot])
            failure, details = error_outcome(False, extended.icmp_type, extended.code,
                                             extended.offender, received, sent)  # fmt: skip
            self.records.ended(int(self._key[slot]), failure, float(self._sent_wall[slot]),
                               details)  # fmt: skip
            self._settle(np.array([slot]))

    # -- completion -----------------------------------------------------------------------

    def _settle(self, slots: npt.NDArray[np.int64]) -> None:
        numbers, counts = np.unique(self._call[slots], return_counts=True)
        for number, settled in zip(numbers.tolist(), counts.tolist(), strict=True):
            call = self._calls.get(number)
            if call is not None:
                call.settle(settled)

    def _arm_sweep(self) -> None:
        assert self._loop is not None
        when = time.monotonic() + self.timeout_s / 20
        if self._head < self._next:
            when = max(when, float(self._sent[self._head % self._slots]) + self.timeout_s)
        self._sweep_handle = self._loop.call_at(when, self._on_sweep)

    def _on_sweep(self) -> None:
        self._sweep_handle = None
        self._sweep()
        if self._head < self._next:
            self._arm_sweep()

    def _sweep(self) -> None:
        """Free every slot whose deadline passed; the ones never answered end as timeouts."""
        sent_before = time.monotonic() - self.timeout_s
        while self._head < self._handed:
            start = self._head % self._slots
            run = min(self._handed - self._head, self._slots - start)
            expired = int(np.searchsorted(self._sent[start : start + run], sent_before, "right"))
            if not expired:
                return
            span = slice(start, start + expired)
            timed_out = np.nonzero(self._state[span] == _IN_FLIGHT)[0] + start
            if len(timed_out):
                self.stats.timeouts += len(timed_out)
                self.records.ended_many(self._key[timed_out], Failure.TIMEOUT,
                                        self._sent_wall[timed_out])  # fmt: skip
                self._settle(timed_out)
            self._state[span] = _FREE
            self._head += expired
            if expired < run:
                return

    def _close_sockets(self) -> None:
        for endpoint in self._sockets:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(endpoint.sock.fileno())
            endpoint.close()


class IcmpBatchProber(ChunkedProber):
    """ICMP in this process, with the batch engine where it can run (IPv4 addresses over
    datagram sockets on 64-bit Linux), else through IcmpProber.probe_keyed (host names, IPv6,
    raw sockets). Targets are paced and chunked by ChunkedProber (probes/chunked.py), so the
    Python per probe is the Pacer's admission and the ProbeResult handed to the sink; sending,
    matching and timing go in bulk. The ICMP prober of PROBERS, the daemon and the CLI.

    Options as IcmpProber's, or `prober`: an IcmpProber to put the engine in front of (it stays
    its caller's to close). `prober` is the IcmpProber underneath either way (its sockets,
    `mode`, `echo_id()`), whose `stats` count for both.
    """

    method: ClassVar[str] = METHOD
    label: ClassVar[str] = "icmp"

    def __init__(self, prober: IcmpProber | None = None, **options: Any) -> None:
        super().__init__()
        if prober is not None and options:
            raise ProbeSetupError("icmp: give either an IcmpProber or its options, not both")
        self.prober = prober or IcmpProber(**options)  # bad options fail here
        self._owns_prober = prober is None
        self.timeout_s = self.prober.timeout_s
        self._engine: BatchEcho | None = None
        self._records = Records(on_first=self._flush_soon)
        self._taker = Taker()
        self._tasks: set[asyncio.Task[None]] = set()
        self._engine_decided = False

    @property
    def stats(self) -> IcmpStats:
        return self.prober.stats

    @property
    def mode(self) -> dict[str, str]:
        return self.prober.mode

    @property
    def batch_echo_ids(self) -> list[int]:
        """The batch engine's sockets' echo ids (none: it does not run here)."""
        return [] if self._engine is None else list(self._engine.echo_ids)

    def open(self, v6: bool = False) -> None:
        """Open the socket of a family now; ProbeSetupError says how to enable ICMP."""
        self.prober.open(v6)

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None:
        await self._start()  # a move to a new loop gives back what the old one held
        rate = pacer.policy.rate_pps
        if rate is not None and rate < BATCH_FROM_PPS:
            # Paced this slowly, the feeder waits for the pacer between most probes, so chunks
            # would be of one or two and cost more than IcmpProber's own path (measured in
            # benchmarks/icmp_paced.py, figures in benchmarks/results/probe_engine_icmp.md).
            await self.prober.probe_many(targets, pacer, on_result)
        else:
            await super().probe_many(targets, pacer, on_result)

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            if not task.get_loop().is_closed():
                task.cancel()
        self._tasks.clear()
        if self._engine is not None:
            await self._engine.close()
        if self._owns_prober:
            await self.prober.close()
        self._close_calls(ProbeSetupError(f"{self.label}: prober closed during probe_many"))

    async def _start(self) -> None:
        if not self._claim_loop():
            return
        # First use, or an earlier asyncio.run() is over: the engine's readers, its chunk tasks
        # and any results not yet handed on went with its loop.
        self._tasks.clear()
        if self._engine is not None:
            await self._engine.close()
            self._engine = None
        self._records.take()
        self._engine_decided = False

    async def _send(
        self, number: int, chunk: Chunk, addresses: list[str], extras: Extras, pacer: Pacer
    ) -> None:
        # Decided on the first chunk with anything but an IPv6 literal in it: an IPv6-only run
        # opens no IPv4 socket.
        if not self._engine_decided and any(":" not in address for address in addresses):
            self._engine = batch_engine_for(self._records, self.prober)
            self._engine_decided = True
        chunk.taker = self._taker
        self._taker.load += chunk.left
        pairs = zip(itertools.count(number << CHUNK_BITS), addresses, strict=False)
        if self._engine is not None:
            work = self._engine.probe_keyed(pairs, pacer.blocklist)
        else:
            work = self.prober.probe_keyed(pairs, self._records, pacer.blocklist)
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._chunk_done, number))
        # The chunk goes out now (the task runs first); results that came in free the slots
        # the feeder needs.
        await asyncio.sleep(0)

    def _chunk_done(self, number: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._flush()  # the results it did give first
            self._chunk_failed(number, error)

    def _blocked(self) -> None:
        self.prober.stats.blocked += 1

    def _flush_soon(self) -> None:
        # Results that arrive in one loop turn are handed on together, in the next.
        assert self._loop is not None
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._records:
            self._on_results(*self._records.take())
