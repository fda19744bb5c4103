"""A real Prometheus server for tests, and a /metrics endpoint for it to scrape.

`PrometheusServer` writes a config (scrape targets on 127.0.0.1, interval, external labels,
rule files), starts the Debian `/usr/bin/prometheus` on a free loopback port with its TSDB in
a temporary directory, waits for /-/ready, answers PromQL over the HTTP API, and stops and
cleans up on exit. Without the binary it skips loudly (CI installs it, so it runs there).

`MetricsEndpoint` serves a prometheus_client registry from a small aiohttp app on 127.0.0.1:0
in its own thread and event loop, so a test can block on Prometheus queries while the
endpoint keeps answering scrapes.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from monitor.export import render_metrics

PROMETHEUS_BINARY = Path("/usr/bin/prometheus")
HAVE_PROMETHEUS = PROMETHEUS_BINARY.exists()

needs_prometheus = pytest.mark.skipif(
    not HAVE_PROMETHEUS,
    reason=f"LOUD SKIP: {PROMETHEUS_BINARY} missing (apt-get install prometheus; CI has it)",
)

Result = list[dict[str, Any]]


class PrometheusError(RuntimeError):
    """Prometheus refused a query or did not start; the message carries its own words."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loopback_only(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if not (host.startswith("127.") or host in ("::1", "localhost")):
        raise ValueError(f"scrape target {target!r}: tests scrape loopback addresses only")


def _timestamp(moment: float | datetime) -> str:
    return f"{moment.timestamp() if isinstance(moment, datetime) else moment:.3f}"


