"""Helpers for the scale-out tests: what one vantage can reach, its daemon config, and a
Prometheus that scrapes daemons with vantage/shard target labels. Loopback only."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.prom import PrometheusServer

VANTAGES = ("ams", "fra")
COUNTRIES = ("KZ", "UZ")
URLS_PER_COUNTRY = 8


class World:
    """One vantage's view: a local HTTP server answering for its endpoints and control URL."""

    def __init__(self) -> None:
        self.blocked: set[str] = set()  # countries blocked, or "control"
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if request.match_info["what"] in self.blocked:
            return web.Response(status=403, text="blocked")
        return web.Response(text="ok")

    async def __aenter__(self) -> World:
        app = web.Application()
        app.router.add_get("/{what}/{n}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def write_config(root: Path, vantage: str, port: int, **extra: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    blocked = [str(n) for n in ipaddress.IPv4Network("0.0.0.0/0").address_exclude(
        ipaddress.IPv4Network("127.0.0.0/8"))]
    (root / "blocklist.txt").write_text("\n".join([*blocked, "::/0"]) + "\n")
    base = f"http://127.0.0.1:{port}"
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({
        "vantage": {"name": vantage},
        "interval_s": 1,
        "pacing": {"blocklist_file": "blocklist.txt", "per_block_pps": None},
        "probing": {"timeout_s": 0.5, "reprobes": 0},
        "countries": {cc: {"prefixes": None, "endpoints": {
            "urls": [f"{base}/{cc}/{n}" for n in range(URLS_PER_COUNTRY)]}}
            for cc in COUNTRIES},
        "control": {"urls": [f"{base}/control/1", f"{base}/control/2"]},
        "history": {"path": "history.sqlite"},
        **extra,
    }))
    return path


class LabelledPrometheus(PrometheusServer):
    """Scrapes each daemon with its vantage and shard as target labels (relabelling)."""

    def __init__(self, groups: list[tuple[str, dict[str, str]]]) -> None:
        super().__init__([target for target, _ in groups])
        self.groups = groups

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["scrape_configs"][0]["static_configs"] = [
            {"targets": [target], "labels": labels} for target, labels in self.groups]
        return config
