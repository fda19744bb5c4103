"""The compact Hitlist behaves like a plain dict-of-lists model under random operations."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.hitlist import Hitlist

BLOCKS = st.sampled_from([0x0A5001, 0x0A5002, 0x0A51FF, 0x0B0000, 0xC0A800])
OCTETS = st.sampled_from([1, 2, 10, 129, 254, 255])


@dataclass
class Model:
    """The obvious representation: responsive octets in preference order, counters per octet."""

    responsive: dict[int, list[int]] = field(default_factory=dict)
    stats: dict[int, dict[int, list[int]]] = field(default_factory=dict)

    def record(self, block: int, octet: int, answered: bool) -> None:
        entry = self.stats.setdefault(block, {}).setdefault(octet, [0, 0])
        entry[0] += answered
        entry[1] += 1
        octets = self.responsive.setdefault(block, []) if answered else []
        if answered and octet not in octets:
            octets.append(octet)

    def promote(self, block: int, octet: int) -> None:
        octets = self.responsive.get(block, [])
        if octet in octets:
            octets.remove(octet)
            octets.insert(0, octet)


OPERATIONS = st.lists(st.tuples(st.sampled_from(["record", "promote", "candidates"]),
                                BLOCKS, OCTETS, st.booleans()), max_size=60)


def check(hitlist: Hitlist, model: Model, tried: dict[int, int]) -> None:
    blocks = set(model.stats) | set(tried)
    assert hitlist.known_blocks() == sum(1 for octets in model.responsive.values() if octets)
    for block in blocks:
        assert hitlist.responsive(block) == model.responsive.get(block, [])
        assert hitlist.is_known(block) == bool(model.responsive.get(block))
        assert hitlist.tried(block) == tried.get(block, 0)
        for octet, (answered, probed) in model.stats.get(block, {}).items():
            assert hitlist.stats(block, octet) == (answered, probed)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS)
def test_compact_hitlist_matches_the_model_and_survives_a_file_round_trip(
    operations: list[tuple[str, int, int, bool]],
) -> None:
    hitlist, model = Hitlist(), Model()
    tried: dict[int, int] = {}
    for operation, block, octet, answered in operations:
        if operation == "record":
            hitlist.record(block, octet, answered)
            model.record(block, octet, answered)
        elif operation == "promote":
            hitlist.promote(block, octet)
            model.promote(block, octet)
        else:
            handed = hitlist.next_candidates(block, 2, 5)
            assert len(handed) == min(2, 5 - tried.get(block, 0))
            tried[block] = tried.get(block, 0) + len(handed)
    check(hitlist, model, tried)

    text = io.StringIO()
    hitlist.write(text)
    loaded = Hitlist()
    loaded.read(io.StringIO(text.getvalue()), "round-trip")
    assert loaded.skipped == 0
    # A loaded file knows only probed addresses: tried = addresses with a row.
    check(loaded, model, {block: len(per_block) for block, per_block in model.stats.items()})
    again = io.StringIO()
    loaded.write(again)
    assert again.getvalue() == text.getvalue()


def test_a_later_row_can_make_an_address_silent_or_responsive_again() -> None:
    text = ("block,address,answered,probed\n"
            "10.80.1.0/24,10.80.1.1,3,4\n"
            "10.80.1.0/24,10.80.1.254,2,2\n"
            "10.80.1.0/24,10.80.1.1,0,5\n"  # .1 now silent: .254 is the only responsive one
            "10.80.2.0/24,10.80.2.7,0,1\n"
            "10.80.2.0/24,10.80.2.7,1,2\n"  # .7 answered after all
            "10.80.3.0/24,10.80.3.1,1,4294967296\n")  # beyond the u32 counters: skipped
    hitlist = Hitlist()
    hitlist.read(io.StringIO(text), "rows")
    assert hitlist.skipped == 1
    assert hitlist.responsive(0x0A5001) == [254]
    assert hitlist.stats(0x0A5001, 1) == (0, 5)
    assert hitlist.tried(0x0A5001) == 2
    assert hitlist.responsive(0x0A5002) == [7]
    assert hitlist.known_blocks() == 2
    assert not hitlist.is_known(0x0A5003)
    out = io.StringIO()
    hitlist.write(out)
    assert out.getvalue().splitlines()[1:] == [
        "10.80.1.0/24,10.80.1.254,2,2", "10.80.1.0/24,10.80.1.1,0,5", "10.80.2.0/24,10.80.2.7,1,2"]
