"""Network namespaces the tests create themselves, so probe traffic never leaves this machine.

`Netns` makes a namespace (unique name, loopback up) and removes it on exit. `run_in_netns`
runs a coroutine on a fresh event loop in a thread that has joined the namespace: every socket
created there (ICMP, TCP, aiohttp's, dnspython's) belongs to that namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import subprocess
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_counter = itertools.count()

IS_ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(
    not IS_ROOT,
    reason="LOUD SKIP: needs root to create network namespaces (CI runs as root, so it runs there)",
)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Netns:
    """A network namespace with loopback up; a context manager that deletes it on exit."""

    def __init__(self, prefix: str = "smt") -> None:
        self.name = f"{prefix}{os.getpid()}x{next(_counter)}"

    def __enter__(self) -> Netns:
        sh("ip", "netns", "add", self.name)
        self.exec("ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        sh("ip", "netns", "del", self.name, check=False)

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *args, check=check)

    def sysctl(self, key: str, value: str) -> None:
        self.exec("sysctl", "-qw", f"{key}={value}")

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(
    ns: Netns | str,
    factory: Callable[[], Awaitable[T]],
    timeout: float = 120.0,
    runner: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run,
) -> T:
    """Run `factory()` to completion on a new event loop in a thread inside `ns` (a Netns, or
    the name of a namespace someone else made, such as the lab's).

    runner: what runs the coroutine (asyncio.run; probes.eventloop.run for the shipped loop)."""
    name = ns if isinstance(ns, str) else ns.name
    box: dict[str, object] = {}

    def target() -> None:
        try:
            _setns(f"/run/netns/{name}")

            async def main() -> T:
                return await factory()

            box["value"] = runner(main())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"coroutine in namespace {name} did not finish in {timeout} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
