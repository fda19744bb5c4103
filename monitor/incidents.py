"""Incident lifecycle: which incidents are open, what changed since the last round, what was sent.

The detector decides what is an incident (and merges flaps into one); this module turns its
successive answers into transitions -- opened, updated (deeper or more severe), merged, closed --
and remembers which transitions were announced, so that a restart does not alert twice. The state
is plain JSON (DESIGN's incident shape plus bookkeeping) so the history store can keep it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from monitor.errors import StoreError

SEVERITY_RANK: Final = {"warning": 1, "critical": 2}
KIND_VANTAGE_OFFLINE: Final = "vantage_offline"
REQUIRED_KEYS: Final = ("id", "country", "scope", "entity", "kind", "severity", "start")


class Event(enum.StrEnum):
    OPENED = "opened"
    UPDATED = "updated"  # deeper min_level or a higher severity than last announced
    MERGED = "merged"  # the detector folded this incident into another one (a flap)
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Transition:
    """One change worth telling the sinks about. `incident` is DESIGN's incident JSON."""

    event: Event
    incident: dict[str, Any]
    at: datetime
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "event": str(self.event),
            "at": format_time(self.at),
            "reason": self.reason,
            "incident": self.incident,
        }


@dataclass(slots=True)
class Tracked:
    """What the lifecycle knows about one incident id."""

    incident: dict[str, Any]
    announced_severity: str
    announced_min_level: float
    closed: bool = False
    merged_into: str | None = None
    events: list[str] = field(default_factory=list)  # events emitted, in order

    def to_json(self) -> dict[str, Any]:
        return {
            "incident": self.incident,
            "announced_severity": self.announced_severity,
            "announced_min_level": self.announced_min_level,
            "closed": self.closed,
            "merged_into": self.merged_into,
            "events": self.events,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tracked:
        return cls(
            incident=dict(data["incident"]),
            announced_severity=str(data["announced_severity"]),
            announced_min_level=float(data["announced_min_level"]),
            closed=bool(data["closed"]),
            merged_into=data.get("merged_into"),
            events=[str(e) for e in data.get("events", [])],
        )


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def check_incident(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an incident JSON object, or ValueError naming the missing or wrong key."""
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"incident without {key!r}: {dict(data)!r}")
    if data["severity"] not in SEVERITY_RANK:
        raise ValueError(f"incident {data['id']}: severity {data['severity']!r}, expected "
                         f"one of {sorted(SEVERITY_RANK)}")
    parse_time(str(data["start"]))
    if data.get("end") is not None:
        parse_time(str(data["end"]))
    return dict(data)


def _same_place(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a[k] == b[k] for k in ("country", "scope", "entity"))


class IncidentLifecycle:
    """Tracks incidents across rounds and restarts.

    `observe(incidents, now, complete=...)` takes the detector's current incidents (open and
    recently closed, as incident JSON) and returns the transitions since the previous call.
    With `complete=True` the list is everything the detector knows, so an open incident missing
    from it was merged into another (same place) or dropped; with `complete=False` (the detector
    reports only what changed) absence means nothing.
    """

    def __init__(self, deepen_step: float = 0.1, keep_closed: timedelta = timedelta(days=7)):
        self.deepen_step = deepen_step
        self.keep_closed = keep_closed
        self._tracked: dict[str, Tracked] = {}
        self._aliases: dict[str, str] = {}  # a later id of an incident -> its first id

    # -- queries ---------------------------------------------------------------------------
    def open_incidents(self) -> list[dict[str, Any]]:
        return [t.incident for t in self._tracked.values() if not t.closed]

    def recent_incidents(self) -> list[dict[str, Any]]:
        """Open first, then closed (newest first); merged ones are left out (their survivor
        carries them)."""
        opened = sorted(self.open_incidents(), key=lambda i: str(i["start"]))
        closed = [t.incident for t in self._tracked.values() if t.closed and not t.merged_into]
        closed.sort(key=lambda i: str(i.get("end") or ""), reverse=True)
        return opened + closed

    def get(self, incident_id: str) -> Tracked | None:
        return self._tracked.get(incident_id)

    # -- the transitions -------------------------------------------------------------------
    def observe(
        self, incidents: Iterable[Mapping[str, Any]], now: datetime, complete: bool = True
    ) -> list[Transition]:
        seen: dict[str, dict[str, Any]] = {}
        for raw in incidents:
            incident = self._aliased(check_incident(raw))
            seen[str(incident["id"])] = incident
        if complete:
            seen = self._continuations(seen)
        transitions: list[Transition] = []
        for incident_id, incident in seen.items():
            transitions.extend(self._observe_one(incident_id, incident, now))
        if complete:
            transitions.extend(self._missing(seen, now))
        self._forget_old(now)
        return transitions

    def _aliased(self, incident: dict[str, Any]) -> dict[str, Any]:
        """The incident under the id it was first announced with (see `_continuations`)."""
        first_id = self._aliases.get(str(incident["id"]))
        tracked = self._tracked.get(first_id) if first_id is not None else None
        if tracked is None:
            return incident
        start = min(str(incident["start"]), str(tracked.incident["start"]))
        return {**incident, "id": first_id, "start": start}

    def _continuations(self, seen: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """A new id at the same place and of the same kind as an open incident the detector no
        longer reports is the same incident under another id, e.g. after a restart primed the
        detector with less history than the incident is long. It keeps its first id and start,
        so nobody is alerted twice."""
        vanished = [
            (incident_id, t) for incident_id, t in self._tracked.items()
            if not t.closed and incident_id not in seen
        ]
        if not vanished:
            return seen
        out: dict[str, dict[str, Any]] = {}
        for incident_id, incident in seen.items():
            if incident_id not in self._tracked:
                match = next(
                    (pair for pair in vanished
                     if _same_place(pair[1].incident, incident)
                     and pair[1].incident["kind"] == incident["kind"]),
                    None,
                )
                if match is not None:
                    vanished.remove(match)
                    self._aliases[incident_id] = match[0]
                    incident = self._aliased(incident)
                    incident_id = match[0]
            out[incident_id] = incident
        return out

    def _observe_one(
        self, incident_id: str, incident: dict[str, Any], now: datetime
    ) -> list[Transition]:
        tracked = self._tracked.get(incident_id)
        ended = incident.get("end") is not None
        if tracked is None:
            tracked = Tracked(
                incident=incident,
                announced_severity=str(incident["severity"]),
                announced_min_level=float(incident.get("min_level", 1.0)),
            )
            self._tracked[incident_id] = tracked
            if ended and parse_time(str(incident["end"])) + self.keep_closed < now:
                tracked.closed = True  # old news (e.g. primed from history): never announced
                return []
            out = [self._emit(tracked, Event.OPENED, now)]
            if ended:
                tracked.closed = True
                out.append(self._emit(tracked, Event.CLOSED, now, "ended within one round"))
            return out
        tracked.incident = incident
        if tracked.closed:
            if ended:
                return []
            # The detector reopened it (a flap merged back): announce as opened again.
            tracked.closed = False
            tracked.merged_into = None
            tracked.announced_severity = str(incident["severity"])
            tracked.announced_min_level = float(incident.get("min_level", 1.0))
            return [self._emit(tracked, Event.OPENED, now, "reopened after a short recovery")]
        out = []
        reasons = []
        severity = str(incident["severity"])
        if SEVERITY_RANK[severity] > SEVERITY_RANK[tracked.announced_severity]:
            reasons.append(f"severity {tracked.announced_severity} -> {severity}")
            tracked.announced_severity = severity
        min_level = float(incident.get("min_level", tracked.announced_min_level))
        if min_level <= tracked.announced_min_level - self.deepen_step:
            reasons.append(f"min_level {tracked.announced_min_level:.2f} -> {min_level:.2f}")
            tracked.announced_min_level = min_level
        if reasons:
            out.append(self._emit(tracked, Event.UPDATED, now, "; ".join(reasons)))
        if ended:
            tracked.closed = True
            out.append(self._emit(tracked, Event.CLOSED, now))
        return out

    def _missing(self, seen: Mapping[str, dict[str, Any]], now: datetime) -> list[Transition]:
        out = []
        for incident_id, tracked in self._tracked.items():
            if tracked.closed or incident_id in seen:
                continue
            survivor = next(
                (i for i in seen.values() if _same_place(i, tracked.incident)
                 and str(i["start"]) <= str(tracked.incident["start"])),
                None,
            )
            tracked.closed = True
            if survivor is not None:
                tracked.merged_into = str(survivor["id"])
                out.append(self._emit(tracked, Event.MERGED, now, f"merged into {survivor['id']}"))
            else:
                tracked.incident = {**tracked.incident, "end": format_time(now)}
                out.append(self._emit(tracked, Event.CLOSED, now, "no longer reported"))
        return out

    def _emit(self, tracked: Tracked, event: Event, now: datetime, reason: str = "") -> Transition:
        tracked.events.append(str(event))
        return Transition(event=event, incident=dict(tracked.incident), at=now, reason=reason)

    def _forget_old(self, now: datetime) -> None:
        stale = [
            incident_id
            for incident_id, t in self._tracked.items()
            if t.closed
            and t.incident.get("end") is not None
            and parse_time(str(t.incident["end"])) + self.keep_closed < now
        ]
        for incident_id in stale:
            del self._tracked[incident_id]
        self._aliases = {k: v for k, v in self._aliases.items() if v in self._tracked}

    # -- persistence -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "tracked": {k: t.to_json() for k, t in self._tracked.items()},
            "aliases": dict(self._aliases),
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Load a `to_json()` snapshot; raises StoreError naming what is wrong."""
        if data.get("version") != 1 or not isinstance(data.get("tracked"), Mapping):
            raise StoreError(f"incident lifecycle state: expected version 1, got {data!r:.200}")
        tracked: dict[str, Tracked] = {}
        for incident_id, item in data["tracked"].items():
            try:
                check_incident(item["incident"])
                tracked[str(incident_id)] = Tracked.from_json(item)
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreError(
                    f"incident lifecycle state: incident {incident_id}: {exc}"
                ) from exc
        aliases = data.get("aliases", {})
        if not isinstance(aliases, Mapping):
            raise StoreError(f"incident lifecycle state: aliases: expected a mapping, got "
                             f"{aliases!r:.200}")
        self._tracked = tracked
        self._aliases = {str(k): str(v) for k, v in aliases.items() if str(v) in tracked}


def vantage_incident(vantage: str, since: datetime, end: datetime | None) -> dict[str, Any]:
    """The incident the daemon raises itself when its control targets fail: never a country."""
    return {
        "id": f"vantage-{vantage}-{format_time(since)}",
        "country": "ZZ",
        "scope": "vantage",
        "entity": vantage,
        "kind": KIND_VANTAGE_OFFLINE,
        "severity": "critical",
        "start": format_time(since),
        "end": None if end is None else format_time(end),
        "min_level": 0.0,
        "score": 0.0,
        "signals": ["vantage_up"],
        "networks": [],
    }
