"""The lab's namespaces: a `vantage` joined to a `world` by one veth pair, nothing else.

    vantage ns                         world ns
    uplink 198.18.0.1/30  <--veth-->  uplink 198.18.0.2/30
    routes: 10/8, 198.19/16 via .2     AnyIP: `local` routes for every country /12 and the
    (no default route)                 control net, so every address there answers ICMP/TCP

Both ends of the veth are created directly inside the lab's namespaces, IPv6 is off in both, and
both carry a guard nft table whose output chain counts and drops any packet for an address
outside the lab ranges: `escaped()` must stay 0. The world's `smlab` table holds the sets the
scenarios change (cut, churn, HTTP RSTs, uplink cut, throttled with a random-loss chain); an
htb class on the world's uplink shapes the throttled networks' replies (the kernel here need not
have netem: queueing under a low rate gives the delay, and its overflow the loss). Everything is
removed by `down()`, which is idempotent and also runs from
atexit and signal handlers (`install_cleanup`).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

from monitor.errors import MonitorError
from monitor.lab.world import (
    DNS_OCTET,
    LAB_SPACES,
    UPLINK_PREFIX_LEN,
    UPLINK_VANTAGE,
    UPLINK_WORLD,
    World,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "smlab"
STATE_ROOT: Final = Path("/run/shutdown-monitor-lab")
UPLINK: Final = "uplink"
WORLD_TABLE: Final = "smlab"
GUARD_TABLE: Final = "smlab_guard"
THROTTLE_CLASS: Final = "1:3"
THROTTLE_QUEUE: Final = 1000  # packets queued in a throttled class before it drops
_PREFIX_RE: Final = re.compile(r"[a-z][a-z0-9]{0,11}")


class LabError(MonitorError):
    """The lab cannot be set up or torn down; the message says what and why."""


def run_cmd(args: Sequence[str], *, input_text: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(args), input=input_text, capture_output=True, text=True,
                              check=False, timeout=30)
    except FileNotFoundError:
        raise LabError(f"{args[0]}: not installed (the lab needs iproute2 and nftables)") from None
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(args[:6])}...: {done.stderr.strip() or done.stdout.strip()}")
    return done


def require_root() -> None:
    """The lab makes namespaces, interfaces and firewall rules: root (CAP_NET_ADMIN) only."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to create "
                       "network namespaces; run it with sudo")
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            raise LabError(f"the lab needs `{tool}` (apt-get install iproute2 nftables)")


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.fullmatch(prefix):
        raise LabError(f"lab prefix {prefix!r}: expected 1-12 lowercase letters and digits, "
                       "starting with a letter (e.g. smlab)")
    return prefix