class PrometheusServer:
    """A Prometheus started for one test (context manager). See the module docstring."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        external_labels: Mapping[str, str] | None = None,
        rule_files: Sequence[str | Path] = (),
        extra_args: Sequence[str] = (),
        job: str = "shutdown-monitor",
        metrics_path: str = "/metrics",
        startup_timeout: float = 60.0,
    ) -> None:
        for target in targets:
            _loopback_only(target)
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.external_labels = dict(external_labels or {})
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.extra_args = list(extra_args)
        self.job = job
        self.metrics_path = metrics_path
        self.startup_timeout = startup_timeout
        self.port = 0
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "prometheus.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def config(self) -> dict[str, Any]:
        global_section: dict[str, Any] = {
            "scrape_interval": self.scrape_interval,
            "scrape_timeout": self.scrape_interval,
            "evaluation_interval": self.evaluation_interval,
        }
        if self.external_labels:
            global_section["external_labels"] = self.external_labels
        config: dict[str, Any] = {
            "global": global_section,
            "scrape_configs": [{
                "job_name": self.job,
                "metrics_path": self.metrics_path,
                "static_configs": [{"targets": self.targets}],
            }],
        }
        if self.rule_files:
            config["rule_files"] = [str(p) for p in self.rule_files]
        return config

    # ----- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> PrometheusServer:
        if not HAVE_PROMETHEUS:
            pytest.skip(f"LOUD SKIP: {PROMETHEUS_BINARY} missing (apt-get install prometheus)")
        self.workdir = Path(tempfile.mkdtemp(prefix="prom-test-"))
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        try:
            for _attempt in range(3):  # the free port may be taken between probe and bind
                self.port = free_port()
                if self._start(config_path):
                    return self
            raise PrometheusError(f"prometheus did not become ready; log:\n{self.log()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self, config_path: Path) -> bool:
        assert self.workdir is not None
        data = self.workdir / f"data-{self.port}"
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(PROMETHEUS_BINARY), f"--config.file={config_path}",
                 f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--web.enable-lifecycle", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                if "address already in use" in self.log():
                    return False
                raise PrometheusError(
                    f"prometheus exited with {self._process.returncode}; log:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {self.startup_timeout}s; log:\n"
                              f"{self.log()}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=15)
        self._process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def reload(self) -> None:
        """Re-read the config and rule files (POST /-/reload)."""
        self._request("/-/reload", method="POST", raw=True)

    # ----- HTTP API ------------------------------------------------------------------------
    def _request(
        self, path: str, params: Mapping[str, str] | None = None, method: str = "GET",
        raw: bool = False,
    ) -> Any:
        query = urllib.parse.urlencode(params or {})
        url = f"{self.url}{path}"
        data = None
        if method == "POST":
            data = query.encode()
        elif query:
            url = f"{url}?{query}"
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            raise PrometheusError(
                f"{method} {path} {dict(params or {})}: HTTP {exc.code}: "
                f"{exc.read().decode(errors='replace')}") from exc
        if raw:
            return body
        document = json.loads(body)
        if document.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params or {})}: {document}")
        return document["data"]

    def query(self, promql: str, at: float | datetime | None = None) -> Result:
        """An instant query: data.result (vector: [{"metric": {...}, "value": [t, "v"]}])."""
        params = {"query": promql}
        if at is not None:
            params["time"] = _timestamp(at)
        data = self._request("/api/v1/query", params)
        result: Result = data["result"] if data["resultType"] in ("vector", "matrix") else [
            {"metric": {}, "value": data["result"]}]
        return result

    def query_range(
        self, promql: str, start: float | datetime, end: float | datetime, step: float | str,
    ) -> Result:
        """A range query; returns data.result (matrix: [{"metric": {...}, "values": [...]}])."""
        data = self._request("/api/v1/query_range", {
            "query": promql, "start": _timestamp(start), "end": _timestamp(end),
            "step": str(step)})
        result: Result = data["result"]
        return result

    def targets_health(self) -> list[dict[str, Any]]:
        """The active scrape targets with health, lastError, lastScrape."""
        active: list[dict[str, Any]] = self._request("/api/v1/targets")["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._request("/api/v1/rules")["groups"]
        return groups

    def wait_for(
        self, promql: str, predicate: Callable[[Result], bool] = bool, timeout: float = 30.0,
        interval: float = 0.2,
    ) -> Result:
        """Poll `promql` until `predicate(result)` holds; on timeout fail with what was seen."""
        deadline = time.monotonic() + timeout
        result: Result = []
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                health = [(t.get("scrapeUrl"), t.get("health"), t.get("lastError"))
                          for t in self.targets_health()]
                raise AssertionError(
                    f"timed out after {timeout}s waiting on {promql!r}; last result {result}; "
                    f"targets {health}")
            time.sleep(interval)

    def wait_for_value(self, promql: str, expected: float, timeout: float = 30.0) -> Result:
        """Wait until `promql` is exactly one sample with value `expected`."""
        return self.wait_for(promql, lambda r: len(r) == 1 and value(r) == expected, timeout)

    def wait_for_fresh_scrape(self, timeout: float = 30.0) -> float:
        """Wait until every target has been scraped after this call; returns that moment.

        Use it after changing the exposed numbers, so the next query sees them.
        """
        asked = time.time()

        def scraped_after() -> bool:
            health = self.targets_health()
            return bool(health) and all(
                t["health"] == "up" and _rfc3339(t["lastScrape"]) > asked for t in health)

        deadline = time.monotonic() + timeout
        while not scraped_after():
            if time.monotonic() > deadline:
                raise AssertionError(f"no scrape after {asked} within {timeout}s: "
                                     f"{self.targets_health()}")
            time.sleep(0.1)
        return time.time()

    async def aquery(self, promql: str, at: float | datetime | None = None) -> Result:
        """`query` for async tests: runs in a thread, so the event loop keeps serving."""
        return await asyncio.to_thread(self.query, promql, at)

    async def await_for(
        self, promql: str, predicate: Callable[[Result], bool] = bool, limit_s: float = 30.0,
    ) -> Result:
        """`wait_for` for async tests (in a thread, so the event loop keeps serving)."""
        return await asyncio.to_thread(self.wait_for, promql, predicate, limit_s)


def _rfc3339(text: str) -> float:
    # Prometheus gives nanoseconds ("2026-01-01T00:00:00.123456789Z"); Python takes micro.
    head, _, frac = text.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + (float(f"0.{frac[:6]}") if frac else 0.0)


def value(result: Result) -> float:
    """The value of a one-sample instant-query result (fails loudly otherwise)."""
    if len(result) != 1:
        raise AssertionError(f"expected exactly one sample, got {result}")
    return float(result[0]["value"][1])


def values_by(result: Result, label: str) -> dict[str, float]:
    """{label value: sample value} of an instant-query result."""
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


class MetricsEndpoint:
    """Serves `registry` at http://127.0.0.1:<port>/metrics from a thread (context manager).

    `render` defaults to monitor.export.render_metrics; `target` is "127.0.0.1:<port>" for
    PrometheusServer. `scrapes` counts the requests served.
    """

    def __init__(
        self, registry: CollectorRegistry,
        render: Callable[[CollectorRegistry], tuple[bytes, str]] = render_metrics,
    ) -> None:
        self.registry = registry
        self.render = render
        self.port = 0
        self.scrapes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, _request: web.Request) -> web.Response:
        self.scrapes += 1
        body, content_type = self.render(self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        if self._runner is not None:
            loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def __enter__(self) -> MetricsEndpoint:
        self._thread = threading.Thread(target=self._run, name="metrics-endpoint", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)


@contextlib.contextmanager
def backfilled_prometheus(directory: Path, openmetrics: str) -> Iterator[str]:
    """A real Prometheus serving `openmetrics` (samples with timestamps) loaded through
    `promtool tsdb create-blocks-from openmetrics`; yields its base URL on 127.0.0.1.

    This is how history read back from Prometheus is tested: the data is in the past, exactly
    as a server that scraped the daemon for weeks would hold it.
    """
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.skip("LOUD SKIP: prometheus/promtool not installed (scripts/test installs them)")
    (directory / "data.om").write_text(openmetrics)
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics",
                    str(directory / "data.om"), str(directory / "tsdb")],
                   check=True, capture_output=True, timeout=120)
    (directory / "prometheus.yml").write_text("global:\n  scrape_interval: 1h\n")
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=100y"], stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text()[-2000:])
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
