"""`shutdown-monitor probe`: probe targets once from the command line and print what answered.

A one-shot tool for operators and researchers: the same probers and pacing as the daemon, with
targets from arguments or a file, a table or JSON lines on stdout, and an exit status scripts can
use (0 every target succeeded, 1 some did not, 2 bad usage).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import click

from probes import PROBERS, eventloop
from probes.base import DnsQuery, ProbeResult, ProbeSetupError, Target, content_lines
from probes.dns import check_query
from probes.pacing import Blocklist, Pacer, PacingPolicy
from probes.workers import worker_pool

METHODS = ("icmp", "tcp", "http", "dns")
_DEFAULTS = PacingPolicy()
_TABLE_TARGET_WIDTH = (12, 60)  # the target column grows with the targets, within these bounds


def split_host_port(text: str) -> tuple[str, int | None]:
    """'host', 'host:port', 'v4:port', '[v6]:port' or a bare IPv6 address -> (host, port).

    Raises ValueError saying what is wrong.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty target")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        _check_ip(host, 6, text)
        return host, _port(rest[1:], text) if rest else None
    if text.count(":") > 1:
        _check_ip(text, 6, text)
        return text, None
    host, sep, port = text.partition(":")
    if not host:
        raise ValueError(f"{text!r}: missing host before ':'")
    if any(c.isspace() for c in host):
        raise ValueError(f"{text!r}: a host name has no spaces")
    return host, _port(port, text) if sep else None


def _check_ip(host: str, version: int, text: str) -> None:
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv{version} address") from None
    if address.version != version:
        raise ValueError(f"{text!r}: {host!r} is not an IPv{version} address")


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port must be a number in 1..65535, got {text!r}")
    return int(text)


@dataclass(frozen=True)
class TargetSyntax:
    """How the chosen method reads one TARGET (the DNS question comes from the options)."""

    method: str
    query: DnsQuery | None = None

    def parse(self, text: str) -> Target:
        """A Target from one argument or file line. Raises ValueError saying what is expected."""
        text = text.strip()
        if self.method == "http":
            return _http_target(text)
        host, port = split_host_port(text)
        if self.method == "icmp":
            if port is not None:
                raise ValueError(f"{text!r}: an ICMP target is a host or address, without a port")
            return Target(host)
        if self.method == "dns":
            return Target(host, port, query=self.query)
        return Target(host, port)


def _http_target(text: str) -> Target:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r}: expected an http:// or https:// URL")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    return Target(parts.hostname, parts.port, url=text)


def read_targets_file(path: Path, syntax: TargetSyntax) -> list[Target]:
    """One target per line; '#' starts a comment. Raises click.UsageError naming file:line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.UsageError(f"--targets-file {path}: cannot read it: {exc}") from None
    targets = []
    for lineno, text in content_lines(lines):
        try:
            targets.append(syntax.parse(text))
        except ValueError as exc:
            raise click.UsageError(f"{path}:{lineno}: {exc}") from None
    return targets


@dataclass
class Tally:
    """What `--summary` reports, counted as results stream past."""

    started: float = field(default_factory=time.monotonic)
    probes: int = 0
    answered: int = 0
    succeeded: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def add(self, result: ProbeResult) -> None:
        self.probes += 1
        self.answered += result.reachable
        self.succeeded += result.success
        if result.failure is not None:
            name = str(result.failure)
            self.failures[name] = self.failures.get(name, 0) + 1

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {
            "probes": self.probes,
            "answered": self.answered,
            "succeeded": self.succeeded,
            "elapsed_s": round(elapsed, 3),
            "probes_per_s": round(self.probes / elapsed, 1) if elapsed > 0 else None,
            "failures": dict(sorted(self.failures.items())),
        }


def table_printer(out: TextIO, targets: Sequence[Target]) -> Callable[[ProbeResult], None]:
    """Print a header now and one aligned row per result as it arrives."""
    low, high = _TABLE_TARGET_WIDTH
    width = min(high, max([low, *(len(str(t)) for t in targets)]))
    out.write(f"{'TARGET':<{width}}  {'REACHABLE':<9}  {'FAILURE':<18}  RTT\n")

    def row(result: ProbeResult) -> None:
        rtt = "-" if result.rtt_s is None else f"{result.rtt_s * 1000:.1f} ms"
        failure = "-" if result.failure is None else str(result.failure)
        reachable = "yes" if result.reachable else "no"
        out.write(f"{result.target!s:<{width}}  {reachable:<9}  {failure:<18}  {rtt}\n")
        out.flush()

    return row


def json_printer(out: TextIO) -> Callable[[ProbeResult], None]:
    def line(result: ProbeResult) -> None:
        out.write(json.dumps(result.to_json(), sort_keys=True) + "\n")
        out.flush()

    return line


def prober_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Constructor options for the method's prober from the command-line options.

    Raises click.UsageError when an option belongs to another method or a required one is missing.
    """
    belongs = {
        "ports": "tcp",
        "follow_redirects": "http",
        "contact_url": "http",
        "insecure": "http",
        "name": "dns",
        "rdtype": "dns",
        "expect": "dns",
        "tcp": "dns",
    }
    flags = {
        "ports": "--port",
        "follow_redirects": "--follow-redirects",
        "contact_url": "--contact-url",
        "insecure": "--insecure",
        "name": "--name",
        "rdtype": "--type",
        "expect": "--expect",
        "tcp": "--tcp",
    }
    for key, owner in belongs.items():
        value = given.get(key)
        if owner != method and value not in (None, False, ()):
            raise click.UsageError(f"{flags[key]} applies to --method {owner}, not {method}")
    options: dict[str, Any] = {}
    if given.get("timeout") is not None:
        options["timeout_s"] = given["timeout"]
    if method == "tcp" and given.get("ports"):
        options["ports"] = tuple(given["ports"])
    if method == "http":
        if not given.get("contact_url"):
            raise click.UsageError(
                "--method http needs --contact-url URL (or SHUTDOWN_MONITOR_CONTACT_URL): a page "
                "saying who runs this monitor and how to opt out; it goes in the User-Agent"
            )
        options["contact_url"] = given["contact_url"]
        options["follow_redirects"] = bool(given.get("follow_redirects"))
        options["verify_tls"] = not given.get("insecure")
    if method == "dns" and not given.get("name"):
        raise click.UsageError("--method dns needs --name NAME (the name to ask each server)")
    return options


