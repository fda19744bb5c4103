"""The long-running daemon: rounds -> history, metrics, detector -> incidents -> API and sinks.

One asyncio loop does everything. Rounds run at aligned instants of the injected clock (lab time
in the lab, where rounds run back to back). SIGTERM/SIGINT stop it: a round in flight gets
`stop_grace_s` to finish, then it is abandoned (its partial points are not stored); state is
flushed and `run()` returns 0 well within 10 s. SIGHUP reloads the configuration between rounds;
a bad file is logged, counted, and the running configuration stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

from monitor.api import ApiServer
from monitor.clock import Clock, next_round_time, parse_utc
from monitor.config import Config, load_config
from monitor.detect import DetectorConfig, LiveDetector
from monitor.errors import ConfigError, MonitorError, StoreError
from monitor.export import MetricsState, make_registry, render_metrics
from monitor.history import HistoryStore
from monitor.incidents import (
    KIND_VANTAGE_OFFLINE,
    IncidentLifecycle,
    Transition,
    format_time,
    vantage_incident,
)
from monitor.remote_write import RemoteWriteCollector, RemoteWriter, start_writers
from monitor.round_driver import ConfiguredRoundDriver
from monitor.rounds import RoundOutcome
from monitor.series import SIGNAL_VANTAGE_UP, SeriesPoint
from monitor.sinks import AlertmanagerSink, WebhookSink
from probes.base import ProbeSetupError

log = logging.getLogger(__name__)

STATE_LIFECYCLE: Final = "daemon.incident_lifecycle"
STATE_WEBHOOK_PENDING: Final = "daemon.webhook_pending"
STATE_VANTAGE: Final = "daemon.vantage"
STATE_LAST_ROUND: Final = "daemon.last_round_time"
PRUNE_EVERY: Final = timedelta(hours=6)


class RoundDriver(Protocol):
    """Runs one round of the configured universe. Cancellation must stop it promptly."""

    async def run(self, now: datetime) -> RoundOutcome: ...

    def checkpoint(self) -> None:
        """Persist what the driver learned (hitlists), so a driver built next starts from it."""

    async def close(self) -> None: ...


class RoundDriverFactory(Protocol):
    """Builds the driver for a config (at start and at every reload); monitor/round_driver.py's
    `ConfiguredRoundDriver` by default."""

    def __call__(self, config: Config, shard: tuple[int, int] | None) -> RoundDriver: ...


@dataclass(slots=True)
class VantageState:
    up: bool = True
    since: datetime | None = None  # when the current state began (None: since start)
    control_up: int = 0
    control_total: int = 0
    incident: dict[str, Any] | None = None  # raised by the daemon if the detector did not

    def to_json(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "since": None if self.since is None else format_time(self.since),
            "control_up": self.control_up,
            "control_total": self.control_total,
            "incident": self.incident,
        }


@dataclass(slots=True)
class RoundRecord:
    """What the API shows of the last completed round."""

    number: int = 0
    time: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float = 0.0
    abandoned: int = 0
    outcome: RoundOutcome | None = None
    levels: list[tuple[str, str, str, str, float]] = field(default_factory=list)


class Daemon:
    """Wires one vantage together. `run()` returns the exit status (0 on a clean stop)."""

    def __init__(
        self,
        config: Config,
        clock: Clock,
        *,
        config_path: str | Path | None = None,
        listen: str | None = None,
        shard: tuple[int, int] | None = None,
        max_rounds: int | None = None,
        stop_grace_s: float = 5.0,
        round_driver_factory: RoundDriverFactory | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.config_path = Path(config_path) if config_path is not None else None
        self.listen = listen or config.listen
        self.shard_override = shard  # --shard wins over the file's `shard`, also on reload
        if shard is not None:
            config = dataclasses.replace(config, shard=shard)
        self.config = config
        self.max_rounds = max_rounds
        self.stop_grace_s = stop_grace_s
        self._driver_factory = round_driver_factory or ConfiguredRoundDriver
        self.metrics = MetricsState()
        self._registry = make_registry(self.metrics)
        self._remote: list[RemoteWriter] = []
        self._registry.register(RemoteWriteCollector(lambda: self._remote))
        self.lifecycle = IncidentLifecycle()
        self.vantage = VantageState()
        self.last = RoundRecord()
        self.started_at = clock.now()
        self.reload_errors = 0
        self.last_reload_error: str | None = None
        self.api: ApiServer | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # stop or reload requested: interrupt the wait
        self._reload_requested = False
        self._store: HistoryStore | None = None
        self._detector: LiveDetector | None = None
        self._driver: RoundDriver | None = None
        self._webhook: WebhookSink | None = None
        self._alertmanager: AlertmanagerSink | None = None
        self._last_prune: datetime | None = None
        self._last_round_time: datetime | None = None
        self._restored_webhook: list[dict[str, Any]] = []

    # -- signals ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.warning("stop requested: finishing up")
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        log.warning("reload requested (SIGHUP)")
        self._reload_requested = True
        self._wake.set()

    def _install_signal_handlers(self) -> list[signal.Signals]:
        loop = asyncio.get_running_loop()
        installed = []
        for signum, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.request_reload),
        ):
            try:
                loop.add_signal_handler(signum, handler)
                installed.append(signum)
            except (RuntimeError, ValueError):
                # Not the main thread (tests run daemons in threads): signals are not ours.
                pass
        return installed

    # -- the main loop ---------------------------------------------------------------------
    async def run(self) -> int:
        installed = self._install_signal_handlers()
        try:
            await self._start()
            await self._loop()
        finally:
            await self._shutdown()
            loop = asyncio.get_running_loop()
            for signum in installed:
                loop.remove_signal_handler(signum)
        return 0

    async def _start(self) -> None:
        self._open_store()
        self._restore_state()
        self._detector = self._make_detector(self.config)
        self._prime_detector()
        self._driver = self._driver_factory(self.config, self.config.shard)
        # The configuration in force loaded fine: say so, as a later good SIGHUP would.
        self.metrics.record_reload(True)
        await self._start_sinks(self.config)
        self._remote = await start_writers(self.config, self.listen)
        self.api = ApiServer(self, self.listen)
        await self.api.start()
        log.warning(
            "shutdown-monitor running: vantage %s, %d s rounds, API on %s:%d",
            self.config.vantage_name, self.config.interval_s, self.api.host, self.api.port,
        )

    async def _loop(self) -> None:
        interval = float(self.config.interval_s)
        due: datetime | None = None
        if self._last_round_time is not None:
            # Never measure the same instant twice across a restart (lab time restarts there).
            due = max(next_round_time(self.clock.now(), interval),
                      self._last_round_time + timedelta(seconds=interval))
        rounds = 0
        while not self._stop.is_set():
            if self.max_rounds is not None and rounds >= self.max_rounds:
                break
            now = self.clock.now()
            due = next_round_time(now, interval) if due is None else due
            if due < now - timedelta(seconds=interval):
                skipped = due
                due = next_round_time(now, interval)
                log.warning("rounds fell behind: skipping from %s to %s", skipped, due)
            await self._wait_until(due)
            if self._reload_requested:
                self._reload_requested = False
                await self._reload()
                interval = float(self.config.interval_s)
            if self._stop.is_set():
                break
            if self.clock.now() < due:
                continue  # woken early by a reload: wait again
            await self._one_round(due)
            rounds += 1
            due = due + timedelta(seconds=interval)

    async def _wait_until(self, when: datetime) -> None:
        self._wake.clear()
        sleeper = asyncio.ensure_future(self.clock.sleep_until(when))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _one_round(self, when: datetime) -> None:
        assert self._driver is not None
        task = asyncio.ensure_future(self._driver.run(when))
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                # SIGTERM mid-round: a short grace to finish, then abandon it.
                await asyncio.wait({task}, timeout=self.stop_grace_s)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self._abandoned(when)
                return
        finally:
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
        try:
            outcome = task.result()
        except asyncio.CancelledError:
            self._abandoned(when)
            return
        except Exception:
            # A bug in a round must not kill a monitor that runs for months: log and go on.
            log.exception("round at %s failed", format_time(when))
            return
        if outcome.abandoned:
            self._abandoned(when, outcome)
            return
        try:
            self._after_round(outcome)
        except Exception:
            # Same reasoning: keep monitoring, and say loudly what broke.
            log.exception("processing the round at %s failed", format_time(when))

    def _abandoned(self, when: datetime, outcome: RoundOutcome | None = None) -> None:
        self.last.abandoned += 1
        self.metrics.record_round(outcome or RoundOutcome(time=when, duration_s=0.0,
                                                          abandoned=True))
        log.warning("round at %s abandoned on stop: its partial points are not stored",
                    format_time(when))

    # -- after each round ------------------------------------------------------------------
    def _after_round(self, outcome: RoundOutcome) -> None:
        now = outcome.time
        self.metrics.record_round(outcome)
        self._update_vantage(outcome)
        self._store_points(outcome.points)
        incidents = self._detect(outcome)
        try:
            transitions = self.lifecycle.observe(incidents, now, complete=True)
        except ValueError as exc:
            self.metrics.record_malformed("detector")
            log.error("detector returned a malformed incident, round not judged: %s", exc)
            transitions = []
        self._announce(transitions)
        self._persist(transitions)
        open_incidents = self.lifecycle.open_incidents()
        self.metrics.set_active_incidents(open_incidents)
        levels = self._detector.levels() if self._detector is not None else []
        self.metrics.set_levels(levels)
        self.last = RoundRecord(
            number=self.last.number + 1,
            time=outcome.time,
            finished_at=self.clock.now(),
            duration_s=outcome.duration_s,
            abandoned=self.last.abandoned,
            outcome=outcome,
            levels=list(levels),
        )
        self._housekeeping(now)
        for writer in self._remote:
            # Stamped with the round's time: every destination sees one sample per round.
            writer.enqueue_registry(self._registry, now.timestamp())

    def _update_vantage(self, outcome: RoundOutcome) -> None:
        state = self.vantage
        state.control_up, state.control_total = outcome.control_up, outcome.control_total
        if outcome.vantage_up != state.up:
            state.up = outcome.vantage_up
            state.since = outcome.time
            if state.up:
                log.warning("vantage back online at %s", format_time(outcome.time))
            else:
                log.warning(
                    "vantage OFFLINE at %s: %d of %d control targets answered; country "
                    "measurements are not trusted until it is back",
                    format_time(outcome.time), outcome.control_up, outcome.control_total,
                )

    def _store_points(self, points: list[SeriesPoint]) -> None:
        if self._store is None:
            return
        try:
            self._store.append_points(points)
            self._store.flush()
        except StoreError as exc:
            self.metrics.record_history_write_error()
            log.error("history: %s", exc)

    def _detect(self, outcome: RoundOutcome) -> list[dict[str, Any]]:
        """The detector's incidents as JSON, with the daemon's own vantage guard on top."""
        found: list[dict[str, Any]] = []
        if self._detector is not None:
            try:
                found = [i.to_json() for i in self._detector.update(outcome.points, outcome.time)]
            except Exception:
                log.exception("detector failed on the round at %s", format_time(outcome.time))
                # Keep what is open as it is rather than closing everything.
                found = [dict(i) for i in self.lifecycle.open_incidents()]
        return self._vantage_guard(found, outcome)

    def _vantage_guard(
        self, found: list[dict[str, Any]], outcome: RoundOutcome
    ) -> list[dict[str, Any]]:
        """The vantage self-check has the last word on the vantage.

        With control targets configured, the daemon owns `vantage_offline` incidents (one per
        outage, from the first failed round; the detector's own, which needs several bins, is
        left out so the outage is not announced twice). Without control targets the detector's
        fallback is all there is, and passes through. While the vantage is offline, no new
        country incident is let through, whatever the detector says.
        """
        state = self.vantage
        if outcome.control_total > 0:
            found = [i for i in found if i["kind"] != KIND_VANTAGE_OFFLINE]
            if not state.up:
                if state.incident is None:
                    state.incident = vantage_incident(
                        self.config.vantage_name, state.since or outcome.time, None
                    )
                found.append(state.incident)
            elif state.incident is not None:
                found.append({**state.incident, "end": format_time(outcome.time)})
                state.incident = None
        vantage_down = not state.up or any(
            i["kind"] == KIND_VANTAGE_OFFLINE and i.get("end") is None for i in found
        )
        if vantage_down:
            # Never open a country incident from a round the vantage could not trust.
            found = [
                i for i in found
                if i["kind"] == KIND_VANTAGE_OFFLINE or self.lifecycle.get(str(i["id"]))
            ]
        return found

    def _announce(self, transitions: list[Transition]) -> None:
        for transition in transitions:
            incident = transition.incident
            log.warning(
                "incident %s: %s %s %s/%s severity %s, level %s since %s%s",
                transition.event, incident["kind"], incident["country"], incident["scope"],
                incident["entity"], incident["severity"], incident.get("min_level"),
                incident["start"], f" ({transition.reason})" if transition.reason else "",
            )
            if self._webhook is not None:
                self._webhook.submit(transition)
        if self._alertmanager is not None:
            self._alertmanager.submit_round(self.lifecycle.open_incidents(), transitions)

    def _persist(self, transitions: Iterable[Transition]) -> None:
        if self._store is None:
            return
        try:
            changed = {str(t.incident["id"]): t.incident for t in transitions}
            for incident in self.lifecycle.open_incidents():
                changed[str(incident["id"])] = incident
            if changed:
                self._store.save_incidents(changed.values())
            self._save_state()
        except StoreError as exc:
            log.error("history: %s", exc)

    def _save_state(self) -> None:
        assert self._store is not None
        pending = self._webhook.pending() if self._webhook is not None else []
        state = {
            STATE_LIFECYCLE: json.dumps(self.lifecycle.to_json()),
            STATE_VANTAGE: json.dumps(self.vantage.to_json()),
            STATE_WEBHOOK_PENDING: json.dumps(pending),
        }
        if self.last.time is not None:
            state[STATE_LAST_ROUND] = format_time(self.last.time)
        self._store.set_states(state)

    def _housekeeping(self, now: datetime) -> None:
        if self._store is None:
            return
        try:
            if self._last_prune is None or now - self._last_prune >= PRUNE_EVERY:
                self._last_prune = now
                removed = self._store.prune(now)
                if removed:
                    log.info("history: pruned %d points past the retention", removed)
            self.metrics.set_history_bytes(self._store.size_bytes())
        except StoreError as exc:
            log.error("history: %s", exc)

    # -- start, reload, stop ---------------------------------------------------------------
    def _open_store(self) -> None:
        history = self.config.history
        try:
            # A first start with the shipped config: its var/ directory does not exist yet.
            Path(history.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{history.path}: cannot create its directory: {exc}") from exc
        self._store = HistoryStore(history.path, history.retention_days)

    def _restore_state(self) -> None:
        assert self._store is not None
        raw = self._store.get_state(STATE_LIFECYCLE)
        if raw is not None:
            try:
                self.lifecycle.restore(json.loads(raw))
            except (json.JSONDecodeError, StoreError) as exc:
                # Better to alert again than to lose track silently: start fresh, say so.
                log.error("history: incident state unreadable, starting fresh: %s", exc)
                self.metrics.record_malformed("state")
        raw = self._store.get_state(STATE_VANTAGE)
        if raw is not None:
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                data = json.loads(raw)
                self.vantage.up = bool(data["up"])
                since = data.get("since")
                self.vantage.since = None if since is None else parse_utc(since)
                self.vantage.incident = data.get("incident")
        raw = self._store.get_state(STATE_LAST_ROUND)
        if raw is not None:
            with contextlib.suppress(ValueError):
                self._last_round_time = parse_utc(raw)
        raw = self._store.get_state(STATE_WEBHOOK_PENDING)
        if raw is not None:
            with contextlib.suppress(json.JSONDecodeError):
                loaded = json.loads(raw)
                if isinstance(loaded, list):
                    self._restored_webhook = [p for p in loaded if isinstance(p, dict)]
        open_now = self.lifecycle.open_incidents()
        if open_now:
            log.warning("restored %d open incident(s) from history", len(open_now))
        self.metrics.set_active_incidents(open_now)

    def _make_detector(self, config: Config) -> LiveDetector:
        detector_config = DetectorConfig(**dict(config.detector))
        detector_config.validate()
        # One bin per round unless the config fixes the bin size.
        return LiveDetector(detector_config, bin_seconds=int(config.interval_s))

    def _prime_detector(self) -> None:
        assert self._store is not None and self._detector is not None
        since = self.clock.now() - min(self._store.retention,
                                       prime_window(self._detector.config))
        try:
            frame = self._store.read_frame(since=since)
        except StoreError as exc:
            log.error("history: cannot read history to prime the detector: %s", exc)
            return
        began = time.monotonic()
        self._detector.prime(frame)
        log.info("detector primed with %d points of history in %.2f s",
                 len(frame), time.monotonic() - began)

    async def _start_sinks(self, config: Config) -> None:
        name = config.vantage_name
        agent = f"shutdown-monitor (+{config.contact_url})"
        hook = config.sinks.webhook
        if hook is not None:
            self._webhook = WebhookSink(
                hook.url, vantage=name, timeout_s=hook.timeout_s, retries=hook.retries,
                user_agent=agent,
            )
            for payload in self._restored_webhook:
                self._webhook.submit_payload(payload)
            await self._webhook.start()
        manager = config.sinks.alertmanager
        if manager is not None:
            self._alertmanager = AlertmanagerSink(
                manager.url, vantage=name, now=self.clock.now,
                resend_interval_s=min(float(config.interval_s), 300.0), user_agent=agent,
            )
            await self._alertmanager.start()
            open_now = self.lifecycle.open_incidents()
            if open_now:
                self._alertmanager.submit_round(open_now, [])

    async def _stop_sinks(self, drain_s: float) -> None:
        if self._webhook is not None:
            await self._webhook.close(drain_s)
        if self._alertmanager is not None:
            await self._alertmanager.close(drain_s)

    async def _reload(self) -> None:
        if self.config_path is None:
            log.error("reload: no configuration file to reload from")
            return
        try:
            config = load_config(self.config_path)
            if self.shard_override is not None:
                config = dataclasses.replace(config, shard=self.shard_override)
            if self._driver is not None:
                # The new driver reads the hitlist files: write what this one learned first.
                self._driver.checkpoint()
            driver = self._driver_factory(config, config.shard)
            detector = self._make_detector(config) if config.detector != self.config.detector \
                else None
        except (ConfigError, MonitorError, ProbeSetupError, OSError, ValueError) as exc:
            self.reload_errors += 1
            self.last_reload_error = str(exc)
            self.metrics.record_reload(False)
            log.error("reload of %s failed; the running configuration stays:\n%s",
                      self.config_path, exc)
            return
        old_driver = self._driver
        self._driver = driver
        if old_driver is not None:
            await old_driver.close()
        if detector is not None:
            self._detector = detector
            self._prime_detector()
        if config.listen != self.config.listen:
            log.warning("reload: a new listen address takes a restart (still on %s)", self.listen)
        if config.remote_write != self.config.remote_write or config.shard != self.config.shard:
            for writer in self._remote:
                await writer.close(drain_s=0.5)  # what is left stays buffered on disk
            self._remote = await start_writers(config, self.listen)
        if config.sinks != self.config.sinks or config.vantage_name != self.config.vantage_name:
            self._save_pending_webhook()
            await self._stop_sinks(drain_s=0.5)
            self._webhook = self._alertmanager = None
            self.config = config
            await self._start_sinks(config)
        self.config = config
        self.last_reload_error = None
        self.metrics.record_reload(True)
        log.warning("configuration reloaded from %s", self.config_path)

    def _save_pending_webhook(self) -> None:
        self._restored_webhook = self._webhook.pending() if self._webhook is not None else []

    async def _shutdown(self) -> None:
        if self.api is not None:
            await self.api.stop()
        await self._stop_sinks(drain_s=1.0)
        for writer in self._remote:
            await writer.close(drain_s=1.0)
        if self._driver is not None:
            try:
                await self._driver.close()
            except Exception:
                log.exception("closing the round driver")
        if self._store is not None:
            try:
                self._save_state()
                self._store.close()
            except StoreError as exc:
                log.error("history: %s", exc)
            self._store = None
        log.warning("shutdown-monitor stopped")

    # -- what the API shows (StatusSource) ---------------------------------------------------
    def incidents(self) -> list[dict[str, Any]]:
        return self.lifecycle.recent_incidents()

    def exposition(self) -> tuple[bytes, str]:
        if self._store is not None:
            with contextlib.suppress(StoreError):
                self.metrics.set_history_bytes(self._store.size_bytes())
        return render_metrics(self._registry)

    def health(self) -> tuple[bool, str]:
        interval = timedelta(seconds=float(self.config.interval_s))
        now = self.clock.now()
        last = self.last.finished_at
        allowed = 3 * interval + timedelta(seconds=60)
        if last is None:
            if now - self.started_at <= allowed:
                return True, "starting: no round finished yet"
            return False, f"no round finished since the start at {format_time(self.started_at)}"
        if now - last > allowed:
            return False, f"last round finished at {format_time(last)}, rounds are stalled"
        return True, f"last round at {format_time(last)}"

    def status(self) -> dict[str, Any]:
        outcome = self.last.outcome
        return {
            "vantage": {"name": self.config.vantage_name, **self.vantage.to_json()},
            "round": {
                "number": self.last.number,
                "time": None if self.last.time is None else format_time(self.last.time),
                "duration_s": self.last.duration_s,
                "abandoned_rounds": self.last.abandoned,
                "interval_s": self.config.interval_s,
            },
            "config": {
                "path": None if self.config_path is None else str(self.config_path),
                "reload_errors": self.reload_errors,
                "last_reload_error": self.last_reload_error,
            },
            "countries": country_status(outcome, self.last.levels),
            "open_incidents": len(self.lifecycle.open_incidents()),
        }


def prime_window(config: DetectorConfig) -> timedelta:
    """How much history the detector's baselines look at (plus a day), so a start reads no more
    of the store than that."""
    days = config.baseline_days
    if config.weekly_min_weeks > 0:
        days = max(days, 7 * config.baseline_weeks)
    return timedelta(days=days + 1, seconds=config.flap_merge_seconds)


def country_status(
    outcome: RoundOutcome | None, levels: Iterable[tuple[str, str, str, str, float]]
) -> dict[str, Any]:
    """Per country and per network: the last round's counts by method, and the levels."""
    countries: dict[str, Any] = {}

    def country(code: str) -> dict[str, Any]:
        entry: dict[str, Any] = countries.setdefault(
            code, {"methods": {}, "levels": {}, "networks": {}})
        return entry

    if outcome is not None:
        for count in outcome.counts:
            entry = country(count.country)
            if count.asn is not None:
                entry = entry["networks"].setdefault(str(count.asn), {"methods": {}, "levels": {}})
            method = entry["methods"].setdefault(count.method, {"total": 0, "up": 0})
            method["total"] += count.total
            method["up"] += count.up
        # Country totals are the sum over its networks plus unattributed targets.
        for code, entry in countries.items():
            for network in entry["networks"].values():
                for name, numbers in network["methods"].items():
                    into = entry["methods"].setdefault(name, {"total": 0, "up": 0})
                    into["total"] += numbers["total"]
                    into["up"] += numbers["up"]
            del code
    for code, scope, entity, signal_name, level in levels:
        if scope == "vantage" or signal_name == SIGNAL_VANTAGE_UP:
            continue
        entry = country(code)
        if scope == "asn":
            entry = entry["networks"].setdefault(entity, {"methods": {}, "levels": {}})
        elif scope != "country":
            entry = entry.setdefault("regions", {}).setdefault(entity, {"levels": {}})
        entry["levels"][signal_name] = level
    return countries
