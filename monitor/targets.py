"""Target universes: country prefixes -> /24 blocks (sampled, sharded, ASN-attributed), named
endpoints, control targets.

A /24 block is an int: its network address >> 8 (10.80.3.0/24 -> 0x0A5003). Per country the
blocks travel in `array('I')`s, not objects, so a round over ~13,000 Kazakh blocks stays light.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Final

from monitor.asn import AsnTable
from monitor.errors import InputError
from monitor.series import VANTAGE_COUNTRY
from probes.base import DnsQuery, Target, content_lines
from probes.pacing import Blocklist

if TYPE_CHECKING:
    from monitor.config import Config

PACKAGED_PREFIXES: Final = "country-prefixes/ipv4.tsv.gz"
PACKAGED_BLOCKLIST: Final = "blocklist.txt"

# Addresses tried first in a block: routers and servers sit on these far more often.
COMMON_OCTETS: Final = (1, 254, 2, 129, 10, 100, 253, 65, 193, 3, 33, 97)


def packaged_data(name: str) -> Path:
    """Path of a file shipped in monitor/data/."""
    return Path(str(resources.files("monitor") / "data" / name))


# ---------------------------------------------------------------- prefixes and blocks


def parse_prefix_lines(lines: Iterable[str], source: str) -> list[ipaddress.IPv4Network]:
    """One IPv4 CIDR per line, `#` comments. Raises InputError naming file:line."""
    networks = []
    for lineno, text in content_lines(lines):
        try:
            networks.append(ipaddress.IPv4Network(text, strict=False))
        except ValueError as exc:
            raise InputError(
                f"{source}:{lineno}: expected an IPv4 prefix like 2.132.0.0/14, got {text!r} "
                f"({exc})"
            ) from None
    return networks


def load_prefix_file(path: str | Path) -> list[ipaddress.IPv4Network]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"{path}: cannot read prefix file: {exc.strerror or exc}") from None
    return parse_prefix_lines(text.splitlines(), str(path))


def packaged_countries() -> frozenset[str]:
    """Country codes that have packaged prefixes."""
    return frozenset(_packaged_lines())


def load_packaged_prefixes(country: str) -> list[ipaddress.IPv4Network]:
    """The packaged snapshot of a country's delegated IPv4 prefixes (empty if none)."""
    lines = _packaged_lines().get(country.upper(), [])
    return parse_prefix_lines(lines, f"{PACKAGED_PREFIXES}[{country.upper()}]")


_packaged_cache: dict[str, list[str]] | None = None