async def _probe_all(
    method: str,
    options: dict[str, Any],
    targets: list[Target],
    pacer: Pacer,
    sink: Callable[[ProbeResult], None],
    workers: int = 1,
) -> None:
    # More than one worker process only pays for rates one Python thread cannot reach
    # (docs/probing.md); politeness stays here either way, in the one Pacer.
    prober = worker_pool(method, workers, **options) if workers > 1 else PROBERS[method](**options)
    try:
        await prober.probe_many(targets, pacer, sink)
    finally:
        await prober.close()


@click.command("probe")
@click.argument("target_args", metavar="TARGET...", nargs=-1)
@click.option(
    "--method", type=click.Choice(METHODS), required=True, help="How to probe each target."
)
@click.option(
    "--targets-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read targets from FILE, one per line; '#' starts a comment.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per result.")
@click.option("--summary", is_flag=True, help="Print a JSON summary line at the end.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.rate_pps,
    show_default=True,
    help="Global cap in probes per second.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_in_flight,
    show_default=True,
    help="Probes in flight at once.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes that send the probes (the rates and caps stay global).",
)
@click.option(
    "--per-block-pps",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Cap per /24 (IPv4) or /48 (IPv6) in probes per second. Default: no cap.",
)
@click.option(
    "--blocklist",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CIDR ranges never to probe, one per line.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to wait for each answer (default: the method's own).",
)
@click.option(
    "--port",
    "ports",
    type=click.IntRange(1, 65535),
    multiple=True,
    help="tcp: port to try (repeatable; default 80 then 443). A TARGET's own :PORT wins.",
)
@click.option("--follow-redirects", is_flag=True, help="http: follow redirects.")
@click.option(
    "--contact-url",
    envvar="SHUTDOWN_MONITOR_CONTACT_URL",
    help="http: URL sent in the User-Agent so site operators can reach you (required).",
)
@click.option("--insecure", is_flag=True, help="http: do not verify TLS certificates.")
@click.option("--name", help="dns: the name to ask each server (TARGET is the server).")
@click.option("--type", "rdtype", default=None, help="dns: record type (default A).")
@click.option(
    "--expect",
    multiple=True,
    help="dns: a right answer (repeatable); any other answer is dns_wrong_answer.",
)
@click.option("--tcp", is_flag=True, help="dns: ask over TCP instead of UDP.")
def probe_command(
    target_args: tuple[str, ...],
    method: str,
    targets_file: Path | None,
    as_json: bool,
    summary: bool,
    rate: float,
    concurrency: int,
    workers: int,
    per_block_pps: float | None,
    blocklist: Path | None,
    timeout: float | None,
    ports: tuple[int, ...],
    follow_redirects: bool,
    contact_url: str | None,
    insecure: bool,
    name: str | None,
    rdtype: str | None,
    expect: tuple[str, ...],
    tcp: bool,
) -> None:
    """Probe each TARGET once and print whether it answered.

    TARGET is an address or host name (icmp), HOST[:PORT] (tcp), a URL (http), or a DNS server
    SERVER[:PORT] (dns). Exit status: 0 every target succeeded, 1 some did not, 2 bad usage.
    """
    given = {
        "timeout": timeout,
        "ports": ports,
        "follow_redirects": follow_redirects,
        "contact_url": contact_url,
        "insecure": insecure,
        "name": name,
        "rdtype": rdtype,
        "expect": expect,
        "tcp": tcp,
    }
    options = prober_options(method, given)
    query = None
    if method == "dns":
        assert name is not None  # prober_options insists on it
        query = DnsQuery(name, (rdtype or "A").upper(), frozenset(expect), "tcp" if tcp else "udp")
        try:
            check_query(query)
        except ProbeSetupError as exc:
            raise click.UsageError(str(exc)) from None
    syntax = TargetSyntax(method, query)
    targets: list[Target] = []
    for text in target_args:
        try:
            targets.append(syntax.parse(text))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="TARGET") from None
    if targets_file is not None:
        targets.extend(read_targets_file(targets_file, syntax))
    if not targets:
        raise click.UsageError("no targets: give TARGET arguments or --targets-file FILE")
    try:
        blocked = Blocklist.from_file(blocklist) if blocklist else Blocklist()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--blocklist") from None
    policy = PacingPolicy(rate_pps=rate, max_in_flight=concurrency, per_block_pps=per_block_pps)
    out = click.get_text_stream("stdout")
    show = json_printer(out) if as_json else table_printer(out, targets)
    tally = Tally()

    def sink(result: ProbeResult) -> None:
        tally.add(result)
        show(result)

    try:
        eventloop.run(
            _probe_all(method, options, targets, Pacer(policy, blocked), sink, workers)
        )
    except ProbeSetupError as exc:
        raise click.UsageError(f"--method {method}: {exc}") from None
    if summary:
        out.write(json.dumps(tally.summary()) + "\n")
    if tally.succeeded != tally.probes:
        click.get_current_context().exit(1)
