"""The configuration file (config.yaml): load, validate strictly, hand out frozen dataclasses.

Every problem is collected (not only the first) and reported as
`<file>: <key.path>: expected <what>, got <value>`; unknown keys are rejected. Relative paths
are relative to the config file's directory. docs/configuration.md documents every key.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml

from monitor.errors import ConfigError, InputError
from monitor.targets import (
    PACKAGED_BLOCKLIST,
    load_prefix_file,
    packaged_countries,
    packaged_data,
    split_host_port,
)
from probes.base import DnsQuery
from probes.pacing import Blocklist, Pacer, PacingPolicy

T = TypeVar("T")

METHODS: Final = ("icmp", "tcp", "http", "dns")
RDTYPES: Final = ("A", "AAAA", "CNAME", "MX", "NS", "TXT", "SOA", "PTR", "SRV", "CAA")
ASN_FORMATS: Final = ("ip2asn", "prefix2as")
DEFAULT_PREFIXES: Final = "default"
DEFAULT_CONTACT_URL: Final = "https://github.com/shutdown-monitor/shutdown-monitor"


# ---------------------------------------------------------------- the configuration


@dataclass(frozen=True, slots=True)
class PacingConfig:
    rate_pps: float | None = 500.0
    max_in_flight: int = 512
    per_block_pps: float | None = 1.0
    per_block_burst: int = 3
    blocklist_file: Path | None = field(default_factory=lambda: packaged_data(PACKAGED_BLOCKLIST))

    def policy(self) -> PacingPolicy:
        return PacingPolicy(
            rate_pps=self.rate_pps,
            max_in_flight=self.max_in_flight,
            per_block_pps=self.per_block_pps,
            per_block_burst=self.per_block_burst,
        )

    def blocklist(self) -> Blocklist:
        """The blocklist (empty only if the config said `blocklist_file: null`)."""
        if self.blocklist_file is None:
            return Blocklist()
        return Blocklist.from_file(self.blocklist_file)

    def pacer(self) -> Pacer:
        return Pacer(self.policy(), self.blocklist())


@dataclass(frozen=True, slots=True)
class ProbingConfig:
    timeout_s: float = 2.0
    reprobes: int = 3  # other hitlist addresses tried in a round before a block counts as down
    tcp_ports: tuple[int, ...] = (80, 443)
    discovery_per_round: int = 2  # new candidates tried per silent block per round
    discovery_budget: int = 24  # candidates tried per block before it is left as silent


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    server: str
    name: str
    rdtype: str = "A"
    expected: tuple[str, ...] = ()
    port: int | None = None
    transport: str = "udp"

    def query(self) -> DnsQuery:
        return DnsQuery(self.name, self.rdtype, frozenset(self.expected), self.transport)


@dataclass(frozen=True, slots=True)
class EndpointsConfig:
    hosts: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    resolvers: tuple[ResolverConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class CountryConfig:
    code: str
    prefixes: Path | None = None  # None: the packaged snapshot (unless `no_prefixes`)
    no_prefixes: bool = False  # `prefixes: null`: named endpoints only
    sample_blocks: int | None = None
    methods: tuple[str, ...] = ("icmp",)
    endpoints: EndpointsConfig = EndpointsConfig()


@dataclass(frozen=True, slots=True)
class ControlConfig:
    hosts: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    method: str = "icmp"  # how `hosts` are probed: icmp or tcp
    min_up_fraction: float = 0.5


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    path: Path = Path("var/history.sqlite")
    retention_days: int = 35


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    timeout_s: float = 5.0
    retries: int = 5


@dataclass(frozen=True, slots=True)
class AlertmanagerConfig:
    url: str


@dataclass(frozen=True, slots=True)
class SinksConfig:
    webhook: WebhookConfig | None = None
    alertmanager: AlertmanagerConfig | None = None


@dataclass(frozen=True, slots=True)
class RemoteWriteConfig:
    """One Prometheus remote-write destination (monitor/remote_write.py)."""

    url: str
    name: str
    external_labels: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0
    buffer_dir: Path = Path("var/remote-write")
    buffer_max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Config:
    source: str  # the file it came from (for messages)
    vantage_name: str = "local"
    listen: str = "127.0.0.1:9310"
    listen_host: str = "127.0.0.1"
    listen_port: int = 9310
    interval_s: float = 300.0
    contact_url: str = DEFAULT_CONTACT_URL
    pacing: PacingConfig = PacingConfig()
    probing: ProbingConfig = ProbingConfig()
    hitlist_dir: Path = Path("var/hitlists")
    asn_file: Path | None = None
    asn_format: str | None = None  # None: detected from the file
    countries: tuple[CountryConfig, ...] = ()
    control: ControlConfig = ControlConfig()
    history: HistoryConfig = HistoryConfig()
    detector: Mapping[str, Any] = field(default_factory=dict)
    sinks: SinksConfig = SinksConfig()
    shard: tuple[int, int] | None = None  # (index, count), index 0-based
    remote_write: tuple[RemoteWriteConfig, ...] = ()

    def country(self, code: str) -> CountryConfig:
        for country in self.countries:
            if country.code == code.upper():
                return country
        known = ", ".join(c.code for c in self.countries) or "none"
        raise ConfigError([f"{self.source}: countries: no country {code!r} (configured: {known})"])

    def hitlist_path(self, code: str) -> Path:
        return self.hitlist_dir / f"{code.upper()}.csv"


# ---------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: not valid YAML: {problem}"]) from None
    if data is None:
        data = {}
    return parse_config(data, str(path), base_dir=path.parent)


def parse_config(data: object, source_name: str, base_dir: str | Path | None = None) -> Config:
    """Validate an already-parsed mapping. Relative paths resolve against `base_dir`
    (default: the directory of `source_name`)."""
    base = Path(base_dir) if base_dir is not None else Path(source_name).parent
    checker = _Checker(source_name, base)
    config = checker.config(data)
    if checker.problems or config is None:
        raise ConfigError(checker.problems)
    return config


# ---------------------------------------------------------------- validation


class _Bad(Exception):
    """A value does not fit: `expected` says what would have."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Bad("a positive integer")
    return value


