"""The batch engine's reply matching on arbitrary bytes: whatever recvmmsg hands it, every
packet is counted exactly once and only real answers to probes in flight become results.

The end-to-end behaviour (answers, silence, ICMP errors, forgeries, RTTs, the ring's reuse,
concurrent calls) is tested through the kernel in test_icmp.py and test_icmp_rtt.py; here the
engine's buffers are filled by hypothesis instead of the kernel.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from probes.icmp import IcmpProber
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


# A packet as recvmmsg leaves it: (ICMP bytes, source address, bytes of control data).
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
    st.sampled_from([0, 16, 32]),
)
# Two right answers to one probe in one batch: the second is a duplicate.
TWICE = [((0, 0, True, 3, "ours"), PROBED, 32)] * 2


def _bytes(shape: bytes | tuple[int, int, bool, int, str], engine: BatchEcho) -> bytes:
    if isinstance(shape, bytes):
        return shape
    kind, code, right_id, seq, payload = shape
    ident = engine.echo_ids[0] if right_id else engine.echo_ids[0] ^ 0x5A5A
    body = {"ours": engine.fallback.payload, "other": b"X" * len(engine.fallback.payload),
            "short": b"", "long": engine.fallback.payload + b"!!"}[payload]  # fmt: skip
    return struct.pack("!BBHHH", kind, code, 0, ident, seq) + body


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(packets, min_size=1, max_size=64))
@example(TWICE)
def test_every_packet_is_counted_once_and_only_answers_become_results(
    engine: BatchEcho, batch: list[tuple[bytes | tuple[int, int, bool, int, str], str, int]]
) -> None:
    engine.records.take()
    engine._state[:] = 0
    engine._state[:10] = 1  # seqs 0-9 of socket 0 are in flight, to PROBED
    engine._address[:10] = np.frombuffer(socket.inet_aton(PROBED), np.uint32)[0]
    engine._key[:10] = np.arange(10)
    before = engine.stats.as_dict()
    incoming = engine._in
    incoming.reset()
    for row, (shape, source, control) in enumerate(batch):
        data = _bytes(shape, engine)[: incoming.packets.shape[1]]
        incoming.packets[row, : len(data)] = np.frombuffer(data, np.uint8)
        incoming.headers[row, 7] = len(data)  # msg_len
        incoming.names[row, 4:8] = np.frombuffer(socket.inet_aton(source), np.uint8)
        incoming.headers[row, 5] = control  # msg_controllen; the stamp bytes are whatever is there

    engine._match(0, len(batch))

    after = engine.stats.as_dict()
    counted = {name: after[name] - before[name] for name in COUNTS}
    assert sum(counted.values()) == len(batch)
    results = list(decode(*engine.records.take()))
    assert len(results) == counted["echo_replies"]
    assert len({key for key, *_ in results}) == len(results)  # one result per probe
    for key, reachable, success, failure, rtt, _started_at, details in results:
        assert 0 <= key < 10 and (reachable, success, failure) == (True, True, None)
        assert rtt is not None and rtt >= 0 and details["rtt_source"] in ("kernel", "loop")
