"""Target universes: ASN files, /24 blocks, sampling, sharding, hitlists, discovery."""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.asn import AsnFormat, AsnRange, AsnTable, load_asn_table, parse_asn_lines
from monitor.cli import cli
from monitor.errors import InputError
from monitor.hitlist import Hitlist, HitlistAppender, discover
from monitor.targets import (
    blocks_of,
    build_country,
    candidate_octets,
    load_packaged_prefixes,
    packaged_countries,
    parse_block,
    sample_blocks,
    shard_of,
    split_host_port,
    without_blocklisted,
)
from probes.icmp import IcmpProber
from probes.pacing import Blocklist, Pacer, PacingPolicy
from tests.netns import Netns, needs_root, run_in_netns

FIXTURES = Path(__file__).parent.parent / "fixtures"
KZ_ASNS = Path("/work/shared/data/asn/kz_major_asns_ipv4.csv")


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


# ---------------------------------------------------------------- ASN files


@pytest.mark.parametrize("name", ["asn_kz_major.prefix2as", "asn_kz_major.ip2asn.tsv"])
def test_both_formats_attribute_the_major_kazakh_networks(name: str) -> None:
    table = load_asn_table(FIXTURES / name)
    assert table.skipped == 0
    assert table.lookup(ip("2.132.0.1")) == 9198  # Kazakhtelecom, 2.132.0.0/14
    assert table.lookup_str("5.76.255.254") == 9198
    assert table.lookup(ip("2.72.0.1")) == 29355  # Kcell
    assert table.lookup(ip("8.8.8.8")) is None  # noqa: network (a table lookup, no packet)
    assert table.lookup_str("not an address") is None


def test_formats_agree_on_every_fixture_prefix() -> None:
    by_prefix2as = load_asn_table(FIXTURES / "asn_kz_major.prefix2as")
    by_ip2asn = load_asn_table(FIXTURES / "asn_kz_major.ip2asn.tsv")
    with (FIXTURES / "asn_kz_major.prefix2as").open() as handle:
        for line in handle:
            address = line.split("\t", 1)[0]
            assert by_prefix2as.lookup(ip(address)) == by_ip2asn.lookup(ip(address))


def test_moas_and_as_sets_take_the_first_origin() -> None:
    table = parse_asn_lines(
        ["10.0.0.0\t16\t64500_64501\n", "10.1.0.0\t16\t64502,64503\n", "10.2.0.0\t16\t0\n"], "t"
    )
    assert table.lookup(ip("10.0.1.1")) == 64500
    assert table.lookup(ip("10.1.1.1")) == 64502
    assert table.lookup(ip("10.2.1.1")) is None  # AS 0: not routed


def test_most_specific_prefix_wins() -> None:
    table = parse_asn_lines(
        ["10.0.0.0\t8\t1\n", "10.80.0.0\t16\t2\n", "10.80.3.0\t24\t3\n", "10.80.3.128\t25\t4\n"],
        "t",
    )
    assert [table.lookup(ip(a)) for a in ("10.1.0.1", "10.80.0.1", "10.80.3.1", "10.80.3.200",
                                          "10.80.4.1", "10.255.255.255")] == [1, 2, 3, 4, 2, 1]


def test_ip2asn_not_routed_and_malformed_lines_are_skipped_and_counted() -> None:
    lines = [
        "1.0.0.0\t1.0.0.255\t13335\tUS\tCLOUDFLARENET\n",
        "1.0.1.0\t1.0.3.255\t0\tNone\tNot routed\n",
        "1.0.4.0\t1.0.4.255\tAS-what\tAU\tbad asn\n",
        "1.0.5.255\t1.0.5.0\t64500\tAU\tend before start\n",
        "1.0.6.0\n",
    ]
    table = parse_asn_lines(lines, "ip2asn-v4.tsv")
    assert table.skipped == 3
    assert table.lookup(ip("1.0.0.9")) == 13335
    assert table.lookup(ip("1.0.2.9")) is None