def non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad("an integer >= 0")
    return value


def positive_number(value: object) -> float:
    if not _is_number(value) or float(value) <= 0:  # type: ignore[arg-type]
        raise _Bad("a positive number")
    return float(value)  # type: ignore[arg-type]


def fraction(value: object) -> float:
    if not _is_number(value) or not 0 <= float(value) <= 1:  # type: ignore[arg-type]
        raise _Bad("a number from 0 to 1")
    return float(value)  # type: ignore[arg-type]


def text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a non-empty string")
    return value.strip()


def port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _Bad("a port number from 1 to 65535")
    return value


def http_url(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
        raise _Bad("an http:// or https:// URL")
    return value


def ip_address(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip())) if isinstance(value, str) else ""
    except ValueError:
        pass
    raise _Bad("an IP address")


def host(value: object) -> str:
    """A host name or IP literal, optionally with ':port' ('[v6]:port' for IPv6)."""
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a host name or IP address (optionally host:port)")
    try:
        name, _ = split_host_port(value.strip())
    except ValueError:
        raise _Bad("a host name or IP address (optionally host:port)") from None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not re.fullmatch(r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+",
                            name):
            raise _Bad("a host name or IP address (optionally host:port)") from None
    return value.strip()


def one_of(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in choices:
            raise _Bad("one of " + ", ".join(choices))
        return str(value)

    return check


def listen_address(value: object) -> tuple[str, str, int]:
    expected = "host:port, e.g. 127.0.0.1:9310 or [::1]:9310"
    if not isinstance(value, str):
        raise _Bad(expected)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if match is None:
        raise _Bad(expected)
    name = match.group(1) if match.group(1) is not None else match.group(3)
    number = int(match.group(2) or match.group(4))
    if not 0 < number < 65536:
        raise _Bad(expected)
    return value.strip(), name, number


def shard_spec(value: object) -> tuple[int, int]:
    expected = "'i/N' with 0 <= i < N, e.g. '0/4'"
    match = re.fullmatch(r"(\d+)/(\d+)", str(value).strip()) if isinstance(value, str) else None
    if match is None:
        raise _Bad(expected)
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise _Bad(expected)
    return index, count


def parse_shard(value: str) -> tuple[int, int]:
    """'i/N' -> (i, N), for the `--shard` command-line options. ValueError if malformed."""
    try:
        return shard_spec(value)
    except _Bad as bad:
        raise ValueError(f"expected {bad.expected}, got {value!r}") from None


class _Checker:
    """Walks the raw mapping, collects problems, builds the dataclasses."""

    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base
        self.problems: list[str] = []

    # ---- reporting

    def expect(self, path: str, expected: str, value: object) -> None:
        shown = _show(value)
        self.problems.append(f"{self.source}: {path}: expected {expected}, got {shown}")

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}")

    # ---- structure

    def section(
        self, value: object, path: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> dict[str, Any] | None:
        """A mapping with only `allowed` keys (all `required` ones present), else None."""
        if not isinstance(value, dict):
            self.expect(path or "(top level)", "a mapping of keys", value)
            return None
        for key in value:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, "unknown key (expected one of: " + ", ".join(allowed) + ")")
        for key in required:
            if key not in value:
                self.fail(f"{path}.{key}" if path else key, "missing required key")
        return {str(k): v for k, v in value.items() if k in allowed}

    def take(
        self,
        section: dict[str, Any],
        path: str,
        key: str,
        convert: Callable[[object], T],
        default: T,
        nullable: bool = False,
    ) -> T:
        if key not in section:
            return default
        value = section[key]
        if value is None and nullable:
            return None  # type: ignore[return-value]
        try:
            return convert(value)
        except _Bad as bad:
            self.expect(_join(path, key), bad.expected, value)
            return default

    def take_list(
        self, section: dict[str, Any], path: str, key: str, convert: Callable[[object], T]
    ) -> tuple[T, ...]:
        if key not in section or section[key] is None:
            return ()
        values = section[key]
        where = _join(path, key)
        if not isinstance(values, list):
            self.expect(where, "a list", values)
            return ()
        result = []
        for index, value in enumerate(values):
            try:
                result.append(convert(value))
            except _Bad as bad:
                self.expect(f"{where}[{index}]", bad.expected, value)
        return tuple(result)

    def take_path(
        self, section: dict[str, Any], path: str, key: str, default: Path | None, must_exist: bool
    ) -> Path | None:
        if key not in section:
            return default
        value = section[key]
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.expect(_join(path, key), "a file path or null", value)
            return default
        resolved = self.resolve(value)
        if must_exist and not resolved.is_file():
            self.fail(_join(path, key), f"file not found: {resolved}")
        return resolved

    def resolve(self, value: str) -> Path:
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else self.base / candidate

    # ---- sections

    def config(self, data: object) -> Config | None:
        allowed = ["vantage", "listen", "interval_s", "contact_url", "pacing", "probing",
                   "hitlist_dir", "asn_file", "asn_format", "countries", "control", "history",
                   "detector", "sinks", "shard", "remote_write"]
        top = self.section(data, "", allowed)
        if top is None:
            return None
        vantage_name = "local"
        if "vantage" in top:
            vantage = self.section(top["vantage"], "vantage", ["name"])
            if vantage is not None:
                vantage_name = self.take(vantage, "vantage", "name", _vantage_name, "local")
        listen = self.take(top, "", "listen", listen_address, ("127.0.0.1:9310", "127.0.0.1", 9310))
        hitlist_dir = self.take(top, "", "hitlist_dir", text, "var/hitlists")
        config = Config(
            source=self.source,
            vantage_name=vantage_name,
            listen=listen[0],
            listen_host=listen[1],
            listen_port=listen[2],
            interval_s=self.take(top, "", "interval_s", positive_number, 300.0),
            contact_url=self.take(top, "", "contact_url", http_url, DEFAULT_CONTACT_URL),
            pacing=self.pacing(top.get("pacing", {})),
            probing=self.probing(top.get("probing", {})),
            hitlist_dir=self.resolve(hitlist_dir),
            asn_file=self.take_path(top, "", "asn_file", None, must_exist=True),
            asn_format=self.take(top, "", "asn_format", one_of(*ASN_FORMATS), None, True),
            countries=self.countries(top.get("countries", {})),
            control=self.control(top.get("control", {})),
            history=self.history(top.get("history", {})),
            detector=self.detector(top.get("detector", {})),
            sinks=self.sinks(top.get("sinks", {})),
            shard=self.take(top, "", "shard", shard_spec, None, nullable=True),
            remote_write=self.remote_write(top.get("remote_write")),
        )
        return config

    def pacing(self, value: object) -> PacingConfig:
        allowed = ["rate_pps", "max_in_flight", "per_block_pps", "per_block_burst",
                   "blocklist_file"]
        section = self.section(value or {}, "pacing", allowed)
        if section is None:
            return PacingConfig()
        default = PacingConfig()
        blocklist_file = self.take_path(
            section, "pacing", "blocklist_file", default.blocklist_file, must_exist=True
        )
        if blocklist_file is not None and blocklist_file.is_file():
            try:
                Blocklist.from_file(blocklist_file)
            except (ValueError, OSError) as exc:
                self.fail("pacing.blocklist_file", str(exc))
        return PacingConfig(
            rate_pps=self.take(section, "pacing", "rate_pps", positive_number, 500.0, True),
            max_in_flight=self.take(section, "pacing", "max_in_flight", positive_int, 512),
            per_block_pps=self.take(
                section, "pacing", "per_block_pps", positive_number, 1.0, True
            ),
            per_block_burst=self.take(section, "pacing", "per_block_burst", positive_int, 3),
            blocklist_file=blocklist_file,
        )

    def probing(self, value: object) -> ProbingConfig:
        allowed = ["timeout_s", "reprobes", "tcp_ports", "discovery_per_round",
                   "discovery_budget"]
        section = self.section(value or {}, "probing", allowed)
        if section is None:
            return ProbingConfig()
        ports = self.take_list(section, "probing", "tcp_ports", port)
        if "tcp_ports" in section and not ports and isinstance(section["tcp_ports"], list):
            self.expect("probing.tcp_ports", "a non-empty list of ports", section["tcp_ports"])
        budget = self.take(section, "probing", "discovery_budget", positive_int, 24)
        if budget > 254:
            self.expect("probing.discovery_budget", "at most 254 (host addresses of a /24)", budget)
        return ProbingConfig(
            timeout_s=self.take(section, "probing", "timeout_s", positive_number, 2.0),
            reprobes=self.take(section, "probing", "reprobes", non_negative_int, 3),
            tcp_ports=ports or (80, 443),
            discovery_per_round=self.take(
                section, "probing", "discovery_per_round", non_negative_int, 2
            ),
            discovery_budget=min(budget, 254),
        )

    def countries(self, value: object) -> tuple[CountryConfig, ...]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.expect("countries", "a mapping of country codes (KZ: {...})", value)
            return ()
        result = []
        seen: set[str] = set()
        packaged: frozenset[str] | None = None
        for raw_code, body in value.items():
            code = str(raw_code)
            path = f"countries.{code}"
            if not re.fullmatch(r"[A-Za-z]{2}", code):
                self.fail(path, "expected an ISO 3166-1 alpha-2 country code like KZ")
                continue
            code = code.upper()
            if code in seen:
                self.fail(path, f"country {code} is configured twice")
                continue
            seen.add(code)
            country = self.country(code, path, body if body is not None else {})
            if country is None:
                continue
            if country.prefixes is None and not country.no_prefixes:
                packaged = packaged if packaged is not None else packaged_countries()
                if code not in packaged:
                    self.fail(f"{path}.prefixes", f"no packaged prefixes for {code}; "
                              "expected a prefix file path, or null for endpoints only")
            result.append(country)
        return tuple(result)

    def country(self, code: str, path: str, value: object) -> CountryConfig | None:
        allowed = ["prefixes", "sample_blocks", "methods", "endpoints"]
        section = self.section(value, path, allowed)
        if section is None:
            return None
        prefixes: Path | None = None
        no_prefixes = False
        raw = section.get("prefixes", DEFAULT_PREFIXES)
        if raw is None:
            no_prefixes = True
        elif raw != DEFAULT_PREFIXES:
            prefixes = self.take_path(section, path, "prefixes", None, must_exist=True)
            if prefixes is not None and prefixes.is_file():
                try:
                    load_prefix_file(prefixes)
                except InputError as exc:
                    self.fail(f"{path}.prefixes", str(exc))
        endpoints = self.endpoints(section.get("endpoints", {}), f"{path}.endpoints")
        implied = ["icmp"] if not no_prefixes else []
        implied += [m for m, present in (("tcp", endpoints.hosts), ("http", endpoints.urls),
                                         ("dns", endpoints.resolvers)) if present]
        methods = self.take_list(section, path, "methods", one_of(*METHODS))
        if "methods" in section:
            for method, kind in (("tcp", "hosts"), ("http", "urls"), ("dns", "resolvers")):
                if getattr(endpoints, kind) and method not in methods:
                    self.fail(f"{path}.endpoints.{kind}",
                              f"endpoints given but method {method} is not in {path}.methods")
        else:
            methods = tuple(implied)
        return CountryConfig(
            code=code,
            prefixes=prefixes,
            no_prefixes=no_prefixes,
            sample_blocks=self.take(section, path, "sample_blocks", positive_int, None, True),
            methods=tuple(dict.fromkeys(methods)),
            endpoints=endpoints,
        )

    def endpoints(self, value: object, path: str) -> EndpointsConfig:
        section = self.section(value or {}, path, ["hosts", "urls", "resolvers"])
        if section is None:
            return EndpointsConfig()
        resolvers = []
        raw_resolvers = section.get("resolvers") or []
        if not isinstance(raw_resolvers, list):
            self.expect(f"{path}.resolvers", "a list of {server, name, ...}", raw_resolvers)
            raw_resolvers = []
        for index, raw in enumerate(raw_resolvers):
            resolver = self.resolver(raw, f"{path}.resolvers[{index}]")
            if resolver is not None:
                resolvers.append(resolver)
        return EndpointsConfig(
            hosts=self.take_list(section, path, "hosts", host),
            urls=self.take_list(section, path, "urls", http_url),
            resolvers=tuple(resolvers),
        )

    def resolver(self, value: object, path: str) -> ResolverConfig | None:
        allowed = ["server", "port", "name", "rdtype", "expected", "transport"]
        section = self.section(value, path, allowed, required=["server", "name"])
        if section is None or "server" not in section or "name" not in section:
            return None
        return ResolverConfig(
            server=self.take(section, path, "server", ip_address, "0.0.0.0"),
            name=self.take(section, path, "name", text, "."),
            rdtype=self.take(section, path, "rdtype", _rdtype, "A"),
            expected=self.take_list(section, path, "expected", text),
            port=self.take(section, path, "port", port, None, nullable=True),
            transport=self.take(section, path, "transport", one_of("udp", "tcp"), "udp"),
        )

    def control(self, value: object) -> ControlConfig:
        section = self.section(
            value or {}, "control", ["hosts", "urls", "method", "min_up_fraction"]
        )
        if section is None:
            return ControlConfig()
        return ControlConfig(
            hosts=self.take_list(section, "control", "hosts", host),
            urls=self.take_list(section, "control", "urls", http_url),
            method=self.take(section, "control", "method", one_of("icmp", "tcp"), "icmp"),
            min_up_fraction=self.take(section, "control", "min_up_fraction", fraction, 0.5),
        )

    def history(self, value: object) -> HistoryConfig:
        section = self.section(value or {}, "history", ["path", "retention_days"])
        if section is None:
            return HistoryConfig()
        raw_path = self.take(section, "history", "path", text, "var/history.sqlite")
        return HistoryConfig(
            path=self.resolve(raw_path),
            retention_days=self.take(section, "history", "retention_days", positive_int, 35),
        )

    def detector(self, value: object) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.expect("detector", "a mapping of detector settings", value)
            return {}
        fields = _detector_fields()
        if fields is None:  # the detector module is not there: nothing to check against
            return dict(value)
        result: dict[str, Any] = {}
        for key, item in value.items():
            path = f"detector.{key}"
            if key not in fields:
                self.fail(path, "unknown key (expected one of: " + ", ".join(fields) + ")")
                continue
            default = fields[key]
            if isinstance(default, bool):
                if not isinstance(item, bool):
                    self.expect(path, "true or false", item)
                    continue
            elif isinstance(default, int | float) and default is not None:
                if not _is_number(item):
                    self.expect(path, "a number", item)
                    continue
                if isinstance(default, int) and not isinstance(default, bool) and (
                    not isinstance(item, int)
                ):
                    self.expect(path, "an integer", item)
                    continue
            elif isinstance(default, str) and not isinstance(item, str):
                self.expect(path, "a string", item)
                continue
            result[str(key)] = item
        return result

    def sinks(self, value: object) -> SinksConfig:
        section = self.section(value or {}, "sinks", ["webhook", "alertmanager"])
        if section is None:
            return SinksConfig()
        webhook = None
        if section.get("webhook") is not None:
            hook = self.section(section["webhook"], "sinks.webhook",
                                ["url", "timeout_s", "retries"], required=["url"])
            if hook is not None and "url" in hook:
                webhook = WebhookConfig(
                    url=self.take(hook, "sinks.webhook", "url", http_url, ""),
                    timeout_s=self.take(hook, "sinks.webhook", "timeout_s", positive_number, 5.0),
                    retries=self.take(hook, "sinks.webhook", "retries", non_negative_int, 5),
                )
        alertmanager = None
        if section.get("alertmanager") is not None:
            manager = self.section(section["alertmanager"], "sinks.alertmanager", ["url"],
                                   required=["url"])
            if manager is not None and "url" in manager:
                alertmanager = AlertmanagerConfig(
                    url=self.take(manager, "sinks.alertmanager", "url", http_url, "")
                )
        return SinksConfig(webhook=webhook, alertmanager=alertmanager)

    def remote_write(self, value: object) -> tuple[RemoteWriteConfig, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.expect("remote_write", "a list of {url, name, ...}", value)
            return ()
        allowed = ["url", "name", "external_labels", "timeout_s", "buffer_dir",
                   "buffer_max_bytes"]
        result: list[RemoteWriteConfig] = []
        for index, raw in enumerate(value):
            path = f"remote_write[{index}]"
            section = self.section(raw, path, allowed, required=["url", "name"])
            if section is None or "url" not in section or "name" not in section:
                continue
            name = self.take(section, path, "name", _vantage_name, "remote")
            if any(r.name == name for r in result):
                self.fail(f"{path}.name", f"remote_write name {name!r} is used twice")
            labels: dict[str, str] = {}
            raw_labels = section.get("external_labels") or {}
            if not isinstance(raw_labels, dict):
                self.expect(f"{path}.external_labels", "a mapping of label: value", raw_labels)
                raw_labels = {}
            for key, item in raw_labels.items():
                if not isinstance(key, str) or not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", key) \
                        or key.startswith("__"):
                    self.expect(f"{path}.external_labels", "label names of letters, digits "
                                "and '_' (not starting with a digit or '__')", key)
                elif not isinstance(item, str | int | float) or isinstance(item, bool):
                    self.expect(f"{path}.external_labels.{key}", "a string", item)
                else:
                    labels[key] = str(item)
            buffer_dir = self.take(section, path, "buffer_dir", text, f"var/remote-write/{name}")
            result.append(RemoteWriteConfig(
                url=self.take(section, path, "url", http_url, ""),
                name=name,
                external_labels=labels,
                timeout_s=self.take(section, path, "timeout_s", positive_number, 30.0),
                buffer_dir=self.resolve(buffer_dir),
                buffer_max_bytes=self.take(section, path, "buffer_max_bytes", _buffer_size,
                                           256 * 1024 * 1024),
            ))
        return tuple(result)


def _buffer_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 4096:
        raise _Bad("a number of bytes >= 4096")
    return value


def _vantage_name(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
        raise _Bad("a name of letters, digits, '.', '_' or '-' (at most 63)")
    return value


def _rdtype(value: object) -> str:
    if not isinstance(value, str) or value.upper() not in RDTYPES:
        raise _Bad("a record type, one of " + ", ".join(RDTYPES))
    return value.upper()


def _detector_fields() -> dict[str, object] | None:
    """Field name -> default of monitor.detect.DetectorConfig, or None if it is not there."""
    try:
        module = importlib.import_module("monitor.detect")
    except ImportError:
        return None
    detector_config = getattr(module, "DetectorConfig", None)
    if detector_config is None or not dataclasses.is_dataclass(detector_config):
        return None
    fields: dict[str, object] = {}
    for item in dataclasses.fields(detector_config):
        if item.default is not dataclasses.MISSING:
            fields[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            fields[item.name] = item.default_factory()
        else:
            fields[item.name] = None
    return fields


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
