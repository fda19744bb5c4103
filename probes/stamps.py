"""Honest RTTs: the kernel's receive time of an answer, not when a busy event loop read it.

SO_TIMESTAMPING stamps every packet a socket receives (and every error-queue entry) with the
wall-clock time it reached the host. The time the answer then waited in the socket buffer
(wall clock now - stamp) is taken off the loop's own monotonic measure:
RTT = (now - sent) - (now - stamp), i.e. stamp - send time, with no wall-clock send time to keep.
A missing or implausible stamp (the wall clock stepped while the answer waited) leaves the
loop's measure, and `details["rtt_source"]` says which one a result carries.
"""

from __future__ import annotations

import socket
import struct

RTT_KERNEL = "kernel"  # details["rtt_source"]: measured by the kernel (a stamp, TCP_INFO)
RTT_LOOP = "loop"  # details["rtt_source"]: when the event loop saw the answer

# SO_TIMESTAMPING and its control message (same number) on x86, arm and riscv, asking for
# software receive stamps: struct scm_timestamping, three struct timespec (two longs each,
# CLOCK_REALTIME), the first the software stamp of when the packet reached the host. Not
# SO_TIMESTAMPNS: for a packet that came in before the kernel had turned stamping on (it does
# so a moment after the first socket asks), that one reports the time of the read instead.
_SO_TIMESTAMPING = 37
_SCM_TIMESTAMPING = _SO_TIMESTAMPING
_SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3
_SOF_TIMESTAMPING_SOFTWARE = 1 << 4
_TIMESPEC = struct.Struct("=qq")
# recvmsg's ancillary buffer size for the stamps.
STAMP_ANCILLARY_BYTES = socket.CMSG_SPACE(3 * _TIMESPEC.size)
# Reading the two clocks one after the other can make an answer's wait look slightly negative;
# more than this means the wall clock stepped.
_CLOCK_SLACK_S = 0.001


def enable_receive_stamps(sock: socket.socket) -> None:
    """Ask the kernel to stamp every packet this socket receives (read them with recvmsg)."""
    sock.setsockopt(
        socket.SOL_SOCKET,
        _SO_TIMESTAMPING,
        _SOF_TIMESTAMPING_RX_SOFTWARE | _SOF_TIMESTAMPING_SOFTWARE,
    )


def kernel_receive_time(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    """The software receive time (Unix seconds) in recvmsg's SCM_TIMESTAMPING ancillary data;
    None when there is none (or it is zero: the packet was not stamped)."""
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == _SCM_TIMESTAMPING and len(cdata) >= 16:
            seconds, nanoseconds = _TIMESPEC.unpack_from(cdata)
            if seconds == 0 and nanoseconds == 0:
                return None
            return float(seconds + nanoseconds * 1e-9)
    return None


def honest_rtt(received_wall: float | None, now_wall: float, loop_rtt: float) -> tuple[float, str]:
    """The RTT and its source. `loop_rtt`: monotonic send -> now; `received_wall`: the kernel's
    stamp of the answer, `now_wall`: the wall clock now. The time the answer waited for us is
    taken off when there is a stamp and that wait is plausible (not negative, not longer than
    the whole loop measure); else the loop's measure stands."""
    if received_wall is not None:
        waited = now_wall - received_wall
        if -_CLOCK_SLACK_S <= waited <= loop_rtt:
            return max(loop_rtt - waited, 0.0), RTT_KERNEL
    return loop_rtt, RTT_LOOP