def test_unusable_asn_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "asn.tsv"
    path.write_text("garbage\tgarbage\tgarbage\n")
    with pytest.raises(InputError, match=r"asn\.tsv: no valid line; expected ip2asn-v4\.tsv"):
        load_asn_table(path)
    with pytest.raises(InputError, match="cannot read ASN file"):
        load_asn_table(tmp_path / "missing.tsv")


prefixes = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32), st.integers(1, 2**32 - 1)),
    min_size=1, max_size=30,
)


def _brute_force(entries: list[tuple[ipaddress.IPv4Network, int]], address: int) -> int | None:
    best: tuple[int, int] | None = None
    for net, asn in entries:
        if int(net.network_address) <= address <= int(net.broadcast_address) and (
            best is None or net.prefixlen > best[0]
        ):
            best = (net.prefixlen, asn)
    return None if best is None else best[1]


@settings(max_examples=150, deadline=None)
@given(prefixes, st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_parsers_match_longest_prefix_match(
    raw: list[tuple[int, int, int]], probes: list[int]
) -> None:
    entries: dict[ipaddress.IPv4Network, int] = {}
    for value, length, asn in raw:
        entries[ipaddress.IPv4Network((value, length), strict=False)] = asn
    listed = list(entries.items())
    prefix2as = [f"{n.network_address}\t{n.prefixlen}\t{a}\n" for n, a in listed]
    ip2asn = [f"{n.network_address}\t{n.broadcast_address}\t{a}\tZZ\tx\n" for n, a in listed]
    tables = [parse_asn_lines(prefix2as, "p"), parse_asn_lines(ip2asn, "i")]
    edges = [int(n.network_address) for n, _ in listed] + [int(n.broadcast_address) for n, _ in
                                                           listed]
    for address in [*probes, *edges, *(e + 1 for e in edges if e < 2**32 - 1)]:
        expected = _brute_force(listed, address)
        for table in tables:
            assert table.skipped == 0
            assert table.lookup(address) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=60), max_size=20))
def test_parsers_never_crash_on_garbage(lines: list[str]) -> None:
    formats: tuple[AsnFormat | None, ...] = ("ip2asn", "prefix2as", None)
    for fmt in formats:
        table = parse_asn_lines(lines, "garbage", fmt)
        assert table.skipped <= len(lines)
        assert len(table.starts) == len(table.ends) == len(table.asns)


def test_flattened_ranges_are_disjoint_and_sorted() -> None:
    table = AsnTable.from_ranges(
        [AsnRange(0, 100, 1), AsnRange(10, 20, 2), AsnRange(15, 30, 3), AsnRange(50, 50, 4)]
    )
    pieces = list(zip(table.starts, table.ends, strict=True))
    assert all(start <= end for start, end in pieces)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(pieces))
    assert [table.lookup(x) for x in (5, 12, 17, 25, 31, 50, 51, 100, 101)] == [
        1, 2, 3, 3, 1, 4, 1, 1, None]


# ---------------------------------------------------------------- blocks, samples, shards


def test_prefixes_become_unique_sorted_blocks() -> None:
    nets = [ipaddress.IPv4Network(n) for n in ("10.80.0.0/22", "10.80.3.128/25", "10.81.0.0/24")]
    blocks = blocks_of(nets)
    assert list(blocks) == [parse_block(b) for b in ("10.80.0.0/24", "10.80.1.0/24",
                                                     "10.80.2.0/24", "10.80.3.0/24",
                                                     "10.81.0.0/24")]


def test_packaged_prefixes_cover_the_real_kazakh_space() -> None:
    assert {"KZ", "IR", "US", "DE"} <= packaged_countries()
    kz = load_packaged_prefixes("kz")
    assert ipaddress.IPv4Network("2.132.0.0/14") in kz
    assert 12000 < len(blocks_of(kz)) < 14000


