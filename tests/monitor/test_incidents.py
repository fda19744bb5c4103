"""The incident lifecycle: transitions from the detector's successive answers, and restarts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from monitor.errors import StoreError
from monitor.incidents import Event, IncidentLifecycle, vantage_incident

T0 = datetime(2022, 1, 5, 10, 30, tzinfo=UTC)


def incident(
    ident: str = "kz-1",
    severity: str = "warning",
    min_level: float = 0.7,
    end: str | None = None,
    start: str = "2022-01-05T10:30:00Z",
    entity: str = "KZ",
) -> dict[str, Any]:
    return {
        "id": ident, "country": "KZ", "scope": "country", "entity": entity,
        "kind": "nationwide_shutdown", "severity": severity, "start": start, "end": end,
        "min_level": min_level, "score": 1.0, "signals": ["icmp_blocks_up"], "networks": [],
    }


def events(transitions: list[Any]) -> list[str]:
    return [str(t.event) for t in transitions]


def test_open_deepen_raise_close_each_announced_once() -> None:
    life = IncidentLifecycle(deepen_step=0.1)
    assert events(life.observe([incident()], T0)) == ["opened"]
    # Same incident again, nothing new: no transition.
    assert life.observe([incident(min_level=0.65)], T0 + timedelta(minutes=5)) == []
    # Severity raise and a deepening beyond the step: one update naming both.
    [update] = life.observe([incident(severity="critical", min_level=0.05)], T0)
    assert update.event is Event.UPDATED
    assert "warning -> critical" in update.reason and "0.05" in update.reason
    assert life.open_incidents()[0]["severity"] == "critical"
    [closed] = life.observe([incident(severity="critical", end="2022-01-11T02:15:00Z")], T0)
    assert closed.event is Event.CLOSED
    assert life.open_incidents() == []
    assert [i["id"] for i in life.recent_incidents()] == ["kz-1"]
    # Seen closed again: silence.
    assert life.observe([incident(severity="critical", end="2022-01-11T02:15:00Z")], T0) == []


def test_severity_lowering_is_not_an_update() -> None:
    life = IncidentLifecycle()
    life.observe([incident(severity="critical", min_level=0.1)], T0)
    assert life.observe([incident(severity="warning", min_level=0.3)], T0) == []


def test_flap_merged_by_detector_becomes_merged_not_closed() -> None:
    life = IncidentLifecycle()
    life.observe([incident("a")], T0)
    life.observe([incident("a"), incident("b", start="2022-01-05T12:00:00Z")], T0)
    # The detector now reports one incident "a" that swallowed "b".
    [merged] = life.observe([incident("a")], T0 + timedelta(hours=2))
    assert merged.event is Event.MERGED and merged.incident["id"] == "b"
    assert "merged into a" in merged.reason
    assert [i["id"] for i in life.recent_incidents()] == ["a"]


def test_incomplete_reports_do_not_close_absent_incidents() -> None:
    life = IncidentLifecycle()
    life.observe([incident("a")], T0)
    assert life.observe([], T0, complete=False) == []
    [closed] = life.observe([], T0 + timedelta(hours=1), complete=True)
    assert closed.event is Event.CLOSED and closed.incident["end"] == "2022-01-05T11:30:00Z"


def test_reopened_incident_is_announced_again() -> None:
    life = IncidentLifecycle()
    life.observe([incident(end="2022-01-05T11:00:00Z")], T0)
    [again] = life.observe([incident()], T0 + timedelta(hours=1))
    assert again.event is Event.OPENED


def test_restart_restores_state_and_does_not_announce_twice() -> None:
    life = IncidentLifecycle()
    life.observe([incident(severity="critical", min_level=0.05)], T0)
    saved = json.loads(json.dumps(life.to_json()))  # through JSON, as the store keeps it
    restarted = IncidentLifecycle()
    restarted.restore(saved)
    assert restarted.observe([incident(severity="critical", min_level=0.05)], T0) == []
    assert restarted.open_incidents()[0]["id"] == "kz-1"
    tracked = restarted.get("kz-1")
    assert tracked is not None and tracked.events == ["opened"]


def test_old_closed_incidents_from_history_are_not_announced_and_are_forgotten() -> None:
    life = IncidentLifecycle(keep_closed=timedelta(days=7))
    old = incident(end="2021-12-01T00:00:00Z", start="2021-11-30T00:00:00Z")
    assert life.observe([old], T0) == []
    assert life.recent_incidents() == []


def test_bad_incident_and_bad_state_are_clear_errors() -> None:
    life = IncidentLifecycle()
    with pytest.raises(ValueError, match="without 'severity'"):
        life.observe([{k: v for k, v in incident().items() if k != "severity"}], T0)
    with pytest.raises(ValueError, match="severity 'huge'"):
        life.observe([incident(severity="huge")], T0)
    with pytest.raises(StoreError, match="expected version 1"):
        life.restore({"tracked": {}})
    with pytest.raises(StoreError, match="incident x"):
        life.restore({"version": 1, "tracked": {"x": {"incident": {"id": "x"}}}})


def test_vantage_incident_is_never_a_country() -> None:
    data = vantage_incident("ams1", T0, None)
    life = IncidentLifecycle()
    [opened] = life.observe([data], T0)
    assert opened.incident["kind"] == "vantage_offline"
    assert opened.incident["scope"] == "vantage" and opened.incident["country"] == "ZZ"


def test_a_new_id_for_the_same_open_incident_is_a_continuation_not_a_new_alert() -> None:
    # After a restart the detector, primed with less history than a month-long shutdown,
    # reports it from a later start (so under another stable id).
    life = IncidentLifecycle()
    life.observe([incident("first", severity="critical", min_level=0.05)], T0)
    restarted = IncidentLifecycle()
    restarted.restore(json.loads(json.dumps(life.to_json())))
    later = incident("second", severity="critical", min_level=0.05,
                     start="2022-01-20T00:00:00Z")
    assert restarted.observe([later], T0 + timedelta(days=20)) == []
    [shown] = restarted.recent_incidents()
    assert shown["id"] == "first" and shown["start"] == "2022-01-05T10:30:00Z"
    # Its later reports keep mapping onto the first id, across another restart too.
    again = IncidentLifecycle()
    again.restore(json.loads(json.dumps(restarted.to_json())))
    ended = {**later, "end": "2022-02-01T00:00:00Z"}
    [closed] = again.observe([ended], T0 + timedelta(days=27))
    assert closed.event is Event.CLOSED and closed.incident["id"] == "first"
    assert closed.incident["start"] == "2022-01-05T10:30:00Z"


def test_a_different_kind_at_the_same_place_is_not_a_continuation() -> None:
    life = IncidentLifecycle()
    life.observe([incident("a")], T0)
    other = {**incident("b"), "kind": "service_block"}
    opened, folded = life.observe([other], T0)
    assert (opened.event, opened.incident["id"]) == (Event.OPENED, "b")
    assert (folded.event, folded.incident["id"]) == (Event.MERGED, "a")
