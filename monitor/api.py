"""The daemon's HTTP API (aiohttp): /metrics, /healthz, /api/status, /api/incidents.

The app only reads: everything it shows comes from a `StatusSource` (the daemon), so the
handlers stay trivial and the daemon keeps one place where its state changes.
"""

from __future__ import annotations

import json
from typing import Any, Final, Protocol

from aiohttp import web

INCIDENT_STATES: Final = ("all", "open", "closed")


class StatusSource(Protocol):
    """What the API asks the daemon."""

    def status(self) -> dict[str, Any]:
        """The last round's numbers and levels per country and network, the vantage state."""
        ...

    def incidents(self) -> list[dict[str, Any]]:
        """Open and recent incidents, DESIGN's incident JSON."""
        ...

    def health(self) -> tuple[bool, str]:
        """(healthy, why): healthy while rounds keep completing."""
        ...

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus exposition (/metrics) and its content type."""
        ...


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=1, sort_keys=True) + "\n",
        status=status,
        content_type="application/json",
    )


def make_app(source: StatusSource) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        body, content_type = source.exposition()
        # content_type carries parameters (version, charset): pass it as a raw header.
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(_request: web.Request) -> web.Response:
        healthy, why = source.health()
        return web.Response(text=f"{'ok' if healthy else 'unhealthy'}: {why}\n",
                            status=200 if healthy else 503)

    async def status(_request: web.Request) -> web.Response:
        return _json(source.status())

    async def incidents(request: web.Request) -> web.Response:
        state = request.query.get("state", "all")
        if state not in INCIDENT_STATES:
            return _json(
                {"error": f"query parameter state={state!r}: expected one of "
                          f"{', '.join(INCIDENT_STATES)}"},
                status=400,
            )
        country = request.query.get("country")
        found = source.incidents()
        if state != "all":
            want_open = state == "open"
            found = [i for i in found if (i.get("end") is None) == want_open]
        if country is not None:
            found = [i for i in found if str(i.get("country", "")).upper() == country.upper()]
        return _json({"incidents": found})

    async def index(_request: web.Request) -> web.Response:
        return _json({"endpoints": ["/metrics", "/healthz", "/api/status", "/api/incidents"]})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/incidents", incidents)
    return app


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9310' or '[::1]:9310' -> (host, port); ValueError says what was expected."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9310")
    return host.strip("[]"), int(port_text)


class ApiServer:
    """Runs the app on one address; `port` is the bound one (useful with port 0)."""

    def __init__(self, source: StatusSource, listen: str) -> None:
        self.host, self._port = parse_listen(listen)
        self._runner = web.AppRunner(make_app(source), access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, reuse_address=True)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    @property
    def port(self) -> int:
        return self._port

    async def stop(self) -> None:
        await self._runner.cleanup()
