"""Config validation: every bad input gives the exact `file: key: expected ...` message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from monitor.cli import cli
from monitor.config import Config, load_config, parse_config
from monitor.errors import ConfigError
from monitor.targets import load_universe, packaged_data

REPO = Path(__file__).resolve().parents[2]

SCENARIOS: list[tuple[str, dict[str, Any], str]] = [
    ("sample not a number", {"countries": {"KZ": {"sample_blocks": "ten"}}},
     "config.yaml: countries.KZ.sample_blocks: expected a positive integer, got 'ten'"),
    ("sample zero", {"countries": {"KZ": {"sample_blocks": 0}}},
     "config.yaml: countries.KZ.sample_blocks: expected a positive integer, got 0"),
    ("unknown top-level key", {"intervall_s": 60},
     "config.yaml: intervall_s: unknown key (expected one of: vantage, listen, interval_s, "
     "contact_url, pacing, probing, hitlist_dir, asn_file, asn_format, countries, control, "
     "history, detector, sinks, shard, remote_write)"),
    ("unknown country key", {"countries": {"KZ": {"sample": 5}}},
     "config.yaml: countries.KZ.sample: unknown key (expected one of: prefixes, sample_blocks, "
     "methods, endpoints)"),
    ("bad country code", {"countries": {"KAZ": {}}},
     "config.yaml: countries.KAZ: expected an ISO 3166-1 alpha-2 country code like KZ"),
    ("no packaged prefixes", {"countries": {"XX": {}}},
     "config.yaml: countries.XX.prefixes: no packaged prefixes for XX; expected a prefix file "
     "path, or null for endpoints only"),
    ("prefix file missing", {"countries": {"KZ": {"prefixes": "/nonexistent/kz.txt"}}},
     "config.yaml: countries.KZ.prefixes: file not found: /nonexistent/kz.txt"),
    ("listen without port", {"listen": "127.0.0.1"},
     "config.yaml: listen: expected host:port, e.g. 127.0.0.1:9310 or [::1]:9310, "
     "got '127.0.0.1'"),
    ("interval negative", {"interval_s": -5},
     "config.yaml: interval_s: expected a positive number, got -5"),
    ("interval boolean", {"interval_s": True},
     "config.yaml: interval_s: expected a positive number, got True"),
    ("rate as text", {"pacing": {"rate_pps": "fast"}},
     "config.yaml: pacing.rate_pps: expected a positive number, got 'fast'"),
    ("port out of range", {"probing": {"tcp_ports": [80, 70000]}},
     "config.yaml: probing.tcp_ports[1]: expected a port number from 1 to 65535, got 70000"),
    ("reprobes negative", {"probing": {"reprobes": -1}},
     "config.yaml: probing.reprobes: expected an integer >= 0, got -1"),
    ("method unknown", {"countries": {"KZ": {"methods": ["icmp", "ping"]}}},
     "config.yaml: countries.KZ.methods[1]: expected one of icmp, tcp, http, dns, got 'ping'"),
    ("endpoint method disabled",
     {"countries": {"KZ": {"methods": ["icmp"], "endpoints": {"urls": ["https://a.kz/"]}}}},
     "config.yaml: countries.KZ.endpoints.urls: endpoints given but method http is not in "
     "countries.KZ.methods"),
    ("url not http", {"countries": {"KZ": {"endpoints": {"urls": ["ftp://a.kz/"]}}}},
     "config.yaml: countries.KZ.endpoints.urls[0]: expected an http:// or https:// URL, "
     "got 'ftp://a.kz/'"),
    ("resolver without name",
     {"countries": {"KZ": {"endpoints": {"resolvers": [{"server": "192.0.2.53"}]}}}},
     "config.yaml: countries.KZ.endpoints.resolvers[0].name: missing required key"),
    ("resolver server not an IP",
     {"countries": {"KZ": {"endpoints": {"resolvers": [{"server": "ns.kz", "name": "a.kz"}]}}}},
     "config.yaml: countries.KZ.endpoints.resolvers[0].server: expected an IP address, "
     "got 'ns.kz'"),
    ("resolver bad rdtype",
     {"countries": {"KZ": {"endpoints": {"resolvers": [
         {"server": "192.0.2.53", "name": "a.kz", "rdtype": "XYZ"}]}}}},
     "config.yaml: countries.KZ.endpoints.resolvers[0].rdtype: expected a record type, one of "
     "A, AAAA, CNAME, MX, NS, TXT, SOA, PTR, SRV, CAA, got 'XYZ'"),
    ("control fraction above 1", {"control": {"min_up_fraction": 1.5}},
     "config.yaml: control.min_up_fraction: expected a number from 0 to 1, got 1.5"),
    ("control host with spaces", {"control": {"hosts": ["not a host"]}},
     "config.yaml: control.hosts[0]: expected a host name or IP address (optionally "
     "host:port), got 'not a host'"),
    ("shard out of range", {"shard": "4/4"},
     "config.yaml: shard: expected 'i/N' with 0 <= i < N, e.g. '0/4', got '4/4'"),
    ("webhook without url", {"sinks": {"webhook": {"timeout_s": 5}}},
     "config.yaml: sinks.webhook.url: missing required key"),
    ("history retention text", {"history": {"retention_days": "a month"}},
     "config.yaml: history.retention_days: expected a positive integer, got 'a month'"),
    ("detector unknown key", {"detector": {"no_such_setting": 1}},
     "config.yaml: detector.no_such_setting: unknown key"),
    ("detector wrong type", {"detector": {"warning": "high"}},
     "config.yaml: detector.warning: expected a number, got 'high'"),
    ("asn format unknown", {"asn_format": "mrt"},
     "config.yaml: asn_format: expected one of ip2asn, prefix2as, got 'mrt'"),
    ("countries a list", {"countries": ["KZ"]},
     "config.yaml: countries: expected a mapping of country codes (KZ: {...}), got a list"),
    ("vantage name with spaces", {"vantage": {"name": "my vantage"}},
     "config.yaml: vantage.name: expected a name of letters, digits, '.', '_' or '-' "
     "(at most 63), got 'my vantage'"),
    ("top level a list", [1, 2],  # type: ignore[list-item]
     "config.yaml: (top level): expected a mapping of keys, got a list"),
]


@pytest.mark.parametrize(
    ("data", "message"), [(d, m) for _, d, m in SCENARIOS], ids=[s[0] for s in SCENARIOS]
)
def test_bad_input_names_file_key_and_expectation(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "config.yaml")
    problems = caught.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(message), problems[0]


def test_all_problems_are_collected_not_only_the_first() -> None:
    data = {
        "listen": 9310,
        "countries": {"KZ": {"sample_blocks": "ten", "bogus": 1}},
        "probing": {"timeout_s": 0},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "lab.yaml")
    assert sorted(caught.value.problems) == sorted([
        "lab.yaml: listen: expected host:port, e.g. 127.0.0.1:9310 or [::1]:9310, got 9310",
        "lab.yaml: countries.KZ.sample_blocks: expected a positive integer, got 'ten'",
        "lab.yaml: countries.KZ.bogus: unknown key (expected one of: prefixes, sample_blocks, "
        "methods, endpoints)",
        "lab.yaml: probing.timeout_s: expected a positive number, got 0",
    ])


def test_blocklist_file_errors_name_the_line(tmp_path: Path) -> None:
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("10.0.0.0/8\nten dot zero\n")
    (tmp_path / "c.yaml").write_text("pacing:\n  blocklist_file: blocklist.txt\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "c.yaml")
    assert caught.value.problems == [
        f"{tmp_path}/c.yaml: pacing.blocklist_file: {blocklist}:2: not a CIDR range: "
        "'ten dot zero' ('ten dot zero' does not appear to be an IPv4 or IPv6 network)"
    ]


def test_prefix_file_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "kz.txt").write_text("# lab\n10.80.0.0/22\n10.80.999.0/24\n")
    (tmp_path / "c.yaml").write_text("countries:\n  KZ: {prefixes: kz.txt}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "c.yaml")
    assert caught.value.problems[0].startswith(
        f"{tmp_path}/c.yaml: countries.KZ.prefixes: {tmp_path}/kz.txt:3: expected an IPv4 "
        "prefix like 2.132.0.0/14, got '10.80.999.0/24'"
    )


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("countries:\n  KZ: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[0].startswith(f"{path}:3: not valid YAML: ")


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "kz.txt").write_text("10.80.0.0/22\n")
    (tmp_path / "block.txt").write_text("198.18.0.0/15\n")
    (tmp_path / "c.yaml").write_text(
        "countries:\n"
        "  kz: {prefixes: kz.txt, endpoints: {hosts: ['10.80.0.9:22', '10.80.0.10'],\n"
        "       resolvers: [{server: 10.80.0.53, name: gov.kz, rdtype: a,\n"
        "                    expected: [10.80.0.80]}]}}\n"
        "pacing: {blocklist_file: block.txt, rate_pps: null}\n"
        "hitlist_dir: hl\n"
        "shard: 1/3\n"
    )
    config = load_config(tmp_path / "c.yaml")
    assert config.listen == "127.0.0.1:9310"
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 9310)
    assert config.interval_s == 300.0
    assert config.hitlist_dir == tmp_path / "hl"
    assert config.hitlist_path("KZ") == tmp_path / "hl" / "KZ.csv"
    assert config.pacing.blocklist_file == tmp_path / "block.txt"
    assert config.pacing.rate_pps is None
    assert config.shard == (1, 3)
    kz = config.country("KZ")
    assert kz.prefixes == tmp_path / "kz.txt"
    assert kz.methods == ("icmp", "tcp", "dns")
    assert kz.endpoints.resolvers[0].rdtype == "A"
    assert kz.endpoints.resolvers[0].query().expected == frozenset({"10.80.0.80"})


def test_ipv6_listen_address() -> None:
    config = parse_config({"listen": "[::1]:9311"}, "c.yaml")
    assert (config.listen_host, config.listen_port) == ("::1", 9311)


def test_shipped_config_is_valid_and_polite() -> None:
    config = load_config(REPO / "config.yaml")
    assert isinstance(config, Config)
    assert config.listen == "127.0.0.1:9310"
    assert "KZ" in {c.code for c in config.countries}
    assert config.pacing.rate_pps is not None and config.pacing.rate_pps <= 1000
    assert config.pacing.blocklist_file == packaged_data("blocklist.txt")
    universe = load_universe(config)
    kz = universe.country("KZ")
    assert kz.prefix_blocks > 12000  # the real Kazakh address space, packaged
    assert len(kz.blocks) == config.country("KZ").sample_blocks
    # The packaged blocklist keeps special-purpose space out of every universe.
    blocklist = config.pacing.blocklist()
    for address in ("10.1.2.3", "127.0.0.1", "192.168.1.1", "224.0.0.1", "198.18.0.1"):
        assert blocklist.contains(address)


def test_config_check_command() -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["config", "check", str(REPO / "config.yaml")])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("OK: ")
    assert "KZ: 2000 of " in ok.output


def test_config_check_command_fails_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("interval_s: soon\ncountries:\n  KZ: {sample_blocks: ten}\n")
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code != 0
    assert f"{path}: interval_s: expected a positive number, got 'soon'" in result.output
    assert f"{path}: countries.KZ.sample_blocks: expected a positive integer, got 'ten'" in (
        result.output
    )
    assert f"{path}: 2 problems" in result.output
