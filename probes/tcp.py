"""TCP connect probe: a SYN-ACK is success, a RST still proves the host is up.

Ports are tried in order until one connects; a host or network unreachable error stops early
(every other port would get the same answer). Connections are closed with a RST (SO_LINGER 0)
so a scan leaves no TIME_WAIT sockets behind on the vantage and holds nothing open on targets.

Design (issue 2, built like probes/icmp.py): no task, future or timeout context per probe. Each
attempt is a non-blocking socket whose `connect_ex` starts a real handshake; the sockets are
registered with one epoll set of the call, and that set is registered with the event loop, so
one callback collects every finished handshake (EPOLLOUT alone = connected; an error condition
is read with SO_ERROR). Overdue attempts are ended in bulk by a sweep over a deque ordered by
deadline. The targets iterable is consumed lazily.

RTTs come from the kernel: after a handshake TCP_INFO's tcpi_rtt is the SYN -> SYN-ACK time the
kernel measured itself, free of however long the event loop took to notice the connection. A
refused port (RST), or a kernel without a sample, gets the time the loop saw instead; which one
was used is in details["rtt_source"] ("kernel" or "loop").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from probes.base import (
    Failure,
    ProbeResult,
    ProbeSetupError,
    ResultSink,
    Target,
    blocked_result,
    resolve_failed,
    unanswered,
)
from probes.calls import ProbeCall
from probes.oserrors import TARGET_ANSWERED, failure_from_oserror, resolve_host
from probes.pacing import Pacer
from probes.stamps import RTT_KERNEL, RTT_LOOP

_STOP_EARLY = frozenset({Failure.HOST_UNREACHABLE, Failure.NETWORK_UNREACHABLE})
_LINGER_RST = struct.pack("ii", 1, 0)
_SOCKET_FLAGS = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_CONNECT_PENDING = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN})
_READY_ERROR = select.EPOLLERR | select.EPOLLHUP
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESOURCE_RETRY_S = 0.005
# Start this many attempts, then yield so finished handshakes are collected and slots freed.
_STARTS_PER_YIELD = 128
# Finished handshakes handled per callback, so a flood cannot starve the feeder and the sweep.
_EVENTS_PER_CALLBACK = 4096
# struct tcp_info (linux/tcp.h): tcpi_state is byte 0, tcpi_rtt (microseconds, the smoothed RTT:
# on a fresh connection the one SYN-ACK sample) the __u32 at byte 68, after 8 one-byte fields
# and 15 __u32 ones (rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets,
# last_data_sent, last_ack_sent, last_data_recv, last_ack_recv, pmtu, rcv_ssthresh).
_TCP_INFO_HEAD = struct.Struct("=B67xI")
_TCP_ESTABLISHED = 1


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
        # Attempts put off because the process was out of descriptors or memory (then retried
        # once some of our sockets had closed): a sign the in-flight cap is above the fd limit.
        self.resource_waits = 0

    async def probe_many(
        self, targets: Iterable[Target], pacer: Pacer, on_result: ResultSink
    ) -> None:
        run = _ConnectRun(self.ports, self.timeout_s, pacer, on_result)
        try:
            await run.feed(targets)
            await run.finished()
        finally:
            self.resource_waits += run.resource_waits
            run.close()

    async def close(self) -> None:
        return None

    async def probe_one(self, target: Target, pacer: Pacer | None = None) -> ProbeResult:
        """Probe one target (the caller has been admitted by `pacer`, which paces extra ports)."""
        results: list[ProbeResult] = []
        run = _ConnectRun(self.ports, self.timeout_s, pacer, results.append, take_slots=False)
        try:
            await run.feed([target])
            await run.finished()
        finally:
            run.close()
        return results[0]


class _Probe:
    """One target across its ports, and the socket of the attempt in flight (None between)."""

    __slots__ = (
        "address", "answered", "deadline", "family", "first_failure", "index", "outcomes",
        "ports", "resource_deadline", "sock", "started", "started_at", "target",
    )  # fmt: skip

    def __init__(self, target: Target, ports: tuple[int, ...], started_at: float) -> None:
        self.target = target
        self.ports = ports
        self.started_at = started_at
        self.address = target.address
        self.family = socket.AF_INET
        self.index = 0
        self.outcomes: dict[str, str] = {}
        # port, rtt, failure, rtt source of the first port that answered
        self.answered: tuple[int, float, Failure | None, str] | None = None
        self.first_failure: Failure | None = None
        self.sock: socket.socket | None = None
        self.started = 0.0  # perf_counter() when the current attempt's SYN went out
        self.deadline = 0.0
        self.resource_deadline = 0.0  # the end of its wait for a descriptor when none is ours


class _ConnectRun(ProbeCall):
    """The state of one probe_many call: its epoll set, the attempts in flight, the deadlines."""

    def __init__(
        self,
        ports: tuple[int, ...],
        timeout_s: float,
        pacer: Pacer | None,
        on_result: ResultSink,
        take_slots: bool = True,
    ) -> None:
        self.ports = ports
        self.timeout_s = timeout_s
        self.pacer = pacer
        self.take_slots = take_slots and pacer is not None
        self.loop = asyncio.get_running_loop()
        super().__init__(on_result, self.loop.create_future())
        self.epoll = select.epoll()
        self.loop.add_reader(self.epoll.fileno(), self._on_ready)
        self.by_fd: dict[int, _Probe] = {}
        self.deadlines: deque[tuple[float, _Probe]] = deque()
        self.sweep_handle: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # host-name resolutions
        self.resource_waits = 0  # attempts put off because no socket could be opened

    # -- feeding --------------------------------------------------------------------------

    async def feed(self, targets: Iterable[Target]) -> None:
        pacer = self.pacer
        has_blocklist = pacer is not None and len(pacer.blocklist) > 0
        default_ports = self.ports
        inet_pton = socket.inet_pton
        af_inet = socket.AF_INET
        wall = time.time
        since_yield = 0
        for target in targets:
            if self.error is not None:
                break
            address = target.address
            if has_blocklist and pacer is not None and pacer.is_blocked(address):
                self.give(blocked_result(target, "tcp", wall()))
                continue
            if self.take_slots and pacer is not None:
                await pacer.acquire_slot()
            self.outstanding += 1
            ports = (target.port,) if target.port is not None else default_ports
            probe = _Probe(target, ports, wall())
            try:
                inet_pton(af_inet, address)
            except OSError:
                if not self._start_resolving(probe):
                    continue
            try:
                if pacer is not None:
                    delay = pacer.reserve(probe.address)
                    if delay > 0:
                        await asyncio.sleep(delay)
                        since_yield = 0
            except BaseException:
                self._release(probe)
                raise
            self._attempt(probe)
            since_yield += 1
            if since_yield >= _STARTS_PER_YIELD:
                since_yield = 0
                await asyncio.sleep(0)
        self.fed = True

    async def finished(self) -> None:
        if self.outstanding and self.error is None:
            await self.done
        if self.error is not None:
            raise self.error

    def _start_resolving(self, probe: _Probe) -> bool:
        """True when the address is an IPv6 literal (go on); else resolve it in a task."""
        try:
            socket.inet_pton(socket.AF_INET6, probe.address.split("%", 1)[0])
            probe.family = socket.AF_INET6
            return True
        except OSError:
            pass
        task = self.loop.create_task(self._resolve_then_attempt(probe))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return False

    async def _resolve_then_attempt(self, probe: _Probe) -> None:
        try:
            addresses = await resolve_host(probe.address, probe.ports[0], self.timeout_s)
        except (OSError, TimeoutError, UnicodeError) as exc:
            self._complete(probe, resolve_failed(probe.target, "tcp", probe.started_at, exc))
            return
        probe.address = addresses[0]
        if self.pacer is not None and self.pacer.is_blocked(probe.address):
            self._complete(probe, blocked_result(probe.target, "tcp", probe.started_at))
            return
        probe.family = socket.AF_INET6 if ":" in probe.address else socket.AF_INET
        if self.pacer is not None:
            delay = self.pacer.reserve(probe.address)
            if delay > 0:
                await asyncio.sleep(delay)
        self._attempt(probe)

    # -- one connect attempt --------------------------------------------------------------

    def _attempt(self, probe: _Probe) -> None:
        """Send the SYN for the probe's current port; a local error ends the attempt at once."""
        port = probe.ports[probe.index]
        try:
            sock = socket.socket(probe.family, _SOCKET_FLAGS)
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES and self._may_wait_for_resources(probe):
                self.resource_waits += 1
                self.loop.call_later(_RESOURCE_RETRY_S, self._attempt_if_running, probe)
                return
            self._attempt_done(probe, port, Failure.OTHER, 0.0, exc.errno, str(exc))
            return
        probe.started = started = time.perf_counter()
        try:
            err = sock.connect_ex((probe.address, port))
        except (OSError, OverflowError, ValueError) as exc:
            sock.close()
            self._attempt_done(probe, port, Failure.OTHER, 0.0, None, str(exc))
            return
        if err in _CONNECT_PENDING:
            fd = sock.fileno()
            self.epoll.register(fd, select.EPOLLOUT)
            probe.sock = sock
            self.by_fd[fd] = probe
            probe.deadline = deadline = started + self.timeout_s
            self.deadlines.append((deadline, probe))
            if self.sweep_handle is None:
                self._arm_sweep(deadline)
            return
        rtt = time.perf_counter() - started
        if err == 0:  # connected at once (possible on loopback)
            rtt, source = handshake_rtt(sock, rtt)
            _close_with_rst(sock)
            self._attempt_done(probe, port, None, rtt, None, None, source)
            return
        sock.close()
        self._attempt_done(probe, port, _failure_of(err), rtt, err, None)

    def _on_ready(self) -> None:
        now = time.perf_counter()
        by_fd = self.by_fd
        for fd, events in self.epoll.poll(0, _EVENTS_PER_CALLBACK):
            probe = by_fd.pop(fd, None)
            if probe is None or probe.sock is None:
                continue
            sock = probe.sock
            probe.sock = None
            rtt = now - probe.started
            port = probe.ports[probe.index]
            if events & _READY_ERROR:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    sock.close()  # closing also takes the socket out of the epoll set
                    self._attempt_done(probe, port, _failure_of(err), rtt, err, None)
                    continue
            rtt, source = handshake_rtt(sock, rtt)
            _close_with_rst(sock)
            self._attempt_done(probe, port, None, rtt, None, None, source)

    def _attempt_done(
        self,
        probe: _Probe,
        port: int,
        failure: Failure | None,
        rtt: float,
        err: int | None,
        error_text: str | None,
        rtt_source: str = RTT_LOOP,
    ) -> None:
        """Record one port's outcome; finish the probe or go on with the next port."""
        probe.outcomes[str(port)] = "open" if failure is None else str(failure)
        if failure is None:
            probe.answered = (port, rtt, None, rtt_source)
            self._complete(probe, self._result(probe))
            return
        if probe.first_failure is None:
            probe.first_failure = failure
        if failure in TARGET_ANSWERED and probe.answered is None:
            probe.answered = (port, rtt, failure, rtt_source)
        if err is not None:
            probe.outcomes[f"{port}_errno"] = errno.errorcode.get(err, str(err))
        elif error_text is not None:
            probe.outcomes[f"{port}_error"] = error_text
        probe.index += 1
        if failure in _STOP_EARLY or probe.index >= len(probe.ports) or self.error is not None:
            self._complete(probe, self._result(probe))
            return
        # Every SYN counts against the rate, not only the first port's.
        delay = self.pacer.reserve(probe.address) if self.pacer is not None else 0.0
        if delay > 0:
            self.loop.call_later(delay, self._attempt_if_running, probe)
        else:
            self.loop.call_soon(self._attempt_if_running, probe)

    def _may_wait_for_resources(self, probe: _Probe) -> bool:
        """Out of descriptors or memory: a "down" result would be a false alarm, so wait and try
        again. While our own sockets are open some close soon; else others in the process hold
        them (a server's accepted connections, another prober), so wait up to one timeout."""
        if self.by_fd:
            return True
        now = time.perf_counter()
        if not probe.resource_deadline:
            probe.resource_deadline = now + self.timeout_s
        return now < probe.resource_deadline

    def _attempt_if_running(self, probe: _Probe) -> None:
        if self.error is None and not self.done.done():
            self._attempt(probe)

    def _result(self, probe: _Probe) -> ProbeResult:
        details: dict[str, Any] = {"ports": probe.outcomes}
        if probe.address != probe.target.address:
            details["address"] = probe.address
        if probe.answered is not None:
            port, rtt, failure, rtt_source = probe.answered
            details["port"] = port
            details["rtt_source"] = rtt_source
            return ProbeResult(
                probe.target, "tcp", True, failure is None, failure, rtt, probe.started_at,
                details,
            )  # fmt: skip
        return unanswered(probe.target, "tcp", probe.first_failure or Failure.OTHER,
                          probe.started_at, details)

    # -- completion -----------------------------------------------------------------------

    def _complete(self, probe: _Probe, result: ProbeResult) -> None:
        self._release(probe)
        self.give(result)
        self.finish_if_complete()

    def _release(self, probe: _Probe) -> None:
        self.outstanding -= 1
        if self.take_slots and self.pacer is not None:
            self.pacer.release_slot()

    def _arm_sweep(self, when: float) -> None:
        # Sweep at the head's deadline, but not more often than 20 times per timeout.
        now = time.perf_counter()
        delay = max(when - now, self.timeout_s / 20)
        self.sweep_handle = self.loop.call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """End every attempt whose deadline passed (its SYN got no answer in time)."""
        self.sweep_handle = None
        now = time.perf_counter()
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, probe = deadlines.popleft()
            sock = probe.sock
            if sock is None or probe.deadline != deadline:
                continue  # answered already, or a stale entry of an earlier port
            probe.sock = None
            self.by_fd.pop(sock.fileno(), None)
            sock.close()
            self._attempt_done(probe, probe.ports[probe.index], Failure.TIMEOUT, 0.0, None, None)
        if deadlines:
            self._arm_sweep(deadlines[0][0])

    def close(self) -> None:
        """Close every socket still open and give back the slots of unfinished probes."""
        if self.sweep_handle is not None:
            self.sweep_handle.cancel()
            self.sweep_handle = None
        for task in list(self.tasks):
            task.cancel()
        if not self.loop.is_closed():
            self.loop.remove_reader(self.epoll.fileno())
        for probe in self.by_fd.values():
            if probe.sock is not None:
                probe.sock.close()
                probe.sock = None
        self.by_fd.clear()
        self.deadlines.clear()
        self.epoll.close()
        if self.take_slots and self.pacer is not None:
            for _ in range(self.outstanding):
                self.pacer.release_slot()
        self.outstanding = 0
        if not self.done.done():
            self.done.cancel()