def _packaged_lines() -> dict[str, list[str]]:
    global _packaged_cache
    if _packaged_cache is None:
        by_country: dict[str, list[str]] = {}
        with gzip.open(packaged_data(PACKAGED_PREFIXES), "rt", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("#"):
                    continue
                country, _, prefix = line.partition("\t")
                by_country.setdefault(country, []).append(prefix)
        _packaged_cache = by_country
    return _packaged_cache


def blocks_of(networks: Iterable[ipaddress.IPv4Network]) -> array[int]:
    """Every /24 block the networks touch, sorted and unique (a /26 gives its whole /24)."""
    seen: set[int] = set()
    for net in networks:
        first = int(net.network_address) >> 8
        last = int(net.broadcast_address) >> 8
        seen.update(range(first, last + 1))
    return array("I", sorted(seen))


def block_network(block: int) -> str:
    """0x0A5003 -> '10.80.3.0/24'."""
    return f"{ipaddress.IPv4Address(block << 8)}/24"


def parse_block(text: str) -> int:
    """'10.80.3.0/24' (or any address inside it) -> the block int. ValueError if not IPv4."""
    address = text.split("/", 1)[0].strip()
    return int(ipaddress.IPv4Address(address)) >> 8


def address_of(block: int, octet: int) -> str:
    value = (block << 8) | octet
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def without_blocklisted(blocks: array[int], blocklist: Blocklist) -> array[int]:
    """Drop blocks that lie wholly inside the blocklist (never probed, so never counted)."""
    return array("I", (b for b in blocks if not blocklist.covers(4, b << 8, (b << 8) | 255)))


def _block_hash(block: int, salt: bytes) -> int:
    digest = hashlib.blake2b((block << 8).to_bytes(4, "big"), digest_size=8, key=salt)
    return int.from_bytes(digest.digest(), "big")


def sample_blocks(blocks: Sequence[int], count: int | None, country: str) -> array[int]:
    """A stable sample of `count` blocks (all when None or enough): the same on every start.

    Blocks are ranked by a keyed hash and the lowest `count` kept, so the sample also stays
    mostly the same when the prefix list changes a little. Returned sorted.
    """
    if count is None or count >= len(blocks):
        return array("I", blocks)
    salt = f"sample:{country.upper()}".encode()
    ranked = sorted(blocks, key=lambda b: _block_hash(b, salt))
    return array("I", sorted(ranked[:count]))


def shard_of(block: int, shards: int) -> int:
    """Which of `shards` shards probes `block`: a stable hash of its network address."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return _block_hash(block, b"shard") % shards


def shard_of_text(text: str, shards: int) -> int:
    """The shard of a named endpoint (by its description), for `--shard i/N`."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=b"shard").digest()
    return int.from_bytes(digest, "big") % shards


def candidate_octets(block: int, count: int) -> list[int]:
    """The first `count` host octets to try when discovering a block's responsive addresses.

    The common ones (.1, .254, .2, ...) first, then a per-block pseudo-random order of the other
    host addresses (an affine permutation mod 256 seeded by the block: stable, cheap).
    """
    result = list(COMMON_OCTETS[:count])
    if len(result) >= count:
        return result
    mixed = (block * 2654435761) & 0xFFFFFFFF
    step = ((mixed >> 8) & 255) | 1  # odd, so i -> step*i + offset is a permutation mod 256
    offset = mixed & 255
    taken = set(COMMON_OCTETS)
    for i in range(256):
        octet = (step * i + offset) & 255
        if octet in (0, 255) or octet in taken:
            continue
        result.append(octet)
        if len(result) >= count:
            break
    return result


# ---------------------------------------------------------------- universes


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A named endpoint of a country: probed by `method` every round."""

    country: str
    method: str  # "tcp" | "http" | "dns" | "icmp"
    target: Target
    asn: int | None = None


@dataclass(frozen=True)
class CountryUniverse:
    """What one country's rounds probe. `blocks[i]` belongs to AS `block_asns[i]` (0: unknown)."""

    code: str
    blocks: array[int] = field(default_factory=lambda: array("I"))
    block_asns: array[int] = field(default_factory=lambda: array("I"))
    endpoints: tuple[Endpoint, ...] = ()
    methods: frozenset[str] = frozenset({"icmp"})
    prefix_blocks: int = 0  # blocks in the address space before sampling and sharding

    def asn_of_block(self) -> dict[int, int]:
        return {b: a for b, a in zip(self.blocks, self.block_asns, strict=True) if a}

    def asn_counts(self) -> dict[int, int]:
        """ASN -> number of blocks (0 = not attributed)."""
        counts: dict[int, int] = {}
        for asn in self.block_asns:
            counts[asn] = counts.get(asn, 0) + 1
        return counts


@dataclass(frozen=True)
class Universe:
    """Every target of a vantage: the countries, and the control targets abroad."""

    countries: tuple[CountryUniverse, ...]
    control: tuple[Endpoint, ...] = ()
    min_control_up_fraction: float = 0.5

    def country(self, code: str) -> CountryUniverse:
        for country in self.countries:
            if country.code == code.upper():
                return country
        raise KeyError(code)

    def block_count(self) -> int:
        return sum(len(c.blocks) for c in self.countries)


def attribute_blocks(blocks: Sequence[int], table: AsnTable | None) -> array[int]:
    """The ASN of each block's .1 address (0 when unknown or no table)."""
    if table is None:
        return array("I", bytes(4 * len(blocks)))
    return array("I", (table.lookup((b << 8) | 1) or 0 for b in blocks))


def build_country(
    code: str,
    networks: Iterable[ipaddress.IPv4Network],
    *,
    sample: int | None = None,
    shard: tuple[int, int] | None = None,
    blocklist: Blocklist | None = None,
    asn_table: AsnTable | None = None,
    endpoints: Iterable[Endpoint] = (),
    methods: Iterable[str] = ("icmp",),
) -> CountryUniverse:
    """Prefixes -> blocks -> minus blocklist -> stable sample -> this shard's part, attributed."""
    all_blocks = blocks_of(networks)
    blocks = without_blocklisted(all_blocks, blocklist) if blocklist else all_blocks
    blocks = sample_blocks(blocks, sample, code)
    kept_endpoints = tuple(endpoints)
    if shard is not None:
        index, count = shard
        blocks = array("I", (b for b in blocks if shard_of(b, count) == index))
        kept_endpoints = tuple(
            e for e in kept_endpoints if shard_of_text(f"{e.method} {e.target}", count) == index
        )
    return CountryUniverse(
        code=code.upper(),
        blocks=blocks,
        block_asns=attribute_blocks(blocks, asn_table),
        endpoints=kept_endpoints,
        methods=frozenset(methods),
        prefix_blocks=len(all_blocks),
    )


def endpoint_asn(address: str, table: AsnTable | None) -> int | None:
    return None if table is None else table.lookup_str(address)


def host_endpoints(
    country: str, hosts: Iterable[str], table: AsnTable | None
) -> Iterator[Endpoint]:
    """'host' -> a TCP endpoint tried on the prober's ports in turn; 'host:port' -> that port."""
    for host in hosts:
        name, port = split_host_port(host)
        yield Endpoint(country, "tcp", Target(name, port=port), endpoint_asn(name, table))


def split_host_port(text: str) -> tuple[str, int | None]:
    """'a.kz' -> ('a.kz', None); 'a.kz:443' -> ('a.kz', 443); '[::1]:80' -> ('::1', 80)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, None


def url_endpoint(country: str, url: str, table: AsnTable | None) -> Endpoint:
    host = url.split("://", 1)[-1].split("/", 1)[0]
    name, _ = split_host_port(host.rsplit("@", 1)[-1])
    return Endpoint(country, "http", Target(name, url=url), endpoint_asn(name, table))


def resolver_endpoint(
    country: str, server: str, query: DnsQuery, port: int | None, table: AsnTable | None
) -> Endpoint:
    return Endpoint(
        country, "dns", Target(server, port=port, query=query), endpoint_asn(server, table)
    )


def load_universe(config: Config, countries: Iterable[str] | None = None) -> Universe:
    """The universe a config describes (all its countries, or only `countries`).

    Raises InputError if a prefix or ASN file cannot be used.
    """
    from monitor.asn import load_asn_table  # here: only a daemon start needs the big table

    wanted = {c.upper() for c in countries} if countries is not None else None
    table = None
    if config.asn_file is not None:
        table = load_asn_table(config.asn_file, config.asn_format)  # type: ignore[arg-type]
    blocklist = config.pacing.blocklist()
    built = []
    for country in config.countries:
        if wanted is not None and country.code not in wanted:
            continue
        if country.no_prefixes:
            networks: list[ipaddress.IPv4Network] = []
        elif country.prefixes is not None:
            networks = load_prefix_file(country.prefixes)
        else:
            networks = load_packaged_prefixes(country.code)
        endpoint_list = [
            *host_endpoints(country.code, country.endpoints.hosts, table),
            *(url_endpoint(country.code, url, table) for url in country.endpoints.urls),
            *(
                resolver_endpoint(country.code, r.server, r.query(), r.port, table)
                for r in country.endpoints.resolvers
            ),
        ]
        built.append(
            build_country(
                country.code,
                networks,
                sample=country.sample_blocks,
                shard=config.shard,
                blocklist=blocklist,
                asn_table=table,
                endpoints=endpoint_list,
                methods=country.methods,
            )
        )
    control = config.control
    control_endpoints = [
        Endpoint(VANTAGE_COUNTRY, control.method, Target(*split_host_port(h)))
        if control.method == "tcp"
        else Endpoint(VANTAGE_COUNTRY, "icmp", Target(split_host_port(h)[0]))
        for h in control.hosts
    ]
    control_endpoints += [url_endpoint(VANTAGE_COUNTRY, u, None) for u in control.urls]
    return Universe(tuple(built), tuple(control_endpoints), control.min_up_fraction)