def test_blocks_wholly_inside_the_blocklist_are_dropped() -> None:
    blocks = blocks_of([ipaddress.IPv4Network("10.80.0.0/22")])
    blocklist = Blocklist.from_cidrs(["10.80.1.0/24", "10.80.2.0/25", "10.80.2.128/25",
                                      "10.80.3.0/25"])
    kept = without_blocklisted(blocks, blocklist)
    # 10.80.2.0/24 is covered by two halves; 10.80.3.0/24 only half, so it stays.
    assert [b for b in kept] == [parse_block("10.80.0.0"), parse_block("10.80.3.0")]


def test_sample_is_stable_sorted_and_robust_to_small_changes() -> None:
    blocks = blocks_of(load_packaged_prefixes("KZ"))
    first = sample_blocks(blocks, 500, "KZ")
    assert list(first) == list(sample_blocks(blocks, 500, "KZ"))
    assert list(first) == sorted(first) and len(set(first)) == 500
    assert set(first) <= set(blocks)
    assert set(first) != set(sample_blocks(blocks, 500, "IR"))
    # Losing 1% of the address space keeps almost the whole sample.
    smaller = blocks[: len(blocks) * 99 // 100]
    assert len(set(first) & set(sample_blocks(smaller, 500, "KZ"))) >= 490
    assert list(sample_blocks(blocks, None, "KZ")) == list(blocks)


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 2**24 - 1), max_size=300), st.integers(1, 9))
def test_shards_never_overlap_and_cover_everything(blocks: set[int], count: int) -> None:
    shards: list[set[int]] = [set() for _ in range(count)]
    for block in blocks:
        shard = shard_of(block, count)
        assert 0 <= shard < count
        assert shard_of(block, count) == shard  # stable
        shards[shard].add(block)
    assert set().union(*shards) == blocks
    assert sum(len(s) for s in shards) == len(blocks)


def test_sharded_universes_partition_the_country() -> None:
    nets = load_packaged_prefixes("KZ")
    whole = set(build_country("KZ", nets, sample=3000).blocks)
    parts = [set(build_country("KZ", nets, sample=3000, shard=(i, 4)).blocks) for i in range(4)]
    assert set().union(*parts) == whole
    assert sum(len(p) for p in parts) == len(whole)
    assert all(len(p) > 500 for p in parts)  # a fair split


def test_candidates_common_first_then_distinct_host_octets() -> None:
    block = parse_block("10.80.3.0")
    octets = candidate_octets(block, 254)
    assert octets[:3] == [1, 254, 2]
    assert len(set(octets)) == 254 and 0 not in octets and 255 not in octets
    assert candidate_octets(block, 30) == octets[:30]
    assert candidate_octets(parse_block("10.80.4.0"), 30)[12:] != octets[12:30]


def test_split_host_port() -> None:
    assert split_host_port("a.kz") == ("a.kz", None)
    assert split_host_port("a.kz:443") == ("a.kz", 443)
    assert split_host_port("[2001:db8::1]:53") == ("2001:db8::1", 53)
    assert split_host_port("2001:db8::1") == ("2001:db8::1", None)


# ---------------------------------------------------------------- hitlist files


def test_hitlist_round_trip_keeps_order_and_counts(tmp_path: Path) -> None:
    hitlist = Hitlist()
    block = parse_block("10.80.1.0")
    hitlist.record(block, 1, answered=True)
    hitlist.record(block, 254, answered=True)
    hitlist.record(block, 2, answered=False)
    hitlist.record(block, 1, answered=False)
    hitlist.promote(block, 254)
    silent = parse_block("10.80.7.0")
    hitlist.record(silent, 1, answered=False)
    path = hitlist.save(tmp_path / "KZ.csv")
    assert path.read_text().splitlines() == [
        "block,address,answered,probed",
        "10.80.1.0/24,10.80.1.254,1,1",
        "10.80.1.0/24,10.80.1.1,1,2",
        "10.80.1.0/24,10.80.1.2,0,1",
        "10.80.7.0/24,10.80.7.1,0,1",
    ]
    loaded = Hitlist.load(path)
    assert loaded.responsive(block) == [254, 1]
    assert loaded.stats(block, 1) == (1, 2)
    assert not loaded.is_known(silent) and loaded.tried(silent) == 1
    assert not loaded.dirty


