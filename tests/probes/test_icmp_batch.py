"""The batch engine's reply matching on arbitrary bytes: whatever recvmmsg hands it, every
packet is counted as what it is (worked out here packet by packet) and only real answers to
probes in flight become results, with the RTT of the kernel's stamp where there is one.

The end-to-end behaviour (answers, silence, ICMP errors, forgeries, RTTs, the ring's reuse,
concurrent calls) is tested through the kernel in test_icmp.py and test_icmp_rtt.py; here the
engine's buffers are filled by hypothesis instead of the kernel.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from probes.icmp import ICMP4_ECHO_REPLY, IcmpProber
from probes.icmp_batch import BatchEcho
from probes.records import Records, decode
from tests.netns import Netns, needs_root, run_in_netns

pytestmark = [needs_root, pytest.mark.root]

PROBED = "10.77.0.9"
COUNTS = ("malformed", "unrelated", "wrong_id", "unmatched", "wrong_payload", "duplicates",
          "echo_replies")  # fmt: skip


@pytest.fixture(scope="module")
def engine() -> Iterator[BatchEcho]:
    """An engine whose sockets live in a namespace; its matching runs anywhere."""
    with Netns("batchv") as ns:
        ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")

        async def make() -> BatchEcho:
            return BatchEcho(Records(), IcmpProber(timeout_s=1.0))

        engine = run_in_netns(ns, make)
        yield engine
        asyncio.run(engine.close())


# A packet as recvmmsg leaves it: (ICMP bytes, source address, control data: none, a kernel
# receive stamp, or a control message of another kind).
packets = st.tuples(
    st.one_of(
        st.binary(max_size=24),  # anything
        st.tuples(  # something like an echo reply: type, code, id choice, seq, payload choice
            st.sampled_from([0, 0, 0, 3, 8]),
            st.sampled_from([0, 0, 1]),
            st.sampled_from([True, True, False]),
            st.integers(0, 12),  # 0-9 are in flight
            st.sampled_from(["ours", "ours", "ours", "other", "short", "long"]),
        ),
    ),
    st.sampled_from([PROBED, PROBED, PROBED, "10.77.0.10", "192.0.2.1"]),  # noqa: network
    st.sampled_from(["none", "stamp", "stamp", "other"]),
)
# Two right answers to one probe in one batch: the second is a duplicate.
TWICE = [((0, 0, True, 3, "ours"), PROBED, "stamp")] * 2
SENT_AGO_S = 0.010  # the probes in flight went this long before the batch is matched
STAMPED_AFTER_S = 0.002  # a stamped reply reached the host this long after its probe went
_SO_TIMESTAMPING, _SO_TIMESTAMP = 37, 29


def _bytes(shape: bytes | tuple[int, int, bool, int, str], engine: BatchEcho) -> bytes:
    if isinstance(shape, bytes):
        return shape
    kind, code, right_id, seq, payload = shape
    ident = engine.echo_ids[0] if right_id else engine.echo_ids[0] ^ 0x5A5A
    body = {"ours": engine.fallback.payload, "other": b"X" * len(engine.fallback.payload),
            "short": b"", "long": engine.fallback.payload + b"!!"}[payload]  # fmt: skip
    return struct.pack("!BBHHH", kind, code, 0, ident, seq) + body


def _control(kind: str, sent_wall: float) -> bytes:
    """struct cmsghdr (len, level, type) and three timespecs, as recvmmsg writes them. For
    "none" too: a plausible stamp the kernel did not write this time (msg_controllen 0)."""
    stamp = sent_wall + STAMPED_AFTER_S
    seconds = int(stamp)
    data = struct.pack("=qq", seconds, int((stamp - seconds) * 1e9)) + bytes(32)
    level_type = _SO_TIMESTAMP if kind == "other" else _SO_TIMESTAMPING
    return struct.pack("=qii", socket.CMSG_LEN(48), socket.SOL_SOCKET, level_type) + data


def _expected(
    batch: list[tuple[bytes, str, str]], ident: int, payload: bytes
) -> tuple[dict[str, int], dict[int, str]]:
    """What each packet is, worked out on its own: the counter it belongs in, and for each
    probe answered, the control data of its first right answer."""
    counted = dict.fromkeys(COUNTS, 0)
    answered: dict[int, str] = {}
    for data, source, control in batch:
        if len(data) < 8:
            kind = "malformed"
        elif data[0] != ICMP4_ECHO_REPLY:
            kind = "unrelated"
        elif struct.unpack_from("!H", data, 4)[0] != ident:
            kind = "wrong_id"
        elif (seq := struct.unpack_from("!H", data, 6)[0]) >= 10 or source != PROBED:
            kind = "unmatched"
        elif data[8:] != payload:
            kind = "wrong_payload"
        elif seq in answered:
            kind = "duplicates"
        else:
            kind = "echo_replies"
            answered[seq] = control
        counted[kind] += 1
    return counted, answered


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(packets, min_size=1, max_size=64))
@example(TWICE)
def test_every_packet_is_counted_as_what_it_is_and_only_answers_become_results(
    engine: BatchEcho, batch: list[tuple[bytes | tuple[int, int, bool, int, str], str, str]]
) -> None:
    engine.records.take()
    engine._state[:] = 0
    engine._state[:10] = 1  # seqs 0-9 of socket 0 are in flight, to PROBED
    engine._address[:10] = np.frombuffer(socket.inet_aton(PROBED), np.uint32)[0]
    engine._key[:10] = np.arange(10)
    sent_wall = time.time() - SENT_AGO_S
    engine._sent[:10] = time.monotonic() - SENT_AGO_S
    engine._sent_wall[:10] = sent_wall
    before = engine.stats.as_dict()
    incoming = engine._in
    incoming.reset()
    packed: list[tuple[bytes, str, str]] = []
    for row, (shape, source, control) in enumerate(batch):
        data = _bytes(shape, engine)[: incoming.packets.shape[1]]
        packed.append((data, source, control))
        incoming.packets[row, : len(data)] = np.frombuffer(data, np.uint8)
        incoming.headers[row, 7] = len(data)  # msg_len
        incoming.names[row, 4:8] = np.frombuffer(socket.inet_aton(source), np.uint8)
        cmsg = _control(control, sent_wall)
        incoming.control[row, : len(cmsg)] = np.frombuffer(cmsg, np.uint8)
        incoming.headers[row, 5] = 0 if control == "none" else len(cmsg)  # msg_controllen

    engine._match(0, len(batch))

    after = engine.stats.as_dict()
    counted = {name: after[name] - before[name] for name in COUNTS}
    expected, answered = _expected(packed, engine.echo_ids[0], engine.fallback.payload)
    assert counted == expected
    results = list(decode(*engine.records.take()))
    # one result per probe answered, no other
    assert sorted(key for key, *_ in results) == sorted(answered)
    for key, reachable, success, failure, rtt, started_at, details in results:
        assert (reachable, success, failure, started_at) == (True, True, None, sent_wall)
        assert rtt is not None
        if answered[key] == "stamp":  # the kernel's time: when the reply reached the host
            assert details == {"rtt_source": "kernel"}
            assert rtt == pytest.approx(STAMPED_AFTER_S, abs=0.0005)
        else:  # no stamp: when the engine saw it
            assert details == {"rtt_source": "loop"}
            assert rtt >= SENT_AGO_S
