"""The worker pool's result records: whatever goes in comes back out, packed or as a row."""

from __future__ import annotations

import pickle
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from probes.base import Failure, ProbeResult, Target
from probes.records import RECORD, Records, decode

keys = st.integers(min_value=0, max_value=2**62)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
rtts = st.none() | st.floats(min_value=0, max_value=60, allow_nan=False)
rtt_sources = st.sampled_from(["kernel", "loop"])
details = st.dictionaries(
    st.sampled_from(["rtt_source", "errno", "icmp_type", "ttl", "reported_by"]),
    st.one_of(st.integers(-5, 300), st.text(max_size=8), rtt_sources),
    max_size=3,
)


failures = st.none() | st.sampled_from(Failure)
results = st.tuples(keys, st.booleans(), st.booleans(), failures, rtts, times, details)


@given(st.lists(results, max_size=30))
def test_any_result_comes_back_as_it_went_in(
    rows: list[tuple[int, bool, bool, Failure | None, float | None, float, dict[str, Any]]],
) -> None:
    records = Records()
    for key, reachable, success, failure, rtt, started_at, extra in rows:
        result = ProbeResult(Target("192.0.2.1"), "icmp", reachable, success, failure, rtt,
                             started_at, extra)  # fmt: skip
        records.result(key, result)
    packed, unpacked = records.take()
    assert not records
    # What a frame carries survives pickling, and every result comes back exactly once.
    packed, unpacked = pickle.loads(pickle.dumps((packed, unpacked)))
    decoded = sorted(decode(packed, unpacked), key=repr)
    assert decoded == sorted(rows, key=repr)
    # Only results with more to say than where their RTT came from travel as rows.
    simple = [r for r in rows if r[6] in ({}, {"rtt_source": "kernel"}, {"rtt_source": "loop"})]
    assert len(packed) == RECORD.size * len(simple)


@given(keys, rtts.filter(lambda v: v is not None), rtt_sources, times, st.sampled_from(Failure))
def test_the_probers_shortcuts_match_a_full_result(
    key: int, rtt: float, source: str, started_at: float, failure: Failure
) -> None:
    shortcut, full = Records(), Records()
    shortcut.answered(key, rtt, source, started_at)
    shortcut.answered(key + 1, rtt, source, started_at, {"ttl": 64})
    shortcut.ended(key + 2, failure, started_at, {})
    shortcut.ended(key + 3, failure, started_at, {"errno": "EHOSTUNREACH"})
    target = Target("192.0.2.1")
    for k, result in (
        (key, ProbeResult(target, "icmp", True, True, None, rtt, started_at,
                          {"rtt_source": source})),
        (key + 1, ProbeResult(target, "icmp", True, True, None, rtt, started_at,
                              {"rtt_source": source, "ttl": 64})),
        (key + 2, ProbeResult(target, "icmp", False, False, failure, None, started_at, {})),
        (key + 3, ProbeResult(target, "icmp", False, False, failure, None, started_at,
                              {"errno": "EHOSTUNREACH"})),
    ):  # fmt: skip
        full.result(k, result)
    assert shortcut.take() == full.take()


def test_the_first_result_after_a_hand_over_wakes_the_writer() -> None:
    wakes: list[int] = []
    records = Records(on_first=lambda: wakes.append(1))
    records.answered(1, 0.01, "kernel", 1.0)
    records.ended(2, Failure.TIMEOUT, 1.0, {})
    assert len(wakes) == 1  # one frame per burst of results
    records.take()
    records.ended(3, Failure.TIMEOUT, 1.0, {"errno": "ETIMEDOUT"})
    assert len(wakes) == 2
    [(key, *_outcome, details)] = decode(*records.take())
    assert (key, details) == (3, {"errno": "ETIMEDOUT"})