def parse_tcp_info_rtt(info: bytes) -> float | None:
    """tcpi_rtt in seconds from TCP_INFO bytes of an established connection; None when the
    buffer is short, the connection is not established or the kernel has no sample (0)."""
    if len(info) < _TCP_INFO_HEAD.size:
        return None
    state, rtt_us = _TCP_INFO_HEAD.unpack_from(info)
    if state != _TCP_ESTABLISHED or rtt_us == 0:
        return None
    return float(rtt_us) / 1e6


def handshake_rtt(sock: socket.socket, loop_rtt: float) -> tuple[float, str]:
    """The handshake RTT of a just-connected socket and its source: the kernel's measure when
    TCP_INFO has one (and it is not beyond what the loop saw), else the loop's."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_HEAD.size)
    except OSError:
        return loop_rtt, RTT_LOOP
    rtt = parse_tcp_info_rtt(info)
    if rtt is None or rtt > loop_rtt:
        return loop_rtt, RTT_LOOP
    return rtt, RTT_KERNEL


def _close_with_rst(sock: socket.socket) -> None:
    """Close an established connection with a RST: no TIME_WAIT here, nothing held there."""
    with contextlib.suppress(OSError):  # the peer reset it already: a plain close is enough
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


def _failure_of(err: int) -> Failure:
    return failure_from_oserror(OSError(err, os.strerror(err)))