def test_hitlist_skips_malformed_rows_and_last_row_wins(tmp_path: Path) -> None:
    path = tmp_path / "KZ.csv"
    path.write_text(
        "block,address,answered,probed\n"
        "10.80.1.0/24,10.80.1.1,3,3\n"
        "10.80.1.0/24,10.80.2.1,1,1\n"  # not in its block
        "10.80.1.0/24,10.80.1.2,5,2\n"  # answered > probed
        "10.80.1.0/24,banana,1,1\n"
        "10.80.1.0/24,10.80.1.3\n"
        "10.80.1.0/24,10.80.1.1,3,9\n"  # appended later: wins, still responsive
        "10.80.5.0/24,10.80.5.1,1,1\n"
        "10.80.5.0/24,10.80.5.1,0,2\n"  # ... and here it is no longer
    )
    hitlist = Hitlist.load(path)
    assert hitlist.skipped == 4
    assert hitlist.stats(parse_block("10.80.1.0"), 1) == (3, 9)
    assert hitlist.known_blocks() == 1


def test_hitlist_with_a_wrong_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "KZ.csv"
    path.write_text("ip,ok\n10.80.1.1,1\n")
    with pytest.raises(InputError, match=r"KZ.csv:1: expected the header"):
        Hitlist.load(path)
    assert Hitlist.load(tmp_path / "absent.csv").known_blocks() == 0


def test_discovery_candidates_respect_the_budget() -> None:
    hitlist = Hitlist()
    block = parse_block("10.80.9.0")
    assert hitlist.next_candidates(block, 2, 5) == [1, 254]
    assert hitlist.next_candidates(block, 2, 5) == [2, 129]
    assert hitlist.next_candidates(block, 2, 5) == [10]
    assert hitlist.next_candidates(block, 2, 5) == []


# ---------------------------------------------------------------- discovery, for real


@pytest.fixture
def answering_ns() -> Iterator[Netns]:
    with Netns("smd") as ns:
        ns.exec("ip", "route", "add", "local", "10.80.0.0/22", "dev", "lo")
        # 10.80.4.0/24 is routed but silent: its probes go out and time out.
        ns.exec("ip", "route", "add", "local", "10.80.4.0/24", "dev", "lo")
        ns.exec("nft", "add table inet lab")
        ns.exec("nft", "add chain inet lab in { type filter hook input priority 0 ; }")
        ns.exec("nft", "add rule inet lab in ip daddr 10.80.4.0/24 drop")
        yield ns


def _lab_pacer() -> Pacer:
    everything_else = ipaddress.IPv4Network("0.0.0.0/0").address_exclude(
        ipaddress.IPv4Network("10.80.0.0/21"))
    return Pacer(PacingPolicy(rate_pps=5000, per_block_pps=None), Blocklist(everything_else))


class Interrupted(Exception):
    pass


@needs_root
def test_discovery_is_resumable(answering_ns: Netns, tmp_path: Path) -> None:
    blocks = list(blocks_of([ipaddress.IPv4Network("10.80.0.0/22"),
                             ipaddress.IPv4Network("10.80.4.0/24")]))
    path = tmp_path / "KZ.csv"

    async def run(stop_after: int | None) -> int:
        hitlist = Hitlist.load(path)
        prober = IcmpProber(timeout_s=0.3)
        appender = HitlistAppender(hitlist, path)
        done: list[int] = []

        def on_done(block: int) -> None:
            if stop_after is not None and len(done) == stop_after:
                raise Interrupted
            appender(block)
            done.append(block)

        try:
            await discover(blocks, hitlist, prober, _lab_pacer(), budget=4, per_wave=2, want=1,
                           on_block_done=on_done)
        except Interrupted:
            pass
        finally:
            appender.close()
            await prober.close()
        return prober.stats.sent

    first_sent = run_in_netns(answering_ns, lambda: run(stop_after=2))
    assert first_sent == 2 * 5  # .1 and .254 of every block: 4 answered, 10.80.4.0 did not
    assert Hitlist.load(path).known_blocks() == 2  # interrupted after two blocks were written
    second_sent = run_in_netns(answering_ns, lambda: run(stop_after=None))
    # Resumed: the two written blocks are skipped; two more .1/.254 pairs, and the silent block
    # is tried until its budget of 4 is spent (2 + 2).
    assert second_sent == 2 * 2 + 4
    final = Hitlist.load(path)
    assert final.known_blocks() == 4
    assert final.responsive(parse_block("10.80.2.0")) == [1, 254]
    assert final.tried(parse_block("10.80.4.0")) == 4 and not final.is_known(
        parse_block("10.80.4.0"))
    rows = list(csv.reader(io.StringIO(path.read_text())))
    assert rows[0] == ["block", "address", "answered", "probed"]


