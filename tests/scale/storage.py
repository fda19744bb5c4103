"""Real remote-write storage for tests: VictoriaMetrics and a Prometheus receiver, on loopback.

`VictoriaMetrics` starts the Debian `/usr/bin/victoria-metrics` on 127.0.0.1 with its data in a
directory the test owns; `stop()` and `start()` take it down and bring it back on the same port
and data directory (a storage outage). `export()` returns the raw stored samples (no lookback,
no interpolation), which is what a "no gaps" check needs.

`stop_prometheus`/`restart_prometheus` do the same to tests/prom.py's PrometheusServer.
Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.prom import PrometheusServer, free_port

VM_BINARY = Path("/usr/bin/victoria-metrics")
HAVE_VM = VM_BINARY.exists()
needs_victoria_metrics = pytest.mark.skipif(
    not HAVE_VM,
    reason=f"LOUD SKIP: {VM_BINARY} missing (apt-get install victoria-metrics; CI has it)",
)


class VictoriaMetrics:
    """A single-node VictoriaMetrics for one test (context manager)."""

    def __init__(self, startup_timeout: float = 60.0, netns: str | None = None) -> None:
        self.startup_timeout = startup_timeout
        # Inside a named network namespace (the lab's vantage): then every HTTP call to it must
        # come from a thread in that namespace too.
        self.netns = netns
        self.port = 0
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    def log(self) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "vm.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> VictoriaMetrics:
        if not HAVE_VM:
            pytest.skip(f"LOUD SKIP: {VM_BINARY} missing (apt-get install victoria-metrics)")
        self.workdir = Path(tempfile.mkdtemp(prefix="vm-test-"))
        try:
            for _attempt in range(3):
                self.port = free_port()
                if self.start():
                    return self
            raise RuntimeError(f"victoria-metrics did not start; log:\n{self.log()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def start(self) -> bool:
        """(Re)start on the same port and data directory; False if the port was taken."""
        assert self.workdir is not None
        with (self.workdir / "vm.log").open("ab") as log:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self._process = subprocess.Popen(
                [*prefix, str(VM_BINARY), f"-httpListenAddr=127.0.0.1:{self.port}",
                 f"-storageDataPath={self.workdir / 'data'}", "-retentionPeriod=100y",
                 "-search.latencyOffset=0s", "-search.disableCache", "-loggerLevel=WARN"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                if "address already in use" in self.log():
                    return False
                raise RuntimeError(f"victoria-metrics exited; log:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"victoria-metrics not ready; log:\n{self.log()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=15)
        self._process = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def flush(self) -> None:
        """Make everything received so far searchable (VictoriaMetrics buffers for ~1 s)."""
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10):
            pass

    def _get(self, path: str, params: dict[str, str]) -> bytes:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body: bytes = response.read()
            return body

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        document = json.loads(self._get("/api/v1/query", {"query": promql, "time": f"{at:.3f}"}))
        result: list[dict[str, Any]] = document["data"]["result"]
        return result

    def export(self, selector: str, start: float = 0, end: float | None = None,
               ) -> list[dict[str, Any]]:
        """Raw samples: [{"metric": {...}, "values": [...], "timestamps": [ms, ...]}]."""
        params = {"match[]": selector, "start": f"{start:.3f}"}
        if end is not None:
            params["end"] = f"{end:.3f}"
        lines = self._get("/api/v1/export", params).decode().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def stop_prometheus(server: PrometheusServer) -> None:
    """Take a PrometheusServer down without deleting its data (a storage outage)."""
    process = server._process
    if process is not None and process.poll() is None:
        process.terminate()
        process.wait(timeout=30)
    server._process = None


def restart_prometheus(server: PrometheusServer) -> None:
    """Bring it back on the same port and TSDB directory."""
    assert server.workdir is not None
    if not server._start(server.workdir / "prometheus.yml"):
        raise RuntimeError(f"prometheus could not take port {server.port} again")
