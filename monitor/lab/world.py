"""The lab's world: real countries and networks, sampled and mapped into lab address space.

Real /24 blocks of a country (from the delegated-prefix data) and of its big networks (from an
ASN prefix list) are sampled with a stable hash and renumbered into 10.0.0.0/8, one /12 per
country and one /16 per network:

    country i, network k, block j  ->  10.(16*i + k).j.0/24      (k = 15: unattributed blocks)

198.18.0.0/15 carries the uplink (198.18.0.0/30) and the control targets "abroad"
(198.19.0.0/24). None of these addresses exists outside the lab's namespaces. The mapping keeps
every lab block's real origin, so results can be read back in real terms.
"""

from __future__ import annotations

import csv
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from monitor.errors import InputError
from monitor.targets import blocks_of, load_packaged_prefixes, load_prefix_file, packaged_data

LAB_COUNTRY_SPACE: Final = ipaddress.IPv4Network("10.0.0.0/8")
LAB_ABROAD_SPACE: Final = ipaddress.IPv4Network("198.18.0.0/15")
LAB_SPACES: Final = (LAB_COUNTRY_SPACE, LAB_ABROAD_SPACE)
UPLINK_VANTAGE: Final = "198.18.0.1"
UPLINK_WORLD: Final = "198.18.0.2"
UPLINK_PREFIX_LEN: Final = 30
CONTROL_NET: Final = ipaddress.IPv4Network("198.19.0.0/24")
CONTROL_HOSTS: Final = ("198.19.0.1", "198.19.0.2", "198.19.0.3", "198.19.0.4")
UNATTRIBUTED_SLOT: Final = 15  # network slot of a country's blocks outside its listed ASNs
MAX_COUNTRIES: Final = 16
MAX_BLOCKS_PER_NETWORK: Final = 256
HTTP_OCTET: Final = 80  # the web server of a network's first block: http://10.x.0.80/
DNS_OCTET: Final = 53  # its resolver: 10.x.0.53
DNS_NAME: Final = "www.lab.test."
DNS_ANSWER: Final = "198.19.1.80"  # what an honest resolver answers for DNS_NAME
DNS_TAMPERED_ANSWER: Final = "198.19.2.1"  # what a tampering one answers

# The KZ networks' prefixes ship in the package (CC0, monitor/data/asn/README.md).
PACKAGED_ASN_FILE: Final = "asn/kz_major_asns_ipv4.csv"


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """A network to simulate: its ASN (None: the country's other blocks) and sample size."""

    asn: int | None
    name: str
    blocks: int
    kind: str = "end-user"  # "end-user" | "mobile" | "data-centre": scenarios select on it


@dataclass(frozen=True, slots=True)
class CountrySpec:
    code: str
    utc_offset_h: float  # local time drives the diurnal churn
    networks: tuple[NetworkSpec, ...]
    control: bool = False  # a control country: no scenario touches it


@dataclass(frozen=True, slots=True)
class LabNetwork:
    country: str
    asn: int | None
    name: str
    kind: str
    slot: int
    real_blocks: tuple[int, ...]  # the real /24s (block ints), in lab order
    lab_net: ipaddress.IPv4Network  # the /16 it is renumbered into

    @property
    def blocks(self) -> list[int]:
        base = int(self.lab_net.network_address) >> 8
        return [base + j for j in range(len(self.real_blocks))]

    def block_prefixes(self) -> list[str]:
        return [f"{ipaddress.IPv4Address(b << 8)}/24" for b in self.blocks]

    @property
    def first_block(self) -> int:
        return int(self.lab_net.network_address) >> 8

    def address(self, octet: int) -> str:
        return str(ipaddress.IPv4Address((self.first_block << 8) | octet))

    @property
    def label(self) -> str:
        return f"AS{self.asn}" if self.asn is not None else f"{self.country}-other"


