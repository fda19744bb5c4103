"""World scale in one process: the memory of 5,000,000 /24 blocks in the real structures.

Builds, from the packaged country prefixes (largest countries first until --blocks is reached),
the structures a daemon holds for its universe and hitlists: a `CountryUniverse` per country
(blocks and their ASNs, via `build_country`) and a `Hitlist` per country with --addresses
responsive addresses per block (recorded as rounds and discovery do, `Hitlist.record`). Prints
the resident memory (VmRSS) after each stage, and the bytes per block. No network at all.

    python3 benchmarks/scale_state.py                     # 5,000,000 blocks, 1 address each
    python3 benchmarks/scale_state.py --blocks 1000000 --addresses 2
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procstat import vm_kib

from monitor.hitlist import Hitlist
from monitor.targets import (
    CountryUniverse,
    Universe,
    blocks_of,
    build_country,
    load_packaged_prefixes,
    packaged_countries,
)


def rss_bytes() -> int:
    return vm_kib("VmRSS") * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5_000_000)
    parser.add_argument("--addresses", type=int, default=1,
                        help="responsive addresses recorded per block in the hitlists")
    args = parser.parse_args()

    gc.collect()
    base = rss_bytes()
    began = time.perf_counter()
    sizes = sorted(((len(blocks_of(load_packaged_prefixes(cc))), cc)
                    for cc in packaged_countries()), reverse=True)
    gc.collect()
    after_prefixes = rss_bytes()
    countries: list[CountryUniverse] = []
    total = 0
    for size, code in sizes:
        if total >= args.blocks:
            break
        want = min(size, args.blocks - total)
        country = build_country(code, load_packaged_prefixes(code),
                                sample=want if want < size else None)
        countries.append(country)
        total += len(country.blocks)
    universe = Universe(tuple(countries))
    gc.collect()
    after_universe = rss_bytes()
    build_s = time.perf_counter() - began

    began = time.perf_counter()
    hitlists: dict[str, Hitlist] = {}
    octets = [1, 254, 129, 65][: max(1, min(args.addresses, 4))]
    for country in universe.countries:
        hitlist = hitlists[country.code] = Hitlist()
        for block in country.blocks:
            for octet in octets:
                hitlist.record(block, octet, answered=True)
        hitlist.dirty = False
    gc.collect()
    after_hitlists = rss_bytes()
    hitlist_s = time.perf_counter() - began

    blocks = universe.block_count()
    print(json.dumps({
        "blocks": blocks,
        "countries": len(universe.countries),
        "addresses_per_block": len(octets),
        "rss_start_mb": round(base / 2**20, 1),
        "prefix_tables_mb": round((after_prefixes - base) / 2**20, 1),
        "universe_mb": round((after_universe - after_prefixes) / 2**20, 1),
        "universe_bytes_per_block": round((after_universe - after_prefixes) / blocks, 1),
        "hitlists_mb": round((after_hitlists - after_universe) / 2**20, 1),
        "hitlist_bytes_per_block": round((after_hitlists - after_universe) / blocks, 1),
        "rss_total_mb": round(after_hitlists / 2**20, 1),
        "universe_build_s": round(build_s, 1),
        "hitlist_build_s": round(hitlist_s, 1),
    }))


if __name__ == "__main__":
    main()
