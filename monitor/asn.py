"""ASN attribution: which network (autonomous system) announces an IPv4 address.

Two common public formats are read, detected from their first data line:
- iptoasn's `ip2asn-v4.tsv`: `range_start<TAB>range_end<TAB>AS_number<TAB>country<TAB>descr`,
  inclusive address ranges; AS 0 means "not routed" and attributes nothing.
- CAIDA's routeviews `prefix2as`: `prefix<TAB>length<TAB>asn`, where asn may be `a_b` (a prefix
  announced by several origins, MOAS) or `a,b` (an AS set); the first AS is taken.
Overlapping entries are resolved by the most specific one (longest prefix / shortest range),
as routing would. Malformed lines are counted in `AsnTable.skipped` and skipped.
"""

from __future__ import annotations

import bisect
import gzip
import ipaddress
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from monitor.errors import InputError

log = logging.getLogger(__name__)

AsnFormat = Literal["ip2asn", "prefix2as"]
ASN_FORMATS: Final = ("ip2asn", "prefix2as")
_MAX_ASN: Final = 2**32 - 1


@dataclass(frozen=True, slots=True)
class AsnRange:
    start: int  # first IPv4 address, as an integer
    end: int  # last IPv4 address, inclusive
    asn: int


@dataclass
class AsnTable:
    """Disjoint, sorted IPv4 ranges -> ASN; `lookup` is a bisect."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    asns: list[int] = field(default_factory=list)
    skipped: int = 0  # malformed lines of the source

    @classmethod
    def from_ranges(cls, ranges: Iterable[AsnRange], skipped: int = 0) -> AsnTable:
        table = cls(skipped=skipped)
        for piece in _most_specific_first(ranges):
            if table.ends and table.ends[-1] + 1 == piece.start and table.asns[-1] == piece.asn:
                table.ends[-1] = piece.end
            else:
                table.starts.append(piece.start)
                table.ends.append(piece.end)
                table.asns.append(piece.asn)
        return table

    def __len__(self) -> int:
        return len(self.starts)

    def lookup(self, address: int) -> int | None:
        """The ASN of an IPv4 address given as an integer, or None when no entry covers it."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and address <= self.ends[i]:
            return self.asns[i]
        return None

    def lookup_str(self, address: str) -> int | None:
        try:
            value = int(ipaddress.IPv4Address(address))
        except ValueError:
            return None
        return self.lookup(value)


def _most_specific_first(ranges: Iterable[AsnRange]) -> Iterator[AsnRange]:
    """Flatten possibly nested ranges into disjoint pieces where the innermost range wins.

    A sweep over ranges sorted by start (wider first on ties) with a stack of the ranges that
    enclose the current position.
    """
    ordered = sorted(ranges, key=lambda r: (r.start, -r.end))
    stack: list[AsnRange] = []
    cursor = 0  # first address not yet emitted

    def close_until(limit: int) -> Iterator[AsnRange]:
        # Emit and pop every enclosing range that ends before `limit`.
        nonlocal cursor
        while stack and stack[-1].end < limit:
            top = stack.pop()
            if cursor <= top.end:
                yield AsnRange(cursor, top.end, top.asn)
                cursor = top.end + 1

    for current in ordered:
        yield from close_until(current.start)
        if stack and cursor < current.start:
            yield AsnRange(cursor, current.start - 1, stack[-1].asn)
        cursor = max(cursor, current.start)
        stack.append(current)
    yield from close_until(_MAX_ASN + 1)


def _first_asn(text: str) -> int:
    """'9198', '9198_29355' (MOAS) or '9198,29355' (AS set) -> 9198; ValueError otherwise."""
    first = text.replace("_", ",").split(",", 1)[0].strip()
    if first.upper().startswith("AS"):
        first = first[2:]
    asn = int(first)
    if not 0 <= asn <= _MAX_ASN:
        raise ValueError(f"AS number out of range: {asn}")
    return asn


def parse_ip2asn_line(line: str) -> AsnRange | None:
    """One ip2asn-v4.tsv line -> a range; None for AS 0 (not routed). ValueError if malformed."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) < 3:
        raise ValueError(f"expected at least 3 tab-separated fields, got {len(fields)}")
    start = int(ipaddress.IPv4Address(fields[0].strip()))
    end = int(ipaddress.IPv4Address(fields[1].strip()))
    if end < start:
        raise ValueError(f"range end {fields[1]} is before its start {fields[0]}")
    asn = _first_asn(fields[2])
    return None if asn == 0 else AsnRange(start, end, asn)


def parse_prefix2as_line(line: str) -> AsnRange | None:
    """One routeviews prefix2as line -> a range (None for AS 0). ValueError if malformed."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 3:
        raise ValueError(f"expected 3 tab-separated fields, got {len(fields)}")
    length = int(fields[1])
    network = ipaddress.IPv4Network(f"{fields[0].strip()}/{length}", strict=True)
    asn = _first_asn(fields[2])
    if asn == 0:
        return None
    return AsnRange(int(network.network_address), int(network.broadcast_address), asn)


def detect_format(line: str) -> AsnFormat:
    """Tell the two formats apart by the second field: an address (ip2asn) or a length."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) >= 2 and "." in fields[1]:
        return "ip2asn"
    return "prefix2as"


def parse_asn_lines(
    lines: Iterable[str], source: str, fmt: AsnFormat | None = None
) -> AsnTable:
    """Parse either format (auto-detected unless `fmt`); malformed lines are logged and counted."""
    parser = None
    ranges: list[AsnRange] = []
    skipped = 0
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if parser is None:
            chosen = fmt or detect_format(raw)
            parser = parse_ip2asn_line if chosen == "ip2asn" else parse_prefix2as_line
        try:
            parsed = parser(raw)
        except ValueError as exc:
            skipped += 1
            if skipped <= 5:
                log.warning("%s:%d: skipped malformed ASN line: %s", source, lineno, exc)
            continue
        if parsed is not None:
            ranges.append(parsed)
    if skipped:
        log.warning("%s: %d malformed lines skipped in total", source, skipped)
    return AsnTable.from_ranges(ranges, skipped=skipped)


def load_asn_table(path: str | Path, fmt: AsnFormat | None = None) -> AsnTable:
    """Read an ASN file (plain or .gz). Raises InputError if unreadable or nothing parses."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
                table = parse_asn_lines(handle, str(path), fmt)
        else:
            with path.open(encoding="utf-8", errors="replace") as handle:
                table = parse_asn_lines(handle, str(path), fmt)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ASN file: {exc.strerror or exc}") from None
    if not table and table.skipped:
        raise InputError(
            f"{path}: no valid line; expected ip2asn-v4.tsv (start<TAB>end<TAB>asn<TAB>...) "
            f"or prefix2as (prefix<TAB>length<TAB>asn)"
        )
    return table
