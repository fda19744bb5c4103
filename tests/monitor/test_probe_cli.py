"""`shutdown-monitor probe` end to end: real servers on loopback, the real command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import dns.rcode
import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.cli import cli
from monitor.commands.probe import TargetSyntax, read_targets_file, split_host_port
from probes.base import DnsQuery, Target
from tests.probes.servers import DnsBehaviour, DnsResponder, free_port, http_app, raw_tcp_server

T = TypeVar("T")
CONTACT = "https://monitor.example/contact"


class ServerThread:
    """An event loop in a thread, so servers keep answering while the command runs its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._exits: list[AbstractAsyncContextManager[Any]] = []

    def __enter__(self) -> ServerThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for manager in reversed(self._exits):
            self.run(manager.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def run(self, coroutine: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(10)

    def start(self, manager: AbstractAsyncContextManager[T]) -> T:
        value = self.run(manager.__aenter__())
        self._exits.append(manager)
        return value


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


def _routes() -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/ok")
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @routes.get("/moved")
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/gone")

    return routes


@asynccontextmanager
async def _dns() -> AsyncIterator[int]:
    zone = {
        "good.test": DnsBehaviour(answers=["192.0.2.1"]),
        "censored.test": DnsBehaviour(answers=["10.10.34.36"]),
        "missing.test": DnsBehaviour("rcode", rcode=dns.rcode.NXDOMAIN),
    }
    async with DnsResponder(zone) as server:
        yield server.port


@pytest.fixture
def servers() -> Iterator[dict[str, int]]:
    with ServerThread() as thread:
        yield {
            "tcp": thread.start(raw_tcp_server(_hold)),
            "http": thread.start(http_app(_routes())),
            "dns": thread.start(_dns()),
        }


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["probe", *args], catch_exceptions=False)


def _json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_tcp_table_and_exit_status(servers: dict[str, int]) -> None:
    port, closed = servers["tcp"], free_port()
    every = invoke("--method", "tcp", f"127.0.0.1:{port}", f"localhost:{port}")
    assert every.exit_code == 0, every.output
    header, *rows = every.output.splitlines()
    assert header.split() == ["TARGET", "REACHABLE", "FAILURE", "RTT"]
    assert len(rows) == 2 and all(" yes " in row and " ms" in row for row in rows)

    some = invoke("--method", "tcp", f"127.0.0.1:{port}", f"127.0.0.1:{closed}")
    assert some.exit_code == 1
    assert f"127.0.0.1:{closed}" in some.output and "connection_refused" in some.output


def test_tcp_port_option_json_and_summary(servers: dict[str, int]) -> None:
    closed = free_port()
    result = invoke(
        "--method", "tcp", "--port", str(closed), "--port", str(servers["tcp"]),
        "--json", "--summary", "127.0.0.1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [line, summary] = _json_lines(result.output)
    assert line["target"] == "127.0.0.1" and line["success"] is True
    assert line["details"]["port"] == servers["tcp"]
    assert line["details"]["ports"][str(closed)] == "connection_refused"
    assert set(line) == {
        "target", "method", "reachable", "success", "failure", "rtt_s", "started_at", "details"
    }  # fmt: skip
    assert summary["probes"] == 1 and summary["answered"] == 1 and summary["failures"] == {}
    assert summary["elapsed_s"] >= 0 and summary["probes_per_s"] > 0


def test_targets_file_with_comments(servers: dict[str, int], tmp_path: Path) -> None:
    path = tmp_path / "targets.txt"
    closed = free_port()
    lines = [
        "# lab hosts",
        f"127.0.0.1:{servers['tcp']}",
        "",
        f"  127.0.0.1:{closed}  # closed",
        f"[::1]:{closed}",
    ]
    path.write_text("\n".join(lines) + "\n")
    result = invoke("--method", "tcp", "--targets-file", str(path), "--summary", "--json")
    assert result.exit_code == 1
    *results, summary = _json_lines(result.output)
    assert len(results) == 3
    assert summary["probes"] == 3 and summary["answered"] == 3
    assert summary["failures"] == {"connection_refused": 2}


def test_targets_file_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "targets.txt"
    path.write_text("# ok\n127.0.0.1:80\n127.0.0.1:http\n")
    result = invoke("--method", "tcp", "--targets-file", str(path))
    assert result.exit_code == 2
    assert f"{path}:3:" in result.output and "port must be a number" in result.output


def test_http_status_redirects_and_contact_url(servers: dict[str, int]) -> None:
    base = f"http://127.0.0.1:{servers['http']}"
    ok = invoke("--method", "http", "--contact-url", CONTACT, "--json", base + "/ok")
    assert ok.exit_code == 0, ok.output
    [line] = _json_lines(ok.output)
    assert line["details"]["status"] == 200 and "ttfb_s" in line["details"]

    moved = invoke("--method", "http", "--contact-url", CONTACT, "--json", base + "/moved")
    [line] = _json_lines(moved.output)
    assert moved.exit_code == 0 and line["details"]["location"] == "/gone"

    followed = invoke(
        "--method", "http", "--contact-url", CONTACT, "--follow-redirects", "--json",
        base + "/moved",
    )  # fmt: skip
    [line] = _json_lines(followed.output)
    assert followed.exit_code == 1 and line["failure"] == "http_status"
    assert line["details"]["status"] == 404 and line["details"]["redirects"]


def test_dns_name_expect_and_tcp(servers: dict[str, int]) -> None:
    server = f"127.0.0.1:{servers['dns']}"
    for transport in ([], ["--tcp"]):
        good = invoke(
            "--method", "dns", "--name", "good.test", "--expect", "192.0.2.1", "--json",
            *transport, server,
        )  # fmt: skip
        assert good.exit_code == 0, good.output
        [line] = _json_lines(good.output)
        assert line["details"]["answers"] == ["192.0.2.1"]
        assert line["details"]["transport"] == ("tcp" if transport else "udp")
    censored = invoke("--method", "dns", "--name", "censored.test", "--expect", "192.0.2.1", server)
    assert censored.exit_code == 1 and "dns_wrong_answer" in censored.output
    missing = invoke("--method", "dns", "--name", "missing.test", "--type", "aaaa", server)
    assert missing.exit_code == 1 and "dns_nxdomain" in missing.output


def test_blocklist_is_never_probed(servers: dict[str, int], tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# never\n127.0.0.0/8\n")
    result = invoke(
        "--method", "tcp", "--blocklist", str(path), "--summary", f"127.0.0.1:{servers['tcp']}"
    )
    assert result.exit_code == 1 and "blocked_by_policy" in result.output
    assert '"blocked_by_policy": 1' in result.output

    path.write_text("10.0.0.0/8\nnot-a-range\n")
    bad = invoke("--method", "tcp", "--blocklist", str(path), "127.0.0.1:1")
    assert bad.exit_code == 2 and f"{path}:2" in bad.output


def test_rate_bounds_the_run(servers: dict[str, int]) -> None:
    targets = [f"127.0.0.1:{servers['tcp']}"] * 40
    result = invoke("--method", "tcp", "--rate", "100", "--concurrency", "4", "--summary", *targets)
    assert result.exit_code == 0
    summary = _json_lines(result.output)[-1]
    # 40 probes at 100/s (burst of 1) cannot finish in less than 0.39 s.
    assert summary["probes"] == 40 and summary["elapsed_s"] >= 0.38


def test_icmp_to_loopback() -> None:
    result = invoke("--method", "icmp", "--timeout", "1", "--json", "127.0.0.1")
    assert result.exit_code == 0, result.output
    [line] = _json_lines(result.output)
    assert line["method"] == "icmp" and line["reachable"] is True


def test_workers_share_one_rate_and_report_every_result(servers: dict[str, int]) -> None:
    """--workers 2: the probes go out from two worker processes, every result comes back once,
    and the caller's one Pacer still bounds the whole run."""
    good, closed = f"127.0.0.1:{servers['tcp']}", f"127.0.0.1:{free_port()}"
    targets = [good] * 200 + [closed] * 10
    result = invoke("--method", "tcp", "--workers", "2", "--rate", "400", "--concurrency", "32",
                    "--json", "--summary", *targets)  # fmt: skip
    assert result.exit_code == 1, result.output
    *lines, summary = _json_lines(result.output)
    assert len(lines) == 210
    assert sorted(line["failure"] or "ok" for line in lines) == (
        ["connection_refused"] * 10 + ["ok"] * 200
    )
    assert summary["probes"] == 210 and summary["succeeded"] == 200
    assert summary["failures"] == {"connection_refused": 10}
    # 210 probes at 400/s over both workers together cannot take less than about half a second.
    assert summary["elapsed_s"] >= 0.5


def test_icmp_workers_to_loopback() -> None:
    addresses = [f"127.0.0.{i}" for i in range(1, 41)]
    result = invoke("--method", "icmp", "--workers", "2", "--timeout", "1", "--rate", "10000",
                    "--summary", *addresses)  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = _json_lines(result.output)[-1]
    assert summary["probes"] == summary["answered"] == summary["succeeded"] == 40


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["127.0.0.1"], "Missing option '--method'"),
        (["--method", "tcp"], "no targets"),
        (["--method", "tcp", "127.0.0.1:0"], "port must be a number"),
        (["--method", "tcp", "[::1"], "missing ']'"),
        (["--method", "icmp", "127.0.0.1:80"], "without a port"),
        (["--method", "http", "--contact-url", CONTACT, "127.0.0.1"], "http:// or https://"),
        (["--method", "http", "http://127.0.0.1/"], "--contact-url"),
        # A contact string that is not a URL is refused before anything is sent.
        (["--method", "http", "--contact-url", "me@example.org",  # noqa: network
          "http://127.0.0.1/"], "http"),
        (["--method", "dns", "127.0.0.1"], "--name"),
        (["--method", "dns", "--name", "a.test", "--type", "BOGUS", "127.0.0.1"], "record type"),
        (["--method", "dns", "--name", "a.test", "--port", "53", "127.0.0.1"], "--port applies"),
        (["--method", "tcp", "--name", "a.test", "127.0.0.1"], "--name applies"),
        (["--method", "tcp", "--rate", "0", "127.0.0.1"], "--rate"),
        (["--method", "tcp", "--concurrency", "0", "127.0.0.1"], "--concurrency"),
        (["--method", "tcp", "--workers", "0", "127.0.0.1"], "--workers"),
    ],
)
def test_bad_usage_exits_2_and_says_what_is_wrong(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["probe", *args], env={"SHUTDOWN_MONITOR_CONTACT_URL": ""})
    assert result.exit_code == 2, result.output
    assert message in result.output


