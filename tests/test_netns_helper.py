"""The namespace helper itself: a socket made inside a namespace cannot see the host's listeners."""

from __future__ import annotations

import asyncio
import socket

from tests.netns import Netns, needs_root, run_in_netns


@needs_root
def test_sockets_made_in_namespace_live_in_it() -> None:
    host_listener = socket.socket()
    host_listener.bind(("127.0.0.1", 0))
    host_listener.listen()
    port = host_listener.getsockname()[1]
    try:
        with Netns() as ns:

            async def connect() -> str:
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), 2
                    )
                except ConnectionRefusedError:
                    return "refused"
                writer.close()
                return "connected"

            # The namespace's loopback has no listener on that port: the host's is invisible.
            assert run_in_netns(ns, connect) == "refused"
    finally:
        host_listener.close()