# ---------------------------------------------------------------- the commands


def _lab_config(tmp_path: Path) -> Path:
    (tmp_path / "kz.txt").write_text("10.80.0.0/22\n10.80.4.0/24\n")
    (tmp_path / "blocklist.txt").write_text("10.80.5.0/24\n")
    asn = (FIXTURES / "asn_lab.ip2asn.tsv").read_text()
    (tmp_path / "asn.tsv").write_text(asn)
    config = tmp_path / "lab.yaml"
    config.write_text(
        "countries:\n  KZ: {prefixes: kz.txt}\n"
        "asn_file: asn.tsv\n"
        "hitlist_dir: hitlists\n"
        "pacing: {blocklist_file: blocklist.txt, rate_pps: 2000, per_block_pps: null}\n"
        "probing: {timeout_s: 0.3, discovery_budget: 4}\n"
    )
    return config


def test_targets_list_shows_blocks_networks_and_hitlist(tmp_path: Path) -> None:
    config = _lab_config(tmp_path)
    hitlist = Hitlist()
    hitlist.record(parse_block("10.80.0.0"), 1, answered=True)
    hitlist.record(parse_block("10.80.4.0"), 1, answered=False)
    hitlist.save(tmp_path / "hitlists" / "KZ.csv")
    result = CliRunner().invoke(
        cli, ["targets", "list", "--country", "kz", "--config", str(config), "--blocks"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("KZ: 5 /24 blocks in its address space, 5 in the universe; "
                               "1 known responsive")
    assert "AS9198               2       1" in lines
    assert "AS29355              2       0" in lines
    assert "unattributed         1       0" in lines
    assert "10.80.0.0/24\tAS9198\tresponsive 10.80.0.1" in lines
    assert "10.80.4.0/24\t-\tsilent (tried 1)" in lines
    assert "10.80.3.0/24\tAS29355\tuntried" in lines


def test_targets_list_of_an_unconfigured_country_fails_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["targets", "list", "--country", "IR", "--config", str(_lab_config(tmp_path))]
    )
    assert result.exit_code != 0
    assert "countries: no country 'IR' (configured: KZ)" in result.output


@needs_root
def test_targets_discover_command_writes_the_hitlist_the_daemon_reads(
    answering_ns: Netns, tmp_path: Path
) -> None:
    config = _lab_config(tmp_path)

    async def invoke() -> tuple[int, str]:
        # A thread started from inside the namespace is inside it too.
        result = await asyncio.to_thread(
            CliRunner().invoke, cli,
            ["targets", "discover", "--country", "KZ", "--config", str(config)],
        )
        return result.exit_code, result.output

    code, output = run_in_netns(answering_ns, invoke)
    assert code == 0, output
    assert "KZ: 4 of 5 blocks responsive" in output
    hitlist = Hitlist.load(tmp_path / "hitlists" / "KZ.csv")
    assert hitlist.known_blocks() == 4
    again_code, again = run_in_netns(answering_ns, invoke)
    assert again_code == 0 and "0 to discover" in again
