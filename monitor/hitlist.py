"""Hitlists: per /24 block, the addresses known to answer, learnt by discovery and by rounds.

File format (CSV, UTF-8, header required), one row per probed address:

    block,address,answered,probed
    10.80.3.0/24,10.80.3.1,12,12
    10.80.3.0/24,10.80.3.254,0,1

`answered`/`probed` count probes over the hitlist's life. Addresses with answered > 0 are the
block's responsive addresses, tried by rounds in file order (the first is preferred). A block
whose rows all have answered = 0 was tried and found silent; discovery skips it once its budget
of candidates is spent. Rows may repeat an address: the last one wins (so appending is safe).
Malformed rows are counted in `Hitlist.skipped` and skipped.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import socket
import struct
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TextIO

from monitor.errors import InputError
from monitor.targets import address_of, block_network, candidate_octets, parse_block
from probes.base import Failure, Prober, ProbeResult, Target
from probes.pacing import Pacer

log = logging.getLogger(__name__)

HEADER: Final = ("block", "address", "answered", "probed")


_NO_SLOT: Final = 0  # page entry of a block the hitlist has never seen
_PAIR: Final = struct.Struct("<II")  # (answered, probed) of one address
_COUNTER_MAX: Final = 2**32 - 1


class Hitlist:
    """Responsive addresses per block for one country; mutable, saved by its owner.

    Compact: a block costs one packed `bytes` record (tens of bytes), not dicts of lists.
    Record layout: [n responsive][octets, responsive first in preference order, then silent ones]
    [(answered, probed) as two little-endian u32 per octet, in the same order]. Blocks map to
    record slots through one array('I') page of 256 entries per /16 (slot + 1; 0 = unknown).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._pages: dict[int, array[int]] = {}  # block >> 8 -> slot + 1 of each of its blocks
        self._records: list[bytes] = []  # slot -> packed record (b"" if only tried)
        self._tried = array("I")  # slot -> discovery candidates handed out
        self._known = 0  # blocks with at least one responsive address
        self.skipped = 0
        self.dirty = False

    # ------------------------------------------------------------ slots

    def _slot(self, block: int) -> int:
        """The block's record slot, or -1."""
        page = self._pages.get(block >> 8)
        if page is None:
            return -1
        return page[block & 255] - 1

    def _new_slot(self, block: int) -> int:
        page = self._pages.get(block >> 8)
        if page is None:
            page = self._pages[block >> 8] = array("I", bytes(4 * 256))
        slot = page[block & 255] - 1
        if slot < 0:
            slot = len(self._records)
            self._records.append(b"")
            self._tried.append(0)
            page[block & 255] = slot + 1
        return slot

    def _record(self, block: int) -> bytes:
        slot = self._slot(block)
        return self._records[slot] if slot >= 0 else b""

    def _blocks(self) -> Iterator[int]:
        """Blocks with at least one probed address, in address order."""
        records = self._records
        for high in sorted(self._pages):
            page = self._pages[high]
            for low in range(256):
                slot = page[low]
                if slot != _NO_SLOT and records[slot - 1]:
                    yield high << 8 | low

    # ------------------------------------------------------------ queries

    def responsive(self, block: int) -> list[int]:
        """Host octets of the block known to answer, preferred first (empty if none)."""
        page = self._pages.get(block >> 8)
        if page is None:
            return []
        slot = page[block & 255]
        if slot == _NO_SLOT:
            return []
        record = self._records[slot - 1]
        return list(record[1:1 + record[0]]) if record else []

    def is_known(self, block: int) -> bool:
        record = self._record(block)
        return bool(record) and record[0] > 0

    def known_blocks(self) -> int:
        return self._known

    def tried(self, block: int) -> int:
        slot = self._slot(block)
        return self._tried[slot] if slot >= 0 else 0

    def stats(self, block: int, octet: int) -> tuple[int, int]:
        """(answered, probed) of one address."""
        record = self._record(block)
        count = len(record) // 9
        index = record.find(octet, 1, 1 + count) if record else -1
        if index < 0:
            return 0, 0
        answered, probed = _PAIR.unpack_from(record, 1 + count + 8 * (index - 1))
        return answered, probed

    def is_done(self, block: int, budget: int) -> bool:
        """Discovery is finished for the block: it answered, or its budget is spent."""
        return self.is_known(block) or self.tried(block) >= budget

    # ------------------------------------------------------------ learning

    def next_candidates(self, block: int, count: int, budget: int) -> list[int]:
        """Up to `count` untried candidate octets of a silent block, within `budget` in all."""
        start = self.tried(block)
        stop = min(budget, start + count)
        if stop <= start:
            return []
        self._tried[self._new_slot(block)] = stop
        return candidate_octets(block, stop)[start:stop]

    def record(self, block: int, octet: int, answered: bool) -> None:
        """One probe of block.octet and whether it answered."""
        slot = self._new_slot(block)
        record = self._records[slot]
        count = len(record) // 9
        index = record.find(octet, 1, 1 + count) if record else -1
        if index < 0:
            self._set(slot, octet, int(answered), 1)
        else:
            hits, probes = _PAIR.unpack_from(record, 1 + count + 8 * (index - 1))
            self._set(slot, octet, min(_COUNTER_MAX, hits + answered),
                      min(_COUNTER_MAX, probes + 1))
        self.dirty = True

    def _set(self, slot: int, octet: int, answered: int, probed: int) -> None:
        """Set one address's counters; it is responsive exactly when answered > 0 (a newly
        responsive address goes last among the responsive ones, a newly silent one last)."""
        record = self._records[slot]
        responsive = record[0] if record else 0
        count = len(record) // 9
        index = record.find(octet, 1, 1 + count) - 1 if record else -1
        if index < 0:
            record = _inserted(record, count, octet)
            index = count
            count += 1
        record = record[:1 + count + 8 * index] + _PAIR.pack(answered, probed) \
            + record[1 + count + 8 * (index + 1):]
        if answered > 0 and index >= responsive:
            record = _moved(record, index, responsive, responsive + 1)
            self._known += responsive == 0
        elif answered == 0 and index < responsive:
            record = _moved(record, index, count - 1, responsive - 1)
            self._known -= responsive == 1
        self._records[slot] = record

    def promote(self, block: int, octet: int) -> None:
        """Make `octet` the block's preferred address (it answered when the first did not)."""
        slot = self._slot(block)
        if slot < 0:
            return
        record = self._records[slot]
        if not record:
            return
        index = record.find(octet, 2, 1 + record[0])  # among the responsive ones but the first
        if index > 0:
            self._records[slot] = _moved(record, index - 1, 0, record[0])
            self.dirty = True

    # ------------------------------------------------------------ files

    def rows(self, block: int) -> Iterator[tuple[str, str, int, int]]:
        """The file rows of one block: responsive addresses first (in preference order)."""
        record = self._record(block)
        if not record:
            return
        network = block_network(block)
        count = len(record) // 9
        responsive = record[0]
        order = list(range(responsive))
        order += sorted(range(responsive, count), key=lambda i: record[1 + i])
        for i in order:
            answered, probed = _PAIR.unpack_from(record, 1 + count + 8 * i)
            yield network, address_of(block, record[1 + i]), answered, probed

    def write(self, handle: TextIO) -> None:
        """The whole hitlist as CSV, blocks in address order."""
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        for block in self._blocks():
            writer.writerows(self.rows(block))

    def save(self, path: str | Path | None = None) -> Path:
        """Write the whole hitlist atomically (temp file + rename). Returns the path."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("hitlist has no path to save to")
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        self.write(buffer)
        temp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        temp.write_text(buffer.getvalue(), encoding="utf-8")
        os.replace(temp, target)
        self.dirty = False
        return target

    @classmethod
    def load(cls, path: str | Path, missing_ok: bool = True) -> Hitlist:
        """Read a hitlist file; an absent file gives an empty hitlist (when `missing_ok`)."""
        hitlist = cls(path)
        try:
            with Path(path).open(encoding="utf-8", errors="replace", newline="") as handle:
                hitlist.read(handle, str(path))
        except FileNotFoundError:
            if missing_ok:
                return hitlist
            raise InputError(f"{path}: hitlist file not found") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read hitlist: {exc.strerror or exc}") from None
        hitlist.dirty = False
        return hitlist

    def read(self, handle: TextIO, source: str) -> None:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        if tuple(h.strip() for h in header) != HEADER:
            raise InputError(
                f"{source}:1: expected the header {','.join(HEADER)!r}, got {','.join(header)!r}"
            )
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                self._read_row(row)
            except (ValueError, IndexError) as exc:
                self.skipped += 1
                if self.skipped <= 5:
                    log.warning("%s:%d: skipped malformed hitlist row: %s", source, lineno, exc)
        if self.skipped:
            log.warning("%s: %d malformed hitlist rows skipped", source, self.skipped)

    def _read_row(self, row: list[str]) -> None:
        if len(row) != 4:
            raise ValueError(f"expected 4 fields, got {len(row)}")
        block = parse_block(row[0])
        address = parse_block(row[1]) << 8 | int(row[1].strip().rsplit(".", 1)[1])
        if address >> 8 != block or "/" in row[1]:
            raise ValueError(f"address {row[1]!r} is not an address in block {row[0]}")
        answered, probed = int(row[2]), int(row[3])
        if not 0 <= answered <= probed:
            raise ValueError(f"expected 0 <= answered <= probed, got {answered}, {probed}")
        if probed > _COUNTER_MAX:
            raise ValueError(f"expected counts below 2**32, got {probed}")
        slot = self._new_slot(block)
        record = self._records[slot]
        octet = address & 255
        if not record or record.find(octet, 1, 1 + len(record) // 9) < 0:
            self._tried[slot] += 1
        self._set(slot, octet, answered, probed)


def _inserted(record: bytes, count: int, octet: int) -> bytes:
    """`record` with one more address, last, counters zero."""
    if not record:
        return bytes((0, octet)) + bytes(8)
    return record[:1 + count] + bytes((octet,)) + record[1 + count:] + bytes(8)


def _moved(record: bytes, source: int, dest: int, responsive: int) -> bytes:
    """`record` with entry `source` moved to position `dest` and `responsive` in its header."""
    count = len(record) // 9
    octets = bytearray(record[1:1 + count])
    pairs = bytearray(record[1 + count:])
    octet = octets.pop(source)
    octets.insert(dest, octet)
    pair = pairs[8 * source:8 * source + 8]
    del pairs[8 * source:8 * source + 8]
    pairs[8 * dest:8 * dest] = pair
    return bytes((responsive,)) + octets + pairs


# ---------------------------------------------------------------- discovery


def discovery_done(hitlist: Hitlist, block: int, budget: int, want: int) -> bool:
    """A block needs no more discovery: `want` responsive addresses, or its budget is spent."""
    return len(hitlist.responsive(block)) >= want or hitlist.tried(block) >= budget


async def discover(
    blocks: Sequence[int],
    hitlist: Hitlist,
    prober: Prober,
    pacer: Pacer,
    *,
    budget: int = 24,
    per_wave: int = 4,
    want: int = 2,
    on_block_done: Callable[[int], None] | None = None,
) -> int:
    """Find responsive addresses of `blocks` by waves of candidate probes (ICMP).

    Each wave tries the next `per_wave` candidates (.1, .254, .2, ... then a per-block random
    order) of every block still short of `want` responsive addresses, until `budget` candidates
    per block are spent. Blocks already done in `hitlist` are skipped, so a re-run resumes.
    `on_block_done(block)` is called once per block as soon as it is finished (to write it out).
    Returns the number of blocks that have at least one responsive address.
    """
    pending = [b for b in blocks if not discovery_done(hitlist, b, budget, want)]

    def wave() -> Iterator[Target]:
        for block in pending:
            for octet in hitlist.next_candidates(block, per_wave, budget):
                yield Target(address_of(block, octet))

    def on_result(result: ProbeResult) -> None:
        try:
            address = int.from_bytes(socket.inet_aton(result.target.address), "big")
        except OSError:
            return
        if result.failure is not Failure.BLOCKED_BY_POLICY:
            hitlist.record(address >> 8, address & 255, result.reachable)

    while pending:
        await prober.probe_many(wave(), pacer, on_result)
        still = []
        for block in pending:
            if discovery_done(hitlist, block, budget, want):
                if on_block_done is not None:
                    on_block_done(block)
            else:
                still.append(block)
        pending = still
    return sum(1 for b in blocks if hitlist.is_known(b))


class HitlistAppender:
    """Appends finished blocks to a hitlist file as discovery goes (so a re-run resumes)."""

    def __init__(self, hitlist: Hitlist, path: str | Path) -> None:
        self.hitlist = hitlist
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = self.path.open("a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._handle, lineterminator="\n")
        if fresh:
            self._writer.writerow(HEADER)
            self._handle.flush()

    def __call__(self, block: int) -> None:
        self._writer.writerows(self.hitlist.rows(block))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