@dataclass(frozen=True, slots=True)
class LabCountry:
    code: str
    index: int
    utc_offset_h: float
    control: bool
    networks: tuple[LabNetwork, ...]

    @property
    def lab_net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{16 * self.index}.0.0/12")

    def blocks(self) -> list[int]:
        return [b for n in self.networks for b in n.blocks]

    def network(self, asn: int | None) -> LabNetwork:
        for net in self.networks:
            if net.asn == asn:
                return net
        raise KeyError(f"{self.code} has no lab network AS{asn}")


@dataclass(frozen=True)
class World:
    countries: tuple[LabCountry, ...]
    control_hosts: tuple[str, ...] = CONTROL_HOSTS
    meta: dict[str, str] = field(default_factory=dict)

    def country(self, code: str) -> LabCountry:
        for country in self.countries:
            if country.code == code.upper():
                return country
        known = ", ".join(c.code for c in self.countries)
        raise KeyError(f"no lab country {code!r} (the lab has {known})")

    def networks(self) -> list[LabNetwork]:
        return [n for c in self.countries for n in c.networks]

    def local_nets(self) -> list[ipaddress.IPv4Network]:
        """What the world namespace answers for (AnyIP): every country's /12 and the control."""
        return [c.lab_net for c in self.countries] + [CONTROL_NET]

    def block_count(self) -> int:
        return sum(len(n.real_blocks) for n in self.networks())


# KZ's five big networks (asn/kz_major_asns_ipv4.csv), sampled roughly in proportion to size,
# plus its other networks (hosting, data centres); three neighbours and one far country as
# controls, with no networks listed (their blocks are country-level only).
DEFAULT_SPECS: Final = (
    CountrySpec("KZ", 6.0, (
        NetworkSpec(9198, "Kazakhtelecom", 100, "end-user"),
        NetworkSpec(21299, "Beeline (Kar-Tel)", 30, "mobile"),
        NetworkSpec(29355, "Kcell", 30, "mobile"),
        NetworkSpec(48503, "Tele2 (Mobile Telecom-Service)", 25, "mobile"),
        NetworkSpec(35104, "Jusan Mobile", 15, "mobile"),
        NetworkSpec(None, "other networks (hosting, data centres)", 40, "data-centre"),
    )),
    CountrySpec("KG", 6.0, (NetworkSpec(None, "all networks", 40),), control=True),
    CountrySpec("UZ", 5.0, (NetworkSpec(None, "all networks", 40),), control=True),
    CountrySpec("NL", 1.0, (NetworkSpec(None, "all networks", 40),), control=True),
)


def _rank(block: int, salt: str) -> int:
    digest = hashlib.blake2b(block.to_bytes(4, "big"), digest_size=8, key=salt.encode()[:64])
    return int.from_bytes(digest.digest(), "big")


def stable_sample(blocks: Iterable[int], count: int, salt: str) -> list[int]:
    """`count` blocks picked by a keyed hash: the same every run, sorted."""
    return sorted(sorted(set(blocks), key=lambda b: _rank(b, salt))[:count])


def load_asn_prefixes(path: Path) -> dict[int, list[ipaddress.IPv4Network]]:
    """asn,handle,description,prefix CSV -> ASN -> prefixes. Errors name file:line."""
    result: dict[int, list[ipaddress.IPv4Network]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"asn", "prefix"} <= set(reader.fieldnames):
                raise InputError(f"{path}:1: expected a header with columns asn and prefix")
            for line, row in enumerate(reader, start=2):
                try:
                    asn = int(row["asn"])
                    net = ipaddress.IPv4Network(row["prefix"].strip(), strict=False)
                except (ValueError, TypeError, AttributeError):
                    raise InputError(
                        f"{path}:{line}: expected an ASN number and an IPv4 prefix, got "
                        f"{row.get('asn')!r}, {row.get('prefix')!r}"
                    ) from None
                result.setdefault(asn, []).append(net)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ASN prefix list: {exc.strerror or exc}") from None
    return result


