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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TextIO

from monitor.errors import InputError
from monitor.targets import address_of, block_network, candidate_octets, parse_block
from probes.base import Failure, Prober, ProbeResult, Target
from probes.pacing import Pacer

log = logging.getLogger(__name__)

HEADER: Final = ("block", "address", "answered", "probed")


class Hitlist:
    """Responsive addresses per block for one country; mutable, saved by its owner."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._responsive: dict[int, list[int]] = {}  # block -> host octets, preferred first
        self._stats: dict[int, dict[int, list[int]]] = {}  # block -> octet -> [answered, probed]
        self._tried: dict[int, int] = {}  # block -> discovery candidates handed out
        self.skipped = 0
        self.dirty = False

    # ------------------------------------------------------------ queries

    def responsive(self, block: int) -> list[int]:
        """Host octets of the block known to answer, preferred first (empty if none)."""
        return self._responsive.get(block, [])

    def is_known(self, block: int) -> bool:
        return block in self._responsive

    def known_blocks(self) -> int:
        return len(self._responsive)

    def tried(self, block: int) -> int:
        return self._tried.get(block, 0)

    def stats(self, block: int, octet: int) -> tuple[int, int]:
        """(answered, probed) of one address."""
        answered, probed = self._stats.get(block, {}).get(octet, (0, 0))
        return answered, probed

    def is_done(self, block: int, budget: int) -> bool:
        """Discovery is finished for the block: it answered, or its budget is spent."""
        return block in self._responsive or self._tried.get(block, 0) >= budget

    # ------------------------------------------------------------ learning

    def next_candidates(self, block: int, count: int, budget: int) -> list[int]:
        """Up to `count` untried candidate octets of a silent block, within `budget` in all."""
        start = self._tried.get(block, 0)
        stop = min(budget, start + count)
        if stop <= start:
            return []
        self._tried[block] = stop
        return candidate_octets(block, stop)[start:stop]

    def record(self, block: int, octet: int, answered: bool) -> None:
        """One probe of block.octet and whether it answered."""
        per_block = self._stats.get(block)
        if per_block is None:
            per_block = self._stats[block] = {}
        entry = per_block.get(octet)
        if entry is None:
            entry = per_block[octet] = [0, 0]
        entry[1] += 1
        if answered:
            entry[0] += 1
            octets = self._responsive.get(block)
            if octets is None:
                self._responsive[block] = [octet]
            elif octet not in octets:
                octets.append(octet)
        self.dirty = True

    def promote(self, block: int, octet: int) -> None:
        """Make `octet` the block's preferred address (it answered when the first did not)."""
        octets = self._responsive.get(block)
        if octets and octets[0] != octet and octet in octets:
            octets.remove(octet)
            octets.insert(0, octet)
            self.dirty = True

    # ------------------------------------------------------------ files

    def rows(self, block: int) -> Iterator[tuple[str, str, int, int]]:
        """The file rows of one block: responsive addresses first (in preference order)."""
        network = block_network(block)
        per_block = self._stats.get(block, {})
        preferred = self._responsive.get(block, [])
        rest = sorted(o for o in per_block if o not in preferred)
        for octet in preferred + rest:
            answered, probed = per_block.get(octet, (0, 0))
            yield network, address_of(block, octet), answered, probed

    def write(self, handle: TextIO) -> None:
        """The whole hitlist as CSV, blocks in address order."""
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        for block in sorted(self._stats):
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
        octet = address & 255
        per_block = self._stats.setdefault(block, {})
        if octet not in per_block:
            self._tried[block] = self._tried.get(block, 0) + 1
        per_block[octet] = [answered, probed]
        octets = self._responsive.get(block)
        if answered > 0:
            if octets is None:
                self._responsive[block] = [octet]
            elif octet not in octets:
                octets.append(octet)
        elif octets is not None and octet in octets:
            octets.remove(octet)
            if not octets:
                del self._responsive[block]


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
