"""The lab's world: real prefixes sampled and renumbered into lab space, input files."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from monitor.asn import load_asn_table
from monitor.errors import InputError
from monitor.lab.world import (
    LAB_COUNTRY_SPACE,
    build_world,
    load_asn_prefixes,
    stable_sample,
    write_inputs,
)
from monitor.targets import blocks_of, load_prefix_file

# The project's reference data beside the repository: the package ships a snapshot of it.
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"LOUD SKIP: no {DATA_DIR}")


@needs_data
def test_packaged_data_builds_the_same_world_as_the_reference_data() -> None:
    assert build_world() == build_world(data_dir=DATA_DIR)


@needs_data
def test_kz_networks_are_real_blocks_of_their_asn_renumbered_into_10_8() -> None:
    world = build_world()
    kz = world.country("KZ")
    asn_prefixes = load_asn_prefixes(DATA_DIR / "asn" / "kz_major_asns_ipv4.csv")
    assert sorted(n.asn for n in kz.networks if n.asn) == [9198, 21299, 29355, 35104, 48503]
    for net in kz.networks:
        assert net.lab_net.subnet_of(kz.lab_net) and kz.lab_net.subnet_of(LAB_COUNTRY_SPACE)
        assert len(set(net.real_blocks)) == len(net.real_blocks) >= 4
        if net.asn is not None:
            own = set(blocks_of(asn_prefixes[net.asn]))
            assert set(net.real_blocks) <= own, net.name
        for block in net.blocks:
            assert ipaddress.IPv4Address(block << 8) in net.lab_net
    kz_real = set(blocks_of(load_prefix_file(DATA_DIR / "country-prefixes" / "kz.ipv4.txt")))
    other = kz.network(None)
    assert set(other.real_blocks) <= kz_real
    listed = {b for n in kz.networks if n.asn for b in n.real_blocks}
    assert not set(other.real_blocks) & listed
    # Countries never share lab space.
    nets = [c.lab_net for c in world.countries]
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])


def test_world_is_the_same_every_time_and_scales() -> None:
    assert build_world() == build_world()
    small = build_world(scale=0.2)
    assert small.block_count() < build_world().block_count()
    assert stable_sample(range(1000), 10, "x") == stable_sample(reversed(range(1000)), 10, "x")


def test_inputs_give_the_daemon_lab_prefixes_and_asns(tmp_path: Path) -> None:
    world = build_world(scale=0.2)
    paths = write_inputs(world, tmp_path)
    kz = world.country("KZ")
    blocks = set(blocks_of(load_prefix_file(paths["KZ"])))
    assert blocks == set(kz.blocks())
    table = load_asn_table(paths["asn"], "prefix2as")
    for net in kz.networks:
        assert table.lookup((net.blocks[0] << 8) | 1) == net.asn
    mapping = paths["mapping"].read_text().splitlines()
    assert mapping[0] == "country,asn,network,lab_block,real_block"
    assert len(mapping) == 1 + world.block_count()


def test_bad_asn_list_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "asns.csv"
    bad.write_text("asn,handle,description,prefix\n9198,X,\"x\",2.132.0.0/14\nAS1,Y,\"y\",nope\n")
    with pytest.raises(InputError, match=r"asns.csv:3: expected an ASN number"):
        load_asn_prefixes(bad)
    headless = tmp_path / "headless.csv"
    headless.write_text("9198,2.132.0.0/14\n")
    with pytest.raises(InputError, match=r"headless.csv:1: expected a header"):
        load_asn_prefixes(headless)
    with pytest.raises(InputError, match="cannot read"):
        load_asn_prefixes(tmp_path / "missing.csv")


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"kz.ipv4.txt"):
        build_world(data_dir=tmp_path)


def test_without_root_the_lab_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from monitor.lab import topology

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(topology.LabError, match="needs root"):
        topology.require_root()