def build_world(
    specs: Sequence[CountrySpec] = DEFAULT_SPECS,
    data_dir: Path | None = None,
    scale: float = 1.0,
) -> World:
    """Sample and renumber the specs' real blocks. `scale` shrinks every sample (tests).

    The real data comes from the package (the country-prefix snapshot and the KZ ASN list);
    `data_dir` points at a folder laid out like ../shared/data instead (`country-prefixes/
    cc.ipv4.txt`, `asn/kz_major_asns_ipv4.csv`) to build the lab from other snapshots.
    """
    if len(specs) > MAX_COUNTRIES:
        raise ValueError(f"the lab holds at most {MAX_COUNTRIES} countries")
    asn_file = (packaged_data(PACKAGED_ASN_FILE) if data_dir is None
                else data_dir / "asn" / "kz_major_asns_ipv4.csv")
    asn_prefixes: dict[int, list[ipaddress.IPv4Network]] | None = None
    countries = []
    for index, spec in enumerate(specs):
        if data_dir is None:
            prefixes = load_packaged_prefixes(spec.code)
            source = "the packaged country prefixes"
        else:
            prefixes = load_prefix_file(
                data_dir / "country-prefixes" / f"{spec.code.lower()}.ipv4.txt")
            source = f"{data_dir}/country-prefixes"
        country_blocks = set(blocks_of(prefixes))
        if not country_blocks:
            raise InputError(f"{spec.code}: no IPv4 prefixes in {source}")
        listed: set[int] = set()
        networks = []
        for slot, net_spec in enumerate(spec.networks):
            if net_spec.asn is None:
                continue
            if asn_prefixes is None:
                asn_prefixes = load_asn_prefixes(asn_file)
            if net_spec.asn not in asn_prefixes:
                raise InputError(f"{asn_file}: no prefixes for AS{net_spec.asn}")
            own = set(blocks_of(asn_prefixes[net_spec.asn])) - listed
            listed |= own
            networks.append((slot, net_spec, own))
        for net_spec in spec.networks:
            if net_spec.asn is None:
                networks.append((UNATTRIBUTED_SLOT, net_spec, country_blocks - listed))
        lab_networks = []
        for slot, net_spec, pool in sorted(networks, key=lambda item: item[0]):
            count = max(4, min(MAX_BLOCKS_PER_NETWORK, round(net_spec.blocks * scale)))
            sample = stable_sample(pool, count, f"lab:{spec.code}:{net_spec.asn}")
            if len(sample) < 4:
                raise InputError(f"{spec.code} {net_spec.name}: fewer than 4 real blocks")
            lab_networks.append(LabNetwork(
                country=spec.code, asn=net_spec.asn, name=net_spec.name, kind=net_spec.kind,
                slot=slot, real_blocks=tuple(sample),
                lab_net=ipaddress.IPv4Network(f"10.{16 * index + slot}.0.0/16"),
            ))
        countries.append(LabCountry(spec.code, index, spec.utc_offset_h, spec.control,
                                    tuple(lab_networks)))
    return World(tuple(countries))


def write_inputs(world: World, directory: Path) -> dict[str, Path]:
    """The daemon's input files: one prefix file per country, a prefix2as ASN table, and the
    mapping lab block -> real block (for people reading the results)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for country in world.countries:
        path = directory / f"{country.code}.prefixes.txt"
        lines = [f"# lab blocks of {country.code} (see mapping.csv for the real ones)"]
        lines += [p for n in country.networks for p in n.block_prefixes()]
        path.write_text("\n".join(lines) + "\n", encoding="ascii")
        paths[country.code] = path
    asn_path = directory / "asn.prefix2as"
    rows = [f"{n.lab_net.network_address}\t16\t{n.asn}" for n in world.networks()
            if n.asn is not None]
    asn_path.write_text("\n".join(rows) + "\n", encoding="ascii")
    paths["asn"] = asn_path
    mapping = directory / "mapping.csv"
    with mapping.open("w", newline="", encoding="ascii") as handle:
        writer = csv.writer(handle)
        writer.writerow(["country", "asn", "network", "lab_block", "real_block"])
        for net in world.networks():
            for lab, real in zip(net.blocks, net.real_blocks, strict=True):
                writer.writerow([net.country, net.asn or "", net.name,
                                 f"{ipaddress.IPv4Address(lab << 8)}/24",
                                 f"{ipaddress.IPv4Address(real << 8)}/24"])
    paths["mapping"] = mapping
    return paths
