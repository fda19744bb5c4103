"""The HTTP API served by a real aiohttp server on 127.0.0.1:0.

The daemon behind it is exercised in test_daemon*.py; here a fixed `StatusSource` pins down the
routes, filters, status codes and error messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from monitor.api import ApiServer, parse_listen


class FixedSource:
    def __init__(self) -> None:
        self.healthy = True
        self.open = {
            "id": "a", "country": "KZ", "scope": "country", "entity": "KZ",
            "kind": "nationwide_shutdown", "severity": "critical",
            "start": "2022-01-05T10:30:00Z", "end": None, "min_level": 0.05, "score": 1.0,
            "signals": ["icmp_blocks_up"], "networks": [],
        }
        self.closed = {**self.open, "id": "b", "country": "IR", "entity": "IR",
                       "end": "2019-11-21T00:00:00Z"}

    def status(self) -> dict[str, Any]:
        return {"vantage": {"up": True}, "countries": {"KZ": {"levels": {"icmp_blocks_up": 0.05}}}}

    def incidents(self) -> list[dict[str, Any]]:
        return [self.open, self.closed]

    def health(self) -> tuple[bool, str]:
        return self.healthy, "last round at 2022-01-05T10:30:00Z"

    def exposition(self) -> tuple[bytes, str]:
        return b"shutdown_monitor_vantage_up 1\n", "text/plain; version=0.0.4; charset=utf-8"


@pytest.fixture
async def served() -> AsyncIterator[tuple[FixedSource, str]]:
    source = FixedSource()
    server = ApiServer(source, "127.0.0.1:0")
    await server.start()
    yield source, f"http://127.0.0.1:{server.port}"
    await server.stop()


async def test_routes(served: tuple[FixedSource, str]) -> None:
    source, base = served
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert await response.text() == "shutdown_monitor_vantage_up 1\n"
        async with http.get(base + "/healthz") as response:
            assert response.status == 200 and (await response.text()).startswith("ok: ")
        source.healthy = False
        async with http.get(base + "/healthz") as response:
            assert response.status == 503 and (await response.text()).startswith("unhealthy: ")
        async with http.get(base + "/api/status") as response:
            assert (await response.json())["countries"]["KZ"]["levels"]["icmp_blocks_up"] == 0.05
        async with http.get(base + "/api/incidents") as response:
            body = await response.json()
            assert [i["id"] for i in body["incidents"]] == ["a", "b"]


@pytest.mark.parametrize(
    ("query", "ids"),
    [("state=open", ["a"]), ("state=closed", ["b"]), ("country=ir", ["b"]),
     ("state=open&country=IR", [])],
)
async def test_incident_filters(
    served: tuple[FixedSource, str], query: str, ids: list[str]
) -> None:
    _, base = served
    async with aiohttp.ClientSession() as http, http.get(f"{base}/api/incidents?{query}") as r:
        assert [i["id"] for i in (await r.json())["incidents"]] == ids


async def test_bad_query_says_what_was_expected(served: tuple[FixedSource, str]) -> None:
    _, base = served
    async with aiohttp.ClientSession() as http, http.get(base + "/api/incidents?state=x") as r:
        assert r.status == 400
        assert "expected one of all, open, closed" in (await r.json())["error"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9310", ("127.0.0.1", 9310)), ("[::1]:0", ("::1", 0))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9310", "localhost:", ":80", "h:99999", "h:x"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen(text)