def host_conflicts(nets: Iterable[ipaddress.IPv4Network]) -> list[str]:
    """Routes or addresses of the host namespace that reach into the lab's ranges.

    The default route does not count (lab packets never see the host's table); a specific route
    or an address inside a lab range does: those addresses are in real use here, and a lab that
    reused them could be confused with (or leak towards) a real network.
    """
    wanted = list(nets)
    found: list[str] = []
    routes = json.loads(run_cmd(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout
                        or "[]")
    for route in routes:
        dst = str(route.get("dst", ""))
        if dst in ("", "default", "0.0.0.0/0"):
            continue
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if net.prefixlen == 0:
            continue
        for lab in wanted:
            if net.overlaps(lab):
                found.append(f"route {dst} dev {route.get('dev', '?')} overlaps lab range {lab}")
    links = json.loads(run_cmd(["ip", "-j", "-4", "addr", "show"]).stdout or "[]")
    for link in links:
        for info in link.get("addr_info", []):
            address = ipaddress.IPv4Address(info["local"])
            for lab in wanted:
                if address in lab:
                    found.append(f"address {address} on {link.get('ifname')} is in lab range {lab}")
    return found


@dataclass(frozen=True, slots=True)
class LabNames:
    prefix: str

    @property
    def vantage(self) -> str:
        return f"{self.prefix}-vantage"

    @property
    def world(self) -> str:
        return f"{self.prefix}-world"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.prefix


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def world_ruleset() -> str:
    return f"""
table inet {WORLD_TABLE} {{
    set cut {{ type ipv4_addr; flags interval; auto-merge; }}
    set churn {{ type ipv4_addr; flags interval; auto-merge; }}
    set http_block {{ type ipv4_addr; flags interval; auto-merge; }}
    set uplink_cut {{ type ipv4_addr; }}
    set throttled {{ type ipv4_addr; flags interval; auto-merge; }}
    counter cut_dropped {{ }}
    counter uplink_dropped {{ }}
    chain throttle {{
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip saddr @uplink_cut counter name uplink_dropped drop
        ip daddr @throttled jump throttle
        ip daddr @cut counter name cut_dropped drop
        ip daddr @churn drop
        ip daddr @http_block tcp dport {{ 80, 443 }} reject with tcp reset
    }}
}}
"""


def guard_ruleset() -> str:
    allowed = ", ".join(str(n) for n in LAB_SPACES)
    return f"""
table inet {GUARD_TABLE} {{
    counter escaped {{ }}
    chain output {{
        type filter hook output priority -300; policy accept;
        oifname "lo" accept
        ip daddr {{ {allowed} }} accept
        counter name escaped drop
    }}
    chain forward {{
        type filter hook forward priority -300; policy accept;
        counter name escaped drop
    }}
}}
"""


class Lab:
    """One lab: its namespaces, interfaces, rules, responders and state directory."""

    def __init__(self, world: World, prefix: str = DEFAULT_PREFIX,
                 state_dir: Path | None = None) -> None:
        self.world = world
        self.names = LabNames(check_prefix(prefix))
        self.state_dir = state_dir or self.names.state_dir
        self.responder_pid: int | None = None
        self._up = False

    @property
    def vantage(self) -> str:
        return self.names.vantage

    @property
    def world_ns(self) -> str:
        return self.names.world

    @property
    def tamper_file(self) -> Path:
        return self.state_dir / "dns_tamper.txt"

    def ns(self, ns: str, *args: str, input_text: str | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cmd(["ip", "netns", "exec", ns, *args], input_text=input_text, check=check)

    def nft(self, ns: str, script: str) -> None:
        self.ns(ns, "nft", "-f", "-", input_text=script)

    def resolvers(self) -> list[str]:
        return [n.address(DNS_OCTET) for n in self.world.networks()]

    # -- up ---------------------------------------------------------------------------------
    def up(self) -> None:
        """Build everything; on any failure, remove what was built and raise LabError."""
        require_root()
        for name in (self.vantage, self.world_ns):
            if netns_exists(name):
                raise LabError(f"namespace {name} exists already: another lab with prefix "
                               f"{self.names.prefix!r} is up (`shutdown-monitor lab down "
                               f"--prefix {self.names.prefix}`), or pick another --prefix")
        conflicts = host_conflicts(
            [*self.world.local_nets(),
             ipaddress.IPv4Network(f"{UPLINK_VANTAGE}/{UPLINK_PREFIX_LEN}", strict=False)]
        )
        if conflicts:
            raise LabError("refusing to start: the lab's addresses are routable from the host "
                           "namespace:\n  " + "\n  ".join(conflicts))
        self._up = True
        _LIVE.add(self)
        try:
            self._build()
            self._start_responders()
            self.write_state()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        for name in (self.vantage, self.world_ns):
            run_cmd(["ip", "netns", "add", name])
            # No IPv6 at all: nothing link-local to chatter on the veth.
            for key in ("all", "default"):
                self.ns(name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            self.ns(name, "sysctl", "-qw", "net.ipv4.ip_forward=0")
            self.ns(name, "ip", "link", "set", "lo", "up")
            self.nft(name, guard_ruleset())
        # Both ends are born inside the lab namespaces: no lab interface ever exists on the host.
        run_cmd(["ip", "-n", self.vantage, "link", "add", UPLINK, "type", "veth",
                 "peer", "name", UPLINK, "netns", self.world_ns])
        self.ns(self.vantage, "ip", "addr", "add", f"{UPLINK_VANTAGE}/{UPLINK_PREFIX_LEN}",
                "dev", UPLINK)
        self.ns(self.world_ns, "ip", "addr", "add", f"{UPLINK_WORLD}/{UPLINK_PREFIX_LEN}",
                "dev", UPLINK)
        for name in (self.vantage, self.world_ns):
            self.ns(name, "ip", "link", "set", UPLINK, "up")
        for space in ("10.0.0.0/8", "198.19.0.0/16"):
            self.ns(self.vantage, "ip", "route", "add", space, "via", UPLINK_WORLD)
        for net in self.world.local_nets():
            self.ns(self.world_ns, "ip", "route", "add", "local", str(net), "dev", "lo")
        self.nft(self.world_ns, world_ruleset())
        # Replies to the vantage go through class 1:1 (unlimited); throttled sources are
        # filtered into 1:3, whose rate the scenario sets (queueing adds delay, overflow loss).
        tc = ("tc", "class", "add", "dev", UPLINK, "parent", "1:", "classid")
        self.ns(self.world_ns, "tc", "qdisc", "add", "dev", UPLINK, "root", "handle", "1:",
                "htb", "default", "1", "r2q", "1")
        self.ns(self.world_ns, *tc, "1:1", "htb", "rate", "10gbit", "quantum", "60000")
        self.ns(self.world_ns, *tc, THROTTLE_CLASS, "htb", "rate", "10gbit", "quantum", "60000")
        self.ns(self.world_ns, "tc", "qdisc", "add", "dev", UPLINK, "parent", THROTTLE_CLASS,
                "handle", "30:", "pfifo", "limit", str(THROTTLE_QUEUE))

    def _start_responders(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.tamper_file.write_text("", encoding="ascii")
        log_file = (self.state_dir / "responders.log").open("ab")
        args = ["ip", "netns", "exec", self.world_ns, sys.executable, "-m",
                "monitor.lab.responders", "--tamper-file", str(self.tamper_file),
                "--ready-file", str(self.state_dir / "responders.ready")]
        for address in self.resolvers():
            args += ["--dns", address]
        ready = self.state_dir / "responders.ready"
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        proc = subprocess.Popen(args, stdout=log_file, stderr=log_file, start_new_session=True)
        log_file.close()
        self.responder_pid = proc.pid
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proc.poll() is not None:
                raise LabError("the lab's HTTP/DNS responders did not start: see "
                               f"{self.state_dir / 'responders.log'}")
            if time.monotonic() > deadline:
                raise LabError("the lab's HTTP/DNS responders took more than 20 s to start")
            time.sleep(0.05)

    def write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {"prefix": self.names.prefix, "vantage": self.vantage, "world": self.world_ns,
                 "responder_pid": self.responder_pid, "state_dir": str(self.state_dir),
                 "countries": [c.code for c in self.world.countries],
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    # -- down -------------------------------------------------------------------------------
    def down(self) -> None:
        """Remove everything this lab made. Idempotent; never raises."""
        teardown(self.names, self.responder_pid, self.state_dir)
        self._up = False
        _LIVE.discard(self)

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- observation ------------------------------------------------------------------------
    def counter(self, ns: str, table: str, name: str) -> int:
        done = self.ns(ns, "nft", "-j", "list", "counter", "inet", table, name)
        for item in json.loads(done.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise LabError(f"no counter {name} in {ns}")

    def escaped(self) -> dict[str, int]:
        """Packets each lab namespace tried to send outside the lab ranges (dropped): 0."""
        return {ns: self.counter(ns, GUARD_TABLE, "escaped")
                for ns in (self.vantage, self.world_ns)}

    def interfaces(self, ns: str) -> list[str]:
        links = json.loads(self.ns(ns, "ip", "-j", "link", "show").stdout or "[]")
        return [str(link["ifname"]) for link in links]

    def routes(self, ns: str) -> list[str]:
        routes = json.loads(self.ns(ns, "ip", "-j", "-4", "route", "show").stdout or "[]")
        return [str(r.get("dst")) for r in routes]

    def uplink_bytes(self) -> dict[str, int]:
        """tx bytes of the uplink, per end."""
        result = {}
        for ns in (self.vantage, self.world_ns):
            links = json.loads(self.ns(ns, "ip", "-j", "-s", "link", "show", UPLINK).stdout)
            result[ns] = int(links[0]["stats64"]["tx"]["bytes"])
        return result


def teardown(names: LabNames, responder_pid: int | None, state_dir: Path | None) -> list[str]:
    """Kill the lab's processes (by pid: those in its namespaces, which only the lab starts),
    delete its namespaces (their interfaces, routes, rules and qdiscs go with them) and its
    state directory. Returns what was removed."""
    removed: list[str] = []
    pids: set[int] = set()
    if responder_pid is not None:
        pids.add(responder_pid)
    for ns in (names.vantage, names.world):
        if netns_exists(ns):
            done = run_cmd(["ip", "netns", "pids", ns], check=False)
            pids |= {int(p) for p in done.stdout.split() if p.isdigit()}
    pids.discard(os.getpid())
    for pid in sorted(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    for pid in sorted(pids):
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for ns in (names.vantage, names.world):
        if netns_exists(ns):
            run_cmd(["ip", "netns", "del", ns], check=False)
            removed.append(f"namespace {ns}")
    if state_dir is not None and state_dir.exists() and state_dir.is_relative_to(STATE_ROOT):
        shutil.rmtree(state_dir, ignore_errors=True)
        removed.append(f"state {state_dir}")
    return removed


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lab_state(prefix: str) -> dict[str, Any] | None:
    """What `lab up` recorded for this prefix (None: no lab, or no state file)."""
    path = LabNames(check_prefix(prefix)).state_dir / "state.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def down_by_prefix(prefix: str) -> list[str]:
    """`lab down`: remove the lab with this prefix, from its state file or its names alone."""
    require_root()
    names = LabNames(check_prefix(prefix))
    state = lab_state(prefix) or {}
    pid = state.get("responder_pid")
    return teardown(names, pid if isinstance(pid, int) else None, names.state_dir)


# -- cleanup on every exit path -----------------------------------------------------------------
_LIVE: set[Lab] = set()


def _down_all() -> None:
    for lab in list(_LIVE):
        lab.down()


def install_cleanup() -> None:
    """Tear down every live lab at exit and on SIGTERM/SIGHUP (SIGINT raises KeyboardInterrupt,
    which unwinds through `Lab.__exit__`/finally blocks)."""
    atexit.register(_down_all)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        _down_all()
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signum, on_signal)