async def test_the_installed_command_as_a_subprocess() -> None:
    async with raw_tcp_server(_hold) as port:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "monitor", "probe", "--method", "tcp", "--json",
            f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, stderr.decode()
    lines = _json_lines(stdout.decode())
    assert sorted(line["failure"] or "ok" for line in lines) == ["connection_refused", "ok"]


# --- hypothesis: the target syntax -----------------------------------------------------------

ports = st.integers(1, 65535)
# Anything but line breaks (str.splitlines() breaks on all of these), and only characters UTF-8
# can encode (no lone surrogates: a text file cannot hold them).
comment_chars = st.characters(codec="utf-8",
                              blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
)


@given(st.ip_addresses(v=4), ports)
def test_ipv4_with_port_round_trips(address: Any, port: int) -> None:
    assert split_host_port(f"{address}:{port}") == (str(address), port)


@given(st.ip_addresses(v=6), st.none() | ports)
def test_ipv6_bracketed_or_bare_round_trips(address: Any, port: int | None) -> None:
    text = f"[{address}]:{port}" if port is not None else str(address)
    assert split_host_port(text) == (str(address), port)


@given(hostnames, st.none() | ports)
def test_host_names_round_trip(host: str, port: int | None) -> None:
    text = host if port is None else f"{host}:{port}"
    assert split_host_port(text) == (host, port)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    for method in ("icmp", "tcp", "http"):
        try:
            target = TargetSyntax(method).parse(text)
        except ValueError:
            continue
        assert isinstance(target, Target) and target.address


@given(st.ip_addresses(v=4), st.none() | ports)
def test_dns_targets_carry_the_query(address: Any, port: int | None) -> None:
    query = DnsQuery("example.test", "A")
    text = str(address) if port is None else f"{address}:{port}"
    target = TargetSyntax("dns", query).parse(text)
    assert target == Target(str(address), port, query=query)


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(
        st.tuples(
            st.ip_addresses(v=4).map(str),
            st.none() | ports,
            st.sampled_from(["", "  ", "\t"]),
            st.none() | st.text(comment_chars, max_size=10),
        ),
        max_size=8,
    ),
    blank_lines=st.integers(0, 2),
)
def test_targets_file_parses_every_line_skipping_comments(
    tmp_path: Path, entries: list[tuple[str, int | None, str, str | None]], blank_lines: int
) -> None:
    lines = ["# header comment", *[""] * blank_lines]
    expected = []
    for address, port, pad, comment in entries:
        text = address if port is None else f"{address}:{port}"
        lines.append(pad + text + pad + ("" if comment is None else f" # {comment}"))
        expected.append(Target(address, port))
    path = tmp_path / "targets.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_targets_file(path, TargetSyntax("tcp")) == expected
