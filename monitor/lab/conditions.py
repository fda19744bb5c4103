"""What the lab's world looks like at one instant, and how that is put into the namespaces.

`Conditions` is a value: which blocks are cut (shutdown), which are dark for the night (churn),
which get TCP RSTs on 80/443, which resolvers lie, which networks are throttled (random loss of
probes, and a low rate for their replies) and whether the vantage's uplink carries anything.
`Applier.apply` changes the namespaces only where the conditions changed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from monitor.lab.topology import THROTTLE_CLASS, UPLINK, WORLD_TABLE, Lab
from monitor.lab.world import UPLINK_VANTAGE, World


@dataclass(frozen=True, slots=True)
class Throttle:
    loss_pct: float  # probes dropped at random on the way in
    rate_kbit: float  # the replies' bandwidth: queueing under it is the added delay


@dataclass(frozen=True)
class Conditions:
    cut: frozenset[int] = frozenset()  # lab /24 blocks (block ints) that are silent
    churn: frozenset[int] = frozenset()  # blocks dark for the night
    http_blocked: frozenset[int] = frozenset()  # blocks whose 80/443 answer with RST
    dns_tampered: frozenset[str] = frozenset()  # resolver addresses that lie
    throttled: tuple[ipaddress.IPv4Network, ...] = ()  # networks under `throttle`
    throttle: Throttle | None = None
    uplink_up: bool = True
    notes: tuple[str, ...] = field(default=(), compare=False)


def _fraction(block: int, salt: str) -> float:
    digest = hashlib.blake2b(block.to_bytes(4, "big"), digest_size=8, key=salt.encode())
    return int.from_bytes(digest.digest(), "big") / 2**64


def pick(blocks: Iterable[int], share: float, salt: str) -> set[int]:
    """A stable `share` of the blocks: the same blocks stay picked as the share grows."""
    return {b for b in blocks if _fraction(b, salt) < share}


def night_share(local_hour: float, base: float, amplitude: float) -> float:
    """Share of end-user blocks dark at a local hour: lowest at 16:00, highest at 04:00."""
    return base + amplitude * (1 + math.cos(2 * math.pi * (local_hour - 4) / 24)) / 2


def churn_at(world: World, when: datetime, base: float = 0.02, amplitude: float = 0.10,
             step_s: int = 3600) -> frozenset[int]:
    """Diurnal churn: which blocks are dark now. Changes once per `step_s` of lab time, with a
    new draw per day so the same blocks are not dark every night."""
    stamp = int(when.timestamp()) // step_s * step_s
    dark: set[int] = set()
    for country in world.countries:
        local_hour = ((stamp / 3600) + country.utc_offset_h) % 24
        day = int((stamp + country.utc_offset_h * 3600) // 86400)
        for net in country.networks:
            scale = 0.3 if net.kind == "data-centre" else 1.0  # servers sleep less
            share = night_share(local_hour, base, amplitude) * scale
            # The first block holds the network's web server and resolver: servers stay up.
            dark |= pick(net.blocks[1:], share, f"churn:{day}")
    return frozenset(dark)


def ranges(blocks: Iterable[int]) -> list[str]:
    """Blocks as few nft interval elements (CIDRs)."""
    nets = (ipaddress.IPv4Network((b << 8, 24)) for b in sorted(set(blocks)))
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


class Applier:
    """Puts Conditions into a lab's namespaces, changing only what differs from the last."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.current = Conditions()
        self.changes = 0

    def apply(self, new: Conditions) -> None:
        old = self.current
        script: list[str] = []
        for name, before, after in (("cut", old.cut, new.cut), ("churn", old.churn, new.churn),
                                    ("http_block", old.http_blocked, new.http_blocked)):
            if before != after:
                script.append(f"flush set inet {WORLD_TABLE} {name}")
                elements = ranges(after)
                if elements:
                    script.append(f"add element inet {WORLD_TABLE} {name} "
                                  f"{{ {', '.join(elements)} }}")
        if old.uplink_up != new.uplink_up:
            verb = "add" if not new.uplink_up else "delete"
            script.append(f"{verb} element inet {WORLD_TABLE} uplink_cut {{ {UPLINK_VANTAGE} }}")
        if script:
            self.lab.nft(self.lab.world_ns, "\n".join(script) + "\n")
        if old.dns_tampered != new.dns_tampered:
            path = self.lab.tamper_file
            staging = path.with_suffix(".new")
            staging.write_text("".join(f"{a}\n" for a in sorted(new.dns_tampered)))
            os.replace(staging, path)
        if (old.throttled, old.throttle) != (new.throttled, new.throttle):
            self._throttle(new)
        if script or old != new:
            self.changes += 1
        self.current = new

    def _throttle(self, new: Conditions) -> None:
        ns = self.lab.world_ns
        throttle = new.throttle if new.throttled else None
        script = [f"flush set inet {WORLD_TABLE} throttled",
                  f"flush chain inet {WORLD_TABLE} throttle"]
        if throttle is not None:
            script.append(f"add element inet {WORLD_TABLE} throttled "
                          f"{{ {', '.join(str(n) for n in new.throttled)} }}")
            if throttle.loss_pct > 0:
                script.append(f"add rule inet {WORLD_TABLE} throttle "
                              f"numgen random mod 1000 < {round(throttle.loss_pct * 10)} drop")
        self.lab.nft(ns, "\n".join(script) + "\n")
        self.lab.ns(ns, "tc", "filter", "del", "dev", UPLINK, "parent", "1:", "prio", "1",
                    check=False)
        rate = f"{throttle.rate_kbit}kbit" if throttle is not None else "10gbit"
        self.lab.ns(ns, "tc", "class", "change", "dev", UPLINK, "parent", "1:", "classid",
                    THROTTLE_CLASS, "htb", "rate", rate, "ceil", rate, "quantum", "1514")
        if throttle is None:
            return
        for net in new.throttled:
            self.lab.ns(ns, "tc", "filter", "add", "dev", UPLINK, "parent", "1:", "protocol",
                        "ip", "prio", "1", "u32", "match", "ip", "src", str(net),
                        "flowid", THROTTLE_CLASS)
